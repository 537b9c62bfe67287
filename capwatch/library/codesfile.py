"""One model's sign-bit codes kept as a flat file, which a one-shot search (or a web page's request, each with an
index of its own) maps instead of reading them.

Every search by meaning compares the query with the sign bits of every image (capwatch.library.vectors): 64 MB at
a million 512-d vectors, stored in the index in blocks of 1024. A daemon keeps them in memory; a one-shot
``capwatch search`` read them out of SQLite at every run, ~50 ms of CPU (SQLite's overflow pages copied into
Python bytes, then into one array) beside its imports and model load on a 2-core box. Here a copy lives in the
user's cache as one file: a header, the ids and the codes at page-aligned offsets, which numpy maps (the page
cache's pages are used where they are; nothing is copied or parsed).

The header names the state it was made from: the index file (device and inode), the model, its
``vector_models.version`` (bumped by every change to its codes), entry count, centre and last block. A search uses
the file only when all of these match what the index says now, inside the read transaction it searches in; else it
reads the blocks from the index and writes the file again (written whole under another name, flushed, then renamed
over the old one by capwatch.models.cache.write_atomic: a reader never sees half of one). The file is a cache:
losing it costs one read, and a damaged or foreign one is ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from capwatch.models.cache import write_atomic

MAGIC = b"capwatch-codes\n"
FORMAT = 1
#: The header's size and the alignment of both arrays (a page): numpy maps each from its offset.
PAGE = 4096


@dataclass(frozen=True)
class CodesState:
    """What a codes file must have been made from to stand for the index now."""

    index_dev: int
    index_ino: int
    model: str
    version: int
    entries: int
    #: sha256 of the centre's float32 bytes (the signs are taken around it), "" for none.
    centre: str
    #: sha256 of the last block's ids and codes: an index made again in a file that got the old one's inode, up to
    #: the same version, count and centre, still numbers its images otherwise.
    last_block: str

    @classmethod
    def of(cls, index_path: Path, model: str, version: int, entries: int, centre: bytes | None,
           last_block: bytes) -> CodesState:
        """The state of ``model``'s codes in the index at ``index_path`` (``last_block``: its last block's ids and
        codes, joined). Raises OSError when the index cannot be stat'ed."""
        st = os.stat(index_path)
        return cls(st.st_dev, st.st_ino, model, version, entries,
                   "" if centre is None else hashlib.sha256(centre).hexdigest(),
                   hashlib.sha256(last_block).hexdigest())


def kept_directory() -> Path:
    """Where the codes files are kept: ``codes`` in capwatch's cache (capwatch.paths.cache_dir)."""
    from capwatch import paths

    return paths.cache_dir() / "codes"


def codes_path(directory: Path, index_path: Path, model: str) -> Path:
    """Where the codes of ``model`` in the index at ``index_path`` are kept under ``directory``."""
    key = hashlib.sha256(f"{os.path.realpath(index_path)}\0{model}".encode()).hexdigest()[:32]
    return directory / f"{key}.codes"


def _aligned(size: int) -> int:
    return -(-size // PAGE) * PAGE


def load(path: Path, state: CodesState) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]] | None:
    """The ids (n,) and codes (n, words) mapped from the file at ``path`` when it was made from ``state``; None when
    it is missing, not a regular file (a link included), damaged, or made from anything else."""
    try:
        # O_NONBLOCK: a FIFO put in its place must not hang the search (regular files ignore it)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        try:
            size = os.fstat(fd).st_size
            if not stat.S_ISREG(os.fstat(fd).st_mode) or size < PAGE:
                return None
            head = handle.read(PAGE)
        except OSError:
            return None
        header = _parse(head)
        if header is None or header.get("format") != FORMAT or header.get("state") != asdict(state):
            return None
        words = header.get("words")
        if not isinstance(words, int) or words <= 0:
            return None
        n = state.entries
        ids_end = PAGE + _aligned(8 * n)
        if size != ids_end + 8 * n * words:
            return None
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, words), dtype=np.uint64)
        try:
            ids = np.memmap(handle, dtype="<i8", mode="r", offset=PAGE, shape=(n,))
            codes = np.memmap(handle, dtype="<u8", mode="r", offset=ids_end, shape=(n, words))
        except (OSError, ValueError):
            return None
    return ids, codes  # the maps outlive the file object: mmap keeps its own descriptor


def save(path: Path, state: CodesState, ids: npt.NDArray[np.int64], codes: npt.NDArray[np.uint64]) -> None:
    """Write ``ids`` and ``codes`` (as :func:`load` gives them back) for ``state`` to ``path``, replacing what is
    there in one rename. Raises OSError (the caller decides whether that matters)."""
    if len(ids) != state.entries or codes.shape[0] != state.entries or codes.ndim != 2:
        raise OSError(f"{path}: {len(ids)} ids and {codes.shape[0]} codes for {state.entries} entries")
    header = json.dumps({"format": FORMAT, "state": asdict(state), "words": int(codes.shape[1])}).encode()
    if len(MAGIC) + len(header) >= PAGE:
        raise OSError(f"{path}: the header does not fit in one page")

    def write(handle: BinaryIO) -> None:
        handle.write((MAGIC + header).ljust(PAGE, b"\0"))
        raw_ids = np.ascontiguousarray(ids, dtype="<i8").tobytes()
        handle.write(raw_ids.ljust(_aligned(len(raw_ids)), b"\0"))
        handle.flush()
        np.ascontiguousarray(codes, dtype="<u8").tofile(handle)  # 64 MB at a million: no bytes copy

    # Flushed to disk before the rename makes it the file searches map: never a new name over unwritten pages.
    write_atomic(path, write, mode=0o600)
    _prune(path, state)


#: A half-written file older than this is a crashed writer's (a whole write takes well under a second).
STALE_TEMPORARY_SECONDS = 3600.0


def _prune(kept: Path, state: CodesState) -> None:
    """Remove the files of the same index for other models (a library that changed models does not keep the old
    model's 72 MB per million images) and crashed writers' leftovers; raises nothing."""
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(kept.parent):
            if entry.name == kept.name or not entry.is_file(follow_symlinks=False):
                continue
            try:
                # write_atomic's temp names: .NAME.codes.PID-RANDOM.tmp
                if entry.name.startswith(".") and ".codes." in entry.name and entry.name.endswith(".tmp"):
                    if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMPORARY_SECONDS:
                        os.unlink(entry.path)
                    continue
                if not entry.name.endswith(".codes"):
                    continue
                header = _header(Path(entry.path))
                other = header.get("state") if header is not None else None
                if (isinstance(other, dict) and (other.get("index_dev"), other.get("index_ino")) == (
                        state.index_dev, state.index_ino) and other.get("model") != state.model):
                    os.unlink(entry.path)
            except OSError:
                continue


def _header(path: Path) -> dict[str, Any] | None:
    """The JSON header of the codes file at ``path``, None when it has none. Raises OSError."""
    with open(path, "rb") as handle:
        return _parse(handle.read(PAGE))


def _parse(head: bytes) -> dict[str, Any] | None:
    """The JSON header at the start of a codes file's first page; None when it is not one."""
    if not head.startswith(MAGIC):
        return None
    try:
        header = json.loads(head[len(MAGIC):].split(b"\0", 1)[0])
    except ValueError:
        return None
    return header if isinstance(header, dict) else None
