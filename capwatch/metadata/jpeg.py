"""JPEG: find the metadata segments before SOS, and rebuild the file with new APP1 Exif / APP1 XMP / APP13
segments while every other byte (other segments, their order, scan data, trailers after EOI such as MPF images or
motion-photo videos) is copied unchanged.

Where segments go, and what must not move:

- The Exif APP1 stays where it is, at the same byte offset: readers look for Exif in the first APP1, and some
  cameras (a Kodak DC210, for one) wrote offsets into it that count from the start of the file. So nothing is
  inserted before it and nothing before it changes size; an XMP segment there is rewritten to its old size, using
  its padding. A new XMP segment goes right after the Exif segment.
- Without an Exif segment, a new Exif and then a new XMP segment go after the leading run of APP0/APP1 segments.
- Nothing after an APP2 MPF segment is inserted or changes size before SOS: MPF offsets of the images that follow
  EOI count from that segment. (Other APP2 segments, such as ICC profiles, hold no such offsets.)

A layout where these rules cannot all hold (Exif after MPF; XMP without room before Exif) raises EmbedNotSafe.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from capwatch.metadata.binary import ByteSource, BytesSource, CorruptError, read_exact

EXIF_SIG = b"Exif\x00\x00"
XMP_SIG = b"http://ns.adobe.com/xap/1.0/\x00"
XMP_EXT_SIG = b"http://ns.adobe.com/xmp/extension/\x00"
PHOTOSHOP_SIG = b"Photoshop 3.0\x00"
MPF_SIG = b"MPF\x00"
MAX_SEGMENT_PAYLOAD = 65533  # 65535 minus the two length bytes
MAX_XMP_PACKET = MAX_SEGMENT_PAYLOAD - len(XMP_SIG)  # 65504
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD9)})


class EmbedNotSafe(Exception):
    """Embedding is not possible without risk (too big, ExtendedXMP, unusual layout): use a sidecar instead."""


@dataclass(frozen=True)
class Segment:
    """A marker segment: ``offset`` of its 0xFF, total ``size`` (marker + length + payload), payload kind."""

    marker: int
    offset: int
    size: int
    kind: str  # exif xmp xmp-ext photoshop mpf other


@dataclass(frozen=True)
class JpegLayout:
    segments: list[Segment]
    sos_offset: int
    width: int | None
    height: int | None


def _kind(marker: int, head: bytes) -> str:
    if marker == 0xE1:
        if head.startswith(EXIF_SIG) or head.startswith(b"Exif\x00\xff"):
            return "exif"
        if head.startswith(XMP_SIG):
            return "xmp"
        if head.startswith(XMP_EXT_SIG):
            return "xmp-ext"
    if marker == 0xED and head.startswith(PHOTOSHOP_SIG):
        return "photoshop"
    if marker == 0xE2 and head.startswith(MPF_SIG):
        return "mpf"
    return "other"


def parse_layout(src: ByteSource) -> JpegLayout:
    """Walk the segments from SOI up to the first SOS. Raises CorruptError on a malformed header."""
    if read_exact(src, 0, 2, "JPEG") != b"\xff\xd8":
        raise CorruptError("not a JPEG file")
    pos, segments = 2, list[Segment]()
    width = height = None
    while True:
        b = read_exact(src, pos, 2, "JPEG header (no image data)")
        if b[0] != 0xFF:
            raise CorruptError(f"corrupt JPEG: expected a marker at byte {pos}")
        marker = b[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _NO_LENGTH:
            pos += 2
            continue
        if marker == 0xD9:
            raise CorruptError("corrupt JPEG: end-of-image before any image data")
        length = struct.unpack(">H", read_exact(src, pos + 2, 2, "JPEG segment"))[0]
        if length < 2 or pos + 2 + length > src.size:
            raise CorruptError(f"corrupt JPEG: segment at byte {pos} runs past the end of the file")
        if marker == 0xDA:
            return JpegLayout(segments, pos, width, height)
        head = src.read_at(pos + 4, 40) if marker in (0xE1, 0xE2, 0xED) else b""
        segments.append(Segment(marker, pos, 2 + length, _kind(marker, head)))
        if marker in _SOF and width is None and length >= 7:
            sof = read_exact(src, pos + 4, 5, "JPEG frame header")
            height, width = struct.unpack(">HH", sof[1:5])
        pos += 2 + length


def payload(src: ByteSource, seg: Segment) -> bytes:
    """The bytes of a segment after its marker and length field."""
    return src.read_at(seg.offset + 4, seg.size - 4)


@dataclass(frozen=True)
class JpegMetadata:
    exif: bytes | None  # TIFF structure (after "Exif\0\0")
    xmp: bytes | None
    has_extended_xmp: bool
    photoshop: bytes | None  # IRB (after "Photoshop 3.0\0")
    width: int | None
    height: int | None
    #: The ExtendedXMP packet reassembled from its chunks (None when absent or incomplete); read-only: capwatch
    #: never writes ExtendedXMP (a file that has it gets a sidecar).
    extended_xmp: bytes | None = None


#: ExtendedXMP reassembled from more chunks than this is not read (a 64 KB chunk each: 16 MiB).
MAX_EXTENDED_CHUNKS = 256


def extended_xmp(src: ByteSource, segments: list[Segment]) -> bytes | None:
    """The ExtendedXMP packet (XMP spec part 3: 32-byte GUID, 4-byte full length, 4-byte offset, then data) put
    together from its APP1 chunks of the first GUID seen; None when there is none, or when the chunks do not
    cover exactly the announced length (then nothing of it is trusted)."""
    chunks = [s for s in segments if s.kind == "xmp-ext"]
    if not chunks or len(chunks) > MAX_EXTENDED_CHUNKS:
        return None
    guid: bytes | None = None
    total = 0
    parts: dict[int, bytes] = {}
    for seg in chunks:
        body = payload(src, seg)[len(XMP_EXT_SIG) :]
        if len(body) < 40:
            return None
        if guid is None:
            guid, total = body[:32], int.from_bytes(body[32:36], "big")
        if body[:32] != guid:
            continue  # another (stale) ExtendedXMP: only the first one is read
        parts[int.from_bytes(body[36:40], "big")] = body[40:]
    out = bytearray()
    for offset in sorted(parts):
        if offset != len(out):
            return None
        out += parts[offset]
    return bytes(out) if len(out) == total else None


def _single(segments: list[Segment], kind: str, strict: bool = True) -> Segment | None:
    found = [s for s in segments if s.kind == kind]
    if len(found) > 1 and strict:
        label = {"exif": "EXIF (APP1)", "xmp": "XMP (APP1)", "photoshop": "Photoshop/IPTC (APP13)"}[kind]
        raise CorruptError(f"duplicate {label} segments")
    return found[0] if found else None


def read_jpeg(src: ByteSource, *, strict: bool = False) -> JpegMetadata:
    """Metadata segments of a JPEG. Raises CorruptError for a malformed header, and with ``strict`` for
    duplicate metadata segments (otherwise the first one counts, as most readers do).

    Several Photoshop APP13 segments are one IRB split over them (Photoshop and exiftool split an IRB over 64 KB,
    e.g. IPTC with thousands of keywords): their payloads are joined in order, as exiftool reads them. A true
    duplicate then reads as repeated resources, of which the first counts, as before.
    """
    layout = parse_layout(src)
    exif = _single(layout.segments, "exif", strict)
    xmp = _single(layout.segments, "xmp", strict)
    ps = _single(layout.segments, "photoshop", strict)
    irb = b"".join(payload(src, s)[len(PHOTOSHOP_SIG) :] for s in layout.segments if s.kind == "photoshop")
    return JpegMetadata(
        exif=payload(src, exif)[6:] if exif else None,
        xmp=payload(src, xmp)[len(XMP_SIG) :] if xmp else None,
        has_extended_xmp=any(s.kind == "xmp-ext" for s in layout.segments),
        photoshop=irb if ps else None,
        width=layout.width,
        height=layout.height,
        extended_xmp=extended_xmp(src, layout.segments),
    )


def _segment(marker: int, body: bytes) -> bytes:
    if len(body) > MAX_SEGMENT_PAYLOAD:
        raise EmbedNotSafe(f"segment of {len(body)} bytes does not fit in one JPEG segment")
    return bytes((0xFF, marker)) + struct.pack(">H", len(body) + 2) + body


_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def find_eoi(data: bytes, sos_offset: int) -> int:
    """Offset of the end-of-image marker that ends the image started at ``sos_offset``.

    Walks the markers between scans (progressive JPEGs have several SOS/DHT segments) instead of taking the
    first FF D9 byte pair, which may occur inside a table. Raises CorruptError when there is none.
    """
    pos = sos_offset
    while True:
        m = _MARKER.search(data, pos)
        if m is None:
            raise CorruptError("truncated JPEG (no end-of-image marker)")
        at = m.start()
        marker = data[at + 1]
        if marker == 0xD9:
            return at
        if at + 4 > len(data):
            raise CorruptError("truncated JPEG (no end-of-image marker)")
        length = struct.unpack_from(">H", data, at + 2)[0]
        pos = at + 2 + length
        if length < 2 or pos > len(data):
            raise CorruptError("truncated JPEG (no end-of-image marker)")


def is_known_trailer(trailer: bytes) -> bool:
    """True for data after EOI that cameras put there on purpose and that does not depend on absolute offsets:
    padding, further JPEG images (MPF: multi-picture, depth maps), motion-photo videos (MP4), Samsung trailers."""
    if not trailer or not trailer.strip(b"\x00\xff"):
        return True
    if trailer.lstrip(b"\x00\xff").startswith(b"\xff\xd8") or trailer.startswith(b"\xff\xd8"):
        return True
    return trailer[4:8] == b"ftyp" or trailer.endswith(b"SEFT") or b"SEFH" in trailer[:64]


def check_complete(src: ByteSource, layout: JpegLayout) -> None:
    """Raise CorruptError for a JPEG without end-of-image marker (truncated, or still being copied) and for
    unknown data after it (a damaged or concatenated file that capwatch should not rewrite)."""
    if src.read_at(src.size - 2, 2) == b"\xff\xd9":
        # Ends with EOI: complete. (A trailer ending in EOI is another JPEG image, e.g. MPF: also fine.)
        return
    data = src.read_at(0, src.size)
    # Entropy-coded data never contains FF D9 (0xFF is stuffed), so the first FF D9 is normally EOI.
    eoi = data.find(b"\xff\xd9", layout.sos_offset)
    if eoi < 0:
        raise CorruptError("truncated JPEG (no end-of-image marker)")
    if not is_known_trailer(data[eoi + 2 :]):
        # FF D9 may also sit inside a table between progressive scans; walk the markers to be sure.
        eoi = find_eoi(data, layout.sos_offset)
    if not is_known_trailer(data[eoi + 2 :]):
        raise CorruptError("unknown data after the JPEG end-of-image marker")


def header_end(src: ByteSource, layout: JpegLayout) -> int:
    """Offset just past the first SOS segment header: everything before it is metadata and tables."""
    length = struct.unpack(">H", read_exact(src, layout.sos_offset + 2, 2, "JPEG scan header"))[0]
    return layout.sos_offset + 2 + int(length)


_PACKET_TRAILER = re.compile(rb"<\?xpacket end=[\"'][rw][\"']\?>\s*\Z")
_LABELS = {"exif": "Exif", "xmp": "XMP", "photoshop": "Photoshop/IPTC"}


def _fit_packet(packet: bytes, size: int) -> bytes | None:
    """``packet`` with its whitespace padding (before the ``<?xpacket end`` trailer) changed so that it is exactly
    ``size`` bytes, which is what the padding is for: editing XMP in place. Returns None when the packet has no
    trailer or its content alone is larger than ``size``."""
    trailer = _PACKET_TRAILER.search(packet)
    if trailer is None:
        return None
    body, tail = packet[: trailer.start()].rstrip(b" \t\r\n"), packet[trailer.start() :].rstrip(b" \t\r\n")
    room = size - len(body) - len(tail)
    if room < 1:
        return None if room < 0 else body + tail
    # Whitespace in lines of 100 bytes, like the writer's own padding.
    pad = b"\n" + (b" " * 99 + b"\n") * ((room - 1) // 100) + b" " * ((room - 1) % 100)
    return body + pad + tail


def rebuild_head(head: bytes, exif: bytes | None, xmp_packet: bytes | None, irb: bytes | None) -> bytes:
    """New bytes for everything before SOS, given ``head`` = the file up to at least the end of the SOS header.

    Exif (TIFF bytes), XMP packet and Photoshop IRB segments are replaced or added where the module docstring says;
    ``None`` leaves that segment as it is; an IRB is only replaced, never added. The caller appends the original
    bytes from SOS on. Raises CorruptError for a malformed header or duplicate segments, and EmbedNotSafe when a
    segment would exceed 64 KB or the layout leaves no place that keeps the Exif segment and MPF offsets intact.
    """
    data = head
    layout = parse_layout(BytesSource(head))
    segs = layout.segments
    old = {kind: _single(segs, kind) for kind in ("exif", "xmp", "photoshop")}
    if any(s.kind == "xmp-ext" for s in segs):
        raise EmbedNotSafe("the file uses ExtendedXMP")
    old_exif = old["exif"]
    mpf = next((s for s in segs if s.kind == "mpf"), None)

    def pinned(seg: Segment) -> str | None:
        """Where ``seg`` sits when it must keep its size (so that the Exif segment and MPF offsets stay valid)."""
        if old_exif is not None and seg.offset < old_exif.offset:
            return "before the Exif segment"
        if mpf is not None and seg.offset > mpf.offset:
            return "after the MPF segment"
        return None

    new_bodies: dict[str, bytes] = {}
    if exif is not None:
        new_bodies["exif"] = _segment(0xE1, EXIF_SIG + exif)
    if xmp_packet is not None:
        old_xmp = old["xmp"]
        where = pinned(old_xmp) if old_xmp is not None else None
        if old_xmp is not None and where is not None:
            fitted = _fit_packet(xmp_packet, old_xmp.size - 4 - len(XMP_SIG))
            if fitted is None:
                raise EmbedNotSafe(f"the new XMP does not fit in the padding of the old one, which sits {where}")
            xmp_packet = fitted
        new_bodies["xmp"] = _segment(0xE1, XMP_SIG + xmp_packet)
    if irb is not None and old["photoshop"] is not None:
        new_bodies["photoshop"] = _segment(0xED, PHOTOSHOP_SIG + irb)
    pending: list[str] = [k for k in ("exif", "xmp") if k in new_bodies and old[k] is None]  # in this order
    insert_at: int | None  # index of the segment that new segments go in front of (len(segs): before SOS)
    after_exif: list[str]
    if old_exif is not None:
        # New XMP right after the Exif segment, wherever that is: never before it, so the Exif segment stays put
        # (and stays the first APP1 when it was).
        insert_at, after_exif = None, pending
    else:
        # No Exif: after the leading run of APP0/APP1 segments, which ends before any APP2 (so before MPF).
        insert_at, after_exif = 0, []
        while insert_at < len(segs) and segs[insert_at].marker in (0xE0, 0xE1):
            insert_at += 1
    out = bytearray(b"\xff\xd8")
    prev_end = 2
    for i, seg in enumerate(segs):
        out += data[prev_end : seg.offset]  # fill bytes or stand-alone markers between segments, verbatim
        prev_end = seg.offset + seg.size
        if i == insert_at:
            for k in pending:
                out += new_bodies[k]
        if seg.kind in new_bodies and old[seg.kind] is seg:
            body = new_bodies[seg.kind]
            where = pinned(seg)
            if len(body) != seg.size and where is not None:
                raise EmbedNotSafe(f"the {_LABELS[seg.kind]} segment sits {where} and would change size")
            out += body
        else:
            out += data[seg.offset : prev_end]
        if seg is old_exif:
            for k in after_exif:
                out += new_bodies[k]
    if insert_at == len(segs):
        for k in pending:
            out += new_bodies[k]
    out += data[prev_end : layout.sos_offset]
    _check_offsets_kept(bytes(out), layout, old_exif, mpf)
    return bytes(out)


def _check_offsets_kept(new_head: bytes, layout: JpegLayout, old_exif: Segment | None, mpf: Segment | None) -> None:
    """Raise EmbedNotSafe unless the Exif segment starts at the same offset in ``new_head`` and the distance from
    the end of the MPF segment to SOS is unchanged: the module's rules, checked once more on the result."""
    # new_head ends where SOS started: a stand-in SOS header lets parse_layout walk it.
    new_layout = parse_layout(BytesSource(new_head + b"\xff\xda\x00\x02"))
    if old_exif is not None:
        new_exif = next(s for s in new_layout.segments if s.kind == "exif")
        if new_exif.offset != old_exif.offset:
            raise EmbedNotSafe("the Exif segment would move")
    if mpf is not None:
        new_mpf = next(s for s in new_layout.segments if s.kind == "mpf")
        if len(new_head) - (new_mpf.offset + new_mpf.size) != layout.sos_offset - (mpf.offset + mpf.size):
            raise EmbedNotSafe("the images after the end-of-image marker would no longer be where MPF says")


def rebuild(data: bytes, exif: bytes | None, xmp_packet: bytes | None, irb: bytes | None) -> bytes:
    """The whole file ``data`` with new metadata segments (see ``rebuild_head``); checks the file is complete."""
    src = BytesSource(data)
    layout = parse_layout(src)
    check_complete(src, layout)
    return rebuild_head(data, exif, xmp_packet, irb) + data[layout.sos_offset :]
