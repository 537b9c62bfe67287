"""``write_caption``: put a caption into a file's metadata (and/or XMP sidecars) per ``MetadataConfig``.

What is written (design.md): XMP dc:description x-default + capwatch provenance; EXIF IFD0 ImageDescription as
UTF-8 (and XPComment when ``windows_xp_tags``); IPTC Caption-Abstract only where IPTC already exists. JPEG, PNG and
WebP are edited in place (image data byte-identical, verified before the file is replaced); everything else, and
embedded writes that are not safe (XMP over one JPEG segment, ExtendedXMP, read-only file), go to a sidecar.

Every write is a transaction against the file as it was read (see ``capwatch.metadata.atomic``): the writer reads
the file and its sidecars once (a :class:`FileSnapshot`); when the caller says which snapshot the caption was made
from, any difference means the file changed meanwhile and nothing is written (FileChanged). Whose description the
file holds is decided from that read, at write time; what could not be fully read is never rewritten; and the
result carries a fresh snapshot of the file as it is after the write, which is what an index must record.
"""

from __future__ import annotations

import os
import stat
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from capwatch.config import MetadataConfig
from capwatch.errors import MetadataError
from capwatch.metadata import atomic, exif, iptc, jpeg, png, webp
from capwatch.metadata.binary import BytesSource, CorruptError, FileSource, open_noatime
from capwatch.metadata.identity import FileChanged, same_stat
from capwatch.metadata.journal import Journal
from capwatch.metadata.jpeg import EmbedNotSafe
from capwatch.metadata.reader import MAX_SIDECAR, Embedded, describe, read_embedded, read_snapshot
from capwatch.metadata.records import FileSnapshot, Provenance, SidecarFile, WriteHooks, WriteResult
from capwatch.metadata.sidecar import existing_sidecars, sidecar_candidates
from capwatch.metadata.xmp import XmpError, merge_caption, normalise, parse_xmp, wrap_packet

EMBEDDABLE = frozenset({"jpeg", "png", "webp"})
#: Whitespace padding in embedded XMP so other tools can edit in place (the XMP spec suggests 2 KB).
XMP_PADDING = 2048
NO_HOOKS = WriteHooks()


def write_caption(path: Path, caption: str, provenance: Provenance | None, config: MetadataConfig, *,
                  force: bool = False, expected: FileSnapshot | None = None, journal: Journal | None = None,
                  hooks: WriteHooks = NO_HOOKS) -> WriteResult:
    """Write ``caption`` (NFC-normalised) with ``provenance`` into ``path`` per ``config``.

    ``provenance=None`` writes a person's words (an edit in ``capwatch serve``): no capwatch provenance is written
    and any earlier one is removed, so the caption reads as ``human`` and capwatch never replaces it later.

    ``path`` may be a symlink: the file it points to (or that file's sidecar) is written, the link stays.
    ``expected`` is the snapshot the caption was made from (read before the model ran); ``journal`` registers
    temp files and backups for crash recovery (default: this user's journal).

    Returns what was written, or why nothing was: ``metadata.write = none``; a person's description kept
    (``existing = "keep"`` and not ``force``); the file already carries exactly this caption. Raises FileChanged
    when the file or a sidecar is not the one in ``expected`` or changes during the write (nothing written: read
    it again), and MetadataError (one line) when the file cannot be read or written safely, including when part
    of its metadata could not be fully read; the file is then byte-identical and no temp file remains.
    """
    path = Path(path)
    # Control characters have no place in a caption and are not allowed in XML 1.0 or EXIF ASCII.
    text = normalise("".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in caption))
    text = " ".join(text.split())
    if not text:
        raise MetadataError(f"{path}: refusing to write an empty caption")
    if config.write == "none":
        return WriteResult((), "metadata writing is off (metadata.write = none)")
    snap = read_snapshot(path, known=expected)
    if expected is not None and not snap.same_as(expected):
        raise FileChanged(f"{path}: changed while it was being captioned; nothing written")
    desc = snap.metadata.description
    if desc is not None and desc.kind == "human" and config.existing == "keep" and not force:
        return WriteResult((), f"kept the existing description from {desc.origin} (metadata.existing = keep)", snap)
    if snap.unreadable:
        raise MetadataError(f"{path}: could not fully read {snap.unreadable[0]}; nothing written, so nothing in "
                            "it is lost")
    journal = journal if journal is not None else Journal.default()
    written: list[str] = []
    notes: list[str] = []
    sidecar = config.write in ("sidecar", "both")
    if config.write in ("embedded", "both"):
        if snap.metadata.format not in EMBEDDABLE:
            sidecar = True
        else:
            try:
                written += _write_embedded(snap, text, provenance, config, journal, hooks)
            except EmbedNotSafe as exc:
                notes.append(f"not embedded ({exc})")
                sidecar = True
    if sidecar:
        written += _write_sidecars(snap, text, provenance, journal, hooks)
    if not written:
        return WriteResult((), "unchanged: the file already carries this caption", snap)
    return WriteResult(tuple(dict.fromkeys(written)), None, read_snapshot(path, known=snap))


def _is_read_only(path: Path, st: os.stat_result) -> bool:
    # Mode bits, not only access(): root may write anything, but a file the user made read-only stays untouched.
    return not (st.st_mode & stat.S_IWUSR) or not os.access(path, os.W_OK)


def _write_embedded(snap: FileSnapshot, caption: str, provenance: Provenance | None, config: MetadataConfig,
                    journal: Journal, hooks: WriteHooks) -> list[str]:
    path, fmt = snap.path, snap.metadata.format
    try:
        with open_noatime(path) as f:
            st = os.fstat(f.fileno())
            if not same_stat(st, snap.identity):
                raise FileChanged(f"{path}: changed while it was being captioned; nothing written")
            if _is_read_only(path, st):
                raise EmbedNotSafe("the file is read-only")
            src = FileSource(f, st.st_size)
            try:
                if fmt == "jpeg":
                    # Only the header is read: the scan data is copied kernel-side by the atomic writer.
                    layout = jpeg.parse_layout(src)
                    jpeg.check_complete(src, layout)
                    data = src.read_at(0, jpeg.header_end(src, layout))
                else:
                    data = f.read()
                plan = plan_embedded(data, fmt, caption, provenance, config, file_size=st.st_size)
            except (CorruptError, XmpError) as exc:
                raise MetadataError(f"{path}: {exc}") from None
            if not same_stat(os.fstat(f.fileno()), snap.identity):
                raise FileChanged(f"{path}: changed while it was being read; nothing written")
    except OSError as exc:
        raise MetadataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not plan.changed:
        return []
    atomic.replace_file(path, plan.parts, snap.identity, journal=journal, keep_mtime=config.keep_mtime,
                        before_commit=hooks.before_commit)
    return list(plan.written)


@dataclass(frozen=True)
class Plan:
    """New file content as parts (bytes, and for JPEG a Tail: the original scan data from SOS on)."""

    parts: tuple[atomic.Part, ...]
    written: tuple[str, ...]
    changed: bool


def plan_embedded(data: bytes, fmt: str, caption: str, provenance: Provenance | None, config: MetadataConfig, *,
                  file_size: int) -> Plan:
    """Compute the new file content (pure; nothing is written) and verify it before returning.

    ``data`` is the whole file, except for JPEG where it may end after the first SOS segment header
    (``file_size`` is the size of the whole file). Raises CorruptError / XmpError for malformed input and
    EmbedNotSafe when a sidecar must be used instead.
    """
    emb = read_embedded(fmt, BytesSource(data))
    if emb.has_extended_xmp:
        raise EmbedNotSafe("the file uses ExtendedXMP")
    if emb.xmp is not None and parse_xmp(emb.xmp).has_extended:
        raise EmbedNotSafe("the XMP refers to ExtendedXMP")
    written = ["exif", "xmp"]
    tiff_block = emb.exif_block
    values: dict[int, tuple[int, bytes]] = {
        exif.TAG_IMAGE_DESCRIPTION: (exif.TYPE_ASCII, caption.encode("utf-8") + b"\x00")
    }
    if config.windows_xp_tags:
        values[exif.TAG_XP_COMMENT] = (exif.TYPE_BYTE, exif.encode_xp(caption))
    if tiff_block is None:
        tiff_block = exif.new_tiff()
        if fmt == "jpeg":
            # A new JPEG IFD0 needs the tags EXIF marks mandatory (exiftool -validate checks them); take the
            # resolution from JFIF like exiftool does, so no information is invented.
            values.update(_mandatory_jpeg_ifd0(data))
    new_tiff = exif.set_ifd0_tags(tiff_block, values)
    xml = merge_caption(emb.xmp, caption, provenance)
    packet = wrap_packet(xml, XMP_PADDING)
    if fmt == "jpeg":
        if len(packet) > jpeg.MAX_XMP_PACKET:
            packet = wrap_packet(xml, 0)
        if len(packet) > jpeg.MAX_XMP_PACKET:
            raise EmbedNotSafe(f"XMP of {len(packet)} bytes is larger than one JPEG segment")
        irb = None
        if emb.irb is not None and iptc.has_iptc(emb.irb):
            irb = iptc.set_caption_irb(emb.irb, caption)
            written.append("iptc")
        sos = jpeg.parse_layout(BytesSource(data)).sos_offset
        head = jpeg.rebuild_head(data, new_tiff, packet, irb)
        # new header + the original SOS header
        _verify_metadata(head + data[sos:], fmt, caption, ours=provenance is not None)
        parts: tuple[atomic.Part, ...] = (head, atomic.Tail(sos, file_size - sos))
        return Plan(parts, tuple(written), head != data[:sos])
    if fmt == "png":
        new = png.rebuild(data, new_tiff, packet)
    elif fmt == "webp":
        new = webp.rebuild(data, new_tiff, packet)
    else:
        raise EmbedNotSafe(f"cannot embed into {fmt}")
    if image_data(data, fmt) != image_data(new, fmt):
        raise CorruptError("internal check failed: image data would change")
    _verify_metadata(new, fmt, caption, ours=provenance is not None)
    return Plan((new,), tuple(written), new != data)


def _mandatory_jpeg_ifd0(data: bytes) -> dict[int, tuple[int, bytes]]:
    units, xd, yd = 1, 72, 72  # EXIF defaults: 72 dpi, inches
    unit_code = 2
    layout = jpeg.parse_layout(BytesSource(data))
    app0 = next((s for s in layout.segments if s.marker == 0xE0), None)
    if app0 is not None:
        body = data[app0.offset + 4 : app0.offset + app0.size]
        if body.startswith(b"JFIF\x00") and len(body) >= 12:
            units = body[7]
            xd, yd = struct.unpack(">HH", body[8:12])
            unit_code = {0: 1, 1: 2, 2: 3}.get(units, 2)
    return {
        0x011A: (5, struct.pack("<II", max(xd, 1), 1)),
        0x011B: (5, struct.pack("<II", max(yd, 1), 1)),
        0x0128: (3, struct.pack("<H", unit_code)),
        0x0213: (3, struct.pack("<H", 1)),
    }


def image_data(data: bytes, fmt: str) -> bytes:
    """The compressed image data that must never change: PNG IDAT/fdAT payloads, WebP image chunks (JPEG scan
    data is never even read: it is copied as a Tail). Raises CorruptError."""
    src = BytesSource(data)
    if fmt == "png":
        return b"".join(
            data[c.offset + 8 : c.offset + 8 + c.length] for c in png.parse_chunks(src) if c.type in (b"IDAT", b"fdAT")
        )
    if fmt == "webp":
        return b"".join(
            data[c.offset + 8 : c.offset + 8 + c.size]
            for c in webp.parse_chunks(src)
            if c.fourcc in (b"ALPH", b"VP8 ", b"VP8L", b"ANMF")
        )
    raise CorruptError(f"no image data rule for {fmt}")


def _verify_metadata(new: bytes, fmt: str, caption: str, *, ours: bool = True) -> None:
    # Belt and braces: the rebuilt metadata must parse and carry the caption (as ours, or for a person's words
    # as not ours) before anything is written.
    emb: Embedded = read_embedded(fmt, BytesSource(new))
    info = parse_xmp(emb.xmp) if emb.xmp else None
    desc = describe(emb, info, [])
    if desc is None or desc.text != caption or (desc.kind == "ours") != ours:
        raise CorruptError("internal check failed: caption does not read back")


def _write_sidecars(snap: FileSnapshot, caption: str, provenance: Provenance | None, journal: Journal,
                    hooks: WriteHooks) -> list[str]:
    """Merge the caption into every sidecar the snapshot saw (or create ``name.ext.xmp`` when it saw none)."""
    written = False
    if existing_sidecars(snap.path) != [s.path for s in snap.sidecars]:
        raise FileChanged(f"{snap.path}: its sidecars changed while it was being captioned; nothing written")
    targets: list[tuple[Path, SidecarFile | None]] = [(s.path, s) for s in snap.sidecars]
    if not targets:
        targets = [(sidecar_candidates(snap.path)[0], None)]
    for target, known in targets:
        existing = _read_sidecar_as_seen(target, known)
        try:
            packet = wrap_packet(merge_caption(existing, caption, provenance), 0) + b"\n"
        except XmpError as exc:
            raise MetadataError(f"{target}: {exc}") from None
        if existing == packet:
            continue
        if known is None:
            atomic.create_file(target, packet, journal=journal)
        else:
            atomic.replace_file(target, packet, known.identity, journal=journal, keep_mtime=False,
                                before_commit=hooks.before_commit)
        written = True
    return ["sidecar"] if written else []


def _read_sidecar_as_seen(target: Path, known: SidecarFile | None) -> bytes | None:
    """The sidecar's bytes, provided it is still the version the snapshot read (None: it did not exist and still
    does not). Raises FileChanged otherwise, MetadataError when it cannot be read."""
    try:
        with open(target, "rb") as f:
            st = os.fstat(f.fileno())
            if known is None or not same_stat(st, known.identity) or st.st_size > MAX_SIDECAR:
                raise FileChanged(f"{target}: sidecar changed while the image was being captioned; nothing written")
            data = f.read()
            if not same_stat(os.fstat(f.fileno()), known.identity):
                raise FileChanged(f"{target}: sidecar changed while being read; nothing written")
            return data
    except FileNotFoundError:
        if known is not None:
            raise FileChanged(f"{target}: sidecar vanished while the image was being captioned; nothing written") \
                from None
        return None
    except OSError as exc:
        raise MetadataError(f"{target}: cannot read sidecar: {exc.strerror or exc}") from None

