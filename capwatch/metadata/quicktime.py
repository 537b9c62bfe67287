"""QuickTime tags inside a ``moov`` box (read-only): a person's description, the capture date, the frame size.

Descriptions: ``udta/©des`` (QuickTime international text), ``udta/dscp`` (3GPP, exiftool's UserData:Description),
``udta/meta/ilst/©des`` or ``desc`` (iTunes-style, what ffmpeg writes into MP4) and ``meta/keys`` + ``ilst``
``com.apple.quicktime.description`` (what iPhones and Photos write). Dates: ``com.apple.quicktime.creationdate``
(local time with its offset), else ``mvhd`` creation time (UTC by the specification, which is how exiftool shows
it). Size: the first video track's sample description.
"""

from __future__ import annotations

import datetime
import re
import struct
from dataclasses import dataclass

from capwatch.metadata.binary import CorruptError

_EPOCH_1904 = datetime.datetime(1904, 1, 1)
_DESCRIPTION_KEYS = ("com.apple.quicktime.description",)
_DATE_KEYS = ("com.apple.quicktime.creationdate",)
CONTENT_IDENTIFIER_KEY = "com.apple.quicktime.content.identifier"


@dataclass(frozen=True)
class QuickTimeTags:
    """A video's QuickTime tags capwatch uses (None: absent)."""

    description: str | None = None
    #: Local 'YYYY-MM-DDTHH:MM:SS'.
    taken_at: str | None = None
    width: int | None = None
    height: int | None = None
    #: The QuickTime content identifier that pairs a Live Photo's MOV with its still (Keys, Apple).
    content_identifier: str | None = None
    duration: float | None = None


@dataclass(frozen=True)
class _B:
    type: bytes
    start: int  # of the body
    end: int


def _boxes(data: bytes, start: int, end: int) -> list[_B]:
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
            if btype == b"\x00\x00\x00\x00":
                break
            size = end - pos
        if size < header or pos + size > end:
            break
        out.append(_B(btype, pos + header, pos + size))
        pos += size
    return out


def _meta_start(data: bytes, box: _B) -> int:
    return box.start if data[box.start + 4 : box.start + 8] == b"hdlr" else box.start + 4


def _data_value(data: bytes, item: _B) -> str | None:
    """The text of an ilst item's first ``data`` box (well-known types UTF-8 and UTF-16)."""
    for child in _boxes(data, item.start, item.end):
        if child.type != b"data" or child.end - child.start < 8:
            continue
        kind = struct.unpack_from(">I", data, child.start)[0] & 0xFFFFFF
        raw = data[child.start + 8 : child.end]
        if kind == 1:
            return raw.decode("utf-8", errors="replace")
        if kind == 2:
            return raw.decode("utf-16-be", errors="replace")
        return None
    return None


def _intl_text(raw: bytes) -> str | None:
    """QuickTime international text (size, language, text), or a bare ``data`` box inside the item."""
    if raw[4:8] == b"data":
        return _data_value(raw, _B(b"", 0, len(raw)))
    if len(raw) >= 4:
        size = struct.unpack_from(">H", raw, 0)[0]
        return raw[4 : 4 + size].decode("utf-8", errors="replace")
    return None


def _3gpp_text(raw: bytes) -> str | None:
    """A 3GPP asset string (``udta/dscp``, what exiftool writes as UserData:Description): version and flags,
    language, then UTF-8 or (with a byte-order mark) UTF-16, NUL-terminated."""
    text = raw[6:]
    if text.startswith(b"\xfe\xff"):
        return text[2:].decode("utf-16-be", errors="replace").split("\x00")[0]
    return text.split(b"\x00")[0].decode("utf-8", errors="replace")


def _keys_values(data: bytes, meta: _B) -> dict[str, str]:
    children = _boxes(data, _meta_start(data, meta), meta.end)
    keys: list[str] = []
    values: dict[str, str] = {}
    for child in children:
        if child.type == b"keys" and child.end - child.start >= 8:
            pos = child.start + 8
            while pos + 8 <= child.end:
                size = struct.unpack_from(">I", data, pos)[0]
                if size < 8 or pos + size > child.end:
                    break
                keys.append(data[pos + 8 : pos + size].decode("utf-8", errors="replace"))
                pos += size
    for child in children:
        if child.type != b"ilst":
            continue
        for item in _boxes(data, child.start, child.end):
            index = struct.unpack(">I", item.type)[0]
            if keys and 1 <= index <= len(keys):
                value = _data_value(data, item)
                if value is not None:
                    values.setdefault(keys[index - 1], value)
            else:
                value = _data_value(data, item)
                if value is not None:
                    values.setdefault(item.type.decode("latin-1"), value)
    return values


_KEYS_DATE = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)")


def read_tags(moov: bytes) -> QuickTimeTags:
    """The tags of a whole ``moov`` box (header included). Never raises for damaged tags: they read as absent."""
    tops = _boxes(moov, 0, len(moov))
    if not tops or tops[0].type != b"moov":
        raise CorruptError("not a moov box")
    description: str | None = None
    taken_at: str | None = None
    content_id: str | None = None
    mvhd_date: str | None = None
    duration: float | None = None
    width = height = None
    keyed: dict[str, str] = {}
    for box in _boxes(moov, tops[0].start, tops[0].end):
        if box.type == b"mvhd" and box.end - box.start >= 20:
            version = moov[box.start]
            if version == 1 and box.end - box.start >= 32:
                created, scale, length = struct.unpack_from(">QxxxxxxxxIQ", moov, box.start + 4)
            else:
                created, scale, length = struct.unpack_from(">IxxxxII", moov, box.start + 4)
            if created:
                try:
                    mvhd_date = (_EPOCH_1904 + datetime.timedelta(seconds=created)).strftime("%Y-%m-%dT%H:%M:%S")
                except OverflowError:
                    mvhd_date = None
            if scale:
                duration = length / scale
        elif box.type == b"udta":
            for item in _boxes(moov, box.start, box.end):
                if item.type == b"\xa9des" and description is None:
                    description = _intl_text(moov[item.start : item.end])
                elif item.type == b"dscp" and description is None:
                    description = _3gpp_text(moov[item.start : item.end])
                elif item.type == b"meta":
                    # iTunes-style items, or Apple's Keys (ffmpeg writes them here with use_metadata_tags)
                    for key, value in _keys_values(moov, item).items():
                        keyed.setdefault(key, value)
        elif box.type == b"meta":
            for key, value in _keys_values(moov, box).items():
                keyed[key] = value  # moov/meta (where iPhones write) wins over a copy in udta
        elif box.type == b"trak" and width is None:
            width, height = _video_size(moov, box)
    for key in _DESCRIPTION_KEYS:
        if keyed.get(key):
            description = keyed[key]  # Apple's Keys win over udta text
    if description is None:
        description = keyed.get("\xa9des") or keyed.get("desc") or None
    for key in _DATE_KEYS:
        match = _KEYS_DATE.match(keyed.get(key, ""))
        if match:
            taken_at = "{}-{}-{}T{}:{}:{}".format(*match.groups())
    content_id = keyed.get(CONTENT_IDENTIFIER_KEY) or None
    return QuickTimeTags(description, taken_at or mvhd_date, width, height, content_id, duration)


def _video_size(data: bytes, trak: _B) -> tuple[int | None, int | None]:
    mdia = next((b for b in _boxes(data, trak.start, trak.end) if b.type == b"mdia"), None)
    if mdia is None:
        return None, None
    children = _boxes(data, mdia.start, mdia.end)
    hdlr = next((b for b in children if b.type == b"hdlr"), None)
    if hdlr is None or data[hdlr.start + 8 : hdlr.start + 12] != b"vide":
        return None, None
    for minf in (b for b in children if b.type == b"minf"):
        for stbl in (b for b in _boxes(data, minf.start, minf.end) if b.type == b"stbl"):
            for stsd in (b for b in _boxes(data, stbl.start, stbl.end) if b.type == b"stsd"):
                entries = _boxes(data, stsd.start + 8, stsd.end)
                if entries and entries[0].end - entries[0].start >= 28:
                    w, h = struct.unpack_from(">HH", data, entries[0].start + 24)
                    return w or None, h or None
    return None, None

