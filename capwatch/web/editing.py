"""Changes made from the page: a person's caption written into the file, or the model asked again.

Both go through the library's write path (``capwatch.metadata.write_caption``: snapshot, compare-and-swap,
journal) and record in the index what the file holds afterwards, as `capwatch caption` does. A person's edit is
an optimistic transaction: the form says which descriptions its page showed, and the words are written only when
the file holds no others (else EditConflict, and the page shows both texts and lets the person choose).
"""

from __future__ import annotations

import re
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from capwatch.config import Config
from capwatch.errors import CapwatchError
from capwatch.library.index import ImageRecord, Index
from capwatch.library.scan import record_from_snapshot
from capwatch.metadata import (
    Description,
    DescriptionChanged,
    FileChanged,
    Journal,
    WriteResult,
    describe_chars,
    description_key,
    read_snapshot,
    unsafe_chars,
    write_caption,
)

if TYPE_CHECKING:
    from capwatch.library.outcomes import FileOutcome
    from capwatch.models.captioner import Captioner

#: Longest caption a person may type (IPTC keeps 2000 bytes; XMP and EXIF more, but a caption is not an essay).
MAX_CAPTION = 2000


class EditRefused(CapwatchError):
    """An edit that was not made; the message says why in one line (shown on the page)."""


def clean_person_caption(text: str) -> str:
    """The caption as it will be stored: control characters as spaces, whitespace runs collapsed, NFC.
    Raises EditRefused when nothing is left, it is longer than :data:`MAX_CAPTION`, or it holds a character that
    XML 1.0 cannot hold (U+FFFE, U+FFFF): the message names the character."""
    unsafe = tuple(ch for ch in unsafe_chars(text) if unicodedata.category(ch) != "Cc")
    if unsafe:
        raise EditRefused(f"the caption contains {describe_chars(unsafe)}, a character that XMP (XML 1.0) cannot "
                          "hold: remove it and save again (nothing was written)")
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Co", "Cs") else ch for ch in text)
    text = unicodedata.normalize("NFC", " ".join(text.split()))
    if not text:
        raise EditRefused("the caption is empty: type some words (nothing was written)")
    if len(text) > MAX_CAPTION:
        raise EditRefused(f"the caption is {len(text)} characters long; at most {MAX_CAPTION} (nothing was written)")
    return text


class EditConflict(CapwatchError):
    """The file holds descriptions the page did not show (someone wrote since, or the index was behind): nothing
    was written. ``record`` is the index row as the file is now, ``fields`` the file's descriptions (a person's
    and capwatch's; camera boilerplate left out), ``mine`` the caption that was not written."""

    def __init__(self, record: ImageRecord, fields: tuple[Description, ...], mine: str) -> None:
        super().__init__(f"{record.path}: the description changed since the page was loaded; nothing was written")
        self.record = record
        self.fields = fields
        self.mine = mine


def shown_keys(texts: Iterable[str | None]) -> str:
    """The form value that says which description texts a page showed (their description_key values)."""
    return " ".join(dict.fromkeys(description_key(t) for t in texts if t))


def parse_shown(value: str) -> frozenset[str]:
    """The description keys a form says its page showed (unknown tokens ignored: they match nothing)."""
    return frozenset(t for t in value.split()[:32] if len(t) == 32 and all(c in "0123456789abcdef" for c in t))


def save_person_caption(config: Config, index: Index, record: ImageRecord, text: str,
                        shown: frozenset[str], *, language: str | None = None) -> ImageRecord:
    """Write ``text`` into ``record``'s file as a person's words (no capwatch provenance, so capwatch never
    replaces it) and record the file as it is afterwards; returns the new index row.

    ``shown`` are the description keys of the texts the page showed the person (:func:`shown_keys`). The write is
    an optimistic transaction, never forced: it goes ahead only when the file, read right before the write, holds
    no description the page did not show (a person's in any field, or the file's own); the file is written only
    if it is still that file. Raises EditConflict when it holds other words (the index is then brought up to date
    with the file, nothing written), EditRefused (one line) when metadata writing is off, the file changed during
    the write, or the write path refused (MetadataError's message); the file is then untouched.

    ``language``: the dc:description language item to write (``de``); only that item becomes the person's, the
    caption shown (x-default, EXIF, IPTC) and the other items stay whoever's they are, and ``shown`` must hold the
    key of the item's text the page showed (the same check). None, or the default language, edits the caption
    shown (and the default language's item, when the file has one).
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
            result = write_caption(path, caption, None, config.metadata, replaces=shown, journal=Journal.default(),
                                   person_languages={default: caption} if has_item else None)
        else:
            result = _save_language_item(config, path, language, caption, shown)
        snap = result.snapshot if result.snapshot is not None else read_snapshot(path)
    except DescriptionChanged as exc:
        now = record_from_snapshot(record.path, exc.snapshot, record, config)
        index.upsert(now)
        fields = tuple(d for d in exc.snapshot.metadata.description_fields if d.kind != "boilerplate")
        raise EditConflict(now, fields, caption) from None
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


def refresh_record(config: Config, index: Index, record: ImageRecord
                   ) -> tuple[ImageRecord, tuple[Description, ...]]:
    """Record in the index what ``record``'s file holds now (a person chose to keep the words in the file, or to
    see them); returns the new row and the file's descriptions (camera boilerplate left out). Raises EditRefused
    (one line) when the file cannot be read."""
    try:
        snap = read_snapshot(Path(record.path))
    except CapwatchError as exc:
        raise EditRefused(str(exc).splitlines()[0]) from None
    new = record_from_snapshot(record.path, snap, record, config)
    index.upsert(new)
    return new, tuple(d for d in snap.metadata.description_fields if d.kind != "boilerplate")


_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})?$")


def _save_language_item(config: Config, path: Path, language: str, text: str, shown: frozenset[str]
                        ) -> WriteResult:
    """Write one language item as a person's words, leaving the caption shown and its owner as they are. The
    file's current item for ``language`` must be one the page showed (``shown``), else DescriptionChanged;
    the write then lands only on the file as it was read here (``expected``): the caption written is the file's
    own, read now. Raises EditRefused when the file has no caption yet, FileChanged and MetadataError as
    write_caption does."""
    snap = read_snapshot(path)
    desc = snap.metadata.description
    if desc is None or not desc.text:
        raise EditRefused("the photo has no caption yet: write the caption first (nothing was written)")
    current = next((t for lang, t in snap.metadata.captions if lang.lower() == language.lower()), None)
    if current and description_key(current) not in shown:
        raise DescriptionChanged(f"{path}: its {language} caption changed since the page was loaded; "
                                 "nothing written", snap, ())
    provenance = desc.provenance if desc.kind == "ours" else None
    return write_caption(path, desc.text, provenance, config.metadata, force=True, expected=snap,
                         journal=Journal.default(), person_languages={language: text})




class CaptionerSlot:
    """The model, opened on the first re-caption and kept for the next ones; one re-caption at a time. Released
    once unused for ``idle_seconds`` (0: kept until :meth:`close`), as the daemon releases its model, so a page
    that captioned one photo does not hold the model's memory for the rest of the day."""

    def __init__(self, opener: Callable[[], Captioner], idle_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._opener = opener
        self._captioner: Captioner | None = None
        self._lock = threading.Lock()
        self._idle_seconds = idle_seconds
        self._clock = clock
        self._last_used = 0.0
        self._timer: threading.Timer | None = None

    @property
    def loaded(self) -> bool:
        """True while the model is open."""
        return self._captioner is not None

    def recaption(self, config: Config, index: Index, record: ImageRecord) -> FileOutcome:
        """Caption ``record``'s file again with the model (a person's words are kept, as everywhere in capwatch)
        and return the outcome. Raises CapwatchError (ModelError, ...) when the model cannot be opened."""
        from capwatch.library.process import Processor

        with self._lock:
            try:
                if self._captioner is None:
                    self._captioner = self._opener()
                processor = Processor(config, index, self._captioner, journal=Journal.default())
                try:
                    (outcome,) = processor.process([Path(record.path)], skip_captioned=False)
                finally:
                    processor.close()
                return outcome
            finally:
                self._last_used = self._clock()
                self._arm()

    def _arm(self, delay: float | None = None) -> None:
        """(Re)start the timer that releases the model once it has been unused for ``idle_seconds``."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._idle_seconds > 0 and self._captioner is not None:
            self._timer = threading.Timer(self._idle_seconds if delay is None else delay, self.release_if_idle)
            self._timer.daemon = True
            self._timer.start()

    def release_if_idle(self) -> bool:
        """Release the model when it has been unused for ``idle_seconds``; True if it was released. A model in
        use is left alone (its re-caption arms the timer again when it ends)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._captioner is None:
                return False
            unused = self._clock() - self._last_used
            if unused < self._idle_seconds:
                self._arm(self._idle_seconds - unused)  # woken early: wait for the rest
                return False
            self._captioner.close()  # the sessions go and malloc gives the memory back (see models.session)
            self._captioner = None
            return True
        finally:
            self._lock.release()

    def close(self) -> None:
        """Release the model, if it was opened."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._captioner is not None:
                self._captioner.close()
                self._captioner = None
