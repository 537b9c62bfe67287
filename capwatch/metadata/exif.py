"""EXIF/TIFF: read the tags capwatch cares about, and patch IFD0 text tags without re-dumping anything else.

The patcher never moves existing data: MakerNotes (whose internal offsets are often absolute and undocumented),
thumbnails and sub-IFDs stay exactly where they are. A changed value is written in place when it fits, over our own
earlier value when that sits at the end of the block, or appended; a new tag is added by writing a new, sorted copy
of IFD0 at the end and pointing the header at it (the old IFD0 becomes unused bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from capwatch.metadata.binary import ByteSource, BytesSource, CorruptError, read_exact, u16, u32

TAG_IMAGE_DESCRIPTION = 0x010E
TAG_MAKE = 0x010F
TAG_MODEL = 0x0110
TAG_SOFTWARE = 0x0131
TAG_IMAGE_WIDTH = 0x0100
TAG_IMAGE_LENGTH = 0x0101
TAG_XMP = 0x02BC
TAG_IPTC = 0x83BB
TAG_PHOTOSHOP = 0x8649
TAG_EXIF_IFD = 0x8769
TAG_SUB_IFDS = 0x014A
TAG_DATE_TIME_ORIGINAL = 0x9003
TAG_CREATE_DATE = 0x9004
TAG_PIXEL_X = 0xA002
TAG_PIXEL_Y = 0xA003
TAG_XP_COMMENT = 0x9C9C

TYPE_BYTE = 1
TYPE_ASCII = 2
TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
TIFF_MAGICS = frozenset({42, 0x4F52, 0x5352, 0x55})  # TIFF, Olympus ORF (RO/RS), Panasonic RW2
MAX_ENTRIES = 1000


@dataclass(frozen=True)
class Entry:
    """One IFD entry; ``value_pos`` is where its value bytes start (inline field or pointed-to data)."""

    tag: int
    type: int
    count: int
    entry_pos: int
    value_pos: int

    @property
    def value_size(self) -> int:
        return TYPE_SIZES.get(self.type, 1) * self.count


@dataclass(frozen=True)
class TiffInfo:
    """Tags read from one TIFF structure (an EXIF block or a TIFF/RAW file). Text tags are raw bytes, NUL-trimmed."""

    order: str
    image_description: bytes | None = None
    make: bytes | None = None
    model: bytes | None = None
    software: bytes | None = None
    date_time_original: bytes | None = None
    create_date: bytes | None = None
    xp_comment: bytes | None = None
    xmp: bytes | None = None
    iptc: bytes | None = None
    photoshop: bytes | None = None
    width: int | None = None
    height: int | None = None
    dimensions: list[tuple[int, int]] = field(default_factory=list)
    #: Apple's ContentIdentifier (MakerNote tag 0x0011): the same UUID as the Live Photo's MOV carries.
    content_identifier: str | None = None
    #: Tags that are present but were not read (a value past the end of the data or over a size cap).
    unread: tuple[str, ...] = ()


def _header(src: ByteSource) -> tuple[str, int]:
    head = read_exact(src, 0, 8, "TIFF header")
    if head[:2] == b"II":
        order = "<"
    elif head[:2] == b"MM":
        order = ">"
    else:
        raise CorruptError("not a TIFF/EXIF block (bad byte order mark)")
    if u16(head, 2, order) not in TIFF_MAGICS:
        raise CorruptError("not a TIFF/EXIF block (bad magic number)")
    return order, u32(head, 4, order)


def read_ifd(src: ByteSource, offset: int, order: str) -> tuple[list[Entry], int]:
    """Return the entries of the IFD at ``offset`` and the offset of the next IFD (0 = none).

    Raises CorruptError when the IFD lies outside the data or claims an absurd number of entries.
    """
    if offset < 8 or offset + 2 > src.size:
        raise CorruptError(f"IFD offset {offset} outside the TIFF data")
    count = u16(read_exact(src, offset, 2, "IFD"), 0, order)
    if count > MAX_ENTRIES:
        raise CorruptError(f"IFD at {offset} claims {count} entries")
    raw = read_exact(src, offset + 2, count * 12 + 4, "IFD")
    entries = []
    for i in range(count):
        pos = i * 12
        tag, typ, n = struct.unpack_from(order + "HHI", raw, pos)
        size = TYPE_SIZES.get(typ, 1) * n
        entry_pos = offset + 2 + pos
        value_pos = entry_pos + 8 if size <= 4 else u32(raw, pos + 8, order)
        entries.append(Entry(tag, typ, n, entry_pos, value_pos))
    return entries, u32(raw, count * 12, order)


def _value(src: ByteSource, entry: Entry, limit: int = 1 << 24) -> bytes | None:
    size = entry.value_size
    if size > limit or entry.value_pos + size > src.size:
        return None
    return src.read_at(entry.value_pos, size)


def _text(src: ByteSource, entry: Entry | None) -> bytes | None:
    if entry is None:
        return None
    value = _value(src, entry, 1 << 20)
    return None if value is None else value.rstrip(b"\x00")


def _int(src: ByteSource, entry: Entry | None, order: str) -> int | None:
    if entry is None or entry.count < 1:
        return None
    if entry.type == 3:
        return u16(src.read_at(entry.value_pos, 2).ljust(2, b"\x00"), 0, order)
    if entry.type == 4:
        return u32(src.read_at(entry.value_pos, 4).ljust(4, b"\x00"), 0, order)
    return None


def _offsets(src: ByteSource, entry: Entry | None, order: str) -> list[int]:
    if entry is None or entry.type not in (4, 13) or entry.count > 64:
        return []
    data = src.read_at(entry.value_pos, 4 * entry.count)
    return [u32(data, 4 * i, order) for i in range(len(data) // 4)]


TAG_MAKER_NOTE = 0x927C
_APPLE_MAKER = b"Apple iOS\x00"


def apple_content_identifier(note: bytes) -> str | None:
    """Tag 0x0011 (ContentIdentifier) of an Apple iOS MakerNote: "Apple iOS" NUL, version, "MM", then an IFD
    whose offsets count from the note's start. None for any other or a damaged note. Never raises."""
    if not note.startswith(_APPLE_MAKER) or note[12:14] != b"MM":
        return None
    try:
        entries, _next = read_ifd(BytesSource(note), 14, ">")
    except CorruptError:
        return None
    for entry in entries:
        if entry.tag == 0x0011 and entry.type == 2:
            value = note[entry.value_pos : entry.value_pos + entry.count].split(b"\x00")[0]
            return value.decode("ascii", errors="replace") or None
    return None


def read_tiff(src: ByteSource) -> TiffInfo:
    """Read IFD0, the EXIF sub-IFD and (for dimensions) SubIFDs of a TIFF structure at offset 0 of ``src``.

    Raises CorruptError when the header or IFD0 is unreadable; damaged sub-IFDs are ignored.
    """
    order, ifd0_offset = _header(src)
    entries, _next = read_ifd(src, ifd0_offset, order)
    by_tag = {e.tag: e for e in entries}
    exif: dict[int, Entry] = {}
    for off in _offsets(src, by_tag.get(TAG_EXIF_IFD), order)[:1]:
        try:
            exif = {e.tag: e for e in read_ifd(src, off, order)[0]}
        except CorruptError:
            exif = {}
    dims: list[tuple[int, int]] = []
    w, h = _int(src, by_tag.get(TAG_IMAGE_WIDTH), order), _int(src, by_tag.get(TAG_IMAGE_LENGTH), order)
    if w and h:
        dims.append((w, h))
    for off in _offsets(src, by_tag.get(TAG_SUB_IFDS), order)[:8]:
        try:
            sub = {e.tag: e for e in read_ifd(src, off, order)[0]}
        except CorruptError:
            continue
        sw, sh = _int(src, sub.get(TAG_IMAGE_WIDTH), order), _int(src, sub.get(TAG_IMAGE_LENGTH), order)
        if sw and sh:
            dims.append((sw, sh))
    px, py = _int(src, exif.get(TAG_PIXEL_X), order), _int(src, exif.get(TAG_PIXEL_Y), order)
    width, height = (px, py) if px and py else max(dims, key=lambda d: d[0] * d[1], default=(None, None))

    unread: list[str] = []

    def blob(tag: int, name: str, limit: int = 1 << 24) -> bytes | None:
        entry = by_tag.get(tag)
        value = None if entry is None else _value(src, entry, limit)
        if entry is not None and value is None:
            unread.append(f"{name} ({entry.value_size} bytes)")
        return value

    description = blob(TAG_IMAGE_DESCRIPTION, "EXIF ImageDescription", 1 << 20)
    maker = exif.get(TAG_MAKER_NOTE)
    maker_note = _value(src, maker, 1 << 20) if maker is not None else None
    return TiffInfo(
        content_identifier=apple_content_identifier(maker_note) if maker_note else None,
        order=order,
        image_description=None if description is None else description.rstrip(b"\x00"),
        make=_text(src, by_tag.get(TAG_MAKE)),
        model=_text(src, by_tag.get(TAG_MODEL)),
        software=_text(src, by_tag.get(TAG_SOFTWARE)),
        date_time_original=_text(src, exif.get(TAG_DATE_TIME_ORIGINAL)),
        create_date=_text(src, exif.get(TAG_CREATE_DATE)),
        xp_comment=blob(TAG_XP_COMMENT, "EXIF XPComment", 1 << 20),
        xmp=blob(TAG_XMP, "TIFF XMP"),
        iptc=blob(TAG_IPTC, "TIFF IPTC"),
        photoshop=blob(TAG_PHOTOSHOP, "TIFF Photoshop resources"),
        width=width,
        height=height,
        dimensions=dims,
        unread=tuple(unread),
    )


def decode_text(raw: bytes) -> str:
    """EXIF ASCII text as str: UTF-8 (what MWG recommends and capwatch writes), else Latin-1 (never fails)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def decode_xp(raw: bytes) -> str:
    """A Windows XP* tag (UTF-16LE, NUL-terminated) as str; undecodable pairs are replaced."""
    return raw.decode("utf-16-le", errors="replace").rstrip("\x00")


def encode_xp(text: str) -> bytes:
    """``text`` as a Windows XP* tag value: UTF-16LE with a terminating NUL."""
    return text.encode("utf-16-le") + b"\x00\x00"


def exif_date_to_iso(raw: bytes | None) -> str | None:
    """'YYYY:MM:DD HH:MM:SS' (EXIF) as 'YYYY-MM-DDTHH:MM:SS'; None for blank, zero or malformed dates."""
    if not raw:
        return None
    text = raw.decode("ascii", errors="replace").strip()
    if len(text) < 19:
        return None
    date, time = text[:10], text[11:19]
    parts = date.split(":") + time.split(":")
    if len(parts) != 6 or not all(p.isdigit() for p in parts):
        return None
    y, mo, d, hh, mm, ss = (int(p) for p in parts)
    if y == 0 or not (1 <= mo <= 12 and 1 <= d <= 31 and hh <= 24 and mm < 60 and ss <= 60):
        return None
    return f"{y:04d}-{mo:02d}-{d:02d}T{hh:02d}:{mm:02d}:{ss:02d}"


def new_tiff(order: str = "<") -> bytes:
    """A minimal TIFF structure (EXIF block) with an empty IFD0."""
    return (b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, 8) + struct.pack(order + "HI", 0, 0)


def set_ifd0_tags(tiff: bytes, values: dict[int, tuple[int, bytes]]) -> bytes:
    """Return ``tiff`` with IFD0 tags set to ``values`` (tag -> (TIFF type, value bytes)); nothing else moves.

    Raises CorruptError when the structure cannot be parsed.
    """
    src = BytesSource(tiff)
    order, ifd0_offset = _header(src)
    entries, next_ifd = read_ifd(src, ifd0_offset, order)
    existing = {e.tag: e for e in entries}
    out = bytearray(tiff)
    if all(tag in existing for tag in values):
        for tag, (typ, data) in sorted(values.items()):
            _patch_entry(out, existing[tag], typ, data, order)
        return bytes(out)
    # Add the missing tags: write a new sorted IFD0 (+ values of new tags) at the end.
    if len(out) % 2:
        out += b"\x00"
    new_ifd_offset = len(out)
    merged: dict[int, tuple[int, int, bytes]] = {}
    for e in entries:
        merged[e.tag] = (e.type, e.count, tiff[e.entry_pos + 8 : e.entry_pos + 12])
    ifd_size = 2 + 12 * len(set(merged) | set(values)) + 4
    data_pos = new_ifd_offset + ifd_size
    extra = bytearray()
    for tag, (typ, data) in values.items():
        if tag in existing:
            continue
        count = len(data) // TYPE_SIZES[typ]
        if len(data) <= 4:
            merged[tag] = (typ, count, data.ljust(4, b"\x00"))
        else:
            merged[tag] = (typ, count, struct.pack(order + "I", data_pos + len(extra)))
            extra += data
            if len(extra) % 2:
                extra += b"\x00"
    ifd = bytearray(struct.pack(order + "H", len(merged)))
    for tag in sorted(merged):
        typ, count, field4 = merged[tag]
        ifd += struct.pack(order + "HHI", tag, typ, count) + field4
    ifd += struct.pack(order + "I", next_ifd)
    out += ifd + extra
    struct.pack_into(order + "I", out, 4, new_ifd_offset)
    # Existing tags that also change are patched in the new copy of IFD0.
    changed = {tag: v for tag, v in values.items() if tag in existing}
    if changed:
        return set_ifd0_tags(bytes(out), changed)
    return bytes(out)


def _patch_entry(out: bytearray, entry: Entry, typ: int, data: bytes, order: str) -> None:
    count = len(data) // TYPE_SIZES[typ]
    old_size = entry.value_size
    if len(data) <= 4:
        field4 = data.ljust(4, b"\x00")
        if old_size > 4 and entry.value_pos + old_size <= len(out):
            out[entry.value_pos : entry.value_pos + old_size] = bytes(old_size)
        struct.pack_into(order + "HI", out, entry.entry_pos + 2, typ, count)
        out[entry.entry_pos + 8 : entry.entry_pos + 12] = field4
        return
    if old_size > 4 and entry.value_pos + old_size == len(out):
        # Our own earlier value at the end of the block: reuse the tail instead of growing every time.
        del out[entry.value_pos :]
        pos = entry.value_pos
        out += data
    elif old_size > 4 and len(data) <= old_size and entry.value_pos + old_size <= len(out):
        pos = entry.value_pos
        out[pos : pos + old_size] = data + bytes(old_size - len(data))
    else:
        if len(out) % 2:
            out += b"\x00"
        pos = len(out)
        out += data
    struct.pack_into(order + "HII", out, entry.entry_pos + 2, typ, count, pos)
