"""An OCR engine on a thread of its own, so the captioning model never waits while text is read.

:class:`OffThreadReader` wraps one :class:`~capwatch.text.reader.TextReader` (not thread-safe) and runs every read
on a single thread named ``capwatch-ocr``: reads queued ahead (:meth:`OffThreadReader.submit`) overlap with the
model, and a direct :meth:`~OffThreadReader.read` from any thread is run there too, so the wrapped engine is only
ever used by that one thread. The thread starts with the first read and ends with :meth:`~OffThreadReader.close`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from PIL import Image

from capwatch.errors import ImageError
from capwatch.metadata.identity import FileIdentity
from capwatch.text.reader import TextReader

_T = TypeVar("_T")

#: The name of the OCR thread (``threading.current_thread().name`` starts with it).
THREAD_NAME = "capwatch-ocr"


@dataclass(frozen=True)
class TextRead:
    """The text read in a file ahead of its turn (None: the reading failed, ``error`` says why) and the file's
    identity while it was read: to be used only for a snapshot with the same stat."""

    identity: FileIdentity
    text: str | None
    error: str | None


def read_settled(engine: TextReader, path: Path) -> TextRead | None:
    """Read the text in ``path`` with ``engine``; None when the file changed meanwhile or had just changed (its stat
    then proves nothing about its content, see FileIdentity.settled) or cannot be reached (read again in its turn,
    which reports why)."""
    try:
        identity = FileIdentity.of(os.stat(path), "")
        if not identity.settled:
            return None
        try:
            text, error = engine.read_file(path), None
        except ImageError as exc:
            text, error = None, str(exc)
        if not identity.matches_stat(os.stat(path)):
            return None
    except OSError:
        return None
    return TextRead(identity, text, error)


class OffThreadReader(TextReader):
    """Runs ``reader``'s reads on one thread of its own (see the module docstring). Thread-safe."""

    def __init__(self, reader: TextReader) -> None:
        super().__init__(reader.max_pixels)
        self.name = reader.name
        #: The engine; used by the OCR thread alone.
        self.engine = reader
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., _T], *args: object) -> Future[_T]:
        """Run ``fn(self.engine, *args)`` on the OCR thread (behind the reads queued before it); returns at once."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
            return self._pool.submit(fn, self.engine, *args)

    def read_ahead(self, path: Path) -> Future[TextRead | None]:
        """Queue the reading of ``path`` (see :func:`read_settled`) on the OCR thread; returns at once."""
        return self.submit(read_settled, path)

    def read_file(self, path: Path) -> str:
        """The text in ``path``, read on the OCR thread (this thread waits). Raises ImageError as the engine does."""
        return self.submit(TextReader.read_file, path).result()

    def _read(self, image: Image.Image) -> str:
        # read() has sized the image already; the engine's own _read runs on the OCR thread.
        return self.submit(_engine_read, image).result()

    def close(self) -> None:
        """Stop the OCR thread (reads queued and not started are dropped) and release the engine's models. A later
        read starts a new thread."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self.engine.close()


def _engine_read(engine: TextReader, image: Image.Image) -> str:
    return engine._read(image)  # the sized image, as TextReader.read hands it on
