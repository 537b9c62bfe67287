"""The caption index: one SQLite file (WAL) with a row per image and two FTS5 tables kept in sync by triggers:
``images_fts`` (porter words of caption, model caption, keywords, OCR text and path, plus per-character copies of
CJK text in the ``cjk_*`` columns, which upsert fills) and ``images_ocr_tri`` (trigrams of the OCR text, for
substrings such as number plates).

Schema changes happen only through the numbered migrations in ``capwatch.library.migrations``; the applied ones
are recorded in ``capwatch_migrations``. An ``Index`` wraps one connection and is meant for one thread: open one
per thread.
A writable Index leaves ``-wal`` and ``-shm`` beside the file when it closes (``capwatch.library.access``), so users
who may only read the index (the system service's group) can open it read-only.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from capwatch.errors import IndexUnavailable
from capwatch.library.access import check_readable, keep_wal_files
from capwatch.library.migrations import MIGRATIONS, SCHEMA_VERSION
from capwatch.library.query import cjk_spaced, normalise_path, prefix_range
from capwatch.library.rows import (
    COLUMNS,
    SOURCES,
    STATUSES,
    ErrorEntry,
    ImageRecord,
    IndexedState,
    IndexStats,
    Source,
    Status,
    clean_keywords,
    record_date,
    record_from_row,
    stored_values,
)
from capwatch.library.search import (
    RANK_WINDOW,
    ParsedQuery,
    SearchFilters,
    SearchHit,
    SortOrder,
    register_functions,
    word_search,
)
from capwatch.metadata.formats import VIDEO_SUFFIXES

__all__ = [
    "RANK_WINDOW", "SOURCES", "STATUSES", "ErrorEntry", "ImageRecord", "Index", "IndexStats", "IndexedState",
    "SearchHit", "Source", "Status", "clean_keywords", "normalise_path", "record_date",
]


def _now_utc() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _translate(exc: sqlite3.Error, path: Path, busy_timeout: float) -> IndexUnavailable:
    message = str(exc).lower()
    if "locked" in message or "busy" in message:
        return IndexUnavailable(
            f"index {path} is locked by another process (waited {busy_timeout:g} s); try again when it is done"
        )
    if "not a database" in message or "malformed" in message or "corrupt" in message:
        return IndexUnavailable(
            f"index {path} is damaged or not a capwatch index; move it aside and run `capwatch scan` to rebuild it"
        )
    if "readonly" in message or "read-only" in message:
        return IndexUnavailable(f"index {path} is on a read-only location; point --db at a writable file")
    if "unable to open" in message:
        return IndexUnavailable(f"cannot open index {path}: check that the directory exists and is writable")
    if "disk" in message and "full" in message:
        return IndexUnavailable(f"disk full while writing index {path}")
    return IndexUnavailable(f"index {path}: {exc}")


class Index:
    """The caption index at one path. Use :meth:`open`; close it (or use ``with``) when done."""

    def __init__(self, conn: sqlite3.Connection, path: Path, busy_timeout: float) -> None:
        self._conn = conn
        self.path = path
        self._busy_timeout = busy_timeout
        #: Set by :meth:`open` for a writable index: leave the WAL files in place on close (see keep_wal_files).
        self._keep_wal_files = False
        #: Connections :meth:`row_reader` lent and got back, for the next; None once closed.
        self._row_readers: list[sqlite3.Connection] | None = []
        self._row_readers_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, busy_timeout: float = 30.0, readonly: bool = False) -> Index:
        """Open (creating and migrating when writable) the index at ``path``.

        ``readonly`` opens an existing index without taking write locks or creating files (search, status); it
        works for a user who may only read the index and its ``-wal``/``-shm`` files (see :func:`check_readable`).
        Raises IndexUnavailable with one line when the file cannot be created, is damaged, locked past
        ``busy_timeout``, was written by a newer capwatch, or (read-only) a permission this process lacks stops
        SQLite from reading it (the line names the file or folder).
        """
        path = Path(path).expanduser()
        if readonly:
            check_readable(path)
        if readonly and not path.exists():
            raise IndexUnavailable(f"no index at {path} yet; run `capwatch scan DIR` first (or pass --db)")
        if path.is_dir():
            raise IndexUnavailable(f"index path {path} is a directory; give a file name such as {path}/index.db")
        if not readonly:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise IndexUnavailable(
                    f"cannot create index directory {path.parent}: {exc.strerror or exc}"
                ) from None
            if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
                raise IndexUnavailable(f"index {path} is on a read-only location; point --db at a writable file")
        try:
            conn = cls._connect(path, busy_timeout, readonly)
            index = cls(conn, path, busy_timeout)
            index._keep_wal_files = not readonly
            index._check_and_migrate(readonly)
        except sqlite3.Error as exc:
            if readonly:
                check_readable(path)  # a permission problem SQLite reported in its own words: name it
            raise _translate(exc, path, busy_timeout) from None
        return index

    @staticmethod
    def _connect(path: Path, busy_timeout: float, readonly: bool, *, scattered: bool = False) -> sqlite3.Connection:
        """``scattered``: a read-only connection for :meth:`row_reader` (any thread, no memory map)."""
        if readonly:
            uri = f"file:{path.as_posix()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None,
                                   check_same_thread=not scattered)
        else:
            conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if readonly:
            # Searches hop between the FTS index and image rows all over the file; SQLite's default 2 MB page
            # cache thrashes at 1 M images. Memory-mapped reads share the OS page cache instead (measured:
            # a 97 000-match ranked query 351 -> 155 ms). Only readers do this: the daemon stays small. Not the
            # row readers: see row_reader.
            conn.execute(f"PRAGMA mmap_size = {0 if scattered else 1073741824}")
        else:
            # WAL: readers (search) never wait for the daemon's writes; NORMAL sync is safe with WAL.
            _enable_wal(conn, busy_timeout)
            conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        register_functions(conn)
        # Reading the schema forces SQLite to look at the file, so damage shows up here, not later.
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn

    def _check_and_migrate(self, readonly: bool) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise IndexUnavailable(
                f"index {self.path} has schema {version}, newer than this capwatch knows ({SCHEMA_VERSION}); "
                "upgrade capwatch"
            )
        if version == SCHEMA_VERSION:
            return
        if readonly:
            if not os.access(self.path, os.W_OK) or not os.access(self.path.parent, os.W_OK):
                raise IndexUnavailable(
                    f"index {self.path} was made by an older capwatch and needs an upgrade, but it is read-only"
                )
            # An index from the previous release: upgrade it once through a writable connection.
            Index.open(self.path, busy_timeout=self._busy_timeout).close()
            return
        self.migrate()

    def schema_version(self) -> int:
        """The highest migration applied to this file (0 for an empty file)."""
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "capwatch_migrations" not in tables:
            if tables & {"images", "images_fts"}:
                raise IndexUnavailable(f"{self.path} has tables but no capwatch migration record; not our index")
            return 0
        row = self._conn.execute("SELECT max(version) FROM capwatch_migrations").fetchone()
        return int(row[0] or 0)

    def migrate(self, target: int = SCHEMA_VERSION) -> None:
        """Apply pending migrations up to ``target``, each in its own transaction."""
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS capwatch_migrations "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        import sqlite_utils

        db = sqlite_utils.Database(self._conn)
        for version, name, apply in MIGRATIONS:
            if version > target:
                break
            with self._write():
                done = self._conn.execute(
                    "SELECT 1 FROM capwatch_migrations WHERE version = ?", (version,)
                ).fetchone()
                if done:
                    continue
                apply(db)
                self._conn.execute(
                    "INSERT INTO capwatch_migrations(version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, _now_utc()),
                )

    def close(self) -> None:
        """Close the connection; the object must not be used afterwards.

        Closing the last writable connection checkpoints the WAL into the file and SQLite deletes ``-wal`` and
        ``-shm``; a writable Index then puts both back, empty (see :func:`keep_wal_files`). Never raises for that.
        """
        keep, self._keep_wal_files = self._keep_wal_files, False
        with self._row_readers_lock:
            spare, self._row_readers = self._row_readers or [], None
        for conn in spare:  # first: the last connection to close is the one that checkpoints the WAL
            conn.close()
        self._conn.close()
        if keep:
            keep_wal_files(self.path)

    def __del__(self) -> None:
        # A writable Index dropped without close() (the daemon's model thread lets its processor go when it ends)
        # closes here, so the WAL files stay as close() leaves them. Closing from another thread than the one
        # that opened it is refused by sqlite3; nothing more can be done then, and nothing may escape __del__.
        if getattr(self, "_keep_wal_files", False):
            try:  # noqa: SIM105 - no module globals here: at interpreter exit they may be gone already
                self.close()
            except Exception:
                pass

    def __enter__(self) -> Index:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    class _Tx:
        def __init__(self, index: Index) -> None:
            self._index = index

        def __enter__(self) -> None:
            # IMMEDIATE takes the write lock up front, so busy_timeout applies here and not mid-transaction.
            self._index._conn.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                     tb: TracebackType | None) -> None:
            if exc_type is None:
                self._index._conn.execute("COMMIT")
            else:
                self._index._conn.execute("ROLLBACK")

    def _write(self) -> Index._Tx:
        return Index._Tx(self)

    def _guard(self, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except sqlite3.Error as exc:
            raise _translate(exc, self.path, self._busy_timeout) from None

    # -- rows -----------------------------------------------------------------------------------------------

    def get(self, path: str | Path) -> ImageRecord | None:
        """The record for ``path``, or None when the index has no row for it."""
        sql = f"SELECT {', '.join(COLUMNS)} FROM images WHERE path = ?"
        row = self._guard(lambda: self._conn.execute(sql, (normalise_path(path),)).fetchone())
        return None if row is None else record_from_row(row)

    def get_by_id(self, row_id: int) -> ImageRecord | None:
        """The record whose row id is ``row_id`` (the id :meth:`ids_for` and :meth:`browse` give), or None."""
        sql = f"SELECT {', '.join(COLUMNS)} FROM images WHERE id = ?"
        row = self._guard(lambda: self._conn.execute(sql, (row_id,)).fetchone())
        return None if row is None else record_from_row(row)

    def ids_for(self, paths: Iterable[str]) -> dict[str, int]:
        """``path -> row id`` for those of ``paths`` (stored form) that have a row."""
        wanted = list(dict.fromkeys(paths))
        found: dict[str, int] = {}
        for start in range(0, len(wanted), 500):  # SQLite's host-parameter limit is far above; keep it modest
            chunk = wanted[start:start + 500]
            sql = f"SELECT path, id FROM images WHERE path IN ({', '.join('?' * len(chunk))})"
            rows: list[tuple[str, int]] = self._guard(functools.partial(self._fetch_all, sql, chunk))
            found.update(rows)
        return found

    def _fetch_all(self, sql: str, params: list[Any]) -> list[Any]:
        return self._conn.execute(sql, params).fetchall()

    def browse(self, filters: SearchFilters, *, status: Status | None = None, path_words: tuple[str, ...] = (),
               offset: int = 0, limit: int = 50) -> list[tuple[int, ImageRecord]]:
        """Rows matching ``filters`` (and ``status``; every word of ``path_words`` as a case-insensitive part of
        the path), newest date first, as ``(row id, record)``: a listing without a full-text query."""
        where: list[str] = []
        params: list[Any] = []
        if filters.in_dir is not None:
            lo, hi = prefix_range(normalise_path(filters.in_dir))
            where.append("path >= ? AND path < ?")
            params += [lo, hi]
        for column, op, value in (("sort_date", ">=", filters.since), ("sort_date", "<", filters.until),
                                  ("source", "=", filters.source), ("status", "=", status)):
            if value is not None:
                where.append(f"{column} {op} ?")
                params.append(value)
        for word in path_words:
            where.append("instr(lower(path), ?) > 0")
            params.append(word.lower())
        sql = f"SELECT id, {', '.join(COLUMNS)} FROM images"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY sort_date DESC, id DESC LIMIT ? OFFSET ?"
        rows = self._guard(lambda: self._conn.execute(sql, [*params, limit, offset]).fetchall())
        return [(int(r[0]), record_from_row(r[1:])) for r in rows]


    def upsert(self, record: ImageRecord) -> None:
        """Insert or replace the row for ``record.path`` (the row id, and so FTS position, is kept)."""
        self.upsert_many([record])

    def upsert_many(self, records: Iterable[ImageRecord]) -> int:
        """Insert or replace many rows in one transaction; returns how many were written."""
        cols = [*COLUMNS, "sort_date", "updated_at", "cjk_caption", "cjk_keywords", "cjk_ocr", "translations"]
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "path")
        sql = (
            f"INSERT INTO images ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
            f"ON CONFLICT(path) DO UPDATE SET {updates}"
        )
        now = _now_utc()

        def run() -> int:
            count = 0
            with self._write():
                for record in records:
                    values = stored_values(record)
                    values["path"] = normalise_path(record.path)
                    values["updated_at"] = now
                    # Per-character copies of CJK text (NULL for other rows): see search.cjk_spaced.
                    values["cjk_caption"] = cjk_spaced(
                        "\n".join(t for t in (record.caption, record.model_caption, values["translations"]) if t)
                    )
                    values["cjk_keywords"] = cjk_spaced(values["keywords"])
                    values["cjk_ocr"] = cjk_spaced(record.ocr_text)
                    self._conn.execute(sql, [values[c] for c in cols])
                    count += 1
            return count

        result: int = self._guard(run)
        return result

    def remove(self, path: str | Path) -> None:
        """Delete the row for ``path`` (no error when there is none)."""
        self.remove_many([path])

    def remove_many(self, paths: Iterable[str | Path]) -> int:
        """Delete rows for ``paths`` in one transaction; returns how many rows went."""

        def run() -> int:
            with self._write():
                return sum(
                    self._conn.execute("DELETE FROM images WHERE path = ?", (normalise_path(p),)).rowcount
                    for p in paths
                )

        result: int = self._guard(run)
        return result

    def move(self, old: str | Path, new: str | Path) -> None:
        """Re-path a row (a file that was moved or renamed), keeping its caption; replaces any row at ``new``."""
        old_s, new_s = normalise_path(old), normalise_path(new)

        def run() -> None:
            with self._write():
                self._conn.execute("DELETE FROM images WHERE path = ?", (new_s,))
                self._conn.execute(
                    "UPDATE images SET path = ?, updated_at = ? WHERE path = ?", (new_s, _now_utc(), old_s)
                )

        self._guard(run)

    def update_stat(self, path: str | Path, state: IndexedState, fingerprint: str | None) -> None:
        """Record a new file state and fingerprint for ``path`` without touching its caption."""
        self._guard(lambda: self._exec_write(
            "UPDATE images SET size = ?, mtime_ns = ?, ctime_ns = ?, sidecars = ?, fingerprint = ?, updated_at = ? "
            "WHERE path = ?",
            (state.size, state.mtime_ns, state.ctime_ns, state.sidecars, fingerprint, _now_utc(),
             normalise_path(path)),
        ))

    def fill_state_many(self, states: Iterable[tuple[str, int, str]]) -> None:
        """Record (path, ctime_ns, sidecars) for rows that do not know them yet (rows from before schema 4)."""

        def run() -> None:
            with self._write():
                self._conn.executemany(
                    "UPDATE images SET ctime_ns = ?, sidecars = ? WHERE path = ?",
                    [(ctime, sidecars, normalise_path(path)) for path, ctime, sidecars in states],
                )

        self._guard(run)

    def set_error(self, path: str | Path, message: str) -> None:
        """Mark ``path`` as failed with a one-line ``message`` (the row must exist; otherwise nothing happens)."""
        self._guard(lambda: self._exec_write(
            "UPDATE images SET status = 'error', error = ?, updated_at = ? WHERE path = ?",
            (message.splitlines()[0] if message else "error", _now_utc(), normalise_path(path)),
        ))

    def add_owner_roots(self, paths: Iterable[str | Path]) -> None:
        """Remember ``paths`` as folders the index's owner gave `scan`/`watch` by hand (the web page shows them
        beside the configured roots); a folder already remembered stays as it was."""
        now = _now_utc()

        def run() -> None:
            with self._write():
                self._conn.executemany("INSERT OR IGNORE INTO owner_roots (path, added_at) VALUES (?, ?)",
                                       [(normalise_path(p), now) for p in paths])

        self._guard(run)

    def owner_roots(self) -> tuple[Path, ...]:
        """The folders remembered by :meth:`add_owner_roots`, in path order."""
        rows = self._guard(lambda: self._conn.execute("SELECT path FROM owner_roots ORDER BY path").fetchall())
        return tuple(Path(row[0]) for row in rows)

    def _exec_write(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._write():
            self._conn.execute(sql, params)

    def find_by_fingerprint(self, fingerprint: str) -> list[ImageRecord]:
        """Rows whose fingerprint equals ``fingerprint`` (several when a file was copied)."""
        sql = f"SELECT {', '.join(COLUMNS)} FROM images WHERE fingerprint = ?"
        rows = self._guard(lambda: self._conn.execute(sql, (fingerprint,)).fetchall())
        return [record_from_row(r) for r in rows]

    def stat_map(self, root: str | Path) -> dict[str, IndexedState]:
        """``path -> IndexedState`` as last recorded, for every row at or below ``root``."""
        lo, hi = prefix_range(normalise_path(root))
        rows = self._guard(lambda: self._conn.execute(
            "SELECT path, size, mtime_ns, ctime_ns, sidecars FROM images WHERE path >= ? AND path < ?", (lo, hi)
        ).fetchall())
        make = tuple.__new__  # a million rows: skip the named tuple's argument checking
        return {row[0]: make(IndexedState, row[1:]) for row in rows}

    def iter_records(self, root: str | Path | None = None, *, status: Status | None = None) -> Iterator[ImageRecord]:
        """Every record (optionally under ``root`` and/or with ``status``), ordered by path."""
        where, params = [], []
        if root is not None:
            lo, hi = prefix_range(normalise_path(root))
            where.append("path >= ? AND path < ?")
            params += [lo, hi]
        if status is not None:
            where.append("status = ?")
            params.append(status)
        sql = f"SELECT {', '.join(COLUMNS)} FROM images"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY path"
        rows = self._guard(lambda: self._conn.execute(sql, params).fetchall())
        return (record_from_row(r) for r in rows)

    # -- queries --------------------------------------------------------------------------------------------

    def stats(self, recent_errors: int = 5) -> IndexStats:
        """Counts by status and source, the most recent errors, and the file's size on disk."""

        def run() -> IndexStats:
            by_status: dict[str, int] = dict.fromkeys(STATUSES, 0)
            by_status.update(dict(self._conn.execute("SELECT status, count(*) FROM images GROUP BY status")))
            by_source: dict[str, int] = dict.fromkeys(SOURCES, 0)
            by_source.update(dict(self._conn.execute(
                "SELECT source, count(*) FROM images WHERE source IS NOT NULL GROUP BY source"
            )))
            captioned = self._conn.execute(
                "SELECT count(*) FROM images WHERE caption IS NOT NULL AND caption != ''"
            ).fetchone()[0]
            errors = tuple(
                ErrorEntry(*row) for row in self._conn.execute(
                    "SELECT path, error, updated_at FROM images WHERE status = 'error' "
                    "ORDER BY updated_at DESC, path LIMIT ?", (recent_errors,)
                )
            )
            size = sum(
                os.path.getsize(p) for p in (self.path, Path(f"{self.path}-wal")) if os.path.exists(p)
            )
            video = " OR ".join(f"lower(path) LIKE '%.{suffix}'" for suffix in sorted(VIDEO_SUFFIXES))
            videos, videos_captioned = self._conn.execute(
                f"SELECT count(*), coalesce(sum(caption IS NOT NULL AND caption != ''), 0) FROM images "
                f"WHERE {video}").fetchone()
            return IndexStats(
                path=str(self.path), size_bytes=size, images=sum(by_status.values()), captioned=captioned,
                by_status=by_status, by_source=by_source, last_errors=errors,
                schema_version=self.schema_version(), videos=videos, videos_captioned=videos_captioned,
                embedded=self.embedded_count(),
            )

        result: IndexStats = self._guard(run)
        return result

    def search(self, query: ParsedQuery, filters: SearchFilters, *, limit: int = 20,
               highlight: tuple[str, str] = ("[", "]"), window: int = RANK_WINDOW,
               sort: SortOrder = "score") -> list[SearchHit]:
        """Rows matching ``query`` by words (see :func:`capwatch.library.search.word_search`). Raises
        IndexUnavailable for database problems."""
        hits: list[SearchHit] = self._guard(lambda: word_search(
            self._conn, query, filters, limit=limit, highlight=highlight, window=window, sort=sort))
        return hits

    @property
    def connection(self) -> sqlite3.Connection:
        """The underlying connection, for the library's own modules (vectors); callers outside library/ use the
        methods."""
        return self._conn

    def embedded_count(self, model: str | None = None) -> int:
        """How many images have an embedding (search by meaning) of ``model`` (None: of any model): one small
        read, without loading numpy (as capwatch.library.vectors does)."""
        sql = "SELECT coalesce(sum(live), 0) FROM vector_models" + ("" if model is None else " WHERE model = ?")
        params = () if model is None else (model,)
        row = self._guard(lambda: self._conn.execute(sql, params).fetchone())
        return int(row[0])

    def transaction(self) -> Index._Tx:
        """A write transaction (``with index.transaction(): ...``): BEGIN IMMEDIATE, COMMIT, ROLLBACK on error."""
        return self._write()

    def reader(self) -> sqlite3.Connection:
        """A new read-only connection to this index's file, for another thread (the caller closes it). Raises
        sqlite3.Error when it cannot be opened."""
        return self._connect(self.path, self._busy_timeout, readonly=True)

    @contextmanager
    def row_reader(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection to this index's file that any thread may use (one thread at a time), with
        SQLite's memory map off: for rows scattered over the file (a search's candidates), where a mapped page not
        in memory costs a fault that reads the pages around it too. One this index kept from an earlier use (its
        page cache holds the B-tree's inner pages already), else a new one; kept again afterwards, closed when the
        block raised or the index was closed meanwhile. Raises sqlite3.Error when it cannot be opened."""
        with self._row_readers_lock:
            conn = self._row_readers.pop() if self._row_readers else None
        if conn is None:
            conn = self._connect(self.path, self._busy_timeout, readonly=True, scattered=True)
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        self._keep_row_reader(conn)

    def open_row_readers(self, count: int) -> None:
        """Open :meth:`row_reader` connections until this index keeps ``count`` (a process about to search opens
        them ahead, off its search's path: ~1-3 ms each). Raises sqlite3.Error when one cannot be opened."""
        while True:
            with self._row_readers_lock:
                if self._row_readers is None or len(self._row_readers) >= count:
                    return
            self._keep_row_reader(self._connect(self.path, self._busy_timeout, readonly=True, scattered=True))

    def _keep_row_reader(self, conn: sqlite3.Connection) -> None:
        with self._row_readers_lock:
            if self._row_readers is not None:
                self._row_readers.append(conn)
                return
        conn.close()  # the index was closed meanwhile

    def guard(self, action: Callable[[], Any]) -> Any:
        """Run ``action``; an sqlite3 error becomes IndexUnavailable with one line naming this index."""
        return self._guard(action)



def _enable_wal(conn: sqlite3.Connection, busy_timeout: float) -> None:
    """Switch ``conn``'s file to WAL, waiting up to ``busy_timeout`` for other connections. Raises
    sqlite3.OperationalError when it stays locked that long.

    SQLite answers a journal-mode change that meets another connection's lock with "database is locked" at once,
    without its busy handler: two programs opening a new index at the same moment (the daemon's threads, a scan
    beside it) would otherwise fail one of them immediately."""
    deadline = time.monotonic() + busy_timeout
    delay = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) \
                or "locked" in str(exc)
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
