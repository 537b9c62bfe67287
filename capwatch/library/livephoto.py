"""Live Photos: a still (HEIC/JPEG) and the short MOV recorded with it are one asset.

They pair by name, as iPhones store them and as exports keep them: ``IMG_0001.HEIC`` with ``IMG_0001.MOV`` in the
same folder (any letter case of the suffixes); or, when the names differ, by the content identifier Apple writes
into both (the MOV's ``Keys`` and the still's MakerNote), looked for among the stills of the MOV's folder. The still
is the asset: it is captioned, indexed and found; its motion is not captioned again (it shows the same moment) and
is shown with the still in search and on the photo page. A pair by name is found at once from the still's name; a
pair by identifier is recorded in the index (``live_pairs``, schema 9) when the motion is met, and found there
(:func:`paired_motion`). A motion photo (Google/Samsung: the MP4 appended inside the JPEG) is one file already
and needs no pairing.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from capwatch.library.index import normalise_path

if TYPE_CHECKING:
    from capwatch.library.index import Index

STILL_SUFFIXES = ("heic", "heif", "jpg", "jpeg")
MOTION_SUFFIXES = ("mov", "mp4")


def _sibling(path: Path, suffixes: tuple[str, ...]) -> Path | None:
    stem = path.stem
    for suffix in suffixes:
        for spelled in (suffix.upper(), suffix):
            candidate = path.with_name(f"{stem}.{spelled}")
            if candidate != path and os.path.isfile(candidate):
                return candidate
    return None


def motion_of(still: str | Path) -> Path | None:
    """The MOV recorded with the still ``still`` (same folder, same name), or None. Stats a few names."""
    path = Path(still)
    if path.suffix.lower().lstrip(".") not in STILL_SUFFIXES:
        return None
    return _sibling(path, MOTION_SUFFIXES)


def still_of(motion: str | Path) -> Path | None:
    """The still whose motion ``motion`` is (same folder, same name), or None. Stats a few names."""
    path = Path(motion)
    if path.suffix.lower().lstrip(".") not in MOTION_SUFFIXES:
        return None
    return _sibling(path, STILL_SUFFIXES)


def paired_motion_names(names: list[str], extensions: frozenset[str]) -> set[str]:
    """Of the file names of one folder, those that are the motion of a still also there (and looked after:
    its suffix is in ``extensions``). No file system access."""
    stills: set[str] = set()
    for name in names:
        stem, dot, suffix = name.rpartition(".")
        if dot and stem and suffix.lower() in STILL_SUFFIXES and suffix.lower() in extensions:
            stills.add(stem.casefold())
    if not stills:
        return set()
    out = set()
    for name in names:
        stem, dot, suffix = name.rpartition(".")
        if dot and stem and suffix.lower() in MOTION_SUFFIXES and stem.casefold() in stills:
            out.add(name)
    return out


#: A folder with more stills than this is not searched for a content identifier (each still's header is read).
MAX_STILLS_SEARCHED = 2000


def still_by_content(motion: str | Path, content_id: str, extensions: frozenset[str] | tuple[str, ...],
                     identifier: Callable[[Path], str | None]) -> Path | None:
    """The still in ``motion``'s folder (a suffix in ``extensions``) whose content identifier is ``content_id``:
    a Live Photo whose two files no longer share a name (an export, a rename). ``identifier`` reads one still's
    identifier (None when it has none or cannot be read). None when there is no such still, or the folder holds
    more than MAX_STILLS_SEARCHED stills."""
    folder = Path(motion).parent
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    stills = [n for n in names if n.rpartition(".")[2].lower() in STILL_SUFFIXES
              and n.rpartition(".")[2].lower() in extensions]
    if len(stills) > MAX_STILLS_SEARCHED:
        return None
    for name in sorted(stills):
        candidate = folder / name
        if identifier(candidate) == content_id:
            return candidate
    return None


def _fetch(conn: sqlite3.Connection, sql: str, params: list[str]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = conn.execute(sql, params).fetchall()
    return rows


def record_pair(index: Index, still: str | Path, motion: str | Path) -> None:
    """Remember that ``motion`` is the motion of ``still`` (paired by content identifier: the names differ).
    Raises IndexUnavailable."""
    conn = index.connection
    pair = (normalise_path(motion), normalise_path(still))

    def run() -> None:
        with index.transaction():
            conn.execute("INSERT INTO live_pairs (motion, still) VALUES (?, ?) "
                         "ON CONFLICT(motion) DO UPDATE SET still = excluded.still", pair)

    index.guard(run)


def recorded_motions(index: Index, stills: Iterable[str]) -> dict[str, Path]:
    """``still -> motion`` for the stills among ``stills`` with a motion recorded by content identifier whose
    file is still there. Raises IndexUnavailable."""
    wanted = list(dict.fromkeys(normalise_path(s) for s in stills
                                if Path(s).suffix.lower().lstrip(".") in STILL_SUFFIXES))
    found: dict[str, Path] = {}
    conn = index.connection
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        sql = f"SELECT still, motion FROM live_pairs WHERE still IN ({', '.join('?' * len(chunk))}) ORDER BY motion"
        rows: list[tuple[str, str]] = index.guard(functools.partial(_fetch, conn, sql, chunk))
        for still, motion in rows:
            if still not in found and os.path.isfile(motion):
                found[still] = Path(motion)
    return found


def paired_motion(index: Index | None, still: str | Path) -> Path | None:
    """The motion of the Live Photo whose still is ``still``: beside it by name, else as recorded by content
    identifier (when ``index`` is given). None for anything else."""
    by_name = motion_of(still)
    if by_name is not None or index is None:
        return by_name
    return recorded_motions(index, [str(still)]).get(normalise_path(still))
