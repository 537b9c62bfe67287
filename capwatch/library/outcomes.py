"""What one file's turn gives: the outcome reported per file (the `caption --json` line), what the model said
about an image, the caption's stored form and the reasons a file is left as it is."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HUMAN_KEPT = "has a description written by a person; kept (use --force to replace it)"
ALREADY_CAPTIONED = "already captioned by capwatch and unchanged"
INDEX_ONLY = "has a description written by a person; caption kept in the index only"
WRITING_OFF = "metadata writing is off (metadata.write = none)"
LIVE_MOTION = "the motion of a Live Photo: one asset with its still, captioned as"


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one file; ``as_json`` gives the `caption --json` line of the CLI contract.

    ``changed``: the file (or a sidecar) changed while it was being captioned, so nothing was written; it is to
    be read again (the daemon re-queues it, the CLI retries and then reports it).
    """

    path: Path
    caption: str | None
    model: str | None
    written: tuple[str, ...] = ()
    skipped: str | None = None
    error: str | None = None
    changed: bool = False
    #: The keywords the model found for this file (empty when it found none or was not asked), and the text read
    #: in the image (None: not read), as found: also with --dry-run, and also where they stay out of the file.
    keywords: tuple[str, ...] = ()
    text: str | None = None
    #: The caption per language (English and the configured ones; a file's own language items when it was
    #: skipped), in order; ``caption`` is the default language's.
    captions: tuple[tuple[str, str], ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "caption": self.caption, "model": self.model,
                "written": list(self.written), "skipped": self.skipped, "error": self.error,
                "keywords": list(self.keywords), "text": self.text,
                "captions": dict(self.captions) if self.captions else None}


@dataclass(frozen=True)
class Described:
    """What the model (and an OCR engine) said about one image: the caption, capwatch's keywords (None: the model
    has no detector or keywords are off, so the file's stay as they are) and the text read in the image (None:
    not read)."""

    caption: str
    keywords: tuple[str, ...] | None = None
    text: str | None = None
    #: The caption per language (English first), when languages are configured; else None (English alone).
    captions: tuple[tuple[str, str], ...] | None = None

    def shown(self, default: str) -> str:
        """The caption in the ``default`` language (x-default, EXIF, IPTC, the index's caption)."""
        return dict(self.captions or ()).get(default, self.caption)

    def all_captions(self) -> tuple[tuple[str, str], ...]:
        """The caption per language; English alone when nothing was translated."""
        return self.captions if self.captions else (("en", self.caption),)


def clean_caption(text: str, *, capitalise: bool = True) -> str:
    """The caption as it is stored and written: NFC, control characters dropped, whitespace collapsed, first
    letter capitalised (not for translations, which are written as the model gave them). (Byte-level BPE can
    decode to control bytes, which XML and EXIF readers reject.)"""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if ch.isspace() else ch for ch in text
                   if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cs", "Cn"))
    text = " ".join(text.split())
    return text[:1].upper() + text[1:] if capitalise else text
