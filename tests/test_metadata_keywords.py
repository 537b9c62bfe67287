"""Keywords and OCR text in files: written with the caption, merged with a person's, read back by every reader."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import metadata_corpus as mc
import pytest

from capwatch.config import MetadataConfig
from capwatch.errors import MetadataError
from capwatch.metadata import Provenance, read_metadata, write_caption
from capwatch.metadata import keywords as kw

pytestmark = pytest.mark.skipif(not (mc.EXIFTOOL and mc.EXIV2), reason="exiftool and exiv2 are the reference readers")

PROV = Provenance("tiny/florence", "r1", "2026-03-01T12:00:00Z")
LATER = Provenance("tiny/florence", "r2", "2026-04-01T12:00:00Z")
CAPTION = "a dog on a beach at sunset"
#: Commas, semicolons, markup characters, other scripts: each must come back as exactly one keyword.
SPECIAL = ["dog", "sand, sea; sky", "a <b> & 'c' \"d\"", "日本の桜", "Ελλάδα", "مرحبا", "naïve café"]
CFG = MetadataConfig()


def _tags(path: Path, *names: str) -> dict[str, object]:
    out: dict[str, object] = json.loads(mc.exiftool("-j", "-m", "-G1", "-a", "-charset", "iptc=UTF8", "-sep", "\x1f",
                                                    *names, path))[0]
    return out


def _list(value: object) -> list[str]:
    """An exiftool -j list value (one item comes back as a scalar; -sep joins lists with \\x1f)."""
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value).split("\x1f")


def xmp_subjects(path: Path) -> list[str]:
    return _list(_tags(path, "-XMP-dc:Subject").get("XMP-dc:Subject"))


def iptc_keywords(path: Path) -> list[str]:
    return _list(_tags(path, "-IPTC:Keywords").get("IPTC:Keywords"))


def exiv2_lines(path: Path, flag: str, key: str) -> list[str]:
    """Values of ``key`` as ``exiv2 -px`` / ``-pi`` prints them (one line per value)."""
    proc = subprocess.run([str(mc.EXIV2), flag, str(path)], capture_output=True, check=False)
    out = []
    for line in proc.stdout.decode("utf-8", errors="replace").splitlines():
        parts = line.split(None, 3)
        if parts and parts[0] == key:
            out.append(parts[3] if len(parts) == 4 else "")
    return out


def _jpeg_iptc(d: Path) -> Path:
    p = mc.make_jpeg(d / "iptc.jpg")
    mc.exiftool_batch([["-charset", "iptc=UTF8", "-IPTC:Keywords=Beach", "-IPTC:Keywords=Familie",
                        "-XMP-dc:Subject=Beach", "-XMP-dc:Subject=holiday", "-IPTC:City=Zürich", p]])
    return p


def _jpeg_xmp(d: Path) -> Path:
    p = mc.make_jpeg(d / "xmp.jpg")
    mc.exiftool_batch([["-XMP-dc:Subject=Beach", "-XMP-dc:Subject=holiday", "-Make=Canon", p]])
    return p


def _jpeg_plain(d: Path) -> Path:
    return mc.make_jpeg(d / "plain.jpg")


def _png(d: Path) -> Path:
    p = mc.make_png(d / "meta.png")
    mc.exiftool_batch([["-XMP-dc:Subject=Beach", "-XMP-dc:Subject=holiday", p]])
    return p


def _webp(d: Path) -> Path:
    p = mc.make_webp(d / "ext.webp")
    mc.exiftool_batch([["-XMP-dc:Subject=Beach", "-XMP-dc:Subject=holiday", p]])
    return p


BUILDERS = {"jpeg-iptc": _jpeg_iptc, "jpeg-xmp": _jpeg_xmp, "jpeg-plain": _jpeg_plain, "png": _png, "webp": _webp}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_keywords_are_written_next_to_a_persons_and_read_back_by_exiftool_and_exiv2(
    name: str, tmp_path: Path
) -> None:
    path = BUILDERS[name](tmp_path)
    before = path.read_bytes()
    person = xmp_subjects(path)
    had_iptc = bool(iptc_keywords(path))
    warnings_before = mc.validate_warnings(path)
    pixels_before = mc.decoded_frames(path)

    result = write_caption(path, CAPTION, PROV, CFG, keywords=["beach", *SPECIAL])
    ours = SPECIAL if person else ["beach", *SPECIAL]

    assert result.skipped is None and ("iptc" in result.written) == had_iptc
    # "beach" is the person's "Beach" (case-insensitive): not added twice, not counted as ours.
    if not had_iptc:
        assert xmp_subjects(path) == [*person, *ours]
    assert exiv2_lines(path, "-px", "Xmp.dc.subject") == [", ".join(xmp_subjects(path))]
    if had_iptc:
        # IPTC and XMP end up with the same keywords (the person's from both places, then ours), digest in sync.
        assert iptc_keywords(path) == ["Beach", "Familie", "holiday", *SPECIAL]
        assert xmp_subjects(path) == ["Beach", "holiday", "Familie", *SPECIAL]
        assert exiv2_lines(path, "-pi", "Iptc.Application2.Keywords") == iptc_keywords(path)
        digests = mc.exiftool("-s3", "-IPTCDigest", "-CurrentIPTCDigest", path).split()
        assert len(digests) == 2 and digests[0] == digests[1]
        assert _tags(path, "-IPTC:City")["IPTC:City"] == "Zürich"
    else:
        assert iptc_keywords(path) == []
    assert mc.validate_warnings(path) <= warnings_before
    assert mc.decoded_frames(path) == pixels_before
    assert mc.compressed_image_data(path.read_bytes()) == mc.compressed_image_data(before)
    meta = read_metadata(path)
    assert meta.model_keywords == tuple(ours)
    assert set(meta.human_keywords) == set(person) | ({"Familie"} if had_iptc else set())
    assert meta.description is not None and meta.description.text == CAPTION

    after = path.read_bytes()
    again = write_caption(path, CAPTION, PROV, CFG, keywords=["beach", *SPECIAL])
    assert again.written == () and path.read_bytes() == after


def test_recaption_replaces_only_ours_and_a_persons_keywords_stay_in_their_order(tmp_path: Path) -> None:
    path = _jpeg_iptc(tmp_path)
    write_caption(path, CAPTION, PROV, CFG, keywords=["dog", "sand", "sunset"])
    # A person adds keywords afterwards, in both places, as an MWG tool would.
    mc.exiftool_batch([["-charset", "iptc=UTF8", "-XMP-dc:Subject+=Oma", "-IPTC:Keywords+=Oma", path]])

    result = write_caption(path, "a cat on a wall", LATER, CFG, keywords=["cat", "wall", "Sand"])

    assert result.written == ("exif", "xmp", "iptc")
    assert xmp_subjects(path) == ["Beach", "holiday", "Familie", "Oma", "cat", "wall", "Sand"]
    assert iptc_keywords(path) == ["Beach", "Familie", "holiday", "Oma", "cat", "wall", "Sand"]
    meta = read_metadata(path)
    assert meta.model_keywords == ("cat", "wall", "Sand")
    assert meta.human_keywords == ("Beach", "holiday", "Familie", "Oma")
    # An empty list removes ours and nothing else.
    write_caption(path, "a cat on a wall", LATER, CFG, keywords=[])
    assert xmp_subjects(path) == ["Beach", "holiday", "Familie", "Oma"]
    assert iptc_keywords(path) == ["Beach", "Familie", "holiday", "Oma"]
    assert read_metadata(path).model_keywords == ()


def test_a_keyword_a_person_removed_is_not_added_again_and_one_they_add_back_is_theirs(tmp_path: Path) -> None:
    path = _jpeg_xmp(tmp_path)
    write_caption(path, CAPTION, PROV, CFG, keywords=["dog", "sand", "sunset"])
    mc.exiftool_batch([["-XMP-dc:Subject-=sand", path]])

    write_caption(path, "a dog on the sand", LATER, CFG, keywords=["dog", "SAND", "waves"])

    assert xmp_subjects(path) == ["Beach", "holiday", "dog", "waves"]
    tags = _tags(path, "-XMP-capwatch:all")
    assert _list(tags["XMP-capwatch:RejectedKeywords"]) == ["sand"]
    assert _list(tags["XMP-capwatch:Keywords"]) == ["dog", "waves"]
    # Added back by the person: theirs now, kept when capwatch drops all of its own.
    mc.exiftool_batch([["-XMP-dc:Subject+=sand", path]])
    write_caption(path, "a dog on the sand", LATER, CFG, keywords=[])
    assert xmp_subjects(path) == ["Beach", "holiday", "sand"]
    assert read_metadata(path).human_keywords == ("Beach", "holiday", "sand")


def test_a_keyword_both_ours_and_added_again_by_a_person_keeps_the_persons_copy(tmp_path: Path) -> None:
    path = mc.make_png(tmp_path / "twice.png")
    write_caption(path, CAPTION, PROV, CFG, keywords=["dog"])
    # A second copy of the same text is the person's (exiftool appends list items as given).
    mc.exiftool_batch([["-XMP-dc:Subject+=dog", path]])
    assert xmp_subjects(path) == ["dog", "dog"]
    write_caption(path, CAPTION, LATER, CFG, keywords=["cat"])
    assert xmp_subjects(path) == ["dog", "cat"]
    meta = read_metadata(path)
    assert (meta.human_keywords, meta.model_keywords) == (("dog",), ("cat",))


def test_newlines_and_control_characters_in_keywords_become_spaces(tmp_path: Path) -> None:
    path = mc.make_png(tmp_path / "nl.png")
    write_caption(path, CAPTION, PROV, CFG, keywords=["exit\n12", "a\tb\r\nc", "  \n ", "x\x00y", "Exit 12"])
    assert xmp_subjects(path) == ["exit 12", "a b c", "x y"]
    assert kw.clean_keyword("line\u2028sep\ud800") == "line sep"  # no lone surrogates in XML
    with pytest.raises(TypeError):
        write_caption(path, CAPTION, PROV, CFG, keywords="dog")  # not the keywords d, o, g


def test_long_keywords_are_cut_to_64_bytes_in_iptc_at_a_character_boundary(tmp_path: Path) -> None:
    path = _jpeg_iptc(tmp_path)
    long_kw = "桜" * 30  # 90 bytes in UTF-8
    write_caption(path, CAPTION, PROV, CFG, keywords=[long_kw])
    assert xmp_subjects(path)[-1] == long_kw
    assert iptc_keywords(path)[-1] == "桜" * 21  # 63 bytes: the 22nd character would not fit
    meta = read_metadata(path)
    assert meta.model_keywords == (long_kw,) and "桜" * 21 not in meta.keywords
    write_caption(path, CAPTION, LATER, CFG, keywords=["cherry"])
    assert iptc_keywords(path) == ["Beach", "Familie", "holiday", "cherry"]


def test_thousands_of_a_persons_keywords_are_merged_without_loss(tmp_path: Path) -> None:
    person = [f"person-{i:04d}" for i in range(1200)]
    path = mc.make_jpeg(tmp_path / "many.jpg")
    args = ["-charset", "iptc=UTF8", "-sep", ",", "-XMP-dc:Subject=" + ",".join(person),
            "-IPTC:Keywords=" + ",".join(person), path]
    mc.exiftool_batch([args])
    assert len(xmp_subjects(path)) == 1200 and len(iptc_keywords(path)) == 1200

    result = write_caption(path, CAPTION, PROV, CFG, keywords=["dog", "person-0007", "beach"])

    assert result.written == ("exif", "xmp", "iptc")
    assert xmp_subjects(path) == [*person, "dog", "beach"]
    assert iptc_keywords(path) == [*person, "dog", "beach"]
    assert len(exiv2_lines(path, "-pi", "Iptc.Application2.Keywords")) == 1202
    meta = read_metadata(path)
    assert len(meta.keywords) == 1202 and meta.model_keywords == ("dog", "beach")


def test_keywords_that_push_jpeg_xmp_over_one_segment_go_to_a_sidecar_and_the_file_stays_identical(
    tmp_path: Path
) -> None:
    path = mc.make_jpeg(tmp_path / "full.jpg")
    items = "".join(f"<rdf:li>person keyword number {i:05d}</rdf:li>" for i in range(1400))
    packet = mc.xmp_packet('<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">'
                           f"<dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject></rdf:Description>")
    assert 60_000 < len(packet) < 65_000
    mc.jpeg_insert_segment(path, 0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + packet)
    before = path.read_bytes()
    ours = [f"model keyword {i}" for i in range(200)]

    result = write_caption(path, CAPTION, PROV, CFG, keywords=ours)

    assert result.written == ("sidecar",)
    assert path.read_bytes() == before
    sidecar = tmp_path / "full.jpg.xmp"
    # The new sidecar starts with the person's keywords from the file, then ours.
    assert xmp_subjects(sidecar) == [f"person keyword number {i:05d}" for i in range(1400)] + ours
    meta = read_metadata(path)
    assert len(meta.keywords) == 1400 + 200 and meta.model_keywords == tuple(ours)


def test_iptc_split_over_several_app13_segments_is_read_whole_and_the_caption_goes_to_a_sidecar(
    tmp_path: Path
) -> None:
    path = mc.make_jpeg(tmp_path / "split.jpg")
    person = [f"person keyword {i:05d}" for i in range(2900)]  # ~75 KB of IPTC: exiftool splits the IRB
    mc.exiftool_batch([["-m", "-sep", ",", "-IPTC:Keywords=" + ",".join(person), path]])
    assert len(iptc_keywords(path)) == 2900
    before = path.read_bytes()
    assert read_metadata(path).keywords == tuple(person)

    result = write_caption(path, CAPTION, PROV, CFG, keywords=["dog"])

    assert result.written == ("sidecar",) and path.read_bytes() == before
    assert xmp_subjects(tmp_path / "split.jpg.xmp") == [*person, "dog"]
    assert read_metadata(path).model_keywords == ("dog",)


def test_keywords_in_extended_xmp_are_read_and_carried_into_the_sidecar(tmp_path: Path) -> None:
    path = mc.make_jpeg(tmp_path / "ext.jpg")
    person = [f"person keyword {i:05d}" for i in range(3000)]  # ~100 KB: exiftool moves dc:subject to ExtendedXMP
    mc.exiftool_batch([["-m", "-sep", ",", "-XMP-dc:Subject=" + ",".join(person), path]])
    assert _tags(path, "-XMP:HasExtendedXMP").get("XMP-xmpNote:HasExtendedXMP")
    before = path.read_bytes()
    assert read_metadata(path).keywords == tuple(person)

    assert write_caption(path, CAPTION, PROV, CFG, keywords=["dog"]).written == ("sidecar",)

    assert path.read_bytes() == before
    assert xmp_subjects(tmp_path / "ext.jpg.xmp") == [*person, "dog"]
    meta = read_metadata(path)
    assert len(meta.keywords) == 3001 and meta.model_keywords == ("dog",)


def test_raw_and_tiff_sidecars_merge_keywords_the_same_way(tmp_path: Path) -> None:
    raw = tmp_path / "DSC_0001.NEF"
    raw.write_bytes(mc.make_tiff(tmp_path / "src.tif").read_bytes())
    sidecar = tmp_path / "DSC_0001.xmp"  # Lightroom's naming
    sidecar.write_bytes(mc.xmp_packet(
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:lr="http://ns.adobe.com/lightroom/1.0/">'
        "<dc:subject><rdf:Bag><rdf:li>Heron</rdf:li><rdf:li>Paris</rdf:li></rdf:Bag></dc:subject>"
        "<lr:hierarchicalSubject><rdf:Bag><rdf:li>Places|France|Paris</rdf:li><rdf:li>Birds|Grey heron</rdf:li>"
        "</rdf:Bag></lr:hierarchicalSubject></rdf:Description>"
    ))
    before = raw.read_bytes()

    assert write_caption(raw, "A heron", PROV, CFG, keywords=["bird", "heron", "water"]).written == ("sidecar",)
    write_caption(raw, "A heron at a lake", LATER, CFG, keywords=["bird", "lake"])

    assert raw.read_bytes() == before
    assert xmp_subjects(sidecar) == ["Heron", "Paris", "bird", "lake"]
    assert exiv2_lines(sidecar, "-px", "Xmp.dc.subject") == ["Heron, Paris, bird, lake"]
    tags = _tags(sidecar, "-XMP-lr:HierarchicalSubject")
    assert _list(tags["XMP-lr:HierarchicalSubject"]) == ["Places|France|Paris", "Birds|Grey heron"]
    meta = read_metadata(raw)
    assert meta.keywords == ("Heron", "Paris", "bird", "lake", "Grey heron")
    assert meta.model_keywords == ("bird", "lake")


def test_a_new_sidecar_starts_with_the_keywords_a_person_put_into_the_file(tmp_path: Path) -> None:
    tiff = mc.make_tiff(tmp_path / "scan.tif")
    mc.exiftool_batch([["-charset", "iptc=UTF8", "-IPTC:Keywords=Oma", "-XMP-dc:Subject=Garten", tiff]])
    before = tiff.read_bytes()
    write_caption(tiff, "A garden", PROV, CFG, keywords=["garden", "oma"])
    assert tiff.read_bytes() == before
    assert xmp_subjects(tmp_path / "scan.tif.xmp") == ["Garten", "Oma", "garden"]
    meta = read_metadata(tiff)
    assert (meta.human_keywords, meta.model_keywords) == (("Garten", "Oma"), ("garden",))


def test_keywords_a_file_carries_are_read_from_iptc_xmp_and_lightroom_hierarchy(tmp_path: Path) -> None:
    path = mc.make_jpeg(tmp_path / "read.jpg")
    mc.exiftool_batch([["-charset", "iptc=UTF8", "-IPTC:Keywords=Strand", "-IPTC:Keywords=dog",
                        "-XMP-dc:Subject=Dog", "-XMP-lr:HierarchicalSubject=Places|Deutschland|Sylt", path]])
    meta = read_metadata(path)
    assert meta.keywords == ("Dog", "Strand", "Sylt")
    assert meta.model_keywords == () and meta.human_keywords == meta.keywords
    # A Latin-1 IPTC block (no 1:90): read as Windows-1252, and kept readable once capwatch declares UTF-8.
    latin = mc.make_jpeg(tmp_path / "latin.jpg")
    mc.exiftool_batch([["-charset", "iptc=Latin", "-IPTC:Keywords=Café", latin]])
    assert read_metadata(latin).keywords == ("Café",)
    write_caption(latin, CAPTION, PROV, CFG, keywords=["crème"])
    assert iptc_keywords(latin) == ["Café", "crème"] and xmp_subjects(latin) == ["Café", "crème"]


def test_ocr_text_goes_into_capwatchs_namespace_only_when_enabled_and_never_the_description(
    tmp_path: Path
) -> None:
    path = mc.make_jpeg(tmp_path / "sign.jpg")
    write_caption(path, CAPTION, PROV, CFG, text="EXIT 12")
    assert "XMP-capwatch:Text" not in _tags(path, "-XMP-capwatch:all")
    assert read_metadata(path).ocr_text is None

    on = MetadataConfig(write_text=True)
    write_caption(path, CAPTION, PROV, on, text="EXIT 12\r\nGleis 3 – 出口 <&>\x07")
    tags = _tags(path, "-XMP-capwatch:Text", "-XMP-dc:Description", "-IFD0:ImageDescription")
    assert tags["XMP-capwatch:Text"] == "EXIT 12\nGleis 3 – 出口 <&>"
    assert tags["XMP-dc:Description"] == CAPTION and tags["IFD0:ImageDescription"] == CAPTION
    assert exiv2_lines(path, "-px", "Xmp.capwatch.Text") == ["EXIT 12"]  # exiv2 prints the second line apart
    assert read_metadata(path).ocr_text == "EXIT 12\nGleis 3 – 出口 <&>"
    # None keeps it (a caption-only re-run), "" removes it.
    write_caption(path, "another caption", LATER, on, keywords=["x"])
    assert read_metadata(path).ocr_text == "EXIT 12\nGleis 3 – 出口 <&>"
    write_caption(path, "another caption", LATER, on, text="")
    assert read_metadata(path).ocr_text is None
    # A page of text is cut at a character boundary, so OCR text alone never forces a sidecar.
    page = write_caption(path, "another caption", LATER, on, text="出口 " * 6000)
    assert page.written == ("exif", "xmp")
    stored = read_metadata(path).ocr_text
    assert stored is not None and stored.startswith("出口 出口") and len(stored.encode()) <= 16_000


def test_keywords_travel_with_the_caption_so_a_kept_persons_description_leaves_the_file_untouched(
    tmp_path: Path
) -> None:
    path = mc.make_jpeg(tmp_path / "described.jpg")
    mc.exiftool_batch([["-XMP-dc:Description=Grandma in her garden", "-XMP-dc:Subject=Oma", path]])
    before = path.read_bytes()
    result = write_caption(path, CAPTION, PROV, CFG, keywords=["garden"])
    assert result.written == () and path.read_bytes() == before


def test_odd_subject_forms_are_converted_when_understood_and_refused_otherwise(tmp_path: Path) -> None:
    simple = mc.make_png(tmp_path / "simple.png")
    packet = mc.xmp_packet('<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
                           'dc:subject="Urlaub"/>')
    mc.insert_png_chunks_before_iend(simple, mc.png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + packet))
    write_caption(simple, CAPTION, PROV, CFG, keywords=["dog"])
    assert xmp_subjects(simple) == ["Urlaub", "dog"]

    odd = mc.make_png(tmp_path / "alt.png")
    packet = mc.xmp_packet('<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">'
                           '<dc:subject><rdf:Alt><rdf:li xml:lang="x-default">Urlaub</rdf:li></rdf:Alt>'
                           "</dc:subject></rdf:Description>")
    mc.insert_png_chunks_before_iend(odd, mc.png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + packet))
    before = odd.read_bytes()
    with pytest.raises(MetadataError, match="dc:subject has an unexpected form"):
        write_caption(odd, CAPTION, PROV, CFG, keywords=["dog"])
    assert odd.read_bytes() == before
    # Without keywords the caption is still written: dc:subject is then not touched at all.
    assert write_caption(odd, CAPTION, PROV, CFG).written == ("exif", "xmp")


@pytest.mark.parametrize(
    ("existing", "previous", "rejected", "wanted", "other", "subjects", "ours", "now_rejected"),
    [
        ([], [], [], ["a", "A", "b"], [], ["a", "b"], ["a", "b"], []),
        (["Dog", "x"], [], [], ["dog", "cat"], [], ["Dog", "x", "cat"], ["cat"], []),
        (["p", "old"], ["old"], [], ["new"], [], ["p", "new"], ["new"], []),
        (["p"], ["gone"], [], ["GONE", "new"], [], ["p", "new"], ["new"], ["gone"]),
        (["d", "d"], ["d"], [], [], [], ["d"], [], []),
        (["p"], [], ["no"], ["No", "yes"], ["iptc-only", "P"], ["p", "iptc-only", "yes"], ["yes"], ["no"]),
        ([" spaced "], ["spaced"], [], ["spaced"], [], ["spaced"], ["spaced"], []),
    ],
)
def test_merge_rules(existing: list[str], previous: list[str], rejected: list[str], wanted: list[str],
                     other: list[str], subjects: list[str], ours: list[str], now_rejected: list[str]) -> None:
    result = kw.merge(existing, previous, rejected, wanted, other_human=other)
    assert list(result.subjects([s.strip() for s in existing])) == subjects
    assert list(result.ours) == ours and list(result.rejected) == now_rejected
