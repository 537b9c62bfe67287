"""Live Photos: a still (HEIC/JPEG) and the short MOV recorded with it are one asset.

They pair by name, as iPhones store them and as exports keep them: ``IMG_0001.HEIC`` with ``IMG_0001.MOV`` in the
same folder (any letter case of the suffixes); or, when the names differ, by the content identifier Apple writes
into both (the MOV's ``Keys`` and the still's MakerNote), looked for among the stills of the MOV's folder. The still
is the asset: it is captioned, indexed and found; its motion is not captioned again (it shows the same moment) and
is shown with the still on the photo page (pairs by name; a pair by identifier is kept out of the index and the
captioning, not yet shown). A motion photo (Google/Samsung: the MP4 appended inside the JPEG) is one file already
and needs no pairing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

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
