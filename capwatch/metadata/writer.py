"""``write_caption``: put a caption into a file's metadata (and/or XMP sidecars) per ``MetadataConfig``.

What is written (design.md): XMP dc:description x-default + capwatch provenance; EXIF IFD0 ImageDescription as
UTF-8 (and XPComment when ``windows_xp_tags``); IPTC Caption-Abstract only where IPTC already exists. With
``keywords``, in the same write: XMP dc:subject and (where IPTC exists) IPTC 2:25 Keywords, merged with a person's
keywords (rules: ``capwatch.metadata.keywords``; the IPTC and XMP lists end up holding the same keywords, so the
updated IPTC digest tells the truth); with ``text`` and ``[metadata] write_text``, capwatch:Text (OCR). JPEG, PNG and
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
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from capwatch.config import MetadataConfig
from capwatch.errors import MetadataError
from capwatch.metadata import atomic, exif, iptc, jpeg, mp4, png, webp
from capwatch.metadata import keywords as kw
from capwatch.metadata.binary import ByteSource, BytesSource, CorruptError, FileSource, open_noatime
from capwatch.metadata.formats import VIDEO_FORMATS
from capwatch.metadata.identity import FileChanged, same_stat
from capwatch.metadata.journal import Journal
from capwatch.metadata.jpeg import EmbedNotSafe
from capwatch.metadata.reader import MAX_SIDECAR, Embedded, describe, read_embedded, read_snapshot
from capwatch.metadata.records import Description, FileSnapshot, Provenance, SidecarFile, WriteHooks, WriteResult
from capwatch.metadata.safeopen import open_binary
from capwatch.metadata.sidecar import existing_sidecars, sidecar_candidates
from capwatch.metadata.xmltext import describe_chars, unsafe_chars
from capwatch.metadata.xmp import KeywordHierarchy, XmpError, merge_caption, normalise, parse_xmp, wrap_packet

EMBEDDABLE = frozenset({"jpeg", "png", "webp", "mp4", "mov"})
#: A hard-linked video is edited in place, which holds the whole file in memory: above this size it gets a sidecar.
MAX_IN_PLACE_VIDEO = 512 << 20
#: Whitespace padding in embedded XMP so other tools can edit in place (the XMP spec suggests 2 KB).
XMP_PADDING = 2048
NO_HOOKS = WriteHooks()


class DescriptionChanged(MetadataError):
    """A write of a person's words that would replace descriptions its writer did not see (someone wrote into the
    file since): nothing was written. ``snapshot`` is the file as read now, ``unseen`` the descriptions it holds
    that the writer had not seen."""

    def __init__(self, message: str, snapshot: FileSnapshot, unseen: tuple[Description, ...]) -> None:
        super().__init__(message)
        self.snapshot = snapshot
        self.unseen = unseen


class CaptionTextError(MetadataError):
    """The caption's text cannot be written anywhere (it holds characters XML 1.0 cannot hold); the file is
    untouched."""


def write_caption(path: Path, caption: str, provenance: Provenance | None, config: MetadataConfig, *,
                  force: bool = False, expected: FileSnapshot | None = None, journal: Journal | None = None,
                  hooks: WriteHooks = NO_HOOKS, keywords: Sequence[str] | None = None,
                  text: str | None = None, replaces: Collection[str] | None = None,
                  languages: Mapping[str, str] | None = None,
                  person_languages: Mapping[str, str] | None = None) -> WriteResult:
    """Write ``caption`` (NFC-normalised) with ``provenance`` into ``path`` per ``config``.

    ``keywords`` are capwatch's keywords for the image (from the model, in order): merged into dc:subject and IPTC
    Keywords in the same atomic write; a person's keywords stay, capwatch's earlier ones are replaced, and one a
    person removed is not added again (``capwatch.metadata.keywords``). None leaves the keywords as they are;
    ``[]`` removes capwatch's. ``text`` (OCR) goes into capwatch:Text when ``config.write_text`` is on ("" removes
    it; None keeps what is there); never into the description. ``languages`` (xml:lang -> text, the caption in
    each configured language) become dc:description's language items, a person's items kept
    (``capwatch.metadata.xmp_languages``); ``caption`` is then the default language's text. ``person_languages``
    writes language items as a person's words (an edit of one language on the web page). Keywords, languages and
    text travel with the caption: when
    the caption is not written (a person's description kept), neither are they. Raises TypeError when
    ``keywords`` is one string rather than a list of them.
    ``provenance=None`` writes a person's words (an edit in ``capwatch serve``): no capwatch provenance is written
    and any earlier one is removed, so the caption reads as ``human`` and capwatch never replaces it later.
    ``replaces`` (with a person's words) is what their writer saw: the :func:`description_key` of each description
    text shown to them. The write then goes ahead over a person's description, without ``force``, but only when
    the file, as read right before the write, holds no person's description (in any field) and no description of
    capwatch's that is not among them; else it raises DescriptionChanged and writes nothing. The check and the
    write are one transaction: the file is written only if it is still the one that was checked.

    ``path`` may be a symlink: the file it points to (or that file's sidecar) is written, the link stays.
    ``expected`` is the snapshot the caption was made from (read before the model ran); ``journal`` registers
    temp files and backups for crash recovery (default: this user's journal).

    Returns what was written, or why nothing was: ``metadata.write = none``; a person's description kept
    (``existing = "keep"`` and not ``force``); the file already carries exactly this caption. Raises FileChanged
    when the file or a sidecar is not the one in ``expected`` or changes during the write (nothing written: read
    it again), and MetadataError (one line) when the file cannot be read or written safely, including when part
    of its metadata could not be fully read; the file is then byte-identical and no temp file remains.
    """
    request = CaptionWrite(Path(path), caption, provenance, expected, keywords=keywords, text=text,
                           replaces=None if replaces is None else frozenset(replaces),
                           languages=languages, person_languages=person_languages)
    prepared = _prepare(request, config, force=force)
    if isinstance(prepared, WriteResult):
        return prepared
    snap, cleaned = prepared
    journal = journal if journal is not None else Journal.default()
    return _write_prepared(snap, cleaned, provenance, config, journal, hooks, _extras(request, config))


@dataclass(frozen=True)
class CaptionWrite:
    """One file of :func:`write_captions`: the arguments :func:`write_caption` takes for one file."""

    path: Path
    caption: str
    provenance: Provenance | None
    expected: FileSnapshot | None = None
    #: capwatch's keywords for the image (None: leave the file's keywords alone); see write_caption.
    keywords: Sequence[str] | None = None
    #: Text read in the image (None: leave capwatch:Text alone); written only with ``write_text``.
    text: str | None = None
    #: The descriptions the writer of a person's words saw (description_key values); see write_caption.
    replaces: frozenset[str] | None = None
    #: The caption per language (xml:lang -> text, English included) for dc:description's language items; None
    #: leaves them alone. ``caption`` is the text of the default language (x-default, EXIF, IPTC).
    languages: Mapping[str, str] | None = None
    #: Language items written as a person's words (xml:lang -> text); see write_caption.
    person_languages: Mapping[str, str] | None = None


def write_captions(requests: Sequence[CaptionWrite], config: MetadataConfig, *, force: bool = False,
                   journal: Journal | None = None, hooks: WriteHooks = NO_HOOKS) -> list[WriteResult | MetadataError]:
    """:func:`write_caption` for a batch of files, group-committed: the files whose caption goes into the file
    itself by rename share one journal entry, one fsync pass and one fsync per directory
    (:func:`capwatch.metadata.atomic.replace_files`); every other write (sidecars, hard-linked files edited in
    place) goes as :func:`write_caption` does it. Each file is checked against its ``expected`` snapshot right
    before its own write lands, exactly as one at a time.

    Gives one entry per request, in order: the WriteResult, or the FileChanged / MetadataError that
    :func:`write_caption` would have raised for that file. Raises JournalError when the journal cannot be written
    (then nothing was written to any file of the group).
    """
    journal = journal if journal is not None else Journal.default()
    results: list[WriteResult | MetadataError | None] = [None] * len(requests)
    group: list[tuple[int, FileSnapshot, Plan]] = []
    for number, request in enumerate(requests):
        try:
            prepared = _prepare(request, config, force=force)
            if isinstance(prepared, WriteResult):
                results[number] = prepared
                continue
            snap, text = prepared
            extra = _extras(request, config)
            if config.write != "embedded" or not _embeds(snap, config):
                results[number] = _write_prepared(snap, text, request.provenance, config, journal, hooks, extra)
                continue
            try:
                plan = _plan_file(snap, text, request.provenance, config, extra)
            except EmbedNotSafe:
                sidecars = _write_sidecars(snap, text, request.provenance, journal, hooks, extra)
                results[number] = WriteResult(tuple(sidecars), None, read_snapshot(snap.path, known=snap)) \
                    if sidecars else WriteResult((), UNCHANGED, snap)
                continue
            if not plan.changed:
                results[number] = WriteResult((), UNCHANGED, snap)
                continue
            group.append((number, snap, plan))
        except MetadataError as exc:
            results[number] = exc
    landed = atomic.replace_files(
        [atomic.Replacement(snap.path, plan.parts, snap.identity, hooks.before_commit) for _, snap, plan in group],
        journal=journal, keep_mtime=config.keep_mtime)
    for (number, snap, plan), error in zip(group, landed, strict=True):
        if error is not None:
            results[number] = error
            continue
        try:
            results[number] = WriteResult(plan.written, None, read_snapshot(snap.path, known=snap))
        except MetadataError as exc:
            results[number] = exc
    return [r if r is not None else MetadataError("internal error: no result") for r in results]


UNCHANGED = "unchanged: the file already carries this caption"


def _prepare(request: CaptionWrite, config: MetadataConfig, *, force: bool
             ) -> WriteResult | tuple[FileSnapshot, str]:
    """What every write starts with: the caption cleaned, the file read and checked against ``expected``, and
    the decisions that need no writing. Gives the final WriteResult when nothing is to be written, else the
    snapshot and the cleaned caption. Raises FileChanged and MetadataError as :func:`write_caption` does."""
    path = request.path
    if isinstance(request.keywords, str):
        # A str is a Sequence[str] too: "dog" would become the keywords d, o, g.
        raise TypeError("keywords must be a list of keywords, not one string")
    # Control characters have no place in a caption and are not allowed in XML 1.0 or EXIF ASCII.
    text = _clean_caption(request.caption)
    if not text:
        raise MetadataError(f"{path}: refusing to write an empty caption")
    unsafe = unsafe_chars(text)
    if unsafe:
        # What is left after the control characters (U+FFFE, U+FFFF, lone surrogates) has no spelling in XML at
        # all: say what is wrong with the text, not with the photo (the XMP merge would call it "malformed").
        raise CaptionTextError(f"{path}: the caption contains {describe_chars(unsafe)}, which XML 1.0 (and so "
                               "XMP) cannot hold; nothing written")
    if config.write == "none":
        return WriteResult((), "metadata writing is off (metadata.write = none)")
    snap = read_snapshot(path, known=request.expected)
    if request.expected is not None and not snap.same_as(request.expected):
        raise FileChanged(f"{path}: changed while it was being captioned; nothing written")
    desc = snap.metadata.description
    if request.replaces is not None:
        unseen = snap.unseen_descriptions(request.replaces)
        if unseen:
            raise DescriptionChanged(f"{path}: holds other words than were shown ({unseen[0].origin}: "
                                     f"{unseen[0].text[:60]!r}); nothing written", snap, unseen)
    elif desc is not None and desc.kind == "human" and config.existing == "keep" and not force:
        return WriteResult((), f"kept the existing description from {desc.origin} (metadata.existing = keep)", snap)
    if snap.unreadable:
        raise MetadataError(f"{path}: could not fully read {snap.unreadable[0]}; nothing written, so nothing in "
                            "it is lost")
    return snap, text


def _extras(request: CaptionWrite, config: MetadataConfig) -> Extras:
    keywords = None if request.keywords is None else kw.clean_keywords(request.keywords)
    languages = None
    if request.languages is not None:
        cleaned = {lang: _clean_caption(text) for lang, text in request.languages.items()}
        languages = {lang: text for lang, text in cleaned.items() if text}
    hierarchy = KeywordHierarchy(config.keyword_parent) if config.keyword_parent else None
    person = None
    if request.person_languages:
        person = {lang: _clean_caption(text) for lang, text in request.person_languages.items()}
    return Extras(keywords, request.text if config.write_text else None, languages, hierarchy, person)


def _clean_caption(caption: str) -> str:
    """A caption as it is written: control characters (not allowed in XML 1.0 or EXIF ASCII) become spaces,
    whitespace collapsed, NFC."""
    text = normalise("".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in caption))
    return " ".join(text.split())


def _write_prepared(snap: FileSnapshot, text: str, provenance: Provenance | None, config: MetadataConfig,
                    journal: Journal, hooks: WriteHooks, extra: Extras) -> WriteResult:
    """The writes of one prepared file: embedded where the format and config allow it, else (or when embedding
    is not safe) its sidecars. Raises FileChanged and MetadataError as :func:`write_caption` does."""
    written: list[str] = []
    sidecar = config.write in ("sidecar", "both")
    if config.write in ("embedded", "both"):
        if not _embeds(snap, config):
            sidecar = True
        else:
            try:
                written += _write_embedded(snap, text, provenance, config, journal, hooks, extra)
            except EmbedNotSafe:
                sidecar = True
    if sidecar:
        written += _write_sidecars(snap, text, provenance, journal, hooks, extra)
    if not written:
        return WriteResult((), UNCHANGED, snap)
    return WriteResult(tuple(dict.fromkeys(written)), None, read_snapshot(snap.path, known=snap))


def _embeds(snap: FileSnapshot, config: MetadataConfig) -> bool:
    """True when the caption of this file may go into the file itself (format, and ``[metadata] video``)."""
    fmt = snap.metadata.format
    return fmt in EMBEDDABLE and (fmt not in VIDEO_FORMATS or config.video == "embedded")


def _is_read_only(path: Path, st: os.stat_result) -> bool:
    # Mode bits, not only access(): root may write anything, but a file the user made read-only stays untouched.
    return not (st.st_mode & stat.S_IWUSR) or not os.access(path, os.W_OK)


@dataclass(frozen=True)
class Extras:
    """What travels with a caption: capwatch's keywords (cleaned; None = leave keywords alone) and OCR text (None =
    leave capwatch:Text alone)."""

    keywords: tuple[str, ...] | None = None
    text: str | None = None
    #: The caption per language (cleaned; None = leave the language items alone).
    languages: Mapping[str, str] | None = None
    #: Where capwatch's keywords go in the hierarchical lists ([metadata] keyword_parent); None = not written.
    hierarchy: KeywordHierarchy | None = None
    #: Language items that are a person's words (cleaned); None = none.
    person_languages: Mapping[str, str] | None = None


NO_EXTRAS = Extras()


def _write_embedded(snap: FileSnapshot, caption: str, provenance: Provenance | None, config: MetadataConfig,
                    journal: Journal, hooks: WriteHooks, extra: Extras) -> list[str]:
    plan = _plan_file(snap, caption, provenance, config, extra)
    if not plan.changed:
        return []
    atomic.replace_file(snap.path, plan.parts, snap.identity, journal=journal, keep_mtime=config.keep_mtime,
                        before_commit=hooks.before_commit)
    return list(plan.written)


def _plan_file(snap: FileSnapshot, caption: str, provenance: Provenance | None, config: MetadataConfig,
               extra: Extras) -> Plan:
    """The new content of the file ``snap`` read, checked to still be that file. Raises EmbedNotSafe (use a
    sidecar), FileChanged, and MetadataError (unreadable or malformed)."""
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
                if fmt in VIDEO_FORMATS:
                    if atomic.needs_in_place(st) and st.st_size > MAX_IN_PLACE_VIDEO:
                        raise EmbedNotSafe("a hard-linked video this large is not edited in place")
                    plan = plan_video(src, fmt, caption, provenance, extra=extra)
                    if not same_stat(os.fstat(f.fileno()), snap.identity):
                        raise FileChanged(f"{path}: changed while it was being read; nothing written")
                    return plan
                if fmt == "jpeg":
                    # Only the header is read: the scan data is copied kernel-side by the atomic writer.
                    layout = jpeg.parse_layout(src)
                    jpeg.check_complete(src, layout)
                    data = src.read_at(0, jpeg.header_end(src, layout))
                else:
                    data = f.read()
                plan = plan_embedded(data, fmt, caption, provenance, config, file_size=st.st_size, extra=extra)
            except (CorruptError, XmpError) as exc:
                raise MetadataError(f"{path}: {exc}") from None
            if not same_stat(os.fstat(f.fileno()), snap.identity):
                raise FileChanged(f"{path}: changed while it was being read; nothing written")
    except OSError as exc:
        raise MetadataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return plan


@dataclass(frozen=True)
class Plan:
    """New file content as parts (bytes, and for JPEG a Tail: the original scan data from SOS on)."""

    parts: tuple[atomic.Part, ...]
    written: tuple[str, ...]
    changed: bool


def plan_embedded(data: bytes, fmt: str, caption: str, provenance: Provenance | None, config: MetadataConfig, *,
                  file_size: int, extra: Extras = NO_EXTRAS) -> Plan:
    """Compute the new file content (pure; nothing is written) and verify it before returning.

    ``extra``: keywords and OCR text to write with the caption (see ``write_caption``).
    ``data`` is the whole file, except for JPEG where it may end after the first SOS segment header
    (``file_size`` is the size of the whole file). Raises CorruptError / XmpError for malformed input and
    EmbedNotSafe when a sidecar must be used instead.
    """
    emb = read_embedded(fmt, BytesSource(data))
    if fmt == "jpeg" and sum(s.kind == "photoshop" for s in jpeg.parse_layout(BytesSource(data)).segments) > 1:
        raise EmbedNotSafe("its IPTC spans several APP13 segments")
    if emb.has_extended_xmp:
        raise EmbedNotSafe("the file uses ExtendedXMP")
    old_info = parse_xmp(emb.xmp) if emb.xmp is not None else None
    if old_info is not None and old_info.has_extended:
        raise EmbedNotSafe("the XMP refers to ExtendedXMP")
    has_iptc = fmt == "jpeg" and emb.irb is not None and iptc.has_iptc(emb.irb)
    previous_ours = old_info.our_keywords if old_info is not None else ()
    iptc_human: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    if extra.keywords is not None and has_iptc:
        assert emb.irb is not None
        in_iptc = iptc.keywords_from_irb(emb.irb)
        mine = kw.owned_iptc(in_iptc, previous_ours)
        iptc_human = tuple(v for v, ours in zip(in_iptc, mine, strict=True) if not ours)
        # A person's deletion in IPTC alone (exiftool -IPTC:Keywords-=x) must not be undone from dc:subject.
        subjects = old_info.subjects if old_info is not None else ()
        deleted = kw.iptc_deletions(subjects, in_iptc, previous_ours, digest=iptc.digest_matches(emb.irb))
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
    xml = merge_caption(emb.xmp, caption, provenance, keywords=extra.keywords, other_human=iptc_human,
                        deleted=deleted, text=extra.text, languages=extra.languages, hierarchy=extra.hierarchy,
                        person_languages=extra.person_languages)
    packet = wrap_packet(xml, XMP_PADDING)
    if fmt == "jpeg":
        if len(packet) > jpeg.MAX_XMP_PACKET:
            packet = wrap_packet(xml, 0)
        if len(packet) > jpeg.MAX_XMP_PACKET:
            raise EmbedNotSafe(f"XMP of {len(packet)} bytes is larger than one JPEG segment")
        irb = None
        if has_iptc:
            assert emb.irb is not None
            update = None
            if extra.keywords is not None:
                update = iptc.KeywordUpdate(previous_ours, parse_xmp(xml.encode("utf-8")).subjects)
            irb = iptc.set_caption_irb(emb.irb, caption, update)
            written.append("iptc")
        sos = jpeg.parse_layout(BytesSource(data)).sos_offset
        head = jpeg.rebuild_head(data, new_tiff, packet, irb)
        # new header + the original SOS header
        _verify_metadata(head + data[sos:], fmt, caption, extra, ours=provenance is not None)
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
    _verify_metadata(new, fmt, caption, extra, ours=provenance is not None)
    return Plan((new,), tuple(written), new != data)


def plan_video(src: ByteSource, fmt: str, caption: str, provenance: Provenance | None, *,
               extra: Extras = NO_EXTRAS) -> Plan:
    """The new content of an MP4/MOV file (``src``, read through): its XMP packet replaced or added where exiftool
    puts it, every other box copied (media data as Tail ranges). Checked before returning: the chunk offsets follow
    their data (``capwatch.metadata.mp4``) and the new file's metadata reads back with the caption. Raises
    CorruptError / XmpError for malformed input and EmbedNotSafe when a sidecar must be used instead."""
    layout = mp4.read_layout(src)
    old = mp4.read_video(src).xmp
    if old is not None and parse_xmp(old).has_extended:
        raise EmbedNotSafe("the XMP refers to ExtendedXMP")
    xml = merge_caption(old, caption, provenance, keywords=extra.keywords, text=extra.text)
    rewrite = mp4.rewrite(src, layout, fmt, wrap_packet(xml, 0), wrap_packet(xml, XMP_PADDING))
    parts: list[atomic.Part] = [atomic.Tail(*p) if isinstance(p, tuple) else p for p in rewrite.parts]
    spliced = mp4.SplicedSource(rewrite.parts, src)
    if spliced.size != sum(p.length if isinstance(p, atomic.Tail) else len(p) for p in parts):
        raise CorruptError("internal check failed: the new video's size")
    new_layout = mp4.read_layout(spliced)
    if mp4.chunk_offsets(new_layout.moov_data) != mp4.chunk_offsets(rewrite.new_moov):
        raise CorruptError("internal check failed: the new video's chunk offsets")
    _verify_source(spliced, fmt, caption, extra, ours=provenance is not None)
    changed = old is None or parse_xmp(old) != parse_xmp(xml.encode("utf-8"))
    return Plan(tuple(parts), ("xmp",), changed)


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


def _verify_metadata(new: bytes, fmt: str, caption: str, extra: Extras, *, ours: bool = True) -> None:
    _verify_source(BytesSource(new), fmt, caption, extra, ours=ours)


def _verify_source(new: ByteSource, fmt: str, caption: str, extra: Extras, *, ours: bool = True) -> None:
    # Belt and braces: the rebuilt metadata must parse and carry the caption (as ours, or for a person's words as
    # not ours; and our keywords, in XMP and IPTC alike) before anything is written.
    emb: Embedded = read_embedded(fmt, new)
    info = parse_xmp(emb.xmp) if emb.xmp else None
    desc = describe(emb, info, [])
    if desc is None or desc.text != caption or (desc.kind == "ours") != ours:
        raise CorruptError("internal check failed: caption does not read back")
    if extra.keywords is not None and info is not None:
        subjects = set(info.subjects)
        if not set(info.our_keywords) <= subjects:
            raise CorruptError("internal check failed: keywords do not read back")
        if emb.irb is not None and iptc.has_iptc(emb.irb):
            in_iptc = {kw.key(k) for k in iptc.keywords_from_irb(emb.irb)}
            if not {kw.iptc_key(k) for k in subjects} <= in_iptc:
                raise CorruptError("internal check failed: IPTC keywords do not read back")


def _write_sidecars(snap: FileSnapshot, caption: str, provenance: Provenance | None, journal: Journal,
                    hooks: WriteHooks, extra: Extras) -> list[str]:
    """Merge the caption into every sidecar the snapshot saw (or create ``name.ext.xmp`` when it saw none)."""
    written = False
    if existing_sidecars(snap.path) != [s.path for s in snap.sidecars]:
        raise FileChanged(f"{snap.path}: its sidecars changed while it was being captioned; nothing written")
    targets: list[tuple[Path, SidecarFile | None]] = [(s.path, s) for s in snap.sidecars]
    if not targets:
        targets = [(sidecar_candidates(snap.path)[0], None)]
    # A new sidecar starts with the keywords a person put into the file itself: readers that prefer the sidecar
    # (darktable, Lightroom for RAW) would otherwise no longer show them. Existing sidecars keep their own list.
    seed = snap.metadata.human_keywords if not snap.sidecars and extra.keywords is not None else ()
    for target, known in targets:
        existing = _read_sidecar_as_seen(target, known)
        try:
            xml = merge_caption(existing, caption, provenance, keywords=extra.keywords, other_human=seed,
                                text=extra.text, languages=extra.languages, hierarchy=extra.hierarchy,
                                person_languages=extra.person_languages)
            packet = wrap_packet(xml, 0) + b"\n"
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
        with open_binary(target) as f:  # never blocks on a FIFO or device swapped in
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

