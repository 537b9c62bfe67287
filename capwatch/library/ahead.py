"""Reading ahead of the model: the next batch's images are decoded (and their text read by an OCR engine beside
the model) on threads of their own while the model works on the batch before, so the model's thread never waits
on either. A result made ahead is used only for the very file the model then captions (same stat, taken from a
file that had settled); anything else is read again in its turn."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capwatch.errors import ImageError
from capwatch.library.embed import decode_pair
from capwatch.metadata.formats import is_video_name
from capwatch.metadata.identity import FileIdentity

if TYPE_CHECKING:
    from capwatch.models.captioner import Captioner
    from capwatch.models.embedding import ImageTextEmbedder
    from capwatch.models.frames import FrameCache
    from capwatch.text.threaded import OffThreadReader, TextRead


@dataclass(frozen=True)
class Decoded:
    """An image decoded and preprocessed ahead of its turn: the model input, or why the file cannot be decoded,
    and the file's identity while it was read (its fingerprint is not needed: the result is used only for a
    snapshot with the same stat, taken from a file that had settled)."""

    identity: FileIdentity
    #: (captioner input, embedder input or None), from one decode.
    pixels: tuple[Any, Any] | None
    error: str | None


def decode_settled(captioner: Captioner, embedder: ImageTextEmbedder | None, path: str, frames: FrameCache
                   ) -> Decoded | None:
    """Decode ``path`` for ``captioner`` (and ``embedder``); None when the file changed meanwhile or had just
    changed (its stat then proves nothing about its content, see FileIdentity.settled)."""
    try:
        before = os.stat(path)
        identity = FileIdentity.of(before, "")
        if not identity.settled:
            return None
        try:
            pixels, error = decode_pair(captioner, embedder, Path(path), frames), None
        except ImageError as exc:
            pixels, error = None, str(exc)
        if not identity.matches_stat(os.stat(path)):
            return None
    except OSError:
        return None  # decoded again in its turn, which reports the error
    return Decoded(identity, pixels, error)


class ReadAhead:
    """The decodes and OCR reads made ahead for one processor: at most ``limit`` of each held at a time.

    Thread-safe: the daemon queues from its reader thread while the model thread takes. ``decoded`` and
    ``texts_used`` count the results made ahead that were used (the rest were read in their turn).
    """

    def __init__(self, captioner: Captioner, embedder: ImageTextEmbedder | None, frames: FrameCache,
                 text_reader: OffThreadReader | None, limit: int) -> None:
        self.captioner = captioner
        self.embedder = embedder
        self.frames = frames
        self.text_reader = text_reader
        self.limit = limit
        self.decoded = 0
        self.texts_used = 0
        #: path -> its decode made ahead (None inside: not settled or changed meanwhile).
        self.pending: dict[str, Future[Decoded | None]] = {}
        #: path -> its text read ahead on the OCR thread.
        self.texts: dict[str, Future[TextRead | None]] = {}
        self._lock = threading.Lock()
        self._decoder: ThreadPoolExecutor | None = None

    def queue(self, paths: Sequence[str]) -> None:
        """Start decoding ``paths`` (normalised) on the decode thread and reading their text on the OCR thread;
        returns at once. Paths beyond the limit are left to their turn."""
        with self._lock:
            if self._decoder is None:
                self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capwatch-decode")
            for path in paths:
                if path in self.pending or len(self.pending) >= self.limit:
                    continue
                self.pending[path] = self._decoder.submit(decode_settled, self.captioner, self.embedder, path,
                                                          self.frames)
                self._queue_text(path, self.limit)

    def queue_texts(self, paths: Sequence[str]) -> None:
        """Start reading the text of ``paths`` (photos the decode-ahead side did not queue) on the OCR thread, so
        it is read while the model captions them."""
        with self._lock:
            for path in paths:
                self._queue_text(path, len(self.texts) + 1)

    def _queue_text(self, path: str, limit: int) -> None:
        # Caller holds the lock. A video's text is read frame by frame in its turn, from the frames it is
        # captioned from.
        if (self.text_reader is not None and path not in self.texts and len(self.texts) < limit
                and not is_video_name(path)):
            self.texts[path] = self.text_reader.read_ahead(Path(path))

    def pixels(self, path: str, identity: FileIdentity) -> Any:
        """The model inputs for ``path`` as its snapshot ``identity`` describes it: decoded ahead when that was done
        on the same, settled file; else decoded now. Raises ImageError or OSError."""
        with self._lock:
            future = self.pending.pop(path, None)
        decoded = future.result() if future is not None else None
        if decoded is not None and decoded.identity.matches_stat_of(identity):
            self.decoded += 1
            if decoded.error is not None:
                raise ImageError(decoded.error)
            return decoded.pixels
        return decode_pair(self.captioner, self.embedder, Path(path), self.frames)

    def text(self, path: str, identity: FileIdentity) -> tuple[str | None, str | None]:
        """(text, None) read in ``path`` by the OCR engine, or (None, why not): read ahead when that was done on
        the same, settled file, else read now on the OCR thread (this thread waits). Needs a text reader."""
        assert self.text_reader is not None
        with self._lock:
            future = self.texts.pop(path, None)  # waited for, not cancelled: a read now would queue behind it
        ahead = future.result() if future is not None and not future.cancelled() else None
        if ahead is not None and ahead.identity.matches_stat_of(identity):
            self.texts_used += 1
            return ahead.text, ahead.error
        try:
            return self.text_reader.read_file(Path(path)), None
        except ImageError as exc:
            return None, str(exc)

    def forget_text(self, path: str) -> None:
        """Take ``path``'s text read ahead out of the queue (cancelled if it has not started)."""
        with self._lock:
            future = self.texts.pop(path, None)
        if future is not None:
            future.cancel()

    def drop(self, paths: Sequence[str]) -> None:
        """Forget what was made ahead for ``paths`` (they did not reach the model: skipped, failed, kept)."""
        with self._lock:
            for path in paths:
                self.pending.pop(path, None)
                text = self.texts.pop(path, None)
                if text is not None:
                    text.cancel()

    def close(self) -> None:
        """Stop the decode thread (decodes not taken are dropped) and forget the texts queued."""
        with self._lock:
            decoder, self._decoder = self._decoder, None
            self.pending.clear()
            self.texts.clear()
        if decoder is not None:
            decoder.shutdown(wait=True, cancel_futures=True)
