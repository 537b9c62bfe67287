"""The large previews a camera stores inside its JPEGs, for pictures smaller than the photo.

A 24 MP JPEG costs ~90 ms to decode even at Pillow's smallest draft scale (the entropy decoding of every block
stays); most cameras also store the same picture at 1.6-2 MP (CIPA DC-007 Multi-Picture Format: a second JPEG
after the first, indexed from an APP2 ``MPF`` segment, type "large thumbnail") or at VGA size in EXIF's IFD1
(JPEGInterchangeFormat, up to ~60 KB). :func:`preview_image` decodes such a preview instead of the photo, but
only when it is at least as large as the picture asked for, has the photo's aspect ratio (within
:data:`ASPECT_TOLERANCE`) and is stored the way the photo is (the photo's EXIF orientation then applies to it,
unless the preview says an orientation of its own that differs: then it is not used). Maker-note previews
(Canon, Olympus, ...) are not parsed.

Everything is read with ``os.pread`` from the descriptor the caller opened and checked: nothing else is opened.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from capwatch.models.rawpreview import ifd_entries, tiff_order

#: The previews' aspect ratio may differ from the photo's by this share (a 6000x4000 photo with a 1616x1080
#: preview: 0.25 %): more and the picture would be visibly another crop.
ASPECT_TOLERANCE = 0.01
#: Bytes read to find the segments before the image data (EXIF and MPF segments are at most 64 KB each).
HEAD_BYTES = 512 << 10
#: A preview larger than this is not a preview.
MAX_PREVIEW_BYTES = 32 << 20
#: CIPA DC-007 MP types of the pictures that are the same photo, smaller: large thumbnails of class 1 (VGA) and
#: class 2 (Full HD). Panorama frames, disparity (stereo) and multi-angle images are other pictures.
LARGE_THUMBNAILS = frozenset({0x010001, 0x010002})
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_ORIENTATION = 0x0112
_IFD1_JPEG = (0x0201, 0x0202)
_MP_ENTRY = 0xB002

_TRANSPOSE = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,), 3: (Image.Transpose.ROTATE_180,), 4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,), 6: (Image.Transpose.ROTATE_270,), 7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


@dataclass(frozen=True)
class Header:
    """What a JPEG's segments before its image data say: its stored size (width, height), its EXIF orientation
    (None: no tag), and where its embedded previews lie (absolute offset, length, kind: ``mpf`` or ``exif``)."""

    size: tuple[int, int]
    orientation: int | None
    previews: tuple[tuple[int, int, str], ...]


def _segments(head: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, payload offset, payload length) of each segment up to the first SOF or SOS."""
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", head, pos + 2)
        if length < 2:
            return
        yield marker, pos + 4, length - 2
        if marker == 0xDA or marker in _SOF:
            return
        pos += 2 + length


def _orientation(tiff: bytes) -> int | None:
    """IFD0's orientation in a TIFF structure (EXIF), or None."""
    order = tiff_order(tiff)
    if order is None or len(tiff) < 8:
        return None
    (ifd0,) = struct.unpack_from(order + "I", tiff, 4)
    for tag, typ, count, value, _ in ifd_entries(tiff, ifd0, order):
        if tag == _ORIENTATION and typ == 3 and count == 1:
            return value if 1 <= value <= 8 else None
    return None


def _exif_thumbnail(tiff: bytes) -> tuple[int, int] | None:
    """(offset, length) within ``tiff`` of the JPEG thumbnail IFD1 points at, or None."""
    order = tiff_order(tiff)
    if order is None or len(tiff) < 8:
        return None
    (ifd0,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd0 + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(order + "H", tiff, ifd0)
    end = ifd0 + 2 + 12 * count
    if end + 4 > len(tiff):
        return None
    (ifd1,) = struct.unpack_from(order + "I", tiff, end)
    found = {tag: value for tag, _, _, value, _ in ifd_entries(tiff, ifd1, order) if tag in _IFD1_JPEG}
    offset, length = found.get(_IFD1_JPEG[0], 0), found.get(_IFD1_JPEG[1], 0)
    return (offset, length) if offset > 0 and length > 0 and offset + length <= len(tiff) else None


def _mpf_previews(mpf: bytes, base: int) -> list[tuple[int, int]]:
    """(absolute offset, length) of the large thumbnails an MPF index (``mpf``: from its byte-order mark, which
    lies at ``base`` in the file) lists; the first entry (the photo itself) is never one."""
    order = tiff_order(mpf)
    if order is None or len(mpf) < 8:
        return []
    (first,) = struct.unpack_from(order + "I", mpf, 4)
    out = []
    for tag, _, count, value, _ in ifd_entries(mpf, first, order):
        if tag != _MP_ENTRY or count % 16 or value + count > len(mpf):
            continue
        for at in range(value, value + count, 16):
            attribute, size, offset = struct.unpack_from(order + "III", mpf, at)
            if offset > 0 and size > 0 and (attribute & 0xFFFFFF) in LARGE_THUMBNAILS and \
                    (attribute >> 24) & 0x07 == 0:  # image data format 0: JPEG
                out.append((base + offset, size))
    return out


def read_header(head: bytes) -> Header | None:
    """The :class:`Header` of the JPEG whose first bytes are ``head``; None when it is not a JPEG, has no frame
    header within them, or its frame header gives no size (height 0: the height follows the data, in a DNL
    marker)."""
    if head[:2] != b"\xff\xd8":
        return None
    orientation: int | None = None
    previews: list[tuple[int, int, str]] = []
    for marker, start, length in _segments(head):
        body = head[start:start + length]
        if marker == 0xE1 and body.startswith(b"Exif\0\0") and orientation is None:
            tiff = body[6:]
            orientation = _orientation(tiff)
            thumb = _exif_thumbnail(tiff)
            if thumb is not None:
                previews.append((start + 6 + thumb[0], thumb[1], "exif"))
        elif marker == 0xE2 and body.startswith(b"MPF\0"):
            previews.extend((offset, size, "mpf") for offset, size in _mpf_previews(body[4:], start + 4))
        elif marker in _SOF and len(body) >= 5:
            height, width = struct.unpack_from(">HH", body, 1)
            return Header((width, height), orientation, tuple(previews)) if width and height else None
    return None


def _fits(size: tuple[int, int], box: int) -> tuple[int, int]:
    """``size`` scaled to fit ``box`` x ``box`` (never up)."""
    scale = min(1.0, box / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def preview_image(fd: int, px: int, *, max_pixels: int) -> Image.Image | None:
    """The photo open at ``fd`` as an oriented RGB picture of at least ``px`` on its longer side, decoded from the
    smallest embedded preview that serves (see the module docstring); None when the file is not a JPEG, is no
    larger than ``px`` itself, or has no such preview (then the photo is to be decoded). Raises nothing for a bad
    preview (it is skipped); OSError only when ``fd`` cannot be read."""
    head = os.pread(fd, HEAD_BYTES, 0)
    main = read_header(head)
    if main is None or max(main.size) <= px or not main.previews:
        return None
    size = os.fstat(fd).st_size
    ratio = main.size[0] / main.size[1]
    area = main.size[0] * main.size[1] - 1
    candidates = []
    for offset, length, _ in main.previews:
        if length > MAX_PREVIEW_BYTES or offset + length > size:
            continue
        own = read_header(os.pread(fd, min(length, HEAD_BYTES), offset))
        if own is None or max(own.size) < px or own.size[0] * own.size[1] > min(max_pixels, area):
            continue  # too small for the picture, or no smaller than the photo itself
        if abs(own.size[0] / own.size[1] - ratio) > ASPECT_TOLERANCE * ratio:
            continue  # another crop (a 4:3 thumbnail of a 3:2 photo) or stored turned
        if own.orientation not in (None, 1, main.orientation):
            continue  # the preview says it is stored otherwise than the photo: not worth the guess
        candidates.append((own.size[0] * own.size[1], offset, length))
    for _, offset, length in sorted(candidates):
        image = _decode(os.pread(fd, length, offset), px)
        if image is not None:
            for method in _TRANSPOSE.get(main.orientation or 1, ()):
                image = image.transpose(method)
            return image
    return None


def _decode(data: bytes, px: int) -> Image.Image | None:
    """The JPEG ``data`` decoded as RGB at the smallest draft scale still at least ``px`` on its longer side, or
    None when it does not decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "JPEG":
                    return None
                img.draft("RGB", _fits(img.size, px))
                img.load()
                return img.convert("RGB") if img.mode != "RGB" else img.copy()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning):
        return None
