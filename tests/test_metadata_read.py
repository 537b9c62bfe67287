"""Reading: which description wins, whose words it is, dates and sizes, for every container."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import metadata_corpus as mc
import pytest
from PIL import Image

from capwatch.config import MetadataConfig
from capwatch.errors import MetadataError
from capwatch.metadata import Provenance, read_metadata, write_caption
from capwatch.metadata.boilerplate import is_boilerplate
from capwatch.metadata.exif import TYPE_ASCII, new_tiff, set_ifd0_tags
from capwatch.metadata.formats import detect_format

needs_exiftool = pytest.mark.skipif(not mc.EXIFTOOL, reason="exiftool builds the corpus")
PROV = Provenance("tiny/model", None, "2026-03-01T12:00:00Z")


@pytest.mark.parametrize(
    ("text", "make", "model", "expected"),
    [
        ("OLYMPUS DIGITAL CAMERA", None, None, True),
        ("  sony dsc ", None, None, True),
        ("KONICA MINOLTA DIGITAL CAMERA", None, None, True),
        ("SAMSUNG DIGITAL CAMERA", None, None, True),
        ("Exif_JPEG_PICTURE", None, None, True),
        ("", None, None, True),
        ("   \x00\x00", None, None, True),
        ("123", None, None, True),
        ("hdrpl", None, None, True),
        ("IMG_1234.JPG", None, None, True),
        ("DSC01234", None, None, True),
        ("DCIM\\108GOPRO\\GOPR2137.JPG", None, None, True),
        ("Canon EOS 5D", "Canon", "Canon EOS 5D", True),
        ("NIKON D750", "NIKON CORPORATION", "NIKON D750", True),
        ("Processed with VSCO with a6 preset", None, None, True),
        ("Grandma's 80th birthday in the garden", None, None, False),
        ("A dog on a beach", "Canon", "EOS", False),
        ("Sony", None, None, False),
        ("Olympus mountain at dawn", None, None, False),
    ],
)
def test_boilerplate_recognition(text: str, make: str | None, model: str | None, expected: bool) -> None:
    assert is_boilerplate(text, make=make, model=model) is expected


@pytest.mark.parametrize(
    ("head", "ext", "fmt"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "png", "jpeg"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "jpg", "png"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "jpg", "webp"),
        (b"GIF89a\x01\x00", "", "gif"),
        (b"II*\x00\x08\x00\x00\x00", "tif", "tiff"),
        (b"II*\x00\x10\x00\x00\x00CR\x02\x00", "tif", "raw"),
        (b"MM\x00*\x00\x00\x00\x08", "NEF", "raw"),
        (b"IIRO\x08\x00\x00\x00", "", "raw"),
        (b"IIU\x00\x08\x00\x00\x00", "", "raw"),
        (b"FUJIFILMCCD-RAW 0201", "", "raw"),
        (b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01", "", "raw"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "", "heif"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "", "avif"),
        (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00avifmif1", "", "avif"),
        (b"BM" + bytes(30), "", "bmp"),
        (b"hello world", "jpg", "unknown"),
        (b"", "jpg", "unknown"),
    ],
)
def test_format_is_detected_by_magic_bytes(head: bytes, ext: str, fmt: str) -> None:
    assert detect_format(head, ext) == fmt


def _jpeg(tmp_path: Path, name: str, *tags: str) -> Path:
    path = mc.make_jpeg(tmp_path / name)
    if tags:
        mc.exiftool_batch([[*tags, path]])
    return path


def _mwg(path: Path) -> str | None:
    value = json.loads(mc.exiftool("-j", "-use", "MWG", "-Description", path))[0].get("Description")
    return None if value is None else str(value)


@needs_exiftool
def test_description_choice_follows_mwg_like_exiftool(tmp_path: Path) -> None:
    exif_vs_xmp = _jpeg(tmp_path, "a.jpg", "-ImageDescription=Words in EXIF", "-XMP-dc:Description=Words in XMP")
    synced = _jpeg(tmp_path, "b.jpg", "-IPTC:Caption-Abstract=Words in IPTC", "-XMP-dc:Description=Words in XMP",
                   "-IPTCDigest=new")
    stale = _jpeg(tmp_path, "c.jpg", "-IPTC:Caption-Abstract=Words in IPTC", "-XMP-dc:Description=Words in XMP",
                  "-IPTCDigest=new")
    # An IPTC-only editor changed the caption after the last MWG-aware write: the digest no longer matches.
    stale.write_bytes(stale.read_bytes().replace(b"Words in IPTC", b"Later in IPTC"))
    iptc_only = _jpeg(tmp_path, "d.jpg", "-IPTC:Caption-Abstract=Words in IPTC")
    no_digest = _jpeg(tmp_path, "e.jpg", "-IPTC:Caption-Abstract=Words in IPTC", "-XMP-dc:Description=Words in XMP")
    cases = ((exif_vs_xmp, "exif"), (synced, "xmp"), (stale, "iptc"), (iptc_only, "iptc"), (no_digest, "xmp"))
    for path, origin in cases:
        desc = read_metadata(path).description
        assert desc is not None
        assert (desc.text, desc.origin, desc.kind) == (_mwg(path), origin, "human")


@needs_exiftool
def test_camera_boilerplate_loses_to_real_words_and_is_reported_as_boilerplate(tmp_path: Path) -> None:
    both = _jpeg(tmp_path, "a.jpg", "-ImageDescription=OLYMPUS DIGITAL CAMERA", "-XMP-dc:Description=Our cat")
    desc = read_metadata(both).description
    assert desc is not None and (desc.text, desc.kind, desc.origin) == ("Our cat", "human", "xmp")
    junk = _jpeg(tmp_path, "b.jpg", "-Make=NIKON CORPORATION", "-Model=NIKON D750", "-ImageDescription=NIKON D750")
    desc = read_metadata(junk).description
    assert desc is not None and (desc.text, desc.kind) == ("NIKON D750", "boilerplate")
    blank = _jpeg(tmp_path, "c.jpg", "-ImageDescription=          ")
    assert read_metadata(blank).description is None


@needs_exiftool
def test_first_language_is_used_without_x_default(tmp_path: Path) -> None:
    path = _jpeg(tmp_path, "a.jpg", "-XMP-dc:Description-de=Kühe auf der Weide")
    desc = read_metadata(path).description
    assert desc is not None and desc.text == "Kühe auf der Weide"


@needs_exiftool
def test_non_utf8_exif_text_is_read_as_latin1(tmp_path: Path) -> None:
    path = mc.make_jpeg(tmp_path / "a.jpg")
    tiff = set_ifd0_tags(new_tiff(), {0x010E: (TYPE_ASCII, "Café au lait".encode("latin-1") + b"\x00")})
    mc.jpeg_insert_segment(path, 0xE1, b"Exif\x00\x00" + tiff)
    desc = read_metadata(path).description
    assert desc is not None and (desc.text, desc.kind, desc.origin) == ("Café au lait", "human", "exif")
    result = write_caption(path, "A cup of coffee", PROV, MetadataConfig(), force=True)
    assert result.written == ("exif", "xmp")
    assert mc.exif_fields(path)["IFD0:ImageDescription"] == "A cup of coffee"


@needs_exiftool
def test_latin1_iptc_is_decoded_and_transcoded_when_utf8_is_declared(tmp_path: Path) -> None:
    path = _jpeg(tmp_path, "a.jpg", "-IPTC:Caption-Abstract=OLYMPUS DIGITAL CAMERA", "-IPTC:City=Zürich",
                 "-charset", "iptc=Latin")
    assert b"Z\xfcrich" in path.read_bytes()
    write_caption(path, "Altstadt bei Nacht – schön", PROV, MetadataConfig())
    tags = json.loads(mc.exiftool("-j", "-IPTC:all", path))[0]
    assert tags["City"] == "Zürich"
    assert tags["Caption-Abstract"] == "Altstadt bei Nacht – schön"
    assert tags["CodedCharacterSet"] == "UTF8"


@needs_exiftool
def test_iptc_caption_is_cut_at_2000_bytes_on_a_character_boundary_and_still_ours(tmp_path: Path) -> None:
    path = _jpeg(tmp_path, "a.jpg", "-IPTC:Keywords=x")
    caption = "a" * 1999 + "é and more"
    write_caption(path, caption, PROV, MetadataConfig())
    tags = json.loads(mc.exiftool("-j", "-charset", "iptc=UTF8", "-IPTC:Caption-Abstract", path))[0]
    assert tags["Caption-Abstract"] == "a" * 1999
    # With the EXIF and XMP gone, the truncated IPTC copy alone is still recognised as ours.
    mc.exiftool_batch([["-EXIF:all=", "-XMP-dc:Description=", path]])
    desc = read_metadata(path).description
    assert desc is not None and desc.origin == "iptc" and desc.kind == "ours"


@needs_exiftool
def test_a_person_editing_our_caption_makes_it_theirs(tmp_path: Path) -> None:
    path = _jpeg(tmp_path, "a.jpg")
    write_caption(path, "a dog on a beach", PROV, MetadataConfig())
    desc = read_metadata(path).description
    assert desc is not None and desc.kind == "ours"
    mc.exiftool_batch([["-use", "MWG", "-Description=Rex on Brighton beach", path]])
    desc = read_metadata(path).description
    assert desc is not None and (desc.text, desc.kind, desc.provenance) == ("Rex on Brighton beach", "human", None)
    result = write_caption(path, "a dog on a beach", PROV, MetadataConfig())
    assert result.written == () and result.skipped is not None and "keep" in result.skipped


@needs_exiftool
def test_capture_time_fallbacks(tmp_path: Path) -> None:
    original = _jpeg(tmp_path, "a.jpg", "-DateTimeOriginal=2021:07:08 09:10:11", "-CreateDate=2000:01:01 00:00:00")
    created = _jpeg(tmp_path, "b.jpg", "-DateTimeOriginal=0000:00:00 00:00:00", "-CreateDate=2019:01:02 03:04:05")
    xmp_only = _jpeg(tmp_path, "c.jpg", "-XMP-photoshop:DateCreated=2018-05-06T07:08:09+02:00")
    xmp_date = _jpeg(tmp_path, "d.jpg", "-XMP-exif:DateTimeOriginal=2017-02-03")
    nothing = _jpeg(tmp_path, "e.jpg")
    assert read_metadata(original).taken_at == "2021-07-08T09:10:11"
    assert read_metadata(created).taken_at == "2019-01-02T03:04:05"
    assert read_metadata(xmp_only).taken_at == "2018-05-06T07:08:09"
    assert read_metadata(xmp_date).taken_at == "2017-02-03T00:00:00"
    assert read_metadata(nothing).taken_at is None


def test_sizes_and_formats_match_pillow(tmp_path: Path) -> None:
    files = {
        "jpeg": mc.make_jpeg(tmp_path / "a.jpg"),
        "png": mc.make_png(tmp_path / "a.png"),
        "webp": mc.make_webp(tmp_path / "a.webp"),
        "tiff": mc.make_tiff(tmp_path / "a.tif"),
    }
    files["gif"] = tmp_path / "a.gif"
    mc.noise_rgb().save(files["gif"])
    files["bmp"] = tmp_path / "a.bmp"
    mc.noise_rgb().save(files["bmp"])
    anim = mc.make_animated_webp(tmp_path / "anim.webp")
    lossless = mc.make_webp(tmp_path / "ll.webp", lossless=True, alpha=True)
    renamed = tmp_path / "really_png.jpg"
    renamed.write_bytes(files["png"].read_bytes())
    for fmt, path in [*files.items(), ("webp", anim), ("webp", lossless), ("png", renamed)]:
        meta = read_metadata(path)
        with Image.open(path) as img:
            assert (meta.format, meta.width, meta.height) == (fmt, *img.size), path.name


def _heic_with_exif(path: Path, description: str) -> None:
    """A minimal HEIF container (ftyp + meta with an Exif item and ispe) around an EXIF block."""
    tiff = set_ifd0_tags(new_tiff(">"), {0x010E: (TYPE_ASCII, description.encode() + b"\x00")})
    payload = struct.pack(">I", 6) + b"Exif\x00\x00" + tiff

    def box(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", 8 + len(body)) + kind + body

    ftyp = box(b"ftyp", b"heic" + bytes(4) + b"mif1heic")
    infe = box(b"infe", b"\x02\x00\x00\x00" + struct.pack(">HH", 7, 0) + b"Exif" + b"\x00")
    iinf = box(b"iinf", bytes(4) + struct.pack(">H", 1) + infe)
    ispe = box(b"ispe", bytes(4) + struct.pack(">II", 4032, 3024))
    iprp = box(b"iprp", box(b"ipco", ispe))

    def meta_with(offset: int) -> bytes:
        iloc = box(b"iloc", bytes(4) + bytes((0x44, 0x00)) + struct.pack(">HHHHII", 1, 7, 0, 1, offset,
                                                                            len(payload)))
        return box(b"meta", bytes(4) + iinf + iloc + iprp)

    head_len = len(ftyp) + len(meta_with(0)) + 8
    path.write_bytes(ftyp + meta_with(head_len) + box(b"mdat", payload))


def test_heif_exif_item_and_size_are_read(tmp_path: Path) -> None:
    path = tmp_path / "a.heic"
    _heic_with_exif(path, "Sunset over the lake")
    meta = read_metadata(path)
    assert (meta.format, meta.width, meta.height) == ("heif", 4032, 3024)
    assert meta.description is not None and meta.description.text == "Sunset over the lake"


def test_hostile_xmp_is_ignored_when_reading(tmp_path: Path) -> None:
    path = mc.make_jpeg(tmp_path / "a.jpg")
    bomb = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;">]>'
            b'<x:xmpmeta xmlns:x="adobe:ns:meta/">&b;</x:xmpmeta>')
    mc.jpeg_insert_segment(path, 0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + bomb)
    tiff = set_ifd0_tags(new_tiff(), {0x010E: (TYPE_ASCII, b"A red boat\x00")})
    mc.jpeg_insert_segment(path, 0xE1, b"Exif\x00\x00" + tiff)
    desc = read_metadata(path).description
    assert desc is not None and desc.text == "A red boat"


def test_unreadable_files_raise_one_line_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    for path in (empty, broken, tmp_path / "missing.jpg", tmp_path):
        with pytest.raises(MetadataError) as info:
            read_metadata(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


@needs_exiftool
def test_tiff_and_raw_go_to_sidecars_merged_with_existing_tags(tmp_path: Path) -> None:
    tiff = mc.make_tiff(tmp_path / "scan.tif")
    existing = tmp_path / "scan.xmp"
    existing.write_bytes(mc.xmp_packet(
        '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/" xmp:Rating="5">'
        "<dc:subject><rdf:Bag><rdf:li>family</rdf:li></rdf:Bag></dc:subject></rdf:Description>"
    ))
    before = tiff.read_bytes()
    result = write_caption(tiff, "An old family photo", PROV, MetadataConfig())
    assert result.written == ("sidecar",)
    assert tiff.read_bytes() == before
    assert not (tmp_path / "scan.tif.xmp").exists()
    tags = json.loads(mc.exiftool("-j", "-G1", "-XMP-dc:all", "-XMP-xmp:Rating", existing))[0]
    assert tags["XMP-dc:Description"] == "An old family photo"
    assert tags["XMP-dc:Subject"] == "family" and tags["XMP-xmp:Rating"] == 5
    assert mc.exiv2_fields(existing)["Xmp.dc.description"] == 'lang="x-default" An old family photo'
    desc = read_metadata(tiff).description
    assert desc is not None and (desc.kind, desc.origin) == ("ours", "sidecar")

    raw = tmp_path / "DSC_0001.NEF"
    raw.write_bytes(before)
    assert read_metadata(raw).format == "raw"
    write_caption(raw, "A heron", PROV, MetadataConfig())
    assert json.loads(mc.exiftool("-j", "-XMP-dc:Description", tmp_path / "DSC_0001.NEF.xmp"))[0][
        "Description"] == "A heron"


def test_duplicate_metadata_segments_still_read_the_first(tmp_path: Path) -> None:
    path = mc.make_jpeg(tmp_path / "dup.jpg")
    for text in (b"Second\x00", b"First one\x00"):
        tiff = set_ifd0_tags(new_tiff(), {0x010E: (TYPE_ASCII, text)})
        mc.jpeg_insert_segment(path, 0xE1, b"Exif\x00\x00" + tiff)
    desc = read_metadata(path).description
    assert desc is not None and desc.text == "First one"
