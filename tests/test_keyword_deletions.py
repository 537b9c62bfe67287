"""A person's keyword deletions stay deleted, wherever they made them (IPTC alone, XMP alone, both), and a person's
IPTC keyword with characters XML cannot hold never blocks a file, nor does a caption with one (refused naming the
character, or for the model's dropped): real files, exiftool as the person's tool and exiftool / exiv2 as the
readers, the CLI on the tiny fixture model."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import metadata_corpus as mc
import pytest

from capwatch.config import MetadataConfig
from capwatch.errors import MetadataError
from capwatch.metadata import CaptionTextError, Provenance, read_metadata, write_caption
from capwatch.models.tokenizer import TextDecoder
from tests.conftest import FIXTURES, CliRunner

pytestmark = pytest.mark.skipif(not (mc.EXIFTOOL and mc.EXIV2), reason="exiftool and exiv2 are the reference readers")

CFG = MetadataConfig()
CAPTION = "a cat on a sofa"


def prov(n: int) -> Provenance:
    return Provenance("tiny/vit", f"r{n}", f"2026-0{n}-01T12:00:00Z")


def tags(path: Path, *names: str) -> dict[str, list[str]]:
    out = json.loads(mc.exiftool("-j", "-m", "-G1", "-a", "-charset", "iptc=UTF8", "-sep", "\x1f", *names, path))[0]
    return {k: str(v).split("\x1f") for k, v in out.items() if k != "SourceFile"}


def keyword_lists(path: Path) -> tuple[list[str], list[str], list[str]]:
    """(XMP dc:subject, IPTC Keywords, capwatch:RejectedKeywords) as exiftool reads them."""
    t = tags(path, "-XMP-dc:Subject", "-IPTC:Keywords", "-XMP-capwatch:RejectedKeywords")
    return (t.get("XMP-dc:Subject", []), t.get("IPTC:Keywords", []), t.get("XMP-capwatch:RejectedKeywords", []))


def person(path: Path, *args: str) -> None:
    mc.exiftool("-q", "-overwrite_original", *args, path)


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A JPEG whose IPTC a person started (keyword "family"), then captioned by capwatch with two keywords."""
    path = mc.make_jpeg(tmp_path / "cat.jpg")
    person(path, "-IPTC:Keywords=family")
    write_caption(path, CAPTION, prov(1), CFG, keywords=["cat", "sofa"])
    assert keyword_lists(path) == (["family", "cat", "sofa"], ["family", "cat", "sofa"], [])
    return path


def test_capwatchs_keyword_deleted_from_iptc_alone_is_rejected_and_never_comes_back(photo: Path) -> None:
    person(photo, "-IPTC:Keywords-=cat")
    # What the index records (and search finds) already leaves it out, before capwatch writes again.
    assert read_metadata(photo).keywords == ("family", "sofa")
    write_caption(photo, CAPTION, prov(2), CFG, keywords=["cat", "sofa", "pillow"])
    subjects, in_iptc, rejected = keyword_lists(photo)
    assert "cat" not in subjects and "cat" not in in_iptc and rejected == ["cat"]
    assert subjects == ["family", "sofa", "pillow"] and in_iptc == ["family", "sofa", "pillow"]
    # And again: a later model that says "cat" once more does not bring it back.
    write_caption(photo, "a cat again", prov(3), CFG, keywords=["Cat", "sofa"])
    assert keyword_lists(photo) == (["family", "sofa"], ["family", "sofa"], ["cat"])
    assert "cat" not in [k.lower() for k in read_metadata(photo).keywords]


def test_capwatchs_keyword_deleted_from_xmp_alone_or_from_both_is_rejected(photo: Path) -> None:
    person(photo, "-XMP-dc:Subject-=sofa")
    write_caption(photo, CAPTION, prov(2), CFG, keywords=["cat", "sofa"])
    assert keyword_lists(photo) == (["family", "cat"], ["family", "cat"], ["sofa"])
    person(photo, "-XMP-dc:Subject-=cat", "-IPTC:Keywords-=cat")
    write_caption(photo, CAPTION, prov(3), CFG, keywords=["cat", "sofa"])
    assert keyword_lists(photo) == (["family"], ["family"], ["sofa", "cat"])


def test_when_the_iptc_digest_says_iptc_was_edited_its_list_is_the_newer_one(photo: Path) -> None:
    # exiftool edits IPTC and leaves the Photoshop IPTC digest as it was: a person's keyword deleted there (and one
    # added) is the person's latest word, in XMP too.
    person(photo, "-IPTC:Keywords-=family", "-IPTC:Keywords+=garden")
    digest = tags(photo, "-Photoshop:IPTCDigest", "-File:CurrentIPTCDigest")
    assert digest["Photoshop:IPTCDigest"] != digest["File:CurrentIPTCDigest"]
    assert read_metadata(photo).keywords == ("cat", "sofa", "garden")
    write_caption(photo, CAPTION, prov(2), CFG, keywords=["cat", "sofa", "family"])
    subjects, in_iptc, rejected = keyword_lists(photo)
    assert "family" not in subjects and "family" not in in_iptc and "family" in rejected
    assert "garden" in subjects and "garden" in in_iptc


def test_iptc_written_later_without_a_digest_deletes_nothing(tmp_path: Path) -> None:
    # capwatch captioned a file without IPTC; a person then added IPTC with exiftool (no digest): capwatch's
    # keywords are not "deleted from IPTC" — IPTC never had them.
    path = mc.make_jpeg(tmp_path / "late.jpg")
    write_caption(path, CAPTION, prov(1), CFG, keywords=["cat", "sofa"])
    person(path, "-IPTC:Keywords=family")
    write_caption(path, CAPTION, prov(2), CFG, keywords=["cat", "sofa"])
    assert keyword_lists(path) == (["family", "cat", "sofa"], ["family", "cat", "sofa"], [])


@pytest.mark.parametrize("odd", ["colour\x1b[31mred", "nul\x00inside"])
def test_a_control_character_in_a_persons_iptc_keyword_does_not_block_the_file(tmp_path: Path, odd: str) -> None:
    path = mc.make_jpeg(tmp_path / "odd.jpg")
    # exiftool writes the person's bytes as given, from a file (NUL cannot travel in a command line); no XMP yet.
    raw = odd.encode()
    (tmp_path / "keyword.bin").write_bytes(raw)
    person(path, f"-IPTC:Keywords<={tmp_path / 'keyword.bin'}", "-IPTC:Keywords=plain")
    before = subprocess.run([str(mc.EXIV2), "-pi", str(path)], capture_output=True, check=True).stdout
    assert raw in before
    for n in (1, 2):  # and again: the file is never blocked
        result = write_caption(path, CAPTION, prov(n), CFG, keywords=["cat"])
        assert "xmp" in result.written and "iptc" in result.written
    spaced = odd.replace("\x1b", " ").replace("\x00", " ")
    subjects, in_iptc, _ = keyword_lists(path)
    assert subjects == [spaced, "plain", "cat"] and len(in_iptc) == 3
    # The IPTC bytes stay the person's, byte for byte (exiv2 reads the raw dataset values).
    exiv2 = subprocess.run([str(mc.EXIV2), "-pi", str(path)], capture_output=True, check=True).stdout
    assert exiv2.count(b"Iptc.Application2.Keywords") == 3 and raw in exiv2
    xmp = subprocess.run([str(mc.EXIV2), "-px", str(path)], capture_output=True, check=True)
    assert xmp.returncode == 0 and b"Xmp.dc.subject" in xmp.stdout and b"\x1b" not in xmp.stdout
    meta = read_metadata(path)
    assert meta.description is not None and meta.description.text == CAPTION
    assert len(meta.keywords) == 3  # the IPTC keyword and its XMP copy are one keyword


@pytest.mark.parametrize("bad", ["a cat \uffff", "a cat \ufffe on a mat", "half \ud800 a pair"])
def test_a_caption_xml_cannot_hold_is_refused_saying_what_is_wrong_with_the_text(tmp_path: Path, bad: str) -> None:
    path = mc.make_jpeg(tmp_path / "text.jpg")
    before = path.read_bytes()
    for provenance in (prov(1), None):  # the model's caption and a person's
        with pytest.raises(CaptionTextError) as refused:
            write_caption(path, bad, provenance, CFG)
        message = str(refused.value)
        assert "the caption contains U+" in message and "XML 1.0" in message and "malformed" not in message
        assert isinstance(refused.value, MetadataError)
    assert path.read_bytes() == before


def test_a_models_caption_with_u_ffff_is_written_without_it(tmp_path: Path, run_cli: CliRunner) -> None:
    # The tiny fixture model says token 119 eight times for red.png; here that token decodes to the bytes of
    # U+FFFF (a copy of the model whose tokenizer.json spells it so): the caption reaches the write path with it.
    model = tmp_path / "model"
    shutil.copytree(FIXTURES / "models" / "vit-gpt2-tiny-greedy", model)
    spec = json.loads((model / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    (old,) = [text for text, number in vocab.items() if number == 119]
    del vocab[old]
    vocab["\u00ef\u00bf\u00bf"] = 119  # byte-level BPE's spelling of EF BF BF, UTF-8 for U+FFFF
    (model / "tokenizer.json").write_text(json.dumps(spec))
    assert TextDecoder.from_dir(model, []).decode([5, 119, 5]) == "#\uffff#"
    photo = tmp_path / "red.png"
    shutil.copy(FIXTURES / "images" / "red.png", photo)
    result = run_cli("--db", tmp_path / "index.db", "--model", model, "caption", "--json", photo)
    assert result.code == 0, result.err
    line = json.loads(result.out)
    assert line["error"] is None and "xmp" in line["written"]
    assert "\uffff" not in line["caption"] and line["caption"]
    assert tags(photo, "-XMP-dc:Description")["XMP-dc:Description"] == [line["caption"]]
    assert subprocess.run([str(mc.EXIV2), "-px", str(photo)], capture_output=True, check=True).returncode == 0
