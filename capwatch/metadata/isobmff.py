"""HEIF/AVIF (ISO base media file format): find the Exif and XMP items and the image size, reading only the
``meta`` box. Read-only: capwatch writes sidecars for these containers."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from capwatch.metadata.binary import ByteSource, CorruptError, read_exact

MAX_META = 4 << 20
MAX_ITEM = 4 << 20


@dataclass(frozen=True)
class HeifMetadata:
    exif: bytes | None  # TIFF structure
    xmp: bytes | None
    width: int | None
    height: int | None
    #: Metadata items present but not read (over MAX_ITEM).
    unread: tuple[str, ...] = ()


def _boxes(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of the boxes in ``data[start:end]``."""
    out, pos = [], start
    while pos + 8 <= end:
        size, btype = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            if pos + 16 > end:
                break
            size = struct.unpack_from(">Q", data, pos + 8)[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            break
        out.append((btype, pos + header, pos + size))
        pos += size
    return out


def _uint(data: bytes, pos: int, size: int) -> int:
    return int.from_bytes(data[pos : pos + size], "big") if size else 0


def read_heif(src: ByteSource) -> HeifMetadata:
    """Exif/XMP items and the largest ``ispe`` size from the top-level ``meta`` box. Raises CorruptError."""
    pos, meta = 0, None
    while pos + 8 <= src.size:
        size, btype = struct.unpack(">I4s", read_exact(src, pos, 8, "HEIF box"))
        header = 8
        if size == 1:
            size = struct.unpack(">Q", read_exact(src, pos + 8, 8, "HEIF box"))[0]
            header = 16
        elif size == 0:
            size = src.size - pos
        if size < header:
            raise CorruptError("malformed HEIF box")
        if btype == b"meta":
            if size > MAX_META:
                raise CorruptError("HEIF meta box too large")
            meta = read_exact(src, pos + header, size - header, "HEIF meta box")
            break
        pos += size
    if meta is None:
        raise CorruptError("HEIF file without a meta box")
    children = _boxes(meta, 4, len(meta))  # meta is a full box: skip version/flags
    types: dict[int, str] = {}
    locations: dict[int, list[tuple[int, int]]] = {}
    dims: list[tuple[int, int]] = []
    for btype, start, end in children:
        if btype == b"iinf":
            version = meta[start]
            first = start + 4 + (2 if version == 0 else 4)
            for itype, s, _e in _boxes(meta, first, end):
                if itype != b"infe" or meta[s] < 2:
                    continue
                v = meta[s]
                p = s + 4
                item_id = _uint(meta, p, 2 if v == 2 else 4)
                p += (2 if v == 2 else 4) + 2
                kind = meta[p : p + 4]
                if kind == b"mime":
                    name_end = meta.index(b"\x00", p + 4)
                    ctype_end = meta.find(b"\x00", name_end + 1)
                    ctype = meta[name_end + 1 : ctype_end if ctype_end >= 0 else _e]
                    if ctype == b"application/rdf+xml":
                        types[item_id] = "xmp"
                elif kind == b"Exif":
                    types[item_id] = "exif"
        elif btype == b"iloc":
            locations = _iloc(meta, start, end)
        elif btype == b"iprp":
            for ptype, s, e in _boxes(meta, start, end):
                if ptype == b"ipco":
                    for qtype, qs, _qe in _boxes(meta, s, e):
                        if qtype == b"ispe" and qs + 12 <= len(meta):
                            dims.append(struct.unpack_from(">II", meta, qs + 4))
    exif = xmp = None
    unread: list[str] = []
    for item_id, item_kind in types.items():
        extents = locations.get(item_id)
        if not extents:
            # Stored inside the meta box (idat) or by reference: capwatch does not read those.
            unread.append(f"HEIF {item_kind.upper()} item stored where capwatch does not read it")
            continue
        if sum(length for _, length in extents) > MAX_ITEM:
            unread.append(f"HEIF {item_kind.upper()} item over {MAX_ITEM >> 20} MiB")
            continue
        blob = b"".join(src.read_at(off, length) for off, length in extents)
        if item_kind == "exif" and len(blob) > 4:
            skip = struct.unpack(">I", blob[:4])[0]
            tiff = blob[4 + skip :]
            exif = tiff[6:] if tiff.startswith(b"Exif\x00\x00") else tiff
        elif item_kind == "xmp":
            xmp = blob
    width, height = max(dims, key=lambda d: d[0] * d[1], default=(None, None))
    return HeifMetadata(exif, xmp, width, height, tuple(unread))


def _iloc(meta: bytes, start: int, end: int) -> dict[int, list[tuple[int, int]]]:
    version = meta[start]
    p = start + 4
    offset_size, length_size = meta[p] >> 4, meta[p] & 15
    base_size, index_size = meta[p + 1] >> 4, (meta[p + 1] & 15) if version in (1, 2) else 0
    p += 2
    count = _uint(meta, p, 2 if version < 2 else 4)
    p += 2 if version < 2 else 4
    out: dict[int, list[tuple[int, int]]] = {}
    for _ in range(count):
        if p >= end:
            break
        item_id = _uint(meta, p, 2 if version < 2 else 4)
        p += 2 if version < 2 else 4
        method = 0
        if version in (1, 2):
            method = _uint(meta, p, 2) & 15
            p += 2
        p += 2  # data_reference_index
        base = _uint(meta, p, base_size)
        p += base_size
        n = _uint(meta, p, 2)
        p += 2
        extents = []
        for _e in range(n):
            p += index_size
            off = _uint(meta, p, offset_size)
            p += offset_size
            length = _uint(meta, p, length_size)
            p += length_size
            extents.append((base + off, length))
        if method == 0:  # file offsets; idat/item references are not used for Exif/XMP in practice
            out[item_id] = extents
    return out
