"""Keywords and text in images, end to end through the CLI: `scan` with Florence-2 writes its keywords into the
files beside a person's, `scan --no-caption` imports the keywords files already carry, OCR text painted on a real
photo is found by `search`, and search forgives word forms and other scripts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import metadata_corpus as mc
import pytest
from daemon_helpers import IMAGES, MODELS
from PIL import Image, ImageDraw, ImageFont

from capwatch.library.index import Index
from tests.conftest import DEJAVU_BOLD, CliRunner

FLORENCE = MODELS / "florence2-tiny"
VIT = MODELS / "vit-gpt2-tiny-greedy"
PHOTOS = Path(__file__).parent / "fixtures" / "photos"
FONT = DEJAVU_BOLD

pytestmark = pytest.mark.skipif(not (mc.EXIFTOOL and mc.EXIV2), reason="exiftool and exiv2 are the reference readers")


def _subjects(path: Path) -> tuple[list[str], list[str]]:
    data = json.loads(mc.exiftool("-j", "-m", "-XMP-dc:Subject", "-IPTC:Keywords", path))[0]
    return [str(v) for v in _as_list(data.get("Subject"))], [str(v) for v in _as_list(data.get("Keywords"))]


def _as_list(value: object) -> list[object]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _search(run_cli: CliRunner, db: Path, *words: str) -> list[dict[str, object]]:
    result = run_cli("--db", db, "search", "--json", *words)
    assert result.code == 0, result.err
    return [json.loads(line) for line in result.out.splitlines()]


def test_scan_with_florence_writes_its_keywords_beside_a_persons_and_search_finds_them(
        tmp_path: Path, run_cli: CliRunner) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("blobs.jpg", "gradient.jpg", "oriented.jpg", "checker.png", "red.png", "gray.png"):
        shutil.copy(IMAGES / name, photos / name)
    person = photos / "blobs.jpg"
    mc.exiftool("-overwrite_original", "-XMP-dc:Subject=Grandma", "-IPTC:Keywords=holiday", "-charset", "iptc=UTF8",
                person)
    db = tmp_path / "index.db"

    result = run_cli("--db", db, "--model", FLORENCE, "scan", photos)
    assert result.code == 0, result.err

    with Index.open(db) as index:
        rows = {Path(r.path).name: r for r in index.iter_records()}
    assert any(r.model_keywords for r in rows.values()), "the tiny Florence model detected nothing at all"
    for name, row in rows.items():
        assert row.status == "captioned", (name, row)
        subjects, iptc = _subjects(photos / name)
        mine = list(row.model_keywords)
        if name == "blobs.jpg":
            # The person's keywords first and untouched, ours after; IPTC and XMP agree.
            assert subjects[:2] == ["Grandma", "holiday"] or subjects[:2] == ["holiday", "Grandma"], subjects
            assert [s.casefold() for s in subjects[2:]] == [k.casefold() for k in mine if k not in ("grandma",
                                                                                                     "holiday")]
            assert {"Grandma", "holiday"} <= set(iptc) and set(mine) <= set(iptc)
        else:
            assert subjects == mine, (name, subjects, mine)
        assert list(row.keywords) == subjects
    tagged = next(name for name, row in rows.items() if row.model_keywords)
    keyword = rows[tagged].model_keywords[0]
    hits = _search(run_cli, db, f"kw:{keyword}")
    assert tagged in {Path(str(h["path"])).name for h in hits}
    assert all(h["field"] == "keywords" and f"[{keyword}]" in str(h["snippet"]) for h in hits)
    assert {Path(str(h["path"])).name for h in _search(run_cli, db, "kw:grandma")} == {"blobs.jpg"}

    # Again, forced: ours are replaced by the same, the person's stay where they were.
    before = _subjects(person)
    result = run_cli("--db", db, "--model", FLORENCE, "caption", "--force", person)
    assert result.code == 0, result.err
    assert _subjects(person) == before


def test_scan_without_captioning_imports_the_keywords_files_carry(tmp_path: Path, run_cli: CliRunner) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    tagged = mc.make_jpeg(photos / "tagged.jpg")
    mc.exiftool("-overwrite_original", "-XMP-dc:Subject=Zürich", "-XMP-dc:Subject=old town; rain, evening",
                "-IPTC:Keywords=lake", "-XMP-lr:HierarchicalSubject=Places|Europe|Paris", "-charset", "iptc=UTF8",
                tagged)
    mc.make_jpeg(photos / "plain.jpg")
    before = tagged.read_bytes()
    db = tmp_path / "index.db"

    result = run_cli("--db", db, "scan", "--no-caption", photos)

    assert result.code == 0, result.err
    assert tagged.read_bytes() == before
    with Index.open(db) as index:
        row = index.get(tagged)
    assert row is not None and row.model_keywords == ()
    assert set(row.keywords) == {"Zürich", "old town; rain, evening", "lake", "Paris"}
    for query in ("kw:zurich", "kw:paris", "lake", '"old town"'):
        assert [Path(str(h["path"])).name for h in _search(run_cli, db, query)] == ["tagged.jpg"], query


@pytest.mark.skipif(not FONT.is_file(), reason="needs fonts-dejavu-core (.ci/run installs it)")
def test_text_painted_on_a_real_photo_is_read_and_found(tmp_path: Path, run_cli: CliRunner) -> None:
    pytest.importorskip("rapidocr")
    photos = tmp_path / "photos"
    photos.mkdir()
    with Image.open(PHOTOS / "coffee.jpg") as img:
        sign = img.convert("RGB")
    draw = ImageDraw.Draw(sign)
    draw.rectangle((60, 40, 420, 170), fill=(250, 245, 230), outline=(40, 40, 40), width=4)
    draw.text((80, 55), "BAKERY", fill=(150, 20, 20), font=ImageFont.truetype(str(FONT), 48))
    draw.text((80, 115), "GATE A123", fill=(20, 20, 20), font=ImageFont.truetype(str(FONT), 36))
    sign.save(photos / "sign.jpg", quality=92)
    shutil.copy(PHOTOS / "chelsea.jpg", photos / "cat.jpg")
    config = tmp_path / "config.toml"
    config.write_text('[ocr]\nengine = "rapidocr"\n[metadata]\nwrite_text = true\n')
    db = tmp_path / "index.db"

    result = run_cli("--config", config, "--db", db, "--model", VIT, "scan", photos)

    assert result.code == 0, result.err
    for query in ("bakery", "text:bakery", "text:123", 'text:"gate a123"'):
        hits = _search(run_cli, db, query)
        assert [Path(str(h["path"])).name for h in hits] == ["sign.jpg"], (query, hits)
        assert hits[0]["field"] == "text" and "[" in str(hits[0]["snippet"])
    text = mc.exiftool("-s3", "-XMP-capwatch:Text", photos / "sign.jpg")
    assert "BAKERY" in text
    assert mc.exiftool("-s3", "-XMP-dc:Description", photos / "sign.jpg").strip() != text.strip()
    plain = run_cli("--db", db, "search", "bakery")
    assert "    text: BAKERY GATE A123" in plain.out.splitlines()


def test_search_forgives_word_forms_and_finds_cjk_inside_a_run(tmp_path: Path, run_cli: CliRunner) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, words in (("puppy.jpg", "A puppy runs on the grass"), ("sakura.jpg", "日本の桜"),
                        ("tokyo.jpg", "東京タワーの夜景")):
        mc.make_jpeg(photos / name)
        mc.exiftool("-overwrite_original", f"-XMP-dc:Description={words}", photos / name)
    db = tmp_path / "index.db"
    assert run_cli("--db", db, "scan", "--no-caption", photos).code == 0

    def names(*words: str) -> list[str]:
        return [Path(str(h["path"])).name for h in _search(run_cli, db, *words)]

    assert names("puppies") == ["puppy.jpg"]
    assert names("running") == ["puppy.jpg"]
    assert names('"puppy runs"') == ["puppy.jpg"]
    assert names('"runs puppy"') == []
    assert names("桜") == ["sakura.jpg"]
    assert names("日本") == ["sakura.jpg"]
    assert names("タワー") == ["tokyo.jpg"]
    assert names("本日") == []  # the characters must follow one another
    assert names("caption:桜") == ["sakura.jpg"]
    hit = _search(run_cli, db, "桜")[0]
    assert hit["field"] == "caption" and hit["snippet"] == "日本の[桜]"


def test_keywords_of_a_file_whose_description_stays_a_persons_live_in_the_index_only(
        tmp_path: Path, run_cli: CliRunner) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("blobs.jpg", "gradient.jpg", "oriented.jpg"):
        shutil.copy(IMAGES / name, photos / name)
        mc.exiftool("-overwrite_original", "-XMP-dc:Description=Our garden", "-XMP-dc:Subject=Garden", photos / name)
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    config = tmp_path / "config.toml"
    config.write_text("[metadata]\nindex_only_when_described = true\n")
    db = tmp_path / "index.db"

    assert run_cli("--config", config, "--db", db, "scan", "--no-caption", photos).code == 0
    result = run_cli("--config", config, "--db", db, "--model", FLORENCE, "caption", *sorted(photos.iterdir()))
    assert result.code == 0, result.err
    with Index.open(db) as index:
        made = {Path(r.path).name: r.model_keywords for r in index.iter_records()}
    # A rescan after edits the index must notice keeps them too (they are in no file to be read again).
    for photo in photos.iterdir():
        mc.exiftool("-overwrite_original", "-XMP-xmp:Rating=3", photo)
        before[photo.name] = photo.read_bytes()
    assert run_cli("--config", config, "--db", db, "--model", FLORENCE, "scan", "--no-caption", photos).code == 0

    with Index.open(db) as index:
        rows = {Path(r.path).name: r for r in index.iter_records()}
    assert {name: row.model_keywords for name, row in rows.items()} == made
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
    tagged = [name for name, row in rows.items() if row.model_keywords]
    assert tagged, "the tiny Florence model detected nothing at all"
    for name in tagged:
        row = rows[name]
        assert row.source == "human" and row.caption == "Our garden" and row.model_caption
        assert row.keywords[0] == "Garden" and set(row.model_keywords) <= {k.casefold() for k in row.keywords}
        in_file = _subjects(photos / name)[0]
        assert "Garden" in in_file and not set(row.model_keywords) & set(in_file)
    keyword = rows[tagged[0]].model_keywords[0]
    assert tagged[0] in {Path(str(h["path"])).name for h in _search(run_cli, db, f"kw:{keyword}")}
