"""Where new metadata segments go in a JPEG: the Exif APP1 never moves (readers look for Exif in the first APP1, and
some cameras wrote file-relative offsets into it), new XMP goes right after it, and nothing between an MPF APP2 and
the images after EOI changes size. Checked with an independent segment walker and exiftool."""

from __future__ import annotations

import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import metadata_corpus as mc
import pytest
from PIL import Image, ImageCms

from capwatch.config import MetadataConfig
from capwatch.metadata import Provenance, write_caption

pytestmark = pytest.mark.skipif(not mc.EXIFTOOL, reason="exiftool is the reference reader")

PROV = Provenance("Xenova/vit-gpt2-image-captioning", "0e334c7", "2026-03-01T12:00:00Z")
CAPTION = "A red bike leaning on a wall"
EXIF_SIG = b"Exif\x00\x00"
XMP_SIG = b"http://ns.adobe.com/xap/1.0/\x00"
SUBJECT_RDF = ('<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">'
               "<dc:subject><rdf:Bag><rdf:li>bike</rdf:li></rdf:Bag></dc:subject></rdf:Description>")


# -- an independent segment walker -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Seg:
    name: str
    offset: int
    size: int


def _name(marker: int, body: bytes) -> str:
    if marker == 0xE0 and body.startswith(b"JFIF\x00"):
        return "JFIF"
    if marker == 0xE1 and body.startswith(EXIF_SIG):
        return "Exif"
    if marker == 0xE1 and body.startswith(XMP_SIG):
        return "XMP"
    if marker == 0xE2 and body.startswith(b"ICC_PROFILE\x00"):
        return "ICC"
    if marker == 0xE2 and body.startswith(b"MPF\x00"):
        return "MPF"
    return {0xFE: "COM", 0xDA: "SOS"}.get(marker, f"FF{marker:02X}")


def walk(data: bytes) -> list[Seg]:
    """The segments from SOI up to and including the first SOS."""
    assert data[:2] == b"\xff\xd8"
    pos, out = 2, []
    while True:
        assert data[pos] == 0xFF, f"no marker at {pos}"
        marker = data[pos + 1]
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        out.append(Seg(_name(marker, data[pos + 4 : pos + 2 + length]), pos, 2 + length))
        if marker == 0xDA:
            return out
        pos += 2 + length


def app_order(data: bytes) -> list[str]:
    """Names of the APPn and COM segments in file order (the tables and frame header after them left out)."""
    return [s.name for s in walk(data) if not s.name.startswith(("FFC", "FFD")) and s.name != "SOS"]


def exiftool_binary(tag: str, path: Path) -> bytes:
    """The binary value of ``tag`` as ``exiftool -b`` extracts it (empty when there is none)."""
    assert mc.EXIFTOOL
    return subprocess.run([mc.EXIFTOOL, "-b", tag, str(path)], capture_output=True, check=True).stdout


def find(data: bytes, name: str) -> Seg:
    [seg] = [s for s in walk(data) if s.name == name]
    return seg


# -- building test files ------------------------------------------------------------------------------------------


def segment(marker: int, body: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(body) + 2) + body


def com(text: bytes = b"Created with a scanner that writes a comment first") -> bytes:
    return segment(0xFE, text)


def xmp_segment(padding: int) -> bytes:
    """An XMP APP1 from 'another tool' (dc:subject only, so it is not a description capwatch must keep)."""
    packet = mc.xmp_packet(SUBJECT_RDF).replace(b"<?xpacket end", b" " * padding + b"<?xpacket end")
    return segment(0xE1, XMP_SIG + packet)


def pillow_parts(tmp_path: Path) -> tuple[bytes, bytes, bytes]:
    """(JFIF APP0 segment, ICC APP2 segment, everything from the first table to the end) of a Pillow JPEG."""
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = mc.make_jpeg(tmp_path / "pillow.jpg", icc_profile=icc).read_bytes()
    segs = walk(data)
    assert [s.name for s in segs[:2]] == ["JFIF", "ICC"]
    app0, icc_seg = (data[s.offset : s.offset + s.size] for s in segs[:2])
    return app0, icc_seg, data[segs[2].offset :]


def exif_from_exiftool(tmp_path: Path, *args: str) -> bytes:
    """An Exif APP1 segment as exiftool writes it (``args`` are tag assignments)."""
    path = mc.make_jpeg(tmp_path / "exiftool-source.jpg")
    mc.exiftool_batch([[*args, path]])
    data = path.read_bytes()
    seg = find(data, "Exif")
    return data[seg.offset : seg.offset + seg.size]


def compose(path: Path, tables: bytes, *segments: bytes) -> Path:
    path.write_bytes(b"\xff\xd8" + b"".join(segments) + tables)
    return path


@pytest.fixture
def parts(tmp_path: Path) -> dict[str, bytes]:
    app0, icc, tables = pillow_parts(tmp_path)
    tiff, _ = mc.tiff_with_makernote()
    return {"JFIF": app0, "ICC": icc, "tables": tables, "COM": com(), "Exif": segment(0xE1, EXIF_SIG + tiff),
            "XMP": xmp_segment(2400)}


# -- checks -------------------------------------------------------------------------------------------------------


def write_and_check(path: Path) -> tuple[bytes, bytes]:
    """Caption ``path`` and check what must hold for every layout with an Exif segment. Returns (before, after)."""
    before = path.read_bytes()
    warnings_before = mc.validate_warnings(path)
    result = write_caption(path, CAPTION, PROV, MetadataConfig())
    after = path.read_bytes()
    assert {"exif", "xmp"} <= set(result.written), result
    assert find(after, "Exif").offset == find(before, "Exif").offset  # nothing inserted or grown before it
    fields = mc.exif_fields(path)
    assert fields["XMP-dc:Description"] == CAPTION
    assert fields["IFD0:ImageDescription"] == CAPTION
    assert mc.validate_warnings(path) <= warnings_before
    assert mc.compressed_image_data(after) == mc.compressed_image_data(before)  # SOS to the end, byte for byte
    return before, after


LAYOUTS = {
    # The two real-world files: a comment between JFIF and Exif.
    "com-between-jfif-and-exif": (["JFIF", "COM", "Exif"], ["JFIF", "COM", "Exif", "XMP"]),
    "com-and-icc-before-exif": (["JFIF", "COM", "ICC", "Exif"], ["JFIF", "COM", "ICC", "Exif", "XMP"]),
    "icc-before-exif": (["JFIF", "ICC", "Exif"], ["JFIF", "ICC", "Exif", "XMP"]),
    "exif-before-jfif": (["Exif", "JFIF", "COM"], ["Exif", "XMP", "JFIF", "COM"]),
    "exif-then-com": (["JFIF", "Exif", "COM", "ICC"], ["JFIF", "Exif", "XMP", "COM", "ICC"]),
    # XMP from another tool already before Exif: it stays there, rewritten to the same size in its padding.
    "xmp-before-exif": (["JFIF", "XMP", "Exif"], ["JFIF", "XMP", "Exif"]),
    "com-and-xmp-before-exif": (["JFIF", "COM", "XMP", "Exif", "ICC"], ["JFIF", "COM", "XMP", "Exif", "ICC"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_exif_segment_never_moves_and_new_xmp_follows_it(layout: str, parts: dict[str, bytes],
                                                         tmp_path: Path) -> None:
    given, expected = LAYOUTS[layout]
    path = compose(tmp_path / f"{layout}.jpg", parts["tables"], *(parts[name] for name in given))
    assert app_order(path.read_bytes()) == given
    before, after = write_and_check(path)
    assert app_order(after) == expected
    if "XMP" in given:
        assert find(after, "XMP").offset == find(before, "XMP").offset
        assert find(after, "XMP").size == find(before, "XMP").size
        assert "bike" in mc.exiftool("-XMP-dc:Subject", path)
    # Everything before the Exif segment is byte-identical, except an XMP segment rewritten in place.
    exif_at = find(before, "Exif").offset
    kept = [(s.offset, s.offset + s.size) for s in walk(before) if s.offset < exif_at and s.name != "XMP"]
    assert [after[a:b] for a, b in kept] == [before[a:b] for a, b in kept]


def test_thumbnail_stays_at_the_same_file_offset(parts: dict[str, bytes], tmp_path: Path) -> None:
    # A Kodak DC210 wrote its thumbnail offset relative to the file, not to the TIFF header: the thumbnail bytes must
    # stay at the same absolute offset, which they do only if the Exif segment does not move.
    exif = exif_from_exiftool(tmp_path, "-Make=Eastman Kodak Company", "-Model=DC210 Zoom (V05.00)",
                              f"-ThumbnailImage<={mc.make_jpeg(tmp_path / 'thumb.jpg')}")
    path = compose(tmp_path / "kodak.jpg", parts["tables"], parts["JFIF"], parts["COM"], exif)
    thumb_before = exiftool_binary("-ThumbnailImage", path)
    assert thumb_before.startswith(b"\xff\xd8") and len(thumb_before) > 100
    offset_before = path.read_bytes().find(thumb_before)

    _, after = write_and_check(path)

    assert app_order(after) == ["JFIF", "COM", "Exif", "XMP"]
    assert exiftool_binary("-ThumbnailImage", path) == thumb_before
    assert after.find(thumb_before) == offset_before
    assert mc.exiftool("-s3", "-ThumbnailOffset", path).strip() == str(offset_before)


def test_without_exif_both_new_segments_go_after_the_leading_app0_app1_run(parts: dict[str, bytes],
                                                                         tmp_path: Path) -> None:
    path = compose(tmp_path / "noexif.jpg", parts["tables"], parts["JFIF"], parts["COM"], parts["ICC"])
    before = path.read_bytes()
    warnings_before = mc.validate_warnings(path)
    write_caption(path, CAPTION, PROV, MetadataConfig())
    after = path.read_bytes()
    assert app_order(after) == ["JFIF", "Exif", "XMP", "COM", "ICC"]
    fields = mc.exif_fields(path)
    assert (fields["XMP-dc:Description"], fields["IFD0:ImageDescription"]) == (CAPTION, CAPTION)
    assert mc.validate_warnings(path) <= warnings_before
    assert mc.compressed_image_data(after) == mc.compressed_image_data(before)


def test_xmp_before_exif_without_room_goes_to_a_sidecar_and_the_file_is_untouched(parts: dict[str, bytes],
                                                                                   tmp_path: Path) -> None:
    # Growing the XMP would move the Exif segment; there is no padding to absorb the new caption.
    path = compose(tmp_path / "tight.jpg", parts["tables"], parts["JFIF"], xmp_segment(0), parts["Exif"])
    before = path.read_bytes()
    result = write_caption(path, CAPTION, PROV, MetadataConfig())
    assert result.written == ("sidecar",)
    assert path.read_bytes() == before


# -- MPF: offsets of the images after EOI count from the MPF header ----------------------------------------------


def mpf_segment(second_image_offset: int, second_image_size: int, first_image_size: int) -> bytes:
    """An APP2 MPF segment (little-endian) listing the primary image and one more image after its EOI."""
    entries_at = 8 + 2 + 3 * 12 + 4
    ifd = struct.pack("<H", 3)
    ifd += struct.pack("<HHI", 0xB000, 7, 4) + b"0100"
    ifd += struct.pack("<HHII", 0xB001, 4, 1, 2)
    ifd += struct.pack("<HHII", 0xB002, 7, 32, entries_at) + struct.pack("<I", 0)
    entries = struct.pack("<IIIHH", 0x030000, first_image_size, 0, 0, 0)
    entries += struct.pack("<IIIHH", 0x010001, second_image_size, second_image_offset, 0, 0)
    return segment(0xE2, b"MPF\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd + entries)


def compose_mpf(path: Path, parts: dict[str, bytes], order: list[str], second: bytes) -> Path:
    """A JPEG with segments ``order`` (one of them "MPF") followed, after EOI, by the image ``second``."""
    def build(mpf: bytes) -> bytes:
        segs = [mpf if name == "MPF" else parts[name] for name in order]
        return b"\xff\xd8" + b"".join(segs) + parts["tables"]

    draft = build(mpf_segment(0, 0, 0))
    mpf_header = find(draft, "MPF").offset + 8  # FF E2, length, "MPF\0": offsets count from the byte order mark
    path.write_bytes(build(mpf_segment(len(draft) - mpf_header, len(second), len(draft))) + second)
    return path


@pytest.fixture
def second_image(tmp_path: Path) -> bytes:
    Image.new("RGB", (16, 12), (200, 30, 30)).save(tmp_path / "second.jpg", "JPEG")
    return (tmp_path / "second.jpg").read_bytes()


def _mp_image(path: Path) -> bytes:
    return exiftool_binary("-MPImage2:PreviewImage", path)


def test_mpf_after_exif_new_xmp_goes_before_it_and_the_second_image_still_reads(
    parts: dict[str, bytes], second_image: bytes, tmp_path: Path
) -> None:
    path = compose_mpf(tmp_path / "mpf.jpg", parts, ["JFIF", "Exif", "MPF"], second_image)
    assert _mp_image(path) == second_image
    _, after = write_and_check(path)
    assert app_order(after) == ["JFIF", "Exif", "XMP", "MPF"]
    assert _mp_image(path) == second_image


def test_xmp_after_mpf_is_rewritten_to_the_same_size(parts: dict[str, bytes], second_image: bytes,
                                                     tmp_path: Path) -> None:
    path = compose_mpf(tmp_path / "mpf-xmp.jpg", parts, ["JFIF", "Exif", "MPF", "XMP"], second_image)
    assert _mp_image(path) == second_image
    before, after = write_and_check(path)
    assert app_order(after) == ["JFIF", "Exif", "MPF", "XMP"]
    assert find(after, "XMP").size == find(before, "XMP").size
    assert _mp_image(path) == second_image


def test_exif_after_mpf_cannot_be_embedded_safely(parts: dict[str, bytes], second_image: bytes,
                                                  tmp_path: Path) -> None:
    # The Exif segment grows (and XMP would go after it): either would shift the second image away from its offset.
    path = compose_mpf(tmp_path / "mpf-first.jpg", parts, ["JFIF", "MPF", "Exif"], second_image)
    before = path.read_bytes()
    result = write_caption(path, CAPTION, PROV, MetadataConfig())
    assert result.written == ("sidecar",)
    assert path.read_bytes() == before
    assert _mp_image(path) == second_image
