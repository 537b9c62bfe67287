"""XMP dc:description shapes: what is read as the description, what merge_caption refuses to overwrite, and
re-merging the same caption from the same model changing nothing (not even the timestamp)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
import metadata_corpus as mc
import pytest

from capwatch.config import MetadataConfig
from capwatch.errors import MetadataError
from capwatch.metadata import Provenance, read_metadata, write_caption
from capwatch.metadata.xmp import XmpError, merge_caption, parse_xmp, wrap_packet

needs_exiftool = pytest.mark.skipif(not mc.EXIFTOOL, reason="exiftool is the independent reader")

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC = "http://purl.org/dc/elements/1.1/"
XML = "http://www.w3.org/XML/1998/namespace"
NS = ('xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/" '
      'xmlns:stEvt="http://ns.adobe.com/xap/1.0/sType/ResourceEvent#" '
      'xmlns:capwatch="https://capwatch.invalid/ns/1.0/" xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/" '
      'xmlns:xmpNote="http://ns.adobe.com/xmp/note/"')
T1 = "2026-03-01T12:00:00Z"
T2 = "2026-05-02T08:30:00Z"
PROV = Provenance("tiny/model", "r1", T1)
LATER = Provenance("tiny/model", "r1", T2)
CAPTION = "a heron standing in shallow water"
PERSON = "Grandpa's boat on Lake Constance, summer 1974"


def _desc(body: str, attrs: str = "") -> str:
    return f'<rdf:Description rdf:about="" {NS} {attrs}>{body}</rdf:Description>'


def _dc(inner: str, attrs: str = "") -> str:
    return f"<dc:description {attrs}>{inner}</dc:description>"


def _alt(*items: tuple[str, str]) -> str:
    return "<rdf:Alt>" + "".join(f'<rdf:li xml:lang="{lang}">{text}</rdf:li>' for lang, text in items) + "</rdf:Alt>"


def _history(inner_description: str) -> str:
    """An xmpMM:History Seq whose one event is written as a nested rdf:Description (a structure value)."""
    return (f"<xmpMM:History><rdf:Seq><rdf:li><rdf:Description stEvt:action=\"saved\">{inner_description}"
            "</rdf:Description></rdf:li></rdf:Seq></xmpMM:History>")


def _top_level_descriptions(xml: str) -> list[Element]:
    root = SafeET.fromstring(xml.encode("utf-8"))
    rdf = next(root.iter(f"{{{RDF}}}RDF"))
    return rdf.findall(f"{{{RDF}}}Description")


def _alt_items(xml: str) -> list[tuple[str | None, str]]:
    """(xml:lang, text) of every item of the one dc:description (asserted to be the standard rdf:Alt)."""
    props = [p for d in _top_level_descriptions(xml) for p in d.findall(f"{{{DC}}}description")]
    assert len(props) == 1 and [c.tag for c in props[0]] == [f"{{{RDF}}}Alt"]
    return [(li.get(f"{{{XML}}}lang"), li.text or "") for li in props[0][0]]


def _jpeg_with_xmp(path: Path, packet: bytes) -> Path:
    mc.make_jpeg(path)
    mc.jpeg_insert_segment(path, 0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + packet)
    return path


# ------------------------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("container", ["Bag", "Seq"])
def test_description_in_a_bag_or_seq_is_read_as_the_first_non_blank_item(container: str) -> None:
    items = "".join(f"<rdf:li>{t}</rdf:li>" for t in ("  ", PERSON, "a second note"))
    info = parse_xmp(mc.xmp_packet(_desc(_dc(f"<rdf:{container}>{items}</rdf:{container}>"))))
    assert info.description == PERSON


def test_alt_description_is_x_default_else_the_first_language() -> None:
    with_default = _alt(("de", "Ein Boot"), ("x-default", "A boat"))
    assert parse_xmp(mc.xmp_packet(_desc(_dc(with_default)))).description == "A boat"
    assert parse_xmp(mc.xmp_packet(_desc(_dc(_alt(("de", "Ein Boot")))))).description == "Ein Boot"
    assert parse_xmp(mc.xmp_packet(_desc("", f'dc:description="{PERSON}"'))).description == PERSON
    assert parse_xmp(mc.xmp_packet(_desc(_dc(PERSON)))).description == PERSON


def test_nested_description_inside_a_structure_is_not_the_image_description() -> None:
    nested = _dc(_alt(("x-default", "an old history note"))) + (
        "<capwatch:Model>other/model</capwatch:Model><capwatch:CreatedAt>2020-01-01T00:00:00Z</capwatch:CreatedAt>"
        "<capwatch:Caption>an old history note</capwatch:Caption>")
    only_nested = mc.xmp_packet(_desc(_history(nested)))
    info = parse_xmp(only_nested)
    assert (info.description, info.provenance, info.our_caption) == (None, None, None)

    # The nested one comes first in document order; the image's own description is in the second rdf:Description.
    both = mc.xmp_packet(_desc(_history(nested)) + _desc(_dc(_alt(("x-default", PERSON)))))
    assert parse_xmp(both).description == PERSON


def test_merge_writes_the_top_level_description_that_parse_reads() -> None:
    nested = _dc(_alt(("x-default", "an old history note")))
    packet = mc.xmp_packet(_desc(_history(nested)))
    xml = merge_caption(packet, CAPTION, PROV)
    info = parse_xmp(xml.encode("utf-8"))
    assert (info.description, info.our_caption, info.provenance) == (CAPTION, CAPTION, PROV)
    assert "an old history note" in xml  # the structure value is kept as it was


@needs_exiftool
def test_exiftool_agrees_on_which_description_is_the_images(tmp_path: Path) -> None:
    nested = _dc(_alt(("x-default", "an old history note")))
    sidecar = tmp_path / "scan.xmp"
    sidecar.write_bytes(wrap_packet(merge_caption(mc.xmp_packet(_desc(_history(nested))), CAPTION, PROV)))
    tags = json.loads(mc.exiftool("-j", "-G1", "-XMP-dc:Description", "-XMP-xmpMM:HistoryDescription", sidecar))[0]
    assert tags["XMP-dc:Description"] == CAPTION
    assert tags["XMP-xmpMM:HistoryDescription"] == "an old history note"


def test_dates_and_extended_xmp_are_still_found_in_any_description() -> None:
    packet = mc.xmp_packet(
        _desc(_dc(_alt(("x-default", PERSON))))
        + _desc("<photoshop:DateCreated>2018-05-06T07:08:09+02:00</photoshop:DateCreated>",
                'xmpNote:HasExtendedXMP="0123456789ABCDEF0123456789ABCDEF"')
    )
    info = parse_xmp(packet)
    assert (info.description, info.date_created, info.has_extended) == (
        PERSON, "2018-05-06T07:08:09+02:00", True)


# ------------------------------------------------------------------------------------------------------------
# Never write what could not be fully read

UNDERSTOOD_ELSEWHERE = _desc("", 'photoshop:City="Lindau"')

REFUSED = {
    "bag": _desc(_dc(f"<rdf:Bag><rdf:li>{PERSON}</rdf:li></rdf:Bag>")),
    "seq": _desc(_dc(f"<rdf:Seq><rdf:li>{PERSON}</rdf:li></rdf:Seq>")),
    "parse-type-resource": _desc(_dc(f"<rdf:value>{PERSON}</rdf:value>", 'rdf:parseType="Resource"')),
    "parse-type-literal": _desc(_dc(PERSON, 'rdf:parseType="Literal"')),
    "resource": _desc(_dc("", 'rdf:resource="https://example.org/words"')),
    "two-alts": _desc(_dc(_alt(("x-default", PERSON)) + _alt(("de", "Opas Boot")))),
    "alt-and-bag": _desc(_dc(_alt(("x-default", PERSON)) + "<rdf:Bag><rdf:li>more</rdf:li></rdf:Bag>")),
    "other-element": _desc(_dc(f'<rdf:Description rdf:about="">{PERSON}</rdf:Description>')),
    "text-beside-alt": _desc(_dc(PERSON + _alt(("x-default", PERSON)))),
    "li-with-elements": _desc(_dc(f'<rdf:Alt><rdf:li xml:lang="x-default"><b xmlns="urn:x">{PERSON}</b></rdf:li>'
                                  "</rdf:Alt>")),
    "li-struct": _desc(_dc(f'<rdf:Alt><rdf:li xml:lang="x-default" rdf:parseType="Resource">{PERSON}</rdf:li>'
                           "</rdf:Alt>")),
    "alt-with-other-child": _desc(_dc(f'<rdf:Alt><rdf:li xml:lang="x-default">{PERSON}</rdf:li>'
                                      "<rdf:value>x</rdf:value></rdf:Alt>")),
    "duplicate-across-descriptions": _desc(_dc(_alt(("x-default", PERSON))))
    + _desc(_dc(_alt(("x-default", "another text")))),
    "duplicate-attribute-and-element": _desc(_dc(_alt(("x-default", PERSON))), 'dc:description="another text"'),
    "duplicate-element": _desc(_dc(_alt(("x-default", PERSON))) + _dc(_alt(("x-default", "another text")))),
}


@pytest.mark.parametrize("shape", sorted(REFUSED))
def test_merge_refuses_a_description_shape_it_does_not_fully_understand(shape: str) -> None:
    packet = mc.xmp_packet(UNDERSTOOD_ELSEWHERE + REFUSED[shape])
    with pytest.raises(XmpError) as info:
        merge_caption(packet, CAPTION, PROV)
    message = str(info.value)
    assert "\n" not in message and "dc:description" in message and "not changed" in message


def test_refusal_names_the_container_it_found() -> None:
    with pytest.raises(XmpError, match=r"unexpected form \(rdf:Bag\)"):
        merge_caption(mc.xmp_packet(REFUSED["bag"]), CAPTION, PROV)


UNDERSTOOD = {
    "alt": (_desc(_dc(_alt(("de", "Opas Boot"), ("x-default", PERSON)))), [("de", "Opas Boot")]),
    "alt-without-default": (_desc(_dc(_alt(("de", "Opas Boot")))), [("de", "Opas Boot")]),
    "empty-alt": (_desc(_dc("<rdf:Alt/>")), []),
    "simple-text": (_desc(_dc(PERSON)), []),
    "simple-text-with-language": (_desc(_dc(PERSON, 'xml:lang="en"')), []),
    "empty-element": (_desc("<dc:description/>"), []),
    "attribute": (_desc("", f'dc:description="{PERSON}"'), []),
    "absent": (_desc("<dc:title><rdf:Alt><rdf:li xml:lang=\"x-default\">Boat</rdf:li></rdf:Alt></dc:title>"), []),
}


@pytest.mark.parametrize("shape", sorted(UNDERSTOOD))
def test_understood_shapes_become_the_standard_alt_keeping_other_languages(shape: str) -> None:
    packet, other_items = UNDERSTOOD[shape]
    xml = merge_caption(mc.xmp_packet(packet), CAPTION, PROV)
    items = _alt_items(xml)
    assert [item for item in items if item[0] == "x-default"] == [("x-default", CAPTION)]
    assert [item for item in items if item[0] != "x-default"] == other_items
    assert parse_xmp(xml.encode("utf-8")).description == CAPTION
    # Merging the result again is accepted: capwatch can always rewrite what it wrote itself.
    assert parse_xmp(merge_caption(xml.encode("utf-8"), "a swan", PROV).encode("utf-8")).description == "a swan"


@needs_exiftool
def test_a_bag_description_in_a_jpeg_is_a_persons_words_and_is_never_overwritten(tmp_path: Path) -> None:
    bag = _desc(_dc(f"<rdf:Bag><rdf:li>{PERSON}</rdf:li></rdf:Bag>"))
    path = _jpeg_with_xmp(tmp_path / "boat.jpg", mc.xmp_packet(bag))
    assert mc.exif_fields(path)["XMP-dc:Description"] == PERSON  # exiftool reads it as the description
    desc = read_metadata(path).description
    assert desc is not None and (desc.text, desc.kind, desc.origin) == (PERSON, "human", "xmp")
    before = path.read_bytes()

    result = write_caption(path, CAPTION, PROV, MetadataConfig())
    assert result.written == () and result.skipped is not None and "existing = keep" in result.skipped
    assert path.read_bytes() == before

    with pytest.raises(MetadataError) as info:
        write_caption(path, CAPTION, PROV, MetadataConfig(), force=True)
    assert "\n" not in str(info.value) and "rdf:Bag" in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boat.jpg"]


@needs_exiftool
def test_a_seq_description_in_a_sidecar_is_kept_and_force_leaves_the_sidecar_alone(tmp_path: Path) -> None:
    tiff = mc.make_tiff(tmp_path / "scan.tif")
    sidecar = tmp_path / "scan.xmp"
    sidecar.write_bytes(mc.xmp_packet(_desc(_dc(f"<rdf:Seq><rdf:li>{PERSON}</rdf:li></rdf:Seq>"))))
    assert mc.exif_fields(sidecar)["XMP-dc:Description"] == PERSON
    desc = read_metadata(tiff).description
    assert desc is not None and (desc.text, desc.kind, desc.origin) == (PERSON, "human", "sidecar")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    result = write_caption(tiff, CAPTION, PROV, MetadataConfig())
    assert result.written == () and result.skipped is not None and "existing = keep" in result.skipped
    with pytest.raises(MetadataError) as info:
        write_caption(tiff, CAPTION, PROV, MetadataConfig(existing="overwrite"))
    assert "\n" not in str(info.value) and str(sidecar) in str(info.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ------------------------------------------------------------------------------------------------------------
# Idempotence


@pytest.mark.parametrize("padding", [0, 2048])
@pytest.mark.parametrize("revision", ["r1", None])
def test_merging_the_same_caption_from_the_same_model_returns_the_same_xml(padding: int, revision: str | None) -> None:
    start = mc.xmp_packet(_desc(_dc(_alt(("de", "Ein Reiher"))), 'photoshop:City="Lindau"'))
    first = merge_caption(start, CAPTION, Provenance("tiny/model", revision, T1))
    again = merge_caption(wrap_packet(first, padding), CAPTION, Provenance("tiny/model", revision, T2))
    assert again == first
    info = parse_xmp(again.encode("utf-8"))
    assert info.provenance == Provenance("tiny/model", revision, T1)


@pytest.mark.parametrize(
    ("caption", "provenance"),
    [
        ("a swan on a lake", LATER),  # new words
        (CAPTION, Provenance("other/model", "r1", T2)),  # another model
        (CAPTION, Provenance("tiny/model", "r2", T2)),  # another revision
        (CAPTION, Provenance("tiny/model", None, T2)),  # revision now unknown
        # the same words from another graph (a static int8 image encoder): its precision recorded, a new time
        (CAPTION, Provenance("tiny/model", "r1", T2, "int8+vision_encoder=int8-static")),
    ],
)
def test_new_words_model_or_revision_record_the_new_time(caption: str, provenance: Provenance) -> None:
    first = wrap_packet(merge_caption(None, CAPTION, PROV))
    info = parse_xmp(merge_caption(first, caption, provenance).encode("utf-8"))
    assert (info.description, info.provenance) == (caption, provenance)


def test_a_description_edited_by_a_person_then_recaptioned_records_the_new_time() -> None:
    ours = merge_caption(None, CAPTION, PROV)
    edited = ours.replace(f'xml:lang="x-default">{CAPTION}<', f'xml:lang="x-default">{PERSON}<')
    assert edited != ours
    info = parse_xmp(merge_caption(edited.encode("utf-8"), CAPTION, LATER).encode("utf-8"))
    assert (info.description, info.provenance) == (CAPTION, LATER)


@pytest.mark.parametrize("name", ["scan.tif", "IMG_0001.CR2"])
def test_recaptioning_with_the_same_words_leaves_the_sidecar_byte_identical(tmp_path: Path, name: str) -> None:
    image = mc.make_tiff(tmp_path / name)
    image_bytes = image.read_bytes()
    sidecar = tmp_path / (name + ".xmp")
    assert write_caption(image, CAPTION, PROV, MetadataConfig()).written == ("sidecar",)
    written = sidecar.read_bytes()
    st = os.stat(sidecar)

    result = write_caption(image, CAPTION, LATER, MetadataConfig())
    assert result.written == () and result.skipped is not None and result.skipped.startswith("unchanged")
    assert sidecar.read_bytes() == written
    assert (os.stat(sidecar).st_ino, os.stat(sidecar).st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    desc = read_metadata(image).description
    assert desc is not None and (desc.kind, desc.provenance) == ("ours", PROV)

    newer = Provenance("tiny/model", "r2", T2)
    assert write_caption(image, CAPTION, newer, MetadataConfig()).written == ("sidecar",)
    desc = read_metadata(image).description
    assert desc is not None and desc.provenance == newer
    assert image.read_bytes() == image_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, name + ".xmp"])


@pytest.mark.parametrize("name", ["a.jpg", "b.png", "c.webp"])
def test_writing_both_with_the_same_words_changes_neither_the_image_nor_the_sidecar(tmp_path: Path, name: str) -> None:
    make = {"jpg": mc.make_jpeg, "png": mc.make_png, "webp": mc.make_webp}[name.rsplit(".", 1)[1]]
    image = make(tmp_path / name)
    both = MetadataConfig(write="both")
    assert write_caption(image, CAPTION, PROV, both).written == ("exif", "xmp", "sidecar")
    before = {p.name: (p.read_bytes(), os.stat(p).st_ino) for p in tmp_path.iterdir()}

    result = write_caption(image, CAPTION, LATER, both)
    assert result.written == () and result.skipped is not None and result.skipped.startswith("unchanged")
    assert {p.name: (p.read_bytes(), os.stat(p).st_ino) for p in tmp_path.iterdir()} == before
