"""Changes made from the page: a person's caption written into the file, or the model asked again.

Both go through the library's write path (``capwatch.metadata.write_caption``: snapshot, compare-and-swap,
journal) and record in the index what the file holds afterwards, as `capwatch caption` does.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from capwatch.config import Config
from capwatch.errors import CapwatchError
from capwatch.library.index import ImageRecord, Index
from capwatch.library.scan import record_from_snapshot
from capwatch.metadata import FileChanged, Journal, WriteResult, read_snapshot, write_caption

if TYPE_CHECKING:
    from capwatch.library.process import FileOutcome
    from capwatch.models.captioner import Captioner

#: Longest caption a person may type (IPTC keeps 2000 bytes; XMP and EXIF more, but a caption is not an essay).
MAX_CAPTION = 2000


class EditRefused(CapwatchError):
    """An edit that was not made; the message says why in one line (shown on the page)."""


def clean_person_caption(text: str) -> str:
    """The caption as it will be stored: control characters as spaces, whitespace runs collapsed, NFC.
    Raises EditRefused when nothing is left or it is longer than :data:`MAX_CAPTION`."""
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Co", "Cs") else ch for ch in text)
    text = unicodedata.normalize("NFC", " ".join(text.split()))
    if not text:
        raise EditRefused("the caption is empty: type some words (nothing was written)")
    if len(text) > MAX_CAPTION:
        raise EditRefused(f"the caption is {len(text)} characters long; at most {MAX_CAPTION} (nothing was written)")
    return text


def save_person_caption(config: Config, index: Index, record: ImageRecord, text: str, *,
                        language: str | None = None) -> ImageRecord:
    """Write ``text`` into ``record``'s file as a person's words (no capwatch provenance, so capwatch never
    replaces it) and record the file as it is afterwards; returns the new index row.

    ``language``: the dc:description language item to write (``de``); only that item becomes the person's, the
    caption shown (x-default, EXIF, IPTC) and the other items stay whoever's they are. None, or the default
    language, edits the caption shown (and the default language's item, when the file has one).

    Raises EditRefused (one line) when metadata writing is off, the file changed during the write, or the write
    path refused (MetadataError's message); the file is then untouched.
    """
    caption = clean_person_caption(text)
    if config.metadata.write == "none":
        raise EditRefused("metadata writing is off (metadata.write = none): nothing was written")
    path = Path(record.path)
    if language is not None and not _LANGUAGE.match(language):
        raise EditRefused(f"{language!r} is not a language code (nothing was written)")
    default = config.language.default
    try:
        if language is None or language.lower() == default.lower():
            has_item = any(lang.lower() == default.lower() for lang, _ in record.captions)
            # force: the person at the page is replacing the words the file holds, whoever wrote them.
            result = write_caption(path, caption, None, config.metadata, force=True, journal=Journal.default(),
                                   person_languages={default: caption} if has_item else None)
        else:
            result = _save_language_item(config, path, language, caption)
        snap = result.snapshot if result.snapshot is not None else read_snapshot(path)
    except FileChanged:
        raise EditRefused("the file changed while the caption was being written; nothing was written: "
                          "reload the page and try again") from None
    except EditRefused:
        raise
    except CapwatchError as exc:
        raise EditRefused(str(exc).splitlines()[0]) from None
    new = record_from_snapshot(record.path, snap, record, config)
    index.upsert(new)
    return new


_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})?$")


def _save_language_item(config: Config, path: Path, language: str, text: str) -> WriteResult:
    """Write one language item as a person's words, leaving the caption shown and its owner as they are. Raises
    EditRefused when the file has no caption yet, FileChanged and MetadataError as write_caption does."""
    snap = read_snapshot(path)
    desc = snap.metadata.description
    if desc is None or not desc.text:
        raise EditRefused("the photo has no caption yet: write the caption first (nothing was written)")
    provenance = desc.provenance if desc.kind == "ours" else None
    return write_caption(path, desc.text, provenance, config.metadata, force=True, expected=snap,
                         journal=Journal.default(), person_languages={language: text})


class CaptionerSlot:
    """The model, opened on the first re-caption and kept for the next ones; one re-caption at a time."""

    def __init__(self, opener: Callable[[], Captioner]) -> None:
        self._opener = opener
        self._captioner: Captioner | None = None
        self._lock = threading.Lock()

    def recaption(self, config: Config, index: Index, record: ImageRecord) -> FileOutcome:
        """Caption ``record``'s file again with the model (a person's words are kept, as everywhere in capwatch)
        and return the outcome. Raises CapwatchError (ModelError, ...) when the model cannot be opened."""
        from capwatch.library.process import Processor

        with self._lock:
            if self._captioner is None:
                self._captioner = self._opener()
            processor = Processor(config, index, self._captioner, journal=Journal.default())
            try:
                (outcome,) = processor.process([Path(record.path)], skip_captioned=False)
            finally:
                processor.close()
            return outcome

    def close(self) -> None:
        """Release the model, if it was opened."""
        with self._lock:
            if self._captioner is not None:
                self._captioner.close()
                self._captioner = None
