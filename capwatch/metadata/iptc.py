"""IPTC IIM inside a Photoshop image resource block (IRB): read Caption-Abstract and Keywords, rewrite them as UTF-8.

Only the 2:120 dataset, capwatch's own 2:25 Keywords (merged as ``capwatch.metadata.keywords`` says) and the 1:90
CodedCharacterSet change (other text datasets are transcoded to UTF-8 when
the block was not UTF-8 before, so 1:90 stays truthful); the Photoshop IPTC digest (resource 0x0425) is updated so
MWG readers (exiftool, Lightroom) treat the IPTC as in sync with XMP. Every other resource is kept, in order.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from capwatch.metadata import keywords as kw
from capwatch.metadata.binary import CorruptError

PHOTOSHOP_SIGNATURE = b"Photoshop 3.0\x00"
RESOURCE_IPTC = 0x0404
RESOURCE_DIGEST = 0x0425
UTF8_ESCAPE = b"\x1b%G"
CAPTION_LIMIT = 2000
_IRB_TYPES = (b"8BIM", b"PHUT", b"AgHg", b"DCSR")
#: Record-2 datasets that are binary, not text (record version, rasterized caption, preview data).
_BINARY_DATASETS = frozenset({0, 125, 200, 201, 202})


@dataclass(frozen=True)
class Resource:
    """One Photoshop image resource: signature, id, raw Pascal name field (with padding) and data."""

    signature: bytes
    rid: int
    name_field: bytes
    data: bytes


def parse_irb(data: bytes) -> list[Resource]:
    """Split a Photoshop IRB (without the 'Photoshop 3.0' header) into resources. Raises CorruptError."""
    pos, out = 0, []
    while pos + 12 <= len(data):
        sig = data[pos : pos + 4]
        if sig not in _IRB_TYPES:
            break  # trailing padding or junk after the last resource: ignored, like Photoshop does
        rid = struct.unpack_from(">H", data, pos + 4)[0]
        name_len = data[pos + 6]
        name_total = (1 + name_len + 1) & ~1
        name_field = data[pos + 6 : pos + 6 + name_total]
        size_pos = pos + 6 + name_total
        if size_pos + 4 > len(data):
            raise CorruptError("truncated Photoshop resource block")
        size = struct.unpack_from(">I", data, size_pos)[0]
        start = size_pos + 4
        if start + size > len(data):
            raise CorruptError("truncated Photoshop resource block")
        out.append(Resource(sig, rid, name_field, data[start : start + size]))
        pos = start + size + (size & 1)
    return out


def build_irb(resources: list[Resource]) -> bytes:
    """Serialise resources back into an IRB (each data block padded to even length)."""
    out = bytearray()
    for r in resources:
        out += r.signature + struct.pack(">H", r.rid) + r.name_field + struct.pack(">I", len(r.data)) + r.data
        if len(r.data) & 1:
            out += b"\x00"
    return bytes(out)


def parse_iim(data: bytes) -> list[tuple[int, int, bytes]]:
    """IIM datasets as (record, dataset, value). Raises CorruptError on a malformed block."""
    pos, out = 0, []
    while pos < len(data):
        if data[pos] != 0x1C:
            if not data[pos:].strip(b"\x00"):
                break  # zero padding at the end
            raise CorruptError("malformed IPTC data (bad tag marker)")
        if pos + 5 > len(data):
            raise CorruptError("truncated IPTC data")
        record, dataset, length = data[pos + 1], data[pos + 2], struct.unpack_from(">H", data, pos + 3)[0]
        pos += 5
        if length & 0x8000:
            n = length & 0x7FFF
            if n > 4 or pos + n > len(data):
                raise CorruptError("malformed IPTC extended length")
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        if pos + length > len(data):
            raise CorruptError("truncated IPTC data")
        out.append((record, dataset, data[pos : pos + length]))
        pos += length
    return out


def build_iim(datasets: list[tuple[int, int, bytes]]) -> bytes:
    """Serialise IIM datasets (extended length for values over 32767 bytes)."""
    out = bytearray()
    for record, dataset, value in datasets:
        if len(value) < 0x8000:
            out += bytes((0x1C, record, dataset)) + struct.pack(">H", len(value)) + value
        else:
            out += bytes((0x1C, record, dataset)) + struct.pack(">HI", 0x8004, len(value)) + value
    return bytes(out)


def is_utf8(datasets: list[tuple[int, int, bytes]]) -> bool:
    """True when 1:90 CodedCharacterSet declares UTF-8."""
    return any(r == 1 and d == 90 and v == UTF8_ESCAPE for r, d, v in datasets)


def decode_value(value: bytes, utf8: bool) -> str:
    """An IIM text value as str: UTF-8 when declared (or valid), else Windows-1252/Latin-1."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        if utf8:
            return value.decode("utf-8", errors="replace")
        try:
            return value.decode("cp1252")
        except UnicodeDecodeError:
            return value.decode("latin-1")


def caption_from_irb(irb: bytes) -> str | None:
    """Caption-Abstract (2:120) from an IRB, or None when there is no IPTC or no caption."""
    for r in parse_irb(irb):
        if r.rid == RESOURCE_IPTC:
            return caption_from_iim(r.data)
    return None


def caption_from_iim(iim: bytes) -> str | None:
    """Caption-Abstract (2:120) from raw IIM data, honouring 1:90."""
    datasets = parse_iim(iim)
    utf8 = is_utf8(datasets)
    for record, dataset, value in datasets:
        if record == 2 and dataset == 120:
            return decode_value(value.rstrip(b"\x00"), utf8)
    return None


def keywords_from_iim(iim: bytes) -> tuple[str, ...]:
    """Keywords (2:25, repeatable) from raw IIM data, honouring 1:90, in order; blanks skipped. Raises
    CorruptError on a malformed block."""
    datasets = parse_iim(iim)
    utf8 = is_utf8(datasets)
    values = (decode_value(v.rstrip(b"\x00"), utf8).strip() for r, d, v in datasets if r == 2 and d == 25)
    return tuple(v for v in values if v)


def keywords_from_irb(irb: bytes) -> tuple[str, ...]:
    """Keywords (2:25) from an IRB; () without IPTC. Raises CorruptError."""
    for r in parse_irb(irb):
        if r.rid == RESOURCE_IPTC:
            return keywords_from_iim(r.data)
    return ()


@dataclass(frozen=True)
class KeywordUpdate:
    """What to do with 2:25: drop the datasets that are capwatch's (``previous_ours``, see ``kw.owned_iptc``) and
    append every keyword of ``subjects`` (the merged dc:subject) that the remaining ones lack."""

    previous_ours: tuple[str, ...]
    subjects: tuple[str, ...]


def _merge_keywords(datasets: list[tuple[int, int, bytes]], update: KeywordUpdate) -> list[tuple[int, int, bytes]]:
    """``datasets`` (already UTF-8) with 2:25 merged per ``update``; a person's datasets stay as they are."""
    positions = [i for i, x in enumerate(datasets) if x[0] == 2 and x[1] == 25]
    values = [datasets[i][2].rstrip(b"\x00").decode("utf-8", errors="replace") for i in positions]
    mine = kw.owned_iptc(values, update.previous_ours)
    dropped = {i for i, ours in zip(positions, mine, strict=True) if ours}
    kept_values = [v for v, ours in zip(values, mine, strict=True) if not ours]
    taken = {kw.key(v) for v in kept_values}
    new: list[tuple[int, int, bytes]] = []
    for subject in update.subjects:
        value = kw.iptc_bytes(subject.strip())
        if value and kw.key(value.decode("utf-8")) not in taken:
            taken.add(kw.key(value.decode("utf-8")))
            new.append((2, 25, value))
    kept_positions = [i for i in positions if i not in dropped]
    if kept_positions:
        insert_at = kept_positions[-1] + 1
    else:
        insert_at = next((i for i, x in enumerate(datasets) if x[0] > 2 or (x[0] == 2 and x[1] > 25)), len(datasets))
    out: list[tuple[int, int, bytes]] = []
    for i, x in enumerate(datasets):
        if i == insert_at:
            out += new
        if i not in dropped:
            out.append(x)
    if insert_at == len(datasets):
        out += new
    return out


def has_iptc(irb: bytes) -> bool:
    """True when the IRB holds an IPTC-NAA resource."""
    return any(r.rid == RESOURCE_IPTC for r in parse_irb(irb))


def truncate_utf8(text: str, limit: int = CAPTION_LIMIT) -> bytes:
    """``text`` as UTF-8, cut to at most ``limit`` bytes on a character boundary."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", errors="ignore").encode("utf-8")


def set_caption_iim(iim: bytes, caption: str, keywords: KeywordUpdate | None = None) -> bytes:
    """Return IIM data with 2:120 = ``caption`` (UTF-8, ≤ 2000 bytes), 2:25 merged per ``keywords`` (None: left
    as they are; each ≤ 64 bytes) and 1:90 = UTF-8. Raises CorruptError."""
    datasets = parse_iim(iim)
    if not is_utf8(datasets):
        # Declaring UTF-8 must not turn existing Latin-1 text into mojibake: transcode the other text datasets.
        datasets = [
            (r, d, decode_value(v, False).encode("utf-8")) if r == 2 and d not in _BINARY_DATASETS else (r, d, v)
            for r, d, v in datasets
        ]
        datasets = [x for x in datasets if not (x[0] == 1 and x[1] == 90)]
        insert_at = next((i for i, x in enumerate(datasets) if x[0] > 1 or (x[0] == 1 and x[1] > 90)), len(datasets))
        datasets.insert(insert_at, (1, 90, UTF8_ESCAPE))
    value = truncate_utf8(caption)
    captions = [i for i, x in enumerate(datasets) if x[0] == 2 and x[1] == 120]
    if captions:
        datasets[captions[0]] = (2, 120, value)
        datasets = [x for i, x in enumerate(datasets) if i not in captions[1:]]
    else:
        insert_at = next(
            (i for i, x in enumerate(datasets) if x[0] > 2 or (x[0] == 2 and x[1] > 120)), len(datasets)
        )
        datasets.insert(insert_at, (2, 120, value))
    if keywords is not None:
        datasets = _merge_keywords(datasets, keywords)
    return build_iim(datasets)


def set_caption_irb(irb: bytes, caption: str, keywords: KeywordUpdate | None = None) -> bytes:
    """Return the IRB with its IPTC caption (and keywords, see ``set_caption_iim``) set and the IPTC digest
    (0x0425) updated or added.

    Raises CorruptError when the IRB or IIM is malformed, ValueError when the IRB holds no IPTC.
    """
    resources = parse_irb(irb)
    index = next((i for i, r in enumerate(resources) if r.rid == RESOURCE_IPTC), None)
    if index is None:
        raise ValueError("no IPTC resource")
    old = resources[index]
    iim = set_caption_iim(old.data, caption, keywords)
    resources[index] = Resource(old.signature, old.rid, old.name_field, iim)
    digest = hashlib.md5(iim, usedforsecurity=False).digest()
    d_index = next((i for i, r in enumerate(resources) if r.rid == RESOURCE_DIGEST), None)
    if d_index is None:
        resources.append(Resource(b"8BIM", RESOURCE_DIGEST, b"\x00\x00", digest))
    else:
        r = resources[d_index]
        resources[d_index] = Resource(r.signature, r.rid, r.name_field, digest)
    return build_irb(resources)


def digest_matches(irb: bytes) -> bool | None:
    """True/False when the IRB carries an IPTC digest that does/does not match its IPTC; None without a digest."""
    resources = parse_irb(irb)
    iptc = next((r for r in resources if r.rid == RESOURCE_IPTC), None)
    digest = next((r for r in resources if r.rid == RESOURCE_DIGEST), None)
    if iptc is None or digest is None:
        return None
    return hashlib.md5(iptc.data, usedforsecurity=False).digest() == digest.data
