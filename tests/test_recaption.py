"""`capwatch recaption`: captions capwatch wrote are redone by the criteria given, a person's words never; and `scan`
retries a failed file once it changed, telling how to retry the others."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, CliRunner, assert_one_line_error

GREEDY = FIXTURES / "models" / "vit-gpt2-tiny-greedy"
BEAM = FIXTURES / "models" / "vit-gpt2-tiny-beam"
PERSON = "Grandma's cat on the sofa"


def _library(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("blobs.jpg", "gradient.jpg", "oriented.jpg"):
        shutil.copyfile(FIXTURES / "images" / name, photos / name)
    return photos


def _rows(db: Path) -> dict[str, tuple[str, str | None, str | None]]:
    with sqlite3.connect(db) as conn:
        return {Path(p).name: (s, m, c) for p, s, m, c in conn.execute(
            "SELECT path, status, model, caption FROM images")}


def _description(path: Path) -> str:
    return subprocess.run(["exiftool", "-s3", "-charset", "UTF8", "-XMP-dc:Description", str(path)],
                          capture_output=True, text=True, check=True).stdout.strip()


def _person_writes(path: Path, text: str) -> None:
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-P", f"-XMP-dc:Description={text}",
                    f"-EXIF:ImageDescription={text}", str(path)], check=True)


@pytest.fixture
def captioned(tmp_path: Path, run_cli: CliRunner) -> tuple[Path, Path]:
    photos, db = _library(tmp_path), tmp_path / "index.db"
    result = run_cli("--db", db, "--model", GREEDY, "scan", photos)
    assert result.code == 0, result.err
    assert {m for _s, m, _c in _rows(db).values()} == {"vit-gpt2-tiny-greedy"}
    return photos, db


def test_after_a_model_switch_only_capwatchs_captions_are_redone_and_a_persons_words_stay(
        captioned: tuple[Path, Path], run_cli: CliRunner) -> None:
    photos, db = captioned
    # A person describes one photo after the last scan: the index still lists capwatch's caption for it.
    _person_writes(photos / "gradient.jpg", PERSON)
    before = {name: (photos / name).read_bytes() for name in ("blobs.jpg", "oriented.jpg")}
    result = run_cli("--db", db, "--model", BEAM, "recaption", "--model-changed")
    assert result.code == 0, result.err
    assert result.out.strip().endswith("3 files: 2 captioned again, 1 kept (a person's description)")
    assert _description(photos / "gradient.jpg") == PERSON
    rows = _rows(db)
    assert rows["gradient.jpg"][0] == "described" and rows["gradient.jpg"][2] == PERSON
    for name in ("blobs.jpg", "oriented.jpg"):
        assert rows[name][:2] == ("captioned", "vit-gpt2-tiny-beam")
        assert (photos / name).read_bytes() != before[name]
        assert _description(photos / name) == rows[name][2]
    # Resumable: what is done is not chosen again.
    again = run_cli("--db", db, "--model", BEAM, "recaption", "--model-changed")
    assert (again.code, again.out.strip()) == (0, "0 files to caption again")


def test_from_model_and_before_choose_by_provenance(captioned: tuple[Path, Path], run_cli: CliRunner) -> None:
    photos, db = captioned
    none_before = run_cli("--db", db, "--model", BEAM, "recaption", "--before", "2000", "--dry-run")
    assert none_before.out.strip().endswith("0 files would be captioned again")
    listed = run_cli("--db", db, "--model", BEAM, "recaption", "--from-model", "vit-gpt2-tiny-greedy",
                     "--before", "2999", "--dry-run", photos)
    assert listed.code == 0, listed.err
    assert listed.out.strip().endswith("3 files would be captioned again")
    assert "vit-gpt2-tiny-greedy" in listed.out
    # A model directory has no revision: the line names the model, then when, with no stray space.
    for line in listed.out.splitlines()[:-1]:
        assert "  (vit-gpt2-tiny-greedy, 20" in line and " ," not in line, line
    other = run_cli("--db", db, "recaption", "--from-model", "florence-2-base-ft", "--dry-run")
    assert other.out.strip().endswith("0 files would be captioned again")


def test_dry_run_changes_nothing(captioned: tuple[Path, Path], run_cli: CliRunner) -> None:
    photos, db = captioned
    files = {p.name: p.read_bytes() for p in photos.iterdir()}
    rows = _rows(db)
    result = run_cli("--db", db, "--model", BEAM, "recaption", "--model-changed", "--dry-run")
    assert result.code == 0 and result.out.count(str(photos)) == 3
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == files
    assert _rows(db) == rows


def test_recaption_without_a_criterion_is_a_usage_error(captioned: tuple[Path, Path], run_cli: CliRunner) -> None:
    _photos, db = captioned
    message = assert_one_line_error(run_cli("--db", db, "recaption"))
    assert "--model-changed" in message and "--errors" in message
    assert "before" in assert_one_line_error(run_cli("--db", db, "recaption", "--before", "someday"))


def test_scan_retries_a_failed_file_once_it_changed_and_says_how_to_retry_the_others(
        tmp_path: Path, run_cli: CliRunner) -> None:
    photos, db = _library(tmp_path), tmp_path / "index.db"
    good = (photos / "blobs.jpg").read_bytes()
    (photos / "blobs.jpg").write_bytes(good[: len(good) // 2])  # truncated: fails
    (photos / "oriented.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    first = run_cli("--db", db, "--model", GREEDY, "scan", photos)
    assert first.code == 1 and "2 failed" in first.out
    # Unchanged failures are not retried by the next scan, which says how to retry them.
    second = run_cli("--db", db, "--model", GREEDY, "scan", photos)
    assert second.code == 0, second.err
    assert "2 failed before and are unchanged since (retry: capwatch recaption --errors)" in second.out
    # The copy finished: the file changed since its failure, and the next scan captions it.
    (photos / "blobs.jpg").write_bytes(good)
    third = run_cli("--db", db, "--model", GREEDY, "scan", photos)
    assert third.code == 0, third.err
    assert _rows(db)["blobs.jpg"][0] == "captioned"
    assert "1 failed before" in third.out
    retried = run_cli("--db", db, "--model", GREEDY, "recaption", "--errors")
    assert retried.code == 1 and "oriented.jpg" in retried.err and len(retried.err.strip().splitlines()) == 1


def test_force_says_that_peoples_words_are_lost(run_cli: CliRunner) -> None:
    for command in ("scan", "caption"):
        text = " ".join(run_cli(command, "--help").out.split())
        assert "words are lost" in text, command
    assert "recaption" in run_cli("--help").out


def test_status_json_still_parses_after_recaption(captioned: tuple[Path, Path], run_cli: CliRunner) -> None:
    _photos, db = captioned
    run_cli("--db", db, "--model", BEAM, "recaption", "--model-changed")
    status = json.loads(run_cli("--db", db, "status", "--json").out)
    assert status["captioned"] == 3 and status["errors"] == 0
