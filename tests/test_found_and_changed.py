"""What `caption` shows of what it found (keywords, text in the image, --dry-run too), and a file that changed
while it was being read, which is never an error (a writer that closes, reopens and finishes a file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from daemon_helpers import IMAGES, MODELS
from PIL import Image, ImageDraw, ImageFont

from capwatch.config import Config, ModelConfig
from capwatch.errors import ImageError
from capwatch.library.index import Index
from capwatch.library.process import Processor
from capwatch.metadata import Journal
from capwatch.models.captioner import open_captioner
from tests.conftest import DEJAVU_BOLD, CliRunner

FLORENCE = MODELS / "florence2-tiny"
VIT = MODELS / "vit-gpt2-tiny-greedy"
PHOTOS = Path(__file__).parent / "fixtures" / "photos"
FONT = DEJAVU_BOLD


def _sign(path: Path) -> Path:
    with Image.open(PHOTOS / "coffee.jpg") as img:
        sign = img.convert("RGB")
    draw = ImageDraw.Draw(sign)
    draw.rectangle((60, 40, 420, 170), fill=(250, 245, 230), outline=(40, 40, 40), width=4)
    draw.text((80, 55), "BAKERY", fill=(150, 20, 20), font=ImageFont.truetype(str(FONT), 48))
    sign.save(path, quality=92)
    return path


def _lines(out: str) -> dict[str, dict[str, object]]:
    return {Path(str(d["path"])).name: d for d in map(json.loads, out.splitlines())}


@pytest.mark.skipif(not FONT.is_file(), reason="needs fonts-dejavu-core (.ci/run installs it)")
def test_caption_json_and_dry_run_show_the_keywords_and_text_found(tmp_path: Path, run_cli: CliRunner) -> None:
    pytest.importorskip("rapidocr")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("blobs.jpg", "gradient.jpg", "checker.png"):
        shutil.copy(IMAGES / name, photos / name)
    _sign(photos / "sign.jpg")
    files = sorted(photos.iterdir())
    config = tmp_path / "config.toml"
    config.write_text('[ocr]\nengine = "rapidocr"\n')
    db = tmp_path / "index.db"
    before = {f.name: f.read_bytes() for f in files}

    dry = run_cli("--config", config, "--db", db, "--model", FLORENCE, "caption", "--dry-run", "--json", *files)
    assert dry.code == 0, dry.err
    assert {f.name: f.read_bytes() for f in files} == before  # a dry run writes nothing
    found = _lines(dry.out)
    assert set(found) == {f.name for f in files}
    for line in found.values():
        assert isinstance(line["keywords"], list) and "text" in line
    assert any(line["keywords"] for line in found.values()), "the tiny Florence model detected nothing at all"
    assert "BAKERY" in str(found["sign.jpg"]["text"])

    # The real run finds the same, says so, and records it.
    real = run_cli("--config", config, "--db", db, "--model", FLORENCE, "caption", "--json", *files)
    assert real.code == 0, real.err
    done = _lines(real.out)
    with Index.open(db) as index:
        for name, line in done.items():
            assert line["keywords"] == found[name]["keywords"] and line["text"] == found[name]["text"], name
            row = index.get(photos / name)
            assert row is not None and list(row.model_keywords) == line["keywords"], (name, row)

    # The text output shows them too.
    plain = run_cli("--config", config, "--db", db, "--model", FLORENCE, "caption", "--dry-run", photos / "sign.jpg")
    assert plain.code == 0, plain.err
    assert any(line.startswith("  text: ") and "BAKERY" in line for line in plain.out.splitlines()), plain.out
    if found["sign.jpg"]["keywords"]:
        assert "  keywords: " + ", ".join(map(str, found["sign.jpg"]["keywords"])) in plain.out.splitlines()


def test_a_file_finished_after_a_failed_read_is_read_again_not_an_error(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    whole = (IMAGES / "blobs.jpg").read_bytes()
    photo.write_bytes(whole[:len(whole) // 2])  # the writer's first close
    db = tmp_path / "index.db"
    config = Config(model=ModelConfig(dir=VIT))
    captioner = open_captioner(VIT, config.model)
    with Index.open(db) as index:
        processor = Processor(config, index, captioner, journal=Journal(tmp_path / "journal"))
        try:
            _, jobs = processor.prepare([photo], skip_captioned=False)
            assert len(jobs) == 1
            with pytest.raises(ImageError) as failed:  # the half file, decoded for real
                captioner.preprocess_file(photo)
            with open(photo, "ab") as handle:  # the writer reopens and finishes the file
                handle.write(whole[len(whole) // 2:])
            [(_, outcome)] = processor.complete(jobs, [failed.value])
            assert outcome.error is None and outcome.changed, outcome
            row = index.get(photo)
            assert row is None or row.status != "error", row
            # Read again, the finished photo is captioned.
            [again] = processor.process([photo], skip_captioned=False)
            assert again.error is None and again.caption, again
            row = index.get(photo)
            assert row is not None and row.status == "captioned" and index.stats().by_status["error"] == 0
        finally:
            processor.close()
            captioner.close()


def test_an_image_that_cannot_be_read_and_does_not_change_is_still_an_error(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    whole = (IMAGES / "blobs.jpg").read_bytes()
    photo.write_bytes(whole[:len(whole) // 2])
    config = Config(model=ModelConfig(dir=VIT))
    captioner = open_captioner(VIT, config.model)
    with Index.open(tmp_path / "index.db") as index:
        processor = Processor(config, index, captioner, journal=Journal(tmp_path / "journal"))
        try:
            [outcome] = processor.process([photo], skip_captioned=False)
            assert outcome.error and not outcome.changed, outcome
            row = index.get(photo)
            assert row is not None and row.status == "error"
        finally:
            processor.close()
            captioner.close()



def test_onnxruntime_leaves_no_files_in_the_home_or_cache_of_who_runs_capwatch(
        tmp_path: Path, run_cli: CliRunner) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    photo = tmp_path / "photo.jpg"
    shutil.copy(IMAGES / "blobs.jpg", photo)
    result = run_cli("--model", VIT, "caption", "--dry-run", photo, env={"TMPDIR": str(temp)})
    assert result.code == 0, result.err
    home = tmp_path / "home"
    assert not [p for p in home.rglob("*") if "Microsoft" in p.parts or "onnxruntime" in p.name], \
        sorted(map(str, home.rglob("*")))
    assert list(temp.iterdir()) == []  # the private folder onnxruntime was given is gone again
    assert "telemetry" not in result.err


def test_a_scan_with_every_kind_of_model_leaves_no_onnxruntime_files_in_the_home(
        tmp_path: Path, run_cli: CliRunner) -> None:
    # Captioner (Florence-2's shared seq2seq decoder), embedder and translator each load onnxruntime: whichever
    # is first must import it the quiet way (capwatch.models.runtime), or its device id lands in ~/.cache.
    library = tmp_path / "photos"
    library.mkdir()
    shutil.copy(IMAGES / "blobs.jpg", library / "photo.jpg")
    config = tmp_path / "capwatch.toml"
    config.write_text(f"""[model]
dir = "{MODELS / 'florence2-tiny'}"
precision = "fp32"

[embed]
model = "{MODELS / 'siglip-tiny'}"

[language]
captions = ["fr"]
models = {{ fr = "{MODELS / 'marian-tiny-en-xx'}" }}
""")
    result = run_cli("--config", config, "--db", tmp_path / "index.db", "scan", library)
    assert result.code == 0, result.err
    assert "1 captioned" in result.out, result.out
    home = tmp_path / "home"
    assert not [p for p in home.rglob("*") if "Microsoft" in p.parts or "onnxruntime" in p.name], \
        sorted(map(str, home.rglob("*")))


def test_only_capwatch_models_runtime_imports_onnxruntime_itself() -> None:
    # The rule the two tests above check for the paths they take, for every module: onnxruntime is imported in
    # capwatch.models.runtime alone; a module that imports one of its submodules imports runtime first.
    import ast

    import capwatch

    package = Path(capwatch.__file__).parent
    offenders = []
    for source in sorted(package.rglob("*.py")):
        if source == package / "models" / "runtime.py":
            continue
        tree = ast.parse(source.read_text(), str(source))
        names = [(node.lineno, alias.name) for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names]
        names += [(node.lineno, node.module) for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module]
        quiet_first = any(isinstance(node, ast.ImportFrom) and (
            node.module == "capwatch.models.runtime"
            or (node.module == "capwatch.models" and any(a.name == "runtime" for a in node.names)))
            for node in tree.body)
        for line, name in names:
            if name == "onnxruntime" or (name.startswith("onnxruntime.") and not quiet_first):
                offenders.append(f"{source.relative_to(package)}:{line}: {name}")
    assert offenders == []
