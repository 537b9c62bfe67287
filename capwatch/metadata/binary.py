"""Random access to bytes, either in memory or in an open file, so header parsers never read pixel data."""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, Protocol

from capwatch.errors import MetadataError
from capwatch.metadata.safeopen import open_binary


class CorruptError(MetadataError):
    """A container or metadata block is malformed (one-line message)."""


class ByteSource(Protocol):
    """Read ``size`` bytes at ``offset``; fewer bytes only at the end of the data."""

    @property
    def size(self) -> int: ...

    def read_at(self, offset: int, size: int) -> bytes: ...


class BytesSource:
    """A ByteSource over bytes already in memory (a JPEG APP1 segment, a whole file being rewritten)."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._data = memoryview(data)

    @property
    def size(self) -> int:
        return len(self._data)

    def read_at(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            return b""
        return bytes(self._data[offset : offset + size])


class FileSource:
    """A ByteSource over an open binary file: seeks and reads only what is asked for."""

    def __init__(self, fileobj: BinaryIO, size: int) -> None:
        self._f = fileobj
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset >= self._size:
            return b""
        self._f.seek(offset)
        return self._f.read(min(size, self._size - offset))


def read_exact(src: ByteSource, offset: int, size: int, what: str) -> bytes:
    """Return exactly ``size`` bytes at ``offset``; raises CorruptError naming ``what`` when the data ends early."""
    data = src.read_at(offset, size)
    if len(data) != size:
        raise CorruptError(f"truncated {what}")
    return data


def u16(data: bytes, offset: int, order: str) -> int:
    """Unsigned 16-bit integer at ``offset`` in byte order ``<`` or ``>``."""
    return int(struct.unpack_from(order + "H", data, offset)[0])


def u32(data: bytes, offset: int, order: str) -> int:
    """Unsigned 32-bit integer at ``offset`` in byte order ``<`` or ``>``."""
    return int(struct.unpack_from(order + "I", data, offset)[0])


def open_noatime(path: str | os.PathLike[str]) -> BinaryIO:
    """Open the regular file ``path`` for binary reading, without blocking (a FIFO or device swapped in is
    refused at once, see :mod:`capwatch.metadata.safeopen`) and without updating its access time where the OS
    allows it (O_NOATIME needs the file's owner or root). Raises OSError like ``open`` (NotRegularFile for a
    FIFO, socket or device)."""
    return open_binary(path)
