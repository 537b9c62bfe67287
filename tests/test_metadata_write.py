"""Writing captions: every reader (exiftool, exiv2, MWG) sees the caption, nothing else changes."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import metadata_corpus as mc
import pytest

from capwatch.config import MetadataConfig
from capwatch.metadata import Provenance, read_metadata, write_caption
from capwatch.metadata.binary import BytesSource
from capwatch.metadata.exif import read_tiff
from capwatch.metadata.jpeg import read_jpeg

pytestmark = pytest.mark.skipif(not (mc.EXIFTOOL and mc.EXIV2), reason="exiftool and exiv2 are the reference readers")

PROV = Provenance("Xenova/vit-gpt2-image-captioning", "0e334c7", "2026-03-01T12:00:00Z")
CAPTION = "Zwei Hunde laufen am Strand – 海辺の犬 & <friends>"
EMBEDDED = MetadataConfig()


def _jpeg_full(d: Path) -> tuple[Path, list[str]]:
    p = mc.make_jpeg(d / "full.jpg")
    return p, [
        "-Make=OLYMPUS IMAGING CORP.", "-Model=E-M5", "-DateTimeOriginal=2021:07:08 09:10:11",
        "-ImageDescription=OLYMPUS DIGITAL CAMERA", "-IPTC:Keywords=beach", "-IPTC:City=Zürich",
        "-IPTC:Caption-Abstract=OLYMPUS DIGITAL CAMERA", "-XMP-dc:Subject=dog", "-XMP-dc:Creator=Ann",
        "-XMP-dc:Description=OLYMPUS DIGITAL CAMERA", "-XMP-dc:Description-de=Hunde am Strand",
        "-XMP-dc:Description-fr=Chiens sur la plage",
        "-XMP-xmp:Rating=4", "-charset", "iptc=UTF8", str(p),
    ]


def _jpeg_plain(d: Path) -> tuple[Path, list[str]]:
    return mc.make_jpeg(d / "plain.jpg"), []


def _jpeg_exif_only(d: Path) -> tuple[Path, list[str]]:
    p = mc.make_jpeg(d / "exif.jpg")
    return p, ["-Make=Canon", "-Model=Canon EOS 5D", "-Software=GIMP 2.10", "-ThumbnailImage<=" + str(p), str(p)]


def _png_meta(d: Path) -> tuple[Path, list[str]]:
    p = mc.make_png(d / "meta.png")
    return p, ["-Make=Google", "-XMP-dc:Subject=cat", "-XMP-dc:Description=SAMSUNG", str(p)]


def _png_plain(d: Path) -> tuple[Path, list[str]]:
    return mc.make_png(d / "plain.png"), []


def _webp_simple(d: Path) -> tuple[Path, list[str]]:
    return mc.make_webp(d / "simple.webp"), []


def _webp_lossless_alpha(d: Path) -> tuple[Path, list[str]]:
    return mc.make_webp(d / "alpha.webp", lossless=True, alpha=True), []


def _webp_extended(d: Path) -> tuple[Path, list[str]]:
    p = mc.make_webp(d / "ext.webp")
    return p, ["-XMP-dc:Subject=tree", "-Artist=Bob", str(p)]


def _webp_animated(d: Path) -> tuple[Path, list[str]]:
    return mc.make_animated_webp(d / "anim.webp"), []


BUILDERS: dict[str, Callable[[Path], tuple[Path, list[str]]]] = {
    "jpeg-full": _jpeg_full,
    "jpeg-plain": _jpeg_plain,
    "jpeg-exif-thumbnail": _jpeg_exif_only,
    "png-meta": _png_meta,
    "png-plain": _png_plain,
    "webp-simple": _webp_simple,
    "webp-lossless-alpha": _webp_lossless_alpha,
    "webp-extended": _webp_extended,
    "webp-animated": _webp_animated,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("corpus")
    built = {name: build(d) for name, build in BUILDERS.items()}
    mc.exiftool_batch([cmd for _, cmd in built.values() if cmd])
    return {name: p for name, (p, _) in built.items()}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_caption_reads_back_identically_in_every_reader_and_nothing_else_changes(
    name: str, corpus: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / corpus[name].name
    shutil.copy2(corpus[name], path)
    before = path.read_bytes()
    had_iptc = "Caption-Abstract" in mc.exiftool("-IPTC:all", path)
    warnings_before = mc.validate_warnings(path)
    pixels_before = mc.decoded_frames(path)

    result = write_caption(path, CAPTION, PROV, EMBEDDED)

    after = path.read_bytes()
    assert result.skipped is None
    assert {"exif", "xmp"} <= set(result.written)
    assert ("iptc" in result.written) == had_iptc
    fields = mc.exif_fields(path)
    assert fields["IFD0:ImageDescription"] == CAPTION
    assert fields["XMP-dc:Description"] == CAPTION
    assert fields["MWG:Description"] == CAPTION
    if had_iptc:
        assert fields["IPTC:Caption-Abstract"] == CAPTION
    else:
        assert "IPTC:Caption-Abstract" not in fields
    ex = mc.exiv2_fields(path)
    assert ex["Exif.Image.ImageDescription"] == CAPTION
    assert ex["Xmp.dc.description"].startswith(f'lang="x-default" {CAPTION}')
    if had_iptc:
        assert ex["Iptc.Application2.Caption"] == CAPTION
    assert mc.validate_warnings(path) <= warnings_before
    assert mc.decoded_frames(path) == pixels_before
    assert mc.compressed_image_data(after) == mc.compressed_image_data(before)
    meta = read_metadata(path)
    assert meta.description is not None
    assert (meta.description.text, meta.description.kind, meta.description.provenance) == (CAPTION, "ours", PROV)

    again = write_caption(path, CAPTION, PROV, EMBEDDED)
    assert path.read_bytes() == after
    assert again.written == ()


def test_other_properties_languages_and_iptc_fields_survive(corpus: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "full.jpg"
    shutil.copy2(corpus["jpeg-full"], path)
    write_caption(path, CAPTION, PROV, EMBEDDED)
    import json

    tags = json.loads(mc.exiftool("-j", "-G1", "-a", "-charset", "iptc=UTF8", "-XMP-dc:all", "-XMP-xmp:Rating",
                                  "-IPTC:all", "-IFD0:Make", "-ExifIFD:DateTimeOriginal", path))[0]
    assert tags["XMP-dc:Description-de"] == "Hunde am Strand"
    assert tags["XMP-dc:Description-fr"] == "Chiens sur la plage"
    assert tags["XMP-dc:Subject"] == "dog"
    assert tags["XMP-dc:Creator"] == "Ann"
    assert tags["XMP-xmp:Rating"] == 4
    assert tags["IPTC:Keywords"] == "beach"
    assert tags["IPTC:City"] == "Zürich"
    assert tags["IFD0:Make"] == "OLYMPUS IMAGING CORP."
    assert tags["ExifIFD:DateTimeOriginal"] == "2021:07:08 09:10:11"
    digests = mc.exiftool("-s3", "-IPTCDigest", "-CurrentIPTCDigest", path).split()
    assert len(digests) == 2 and digests[0] == digests[1]


def test_makernote_with_absolute_offsets_stays_byte_identical_at_the_same_offset(tmp_path: Path) -> None:
    for order in ("<", ">"):
        path = tmp_path / f"mn{order == '<'}.jpg"
        mc.make_jpeg(path)
        tiff, makernote = mc.tiff_with_makernote(order)
        mc.jpeg_insert_segment(path, 0xE1, b"Exif\x00\x00" + tiff)
        write_caption(path, CAPTION, PROV, EMBEDDED)
        new_tiff = read_jpeg(BytesSource(path.read_bytes())).exif
        assert new_tiff is not None
        offset = tiff.index(makernote)
        assert new_tiff[offset : offset + len(makernote)] == makernote
        assert new_tiff[: len(tiff)].count(makernote) == 1
        info = read_tiff(BytesSource(new_tiff))
        assert info.make == b"OLYMPUS IMAGING CORP." and info.date_time_original == b"2021:07:08 09:10:11"
        assert mc.exif_fields(path)["IFD0:ImageDescription"] == CAPTION
        assert "Exif.Photo.MakerNote" in mc.exiv2_fields(path)


def test_recaption_replaces_our_caption_and_reuses_the_exif_tail(tmp_path: Path) -> None:
    path = mc.make_jpeg(tmp_path / "re.jpg")
    mc.exiftool_batch([["-Make=Sony", "-Model=ILCE-7", path]])
    write_caption(path, "a short caption that is long enough", PROV, EMBEDDED)
    size1 = len(read_jpeg(BytesSource(path.read_bytes())).exif or b"")
    later = Provenance("other/model", None, "2026-04-01T00:00:00Z")
    result = write_caption(path, "a different caption, a good deal longer than the first one was", later, EMBEDDED)
    assert result.written == ("exif", "xmp")
    meta = read_metadata(path)
    assert meta.description is not None and meta.description.provenance == later
    size2 = len(read_jpeg(BytesSource(path.read_bytes())).exif or b"")
    assert size2 - size1 < 40  # the old appended value was reused, not left behind
    assert "capwatch:ModelRevision" not in path.read_bytes().decode("latin-1")
    assert mc.exif_fields(path)["MWG:Description"].startswith("a different caption")  # type: ignore[union-attr]


def test_windows_xp_comment_written_when_enabled(tmp_path: Path) -> None:
    path = mc.make_jpeg(tmp_path / "xp.jpg")
    write_caption(path, CAPTION, PROV, MetadataConfig(windows_xp_tags=True))
    assert mc.exif_fields(path)["IFD0:XPComment"] == CAPTION
    plain = mc.make_jpeg(tmp_path / "noxp.jpg")
    write_caption(plain, CAPTION, PROV, MetadataConfig())
    assert "IFD0:XPComment" not in mc.exif_fields(plain)


def test_png_xmp_after_idat_moves_before_it_and_other_text_is_kept(tmp_path: Path) -> None:
    path = mc.make_png(tmp_path / "late.png")
    late_xmp = mc.xmp_packet(
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">'
        "<dc:subject><rdf:Bag><rdf:li>late</rdf:li></rdf:Bag></dc:subject></rdf:Description>"
    )
    mc.insert_png_chunks_before_iend(
        path,
        mc.png_chunk(b"tEXt", b"Comment\x00written after the image")
        + mc.png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + late_xmp),
    )
    before = path.read_bytes()
    warnings_before = mc.validate_warnings(path)
    write_caption(path, CAPTION, PROV, EMBEDDED)
    after = path.read_bytes()
    assert after.index(b"XML:com.adobe.xmp") < after.index(b"IDAT")
    assert after.count(b"XML:com.adobe.xmp") == 1
    assert after.index(b"Comment\x00written after the image") > after.index(b"IDAT")
    assert mc.compressed_image_data(after) == mc.compressed_image_data(before)
    assert mc.exif_fields(path)["XMP-dc:Description"] == CAPTION
    assert "late" in mc.exiftool("-XMP-dc:Subject", path)
    assert mc.validate_warnings(path) <= warnings_before


def test_lossless_alpha_webp_gets_vp8x_with_alpha_flag(corpus: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "alpha.webp"
    shutil.copy2(corpus["webp-lossless-alpha"], path)
    write_caption(path, CAPTION, PROV, EMBEDDED)
    data = path.read_bytes()
    assert data[12:16] == b"VP8X"
    flags = data[20]
    assert flags & 0x10 and flags & 0x08 and flags & 0x04
    assert int.from_bytes(data[4:8], "little") + 8 == len(data)


def test_control_characters_and_odd_whitespace_are_cleaned_and_nfc_applied(tmp_path: Path) -> None:
    path = mc.make_jpeg(tmp_path / "ctl.jpg")
    write_caption(path, "  a cafe\u0301\x00 at\tnight\x07\n ", PROV, EMBEDDED)
    fields = mc.exif_fields(path)
    assert fields["IFD0:ImageDescription"] == fields["XMP-dc:Description"] == "a café at night"
