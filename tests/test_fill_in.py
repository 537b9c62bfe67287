"""A scan fills in what the current settings produce and the index lacks (text in the image, the model's keywords)
for files captioned before, and for files whose description is a person's, without captioning again and without
writing into any file."""

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

pytestmark = pytest.mark.skipif(not mc.EXIFTOOL, reason="exiftool writes the person's description")


def _sign(path: Path, word: str) -> None:
    with Image.open(PHOTOS / "coffee.jpg") as img:
        sign = img.convert("RGB")
    draw = ImageDraw.Draw(sign)
    draw.rectangle((60, 40, 420, 170), fill=(250, 245, 230), outline=(40, 40, 40), width=4)
    draw.text((80, 55), word, fill=(150, 20, 20), font=ImageFont.truetype(str(FONT), 48))
    sign.save(path, quality=92)


def _names(run_cli: CliRunner, db: Path, *words: str) -> list[str]:
    result = run_cli("--db", db, "search", "--json", *words)
    assert result.code == 0, result.err
    return sorted(Path(json.loads(line)["path"]).name for line in result.out.splitlines())


def _state(photos: Path, db: Path) -> tuple[dict[str, bytes], dict[str, tuple[object, ...]]]:
    with Index.open(db) as index:
        rows = {Path(r.path).name: (r.caption, r.source, r.captioned_at, r.model) for r in index.iter_records()}
    return {p.name: p.read_bytes() for p in sorted(photos.iterdir())}, rows


@pytest.mark.skipif(not FONT.is_file(), reason="needs fonts-dejavu-core (.ci/run installs it)")
def test_turning_ocr_on_later_reads_the_photos_already_captioned_and_a_persons(
        tmp_path: Path, run_cli: CliRunner) -> None:
    pytest.importorskip("rapidocr")
    photos = tmp_path / "photos"
    photos.mkdir()
    _sign(photos / "sign.jpg", "BAKERY")
    _sign(photos / "person.jpg", "BAKERY")
    mc.exiftool("-overwrite_original", "-XMP-dc:Description=Our corner shop", person := photos / "person.jpg")
    shutil.copy(PHOTOS / "chelsea.jpg", photos / "cat.jpg")
    db = tmp_path / "index.db"
    first = run_cli("--db", db, "--model", VIT, "scan", photos)
    assert first.code == 0, first.err
    assert _names(run_cli, db, "text:bakery") == []
    before = _state(photos, db)
    assert before[1]["person.jpg"][1] == "human" and before[1]["sign.jpg"][1] == "model"

    config = tmp_path / "config.toml"
    config.write_text('[ocr]\nengine = "rapidocr"\n')
    second = run_cli("--config", config, "--db", db, "--model", VIT, "scan", photos)

    assert second.code == 0, second.err
    assert "filled in without captioning again (text 3)" in second.out, second.out
    assert _names(run_cli, db, "text:bakery") == ["person.jpg", "sign.jpg"]
    assert _state(photos, db) == before  # no file written, no caption made again, the person's words as they were
    assert mc.exiftool("-s3", "-XMP-dc:Description", person).strip() == "Our corner shop"

    # What was looked for is remembered, found or not (the cat holds no text): nothing is read again.
    third = run_cli("--config", config, "--db", db, "--model", VIT, "scan", photos)
    assert third.code == 0, third.err
    assert "filled in" not in third.out, third.out

    # A file that changes is read afresh (its caption too), and its text again.
    _sign(photos / "sign.jpg", "FLORIST")
    fourth = run_cli("--config", config, "--db", db, "--model", VIT, "scan", photos)
    assert fourth.code == 0, fourth.err
    assert _names(run_cli, db, "text:florist") == ["sign.jpg"]
    assert _names(run_cli, db, "text:bakery") == ["person.jpg"]


def test_turning_keywords_on_later_fills_them_in_without_captioning_again(tmp_path: Path, run_cli: CliRunner) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("blobs.jpg", "gradient.jpg", "oriented.jpg", "checker.png", "red.png", "gray.png"):
        shutil.copy(IMAGES / name, photos / name)
    db = tmp_path / "index.db"
    off = tmp_path / "off.toml"
    off.write_text("[model]\nkeywords = false\n")
    first = run_cli("--config", off, "--db", db, "--model", FLORENCE, "scan", photos)
    assert first.code == 0, first.err
    with Index.open(db) as index:
        assert not any(r.model_keywords for r in index.iter_records())
    before = _state(photos, db)

    on = tmp_path / "on.toml"
    on.write_text("[model]\nkeywords = true\n")
    second = run_cli("--config", on, "--db", db, "--model", FLORENCE, "scan", photos)

    assert second.code == 0, second.err
    assert "6 filled in without captioning again (keywords 6)" in second.out, second.out
    assert _state(photos, db) == before
    with Index.open(db) as index:
        rows = list(index.iter_records())
    tagged = [r for r in rows if r.model_keywords]
    assert tagged, "the tiny Florence model detected nothing at all"
    keyword = tagged[0].model_keywords[0]
    assert Path(tagged[0].path).name in _names(run_cli, db, f"kw:{keyword}")
    third = run_cli("--config", on, "--db", db, "--model", FLORENCE, "scan", photos)
    assert third.code == 0 and "filled in" not in third.out, (third.out, third.err)
