"""PNG: read eXIf / XMP iTXt / text chunks, and rebuild with new eXIf and XMP iTXt chunks before IDAT.

Every other chunk (and all IDAT data) is copied byte for byte in its original order. An XMP iTXt found after
IDAT is moved before it (the PNG spec allows text anywhere, but the design wants metadata first for streaming
readers); duplicates of the chunks we own are not allowed and raise.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from capwatch.metadata.binary import ByteSource, BytesSource, CorruptError, read_exact

PNG_SIG = b"\x89PNG\r\n\x1a\n"
XMP_KEYWORD = b"XML:com.adobe.xmp"
MAX_TEXT_CHUNK = 8 << 20


@dataclass(frozen=True)
class Chunk:
    type: bytes
    offset: int  # of the length field
    length: int  # data length

    @property
    def end(self) -> int:
        return self.offset + 12 + self.length


def parse_chunks(src: ByteSource, verify_crc: bool = False) -> list[Chunk]:
    """All chunks up to and including IEND. Raises CorruptError on a bad signature, truncation or (when
    ``verify_crc``) a CRC mismatch."""
    if read_exact(src, 0, 8, "PNG signature") != PNG_SIG:
        raise CorruptError("not a PNG file")
    pos, chunks = 8, []
    while True:
        head = read_exact(src, pos, 8, "PNG chunk (no IEND)")
        length = struct.unpack(">I", head[:4])[0]
        ctype = head[4:8]
        if length > 0x7FFFFFFF or pos + 12 + length > src.size:
            raise CorruptError(f"truncated PNG chunk {ctype!r}")
        chunk = Chunk(ctype, pos, length)
        if verify_crc:
            body = src.read_at(pos + 4, 4 + length)
            crc = struct.unpack(">I", src.read_at(pos + 8 + length, 4))[0]
            if zlib.crc32(body) != crc:
                raise CorruptError(f"PNG chunk {ctype.decode('latin-1')} has a bad CRC")
        chunks.append(chunk)
        pos = chunk.end
        if ctype == b"IEND":
            return chunks


def _data(src: ByteSource, chunk: Chunk) -> bytes:
    return src.read_at(chunk.offset + 8, chunk.length)


class TextTooLarge(CorruptError):
    """A text chunk holds more than capwatch reads (MAX_TEXT_CHUNK)."""


def parse_itxt(data: bytes) -> tuple[bytes, str]:
    """(keyword, text) of an iTXt chunk; raises CorruptError when malformed."""
    try:
        keyword, rest = data.split(b"\x00", 1)
        flag, method = rest[0], rest[1]
        _lang, rest = rest[2:].split(b"\x00", 1)
        _translated, text = rest.split(b"\x00", 1)
        if flag:
            if method != 0:
                raise CorruptError("iTXt chunk with unknown compression")
            inflater = zlib.decompressobj()
            text = inflater.decompress(text, MAX_TEXT_CHUNK)
            if inflater.unconsumed_tail:
                raise TextTooLarge(f"compressed iTXt chunk holds more than {MAX_TEXT_CHUNK >> 20} MiB of text")
        return keyword, text.decode("utf-8", errors="replace")
    except (ValueError, IndexError, zlib.error):
        raise CorruptError("malformed PNG iTXt chunk") from None


@dataclass(frozen=True)
class PngMetadata:
    exif: bytes | None
    xmp: bytes | None
    description: str | None  # tEXt/iTXt "Description"
    width: int | None
    height: int | None
    #: Chunks capwatch cares about that it did not read (over MAX_TEXT_CHUNK).
    unread: tuple[str, ...] = ()


def read_png(src: ByteSource) -> PngMetadata:
    """Metadata of a PNG, reading only IHDR and metadata chunks. Raises CorruptError."""
    chunks = parse_chunks(src)
    if not chunks or chunks[0].type != b"IHDR" or chunks[0].length < 8:
        raise CorruptError("PNG without IHDR")
    width, height = struct.unpack(">II", _data(src, chunks[0])[:8])
    exif = xmp = None
    description = None
    unread: list[str] = []
    for c in chunks:
        if c.type == b"eXIf" and exif is None:
            exif = _strip_exif_header(_data(src, c))
        elif c.type in (b"iTXt", b"tEXt", b"zTXt"):
            keyword = src.read_at(c.offset + 8, min(c.length, 80)).split(b"\x00", 1)[0]
            if keyword not in (XMP_KEYWORD, b"Description"):
                continue
            label = "XMP" if keyword == XMP_KEYWORD else "Description"
            if c.length > MAX_TEXT_CHUNK:
                unread.append(f"PNG {label} chunk of {c.length} bytes (over {MAX_TEXT_CHUNK >> 20} MiB)")
                continue
            data = _data(src, c)
            if c.type == b"iTXt":
                try:
                    text = parse_itxt(data)[1]
                except TextTooLarge as exc:
                    unread.append(f"PNG {label} chunk: {exc}")
                    continue
            elif c.type == b"tEXt" and keyword == b"Description":
                text = data[len(keyword) + 1:].decode("latin-1")
            elif c.type == b"zTXt" and keyword == b"Description":
                inflater = zlib.decompressobj()
                try:
                    raw = inflater.decompress(data[len(keyword) + 2:], MAX_TEXT_CHUNK)
                except zlib.error:
                    unread.append("PNG Description in a damaged zTXt chunk")
                    continue
                if inflater.unconsumed_tail:
                    unread.append(f"PNG Description zTXt chunk over {MAX_TEXT_CHUNK >> 20} MiB")
                    continue
                text = raw.decode("latin-1")
            else:
                # XMP belongs in iTXt; capwatch does not rewrite XMP kept elsewhere, and it must not be overlooked
                # (a description in it would be hidden by ours, and a second packet would be added).
                unread.append(f"PNG {label} in a {c.type.decode()} chunk")
                continue
            if keyword == XMP_KEYWORD and c.type == b"iTXt" and xmp is None:
                xmp = text.encode("utf-8")
            elif keyword == b"Description" and description is None:
                description = text
    return PngMetadata(exif, xmp, description, width, height, tuple(unread))


def _strip_exif_header(data: bytes) -> bytes:
    # Some writers put the JPEG-style "Exif\0\0" prefix in eXIf; readers accept it, so do we.
    return data[6:] if data.startswith(b"Exif\x00\x00") else data


def _chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def itxt_xmp(packet: bytes) -> bytes:
    """An uncompressed iTXt chunk holding an XMP packet (the form exiftool and Adobe write)."""
    return _chunk(b"iTXt", XMP_KEYWORD + b"\x00\x00\x00\x00\x00" + packet)


def rebuild(data: bytes, exif: bytes | None, xmp_packet: bytes | None) -> bytes:
    """Return the PNG with eXIf / XMP replaced or added before the first IDAT; None leaves that one alone.

    Raises CorruptError for a malformed file, bad CRCs or duplicate eXIf/XMP chunks.
    """
    src = BytesSource(data)
    chunks = parse_chunks(src, verify_crc=True)
    if not chunks or chunks[0].type != b"IHDR":
        raise CorruptError("PNG without IHDR")
    if not any(c.type == b"IDAT" for c in chunks):
        raise CorruptError("PNG without image data (IDAT)")
    # New chunks go before the first IDAT, or before an APNG frame control chunk that precedes it.
    idat = next(i for i, c in enumerate(chunks) if c.type in (b"IDAT", b"fcTL"))
    exif_chunks = [c for c in chunks if c.type == b"eXIf"]
    xmp_chunks = [c for c in chunks if c.type == b"iTXt" and _data(src, c).startswith(XMP_KEYWORD + b"\x00")]
    if len(exif_chunks) > 1 or len(xmp_chunks) > 1:
        raise CorruptError("duplicate eXIf or XMP chunks in PNG")
    replace: dict[int, bytes] = {}
    drop: set[int] = set()
    before_idat = bytearray()
    for old, new in ((exif_chunks, None if exif is None else _chunk(b"eXIf", exif)),
                     (xmp_chunks, None if xmp_packet is None else itxt_xmp(xmp_packet))):
        if new is None:
            continue
        if old and chunks.index(old[0]) < idat:
            replace[chunks.index(old[0])] = new
        else:
            if old:
                drop.add(chunks.index(old[0]))
            before_idat += new
    out = bytearray(PNG_SIG)
    for i, c in enumerate(chunks):
        if i == idat:
            out += before_idat
        if i in drop:
            continue
        out += replace.get(i, data[c.offset : c.end])
    out += data[chunks[-1].end :]
    return bytes(out)
