"""The index's rows as typed records: what the index knows of one file (:class:`ImageRecord`), what it compares
to notice a change (:class:`IndexedState`), its counts (:class:`IndexStats`), and the stored form of each."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, NamedTuple

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
    #: What was looked for in this content besides the caption ("keywords", "text"; see capwatch.library.fill),
    #: found or not: a scan fills in only what a row lacks.
    filled: tuple[str, ...] = ()
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
    #: Of ``images``: the videos (by suffix, see capwatch.metadata.formats.VIDEO_SUFFIXES) and how many of those
    #: have a caption.
    videos: int = 0
    videos_captioned: int = 0
    #: Images with an embedding (search by meaning), of any model.
    embedded: int = 0


#: The images table's columns that an ImageRecord holds, in its field order.
COLUMNS = [f.name for f in fields(ImageRecord)]
#: Columns that hold a tuple of strings, stored newline-joined.
_KEYWORD_COLUMNS = ("keywords", "model_keywords", "filled")


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


def record_date(record: ImageRecord) -> tuple[str, Literal["taken", "file"]]:
    """The date of ``record`` that --since/--until and --sort date use, and where it comes from: the date taken
    (EXIF), or else the file's modification time in local time ("file")."""
    if record.taken_at:
        return record.taken_at, "taken"
    return dt.datetime.fromtimestamp(record.mtime_ns / 1e9).replace(microsecond=0).isoformat(), "file"




def record_from_row(values: Iterable[Any]) -> ImageRecord:
    """The record a row of :data:`COLUMNS` (as SQLite gives them) stores."""
    row = dict(zip(COLUMNS, values, strict=True))
    for column in _KEYWORD_COLUMNS:
        row[column] = _split_keywords(row[column])
    row["captions"] = _split_captions(row["captions"])
    return ImageRecord(**row)


def stored_values(record: ImageRecord) -> dict[str, Any]:
    """The stored form of ``record``: its :data:`COLUMNS` (tuples joined) plus ``sort_date`` and the searchable
    ``translations`` column. The path is taken as it is (the caller normalises it)."""
    values = asdict(record)
    values["sort_date"] = record_date(record)[0]
    for column in _KEYWORD_COLUMNS:
        values[column] = _join_keywords(values[column])
    values["captions"] = _join_captions(record.captions)
    values["translations"] = _translations(record)
    return values
