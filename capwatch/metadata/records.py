"""Records exchanged with the rest of capwatch (frozen dataclasses, no behaviour)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DescriptionKind = Literal["ours", "human", "boilerplate"]


@dataclass(frozen=True)
class Provenance:
    """Who wrote a caption: model id, model revision and when (ISO 8601 UTC). The tool is always "capwatch"."""

    model: str
    revision: str | None
    created_at: str


@dataclass(frozen=True)
class Description:
    """The description a file carries and whose words it is.

    ``kind``: ``ours`` = carries capwatch provenance for exactly this text; ``boilerplate`` = camera/software junk
    ("OLYMPUS DIGITAL CAMERA", the camera model, blank); ``human`` = anything else (never overwritten by default).
    ``origin``: where the chosen text was found: ``xmp``, ``exif``, ``iptc``, ``sidecar`` or ``png``.
    """

    text: str
    kind: DescriptionKind
    provenance: Provenance | None
    origin: str


@dataclass(frozen=True)
class FileMetadata:
    """What ``read_metadata`` found. ``format`` comes from magic bytes (jpeg png webp gif tiff heif avif raw bmp
    unknown); ``taken_at`` is local 'YYYY-MM-DDTHH:MM:SS'; width/height are the stored pixel dimensions
    (before EXIF orientation is applied), None when the header does not say."""

    format: str
    description: Description | None
    taken_at: str | None
    width: int | None
    height: int | None


@dataclass(frozen=True)
class WriteResult:
    """``written``: the places that now carry the caption because of this call, e.g. ("exif", "xmp", "iptc") or
    ("sidecar",). ``skipped``: why nothing (or not everything) was written, else None."""

    written: tuple[str, ...]
    skipped: str | None
