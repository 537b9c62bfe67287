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
import json
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple

from capwatch.errors import IndexUnavailable
from capwatch.library.access import check_readable, keep_wal_files
from capwatch.library.migrations import MIGRATIONS, SCHEMA_VERSION
from capwatch.library.search import CompiledQuery, ParsedQuery, SearchFilters, Term, cjk_spaced, contains_exact

Source = Literal["model", "human", "embedded"]
Status = Literal["pending", "captioned", "described", "error"]
SOURCES: tuple[Source, ...] = ("model", "human", "embedded")
STATUSES: tuple[Status, ...] = ("pending", "captioned", "described", "error")


@dataclass(frozen=True)
class ImageRecord:
    """One image file as the index knows it. ``path`` is absolute and normalised (symlinks not resolved)."""

    path: str
    size: int
    mtime_ns: int
    fingerprint: str | None = None
    width: int | None = None
    height: int | None = None
    #: EXIF DateTimeOriginal as 'YYYY-MM-DDTHH:MM:SS' (camera local time, no zone).
    taken_at: str | None = None
    caption: str | None = None
    #: model = written by capwatch; human = a person's description found in the file (never overwritten by default);
    #: embedded = camera/software boilerplate found in the file ("OLYMPUS DIGITAL CAMERA"), may be replaced.
    source: Source | None = None
    model: str | None = None
    model_revision: str | None = None
    #: ISO 8601 UTC.
    captioned_at: str | None = None
    status: Status = "pending"
    error: str | None = None
    #: The model's caption for a file whose ``caption`` is a person's (metadata.index_only_when_described):
    #: searchable, never written into the file.
    model_caption: str | None = None
    #: The file's ctime when it was read: an editor that keeps size and mtime still moves it. None in rows
    #: written before schema 4 (then only size and mtime are compared).
    ctime_ns: int | None = None
    #: Digest of the XMP sidecars' names and stats when the file was read ("" = none; None = not known yet).
    sidecars: str | None = None
    #: Every keyword the file carries, in file order (a person's and capwatch's). Stored newline-joined: when
    #: stored, runs of whitespace inside a keyword (newlines included) become one space, ends are stripped and
    #: empty keywords dropped (see :func:`clean_keywords`); commas and semicolons are kept as they are.
    keywords: tuple[str, ...] = ()
    #: The subset of ``keywords`` capwatch wrote (a re-caption replaces only these). Same storage rule.
    model_keywords: tuple[str, ...] = ()
    #: Text found in the image (OCR), as the engine gave it; None when not looked for or none found.
    ocr_text: str | None = None
    #: The description per language, (language, text) pairs: dc:description's xml:lang items, or the captions
    #: capwatch made in each configured language (English included). Empty for a description in one language.
    #: ``caption`` is the one in the default language (x-default). Every text is searchable.
    captions: tuple[tuple[str, str], ...] = ()

    @property
    def captions_by_language(self) -> dict[str, str]:
        """``captions`` as a mapping, language -> text."""
        return dict(self.captions)


class IndexedState(NamedTuple):
    """What the index compares to notice a changed file without opening it: size, mtime, ctime and the
    sidecar digest (the last two None when not recorded yet)."""

    size: int
    mtime_ns: int
    ctime_ns: int | None
    sidecars: str | None

    def differs(self, size: int, mtime_ns: int, ctime_ns: int, sidecars: str) -> bool:
        """True when the file's current state (every field known) is not what was recorded."""
        if self.size != size or self.mtime_ns != mtime_ns:
            return True
        if self.ctime_ns is not None and self.ctime_ns != ctime_ns:
            return True
        if self.sidecars is None:
            # Recorded before sidecars were tracked: a file that has sidecars must be read once.
            return bool(sidecars)
        return self.sidecars != sidecars

    @property
    def complete(self) -> bool:
        """True when ctime and sidecars are recorded."""
        return self.ctime_ns is not None and self.sidecars is not None


@dataclass(frozen=True)
class SearchHit:
    """One search result; ``score`` is bm25 turned around so that higher is better (0.0 when nothing ranks it:
    a query of ``text:`` substrings ORed with words).

    ``highlighted`` is the caption with the hits marked; ``field`` says where the query matched first
    ("caption", "keywords", "text" or "path"; None when no positive term can be pointed at) and ``snippet`` shows
    that field with the hit marked (keywords comma-separated, long text cut around the hit).
    """

    path: str
    caption: str
    highlighted: str
    score: float
    source: Source | None
    model: str | None
    taken_at: str | None
    field: str | None = None
    snippet: str = ""


@dataclass(frozen=True)
class ErrorEntry:
    path: str
    error: str
    updated_at: str


@dataclass(frozen=True)
class IndexStats:
    path: str
    size_bytes: int
    images: int
    captioned: int
    by_status: dict[str, int]
    by_source: dict[str, int]
    last_errors: tuple[ErrorEntry, ...]
    schema_version: int


_COLUMNS = [f.name for f in fields(ImageRecord)]
_KEYWORD_COLUMNS = ("keywords", "model_keywords")


def clean_keywords(keywords: Iterable[str]) -> tuple[str, ...]:
    """``keywords`` as the index stores them: whitespace runs (newlines, tabs) inside one become a space, ends
    stripped, empty ones dropped; order and duplicates kept. Commas and semicolons are part of a keyword."""
    cleaned = (" ".join(k.split()) for k in keywords)
    return tuple(k for k in cleaned if k)


def _join_keywords(keywords: Iterable[str]) -> str | None:
    return "\n".join(clean_keywords(keywords)) or None


def _split_keywords(stored: str | None) -> tuple[str, ...]:
    return tuple(stored.split("\n")) if stored else ()


def _join_captions(captions: Iterable[tuple[str, str]]) -> str | None:
    """The stored form of ``ImageRecord.captions``: a JSON object in language order, NULL when empty."""
    pairs = {lang: text for lang, text in captions if text}
    return json.dumps(pairs, ensure_ascii=False) if pairs else None


def _split_captions(stored: str | None) -> tuple[tuple[str, str], ...]:
    if not stored:
        return ()
    try:
        data = json.loads(stored)
    except ValueError:
        return ()
    if not isinstance(data, dict):
        return ()
    return tuple((str(k), str(v)) for k, v in data.items() if isinstance(v, str))


def _translations(record: ImageRecord) -> str | None:
    """The texts of ``record.captions`` other than the caption itself, newline-joined (the searchable column)."""
    shown = {t for t in (record.caption, record.model_caption) if t}
    texts = list(dict.fromkeys(text for _, text in record.captions if text and text not in shown))
    return "\n".join(texts) if texts else None


def register_functions(conn: sqlite3.Connection) -> None:
    """Give ``conn`` the SQL functions the search statements call (``capwatch_exact``: quoted terms checked
    unstemmed). Only queries use them, never triggers, so any SQLite client can still write the index."""

    def exact(phrase: str, prefix: int, *texts: str | None) -> int:
        return int(contains_exact(phrase, bool(prefix), *texts))

    conn.create_function("capwatch_exact", -1, exact, deterministic=True)


#: At most this many matches are scored per search (the most recently indexed ones); see Index.search.
RANK_WINDOW = 10_000


def _now_utc() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _sort_date(record: ImageRecord) -> str:
    if record.taken_at:
        return record.taken_at
    return dt.datetime.fromtimestamp(record.mtime_ns / 1e9).replace(microsecond=0).isoformat()


def normalise_path(path: str | Path) -> str:
    """The form in which paths are stored: absolute, ``..`` collapsed, symlinks kept as they are."""
    return os.path.abspath(os.fspath(path))


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
    def _connect(path: Path, busy_timeout: float, readonly: bool) -> sqlite3.Connection:
        if readonly:
            uri = f"file:{path.as_posix()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None)
        else:
            conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if readonly:
            # Searches hop between the FTS index and image rows all over the file; SQLite's default 2 MB page
            # cache thrashes at 1 M images. Memory-mapped reads share the OS page cache instead (measured:
            # a 97 000-match ranked query 351 -> 155 ms). Only readers do this: the daemon stays small.
            conn.execute("PRAGMA mmap_size = 1073741824")
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

    @staticmethod
    def _row(values: Iterable[Any]) -> ImageRecord:
        row = dict(zip(_COLUMNS, values, strict=True))
        for column in _KEYWORD_COLUMNS:
            row[column] = _split_keywords(row[column])
        row["captions"] = _split_captions(row["captions"])
        return ImageRecord(**row)

    def get(self, path: str | Path) -> ImageRecord | None:
        """The record for ``path``, or None when the index has no row for it."""
        sql = f"SELECT {', '.join(_COLUMNS)} FROM images WHERE path = ?"
        row = self._guard(lambda: self._conn.execute(sql, (normalise_path(path),)).fetchone())
        return None if row is None else self._row(row)

    def get_by_id(self, row_id: int) -> ImageRecord | None:
        """The record whose row id is ``row_id`` (the id :meth:`ids_for` and :meth:`browse` give), or None."""
        sql = f"SELECT {', '.join(_COLUMNS)} FROM images WHERE id = ?"
        row = self._guard(lambda: self._conn.execute(sql, (row_id,)).fetchone())
        return None if row is None else self._row(row)

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
            lo, hi = _prefix_range(normalise_path(filters.in_dir))
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
        sql = f"SELECT id, {', '.join(_COLUMNS)} FROM images"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY sort_date DESC, id DESC LIMIT ? OFFSET ?"
        rows = self._guard(lambda: self._conn.execute(sql, [*params, limit, offset]).fetchall())
        return [(int(r[0]), self._row(r[1:])) for r in rows]


    def upsert(self, record: ImageRecord) -> None:
        """Insert or replace the row for ``record.path`` (the row id, and so FTS position, is kept)."""
        self.upsert_many([record])

    def upsert_many(self, records: Iterable[ImageRecord]) -> int:
        """Insert or replace many rows in one transaction; returns how many were written."""
        cols = [*_COLUMNS, "sort_date", "updated_at", "cjk_caption", "cjk_keywords", "cjk_ocr", "translations"]
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
                    values = asdict(record)
                    values["path"] = normalise_path(record.path)
                    values["sort_date"] = _sort_date(record)
                    values["updated_at"] = now
                    for column in _KEYWORD_COLUMNS:
                        values[column] = _join_keywords(values[column])
                    values["captions"] = _join_captions(record.captions)
                    values["translations"] = _translations(record)
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

    def _exec_write(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._write():
            self._conn.execute(sql, params)

    def find_by_fingerprint(self, fingerprint: str) -> list[ImageRecord]:
        """Rows whose fingerprint equals ``fingerprint`` (several when a file was copied)."""
        sql = f"SELECT {', '.join(_COLUMNS)} FROM images WHERE fingerprint = ?"
        rows = self._guard(lambda: self._conn.execute(sql, (fingerprint,)).fetchall())
        return [self._row(r) for r in rows]

    def stat_map(self, root: str | Path) -> dict[str, IndexedState]:
        """``path -> IndexedState`` as last recorded, for every row at or below ``root``."""
        lo, hi = _prefix_range(normalise_path(root))
        rows = self._guard(lambda: self._conn.execute(
            "SELECT path, size, mtime_ns, ctime_ns, sidecars FROM images WHERE path >= ? AND path < ?", (lo, hi)
        ).fetchall())
        make = tuple.__new__  # a million rows: skip the named tuple's argument checking
        return {row[0]: make(IndexedState, row[1:]) for row in rows}

    def iter_records(self, root: str | Path | None = None, *, status: Status | None = None) -> Iterator[ImageRecord]:
        """Every record (optionally under ``root`` and/or with ``status``), ordered by path."""
        where, params = [], []
        if root is not None:
            lo, hi = _prefix_range(normalise_path(root))
            where.append("path >= ? AND path < ?")
            params += [lo, hi]
        if status is not None:
            where.append("status = ?")
            params.append(status)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM images"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY path"
        rows = self._guard(lambda: self._conn.execute(sql, params).fetchall())
        return (self._row(r) for r in rows)

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
            return IndexStats(
                path=str(self.path), size_bytes=size, images=sum(by_status.values()), captioned=captioned,
                by_status=by_status, by_source=by_source, last_errors=errors,
                schema_version=self.schema_version(),
            )

        result: IndexStats = self._guard(run)
        return result

    def search(self, query: ParsedQuery, filters: SearchFilters, *, limit: int = 20,
               highlight: tuple[str, str] = ("[", "]"), window: int = RANK_WINDOW,
               sort: SortOrder = "score") -> list[SearchHit]:
        """Rows matching ``query`` and ``filters``: best bm25 first (``sort="score"``) or newest first by the date
        taken (``sort="date"``), each with the field that matched and a snippet marked with ``highlight``.

        When more than ``window`` rows match, only the ``window`` most recently indexed of them are ranked:
        scoring every one of 100 000 matches of a common word costs over 100 ms at 1 M images, and among that
        many the newest are the likelier target (a narrower query or a filter reaches the rest). ``window=0``
        ranks everything. Raises IndexUnavailable for database problems; the query itself cannot fail to parse.
        """
        compiled = query.compile()

        def run() -> list[Any]:
            min_rowid = None
            cut = build_window_sql(query, filters, window=window) if window > 0 else None
            if cut is not None:
                row = self._conn.execute(*cut).fetchone()
                min_rowid = None if row is None else int(row[0])
            if sort == "date":
                # Order the matches by date first (ids only), then mark the few shown: highlight() on every
                # match of the window would be paid before the sort could cut it.
                sql, params = build_search_sql(query, filters, limit=limit, min_rowid=min_rowid, sort="date",
                                               ids_only=True)
                ids = [int(r[0]) for r in self._conn.execute(sql, params).fetchall()]
                if not ids:
                    return []
                sql, params = build_search_sql(query, filters, limit=limit, min_rowid=min_rowid, only_ids=ids)
                by_id = {r[0]: r for r in self._conn.execute(sql, params).fetchall()}
                return [by_id[i] for i in ids if i in by_id]
            sql, params = build_search_sql(query, filters, limit=limit, min_rowid=min_rowid)
            return self._conn.execute(sql, params).fetchall()

        rows = self._guard(run)
        return [_hit(row, compiled.terms, highlight) for row in rows]


SortOrder = Literal["score", "date"]
#: Marks put around hits inside SQL (never in text people write: control characters), swapped for the caller's.
_OPEN, _CLOSE = "\x02", "\x03"
#: Where to point first when several fields matched: the order of their weights.
_SNIPPET_ORDER = ((10, "caption"), (12, "keywords"), (11, "caption"), (13, "text"))


def _hit(row: Any, terms: tuple[Term, ...], marks: tuple[str, str]) -> SearchHit:
    (_, path, caption, source, model, taken_at, model_caption, keywords, ocr_text, score) = row[:10]
    caption = caption or ""

    def swap(text: str) -> str:
        return text.replace(_OPEN, marks[0]).replace(_CLOSE, marks[1])

    field: str | None = None
    snippet = ""
    for position, name in _SNIPPET_ORDER:
        text = row[position]
        if text and _OPEN in text:
            field, snippet = name, text
            break
    if field is None:
        # CJK and substring hits come from other columns (per-character copies, trigrams): mark them here. The
        # path comes last: with --in, the folder's name is part of the match and marks every path.
        originals = (("caption", caption), ("keywords", keywords), ("caption", model_caption),
                     ("text", ocr_text), ("path", row[14]), ("path", path))
        for name, text in originals:
            if text and _OPEN in text:
                field, snippet = name, text
                break
            marked = _mark_substrings(text, terms, name)
            if marked is not None:
                field, snippet = name, marked
                break
    if field == "keywords":
        snippet = snippet.replace("\n", ", ")
    elif field == "text":
        snippet = " ".join(snippet.split())
    highlighted = row[10] or caption
    if field == "caption" and snippet.replace(_OPEN, "").replace(_CLOSE, "") == caption:
        highlighted = snippet  # a CJK hit in the caption, marked above
    return SearchHit(
        path=path, caption=caption, highlighted=swap(highlighted), score=0.0 - float(score or 0.0), source=source,
        model=model, taken_at=taken_at, field=field, snippet=swap(snippet or caption),
    )


_FIELD_OF_TERM = {"caption": "caption", "keywords": "kw", "text": "text", "path": "path"}
#: Characters of text kept on each side of the first hit in a snippet made here.
_CONTEXT = 40


_SUFFIXES = ("ies", "ing", "es", "ed", "s")


def _rough_stem(word: str) -> str:
    """The start that most English forms of ``word`` share (puppies -> pup, running -> run), at least three
    letters: enough to mark a word-form hit in a snippet that FTS5 did not highlight."""
    for suffix in _SUFFIXES:
        if word.lower().endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[:-len(suffix)]
            break
    if len(word) > 3 and word[-1] == word[-2]:
        word = word[:-1]
    return word


def _mark_substrings(text: str | None, terms: tuple[Term, ...], field: str) -> str | None:
    """``text`` with the terms that look in ``field`` marked, cut around the first hit; None when none of them
    occurs in it. For hits no FTS5 highlight() shows: CJK (per-character copies), ``text:`` substrings
    (trigrams), and words when the images table drives the query. Words are marked from their start (their
    stemmed forms share it, mostly)."""
    if not text:
        return None
    patterns: list[str] = []
    for term in terms:
        if term.field not in (None, _FIELD_OF_TERM[field]):
            continue
        if term.substring:
            patterns.append(r"\s+".join(map(re.escape, term.text.split())))
        elif term.cjk:
            patterns += [re.escape(part) for part in term.text.split()]
        else:
            words = term.text.split() if term.phrase else [_rough_stem(term.text)]
            patterns.append(r"\b" + r"\W+".join(map(re.escape, words)) + r"\w*")
    if not patterns:
        return None
    pattern = re.compile("|".join(patterns), re.IGNORECASE)
    first = pattern.search(text)
    if first is None:
        return None
    lo, hi = max(0, first.start() - _CONTEXT), min(len(text), first.end() + _CONTEXT)
    cut = pattern.sub(lambda m: f"{_OPEN}{m.group(0)}{_CLOSE}", text[lo:hi])
    return ("…" if lo else "") + cut + ("…" if hi < len(text) else "")


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


def _prefix_range(directory: str) -> tuple[str, str]:
    """Bounds such that ``lo <= path < hi`` selects everything below ``directory``."""
    # Compare against "dir/" .. "dir0" ('0' follows '/'), so siblings such as "dir.jpg" or "dir-2/" are excluded.
    base = directory.rstrip(os.sep)
    return (base + os.sep, base + chr(ord(os.sep) + 1))


def _filter_sql(query: ParsedQuery, filters: SearchFilters) -> tuple[list[str], list[Any]]:
    """The word-index MATCH (first parameter, with the --in narrowing) and the row filters of ``filters``;
    the caller adds ``images_fts MATCH ?`` itself."""
    match = query.compile().match or ""
    where: list[str] = []
    params: list[Any] = []
    if filters.in_dir is not None:
        directory = normalise_path(filters.in_dir)
        lo, hi = _prefix_range(directory)
        where.append("i.path >= ? AND i.path < ?")
        params += [lo, hi]
        leaf = os.path.basename(directory.rstrip(os.sep))
        if match and any(ch.isalnum() for ch in leaf):
            # Every path below DIR contains the words of DIR's last name in the path column: letting FTS5
            # intersect on them first spares a table lookup per match; the range check stays the exact test.
            match = f'({match}) AND path : "{leaf.replace(chr(34), chr(34) * 2)}"'
    params.insert(0, match)
    if filters.since is not None:
        where.append("i.sort_date >= ?")
        params.append(filters.since)
    if filters.until is not None:
        where.append("i.sort_date < ?")
        params.append(filters.until)
    if filters.source is not None:
        where.append("i.source = ?")
        params.append(filters.source)
    return where, params


def build_window_sql(query: ParsedQuery, filters: SearchFilters, *, window: int) -> tuple[str, list[Any]] | None:
    """SQL giving the smallest row id among the ``window`` newest full-text matches, or None when the filters
    need the images table (dates, source) or the query has no word-index part: then every match is ranked,
    since the table lookups cost as much as the scoring. The SQL returns no row when fewer than ``window`` match.

    Walking a doclist backwards by rowid is cheap (no scoring, no table lookups).
    """
    if filters.since is not None or filters.until is not None or filters.source is not None:
        return None
    if query.compile().match is None:
        return None
    _, params = _filter_sql(query, filters)
    sql = "SELECT rowid FROM images_fts WHERE images_fts MATCH ? ORDER BY rowid DESC LIMIT 1 OFFSET ?"
    return sql, [params[0], window - 1]


def _conditions(compiled: CompiledQuery, skip_group: int | None) -> tuple[list[str], list[Any]]:
    """SQL conditions for the parts of ``compiled`` the driving MATCH does not cover."""
    where: list[str] = []
    params: list[Any] = []
    tri = "SELECT rowid FROM images_ocr_tri WHERE images_ocr_tri MATCH ?"
    words = "SELECT rowid FROM images_fts WHERE images_fts MATCH ?"
    for number, (tri_match, word_match) in enumerate(compiled.substring_groups):
        if number == skip_group:
            continue
        if word_match is None:
            where.append(f"i.id IN ({tri})")
            params.append(tri_match)
        else:
            where.append(f"(i.id IN ({tri}) OR i.id IN ({words}))")
            params += [tri_match, word_match]
    if compiled.exclude_match is not None:
        where.append(f"i.id NOT IN ({words})")
        params.append(compiled.exclude_match)
    for tri_match in compiled.exclude_substring:
        where.append(f"i.id NOT IN ({tri})")
        params.append(tri_match)
    for text, columns, prefix in compiled.exact:
        where.append(f"capwatch_exact(?, ?, {', '.join('i.' + c for c in columns)})")
        params += [text, int(prefix)]
    return where, params


_ROW = "i.id, i.path, i.caption, i.source, i.model, i.taken_at, i.model_caption, i.keywords, i.ocr_text"


def build_search_sql(query: ParsedQuery, filters: SearchFilters, *, limit: int, min_rowid: int | None = None,
                     sort: SortOrder = "score", ids_only: bool = False,
                     only_ids: list[int] | None = None) -> tuple[str, list[Any]]:
    """The query that :meth:`Index.search` runs (the benchmark's raw baseline runs the same SQL).

    It is driven by the word index when the query has a word part (ranked by its bm25), else by the OCR trigram
    index (its bm25), else by the images table (unranked, newest first). ``ids_only`` selects row ids only (to
    order by date before marking hits); ``only_ids`` restricts the rows to those ids. A row is ``_ROW``, the
    score, then highlight()s of caption, model caption, keywords and path and a snippet() of the OCR text
    (NULLs when the word index does not drive).
    """
    compiled = query.compile()
    where, params = _filter_sql(query, filters)
    match = params.pop(0)
    skip: int | None = None
    marks = [_OPEN, _CLOSE]
    if compiled.match is not None:
        source = "images_fts CROSS JOIN images AS i ON i.id = images_fts.rowid"
        where.insert(0, "images_fts MATCH ?")
        params.insert(0, match)
        score = "images_fts.rank"
        order = "images_fts.rank"
        hl = [f"highlight(images_fts, {c}, ?, ?)" for c in (0, 1, 2)]
        hl += ["snippet(images_fts, 3, ?, ?, '…', 16)", "highlight(images_fts, 4, ?, ?)"]
        hl_params = marks * 5
        if min_rowid is not None:
            # A rowid bound is applied inside FTS5 (it seeks in the doclists), so only the window gets scored.
            where.append("images_fts.rowid >= ?")
            params.append(min_rowid)
    elif any(word is None for _, word in compiled.substring_groups):
        skip = next(n for n, (_, word) in enumerate(compiled.substring_groups) if word is None)
        source = "images_ocr_tri CROSS JOIN images AS i ON i.id = images_ocr_tri.rowid"
        where.insert(0, "images_ocr_tri MATCH ?")
        params.insert(0, compiled.substring_groups[skip][0])
        score = order = "images_ocr_tri.rank"
        hl, hl_params = ["NULL"] * 5, []
    else:
        source = "images AS i"
        score, order = "0.0", "i.sort_date DESC, i.id DESC"
        hl, hl_params = ["NULL"] * 5, []
    more, more_params = _conditions(compiled, skip)
    where += more
    params += more_params
    if only_ids is not None:
        where.append(f"i.id IN ({', '.join('?' * len(only_ids))})")
        params += only_ids
    if sort == "date":
        order = "i.sort_date DESC, i.id DESC"
    columns = "i.id" if ids_only else f"{_ROW}, {score}, {', '.join(hl)}"
    sql = f"SELECT {columns} FROM {source} WHERE {' AND '.join(where) or '1'} ORDER BY {order} LIMIT ?"
    return sql, [*([] if ids_only else hl_params), *params, limit]
