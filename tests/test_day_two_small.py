"""Small things found by using capwatch for a day: inputs checked first, one warning per missing root, a closed
pipe, the default roots, the example config's values, the help texts, declared dependencies."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from capwatch.config import Config, RootConfig, load_config_file
from tests.conftest import REPO, CliRunner, assert_one_line_error, isolated_env

IMAGES = REPO / "tests" / "fixtures" / "images"
EXAMPLE = REPO / "config.example.toml"


def _library(tmp_path: Path, name: str = "lib") -> Path:
    library = tmp_path / name
    library.mkdir()
    shutil.copyfile(IMAGES / "blobs.jpg", library / "beach.jpg")
    return library


# -- caption checks its inputs before touching the model -----------------------------------------------------------


def test_caption_of_a_missing_file_says_so_before_any_model_work(run_cli: CliRunner, tmp_path: Path) -> None:
    # CAPWATCH_OFFLINE=1 and an empty cache: any model work would end in "not in the cache", exit 2.
    line = assert_one_line_error(run_cli("caption", tmp_path / "nope.jpg"), code=1)
    assert line == f"{tmp_path / 'nope.jpg'}: error: no such file"


def test_caption_of_nothing_usable_reports_every_file_in_order(run_cli: CliRunner, tmp_path: Path) -> None:
    library = _library(tmp_path)
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    args = (tmp_path / "a.jpg", library, tmp_path / "dangling.jpg")
    result = run_cli("caption", *args)
    assert result.code == 1 and "Traceback" not in result.err
    assert result.err_lines == [f"{tmp_path / 'a.jpg'}: error: no such file",
                                f"{library}: error: is a folder, not an image file",
                                f"{tmp_path / 'dangling.jpg'}: error: no such file"]
    rows = [json.loads(line) for line in run_cli("caption", "--json", *args).out.splitlines()]
    assert [(row["path"], row["caption"], row["error"] is not None) for row in rows] == [
        (str(path), None, True) for path in args]


# -- search --in a folder that does not exist -----------------------------------------------------------------------


def test_search_in_a_missing_folder_is_an_error_not_no_matches(run_cli: CliRunner, tmp_path: Path) -> None:
    library = _library(tmp_path)
    db = tmp_path / "index.db"
    assert run_cli("--db", db, "scan", library, "--no-caption").code == 0
    assert run_cli("--db", db, "search", "beach", "--in", library, "--paths").out == f"{library / 'beach.jpg'}\n"

    line = assert_one_line_error(run_cli("--db", db, "search", "beach", "--in", tmp_path / "nope"))
    assert str(tmp_path / "nope") in line and "does not exist" in line

    none = run_cli("--db", db, "search", "zebra", "--in", library)
    assert (none.code, none.err.strip()) == (0, "no matches")

    # A root that is unmounted keeps its rows: searching them still works.
    shutil.rmtree(library)
    kept = run_cli("--db", db, "search", "beach", "--in", library, "--paths")
    assert (kept.code, kept.out) == (0, f"{library / 'beach.jpg'}\n")


# -- a reader that goes away ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [("status",), ("status", "--json"), ("models", "list"), ("search", "beach"),
                                  ("--help",), ("--version",), ("scan", "--help")])
def test_output_into_a_closed_pipe_exits_0_quietly(tmp_path: Path, args: tuple[str, ...]) -> None:
    library = _library(tmp_path)
    env = isolated_env(tmp_path)
    subprocess.run([sys.executable, "-m", "capwatch", "scan", str(library), "--no-caption"], env=env, check=True,
                   capture_output=True, cwd=tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -0`: the reader is gone before the first line
    try:
        proc = subprocess.run([sys.executable, "-m", "capwatch", *args], env=env, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp_path)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, "")


# -- a missing root is reported once --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["emptied", "removed"])
def test_a_missing_root_is_reported_once(run_cli: CliRunner, tmp_path: Path, how: str) -> None:
    library = _library(tmp_path)
    db = tmp_path / "index.db"
    config = tmp_path / "c.toml"
    config.write_text(f'[library]\nroots = ["{library}"]\n')
    assert run_cli("--config", config, "--db", db, "scan", "--no-caption").code == 0
    shutil.rmtree(library)
    if how == "emptied":
        library.mkdir()  # an unmounted mount point
    result = run_cli("--config", config, "--db", db, "scan", "--no-caption")
    assert result.code == 1
    mentions = [line for line in result.err_lines if str(library) in line]
    assert len(mentions) == 1, result.err
    assert "kept" in mentions[0] and ("empty" if how == "emptied" else "missing") in mentions[0]


# -- default roots: the user's pictures folder ----------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.delenv("XDG_PICTURES_DIR", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    return home


def test_default_roots_are_the_pictures_folder_when_it_exists(home: Path) -> None:
    assert Config().library.roots == ()
    (home / "Pictures").mkdir()
    assert Config().library.roots == (RootConfig(home / "Pictures"),)
    # xdg-user-dirs names another folder (a German desktop): that one, when it exists.
    (home / ".config").mkdir()
    (home / ".config" / "user-dirs.dirs").write_text('XDG_PICTURES_DIR="$HOME/Bilder"\n')
    assert Config().library.roots == ()
    (home / "Bilder").mkdir()
    assert Config().library.roots == (RootConfig(home / "Bilder"),)


def test_scan_without_folders_scans_the_pictures_folder(run_cli: CliRunner, tmp_path: Path) -> None:
    line = assert_one_line_error(run_cli("scan", "--no-caption"))
    assert "no folders given" in line
    pictures = _library(tmp_path / "home", "Pictures")
    result = run_cli("scan", "--no-caption")
    assert result.code == 0, result.err
    assert result.out.startswith("1 images: 1 new")
    assert run_cli("search", "beach", "--paths").out == f"{pictures / 'beach.jpg'}\n"


# -- the example config shows the defaults --------------------------------------------------------------------------


def test_example_config_values_are_the_defaults(home: Path) -> None:
    """Every key the example sets has the built-in default's value; keys it leaves out default to None or to the
    value its commented line shows."""
    (home / "Pictures").mkdir()
    loaded = load_config_file(EXAMPLE)
    assert loaded == dataclasses.replace(Config(), source=EXAMPLE)
    raw = tomllib.loads(EXAMPLE.read_text())
    defaults = Config()
    for section, keys in raw.items():
        for key, value in keys.items():
            if key != "roots":
                default = getattr(getattr(defaults, section), key)
                assert list(default) == value if isinstance(default, tuple) else default == value, (section, key)
    # The commented-out lines that stand for computed defaults show those defaults.
    text = EXAMPLE.read_text()
    uncommented = re.sub(r"(?m)^# (roots|path) = ", r"\1 = ", text)
    assert uncommented != text
    path = home / "example.toml"
    path.write_text(uncommented)
    shown = load_config_file(path)
    assert shown.library.roots == defaults.library.roots == (RootConfig(home / "Pictures"),)
    assert shown.index_path() == defaults.index_path() == home / ".local" / "state" / "capwatch" / "index.db"


# -- help ----------------------------------------------------------------------------------------------------------


def test_help_texts_point_at_the_global_options(run_cli: CliRunner) -> None:
    top = run_cli("--help").out
    assert "options above" not in top and "options below" in top
    for command in (("status",), ("search",), ("caption",), ("scan",), ("watch",), ("models", "list"), ("similar",),
                    ("duplicates",)):
        text = run_cli(*command, "--help").out
        assert "--config" in text and "--db" in text and "--model" in text and "-v" in text, command
        assert "capwatch --help" in text, command


# -- declared dependencies ------------------------------------------------------------------------------------------


def test_every_declared_dependency_is_imported_by_capwatch() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower().replace("_", "-") for dep in declared}
    imported: set[str] = set()
    for source in (REPO / "capwatch").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    providers = importlib.metadata.packages_distributions()
    used = {dist.lower().replace("_", "-") for module in imported for dist in providers.get(module, [])}
    assert names - used == set(), "declared in pyproject.toml but imported nowhere in capwatch/"
