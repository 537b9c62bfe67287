"""``read_metadata``: description (with whose words it is), capture time and size, from headers only.

Which description wins when several places disagree follows the MWG rule as exiftool implements it for
``MWG:Description``: EXIF ImageDescription if not blank; else XMP dc:description when there is no IPTC or the
Photoshop IPTC digest says IPTC and XMP are in sync; else IPTC Caption-Abstract. Two refinements: a non-blank
XMP sidecar wins over the embedded fields (for RAW/HEIC/TIFF the sidecar is where editors write), and camera
boilerplate ("OLYMPUS DIGITAL CAMERA") loses to any real description found elsewhere in the file. Blank values
count as absent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from capwatch.errors import MetadataError
from capwatch.metadata import exif, iptc, isobmff, jpeg, mp4, png, webp
from capwatch.metadata import keywords as kw
from capwatch.metadata.binary import ByteSource, BytesSource, CorruptError, FileSource, open_noatime
from capwatch.metadata.boilerplate import is_boilerplate
from capwatch.metadata.formats import HEAD_SIZE, detect_format
from capwatch.metadata.identity import FileChanged, FileIdentity, fingerprint_fd, same_stat, stat_key
from capwatch.metadata.records import Description, FileMetadata, FileSnapshot, Provenance, SidecarFile
from capwatch.metadata.safeopen import read_regular
from capwatch.metadata.sidecar import existing_sidecars
from capwatch.metadata.xmp import XmpError, XmpInfo, normalise, parse_xmp, xmp_date_to_iso

MAX_SIDECAR = 16 << 20
MAX_GIF_SCAN = 32 << 20
MAX_RAF_PREVIEW = 1 << 20
#: How often a file that changes while it is being read is read again before giving up.
READ_ATTEMPTS = 3


@dataclass
class Embedded:
    """Raw metadata blocks found inside one file."""

    tiff: exif.TiffInfo | None = None
    exif_block: bytes | None = None  # the raw TIFF structure of an embedded EXIF block (JPEG/PNG/WebP/HEIF)
    xmp: bytes | None = None
    irb: bytes | None = None  # Photoshop IRB
    iim: bytes | None = None  # bare IPTC IIM (TIFF tag 33723)
    text: str | None = None  # PNG Description
    #: A video's QuickTime description (udta ©des, iTunes desc, Keys com.apple.quicktime.description).
    quicktime_description: str | None = None
    #: A video's capture time from its QuickTime tags (local 'YYYY-MM-DDTHH:MM:SS').
    quicktime_date: str | None = None
    #: A video's Apple content identifier (Keys), which pairs it with its Live Photo still.
    quicktime_content_id: str | None = None
    width: int | None = None
    height: int | None = None
    has_extended_xmp: bool = False
    extended_xmp: bytes | None = None  # JPEG ExtendedXMP, reassembled (read for keywords; never written)
    problems: list[str] = field(default_factory=list)
    #: Blocks present but not read (over a size cap): a writer must not write such a file.
    unread: list[str] = field(default_factory=list)


def _tiff_or_none(block: bytes | None, emb: Embedded) -> exif.TiffInfo | None:
    if not block:
        return None
    emb.exif_block = block
    try:
        info = exif.read_tiff(BytesSource(block))
    except CorruptError as exc:
        emb.problems.append(f"EXIF: {exc}")
        return None
    emb.unread.extend(info.unread)
    return info


def read_embedded(fmt: str, src: ByteSource) -> Embedded:
    """Metadata blocks of a file already identified as ``fmt``. Raises CorruptError when the container itself
    is unreadable; damaged EXIF inside a readable container is only noted in ``problems``."""
    emb = Embedded()
    if fmt == "jpeg":
        j = jpeg.read_jpeg(src)
        emb.tiff = _tiff_or_none(j.exif, emb)
        emb.xmp, emb.irb, emb.has_extended_xmp = j.xmp, j.photoshop, j.has_extended_xmp
        emb.extended_xmp = j.extended_xmp
        emb.width, emb.height = j.width, j.height
    elif fmt == "png":
        p = png.read_png(src)
        emb.tiff = _tiff_or_none(p.exif, emb)
        emb.xmp, emb.text, emb.width, emb.height = p.xmp, p.description, p.width, p.height
        emb.unread.extend(p.unread)
    elif fmt == "webp":
        w = webp.read_webp(src)
        emb.tiff = _tiff_or_none(w.exif, emb)
        emb.xmp, emb.width, emb.height = w.xmp, w.width, w.height
    elif fmt in ("tiff", "raw") and src.read_at(0, 4)[:2] in (b"II", b"MM"):
        t = exif.read_tiff(src)
        emb.tiff, emb.xmp, emb.width, emb.height = t, t.xmp, t.width, t.height
        emb.irb, emb.iim = t.photoshop, t.iptc
        emb.unread.extend(t.unread)
    elif fmt == "raw" and src.read_at(0, 15) == b"FUJIFILMCCD-RAW":
        head = src.read_at(84, 8)
        if len(head) == 8:
            offset, length = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")
            if length > MAX_RAF_PREVIEW:
                # Only its start is read: metadata sits there; a description further in would be overlooked.
                emb.unread.append(f"RAF preview of {length} bytes (read: the first {MAX_RAF_PREVIEW >> 20} MiB)")
            preview = BytesSource(src.read_at(offset, min(length, MAX_RAF_PREVIEW)))
            try:
                j = jpeg.read_jpeg(preview)
                emb.tiff = _tiff_or_none(j.exif, emb)
                emb.xmp = j.xmp
            except CorruptError as exc:
                emb.problems.append(f"RAF preview: {exc}")
    elif fmt in ("heif", "avif"):
        h = isobmff.read_heif(src)
        emb.tiff = _tiff_or_none(h.exif, emb)
        emb.xmp, emb.width, emb.height = h.xmp, h.width, h.height
        emb.unread.extend(h.unread)
    elif fmt in ("mp4", "mov"):
        v = mp4.read_video(src)
        emb.xmp, emb.width, emb.height = v.xmp, v.width, v.height
        emb.quicktime_description, emb.quicktime_date = v.tags.description, v.tags.taken_at
        emb.quicktime_content_id = v.tags.content_identifier
    elif fmt == "gif":
        head = src.read_at(0, 10)
        if len(head) == 10:
            emb.width, emb.height = int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
        emb.xmp = _gif_xmp(src)
        if emb.xmp is None and src.size > MAX_GIF_SCAN:
            # Only the first part was searched: an XMP packet further in would be overlooked.
            emb.unread.append(f"GIF over {MAX_GIF_SCAN >> 20} MiB (XMP looked for in the first part only)")
    elif fmt == "bmp":
        head = src.read_at(14, 12)
        if len(head) >= 12 and int.from_bytes(head[:4], "little") >= 40:
            emb.width = int.from_bytes(head[4:8], "little", signed=True)
            emb.height = abs(int.from_bytes(head[8:12], "little", signed=True))
    return emb


def _gif_xmp(src: ByteSource) -> bytes | None:
    # GIF keeps XMP in an application extension "XMP DataXMP" followed by a 258-byte "magic trailer"; GIFs are
    # small, so a bounded read and search is enough.
    data = src.read_at(0, min(src.size, MAX_GIF_SCAN))
    start = data.find(b"\x21\xff\x0bXMP DataXMP")
    if start < 0:
        return None
    body = data[start + 14 :]
    end = body.find(b"<?xpacket end=")
    if end < 0:
        return None
    close = body.find(b"?>", end)
    return body[: close + 2] if close >= 0 else None


@dataclass(frozen=True)
class _Candidate:
    text: str
    origin: str


def _iptc_caption(emb: Embedded) -> tuple[bool, str | None, bool | None]:
    """(IPTC present, caption, digest matches or None without digest) from the IRB or bare IIM."""
    try:
        if emb.irb is not None and iptc.has_iptc(emb.irb):
            return True, iptc.caption_from_irb(emb.irb), iptc.digest_matches(emb.irb)
        if emb.iim is not None:
            return True, iptc.caption_from_iim(emb.iim), None
    except CorruptError as exc:
        emb.problems.append(f"IPTC: {exc}")
    return False, None, None


def _present(text: str | None) -> bool:
    return text is not None and bool(text.strip(" \t\r\n\x00"))


def _candidates(emb: Embedded, xmp_info: XmpInfo | None, sidecars: list[XmpInfo]) -> list[_Candidate]:
    """Description candidates in priority order (MWG for embedded fields, sidecar first)."""
    out = [_Candidate(s.description, "sidecar") for s in sidecars if s.description and _present(s.description)]
    exif_text = None
    if emb.tiff and emb.tiff.image_description is not None:
        exif_text = exif.decode_text(emb.tiff.image_description)
    xmp_text = xmp_info.description if xmp_info else None
    has_iptc, iptc_text, digest_ok = _iptc_caption(emb)
    if _present(exif_text):
        assert exif_text is not None
        out.append(_Candidate(exif_text, "exif"))
    xmp_first = not has_iptc or (_present(xmp_text) and digest_ok is not False)
    ordered = [("xmp", xmp_text), ("iptc", iptc_text)]
    for origin, text in ordered if xmp_first else reversed(ordered):
        if text is not None and _present(text):
            out.append(_Candidate(text, origin))
    if emb.text and _present(emb.text):
        out.append(_Candidate(emb.text, "png"))
    if emb.quicktime_description and _present(emb.quicktime_description):
        out.append(_Candidate(emb.quicktime_description, "quicktime"))
    if emb.tiff and emb.tiff.xp_comment:
        xp = exif.decode_xp(emb.tiff.xp_comment)
        if _present(xp):
            out.append(_Candidate(xp, "exif"))
    return out


def _text(raw: bytes | None) -> str | None:
    return exif.decode_text(raw).strip() if raw else None


def _ours(cand: _Candidate, infos: list[XmpInfo]) -> Provenance | None:
    """The provenance of the packet that records exactly this text as capwatch's caption, if any."""
    text = normalise(cand.text)
    for info in infos:
        if info.provenance is None:
            continue
        recorded = normalise(info.our_caption) if info.our_caption is not None else None
        if recorded is None and info.description is not None:
            recorded = normalise(info.description)
        if recorded is None:
            continue
        if text == recorded:
            return info.provenance
        # IPTC holds at most 2000 bytes: our own caption cut at a character boundary is still ours.
        if cand.origin == "iptc" and text == normalise(iptc.truncate_utf8(recorded).decode("utf-8")):
            return info.provenance
    return None


def description_fields(emb: Embedded, xmp_info: XmpInfo | None, sidecars: list[XmpInfo]) -> tuple[Description, ...]:
    """Every place of the file (and its sidecars) that holds a description, in MWG priority order (see module
    docstring), each classified as ours / human / boilerplate; () when there is none."""
    infos = [i for i in [*sidecars, xmp_info] if i is not None]
    tiff = emb.tiff
    make, model, software = (_text(tiff.make), _text(tiff.model), _text(tiff.software)) if tiff else (None,) * 3
    out: list[Description] = []
    for cand in _candidates(emb, xmp_info, sidecars):
        provenance = _ours(cand, infos)
        text = normalise(cand.text)
        if provenance is not None:
            out.append(Description(text, "ours", provenance, cand.origin))
        elif is_boilerplate(cand.text, make=make, model=model, software=software):
            out.append(Description(text, "boilerplate", None, cand.origin))
        else:
            out.append(Description(text, "human", None, cand.origin))
    return tuple(out)


def effective(fields: tuple[Description, ...]) -> Description | None:
    """The description of a file among its ``fields`` (see :func:`description_fields`): the first person's, else
    the first of capwatch's, else the first; None when there is none."""
    # A person's words anywhere win: when someone edits our caption in one field (Lightroom writes XMP, some tools
    # IPTC) the other fields still hold our text, and MWG order alone would pick ours and overwrite their edit.
    return next((d for d in fields if d.kind == "human"),
                next((d for d in fields if d.kind == "ours"), fields[0] if fields else None))


def describe(emb: Embedded, xmp_info: XmpInfo | None, sidecars: list[XmpInfo]) -> Description | None:
    """Choose the description and classify it as ours / human / boilerplate (see module docstring)."""
    return effective(description_fields(emb, xmp_info, sidecars))


def _iptc_keywords(emb: Embedded) -> tuple[str, ...]:
    # A damaged IPTC block is already noted in ``problems`` by _iptc_caption; its keywords are then unknown.
    try:
        if emb.irb is not None and iptc.has_iptc(emb.irb):
            return iptc.keywords_from_irb(emb.irb)
        if emb.iim is not None:
            return iptc.keywords_from_iim(emb.iim)
    except CorruptError:
        pass
    return ()


def _iptc_deletions(emb: Embedded, xmp_info: XmpInfo | None) -> tuple[str, ...]:
    """The embedded XMP's keywords that a person deleted from the file's IPTC alone (see keywords_of)."""
    if xmp_info is None or emb.irb is None:
        return ()
    try:
        if not iptc.has_iptc(emb.irb):
            return ()
        return kw.iptc_deletions(xmp_info.subjects, iptc.keywords_from_irb(emb.irb), xmp_info.our_keywords,
                                 digest=iptc.digest_matches(emb.irb))
    except CorruptError:
        return ()


def keywords_of(emb: Embedded, xmp_info: XmpInfo | None,
                sidecars: list[XmpInfo]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(keywords, capwatch's among them) from the sidecars, the embedded XMP and IPTC (see ``FileMetadata``).

    A keyword is capwatch's when a packet's capwatch:Keywords lists exactly that text; an IPTC keyword that is the
    64-byte cut of a keyword already found (IPTC's limit) is that keyword, not another one. A keyword of the
    embedded XMP that a person deleted from IPTC alone (``capwatch.metadata.keywords.iptc_deletions``) is left
    out, as the next write leaves it out of the file.
    """
    deleted = {kw.key(k) for k in _iptc_deletions(emb, xmp_info)}
    infos = [i for i in [*sidecars, xmp_info] if i is not None]
    ours_exact = {normalise(k) for info in infos for k in info.our_keywords}
    ours_by_cut = {kw.iptc_key(k): normalise(k) for info in infos for k in info.our_keywords}
    found: list[str] = []
    mine: list[str] = []
    seen: set[str] = set()
    cuts: set[str] = set()

    def add(keyword: str, *, from_iptc: bool = False) -> None:
        text = normalise(keyword)
        if not text:
            return
        folded = kw.key(text)
        if from_iptc:
            if folded in cuts:
                return  # the IPTC copy of a keyword already found (cut to 64 bytes when it was longer)
            if folded in ours_by_cut:
                text = ours_by_cut[folded]  # our keyword, which IPTC holds cut
                folded = kw.key(text)
        if folded in seen:
            return
        seen.add(folded)
        cuts.add(kw.iptc_key(text) if len(text.encode("utf-8")) > kw.IPTC_KEYWORD_LIMIT else folded)
        found.append(text)
        if text in ours_exact:
            mine.append(text)

    for info in sidecars:
        for k in info.subjects:
            add(k)
        for k in info.hierarchical:
            add(kw.leaf(k))
    if xmp_info is not None:
        for k in xmp_info.subjects:
            if kw.key(k) not in deleted:
                add(k)
    for k in _iptc_keywords(emb):
        add(k, from_iptc=True)
    if xmp_info is not None:
        for k in xmp_info.hierarchical:
            add(kw.leaf(k))
    return tuple(found), tuple(mine)


def _taken_at(emb: Embedded, infos: list[XmpInfo]) -> str | None:
    if emb.tiff:
        for raw in (emb.tiff.date_time_original, emb.tiff.create_date):
            iso = exif.exif_date_to_iso(raw)
            if iso:
                return iso
    for info in infos:
        for value in (info.date_created, info.date_time_original, info.create_date):
            iso = xmp_date_to_iso(value)
            if iso:
                return iso
    return emb.quicktime_date


def read_sidecar(path: Path) -> XmpInfo | None:
    """Parse one sidecar; None when it is unreadable, too large or malformed (a sidecar never blocks a read)."""
    try:
        data = read_regular(path, MAX_SIDECAR)  # one open, never blocking: a FIFO swapped in is refused
        if len(data) > MAX_SIDECAR:
            return None
        return parse_xmp(data)
    except (OSError, XmpError):
        return None


def read_metadata(path: Path) -> FileMetadata:
    """Read format, description, capture time and size of ``path`` (embedded metadata and XMP sidecars).

    Reads only header segments/chunks, never pixels, and never modifies anything. Raises MetadataError (one line,
    naming the file) when the file cannot be opened or its container is malformed. Malformed or hostile XMP and
    damaged EXIF/IPTC inside a readable container are skipped rather than fatal.
    """
    return read_snapshot(path).metadata


def read_snapshot(path: Path, *, known: FileSnapshot | None = None) -> FileSnapshot:
    """Read ``path`` (symlinks resolved) and its XMP sidecars consistently: metadata, the file's identity
    (stat + content fingerprint) and each sidecar's, taken so that the stat before and after the read agree.

    ``known``, an earlier snapshot of the same file, spares reading a fingerprint again for a file (or sidecar)
    whose stat is unchanged since a settled read (see ``FileIdentity.settled``).

    Raises MetadataError (one line, naming ``path``) when the file cannot be opened or its container is
    malformed, and FileChanged when it kept changing while being read. What could not be fully read (a block
    over a size cap, malformed XMP, damaged EXIF/IPTC, an unreadable sidecar) is listed in ``unreadable``.
    """
    path = Path(path)
    target = Path(os.path.realpath(path))
    for _ in range(READ_ATTEMPTS):
        fmt, emb, identity = _read_embedded_consistently(path, target, known.identity if known else None)
        if identity is not None:
            break
    else:
        raise FileChanged(f"{path}: kept changing while being read; left for later")
    unreadable = [*emb.unread, *emb.problems]
    xmp_info = None
    if emb.xmp:
        try:
            xmp_info = parse_xmp(emb.xmp)
        except XmpError as exc:
            unreadable.append(f"embedded XMP: {exc}")
    if xmp_info is not None and emb.extended_xmp is not None:
        xmp_info = _with_extended(xmp_info, emb.extended_xmp, unreadable)
    sidecar_files: list[SidecarFile] = []
    sidecars: list[XmpInfo] = []
    known_sidecars = {s.path: s.identity for s in known.sidecars} if known else {}
    for sidecar in existing_sidecars(target):
        try:
            read = _read_sidecar_consistently(sidecar, known_sidecars.get(sidecar))
        except FileChanged:
            raise
        except MetadataError as exc:
            unreadable.append(str(exc))
            continue
        if read is None:
            continue  # vanished meanwhile: it is not there
        sidecar_identity, data = read
        sidecar_files.append(SidecarFile(sidecar, sidecar_identity))
        if data is None:
            unreadable.append(f"sidecar {sidecar.name} is larger than {MAX_SIDECAR >> 20} MiB")
            continue
        try:
            sidecars.append(parse_xmp(data))
        except XmpError as exc:
            unreadable.append(f"sidecar {sidecar.name}: {exc}")
    infos = [i for i in [xmp_info, *sidecars] if i is not None]
    keywords, model_keywords = keywords_of(emb, xmp_info, sidecars)
    fields = description_fields(emb, xmp_info, sidecars)
    metadata = FileMetadata(
        format=fmt,
        description=effective(fields),
        taken_at=_taken_at(emb, infos),
        width=emb.width,
        height=emb.height,
        keywords=keywords,
        model_keywords=model_keywords,
        ocr_text=next((i.text for i in [*sidecars, xmp_info] if i is not None and i.text), None),
        description_fields=fields,
        content_identifier=emb.quicktime_content_id or (emb.tiff.content_identifier if emb.tiff else None),
        captions=next((i.languages for i in [*sidecars, xmp_info] if i is not None and i.languages), ()),
    )
    return FileSnapshot(target, identity, metadata, tuple(sidecar_files), tuple(unreadable))


def _with_extended(info: XmpInfo, packet: bytes, unreadable: list[str]) -> XmpInfo:
    """``info`` with the keyword lists and OCR text of the ExtendedXMP packet added (exiftool moves the largest
    properties there, e.g. a dc:subject of thousands of keywords)."""
    try:
        ext = parse_xmp(packet)
    except XmpError as exc:
        unreadable.append(f"ExtendedXMP: {exc}")
        return info
    return replace(
        info,
        subjects=info.subjects + ext.subjects,
        hierarchical=info.hierarchical + ext.hierarchical,
        our_keywords=info.our_keywords + ext.our_keywords,
        rejected_keywords=info.rejected_keywords + ext.rejected_keywords,
        text=info.text if info.text is not None else ext.text,
    )


def _fingerprint(fd: int, st: os.stat_result, known: FileIdentity | None) -> str:
    if known is not None and known.settled and same_stat(st, known):
        return known.fingerprint
    return fingerprint_fd(fd, st.st_size)


def _read_embedded_consistently(path: Path, target: Path,
                                known: FileIdentity | None) -> tuple[str, Embedded, FileIdentity | None]:
    """(format, blocks, identity) of one read; identity None when the file changed during the read."""
    try:
        with open_noatime(target) as f:
            st = os.fstat(f.fileno())
            if st.st_size == 0:
                raise MetadataError(f"{path}: empty file")
            head = f.read(HEAD_SIZE)
            fmt = detect_format(head, target.suffix)
            try:
                emb = read_embedded(fmt, FileSource(f, st.st_size))
            except CorruptError as exc:
                raise MetadataError(f"{path}: {exc}") from None
            fingerprint = _fingerprint(f.fileno(), st, known)
            changed = stat_key(os.fstat(f.fileno())) != stat_key(st)
    except MetadataError:
        raise
    except IsADirectoryError:
        raise MetadataError(f"{path}: is a directory") from None
    except FileNotFoundError:
        raise MetadataError(f"{path}: no such file") from None
    except OSError as exc:
        raise MetadataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return fmt, emb, None if changed else FileIdentity.of(st, fingerprint)


def _read_sidecar_consistently(path: Path, known: FileIdentity | None) -> tuple[FileIdentity, bytes | None] | None:
    """(identity, content or None when over MAX_SIDECAR) of a sidecar; None when it vanished. Raises FileChanged
    when it kept changing and MetadataError when it cannot be read."""
    for _ in range(READ_ATTEMPTS):
        try:
            with open_noatime(path) as f:
                st = os.fstat(f.fileno())
                data = f.read(MAX_SIDECAR + 1) if st.st_size <= MAX_SIDECAR else None
                fingerprint = _fingerprint(f.fileno(), st, known)
                if stat_key(os.fstat(f.fileno())) == stat_key(st):
                    return FileIdentity.of(st, fingerprint), data
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise MetadataError(f"{path}: cannot read sidecar: {exc.strerror or exc}") from None
    raise FileChanged(f"{path}: kept changing while being read; left for later")
