"""WebP (RIFF): read EXIF/XMP chunks and rebuild in the extended (VP8X) layout with EXIF/XMP flags.

Chunk order written: VP8X, ICCP, ANIM, image chunks (ALPH/VP8/VP8L or ANMF frames), EXIF, XMP, then any unknown
chunks in their original order. Image chunks are copied byte for byte; the RIFF size and odd-size padding are
recomputed. A simple (VP8/VP8L only) file is promoted to VP8X with the canvas size from its bitstream header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from capwatch.metadata.binary import ByteSource, BytesSource, CorruptError, read_exact

FLAG_ANIM = 0x02
FLAG_XMP = 0x04
FLAG_EXIF = 0x08
FLAG_ALPHA = 0x10
FLAG_ICC = 0x20
_IMAGE = (b"ALPH", b"VP8 ", b"VP8L", b"ANMF")


@dataclass(frozen=True)
class Chunk:
    fourcc: bytes
    offset: int  # of the fourcc
    size: int  # payload size (without padding)

    @property
    def end(self) -> int:
        return self.offset + 8 + self.size + (self.size & 1)


def parse_chunks(src: ByteSource) -> list[Chunk]:
    """All chunks of a WebP file. Raises CorruptError when the RIFF size disagrees with the file or a chunk
    runs past the end."""
    head = read_exact(src, 0, 12, "WebP header")
    if head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        raise CorruptError("not a WebP file")
    riff_size = struct.unpack("<I", head[4:8])[0]
    if riff_size + 8 != src.size:
        raise CorruptError(f"WebP RIFF size {riff_size} does not match the file size {src.size}")
    pos, chunks = 12, []
    end = riff_size + 8
    while pos < end:
        h = read_exact(src, pos, 8, "WebP chunk")
        size = struct.unpack("<I", h[4:8])[0]
        chunk = Chunk(h[:4], pos, size)
        if pos + 8 + size > end:
            raise CorruptError(f"WebP chunk {h[:4]!r} runs past the end of the file")
        chunks.append(chunk)
        pos = chunk.end
    if not chunks:
        raise CorruptError("WebP file without chunks")
    return chunks


def _data(src: ByteSource, c: Chunk) -> bytes:
    return src.read_at(c.offset + 8, c.size)


def bitstream_info(fourcc: bytes, data: bytes) -> tuple[int, int, bool]:
    """(width, height, has_alpha) from a VP8 or VP8L chunk payload. Raises CorruptError."""
    if fourcc == b"VP8 ":
        if len(data) < 10 or data[3:6] != b"\x9d\x01\x2a":
            raise CorruptError("malformed VP8 bitstream header")
        w, h = struct.unpack("<HH", data[6:10])
        return w & 0x3FFF, h & 0x3FFF, False
    if fourcc == b"VP8L":
        if len(data) < 5 or data[0] != 0x2F:
            raise CorruptError("malformed VP8L bitstream header")
        bits = struct.unpack("<I", data[1:5])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool((bits >> 28) & 1)
    raise CorruptError("WebP without image data")


@dataclass(frozen=True)
class WebpMetadata:
    exif: bytes | None
    xmp: bytes | None
    width: int | None
    height: int | None


def read_webp(src: ByteSource) -> WebpMetadata:
    """Metadata and canvas size of a WebP file. Raises CorruptError."""
    chunks = parse_chunks(src)
    first = chunks[0]
    width = height = None
    if first.fourcc == b"VP8X" and first.size >= 10:
        d = _data(src, first)
        width = int.from_bytes(d[4:7], "little") + 1
        height = int.from_bytes(d[7:10], "little") + 1
    elif first.fourcc in (b"VP8 ", b"VP8L"):
        width, height, _ = bitstream_info(first.fourcc, src.read_at(first.offset + 8, 16))
    exif = next((_data(src, c) for c in chunks if c.fourcc == b"EXIF"), None)
    if exif is not None and exif.startswith(b"Exif\x00\x00"):
        exif = exif[6:]
    xmp = next((_data(src, c) for c in chunks if c.fourcc == b"XMP "), None)
    return WebpMetadata(exif, xmp, width, height)


def _chunk(fourcc: bytes, data: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(data)) + data + (b"\x00" if len(data) & 1 else b"")


def rebuild(data: bytes, exif: bytes | None, xmp_packet: bytes | None) -> bytes:
    """Return the WebP with EXIF / XMP chunks replaced or added (None leaves that one alone).

    Raises CorruptError for malformed files or duplicate EXIF/XMP chunks.
    """
    src = BytesSource(data)
    chunks = parse_chunks(src)
    for fourcc in (b"EXIF", b"XMP "):
        if sum(c.fourcc == fourcc for c in chunks) > 1:
            raise CorruptError(f"duplicate {fourcc.decode().strip()} chunks in WebP")
    raw = {id(c): data[c.offset : c.end] for c in chunks}

    def verbatim(c: Chunk) -> bytes:
        # Re-pad from the payload: a last chunk of odd size may lack its pad byte in the original.
        return _chunk(c.fourcc, data[c.offset + 8 : c.offset + 8 + c.size]) if c.size & 1 else raw[id(c)]

    first = chunks[0]
    if first.fourcc == b"VP8X":
        if first.size < 10:
            raise CorruptError("malformed WebP VP8X chunk")
        vp8x = bytearray(_data(src, first))
        rest = chunks[1:]
    elif first.fourcc in (b"VP8 ", b"VP8L"):
        w, h, alpha = bitstream_info(first.fourcc, _data(src, first))
        vp8x = bytearray(10)
        vp8x[0] = FLAG_ALPHA if alpha else 0
        vp8x[4:7] = (w - 1).to_bytes(3, "little")
        vp8x[7:10] = (h - 1).to_bytes(3, "little")
        rest = chunks
    else:
        raise CorruptError("WebP without VP8X, VP8 or VP8L chunk")
    old_exif = next((c for c in rest if c.fourcc == b"EXIF"), None)
    old_xmp = next((c for c in rest if c.fourcc == b"XMP "), None)
    exif_bytes = _chunk(b"EXIF", exif) if exif is not None else (verbatim(old_exif) if old_exif else b"")
    xmp_bytes = _chunk(b"XMP ", xmp_packet) if xmp_packet is not None else (verbatim(old_xmp) if old_xmp else b"")
    flags = vp8x[0]
    flags = (flags | FLAG_EXIF) if exif_bytes else (flags & ~FLAG_EXIF)
    flags = (flags | FLAG_XMP) if xmp_bytes else (flags & ~FLAG_XMP)
    vp8x[0] = flags
    iccp = [verbatim(c) for c in rest if c.fourcc == b"ICCP"]
    anim = [verbatim(c) for c in rest if c.fourcc == b"ANIM"]
    image = [verbatim(c) for c in rest if c.fourcc in _IMAGE]
    unknown = [verbatim(c) for c in rest if c.fourcc not in (*_IMAGE, b"ICCP", b"ANIM", b"EXIF", b"XMP ")]
    if not image:
        raise CorruptError("WebP without image data")
    body = b"WEBP" + _chunk(b"VP8X", bytes(vp8x)) + b"".join(iccp + anim + image) + exif_bytes + xmp_bytes
    body += b"".join(unknown)
    return b"RIFF" + struct.pack("<I", len(body)) + body
