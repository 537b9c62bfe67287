"""Changes made from the page: a person's caption written into the file, or the model asked again.

Both go through the library's write path (``capwatch.metadata.write_caption``: snapshot, compare-and-swap,
journal) and record in the index what the file holds afterwards, as `capwatch caption` does.
"""

from __future__ import annotations

import threading
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from capwatch.config import Config
from capwatch.errors import CapwatchError
from capwatch.library.index import ImageRecord, Index
from capwatch.library.scan import record_from_snapshot
from capwatch.metadata import FileChanged, Journal, read_snapshot, write_caption

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


def save_person_caption(config: Config, index: Index, record: ImageRecord, text: str) -> ImageRecord:
    """Write ``text`` into ``record``'s file as a person's words (no capwatch provenance, so capwatch never
    replaces it) and record the file as it is afterwards; returns the new index row.

    Raises EditRefused (one line) when metadata writing is off, the file changed during the write, or the write
    path refused (MetadataError's message); the file is then untouched.
    """
    caption = clean_person_caption(text)
    if config.metadata.write == "none":
        raise EditRefused("metadata writing is off (metadata.write = none): nothing was written")
    path = Path(record.path)
    try:
        # force: the person at the page is replacing the words the file holds, whoever wrote them.
        result = write_caption(path, caption, None, config.metadata, force=True, journal=Journal.default())
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
