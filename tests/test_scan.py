"""`capwatch scan --no-caption` and reconcile: walk, skip unchanged by stat, import descriptions, moves, deletes,
and never wipe the index of a root that is missing or unmounted."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from capwatch.config import Config, LibraryConfig, RootConfig
from capwatch.library.index import Index
from capwatch.library.scan import FoundFile, glob_regex, is_candidate, iter_image_files, reconcile
from tests.conftest import FIXTURES, CliRunner, assert_one_line_error

needs_exiftool = pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed")


def make_image(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48),
               fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def exiftool(path: Path, *tags: str) -> None:
    subprocess.run(["exiftool", "-q", "-overwrite_original", *tags, str(path)], check=True)


@pytest.fixture
def library(tmp_path: Path) -> Path:
    root = tmp_path / "Pictures"
    make_image(root / "2023" / "bike.jpg")
    make_image(root / "2023" / "beach.png", (20, 40, 200))
    make_image(root / "2023" / "nothing.webp", (20, 200, 20), fmt="WEBP")
    make_image(root / ".hidden" / "secret.jpg")
    make_image(root / "@eaDir" / "thumb.jpg")
    (root / "notes.txt").write_text("not an image")
    make_image(root / "upload.jpg.part", fmt="JPEG")
    return root


@needs_exiftool
def test_scan_imports_descriptions_and_makes_them_searchable(run_cli: CliRunner, library: Path,
                                                             tmp_path: Path) -> None:
    exiftool(library / "2023" / "bike.jpg", "-XMP-dc:Description=A red bike leaning on a wall",
             "-DateTimeOriginal=2023:05:01 10:00:00")
    exiftool(library / "2023" / "beach.png", "-XMP-dc:Description=Kinder am Strand in Zürich")
    exiftool(library / "2023" / "nothing.webp", "-EXIF:ImageDescription=OLYMPUS DIGITAL CAMERA")
    db = tmp_path / "index.db"
    result = run_cli("--db", db, "scan", library, "--no-caption")
    assert result.code == 0, result.err
    # The counts add up: 2 descriptions + 1 waiting (camera boilerplate is no description) = 3 images.
    assert result.out.strip().startswith("3 images: 3 new, 0 changed, 0 moved, 0 removed, 2 descriptions imported")
    assert "; 1 waiting for a caption (1 of them with camera boilerplate only)" in result.out
    found = run_cli("--db", db, "search", "bike", "wall", "--json")
    rows = [json.loads(line) for line in found.out.splitlines()]
    assert [(r["path"], r["source"], r["taken_at"]) for r in rows] == [
        (str(library / "2023" / "bike.jpg"), "human", "2023-05-01T10:00:00")]
    assert (rows[0]["date"], rows[0]["date_from"]) == ("2023-05-01T10:00:00", "taken")
    # Without a date taken, the date the filters use is the file's time, and the result says so.
    [beach] = [json.loads(line) for line in run_cli("--db", db, "search", "zurich", "--json").out.splitlines()]
    mtime = dt.datetime.fromtimestamp((library / "2023" / "beach.png").stat().st_mtime).replace(microsecond=0)
    assert beach["taken_at"] is None and (beach["date"], beach["date_from"]) == (mtime.isoformat(), "file")
    since = run_cli("--db", db, "search", "zurich", "--since", mtime.date().isoformat(), "--paths")
    assert since.out.splitlines() == [str(library / "2023" / "beach.png")]
    assert run_cli("--db", db, "search", "zurich", "--paths").out.splitlines() == [str(library / "2023" / "beach.png")]
    assert run_cli("--db", db, "search", "olympus", "--source", "embedded", "--paths").out.strip() == \
        str(library / "2023" / "nothing.webp")
    status = json.loads(run_cli("--db", db, "status", "--json").out)
    assert status["images"] == 3 and status["captioned"] == 3 and status["pending"] == 1
    assert status["by_status"]["described"] == 2


def test_rescan_skips_unchanged_files_by_stat(run_cli: CliRunner, library: Path, tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    assert run_cli("--db", db, "scan", library, "--no-caption").code == 0
    again = run_cli("--db", db, "scan", library, "--no-caption")
    assert again.code == 0
    assert again.out.startswith("3 images: 0 new, 0 changed, 0 moved, 0 removed")


def _config(root: Path) -> tuple[Config, RootConfig]:
    rc = RootConfig(path=root)
    return Config(library=LibraryConfig(roots=(rc,))), rc


@needs_exiftool
def test_changed_file_is_reread(library: Path, tmp_path: Path) -> None:
    config, root = _config(library)
    with Index.open(tmp_path / "i.db") as index:
        reconcile(root, config, index)
        target = library / "2023" / "bike.jpg"
        exiftool(target, "-XMP-dc:Description=Now with a description")
        result = reconcile(root, config, index)
        assert result.changed == (target,)
        record = index.get(target)
        assert record is not None and record.caption == "Now with a description" and record.source == "human"


def test_moved_file_keeps_its_row_without_rereading(library: Path, tmp_path: Path) -> None:
    config, root = _config(library)
    with Index.open(tmp_path / "i.db") as index:
        reconcile(root, config, index)
        old = library / "2023" / "bike.jpg"
        row = index.get(old)
        assert row is not None
        from dataclasses import replace

        index.upsert(replace(row, caption="a red bike", source="model", status="captioned", model="m"))
        new = library / "archive" / "renamed-bike.jpg"
        new.parent.mkdir()
        os.rename(old, new)
        result = reconcile(root, config, index)
        assert result.moved == ((str(old), str(new)),)
        assert result.removed == ()
        moved = index.get(new)
        assert moved is not None and moved.caption == "a red bike" and moved.status == "captioned"
        assert index.get(old) is None


def test_deleted_file_row_is_removed(library: Path, tmp_path: Path) -> None:
    config, root = _config(library)
    with Index.open(tmp_path / "i.db") as index:
        reconcile(root, config, index)
        (library / "2023" / "beach.png").unlink()
        result = reconcile(root, config, index)
        assert result.removed == (str(library / "2023" / "beach.png"),)
        assert index.stats().images == 2


@pytest.mark.parametrize("how", ["removed", "emptied", "replaced_by_file"])
def test_missing_or_empty_root_never_wipes_the_index(library: Path, tmp_path: Path, how: str) -> None:
    config, root = _config(library)
    with Index.open(tmp_path / "i.db") as index:
        reconcile(root, config, index)
        assert index.stats().images == 3
        shutil.rmtree(library)
        if how == "emptied":
            library.mkdir()  # an unmounted mount point looks like this
        elif how == "replaced_by_file":
            library.write_text("x")
        result = reconcile(root, config, index)
        assert result.root_missing
        assert index.stats().images == 3


def test_scan_of_missing_root_warns_and_keeps_rows(run_cli: CliRunner, library: Path, tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[library]\nroots = ["{library}"]\n')
    assert run_cli("--config", cfg, "--db", db, "scan", "--no-caption").code == 0
    shutil.rmtree(library)
    library.mkdir()
    result = run_cli("--config", cfg, "--db", db, "scan", "--no-caption")
    assert result.code == 1
    assert "empty" in result.err and "kept" in result.err
    assert json.loads(run_cli("--db", db, "status", "--json").out)["images"] == 3


def test_nested_folders_given_together_are_scanned_once(run_cli: CliRunner, library: Path, tmp_path: Path) -> None:
    result = run_cli("--db", tmp_path / "i.db", "scan", library, library / "2023", "--no-caption")
    assert result.code == 0 and result.out.startswith("3 images: 3 new")


def test_scan_of_nonexistent_dir_is_usage_error(run_cli: CliRunner, tmp_path: Path) -> None:
    line = assert_one_line_error(run_cli("--db", tmp_path / "i.db", "scan", tmp_path / "nope", "--no-caption"))
    assert "does not exist" in line


def test_scan_without_dirs_or_roots_is_usage_error(run_cli: CliRunner, tmp_path: Path) -> None:
    line = assert_one_line_error(run_cli("--db", tmp_path / "i.db", "scan", "--no-caption"))
    assert "no folders given" in line


def test_damaged_image_becomes_an_error_row_and_the_rest_is_indexed(run_cli: CliRunner, library: Path,
                                                                     tmp_path: Path) -> None:
    (library / "2023" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00garbage")
    (library / "2023" / "empty.jpg").write_bytes(b"")
    db = tmp_path / "index.db"
    result = run_cli("--db", db, "scan", library, "--no-caption")
    status = json.loads(run_cli("--db", db, "status", "--json").out)
    assert status["images"] == 5
    assert "Traceback" not in result.err
    if status["errors"]:
        assert result.code == 1 and "failed" in result.out
    else:
        assert result.code == 0


def _paths_of(found: Iterable[FoundFile]) -> list[str]:
    return [path for path, _st, _sidecars in found]


def test_walk_honours_hidden_excludes_extensions_and_include(library: Path) -> None:
    lib = LibraryConfig()
    walked = _paths_of(iter_image_files(RootConfig(library), lib))
    found = sorted(Path(p).relative_to(library).as_posix() for p in walked)
    assert found == ["2023/beach.png", "2023/bike.jpg", "2023/nothing.webp"]
    only_jpg = RootConfig(library, include=("*.jpg",))
    assert [Path(p).name for p in _paths_of(iter_image_files(only_jpg, lib))] == ["bike.jpg"]
    no_2023 = RootConfig(library, exclude=("2023/**",))
    assert list(iter_image_files(no_2023, lib)) == []
    with_hidden = LibraryConfig(include_hidden=True)
    assert "secret.jpg" in {Path(p).name for p in _paths_of(iter_image_files(RootConfig(library), with_hidden))}


def test_symlinks_are_not_followed_out_of_a_root_unless_configured(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    make_image(outside / "far.jpg")
    root = tmp_path / "root"
    make_image(root / "near.jpg")
    (root / "link").symlink_to(outside)
    (root / "loop").symlink_to(root)
    (root / "self").symlink_to(".")
    found = [Path(p).relative_to(root).as_posix() for p in _paths_of(iter_image_files(RootConfig(root),
                                                                                         LibraryConfig()))]
    assert found == ["near.jpg"]
    following = LibraryConfig(follow_symlinks=True)
    found = sorted(Path(p).relative_to(root).as_posix() for p in _paths_of(iter_image_files(RootConfig(root),
                                                                                               following)))
    # Every folder once, by device and inode: the loops back to the root add nothing.
    assert found == ["link/far.jpg", "near.jpg"]


def test_scan_with_a_self_link_indexes_every_file_once(tmp_path: Path, run_cli: Any) -> None:
    root = tmp_path / "root"
    make_image(root / "a" / "one.jpg")
    make_image(root / "two.jpg")
    (root / "self").symlink_to(".")
    (root / "a" / "up").symlink_to("..")
    config = tmp_path / "config.toml"
    config.write_text("[library]\nfollow_symlinks = true\n")
    db = tmp_path / "index.db"
    result = run_cli("--config", config, "--db", db, "scan", "--no-caption", root)
    assert result.code == 0, result.err
    assert result.out.startswith("2 images: 2 new"), result.out


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("*.jpg", "a.jpg", True),
        ("*.jpg", "x/y/a.jpg", True),
        ("2023/*.jpg", "2023/a.jpg", True),
        ("2023/*.jpg", "2023/x/a.jpg", False),
        ("2023/**", "2023/x/a.jpg", True),
        ("**/@eaDir/**", "a/@eaDir/", True),
        ("**/@eaDir/**", "@eaDir/x.jpg", True),
        ("**/@eaDir/**", "a/eaDir/x.jpg", False),
        ("IMG_????.JPG", "d/IMG_0001.JPG", True),
        ("IMG_????.JPG", "d/IMG_01.JPG", False),
        ("[!a]*.png", "b.png", True),
        ("[!a]*.png", "a.png", False),
    ],
)
def test_glob_semantics(pattern: str, path: str, matches: bool) -> None:
    assert bool(glob_regex(pattern).match(path)) is matches


def test_is_candidate_matches_the_walk(library: Path) -> None:
    lib = LibraryConfig()
    root = RootConfig(library)
    assert is_candidate(library / "2023" / "bike.jpg", root, lib)
    assert not is_candidate(library / ".hidden" / "secret.jpg", root, lib)
    assert not is_candidate(library / "@eaDir" / "thumb.jpg", root, lib)
    assert not is_candidate(library / "upload.jpg.part", root, lib)
    assert not is_candidate(library / "notes.txt", root, lib)
    assert not is_candidate(library.parent / "elsewhere.jpg", root, lib)
    assert not is_candidate(Path(os.fsdecode(os.fsencode(library) + b"/caf\xe9.jpg")), root, lib)


def test_a_file_name_that_is_not_utf8_is_reported_and_the_rest_indexed(run_cli: CliRunner, library: Path,
                                                                        tmp_path: Path) -> None:
    bad_file = os.fsencode(library / "2023") + b"/caf\xe9.jpg"
    with open(bad_file, "wb") as handle:
        handle.write((library / "2023" / "bike.jpg").read_bytes())
    os.mkdir(os.fsencode(library) + b"/\xe9t\xe9")
    with open(os.fsencode(library) + b"/\xe9t\xe9/x.jpg", "wb") as handle:
        handle.write((library / "2023" / "bike.jpg").read_bytes())
    db = tmp_path / "index.db"
    result = run_cli("--db", db, "scan", library, "--no-caption")
    assert result.code == 1 and "Traceback" not in result.err
    assert result.out.startswith("3 images: 3 new") and "2 failed" in result.out
    assert "caf\\xe9.jpg" in result.err
    assert json.loads(run_cli("--db", db, "status", "--json").out)["images"] == 3
    caption = run_cli("--db", db, "--model", FIXTURES / "models" / "vit-gpt2-tiny-greedy", "caption", "--json",
                      os.fsdecode(bad_file), library / "2023" / "bike.jpg")
    assert caption.code == 1 and "Traceback" not in caption.err
    rows = [json.loads(line) for line in caption.out.splitlines()]
    assert "not valid UTF-8" in rows[0]["error"] and rows[1]["error"] is None


def test_a_match_in_the_path_alone_prints_no_empty_caption_line(run_cli: CliRunner, library: Path,
                                                                  tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    assert run_cli("--db", db, "scan", library, "--no-caption").code == 0
    found = run_cli("--db", db, "search", "path:bike")
    assert found.code == 0, found.err
    lines = found.out.splitlines()
    assert lines[0] == str(library / "2023" / "bike.jpg"), lines
    assert all(line.strip() for line in lines), lines
    assert lines[1] == "    (no caption yet)" and lines[2].startswith("    path: "), lines
