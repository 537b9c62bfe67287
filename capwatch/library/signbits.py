"""Sign-bit codes of embedding vectors: packing them, and the two in-memory stages of a nearest-neighbour search
over them (capwatch.library.vectors keeps the codes and reads the exact vectors).

A code is one bit per dimension (the sign around the model's mean vector), packed into whole 64-bit words.
:func:`hamming` compares every code with the query's (the first stage: a million 512-bit codes are 64 MB to
stream through); :func:`sign_scores` ranks the survivors by the query's float entries against their bits (the
second stage, asymmetric: only the image side is quantised).
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt

from capwatch.library.parts import run_parts

FloatArray = npt.NDArray[np.float32]

#: Rows per step of :func:`hamming`: the step's temporaries (XOR words, byte counts) stay in the CPU cache.
STEP = 16_384
#: At most this many threads share one Hamming scan. Measured on two cores only (two threads ~1.5x one); the cap
#: keeps a search on a bigger box from taking every core from a daemon that is captioning.
MAX_WORKERS = 4


def pack_codes(vectors: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """The sign bits of ``vectors`` (n, dim), packed 8 per byte, padded to whole 64-bit words: (n, ceil(dim/64)*8)."""
    bits = np.packbits(np.asarray(vectors) > 0, axis=1)
    width = -(-bits.shape[1] // 8) * 8
    if width != bits.shape[1]:
        bits = np.pad(bits, ((0, 0), (0, width - bits.shape[1])))
    return np.ascontiguousarray(bits)


def query_direction(q: FloatArray, centre: FloatArray | None) -> FloatArray:
    """What the query's sign bits are taken of: ``q`` without its component along the images' mean direction.
    Ranking by q.x is ranking by q.(x - mean); the mean direction tells the images apart least (measured on the
    bench's text-like queries, 20 k images, 1000 candidates: recall@10 0.958 for q - mean, 0.988 for this)."""
    if centre is None:
        return q
    norm = float(np.linalg.norm(centre))
    if norm == 0.0:
        return q
    unit = centre / norm
    projected: FloatArray = q - float(q @ unit) * unit
    return projected


def scan_workers() -> int:
    """How many threads :func:`hamming` may use here: the CPUs this process may run on, at most
    :data:`MAX_WORKERS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def hamming(words: npt.NDArray[np.uint64], query: npt.NDArray[np.uint64], *,
            workers: int = 1) -> npt.NDArray[np.int64]:
    """Bits differing between each row of ``words`` (n, 8k) and ``query`` (8k,).

    With ``workers`` > 1 the rows are split into that many contiguous parts (never smaller than :data:`STEP`
    rows), each counted by its own thread (numpy's loops release the GIL). Measured at 1 M 512-bit codes on a
    2-core AMD EPYC (Zen 3, AVX2): one thread p50 18.3 ms, two 11.0-13.1 ms. Raises what numpy raises
    (MemoryError), from whichever part failed."""
    n = words.shape[0]
    out = np.empty(n, dtype=np.int64)
    parts = max(1, min(workers, n // STEP))
    if parts == 1:
        _count_into(words, query, out)
        return out
    bounds = [n * k // parts for k in range(parts + 1)]
    failures: list[BaseException] = []

    def part(k: int) -> None:
        try:
            _count_into(words[bounds[k]:bounds[k + 1]], query, out[bounds[k]:bounds[k + 1]])
        except BaseException as exc:  # re-raised in the calling thread below
            failures.append(exc)

    run_parts(parts, part, name="capwatch-hamming")
    if failures:
        raise failures[0]
    return out


def _count_into(words: npt.NDArray[np.uint64], query: npt.NDArray[np.uint64], out: npt.NDArray[np.int64]) -> None:
    """Fill ``out`` with each row's differing bits, in steps of :data:`STEP` rows into buffers made once:
    whole-array temporaries (64 MB each at a million 512-bit codes) cost a page fault per 4 KB on every search.
    The per-word popcounts (bytes, at most 64 each) are summed inside 64-bit integers: byte pairs into 16-bit
    lanes (at most 128), then the four lanes by one multiply (their sum, at most 512, lands in the top 16 bits).
    Measured at 1 M codes (512 bits, a 2-core box, load ~3): 52 ms as whole arrays, 27 ms in steps; the multiply
    instead of two more mask-and-add rounds ~10 % less again (load ~8: p50 28.5 -> 25.7 ms)."""
    n, width = words.shape
    rows_max = min(n, STEP)
    xor = np.empty((rows_max, width), dtype=np.uint64)
    counts = np.empty((rows_max, width), dtype=np.uint8)
    lanes = np.empty((rows_max, width // 8), dtype=np.uint64)
    high = np.empty((rows_max, width // 8), dtype=np.uint64)
    m8, eight = np.uint64(0x00FF00FF00FF00FF), np.uint64(8)
    spread, top = np.uint64(0x0001000100010001), np.uint64(48)
    for start in range(0, n, STEP):
        rows = words[start:start + STEP]
        k = len(rows)
        x, c, a, b = xor[:k], counts[:k], lanes[:k], high[:k]
        np.bitwise_xor(rows, query, out=x)
        np.bitwise_count(x, out=c)
        packed = c.view(np.uint64)  # (rows, width / 8): 8 byte-sized counts per integer
        np.bitwise_and(packed, m8, out=a)
        np.right_shift(packed, eight, out=b)
        np.bitwise_and(b, m8, out=b)
        np.add(a, b, out=a)
        np.multiply(a, spread, out=a)
        np.right_shift(a, top, out=a)
        out[start:start + k] = a[:, 0] if a.shape[1] == 1 else a.sum(axis=1)


def byte_table(direction: FloatArray, width: int) -> FloatArray:
    """(width, 256): for each byte position of a packed code (:func:`pack_codes`, ``width`` bytes) and each
    byte value, the sum of ``direction``'s entries whose bits are set: ``table[j, code[j]]`` summed over j is
    ``direction . bits(code)``."""
    padded = np.zeros(width * 8, dtype=np.float32)
    padded[:len(direction)] = direction
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float32)  # (256, 8), MSB first
    table: FloatArray = padded.reshape(width, 8) @ bits.T
    return table


def sign_scores(table: FloatArray, codes: npt.NDArray[np.uint8]) -> FloatArray:
    """``direction . bits(code)`` for each row of ``codes`` (n, width bytes), from :func:`byte_table`: the query's
    float entries against the image's sign bits (asymmetric: only the image side is quantised)."""
    scores: FloatArray = table[np.arange(table.shape[0]), codes].sum(axis=1, dtype=np.float32)
    return scores
