"""Image embeddings in the index (schema 6) and the nearest-neighbour search over them.

Storage (see migration 6): ``image_vectors`` holds one float32 vector per image and model, exactly as the
embedder gave it (L2-normalised); ``vector_blocks`` holds the vectors' sign bits (1 bit per dimension), packed in
blocks of up to :data:`BLOCK` rows so that a search process reads a million of them in a thousand rows. A one-shot
search maps them from a copy in the user's cache instead, while it matches the index (capwatch.library.codesfile).

A video's other chosen frames (its *moments*, schema 9: ``frame_vectors``) share the blocks under the key ``-id``
(an image's key is its row id, > 0): :meth:`Vectors.nearest` ranks keys, :meth:`Vectors.matrix_of` reads either
kind, and capwatch.library.moments turns keys into one hit per image (a video at its best moment).

Search is three stages: the sign bits of every vector are compared with the query's (Hamming distance, numpy
popcount over 64-bit words: 64 bytes per 512-d vector, on as many threads as there are cores, up to four); the
``candidates`` closest are ranked in memory by the query's float values against their sign bits
(capwatch.library.signbits: only the image side quantised, a far better estimate than the Hamming distance); the
best ``rescore`` of those are looked up in ``image_vectors`` and ranked by their exact cosine. The bits are signs
around the model's mean vector, not the origin: image embeddings share a large common direction (and a text query
sits far from all of them), so signs around the origin are nearly the same for every image; around the mean they
split the images. Ranking by q.x and by q.(x - mean) is the same ranking. Measured on clustered vectors with
text-like queries (100 k, 512-d, 1000 candidates): recall@10 0.978 around the origin, 1.000 around the mean. Only the
cosine of exact float32 vectors is ever shown. bench/search.py --vectors measures recall@10 against an exact search.

Why no SQLite extension: sqlite-vec's ``vec0`` (the obvious candidate) needs ``enable_load_extension``, which
pyenv-built Pythons lack, and its tables cannot be written without the extension, so an index written by one
Python would go stale for the other. Measured on this box at 1 M 512-bit codes: vec0 KNN (k=1000) 8.8-35 s,
``vec_distance_hamming`` in a full-table SELECT 0.57-0.79 s, the numpy scan here 0.12-0.14 s (bench/search.py
--vectors prints the side-by-side figures). Plain tables and numpy work under every Python and SQLite client.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from capwatch.errors import CapwatchError
from capwatch.library import codesfile
from capwatch.library.index import Index, normalise_path
from capwatch.library.moments import FRAME_ROWS_SQL, VideoMoments, replace_frames
from capwatch.library.parts import run_parts
from capwatch.library.signbits import (
    byte_table,
    hamming,
    pack_codes,
    query_direction,
    scan_workers,
    sign_scores,
)

log = logging.getLogger(__name__)

#: Codes per row of ``vector_blocks``: small enough that appending to the last block rewrites little, large
#: enough that a million vectors load in about a thousand rows.
BLOCK = 1024
#: Default number of Hamming candidates (at least this, or 40 per result wanted; more for narrower vectors and
#: for more images).
CANDIDATES = 1000
#: Candidates (the best by their sign bits against the query's floats) whose exact cosine is read: at least this,
#: one per 2000 images, and 6 per result wanted.
RESCORE = 200
#: Connections that read the exact vectors of many candidates side by side (see Vectors._image_rows). Measured on a
#: 2-core Zen 3 VM, 500 random rows of 1 M right after the page cache was dropped: the index's own connection
#: (memory-mapped) 421-437 ms, four readers memory-mapped 331-338 ms, four readers without the map 77-81 ms; plain
#: connections without the map, one 138-166 ms, eight 37-64 ms. A reader costs ~1-2 ms to open.
ROW_READERS = 4
#: Fewer rows than this are read on the caller's connection alone.
PARALLEL_ROWS = 128
#: Below this many vectors the sign bits are taken around the origin (a mean of a few is no centre).
MIN_CENTRED = 64

FloatArray = npt.NDArray[np.float32]
#: One model's codes as a search holds them: (vector_models.version they belong to, ids, codes as 64-bit words,
#: the centre their signs are taken around or None).
_Codes = tuple[int, npt.NDArray[np.int64], npt.NDArray[np.uint64], "FloatArray | None"]


class VectorError(CapwatchError):
    """A vector cannot be stored (its width differs from the model's vectors already stored)."""


@dataclass(frozen=True)
class VectorModel:
    """One embedding model's vectors in the index."""

    model: str
    dim: int
    live: int


@dataclass(frozen=True)
class Neighbour:
    """An image near the query: its row id, path and exact cosine."""

    image_id: int
    path: str
    similarity: float


def _batches(cursor: sqlite3.Cursor, size: int = 20_000) -> Iterator[list[Any]]:
    while rows := cursor.fetchmany(size):
        yield rows


def _as_vector(blob: bytes) -> FloatArray:
    return np.frombuffer(blob, dtype=np.float32)


def _read_blocks(conn: sqlite3.Connection, model: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
    """Every entry of ``model``'s blocks: ids (n,) and codes as 64-bit words (n, a multiple of 8; zero words pad a
    code to whole groups of 512 bits for :func:`hamming`, adding no distance).

    The blocks are copied one at a time into two arrays sized beforehand (``length()`` of a blob is read from its
    record header, not its pages), not gathered and joined: at a million 512-bit codes the join was a second
    64 MB copy into freshly faulted memory, and fetchall() held all the blocks' bytes at once (measured on this
    2-core box: see the README's Searching figures)."""
    entries, code_bytes = conn.execute(
        "SELECT coalesce(sum(length(ids)), 0) / 8, coalesce(sum(length(codes)), 0) FROM vector_blocks "
        "WHERE model = ?", (model,)).fetchone()
    width = int(code_bytes) // int(entries) if entries else 64
    words_per_code = -(-width // 64) * 8  # whole groups of 8 words
    ids = np.empty(int(entries), dtype=np.int64)
    words = np.zeros((int(entries), words_per_code), dtype=np.uint64)
    codes = words.view(np.uint8)
    done = 0
    cursor = conn.execute("SELECT ids, codes FROM vector_blocks WHERE model = ? ORDER BY block", (model,))
    for block_ids, block_codes in cursor:
        n = len(block_ids) // 8
        if done + n > len(ids) or len(block_codes) != n * width:
            raise sqlite3.DatabaseError(f"vector_blocks of {model}: a block's ids and codes disagree")
        ids[done:done + n] = np.frombuffer(block_ids, dtype="<i8")
        codes[done:done + n, :width] = np.frombuffer(block_codes, dtype=np.uint8).reshape(n, width)
        done += n
    if done != len(ids):
        raise sqlite3.DatabaseError(f"vector_blocks of {model}: a block's ids and codes disagree")
    return ids, words


def _read_codes(conn: sqlite3.Connection, model: str, known: int | None = None,
                kept: tuple[Path, Path] | None = None) -> _Codes | None:
    """``model``'s codes as of now, read in one snapshot (call inside a read transaction); None when their
    version is ``known`` (the caller holds them already). ``kept``: (the folder of codes files, the index file):
    the codes are mapped from their file when it was made from this very state, else read from the blocks and the
    file written again (capwatch.library.codesfile; a file that cannot be written is only a slower next run)."""
    row = conn.execute("SELECT version, centre, entries FROM vector_models WHERE model = ?", (model,)).fetchone()
    version = -1 if row is None else int(row[0])
    if version == known:
        return None
    centre = None if row is None or row[1] is None else _as_vector(row[1])
    state, path = None, None
    if kept is not None and row is not None:
        last = conn.execute("SELECT ids, codes FROM vector_blocks WHERE model = ? ORDER BY block DESC LIMIT 1",
                            (model,)).fetchone()
        with contextlib.suppress(OSError):
            state = codesfile.CodesState.of(kept[1], model, version, int(row[2]), row[1],
                                            b"" if last is None else bytes(last[0]) + bytes(last[1]))
            path = codesfile.codes_path(kept[0], kept[1], model)
            mapped = codesfile.load(path, state)
            if mapped is not None:
                return version, mapped[0], mapped[1], centre
    ids, words = _read_blocks(conn, model)
    if state is not None and path is not None:
        try:
            codesfile.save(path, state, ids, words)
        except OSError as exc:
            log.debug("codes of %s not kept in %s: %s", model, path, exc)
    return version, ids, words, centre


class _ReadAhead(threading.Thread):
    """Reads one model's codes over a read-only connection of its own (see :meth:`Vectors.read_ahead`)."""

    def __init__(self, index: Index, model: str, kept: tuple[Path, Path] | None) -> None:
        super().__init__(name=f"capwatch-codes-{model}", daemon=True)
        self._index = index
        self._model = model
        self._kept = kept
        #: The codes read, once the thread has ended; None when the read failed.
        self.codes: _Codes | None = None

    def run(self) -> None:
        try:
            conn = self._index.reader()
            try:
                conn.execute("BEGIN")
                self.codes = _read_codes(conn, self._model, kept=self._kept)
            finally:
                conn.close()
        except (sqlite3.Error, OSError, ValueError):
            # The search then reads them itself, on its own connection, and reports what is wrong in one line.
            self.codes = None
        # The connections the search will read its candidates' vectors with, opened here rather than on its path.
        with contextlib.suppress(sqlite3.Error, OSError):
            self._index.open_row_readers(ROW_READERS)


def _vector_rows(conn: sqlite3.Connection, images: list[int], model: str) -> list[tuple[int, bytes]]:
    """``(image_id, vector)`` of those of ``images`` that have a vector of ``model``, read over ``conn``."""
    rows: list[tuple[int, bytes]] = []
    for start in range(0, len(images), 900):
        chunk = images[start:start + 900]
        sql = (f"SELECT image_id, vector FROM image_vectors WHERE model = ? "
               f"AND image_id IN ({', '.join('?' * len(chunk))})")
        rows += conn.execute(sql, [model, *chunk]).fetchall()
    return rows


def _unit(vector: npt.ArrayLike) -> FloatArray:
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


class Vectors:
    """The vectors of one :class:`Index` (same thread as the index). Holds the packed codes of the models it has
    searched in memory and reloads them when another connection changed them (``vector_models.version``)."""

    def __init__(self, index: Index, *, codes_dir: Path | None = None) -> None:
        """``codes_dir``: where a one-shot process keeps each model's codes as a file it maps instead of reading
        them from the index at every run (capwatch.library.codesfile); None (long-lived processes, which hold
        them in memory) reads them from the index."""
        self._index = index
        self._conn = index.connection
        self._codes: dict[str, _Codes] = {}
        self._ahead: dict[str, _ReadAhead] = {}
        self._kept = None if codes_dir is None else (codes_dir, Path(index.path))

    # -- reading ----------------------------------------------------------------------------------------------

    def models(self) -> list[VectorModel]:
        """Every model that has vectors here, most vectors first."""
        rows = self._index.guard(lambda: self._conn.execute(
            "SELECT model, dim, live FROM vector_models WHERE live > 0 ORDER BY live DESC, model").fetchall())
        return [VectorModel(str(m), int(d), int(n)) for m, d, n in rows]

    def count(self, model: str) -> int:
        """How many images have a vector of ``model``."""
        row = self._index.guard(lambda: self._conn.execute(
            "SELECT live FROM vector_models WHERE model = ?", (model,)).fetchone())
        return int(row[0]) if row else 0

    def vector_of(self, path: str, model: str) -> FloatArray | None:
        """The stored vector of the image at ``path`` for ``model``, or None."""
        row = self._index.guard(lambda: self._conn.execute(
            "SELECT v.vector FROM image_vectors AS v JOIN images AS i ON i.id = v.image_id "
            "WHERE i.path = ? AND v.model = ?", (normalise_path(path), model)).fetchone())
        return None if row is None else _as_vector(row[0]).copy()

    def vectors_of(self, ids: Sequence[int], model: str) -> dict[int, FloatArray]:
        """``image id -> vector`` for those of ``ids`` that have one of ``model``."""
        found_ids, matrix = self.matrix_of(ids, model)
        return dict(zip(found_ids.tolist(), matrix, strict=True))

    def matrix_of(self, ids: Sequence[int], model: str) -> tuple[npt.NDArray[np.int64], FloatArray]:
        """The ids among ``ids`` that have a vector of ``model``, and those vectors as rows of one matrix. An id
        below 0 is a video moment's key (capwatch.library.moments)."""
        found: list[int] = []
        blobs: list[bytes] = []
        images = [int(i) for i in ids if int(i) > 0]
        moments = [-int(i) for i in ids if int(i) < 0]
        for rows in self._image_rows(images, model):
            found += [r[0] for r in rows]
            blobs += [r[1] for r in rows]
        for start in range(0, len(moments), 900):
            chunk = moments[start:start + 900]
            rows = self._index.guard(functools.partial(
                self._fetch, FRAME_ROWS_SQL.format(marks=", ".join("?" * len(chunk))), [model, *chunk]))
            found += [r[0] for r in rows]
            blobs += [r[1] for r in rows]
        if not found:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        return np.array(found, dtype=np.int64), np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(
            len(found), -1)

    def _image_rows(self, images: list[int], model: str) -> list[list[tuple[int, bytes]]]:
        """The ``(image_id, vector)`` rows of ``images`` that have a vector of ``model``, in parts.

        Many rows (a search's candidates) are read by :data:`ROW_READERS` connections side by side (Index.row_reader:
        kept between searches, memory map off), each walking the whole range in row order (every n-th id): where
        the index is not in the page cache every row is a random read, which a disk answers several at a time, and
        which through a memory map costs a fault that reads the pages around it too. Not while this connection has a
        transaction open (the other readers would not see its writes). A share whose reader fails (the file
        renamed under an open index: no new connection opens it) is read on this connection instead. Raises
        IndexUnavailable for database problems."""
        if len(images) < PARALLEL_ROWS or self._conn.in_transaction:
            return [self._index.guard(functools.partial(_vector_rows, self._conn, images, model))]
        shares = [images[k::ROW_READERS] for k in range(ROW_READERS)]
        results: list[list[tuple[int, bytes]] | None] = [None] * ROW_READERS

        def read(k: int) -> None:
            try:
                with self._index.row_reader() as conn:
                    results[k] = _vector_rows(conn, shares[k], model)
            except (sqlite3.Error, OSError):
                results[k] = None  # read below, on this connection

        run_parts(ROW_READERS, read, name="capwatch-vector-rows")
        return [rows if rows is not None
                else self._index.guard(functools.partial(_vector_rows, self._conn, shares[k], model))
                for k, rows in enumerate(results)]

    def _fetch(self, sql: str, params: Sequence[object]) -> list[tuple[int, bytes]]:
        rows: list[tuple[int, bytes]] = self._conn.execute(sql, params).fetchall()
        return rows

    def missing(self, model: str, root: str | None = None) -> list[tuple[str, str | None]]:
        """(path, fingerprint) of indexed images (not failed ones) that lack a vector of ``model`` or whose
        vector was made from an earlier state of the file (its fingerprint differs), ordered by path."""
        where = ["i.status != 'error'", "(v.image_id IS NULL OR v.model != ? OR v.fingerprint IS NOT i.fingerprint)"]
        params: list[object] = [model]
        if root is not None:
            from capwatch.library.query import prefix_range

            lo, hi = prefix_range(normalise_path(root))
            where.append("((i.path >= ? AND i.path < ?) OR i.path = ?)")
            params += [lo, hi, normalise_path(root)]
        sql = ("SELECT i.path, i.fingerprint FROM images AS i LEFT JOIN image_vectors AS v ON v.image_id = i.id "
               f"WHERE {' AND '.join(where)} ORDER BY i.path")
        rows: list[tuple[str, str | None]] = self._index.guard(lambda: self._conn.execute(sql, params).fetchall())
        return rows

    def all_vectors(self, model: str, root: str | None = None) -> tuple[list[str], FloatArray]:
        """Paths and vectors (n, dim) of every image with a vector of ``model`` (below ``root``), by path."""
        where, params = ["v.model = ?"], [model]
        if root is not None:
            from capwatch.library.query import prefix_range

            lo, hi = prefix_range(normalise_path(root))
            where.append("((i.path >= ? AND i.path < ?) OR i.path = ?)")
            params += [lo, hi, normalise_path(root)]
        sql = ("SELECT i.path, v.vector FROM image_vectors AS v JOIN images AS i ON i.id = v.image_id "
               f"WHERE {' AND '.join(where)} ORDER BY i.path")
        rows: list[tuple[str, bytes]] = self._index.guard(lambda: self._conn.execute(sql, params).fetchall())
        if not rows:
            return [], np.zeros((0, 0), dtype=np.float32)
        matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        return [r[0] for r in rows], matrix

    # -- writing ----------------------------------------------------------------------------------------------

    def put_many(self, items: Iterable[tuple[str, str, str | None, npt.ArrayLike]],
                 moments: Mapping[str, VideoMoments] | None = None) -> int:
        """Store (path, model, fingerprint, vector) for images the index has rows for, in one transaction;
        returns how many were stored (paths without a row are skipped). A vector replaces the image's earlier one
        (of any model), and its moments: ``moments`` (by path as given) holds a video's other frames and the
        poster's time (capwatch.library.moments). Raises VectorError when a vector's width differs from the
        model's stored ones and IndexUnavailable for database problems."""
        given = {normalise_path(p): m for p, m in (moments or {}).items()}
        todo = [(normalise_path(p), m, f, _unit(v)) for p, m, f, v in items]
        if not todo:
            return 0
        ids = self._index.ids_for(p for p, _, _, _ in todo)

        def run() -> int:
            stored = 0
            by_model: dict[str, list[tuple[int, FloatArray]]] = {}
            with self._index.transaction():
                for path, model, fingerprint, vector in todo:
                    image_id = ids.get(path)
                    if image_id is None:
                        continue
                    self._ensure_model(model, vector.shape[0])
                    self._conn.execute(
                        "INSERT INTO image_vectors (image_id, model, fingerprint, vector) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT(image_id) DO UPDATE SET model = excluded.model, "
                        "fingerprint = excluded.fingerprint, vector = excluded.vector",
                        (image_id, model, fingerprint, vector.astype("<f4").tobytes()),
                    )
                    by_model.setdefault(model, []).append((image_id, vector))
                    # A video's moments replace its earlier ones (a photo's: none), keyed -id in the blocks.
                    by_model[model] += replace_frames(self._conn, image_id, model, vector.shape[0], given.get(path))
                    stored += 1
                for model, rows in by_model.items():
                    centre = self._centre(model)
                    matrix = np.stack([r[1] for r in rows])
                    self._append_codes(model, np.array([r[0] for r in rows], dtype=np.int64),
                                       pack_codes(matrix if centre is None else matrix - centre))
            return stored

        result: int = self._index.guard(run)
        return result

    def _ensure_model(self, model: str, dim: int) -> None:
        row = self._conn.execute("SELECT dim FROM vector_models WHERE model = ?", (model,)).fetchone()
        if row is None:
            self._conn.execute("INSERT INTO vector_models (model, dim) VALUES (?, ?)", (model, dim))
        elif int(row[0]) != dim:
            raise VectorError(f"embedding model {model} gave {dim}-d vectors, but the index holds {row[0]}-d ones "
                              "for it; a different model needs a different name")

    def _centre(self, model: str) -> FloatArray | None:
        row = self._conn.execute("SELECT centre FROM vector_models WHERE model = ?", (model,)).fetchone()
        return None if row is None or row[0] is None else _as_vector(row[0])

    def _append_codes(self, model: str, ids: npt.NDArray[np.int64], codes: npt.NDArray[np.uint8]) -> None:
        """Append to the model's last block (new blocks as it fills); rebuild every block when more than half of
        the entries are stale (replaced or deleted vectors)."""
        last = self._conn.execute(
            "SELECT block, ids, codes FROM vector_blocks WHERE model = ? ORDER BY block DESC LIMIT 1", (model,)
        ).fetchone()
        width = codes.shape[1]
        added = len(ids)
        if last is not None:
            block, old_ids, old_codes = int(last[0]), np.frombuffer(last[1], dtype="<i8"), last[2]
            ids = np.concatenate([old_ids, ids])
            codes = np.concatenate([np.frombuffer(old_codes, dtype=np.uint8).reshape(-1, width), codes])
        else:
            block = 0
        self._conn.execute("DELETE FROM vector_blocks WHERE model = ? AND block = ?", (model, block))
        self._write_blocks(model, block, ids, codes)
        self._conn.execute("UPDATE vector_models SET entries = entries + ?, version = version + 1 WHERE model = ?",
                           (added, model))
        entries, live, centred = self._conn.execute(  # live: images and video moments (schema 9)
            "SELECT entries, live + frames, centred FROM vector_models WHERE model = ?", (model,)).fetchone()
        # Stale entries past half, or twice as many vectors as the centre was taken over (the mean moves while a
        # library grows; rebuilding at each doubling costs about twice the final count in all).
        if entries > 2 * live + BLOCK or live >= 2 * max(centred, MIN_CENTRED):
            self.rebuild_blocks(model)

    def _write_blocks(self, model: str, first: int, ids: npt.NDArray[np.int64],
                      codes: npt.NDArray[np.uint8]) -> None:
        for number, start in enumerate(range(0, len(ids), BLOCK)):
            self._conn.execute(
                "INSERT INTO vector_blocks (model, block, ids, codes) VALUES (?, ?, ?, ?)",
                (model, first + number, ids[start:start + BLOCK].astype("<i8").tobytes(),
                 codes[start:start + BLOCK].tobytes()),
            )

    def rebuild_blocks(self, model: str) -> None:
        """Rewrite the model's blocks from ``image_vectors``: the centre becomes the mean of its vectors (the
        origin below MIN_CENTRED of them) and stale entries go. Call inside a transaction."""
        sql = "SELECT image_id, vector FROM image_vectors WHERE model = ? ORDER BY image_id"
        # Then video moments (schema 9) by -id (capwatch.library.moments); two ordered scans, no sort of the union.
        frames_sql = "SELECT -id, vector FROM frame_vectors WHERE model = ? ORDER BY id"

        def entries() -> Iterator[list[Any]]:
            for query in (sql, frames_sql):
                yield from _batches(self._conn.execute(query, (model,)))

        total: npt.NDArray[np.float64] | None = None
        count = 0
        for rows in entries():
            matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
            total = matrix.sum(axis=0, dtype=np.float64) + (0 if total is None else total)
            count += len(rows)
        centre = None if total is None or count < MIN_CENTRED else (total / count).astype(np.float32)
        self._conn.execute("DELETE FROM vector_blocks WHERE model = ?", (model,))
        ids: list[int] = []
        parts: list[npt.NDArray[np.uint8]] = []
        for rows in entries():
            ids += [int(r[0]) for r in rows]
            matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
            parts.append(pack_codes(matrix if centre is None else matrix - centre))
        if ids:
            self._write_blocks(model, 0, np.array(ids, dtype=np.int64), np.concatenate(parts))
        self._conn.execute(
            "UPDATE vector_models SET entries = ?, centre = ?, centred = ?, version = version + 1 WHERE model = ?",
            (len(ids), None if centre is None else centre.astype("<f4").tobytes(), count, model))

    # -- searching --------------------------------------------------------------------------------------------

    def read_ahead(self, model: str) -> None:
        """Start reading ``model``'s codes (the sign bits every search compares, 64 MB at a million 512-d
        vectors) on another thread, so that the first search finds them in memory. A one-shot search process
        calls this before it loads its text model: SQLite reads the pages without the GIL, so on two cores the read
        mostly overlaps the session's setup (which holds the GIL for much of its time: a Python thread spinning
        beside it made it 2-5x slower), and costs the session 15-20 ms against the ~45 ms the search would wait to read
        (a 2-core Zen 4, 1 M codes). The same thread then opens the connections the search reads its candidates'
        exact vectors with (Index.row_reader). A failed read is dropped: the search then reads the codes itself
        and reports what is wrong."""
        if model not in self._codes and model not in self._ahead:
            thread = _ReadAhead(self._index, model, self._kept)
            thread.start()
            self._ahead[model] = thread

    def _load(self, model: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64], FloatArray | None]:
        ahead = self._ahead.pop(model, None)
        if ahead is not None:
            ahead.join()
            if ahead.codes is not None:  # of the version then: checked against the current one below
                self._codes[model] = ahead.codes
        # The version and the blocks from one snapshot (a read transaction; WAL readers do not block the writer),
        # so the codes kept are the ones that version names.
        own = not self._conn.in_transaction
        if own:
            self._conn.execute("BEGIN")
        try:
            cached = self._codes.get(model)
            fresh = _read_codes(self._conn, model, known=None if cached is None else cached[0], kept=self._kept)
        finally:
            if own:
                self._conn.execute("COMMIT")
        if fresh is not None:
            self._codes[model] = cached = fresh
        assert cached is not None
        return cached[1], cached[2], cached[3]

    def nearest(self, model: str, query: npt.ArrayLike, *, limit: int = 20, candidates: int | None = None,
                allowed: Callable[[list[int]], set[int]] | None = None,
                exclude: Iterable[int] = ()) -> list[tuple[int, float]]:
        """The ``limit`` images whose vectors of ``model`` are most like ``query`` as (image id, exact cosine),
        best first. ``allowed`` (given candidate ids, returns those that pass the caller's filters) narrows the
        result; when too few of the candidates pass, the search widens until ``limit`` are found or every
        vector was looked at. Raises IndexUnavailable for database problems."""
        q = _unit(query)
        skip = {int(i) for i in exclude}

        def run() -> list[tuple[int, float]]:
            ids, words, centre = self._load(model)
            if len(ids) == 0 or (centre is not None and centre.shape != q.shape):
                return []
            qwords = pack_codes(query_direction(q, centre)[None, :]).view(np.uint64)[0]
            if qwords.shape[0] % 8:
                qwords = np.pad(qwords, (0, 8 - qwords.shape[0] % 8))
            if qwords.shape[0] != words.shape[1]:
                return []
            distance = hamming(words, qwords, workers=scan_workers())
            # The candidates are every code within a radius: the smallest radius that holds `want` of them (a
            # histogram of distances finds it; no partial sort of a million entries).
            cumulative = np.cumsum(np.bincount(distance, minlength=64 * words.shape[1] + 1))
            # Fewer dimensions, fewer bits to tell images apart: more candidates. More images, more near-ties:
            # at 1 M the bench's text-like queries need 5000 Hamming candidates for recall@10 >= 0.99.
            want = max(candidates or max(CANDIDATES * max(1, 512 // max(len(q), 1)), len(ids) // 200),
                       40 * limit)
            # The middle stage: the candidates' sign bits against the query's float entries (asymmetric: only
            # the image side is quantised; in memory) keep the `rescore` best for the exact cosine, read from
            # image_vectors. Rescoring all 5000 from SQLite was most of the search time. Measured on the bench's
            # vectors, 5000 Hamming candidates (recall@10 0.998 when all are rescored): at 200 k, 100 rescored
            # 0.998, 200: 1.000; at 1 M (more near-ties), 200: 0.942, 400: 0.995, 800: 0.998.
            rescore = max(RESCORE, len(ids) // 2000, 6 * limit)
            table = byte_table(query_direction(q, centre), words.shape[1] * 8)
            codes = words.view(np.uint8)
            inside = -1
            results: dict[int, float] = {}
            while True:
                radius = int(np.searchsorted(cumulative, min(want, len(ids))))
                # The first ring has no inner edge: one comparison over a million distances, not two and an AND.
                within = distance <= radius
                ring = np.flatnonzero(within if inside < 0 else within & (distance > inside))
                inside = radius
                if len(ring) > rescore:
                    ring = ring[np.argsort(-sign_scores(table, codes[ring]), kind="stable")]
                chunk = ids[ring]
                fresh = [i for i in dict.fromkeys(chunk.tolist()) if i not in skip and i not in results]
                if allowed is not None and fresh:
                    # The best `rescore` that pass, asked `rescore` at a time: without filters one question
                    # answers it (asking about all 5000 candidates was a tenth of a one-shot search at 1 M).
                    kept: list[int] = []
                    for start in range(0, len(fresh), rescore):
                        part = fresh[start:start + rescore]
                        passing = allowed(part)
                        kept += [i for i in part if i in passing]
                        if len(kept) >= rescore:
                            break
                    fresh = kept
                # In row-id order: the B-tree pages are then read front to back.
                found, matrix = self.matrix_of(sorted(fresh[:rescore]), model)
                if len(found):
                    results.update(zip(found.tolist(), (matrix @ q).tolist(), strict=True))
                if len(results) >= limit or cumulative[radius] >= len(ids):
                    break
                want *= 4
            keys = np.fromiter(results.keys(), dtype=np.int64, count=len(results))
            sims = np.fromiter(results.values(), dtype=np.float64, count=len(results))
            order = np.lexsort((keys, -sims))[:limit]
            return [(int(keys[i]), float(sims[i])) for i in order]

        found: list[tuple[int, float]] = self._index.guard(run)
        return found

    def exact_nearest(self, model: str, query: npt.ArrayLike, *, limit: int = 20) -> list[tuple[int, float]]:
        """The exact answer :meth:`nearest` approximates (every float vector compared): for tests and the
        bench's recall."""
        q = _unit(query)
        rows = self._index.guard(lambda: self._conn.execute(
            "SELECT image_id, vector FROM image_vectors WHERE model = ?", (model,)).fetchall())
        if not rows:
            return []
        matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        sims = matrix @ q
        top = np.argsort(-sims, kind="stable")[:limit]
        return [(int(rows[i][0]), float(sims[i])) for i in top]

    def paths_of(self, ids: Sequence[int]) -> dict[int, str]:
        """``image id -> path`` for ``ids``."""
        found: dict[int, str] = {}
        for start in range(0, len(ids), 900):
            chunk = [int(i) for i in ids[start:start + 900]]
            sql = f"SELECT id, path FROM images WHERE id IN ({', '.join('?' * len(chunk))})"
            rows = self._index.guard(functools.partial(self._fetch, sql, chunk))
            found.update((int(i), str(p)) for i, p in rows)
        return found
