"""Records exchanged with the rest of capwatch (frozen dataclasses, and the key descriptions are compared by)."""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from capwatch.metadata.identity import FileIdentity
from capwatch.metadata.sidecar import signature

DescriptionKind = Literal["ours", "human", "boilerplate"]


def description_key(text: str) -> str:
    """A short fixed-size key of a description's words (NFC, whitespace runs as one space): equal keys mean the
    same words. A form carries these to say which descriptions its page showed."""
    words = " ".join(unicodedata.normalize("NFC", text).split())
    return hashlib.sha256(words.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True)
class Provenance:
    """Who wrote a caption: model id, model revision and when (ISO 8601 UTC), and the precision its graphs ran at
    (``int8``, ``int8+vision_encoder=int8-static``; see Captioner.precision_used; None when not recorded, as in
    captions written before capwatch recorded it). The tool is always "capwatch"."""

    model: str
    revision: str | None
    created_at: str
    precision: str | None = None


@dataclass(frozen=True)
class Description:
    """The description a file carries and whose words it is.

    ``kind``: ``ours`` = carries capwatch provenance for exactly this text; ``boilerplate`` = camera/software junk
    ("OLYMPUS DIGITAL CAMERA", the camera model, blank); ``human`` = anything else (never overwritten by default).
    ``origin``: where the chosen text was found: ``xmp``, ``exif``, ``iptc``, ``sidecar``, ``png`` or
    ``quicktime`` (a video's ©des / Keys description).
    """

    text: str
    kind: DescriptionKind
    provenance: Provenance | None
    origin: str


@dataclass(frozen=True)
class FileMetadata:
    """What ``read_metadata`` found. ``format`` comes from magic bytes (jpeg png webp gif tiff heif avif raw bmp
    unknown); ``taken_at`` is local 'YYYY-MM-DDTHH:MM:SS'; width/height are the stored pixel dimensions
    (before EXIF orientation is applied), None when the header does not say.

    ``keywords``: every keyword the file and its sidecars carry (XMP dc:subject, IPTC Keywords, the leaves of
    lr:hierarchicalSubject), de-duplicated case-insensitively, in order (sidecars first); ``model_keywords``: those
    of them that capwatch wrote (recorded in its provenance namespace); the rest are a person's
    (``human_keywords``). ``ocr_text``: text capwatch found in the image and wrote (capwatch:Text), if any.
    ``description_fields``: every place that holds a description (EXIF, XMP, IPTC, sidecars, PNG text), each
    classified; ``description`` is the one of them that counts (a person's first)."""

    format: str
    description: Description | None
    taken_at: str | None
    width: int | None
    height: int | None
    keywords: tuple[str, ...] = ()
    model_keywords: tuple[str, ...] = ()
    ocr_text: str | None = None
    description_fields: tuple[Description, ...] = ()
    #: Apple's content identifier: a Live Photo's still (MakerNote) and its MOV (Keys) carry the same one.
    content_identifier: str | None = None
    #: The description in other languages: dc:description's xml:lang items (x-default aside), as (language, text).
    captions: tuple[tuple[str, str], ...] = ()

    @property
    def human_keywords(self) -> tuple[str, ...]:
        """The keywords that are not capwatch's: a person's (or another tool's)."""
        ours = set(self.model_keywords)
        return tuple(k for k in self.keywords if k not in ours)


@dataclass(frozen=True)
class SidecarFile:
    """An XMP sidecar as it was read."""

    path: Path
    identity: FileIdentity


@dataclass(frozen=True)
class FileSnapshot:
    """One consistent read of an image file and its XMP sidecars: what they said and exactly which versions of
    them said it (the stat before and after the read agree).

    ``path`` is the file actually read (symlinks resolved: that is the file a write goes to). ``unreadable`` names
    what could not be fully read (a chunk over a size cap, malformed XMP, a damaged EXIF block): a writer must not
    write such a file, since whatever it could not read would be lost or hidden.
    """

    path: Path
    identity: FileIdentity
    metadata: FileMetadata
    sidecars: tuple[SidecarFile, ...] = ()
    unreadable: tuple[str, ...] = ()

    @property
    def sidecar_signature(self) -> str:
        """A short digest of the sidecars' names and stats ("" without sidecars): changes whenever one does."""
        return signature((s.path.name, s.identity.size, s.identity.mtime_ns, s.identity.ctime_ns)
                         for s in self.sidecars)

    def unseen_descriptions(self, seen: Collection[str]) -> tuple[Description, ...]:
        """The descriptions of this file that someone who saw the texts ``seen`` (as :func:`description_key`
        values) has not seen: a person's in any field, and the file's description itself unless it is camera
        boilerplate. () means a write of those words replaces nothing its writer did not see."""
        meta = self.metadata
        out = [d for d in meta.description_fields if d.kind == "human" and description_key(d.text) not in seen]
        desc = meta.description
        if desc is not None and desc.kind == "ours" and description_key(desc.text) not in seen:
            out.append(desc)
        return tuple(dict.fromkeys(out))

    def same_as(self, other: FileSnapshot) -> bool:
        """True when ``other`` read the very same versions of the file and of its sidecars."""
        return self.identity == other.identity and self.sidecars == other.sidecars


@dataclass(frozen=True)
class WriteHooks:
    """Callbacks at the two moments where another program's edit matters most (tests and debugging drive
    concurrent editors with them). Each gets the path of the file about to be written."""

    #: After the caption was computed, before the writer reads the file again.
    before_write: Callable[[Path], None] | None = None
    #: After the new content is ready, right before the final identity check and the rename.
    before_commit: Callable[[Path], None] | None = None


@dataclass(frozen=True)
class WriteResult:
    """``written``: the places that now carry the caption because of this call, e.g. ("exif", "xmp", "iptc") or
    ("sidecar",). ``skipped``: why nothing (or not everything) was written, else None. ``snapshot``: the file as
    it is after the call (what an index must record), None when metadata writing is off."""

    written: tuple[str, ...]
    skipped: str | None
    snapshot: FileSnapshot | None = None
