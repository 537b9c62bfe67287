"""Groups of near-identical images from their embeddings: exact copies, re-encodes and resizes (cosine near 1),
and bursts of nearly the same shot when the threshold allows.

Pairs at or above the threshold are found exactly below :data:`EXACT_BELOW` images (every pair compared, in
blocks); above it by locality-sensitive hashing: the sign bits of the centred vectors, cut into 16-bit bands, put
two vectors in the same bucket when one band is equal, and only pairs sharing a bucket are compared exactly. A
pair at cosine 0.95 shares a band of one 32-band table with probability 1 - (1 - 0.899^16)^32 = 0.998; lower
thresholds add tables over random rotations (see :func:`_tables_for`). Groups are the connected components of
the pairs found; a group's similarity is the lowest cosine between any two of its images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: Below this many images every pair is compared (n^2 dot products cost less than hashing then).
EXACT_BELOW = 6000
#: Default cosine for "the same picture": re-encodes and resizes of one photo stay above it with real models.
DEFAULT_THRESHOLD = 0.95
_BAND_BITS = 16
#: Buckets larger than this are compared as one block (a run of look-alikes) instead of pair by pair.
_BIG_BUCKET = 64


@dataclass(frozen=True)
class DuplicateGroup:
    """Images that are near-identical: their paths (sorted) and the lowest cosine of any pair among them."""

    similarity: float
    paths: tuple[str, ...]


def _exact_pairs(matrix: npt.NDArray[np.float32], threshold: float) -> npt.NDArray[np.int64]:
    n = len(matrix)
    found: list[npt.NDArray[np.int64]] = []
    block = 2048
    for start in range(0, n, block):
        sims = matrix[start:start + block] @ matrix[start:].T
        rows, cols = np.nonzero(sims >= threshold)
        i, j = rows + start, cols + start
        keep = j > i
        found.append(np.stack([i[keep], j[keep]], axis=1).astype(np.int64))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def _tables_for(threshold: float) -> int:
    """Hash tables (32 bands of 16 bits each, over independent rotations) so that a pair at ``threshold``
    is missed with probability under about 0.5 %."""
    angle = float(np.arccos(np.clip(threshold, -1.0, 1.0)))
    per_band = (1.0 - angle / np.pi) ** _BAND_BITS
    tables = 1
    while (1.0 - per_band) ** (32 * tables) > 0.005 and tables < 8:
        tables += 1
    return tables


def _bucket_pairs(keys: npt.NDArray[np.uint16], matrix: npt.NDArray[np.float32], threshold: float
                  ) -> list[npt.NDArray[np.int64]]:
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    edges = np.flatnonzero(np.diff(sorted_keys)) + 1
    starts = np.concatenate([[0], edges])
    sizes = np.diff(np.concatenate([starts, [len(keys)]]))
    out: list[npt.NDArray[np.int64]] = []
    for size in np.unique(sizes[(sizes >= 2) & (sizes <= _BIG_BUCKET)]):
        run_starts = starts[sizes == size]
        a, b = np.triu_indices(int(size), k=1)
        i = order[run_starts[:, None] + a[None, :]].reshape(-1)
        j = order[run_starts[:, None] + b[None, :]].reshape(-1)
        out.append(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1).astype(np.int64))
    for start, size in zip(starts[sizes > _BIG_BUCKET], sizes[sizes > _BIG_BUCKET], strict=True):
        members = np.sort(order[start:start + size])
        pairs = _exact_pairs(matrix[members], threshold)
        out.append(members[pairs])
    return out


def _hashed_pairs(matrix: npt.NDArray[np.float32], threshold: float, seed: int = 0) -> npt.NDArray[np.int64]:
    n, dim = matrix.shape
    centred = matrix - matrix.mean(axis=0)
    rng = np.random.default_rng(seed)
    candidates: list[npt.NDArray[np.int64]] = []
    for table in range(_tables_for(threshold)):
        rotated = centred if table == 0 else centred @ np.linalg.qr(rng.standard_normal((dim, dim)))[0]
        bits = np.packbits(rotated > 0, axis=1)
        if bits.shape[1] % 2:
            bits = np.pad(bits, ((0, 0), (0, 1)))
        bands = bits.view(">u2")
        for band in range(bands.shape[1]):
            candidates += _bucket_pairs(np.ascontiguousarray(bands[:, band]), matrix, threshold)
    if not candidates:
        return np.zeros((0, 2), dtype=np.int64)
    unique = np.unique(np.concatenate(candidates)[:, 0] * n + np.concatenate(candidates)[:, 1])
    pairs = np.stack([unique // n, unique % n], axis=1)
    keep = np.zeros(len(pairs), dtype=bool)
    for start in range(0, len(pairs), 200_000):
        chunk = pairs[start:start + 200_000]
        sims = np.einsum("ij,ij->i", matrix[chunk[:, 0]], matrix[chunk[:, 1]])
        keep[start:start + 200_000] = sims >= threshold
    return pairs[keep]


def near_pairs(matrix: npt.NDArray[np.float32], threshold: float) -> npt.NDArray[np.int64]:
    """(i, j), i < j, of the rows of ``matrix`` (unit vectors) whose cosine is at least ``threshold``: all of
    them below EXACT_BELOW rows, nearly all (see the module notes) above."""
    if len(matrix) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    if len(matrix) < EXACT_BELOW:
        return _exact_pairs(matrix, threshold)
    return _hashed_pairs(matrix, threshold)


def group(paths: Sequence[str], matrix: npt.NDArray[np.float32], threshold: float = DEFAULT_THRESHOLD
          ) -> list[DuplicateGroup]:
    """Groups of near-identical images among ``paths`` (one row of ``matrix`` each): connected components of
    the pairs at or above ``threshold``, most similar group first (then by first path)."""
    pairs = near_pairs(matrix, threshold)
    parent = list(range(len(paths)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = {}
    for i in {int(x) for x in pairs.reshape(-1).tolist()}:
        members.setdefault(find(i), []).append(i)
    groups: list[DuplicateGroup] = []
    for rows in members.values():
        rows.sort(key=lambda r: paths[r])
        block = matrix[rows]
        sims = block @ block.T
        lowest = float(sims[np.triu_indices(len(rows), k=1)].min())
        groups.append(DuplicateGroup(similarity=min(lowest, 1.0), paths=tuple(paths[r] for r in rows)))
    groups.sort(key=lambda g: (-g.similarity, g.paths))
    return groups
