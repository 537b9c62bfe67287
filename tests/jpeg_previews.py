"""Real JPEGs with embedded previews, as cameras write them: an MPF (CIPA DC-007) index in APP2 with the preview
JPEG after the photo's own EOI (exiftool reads MPF but cannot write it, so it is built here and checked with
exiftool), and a large EXIF thumbnail in IFD1 (written by exiftool itself). Shared by the tests and bench/serve.py.
"""

from __future__ import annotations

import io
import struct
import subprocess
from pathlib import Path

from PIL import Image

#: CIPA DC-007 MP types (Individual Image Attribute, low 24 bits).
BASELINE_PRIMARY = 0x030000
LARGE_THUMBNAIL_VGA = 0x010001
LARGE_THUMBNAIL_FULL_HD = 0x010002
DISPARITY = 0x020002
_REPRESENTATIVE = 1 << 29


def jpeg_bytes(image: Image.Image, *, quality: int = 90, orientation: int | None = None) -> bytes:
    """``image`` as JPEG bytes, with an EXIF orientation tag when given."""
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(out, "JPEG", quality=quality, exif=exif)
    return out.getvalue()


def _mpf_segment(entries: list[tuple[int, int, int]]) -> bytes:
    """The APP2 segment (marker included) of an MP index with ``entries`` (attribute, size, offset)."""
    count = len(entries)
    ifd_at = 8
    tags = 3
    data_at = ifd_at + 2 + 12 * tags + 4
    body = b"II*\0" + struct.pack("<I", ifd_at) + struct.pack("<H", tags)
    body += struct.pack("<HHI4s", 0xB000, 7, 4, b"0100")  # MPFVersion
    body += struct.pack("<HHII", 0xB001, 4, 1, count)  # NumberOfImages
    body += struct.pack("<HHII", 0xB002, 7, 16 * count, data_at)  # MPEntry
    body += struct.pack("<I", 0)  # no MP attribute IFD
    for attribute, size, offset in entries:
        body += struct.pack("<IIIHH", attribute, size, offset, 0, 0)
    payload = b"MPF\0" + body
    return b"\xff\xe2" + struct.pack(">H", len(payload) + 2) + payload


def with_mpf(main: bytes, previews: list[tuple[bytes, int]]) -> bytes:
    """``main`` (a JPEG) with an MPF index in APP2 (after its APP0/APP1 segments) listing ``previews`` (JPEG bytes,
    MP type), which follow the photo's EOI, as cameras store them."""
    pos = 2
    while main[pos] == 0xFF and main[pos + 1] in (0xE0, 0xE1):
        (length,) = struct.unpack_from(">H", main, pos + 2)
        pos += 2 + length
    placeholder = _mpf_segment([(0, 0, 0)] * (1 + len(previews)))
    base = pos + 8  # the MP header's byte-order mark: after marker, length and "MPF\0"
    main_size = len(main) + len(placeholder)
    entries = [(_REPRESENTATIVE | BASELINE_PRIMARY, main_size, 0)]
    at = main_size
    for data, kind in previews:
        entries.append((kind, len(data), at - base))
        at += len(data)
    segment = _mpf_segment(entries)
    assert len(segment) == len(placeholder)
    return main[:pos] + segment + main[pos:] + b"".join(data for data, _ in previews)


def exiftool_mpf(path: Path) -> list[tuple[str, bytes]]:
    """What exiftool (an independent reader) finds in ``path``'s MPF index: per image after the first, its MP type
    as exiftool names it and its bytes."""
    found = []
    for number in range(2, 6):
        group = f"-MPImage{number}:"
        kind = subprocess.run(["exiftool", "-s3", f"{group}MPImageType", str(path)], capture_output=True,
                              text=True, check=True).stdout.strip()
        if not kind:
            break
        # exiftool names a large thumbnail PreviewImage and any other picture MPImageN.
        data = subprocess.run(["exiftool", "-b", f"{group}PreviewImage", f"{group}MPImage{number}", str(path)],
                              capture_output=True, check=True).stdout
        found.append((kind, data))
    return found


def set_exif_thumbnail(path: Path, thumbnail: Path) -> None:
    """Store ``thumbnail`` (a JPEG) as ``path``'s EXIF thumbnail (IFD1), with exiftool."""
    subprocess.run(["exiftool", "-q", "-overwrite_original", f"-ThumbnailImage<={thumbnail}", str(path)],
                   check=True)
