"""Camera RAW files are captioned from the JPEG preview the camera embedded in them.

Every mainstream RAW format carries a full- or near-full-size JPEG rendered by the camera (what digiKam, Immich
and Lightroom's import grid show). Decoding the sensor data would need LibRaw and seconds per file; the preview
is what the photographer saw, and at the model's 224–768 px input the two are indistinguishable.

Supported: TIFF-structured RAW (CR2, NEF/NRW, ARW/SRF/SR2, DNG, PEF, SRW, ORF, RW2, 3FR, IIQ, ERF, …: JPEG
previews referenced from IFD0, the IFD chain, SubIFDs and the EXIF IFD) and Fujifilm RAF (fixed header offsets).
CR3 and X3F are not parsed; they get a one-line ImageError from the caller.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from capwatch.metadata.safeopen import read_regular

#: IFD tags that matter here.
_SUBIFDS = 0x014A
_EXIF_IFD = 0x8769
_JPEG_OFFSET = 0x0201
_JPEG_LENGTH = 0x0202
_STRIP_OFFSETS = 0x0111
_STRIP_BYTES = 0x0117
_COMPRESSION = 0x0103
_ORIENTATION = 0x0112
#: Panasonic RW2 keeps its preview JPEG in a tag of its own.
_RW2_JPEG = 0x002E

_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_MAX_IFDS = 64


@dataclass(frozen=True)
class Preview:
    """A JPEG stream inside a RAW file and the orientation the RAW's IFD0 gives for the picture."""

    data: bytes
    orientation: int


def tiff_order(head: bytes) -> str | None:
    """The struct byte order of a TIFF structure (EXIF, MPF, a RAW file) from its byte-order mark, or None."""
    if head[:2] == b"II":
        return "<"
    if head[:2] == b"MM":
        return ">"
    return None


def ifd_entries(data: bytes, offset: int, order: str) -> Iterator[tuple[int, int, int, int, int]]:
    """(tag, type, count, value-or-offset, entry position) for the IFD at ``offset``."""
    if offset <= 0 or offset + 2 > len(data):
        return
    (count,) = struct.unpack_from(order + "H", data, offset)
    for i in range(min(count, 4096)):
        pos = offset + 2 + 12 * i
        if pos + 12 > len(data):
            return
        tag, typ, n = struct.unpack_from(order + "HHI", data, pos)
        size = _TYPE_SIZES.get(typ, 1) * n
        if size <= 4:
            if typ == 3:
                (value,) = struct.unpack_from(order + "H", data, pos + 8)
            else:
                (value,) = struct.unpack_from(order + "I", data, pos + 8)
        else:
            (value,) = struct.unpack_from(order + "I", data, pos + 8)
        yield tag, typ, n, value, pos


def _longs(data: bytes, order: str, typ: int, count: int, value: int, pos: int) -> list[int]:
    """All values of a SHORT/LONG entry (inline or at its offset)."""
    width = 2 if typ == 3 else 4
    fmt = order + ("H" if width == 2 else "I")
    if width * count <= 4:
        return [struct.unpack_from(fmt, data, pos + 8 + width * i)[0] for i in range(count)]
    if value + width * count > len(data):
        return []
    return [struct.unpack_from(fmt, data, value + width * i)[0] for i in range(count)]


def _tiff_previews(data: bytes) -> tuple[list[bytes], int]:
    order = tiff_order(data[:2])
    if order is None or len(data) < 8:
        return [], 1
    (first,) = struct.unpack_from(order + "I", data, 4)
    candidates: list[bytes] = []
    orientation = 1
    queue = [(first, True, True)]  # (offset, follow the chain, is IFD0)
    seen: set[int] = set()
    while queue and len(seen) < _MAX_IFDS:
        offset, chain, is_ifd0 = queue.pop(0)
        if offset in seen or offset <= 0 or offset >= len(data):
            continue
        seen.add(offset)
        tags: dict[int, tuple[int, int, int, int]] = {}
        entries = list(ifd_entries(data, offset, order))
        for tag, typ, count, value, pos in entries:
            tags[tag] = (typ, count, value, pos)
        if is_ifd0 and _ORIENTATION in tags:
            orientation = tags[_ORIENTATION][2] or 1
        if _JPEG_OFFSET in tags and _JPEG_LENGTH in tags:
            start, length = tags[_JPEG_OFFSET][2], tags[_JPEG_LENGTH][2]
            candidates.append(data[start:start + length])
        if _RW2_JPEG in tags:
            typ, count, value, _pos = tags[_RW2_JPEG]
            candidates.append(data[value:value + count])
        if tags.get(_COMPRESSION, (0, 0, 0, 0))[2] in (6, 7) and _STRIP_OFFSETS in tags and _STRIP_BYTES in tags:
            offsets = _longs(data, order, *tags[_STRIP_OFFSETS])
            sizes = _longs(data, order, *tags[_STRIP_BYTES])
            if len(offsets) == 1 and len(sizes) == 1:
                candidates.append(data[offsets[0]:offsets[0] + sizes[0]])
        for tag in (_SUBIFDS, _EXIF_IFD):
            if tag in tags:
                for sub in _longs(data, order, *tags[tag]):
                    queue.append((sub, False, False))
        if chain and entries:
            end = offset + 2 + 12 * len(entries)
            if end + 4 <= len(data):
                (nxt,) = struct.unpack_from(order + "I", data, end)
                queue.append((nxt, True, False))
    return candidates, orientation


def _raf_previews(data: bytes) -> list[bytes]:
    if len(data) < 92:
        return []
    start, length = struct.unpack_from(">II", data, 84)
    return [data[start:start + length]]


def extract_preview(source: Path | bytes) -> Preview | None:
    """The largest decodable JPEG preview embedded in the RAW file at ``source`` (a path, or the file's bytes
    already read from an open descriptor), or None when it has none.

    Lossless-JPEG sensor data (also SOI-marked) is skipped because Pillow cannot decode it. Raises OSError when
    the file cannot be read (NotRegularFile, without blocking, for a FIFO or device at the path).
    """
    data = source if isinstance(source, bytes) else read_regular(source)
    orientation = 1
    if data.startswith(b"FUJIFILMCCD-RAW"):
        candidates = _raf_previews(data)
    else:
        head = data[:4]
        if head in (b"IIRO", b"IIRS", b"IIU\x00"):
            data_for_tiff = b"II*\x00" + data[4:]
        elif head == b"MMOR":
            data_for_tiff = b"MM\x00*" + data[4:]
        else:
            data_for_tiff = data
        candidates, orientation = _tiff_previews(data_for_tiff)
    best: Preview | None = None
    best_pixels = 0
    for blob in candidates:
        if not blob.startswith(b"\xff\xd8"):
            continue
        try:
            with Image.open(io.BytesIO(blob)) as img:
                if img.format != "JPEG":
                    continue
                pixels = img.size[0] * img.size[1]
                img.draft("RGB", (64, 64))
                img.load()  # proves the stream decodes (baseline/progressive, not lossless sensor data)
        except (OSError, ValueError, SyntaxError):
            continue
        if pixels > best_pixels:
            best, best_pixels = Preview(blob, orientation), pixels
    return best
