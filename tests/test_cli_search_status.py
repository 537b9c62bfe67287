"""`capwatch search` and `capwatch status` as a user (or a script) drives them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from capwatch.library.index import ImageRecord, Index
from tests.conftest import CliRunner, assert_one_line_error, read_only_dir


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "index.db"
    with Index.open(path) as index:
        index.upsert_many([
            ImageRecord(path="/lib/2023/bike.jpg", size=1, mtime_ns=1, caption="A red bike leaning on a wall",
                        source="model", model="tiny", status="captioned", taken_at="2023-05-01T10:00:00"),
            ImageRecord(path="/lib/2021/dog.jpg", size=1, mtime_ns=1, caption="Our dog Rex on the beach",
                        source="human", status="described", taken_at="2021-07-04T12:00:00"),
            ImageRecord(path="/lib/2021/cam.jpg", size=1, mtime_ns=1, caption="OLYMPUS DIGITAL CAMERA",
                        source="embedded", status="pending", taken_at="2021-07-05T12:00:00"),
            ImageRecord(path="/lib/new lines\nname.jpg", size=1, mtime_ns=1, caption="a bicycle in the snow",
                        source="model", model="tiny", status="captioned", taken_at="2024-01-01T00:00:00"),
        ])
    return path


def test_search_prints_ranked_paths_with_highlighted_caption(run_cli: CliRunner, db: Path) -> None:
    result = run_cli("--db", db, "search", "red", "bike")
    assert result.code == 0, result.err
    assert result.out.splitlines()[0] == "/lib/2023/bike.jpg"
    assert "red bike" in result.out.splitlines()[1].lower()


def test_search_json_lines_follow_the_contract(run_cli: CliRunner, db: Path) -> None:
    result = run_cli("--db", db, "search", "bike OR bicycle", "--json")
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert {r["path"] for r in rows} == {"/lib/2023/bike.jpg", "/lib/new lines\nname.jpg"}
    for row in rows:
        assert set(row) == {"path", "caption", "score", "source", "model", "taken_at", "date", "date_from", "field",
                            "snippet", "similarity", "match", "media", "pair", "at"}
        assert row["media"] == "image" and row["pair"] is None and row["at"] is None
        assert isinstance(row["score"], float)
    assert rows[0]["score"] >= rows[1]["score"]


def test_search_paths_nul_separated_for_xargs(run_cli: CliRunner, db: Path) -> None:
    result = run_cli("--db", db, "search", "bicycle", "--paths", "-0")
    assert result.code == 0
    assert result.out == "/lib/new lines\nname.jpg\0"


def test_search_filters_by_source_date_and_folder(run_cli: CliRunner, db: Path) -> None:
    def paths(*args: str) -> list[str]:
        result = run_cli("--db", db, "search", *args, "--paths")
        assert result.code == 0, result.err
        return result.out.splitlines()

    assert paths("dog", "--source", "human") == ["/lib/2021/dog.jpg"]
    assert paths("dog", "--source", "model") == []
    assert paths("olympus", "--source", "embedded") == ["/lib/2021/cam.jpg"]
    assert paths("lib", "--since", "2023", "--until", "2023") == ["/lib/2023/bike.jpg"]
    assert sorted(paths("lib", "--in", "/lib/2021")) == ["/lib/2021/cam.jpg", "/lib/2021/dog.jpg"]
    assert len(paths("lib", "--limit", "2")) == 2


def test_search_excludes_and_prefixes(run_cli: CliRunner, db: Path) -> None:
    result = run_cli("--db", db, "search", "bi*", "-snow", "--paths")
    assert result.out.splitlines() == ["/lib/2023/bike.jpg"]
    result = run_cli("--db", db, "search", '"on the beach"', "--paths")
    assert result.out.splitlines() == ["/lib/2021/dog.jpg"]


@pytest.mark.parametrize(
    "args",
    [
        ["search", '"red bike'],
        ["search", "-"],
        ["search", "OR", "OR"],
        ["search", "*"],
        ["search", ""],
        ["search", "bike", "--since", "last tuesday"],
        ["search", "bike", "--until", "2020-13-01"],
        ["search", "bike", "--limit", "0"],
        ["search", "bike", "--source", "robot"],
        ["search", "bike", "--json", "--paths"],
        ["search"],
        ["frobnicate"],
    ],
)
def test_bad_search_input_is_one_line_exit_2(run_cli: CliRunner, db: Path, args: list[str]) -> None:
    line = assert_one_line_error(run_cli("--db", db, *args))
    assert line.startswith("capwatch: error:")
    assert "sqlite" not in line.lower() and "fts5" not in line.lower()


def test_search_before_any_scan_says_what_to_do(run_cli: CliRunner, tmp_path: Path) -> None:
    line = assert_one_line_error(run_cli("--db", tmp_path / "none.db", "search", "x"))
    assert "capwatch scan" in line
    assert not (tmp_path / "none.db").exists()


def test_corrupt_index_is_one_line_and_kept(run_cli: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"\x00garbage" * 1000)
    before = bad.read_bytes()
    for args in (["search", "x"], ["status"], ["scan", str(tmp_path), "--no-caption"]):
        line = assert_one_line_error(run_cli("--db", bad, *args))
        assert "damaged" in line
    assert bad.read_bytes() == before


def test_truncated_index_file_is_one_line(run_cli: CliRunner, db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[:100])
    assert_one_line_error(run_cli("--db", db, "search", "bike"))


def test_index_on_read_only_path_is_one_line(run_cli: CliRunner, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only_dir(ro):
        line = assert_one_line_error(run_cli("--db", ro / "i.db", "scan", str(tmp_path), "--no-caption"))
    assert "read-only" in line


def test_index_under_a_file_is_one_line(run_cli: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    line = assert_one_line_error(run_cli("--db", tmp_path / "afile" / "i.db", "scan", str(tmp_path),
                                         "--no-caption"))
    assert "cannot create index directory" in line


def test_bad_config_is_one_line_exit_2(run_cli: CliRunner, tmp_path: Path, db: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nprecision = 'int3'\n")
    line = assert_one_line_error(run_cli("--config", cfg, "--db", db, "search", "bike"))
    assert "model.precision" in line and str(cfg) in line
    line = assert_one_line_error(run_cli("--config", tmp_path / "missing.toml", "status"))
    assert "not found" in line
    line = assert_one_line_error(run_cli("status", env={"CAPWATCH_CONFIG": str(tmp_path / "missing.toml")}))
    assert "not found" in line


def test_status_json_counts(run_cli: CliRunner, db: Path) -> None:
    with Index.open(db) as index:
        index.set_error("/lib/2021/cam.jpg", "cannot decode")
    result = run_cli("--db", db, "status", "--json")
    assert result.code == 0, result.err
    status = json.loads(result.out)
    assert status["images"] == 4
    assert status["captioned"] == 4
    assert status["pending"] == 0
    assert status["errors"] == 1
    assert status["index"] == str(db)
    assert status["model"] == "florence-2-base-ft"
    assert status["by_source"] == {"model": 2, "human": 1, "embedded": 1}
    assert status["last_errors"][0]["error"] == "cannot decode"
    for key in ("images", "captioned", "pending", "errors"):
        assert isinstance(status[key], int)


def test_status_text_and_before_first_scan(run_cli: CliRunner, tmp_path: Path, db: Path) -> None:
    result = run_cli("--db", db, "status")
    assert result.code == 0 and "images     4" in result.out
    result = run_cli("--db", tmp_path / "fresh.db", "status", "--json")
    assert result.code == 0 and json.loads(result.out)["images"] == 0
    assert not (tmp_path / "fresh.db").exists()


def test_search_waits_for_a_writer_instead_of_failing(run_cli: CliRunner, db: Path) -> None:
    # WAL: a reader is not blocked by a writer holding the write lock.
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE images SET caption = 'changing' WHERE path = '/lib/2021/dog.jpg'")
    try:
        result = run_cli("--db", db, "search", "beach", "--paths")
        assert result.code == 0 and result.out.splitlines() == ["/lib/2021/dog.jpg"]
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@pytest.mark.parametrize("command", [[], ["search"], ["status"], ["scan"], ["caption"], ["watch"], ["models"],
                                     ["models", "list"], ["models", "pull"], ["models", "info"], ["similar"],
                                     ["duplicates"]])
def test_every_command_has_help(run_cli: CliRunner, command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.code == 0, result.err
    assert "Usage:" in result.out
    lines = [line for line in result.out.splitlines() if line.strip()]
    assert len(lines) >= 3
