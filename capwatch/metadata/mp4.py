"""MP4 and QuickTime MOV (ISO base media file format): read the XMP packet and rewrite the file with a new one,
every media sample byte-identical.

Where the XMP goes is where exiftool puts it: in MP4 the top-level ``uuid`` box BE7ACFCB-97A9-42E8-9C71-999491E3AFAC,
in MOV ``moov/udta/XMP_`` (an existing packet is replaced where it is). Every other box is copied byte for byte:
the media data (``mdat``) as a :class:`~capwatch.metadata.atomic.Tail` of the original file (copied kernel-side,
never through memory), ``moov`` with every QuickTime ``Keys``/``udta`` tag, GPS and date in it.

A rewrite prefers a layout where nothing moves: a new packet is padded so the next one fits in the same box; an
existing box is reused at its size when the packet fits; a new MP4 box goes after the last box; a ``moov`` that
grows in front of the media takes its room from a ``free`` box right after it. When media data must move anyway
(a MOV with ``moov`` in front and no room), every chunk offset (``stco``/``co64``) is moved by as much as its chunk
moved, and the result is checked: each chunk offset of the new file points at the same bytes of the same box the
old one did. Fragmented files (``moof``/``sidx``, whose offsets capwatch does not rewrite) and chunk offsets that
would not fit in 32 bits are refused when something would move (EmbedNotSafe: a sidecar is written instead).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from capwatch.metadata.binary import ByteSource, BytesSource, CorruptError, FileSource, read_exact
from capwatch.metadata.formats import HEAD_SIZE, VIDEO_FORMATS, detect_format
from capwatch.metadata.jpeg import EmbedNotSafe
from capwatch.metadata.quicktime import QuickTimeTags, read_tags
from capwatch.metadata.safeopen import open_binary

XMP_UUID = bytes.fromhex("BE7ACFCB97A942E89C71999491E3AFAC")
#: The largest ``moov`` capwatch reads into memory (a two-hour phone video's is a few MB).
MAX_MOOV = 256 << 20
MAX_XMP = 16 << 20
#: Top-level boxes whose content holds absolute file offsets capwatch does not rewrite.
_OFFSET_HOLDERS = frozenset({b"moof", b"mfra", b"sidx", b"ssix"})
#: Boxes that only contain boxes (the path to the chunk offset tables and to ``udta``).
_CONTAINERS = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"udta", b"mvex"})


@dataclass(frozen=True)
class Box:
    """One box: its type, where it starts, its header length and its whole size (header included)."""

    type: bytes
    offset: int
    header: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def body(self) -> int:
        return self.offset + self.header


def parse_boxes(src: ByteSource, start: int, end: int, what: str) -> tuple[list[Box], int]:
    """The boxes in ``[start, end)`` of ``src`` and where they end (``end``, or earlier when fewer than 8 bytes
    remain: QuickTime allows a 32-bit zero terminator). A size of 0 means "to ``end``". Raises CorruptError for a
    box that does not fit."""
    boxes: list[Box] = []
    pos = start
    while end - pos >= 8:
        size, btype = struct.unpack(">I4s", read_exact(src, pos, 8, what))
        header = 8
        if size == 1:
            size = struct.unpack(">Q", read_exact(src, pos + 8, 8, what))[0]
            header = 16
        elif size == 0:
            if btype == b"\x00\x00\x00\x00" and what != "top-level box":
                break  # a QuickTime terminator inside a container
            size = end - pos
        if size < header or pos + size > end:
            raise CorruptError(f"truncated or malformed {what} {btype!r}")
        boxes.append(Box(btype, pos, header, size))
        pos += size
    return boxes, pos


def _children(data: bytes, box: Box, base: int = 0) -> list[Box]:
    """Children of ``box`` whose bytes start at ``data[base]`` (offsets relative to ``data``)."""
    start = box.body - base
    if box.type == b"meta" and data[start + 4 : start + 8] != b"hdlr":
        start += 4  # ISO/iTunes meta is a full box; QuickTime's (hdlr first) is not
    return parse_boxes(BytesSource(data), start, box.end - base, f"{box.type.decode('latin-1')} child")[0]


@dataclass(frozen=True)
class Layout:
    """The top-level structure of one file and its ``moov`` (bytes), as read."""

    boxes: tuple[Box, ...]
    #: Where the top-level boxes end (the file size, or a few bytes before it).
    end: int
    moov: Box
    moov_data: bytes
    #: XMP in the top-level uuid box (MP4) or in moov/udta/XMP_ (MOV); at most one of them.
    uuid_xmp: Box | None
    udta_xmp: bytes | None


def read_layout(src: ByteSource) -> Layout:
    """The top-level boxes of an MP4/MOV file and its ``moov``. Raises CorruptError for a malformed file or one
    without exactly one ``moov``, and EmbedNotSafe-free: it never decides how to write."""
    boxes, end = parse_boxes(src, 0, src.size, "top-level box")
    moovs = [b for b in boxes if b.type == b"moov"]
    if len(moovs) != 1:
        raise CorruptError("video without exactly one moov box" if moovs else "video without a moov box")
    moov = moovs[0]
    if moov.size > MAX_MOOV:
        raise CorruptError(f"moov box of {moov.size} bytes is larger than capwatch reads")
    moov_data = read_exact(src, moov.offset, moov.size, "moov box")
    uuids = [b for b in boxes if b.type == b"uuid" and b.size >= b.header + 16
             and src.read_at(b.body, 16) == XMP_UUID]
    if len(uuids) > 1:
        raise CorruptError("video with two XMP uuid boxes")
    return Layout(tuple(boxes), end, moov, moov_data, uuids[0] if uuids else None, _udta_xmp(moov_data, moov))


def _udta_xmp(moov_data: bytes, moov: Box) -> bytes | None:
    """The packet in moov/udta/XMP_ (``moov_data`` is the whole moov box), if any."""
    udta = next((b for b in _children(moov_data, moov, moov.offset) if b.type == b"udta"), None)
    if udta is None:
        return None
    # udta's offsets are relative to moov_data already (base 0 from here on).
    box = next((c for c in _children(moov_data, udta) if c.type == b"XMP_"), None)
    return None if box is None else moov_data[box.body : box.end]


@dataclass(frozen=True)
class VideoMetadata:
    """What a video's container says: its XMP packet, QuickTime tags, stored frame size."""

    xmp: bytes | None
    tags: QuickTimeTags
    width: int | None
    height: int | None


def read_video(src: ByteSource) -> VideoMetadata:
    """XMP (top-level uuid or moov/udta/XMP_), QuickTime tags and the first video track's stored size. Raises
    CorruptError for a malformed container."""
    layout = read_layout(src)
    xmp: bytes | None = None
    if layout.uuid_xmp is not None:
        box = layout.uuid_xmp
        if box.size - box.header - 16 > MAX_XMP:
            raise CorruptError("XMP uuid box too large")
        xmp = src.read_at(box.body + 16, box.size - box.header - 16)
    if layout.udta_xmp is not None:
        if xmp is not None and xmp != layout.udta_xmp:
            raise CorruptError("video with two different XMP packets (uuid box and moov/udta/XMP_)")
        xmp = layout.udta_xmp
    tags = read_tags(layout.moov_data)
    return VideoMetadata(xmp, tags, tags.width, tags.height)


def looks_complete(path: str | os.PathLike[str]) -> bool:
    """False while an MP4/MOV file is still being written: its top-level boxes do not reach its end, or it has
    no ``moov`` yet (a recorder or copy writes the media first). True for every other file (also unreadable ones:
    their error belongs to whoever reads them next, and a FIFO or device: it is opened without blocking and
    left to the reader's one-line refusal). Reads only box headers."""
    try:
        with open_binary(path) as f:
            head = f.read(HEAD_SIZE)
            if detect_format(head, os.fspath(path).rpartition(".")[2]) not in VIDEO_FORMATS:
                return True
            src = FileSource(f, os.fstat(f.fileno()).st_size)
            boxes, end = parse_boxes(src, 0, src.size, "top-level box")
    except CorruptError:
        return False
    except OSError:
        return True
    return end == src.size and any(b.type == b"moov" for b in boxes)


# -- chunk offsets -------------------------------------------------------------------------------------------------

def _chunk_tables(moov_data: bytes) -> list[Box]:
    """Every ``stco``/``co64`` box in ``moov_data`` (a whole moov box; offsets relative to it)."""
    out: list[Box] = []

    def walk(box: Box) -> None:
        for child in _children(moov_data, box):
            if child.type in (b"stco", b"co64"):
                out.append(child)
            elif child.type in _CONTAINERS:
                walk(child)

    walk(parse_boxes(BytesSource(moov_data), 0, len(moov_data), "moov")[0][0])
    return out


def chunk_offsets(moov_data: bytes) -> list[list[int]]:
    """The chunk offsets of every track, in order. Raises CorruptError for a malformed table."""
    tables = []
    for box in _chunk_tables(moov_data):
        wide = box.type == b"co64"
        count = struct.unpack_from(">I", moov_data, box.body + 4)[0]
        width = 8 if wide else 4
        if box.body + 8 + count * width > box.end:
            raise CorruptError("truncated chunk offset table")
        fmt = f">{count}{'Q' if wide else 'I'}"
        tables.append(list(struct.unpack_from(fmt, moov_data, box.body + 8)))
    return tables


def _has_item_locations(moov_data: bytes) -> bool:
    # An iloc inside moov (rare: MPEG-21 items) holds absolute offsets too.
    return b"iloc" in moov_data and any(b.type == b"iloc" for b in _all_boxes(moov_data))


def _all_boxes(moov_data: bytes) -> list[Box]:
    out: list[Box] = []

    def walk(box: Box) -> None:
        try:
            children = _children(moov_data, box)
        except CorruptError:
            return
        for child in children:
            out.append(child)
            if child.type in _CONTAINERS or child.type == b"meta":
                walk(child)

    walk(parse_boxes(BytesSource(moov_data), 0, len(moov_data), "moov")[0][0])
    return out


def _patch_offsets(moov_data: bytes, move: Callable[[int], int]) -> bytes:
    """``moov_data`` with every chunk offset ``o`` replaced by ``move(o)``. Raises EmbedNotSafe when a 32-bit
    table would overflow."""
    out = bytearray(moov_data)
    for box in _chunk_tables(moov_data):
        wide = box.type == b"co64"
        count = struct.unpack_from(">I", moov_data, box.body + 4)[0]
        code = "Q" if wide else "I"
        old = struct.unpack_from(f">{count}{code}", moov_data, box.body + 8)
        new = [move(o) for o in old]
        if not wide and new and max(new) > 0xFFFFFFFF:
            raise EmbedNotSafe("chunk offsets would no longer fit in 32 bits")
        struct.pack_into(f">{count}{code}", out, box.body + 8, *new)
    return bytes(out)


# -- rewriting -----------------------------------------------------------------------------------------------------

def _box_header(btype: bytes, size: int, header: int = 8) -> bytes:
    if header == 16 or size > 0xFFFFFFFF:
        return struct.pack(">I4sQ", 1, btype, size + (8 if header == 8 else 0))
    return struct.pack(">I4s", size, btype)


def _sized_box(btype: bytes, body: bytes, header: int = 8) -> bytes:
    size = header + len(body)
    if header == 8 and size > 0xFFFFFFFF:
        size += 8
        header = 16
    return _box_header(btype, size, header) + body


def fit_packet(packet: bytes, size: int) -> bytes | None:
    """``packet`` (an xpacket wrapper with no padding) padded with whitespace to exactly ``size`` bytes, or None when
    it does not fit."""
    need = size - len(packet)
    if need < 0:
        return None
    if need == 0:
        return packet
    end = packet.rindex(b"<?xpacket end")
    pad = (b" " * 99 + b"\n") * (need // 100) + b" " * (need % 100)
    return packet[:end] + pad + packet[end:]


@dataclass(frozen=True)
class Rewrite:
    """The new file as parts: bytes for the boxes that change, ``(offset, length)`` ranges of the original for
    everything else (the media data never passes through memory)."""

    parts: tuple[bytes | tuple[int, int], ...]
    moved: bool
    new_moov: bytes
    #: (original offset, new offset, length) of every range copied from the original.
    copies: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class _Item:
    old: Box | None  # the original box copied unchanged, or None for new bytes
    data: bytes = b""

    @property
    def size(self) -> int:
        return self.old.size if self.old is not None else len(self.data)


def rewrite(src: ByteSource, layout: Layout, fmt: str, packet: bytes, padded: bytes) -> Rewrite:
    """The file ``layout`` describes with ``packet`` as its XMP.

    ``packet`` is the xpacket without padding (used when it fits an existing box exactly), ``padded`` the one a new
    box gets. Raises EmbedNotSafe when the file cannot be rewritten without touching offsets capwatch does not
    know, CorruptError for a malformed file."""
    place = _where(layout, fmt)
    items: list[_Item] = [_Item(b) for b in layout.boxes]
    moov_index = next(i for i, b in enumerate(layout.boxes) if b.type == b"moov")
    if place == "uuid":
        if layout.uuid_xmp is not None:
            index = layout.boxes.index(layout.uuid_xmp)
            room = layout.uuid_xmp.size - layout.uuid_xmp.header - 16
            body = fit_packet(packet, room) or padded
            items[index] = _Item(None, _sized_box(b"uuid", XMP_UUID + body, layout.uuid_xmp.header))
        else:
            last = items[-1].old
            assert last is not None
            if layout.end == src.size and last.end == src.size and _declared_size(src, last) == 0:
                # A last box "to the end of the file" would swallow the new one: give it its size (same header).
                if last.size > 0xFFFFFFFF:
                    raise EmbedNotSafe("the last box has no size and is too large to give it one")
                items[-1] = _Item(None, b"")  # replaced below by header + Tail
                head = struct.pack(">I4s", last.size, last.type)
                return _assemble(src, layout, items, moov_index, None, trailing_new=_sized_box(
                    b"uuid", XMP_UUID + padded), fixed_last=(last, head))
            items.append(_Item(None, _sized_box(b"uuid", XMP_UUID + padded)))
        return _assemble(src, layout, items, moov_index, None)
    new_moov = _moov_with_xmp(layout, packet, padded)
    items[moov_index] = _Item(None, new_moov)
    growth = len(new_moov) - layout.moov.size
    after = moov_index + 1
    if growth and after < len(items) and layout.boxes[after].type in (b"free", b"skip") \
            and layout.boxes[after].header == 8:
        room = layout.boxes[after].size - growth
        if room >= 8:
            items[after] = _Item(None, struct.pack(">I4s", room, layout.boxes[after].type) + b"\x00" * (room - 8))
        elif room == 0:
            items[after] = _Item(None, b"")
    return _assemble(src, layout, items, moov_index, new_moov)


def _declared_size(src: ByteSource, box: Box) -> int:
    return int(struct.unpack(">I", src.read_at(box.offset, 4))[0])


def _where(layout: Layout, fmt: str) -> str:
    if layout.uuid_xmp is not None and layout.udta_xmp is not None:
        raise EmbedNotSafe("the video holds XMP in two places")
    if layout.uuid_xmp is not None:
        return "uuid"
    if layout.udta_xmp is not None:
        return "udta"
    return "udta" if fmt == "mov" else "uuid"


def _moov_with_xmp(layout: Layout, packet: bytes, padded: bytes) -> bytes:
    moov, data = layout.moov, layout.moov_data
    children = _children(data, moov, moov.offset)  # offsets relative to data
    udta = next((c for c in children if c.type == b"udta"), None)
    if udta is None:
        new_udta = _sized_box(b"udta", _sized_box(b"XMP_", padded))
        return _sized_box(b"moov", data[moov.header:] + new_udta, moov.header)
    udta_children, stop = parse_boxes(BytesSource(data), udta.body, udta.end, "udta child")
    old = next((c for c in udta_children if c.type == b"XMP_"), None)
    if old is not None:
        body = fit_packet(packet, old.size - old.header) or padded
        new_xmp = _sized_box(b"XMP_", body, old.header)
        udta_body = data[udta.body : old.offset] + new_xmp + data[old.end : udta.end]
    else:
        # Before a QuickTime zero terminator, if there is one.
        udta_body = data[udta.body : stop] + _sized_box(b"XMP_", padded) + data[stop : udta.end]
    new_udta = _sized_box(b"udta", udta_body, udta.header)
    return _sized_box(b"moov", data[moov.header : udta.offset] + new_udta + data[udta.end :], moov.header)


def _assemble(src: ByteSource, layout: Layout, items: list[_Item], moov_index: int, new_moov: bytes | None, *,
              trailing_new: bytes | None = None, fixed_last: tuple[Box, bytes] | None = None) -> Rewrite:
    """Lay the items out, move chunk offsets where media moved, and check the result."""
    moves: list[tuple[int, int, int]] = []  # (old offset, new offset, length) of copied boxes
    pos = 0
    for item in items:
        if item.old is not None:
            moves.append((item.old.offset, pos, item.old.size))
        pos += item.size
    if fixed_last is not None:
        last, head = fixed_last
        moves.append((last.offset + 8, pos + 8, last.size - 8))
        pos += last.size
    moved = any(old != new for old, new, _ in moves)
    moov_data = new_moov if new_moov is not None else layout.moov_data
    old_tables = chunk_offsets(layout.moov_data)
    if moved:
        fragmented = any(b.type == b"mvex" for b in _all_boxes(moov_data))
        if fragmented or any(b.type in _OFFSET_HOLDERS for b in layout.boxes):
            raise EmbedNotSafe("the video is fragmented and its media would move")
        if _has_item_locations(moov_data):
            raise EmbedNotSafe("the video's moov holds item locations and its media would move")

        def move(offset: int) -> int:
            for old, new, length in moves:
                if old <= offset < old + length:
                    return offset - old + new
            raise EmbedNotSafe("a chunk offset points outside the boxes that are copied")

        moov_data = _patch_offsets(moov_data, move)
        new_tables = chunk_offsets(moov_data)
        if [[move(o) for o in t] for t in old_tables] != new_tables:
            raise CorruptError("internal check failed: chunk offsets do not follow their data")
    elif new_moov is not None and chunk_offsets(new_moov) != old_tables:
        raise CorruptError("internal check failed: chunk offsets changed")
    parts: list[bytes | tuple[int, int]] = []
    for i, item in enumerate(items):
        if i == moov_index and item.old is None:
            parts.append(moov_data)
        elif item.old is not None:
            if i == moov_index and moved:
                parts.append(moov_data)
                continue
            parts.append((item.old.offset, item.old.size))
        else:
            parts.append(item.data)
    if fixed_last is not None:
        last, head = fixed_last
        parts.append(head)
        parts.append((last.offset + 8, last.size - 8))
    if trailing_new is not None:
        parts.append(trailing_new)
    if layout.end < src.size:
        tail = src.read_at(layout.end, src.size - layout.end)
        parts.append(tail)
    return Rewrite(tuple(p for p in parts if not isinstance(p, bytes) or p), moved, moov_data, tuple(moves))


class SplicedSource:
    """A ByteSource over a :class:`Rewrite`'s parts, reading the copied ranges from the original ``src``: the new
    file as it will be, without writing it."""

    def __init__(self, parts: tuple[bytes | tuple[int, int], ...], src: ByteSource) -> None:
        self._src = src
        self._spans: list[tuple[int, bytes | tuple[int, int]]] = []
        pos = 0
        for part in parts:
            self._spans.append((pos, part))
            pos += part[1] if isinstance(part, tuple) else len(part)
        self._size = pos

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            return b""
        out = bytearray()
        end = min(offset + size, self._size)
        for start, part in self._spans:
            length = part[1] if isinstance(part, tuple) else len(part)
            lo, hi = max(offset, start), min(end, start + length)
            if lo >= hi:
                continue
            if isinstance(part, tuple):
                out += self._src.read_at(part[0] + lo - start, hi - lo)
            else:
                out += part[lo - start : hi - start]
        return bytes(out)
