"""Never write what could not be fully read: every cap on the read side (PNG text chunks 8 MiB, sidecars 16 MiB,
EXIF ImageDescription/XPComment 1 MiB, TIFF XMP 16 MiB), XMP kept where capwatch does not rewrite it, and damaged
text blocks make the write side refuse with one line, leaving the file and its sidecars byte-identical.

The files are what real tools leave behind: XMP packets a person filled in (description, rating, keywords) that
grew past a cap through thousands of xmpMM:DocumentAncestors (Photoshop appends one per placed document)."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import zlib
from pathlib import Path

import metadata_corpus as mc
import pytest
from PIL import TiffImagePlugin

from capwatch.config import MetadataConfig
from capwatch.errors import MetadataError
from capwatch.metadata import Provenance, read_metadata, write_caption
from tests.conftest import FIXTURES, CliRunner, assert_one_line_error

REPO = Path(__file__).resolve().parent.parent
MODEL = FIXTURES / "models" / "vit-gpt2-tiny-greedy"
#: The CLI child imports the tree under test (this file's checkout), not whatever capwatch is installed.
CHILD_ENV = {"PYTHONPATH": str(REPO)}
needs_exiftool = pytest.mark.skipif(not mc.EXIFTOOL, reason="exiftool is the independent reader")

MiB = 1 << 20
PNG_TEXT_CAP = 8 * MiB
SIDECAR_CAP = 16 * MiB
EXIF_TEXT_CAP = 1 * MiB
TIFF_BLOCK_CAP = 16 * MiB
HEIF_ITEM_CAP = 4 * MiB
RAF_PREVIEW_CAP = 1 * MiB
GIF_SCAN_CAP = 32 * MiB

PROV = Provenance("tiny/model", None, "2026-03-01T12:00:00Z")
CAPTION = "a lighthouse on a cliff"
PERSON = "Grandma's 80th birthday at the lake house, with all the grandchildren"
KEYWORDS = ("family", "birthday", "grandma", "lake")
NS = ('xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
      'xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/"')
#: One xmpMM:DocumentAncestors entry (about 61 bytes, as Photoshop writes them).
ANCESTOR_BYTES = len("<rdf:li>xmp.did:00000000-5a1e-4c2b-9d3f-000000000000</rdf:li>")


def person_xmp(min_size: int = 0) -> bytes:
    """A complete XMP packet with a person's dc:description, xmp:Rating and dc:subject keywords, padded with as
    many xmpMM:DocumentAncestors as it takes to be larger than ``min_size`` bytes."""
    count = min_size // ANCESTOR_BYTES + 16 if min_size else 3
    ancestors = "".join(f"<rdf:li>xmp.did:{i:08x}-5a1e-4c2b-9d3f-{(i * 2654435761) & 0xFFFFFFFFFFFF:012x}</rdf:li>"
                        for i in range(count))
    subjects = "".join(f"<rdf:li>{k}</rdf:li>" for k in KEYWORDS)
    packet = mc.xmp_packet(
        f'<rdf:Description rdf:about="" {NS}>'
        "<xmp:Rating>5</xmp:Rating>"
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{PERSON}</rdf:li></rdf:Alt></dc:description>'
        f"<dc:subject><rdf:Bag>{subjects}</rdf:Bag></dc:subject>"
        f"<xmpMM:DocumentAncestors><rdf:Bag>{ancestors}</rdf:Bag></xmpMM:DocumentAncestors>"
        "</rdf:Description>"
    )
    assert len(packet) > min_size
    return packet


# -- building files ---------------------------------------------------------------------------------------------


def png_with_chunk_after_ihdr(path: Path, chunk: bytes) -> Path:
    """A PNG with ``chunk`` right after IHDR (where exiftool and Adobe put XMP), before the image data."""
    mc.make_png(path)
    data = path.read_bytes()
    ihdr_end = 8 + 12 + struct.unpack(">I", data[8:12])[0]
    path.write_bytes(data[:ihdr_end] + chunk + data[ihdr_end:])
    return path


def itxt(keyword: bytes, text: bytes, *, compressed: bool = False) -> bytes:
    body = zlib.compress(text, 9) if compressed else text
    return mc.png_chunk(b"iTXt", keyword + b"\x00" + bytes((int(compressed), 0)) + b"\x00\x00" + body)


def text_chunk(keyword: bytes, text: bytes) -> bytes:
    return mc.png_chunk(b"tEXt", keyword + b"\x00" + text)


def ztxt(keyword: bytes, text: bytes) -> bytes:
    return mc.png_chunk(b"zTXt", keyword + b"\x00\x00" + zlib.compress(text, 9))


def tiff_with_tags(path: Path, tags: dict[int, tuple[int, bytes | str]]) -> Path:
    """A small RGB TIFF whose IFD0 also holds ``tags`` ({tag: (TIFF type, value)})."""
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    for tag, (typ, value) in tags.items():
        ifd[tag] = value
        ifd.tagtype[tag] = typ
    mc.noise_rgb().save(path, "TIFF", tiffinfo=ifd)
    return path


def files_in(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` (not recursive) with its content: catches temp files, new sidecars, changes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_refused(path: Path, config: MetadataConfig | None = None, *, force: bool = False) -> str:
    """write_caption raises one-line MetadataError naming ``path``, and nothing in its folder changed."""
    before = files_in(path.parent)
    with pytest.raises(MetadataError) as info:
        write_caption(path, CAPTION, PROV, config or MetadataConfig(), force=force)
    message = str(info.value)
    assert message and "\n" not in message, message
    assert path.name in message, message
    after = files_in(path.parent)
    assert sorted(after) == sorted(before), "files were added or removed next to the image"
    for name, data in before.items():
        assert after[name] == data, f"{name} changed ({len(data)} -> {len(after[name])} bytes)"
    return message


def exiftool_view(path: Path) -> dict[str, object]:
    """The person's fields as exiftool reads them (without the huge ancestor list)."""
    raw = mc.exiftool("-j", "-G1", "-a", "-XMP-dc:Description", "-XMP-xmp:Rating", "-XMP-dc:Subject",
                      "-PNG:Description", "-IFD0:ImageDescription", path)
    view: dict[str, object] = json.loads(raw)[0]
    view.pop("SourceFile", None)
    return view


# -- 1. PNG XMP iTXt over 8 MiB ------------------------------------------------------------------------------------


def big_xmp_png(path: Path) -> Path:
    packet = person_xmp(PNG_TEXT_CAP + 64 * 1024)
    png_with_chunk_after_ihdr(path, itxt(b"XML:com.adobe.xmp", packet))
    assert path.stat().st_size > PNG_TEXT_CAP
    return path


def test_png_xmp_chunk_over_8mib_is_not_replaced(tmp_path: Path) -> None:
    # Old behaviour: the chunk was skipped as "no XMP", the description looked absent, and the write replaced the
    # whole 8+ MiB packet (description, rating, keywords, history) by capwatch's own (8.4 MB -> 3 KB here).
    path = big_xmp_png(tmp_path / "party.png")
    message = assert_refused(path)
    assert "XMP" in message, message
    assert_refused(path, force=True)  # --force replaces a person's words, never what it could not read


def test_png_xmp_chunk_over_8mib_is_refused_by_the_cli(run_cli: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    path = big_xmp_png(tmp_path / "lib" / "party.png")
    before = files_in(path.parent)
    result = run_cli("--db", tmp_path / "index.db", "--model", MODEL.resolve(), "caption", path, env=CHILD_ENV)
    line = assert_one_line_error(result, code=1)
    assert "party.png" in line, line
    assert files_in(path.parent) == before


@needs_exiftool
def test_png_xmp_chunk_over_8mib_reads_the_same_to_exiftool_after_the_refusal(tmp_path: Path) -> None:
    path = big_xmp_png(tmp_path / "party.png")
    seen = exiftool_view(path)
    # The independent reader sees the person's words: the file really has a description, rating and keywords.
    assert seen.get("XMP-dc:Description") == PERSON, seen
    assert seen.get("XMP-xmp:Rating") == 5, seen
    assert seen.get("XMP-dc:Subject") == list(KEYWORDS), seen
    with pytest.raises(MetadataError):
        write_caption(path, CAPTION, PROV, MetadataConfig())
    assert exiftool_view(path) == seen


# -- 2. compressed iTXt that inflates past 8 MiB ---------------------------------------------------------------------


def test_compressed_xmp_chunk_inflating_past_8mib_is_refused(tmp_path: Path) -> None:
    packet = person_xmp(PNG_TEXT_CAP + 64 * 1024)
    chunk = itxt(b"XML:com.adobe.xmp", packet, compressed=True)
    assert len(chunk) < PNG_TEXT_CAP // 2  # small on disk: the size cap on the chunk itself does not catch it
    path = png_with_chunk_after_ihdr(tmp_path / "party.png", chunk)
    message = assert_refused(path)
    assert "XMP" in message, message


# -- 3. XMP in tEXt / zTXt ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tEXt", "zTXt"])
def test_xmp_in_a_text_or_ztxt_chunk_is_refused_not_doubled(tmp_path: Path, kind: str) -> None:
    # A second packet in an iTXt would leave two XMP packets, and readers would disagree on which one counts.
    packet = person_xmp()
    chunk = text_chunk(b"XML:com.adobe.xmp", packet) if kind == "tEXt" else ztxt(b"XML:com.adobe.xmp", packet)
    path = png_with_chunk_after_ihdr(tmp_path / "party.png", chunk)
    assert_refused(path)
    assert_refused(path, force=True)


# -- 4. sidecars over 16 MiB ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "sidecar_name", "config"), [
    ("scan.tif", "scan.tif.xmp", MetadataConfig()),  # TIFF is always written to a sidecar
    ("scan.tif", "scan.xmp", MetadataConfig()),  # Lightroom naming
    ("photo.jpg", "photo.jpg.xmp", MetadataConfig(write="sidecar")),
    ("photo.jpg", "photo.xmp", MetadataConfig(write="both")),
])
def test_sidecar_over_16mib_is_left_alone(tmp_path: Path, image: str, sidecar_name: str,
                                          config: MetadataConfig) -> None:
    path = mc.make_tiff(tmp_path / image) if image.endswith(".tif") else mc.make_jpeg(tmp_path / image)
    sidecar = tmp_path / sidecar_name
    sidecar.write_bytes(person_xmp(SIDECAR_CAP + 64 * 1024))
    assert sidecar.stat().st_size > SIDECAR_CAP
    # The read may not know the description (None is allowed), but it must not be taken for a file without one.
    meta = read_metadata(path)
    assert meta.description is None or meta.description.kind == "human", meta.description
    message = assert_refused(path, config)
    assert "sidecar" in message, message
    assert_refused(path, config, force=True)


# -- 5. EXIF text over 1 MiB, TIFF XMP over 16 MiB ----------------------------------------------------------------


def _long_description() -> str:
    # A person's long text (an archive's provenance notes), not padding a reader may skip.
    line = "Box 14, folder 3: letters from Aunt Ilse to the family in Bremen, 1951-1958. "
    return line * (EXIF_TEXT_CAP // len(line) + 64)


@pytest.mark.parametrize("tag", ["ImageDescription", "XPComment", "XMP"])
def test_tiff_tag_over_its_cap_is_refused(tmp_path: Path, tag: str) -> None:
    # A JPEG APP1 cannot hold 1 MiB, so this is a TIFF: capwatch writes its sidecar, which would then hide (MWG:
    # the sidecar wins) and contradict the description it could not read.
    text = _long_description()
    if tag == "ImageDescription":
        tags: dict[int, tuple[int, bytes | str]] = {0x010E: (2, text)}
    elif tag == "XPComment":
        tags = {0x9C9C: (1, text.encode("utf-16-le") + b"\x00\x00")}
    else:
        tags = {0x02BC: (1, person_xmp(TIFF_BLOCK_CAP + 64 * 1024))}
    path = tiff_with_tags(tmp_path / "letters.tif", tags)
    cap = TIFF_BLOCK_CAP if tag == "XMP" else EXIF_TEXT_CAP
    assert path.stat().st_size > cap
    message = assert_refused(path)
    assert tag in message, message
    assert_refused(path, force=True)


def test_tiff_description_just_under_the_cap_is_read_as_a_persons(tmp_path: Path) -> None:
    # The control for the test above: the same kind of file under the cap is read, and kept.
    text = "Box 14, folder 3: letters from Aunt Ilse to the family in Bremen, 1951-1958."
    path = tiff_with_tags(tmp_path / "letters.tif", {0x010E: (2, text)})
    meta = read_metadata(path)
    assert meta.description is not None and meta.description.text == text and meta.description.kind == "human"
    before = files_in(tmp_path)
    result = write_caption(path, CAPTION, PROV, MetadataConfig())
    assert result.written == () and result.skipped and "keep" in result.skipped
    assert files_in(tmp_path) == before


# -- 6. PNG Description in zTXt -------------------------------------------------------------------------------------


def test_png_description_in_ztxt_is_a_persons_and_is_kept(tmp_path: Path) -> None:
    path = png_with_chunk_after_ihdr(tmp_path / "party.png", ztxt(b"Description", PERSON.encode("latin-1")))
    meta = read_metadata(path)
    assert meta.description is not None, "zTXt Description not read"
    assert (meta.description.text, meta.description.kind, meta.description.origin) == (PERSON, "human", "png")
    before = files_in(tmp_path)
    result = write_caption(path, CAPTION, PROV, MetadataConfig())
    assert result.written == () and result.skipped and "keep" in result.skipped, result
    assert files_in(tmp_path) == before


@needs_exiftool
def test_png_description_in_ztxt_reads_the_same_to_exiftool(tmp_path: Path) -> None:
    path = png_with_chunk_after_ihdr(tmp_path / "party.png", ztxt(b"Description", PERSON.encode("latin-1")))
    seen = exiftool_view(path)
    assert seen.get("PNG:Description") == PERSON, seen
    write_caption(path, CAPTION, PROV, MetadataConfig())
    assert exiftool_view(path) == seen


@pytest.mark.parametrize("case", ["damaged", "over-8mib", "itxt-damaged"])
def test_png_description_that_cannot_be_read_is_refused(tmp_path: Path, case: str) -> None:
    if case == "damaged":
        good = zlib.compress(PERSON.encode("latin-1"))
        chunk = mc.png_chunk(b"zTXt", b"Description\x00\x00" + good[:6] + b"\xff" * 8 + good[14:])
    elif case == "over-8mib":
        chunk = ztxt(b"Description", (PERSON + " ").encode("latin-1") * (PNG_TEXT_CAP // len(PERSON) + 1024))
    else:
        good = zlib.compress(PERSON.encode("utf-8"))
        chunk = mc.png_chunk(b"iTXt", b"Description\x00\x01\x00\x00\x00" + good[:6] + b"\xff" * 8 + good[14:])
    path = png_with_chunk_after_ihdr(tmp_path / "party.png", chunk)
    assert_refused(path)
    assert_refused(path, force=True)


# -- controls: the same packet under the caps is a person's description ----------------------------------------------


@pytest.mark.parametrize("where", ["png-itxt", "sidecar"])
def test_the_same_packet_under_the_cap_is_read_as_a_persons_description(tmp_path: Path, where: str) -> None:
    packet = person_xmp(64 * 1024)
    if where == "png-itxt":
        path = png_with_chunk_after_ihdr(tmp_path / "party.png", itxt(b"XML:com.adobe.xmp", packet))
    else:
        path = mc.make_tiff(tmp_path / "scan.tif")
        (tmp_path / "scan.tif.xmp").write_bytes(packet)
    meta = read_metadata(path)
    assert meta.description is not None and meta.description.text == PERSON and meta.description.kind == "human"
    before = files_in(tmp_path)
    result = write_caption(path, CAPTION, PROV, MetadataConfig())
    assert result.written == () and result.skipped and "keep" in result.skipped, result
    assert files_in(tmp_path) == before


# -- 7. the other containers' caps: GIF scan 32 MiB, HEIF items 4 MiB, RAF preview 1 MiB ------------------------------


def _gif_comment(size: int) -> bytes:
    """A GIF comment extension of about ``size`` bytes (255-byte sub-blocks), as long animations carry."""
    return b"\x21\xfe" + (b"\xff" + b"." * 255) * (size // 256 + 1) + b"\x00"


def gif_with_xmp(path: Path, xmp_at: int, packet: bytes) -> Path:
    """A GIF whose XMP application extension (XMP DataXMP, packet, 258-byte magic trailer) starts at about
    ``xmp_at`` bytes into the file (a comment extension fills the space before it)."""
    buf = io.BytesIO()
    mc.noise_rgb().convert("P").save(buf, "GIF")
    gif = buf.getvalue()
    assert gif.endswith(b";")
    head = gif[:-1]
    pad = _gif_comment(xmp_at - len(head)) if xmp_at > len(head) + 512 else b""
    ext = b"\x21\xff\x0bXMP DataXMP" + packet + b"\x01" + bytes(range(255, -1, -1)) + b"\x00"
    path.write_bytes(head + pad + ext + b";")
    return path


@pytest.mark.parametrize("where", ["after-the-cap", "across-the-cap"])
def test_gif_over_the_scan_cap_is_refused(tmp_path: Path, where: str) -> None:
    # A GIF larger than the 32 MiB capwatch scans for XMP: a packet further in (or running past the cap) is not
    # seen, and a sidecar with capwatch's caption would hide the person's description in it.
    if where == "after-the-cap":
        path = gif_with_xmp(tmp_path / "party.gif", GIF_SCAN_CAP + MiB, person_xmp())
    else:
        path = gif_with_xmp(tmp_path / "party.gif", GIF_SCAN_CAP - 4096, person_xmp(64 * 1024))
    assert path.stat().st_size > GIF_SCAN_CAP
    assert_refused(path)
    assert_refused(path, force=True)


@needs_exiftool
def test_gif_over_the_scan_cap_holds_a_description_exiftool_reads(tmp_path: Path) -> None:
    # The premise of the test above, from the independent reader; and the refused write leaves it as it was.
    path = gif_with_xmp(tmp_path / "party.gif", GIF_SCAN_CAP + MiB, person_xmp())
    seen = exiftool_view(path)
    assert seen.get("XMP-dc:Description") == PERSON, seen
    with contextlib.suppress(MetadataError):
        write_caption(path, CAPTION, PROV, MetadataConfig())
    assert exiftool_view(path) == seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["party.gif"]


def test_small_gif_xmp_is_read_as_a_persons_description(tmp_path: Path) -> None:
    path = gif_with_xmp(tmp_path / "party.gif", 0, person_xmp())
    meta = read_metadata(path)
    assert meta.description is not None and meta.description.text == PERSON and meta.description.kind == "human"
    before = files_in(tmp_path)
    result = write_caption(path, CAPTION, PROV, MetadataConfig())
    assert result.written == () and result.skipped and "keep" in result.skipped, result
    assert files_in(tmp_path) == before


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _full_box(kind: bytes, version: int, payload: bytes) -> bytes:
    return _box(kind, bytes((version, 0, 0, 0)) + payload)


def heif_with_xmp(path: Path, packet: bytes, *, in_idat: bool = False) -> Path:
    """A minimal HEIF: ftyp, a meta box (hdlr, pitm, iinf with an hvc1 image item and an application/rdf+xml
    item, iloc, iprp/ispe) and the XMP either in an mdat (construction method 0, file offsets) or in the meta
    box's idat (construction method 1)."""
    ftyp = _box(b"ftyp", b"heic" + b"\0\0\0\0" + b"mif1heic")
    hdlr = _full_box(b"hdlr", 0, b"\0" * 4 + b"pict" + b"\0" * 12 + b"\0")
    pitm = _full_box(b"pitm", 0, struct.pack(">H", 1))
    image = _full_box(b"infe", 2, struct.pack(">HH", 1, 0) + b"hvc1" + b"\0")
    xmp_item = _full_box(b"infe", 2, struct.pack(">HH", 2, 0) + b"mime" + b"\0" + b"application/rdf+xml\0")
    iinf = _full_box(b"iinf", 0, struct.pack(">H", 2) + image + xmp_item)
    ispe = _full_box(b"ispe", 0, struct.pack(">II", 64, 48))
    iprp = _box(b"iprp", _box(b"ipco", ispe) + _box(b"ipma", b"\0\0\0\0" + struct.pack(">IHBB", 1, 1, 1, 0x81)))

    def iloc(xmp_offset: int) -> bytes:
        items = struct.pack(">HHHH", 1, 0, 0, 1) + struct.pack(">II", 0, 0)
        items += struct.pack(">HHHH", 2, 1 if in_idat else 0, 0, 1) + struct.pack(">II", xmp_offset, len(packet))
        return _full_box(b"iloc", 1, bytes((0x44, 0x00)) + struct.pack(">H", 2) + items)

    if in_idat:
        data = ftyp + _full_box(b"meta", 0, hdlr + pitm + iinf + iloc(0) + iprp + _box(b"idat", packet))
    else:
        meta_size = len(_full_box(b"meta", 0, hdlr + pitm + iinf + iloc(0) + iprp))
        meta = _full_box(b"meta", 0, hdlr + pitm + iinf + iloc(len(ftyp) + meta_size + 8) + iprp)
        data = ftyp + meta + _box(b"mdat", packet)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", ["item-over-4mib", "item-in-idat"])
def test_heif_xmp_item_not_read_is_refused(tmp_path: Path, case: str) -> None:
    # "item-in-idat": an XMP item stored in the meta box (construction method 1), which capwatch does not read
    # (exiftool warns it cannot either): a sidecar written now would hide whatever it says.
    if case == "item-over-4mib":
        path = heif_with_xmp(tmp_path / "party.heic", person_xmp(HEIF_ITEM_CAP + 64 * 1024))
    else:
        path = heif_with_xmp(tmp_path / "party.heic", person_xmp(), in_idat=True)
    assert_refused(path)
    assert_refused(path, force=True)


def test_small_heif_xmp_item_is_read_as_a_persons_description(tmp_path: Path) -> None:
    # The control: the HEIF builder makes a file whose XMP capwatch reads.
    path = heif_with_xmp(tmp_path / "party.heic", person_xmp())
    meta = read_metadata(path)
    assert meta.format == "heif", meta
    assert meta.description is not None and meta.description.text == PERSON and meta.description.kind == "human"


def test_raf_preview_over_1mib_is_refused(tmp_path: Path) -> None:
    # Fujifilm RAF: header, then (offset, length) of the embedded JPEG preview at byte 84; capwatch reads only
    # the preview's first MiB, so a description further in would be overlooked.
    preview = mc.make_jpeg(tmp_path / "preview.jpg").read_bytes()
    (tmp_path / "preview.jpg").unlink()
    preview += b"\0" * (RAF_PREVIEW_CAP + 4096)  # full-size previews are several MiB
    offset = 160
    head = b"FUJIFILMCCD-RAW 0201FF383501".ljust(84, b"\0") + struct.pack(">II", offset, len(preview))
    path = tmp_path / "DSCF0001.RAF"
    path.write_bytes(head.ljust(offset, b"\0") + preview)
    assert read_metadata(path).format == "raw"
    assert_refused(path)
