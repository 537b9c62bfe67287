"""`capwatch caption` and the processor end to end: tiny real ONNX model, real files, real writes, real index."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from capwatch.config import Config, LibraryConfig, MetadataConfig, ModelConfig, RootConfig
from capwatch.library.index import Index
from capwatch.library.outcomes import HUMAN_KEPT
from capwatch.library.process import Processor
from capwatch.library.scan import reconcile
from capwatch.models.captioner import open_captioner
from tests.conftest import FIXTURES, CliRunner

MODEL = FIXTURES / "models" / "vit-gpt2-tiny-greedy"
needs_exiftool = pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed")


def make_jpeg(path: Path, color: tuple[int, int, int] = (180, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (96, 64), color).save(path, quality=90)
    return path


def exif_description(path: Path) -> dict[str, str]:
    out = subprocess.run(["exiftool", "-j", "-G1", "-ImageDescription", "-XMP-dc:Description", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return {k: v for k, v in json.loads(out)[0].items() if k != "SourceFile"}


def _caption(run_cli: CliRunner, db: Path, *args: str | Path) -> tuple[int, list[dict[str, object]], str]:
    result = run_cli("--db", db, "--model", MODEL, "caption", "--json", *args)
    return result.code, [json.loads(line) for line in result.out.splitlines()], result.err


@needs_exiftool
def test_caption_writes_into_the_file_and_the_index(run_cli: CliRunner, tmp_path: Path) -> None:
    image = make_jpeg(tmp_path / "photos" / "red.jpg")
    db = tmp_path / "index.db"
    code, rows, err = _caption(run_cli, db, image)
    assert code == 0, err
    (row,) = rows
    assert set(row) == {"path", "caption", "model", "written", "skipped", "error", "keywords", "text", "captions"}
    assert row["captions"] == {"en": row["caption"]}
    assert row["path"] == str(image) and row["error"] is None and row["skipped"] is None
    caption = row["caption"]
    assert isinstance(caption, str) and caption
    assert row["written"], row
    tags = exif_description(image)
    assert tags.get("IFD0:ImageDescription") == caption
    assert tags.get("XMP-dc:Description") == caption
    word = next(w for w in caption.split() if any(ch.isalnum() for ch in w))
    word = "".join(ch for ch in word if ch.isalnum())
    found = run_cli("--db", db, "search", word, "--json")
    assert found.code == 0, found.err
    hits = [json.loads(line) for line in found.out.splitlines()]
    assert [h["path"] for h in hits] == [str(image)] and hits[0]["source"] == "model"


@needs_exiftool
def test_a_persons_description_is_kept_unless_forced(run_cli: CliRunner, tmp_path: Path) -> None:
    image = make_jpeg(tmp_path / "grandma.jpg")
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Description=Grandma's 80th birthday",
                    str(image)], check=True)
    before = image.read_bytes()
    db = tmp_path / "index.db"
    code, (row,), _ = _caption(run_cli, db, image)
    assert code == 0
    assert row["skipped"] == HUMAN_KEPT and row["written"] == [] and row["error"] is None
    assert image.read_bytes() == before
    hits = run_cli("--db", db, "search", "grandma", "--json").out.splitlines()
    assert json.loads(hits[0])["source"] == "human"

    code, (row,), _ = _caption(run_cli, db, image, "--force")
    assert code == 0 and row["written"] and row["skipped"] is None
    assert exif_description(image)["XMP-dc:Description"] == row["caption"]


def test_dry_run_writes_nothing(run_cli: CliRunner, tmp_path: Path) -> None:
    image = make_jpeg(tmp_path / "a.jpg")
    before = image.read_bytes()
    db = tmp_path / "index.db"
    code, (row,), err = _caption(run_cli, db, image, "--dry-run")
    assert code == 0, err
    assert row["caption"] and row["written"] == [] and row["error"] is None
    assert image.read_bytes() == before
    assert not db.exists()


def test_bad_files_fail_alone_with_exit_1(run_cli: CliRunner, tmp_path: Path) -> None:
    good = make_jpeg(tmp_path / "good.jpg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("this is not an image\n")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    missing = tmp_path / "missing.jpg"
    db = tmp_path / "index.db"
    code, rows, err = _caption(run_cli, db, empty, good, text, truncated, missing)
    assert code == 1
    assert "Traceback" not in err
    by_path = {Path(str(r["path"])).name: r for r in rows}
    assert list(by_path) == ["empty.jpg", "good.jpg", "text.jpg", "truncated.jpg", "missing.jpg"]
    assert by_path["good.jpg"]["error"] is None and by_path["good.jpg"]["caption"]
    for name in ("empty.jpg", "text.jpg", "truncated.jpg", "missing.jpg"):
        message = by_path[name]["error"]
        assert isinstance(message, str) and "\n" not in message, (name, message)
    assert empty.read_bytes() == b"" and text.read_text() == "this is not an image\n"


def test_unknown_model_offline_is_one_line(run_cli: CliRunner, tmp_path: Path) -> None:
    image = make_jpeg(tmp_path / "a.jpg")
    result = run_cli("--db", tmp_path / "i.db", "--model", "no-such-model", "caption", image)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err


def test_model_dir_missing_files_is_one_line(run_cli: CliRunner, tmp_path: Path) -> None:
    broken = tmp_path / "model"
    shutil.copytree(MODEL, broken)
    (broken / "config.json").unlink()
    image = make_jpeg(tmp_path / "a.jpg")
    result = run_cli("--db", tmp_path / "i.db", "--model", broken, "caption", image)
    assert result.code == 2, result.err
    assert len(result.err.strip().splitlines()) == 1 and "config.json" in result.err


def _processor(tmp_path: Path, index: Index, **metadata: object) -> Processor:
    config = Config(model=ModelConfig(dir=MODEL, precision="fp32", batch_size=4),
                    metadata=MetadataConfig(**metadata))  # type: ignore[arg-type]
    return Processor(config, index, open_captioner(MODEL, config.model))


@needs_exiftool
def test_our_own_write_is_recognised_by_the_next_reconcile(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    images = [make_jpeg(root / f"{i}.jpg", (40 * i, 90, 200 - 30 * i)) for i in range(3)]
    config = Config(library=LibraryConfig(roots=(RootConfig(root),)),
                    model=ModelConfig(dir=MODEL, precision="fp32"))
    with Index.open(tmp_path / "i.db") as index:
        first = reconcile(config.library.roots[0], config, index)
        assert len(first.to_caption) == 3
        processor = Processor(config, index, open_captioner(MODEL, config.model))
        outcomes = processor.process_batch(first.to_caption)
        assert all(o.written and o.error is None for o in outcomes)
        again = reconcile(config.library.roots[0], config, index)
        assert again.unchanged == 3 and again.to_caption == ()
        # And a scan-style second pass skips them without running the model.
        skipped = processor.process_batch(images)
        assert all(o.skipped is not None for o in skipped)


def test_batch_results_equal_one_at_a_time(tmp_path: Path) -> None:
    images = [make_jpeg(tmp_path / f"{i}.jpg", (30 * i, 200 - 20 * i, 90)) for i in range(5)]
    with Index.open(tmp_path / "i.db") as index:
        processor = _processor(tmp_path, index)
        processor.dry_run = True
        batched = [o.caption for o in processor.process_batch(images)]
        single = [processor.process_batch([p])[0].caption for p in images]
    assert batched == single and all(batched)


@needs_exiftool
def test_index_only_when_described_captions_into_the_index_not_the_file(tmp_path: Path) -> None:
    image = make_jpeg(tmp_path / "party.jpg")
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Description=Tom's party", str(image)],
                   check=True)
    before = image.read_bytes()
    with Index.open(tmp_path / "i.db") as index:
        processor = _processor(tmp_path, index, index_only_when_described=True)
        (outcome,) = processor.process_batch([image])
        assert outcome.caption and outcome.written == ()
        assert image.read_bytes() == before
        record = index.get(image)
        assert record is not None
        assert record.caption == "Tom's party" and record.source == "human"
        assert record.model_caption == outcome.caption


@needs_exiftool
def test_scan_captions_what_needs_it_and_is_idempotent(run_cli: CliRunner, tmp_path: Path) -> None:
    root = tmp_path / "lib"
    for i in range(5):
        make_jpeg(root / "a" / f"{i}.jpg", (50 * i, 20, 200 - 40 * i))
    described = make_jpeg(root / "b" / "party.jpg")
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Description=Tom's party", str(described)],
                   check=True)
    before = described.read_bytes()
    db = tmp_path / "index.db"
    first = run_cli("--db", db, "--model", MODEL, "scan", root)
    assert first.code == 0, first.err
    assert first.out.startswith("6 images: 6 new") and "5 captioned" in first.out
    assert described.read_bytes() == before
    status = json.loads(run_cli("--db", db, "status", "--json").out)
    assert status["captioned"] == 6 and status["pending"] == 0 and status["by_source"]["model"] == 5
    for i in range(5):
        assert exif_description(root / "a" / f"{i}.jpg").get("XMP-dc:Description")
    second = run_cli("--db", db, "--model", MODEL, "scan", root)
    assert second.code == 0 and "0 new, 0 changed" in second.out and "0 captioned" in second.out


def test_scan_without_an_available_model_keeps_the_index_and_says_how(run_cli: CliRunner, tmp_path: Path) -> None:
    root = tmp_path / "lib"
    make_jpeg(root / "x.jpg")
    db = tmp_path / "index.db"
    result = run_cli("--db", db, "scan", root)  # default model, offline, empty cache
    assert result.code == 2 and len(result.err_lines) == 1 and "capwatch models pull" in result.err
    assert json.loads(run_cli("--db", db, "status", "--json").out)["pending"] == 1


def test_global_options_also_work_after_the_command(run_cli: CliRunner, tmp_path: Path) -> None:
    image = make_jpeg(tmp_path / "a.jpg")
    db = tmp_path / "index.db"
    florence = FIXTURES / "models" / "florence2-tiny"
    result = run_cli("caption", "--model", florence, "--db", db, image, "--json")
    assert result.code == 0, result.err
    (row,) = [json.loads(line) for line in result.out.splitlines()]
    assert row["caption"] and row["error"] is None and row["model"]
    status = run_cli("status", "--db", db, "--json")
    assert status.code == 0 and json.loads(status.out)["captioned"] == 1
    word = "".join(ch for ch in str(row["caption"]).split()[0] if ch.isalnum())
    found = run_cli("search", word, "--db", db, "--paths")
    assert found.code == 0 and found.out.splitlines() == [str(image)]


@needs_exiftool
@pytest.mark.parametrize("field", ["-XMP-dc:Description", "-EXIF:ImageDescription", "-IPTC:Caption-Abstract"])
def test_a_persons_edit_of_our_caption_in_any_field_is_theirs(run_cli: CliRunner, tmp_path: Path,
                                                              field: str) -> None:
    image = make_jpeg(tmp_path / "lib" / "a.jpg")
    if field.startswith("-IPTC"):
        subprocess.run(["exiftool", "-q", "-overwrite_original", "-IPTC:Keywords=x", str(image)], check=True)
    db = tmp_path / "index.db"
    code, (row,), err = _caption(run_cli, db, image)
    assert code == 0 and row["written"], err
    subprocess.run(["exiftool", "-q", "-overwrite_original", f"{field}=Corrected by me", str(image)], check=True)
    edited = image.read_bytes()
    scan = run_cli("--db", db, "scan", tmp_path / "lib", "--no-caption")
    assert scan.code == 0 and "1 changed" in scan.out and "1 descriptions imported" in scan.out
    hits = [json.loads(line) for line in run_cli("--db", db, "search", "corrected", "--json").out.splitlines()]
    assert [(h["path"], h["source"]) for h in hits] == [(str(image), "human")]
    code, (row,), _ = _caption(run_cli, db, image)
    assert code == 0 and row["skipped"] == HUMAN_KEPT and row["written"] == []
    assert image.read_bytes() == edited


def test_captioning_again_with_the_same_result_leaves_the_file_alone(run_cli: CliRunner, tmp_path: Path) -> None:
    image = make_jpeg(tmp_path / "a.jpg")
    db = tmp_path / "index.db"
    code, (first,), _ = _caption(run_cli, db, image)
    assert code == 0 and first["written"]
    after_first = image.read_bytes()
    code, (second,), _ = _caption(run_cli, db, image)
    assert code == 0 and second["caption"] == first["caption"]
    assert second["written"] == [] and str(second["skipped"]).startswith("unchanged")
    assert image.read_bytes() == after_first
