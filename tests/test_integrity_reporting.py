"""What the CLI reports about files it could not handle: every failed file is ONE line on stderr (no file twice, no
traceback), counted as failed in the summary and the exit code (1), and the index holds no error row that is
stale or that `capwatch status` could never show.

(Unrepresentable --since/--until dates, 3000y, 9999999d, 20-digit day counts, are covered in test_search_dates.py.)
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, CliResult, CliRunner, assert_one_line_error

REPO = Path(__file__).resolve().parent.parent
MODEL = (FIXTURES / "models" / "vit-gpt2-tiny-greedy").resolve()
GOOD = FIXTURES / "images" / "blobs.jpg"
#: The CLI child imports the tree under test (this file's checkout), not whatever capwatch is installed.
CHILD_ENV = {"PYTHONPATH": str(REPO)}
PATH_MAX = 4096


def cli(run_cli: CliRunner, db: Path, *args: str | Path, env: dict[str, str] | None = None) -> CliResult:
    return run_cli("--db", db, "--model", MODEL, *args, env={**CHILD_ENV, **(env or {})}, timeout=120)


def status(run_cli: CliRunner, db: Path) -> dict[str, object]:
    result = run_cli("--db", db, "status", "--json", env=CHILD_ENV, timeout=60)
    assert result.code == 0, result.err
    payload: dict[str, object] = json.loads(result.out)
    return payload


def summary_line(result: CliResult) -> str:
    lines = [line for line in result.out.splitlines() if line.strip()]
    assert lines, (result.out, result.err)
    return lines[-1]


def copy_good(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(GOOD, path)
    return path


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in the middle of its scan data (a copy that stopped half way): headers fine, pixels not."""
    data = GOOD.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def header_damaged_jpeg(path: Path) -> Path:
    """A JPEG whose first segment runs past the end of the file: the reader itself fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00garbage")
    return path


# -- 1. a file name that is not UTF-8 -------------------------------------------------------------------------------


def test_non_utf8_name_is_one_line_one_failure_and_no_status_error(run_cli: CliRunner, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    good = copy_good(lib / "good.jpg")
    bad = os.fsencode(lib) + b"/caf\xe9.jpg"
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, GOOD.read_bytes())
    finally:
        os.close(fd)
    db = tmp_path / "index.db"

    result = cli(run_cli, db, "scan", "--no-caption", lib)
    line = assert_one_line_error(result, code=1)
    assert "caf\\xe9.jpg" in line, line
    assert line.count("caf\\xe9.jpg") == 1, line
    assert "good.jpg" not in result.err
    summary = summary_line(result)
    assert "1 failed" in summary, summary
    # `status` cannot list a file that cannot be indexed: the summary must not send the user there for it.
    assert "capwatch status" not in result.out + result.err, summary
    state = status(run_cli, db)
    assert state["errors"] == 0 and state["last_errors"] == [], state
    assert state["images"] == 1 and state["pending"] == 1, state  # the good image is indexed

    # Captioning it by name says the same, once.
    result = cli(run_cli, db, "caption", os.fsdecode(bad))
    line = assert_one_line_error(result, code=1)
    assert "caf\\xe9.jpg" in line and line.count("caf\\xe9.jpg") == 1, line
    assert status(run_cli, db)["errors"] == 0
    assert good.read_bytes() == GOOD.read_bytes()


# -- 2. a path beyond the OS limit ----------------------------------------------------------------------------------


def _deep_tree(root: Path, dir_path_bytes: int) -> tuple[int, list[str]]:
    """Nest folders below ``root`` (through directory fds, as no path could reach them) until the deepest folder's
    absolute path is exactly ``dir_path_bytes`` long, whatever the length of ``root`` (pytest's temp folder is
    longer in a worker process): the first folder's name takes up the slack, every later one has 200 characters,
    so the deepest folder's parent is 201 bytes shorter. Returns (fd of the deepest folder, the folder names)."""
    names: list[str] = []
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    length = len(os.fsencode(root))
    step = 1 + 200  # a slash and a full-size name
    count = max(1, -(-(dir_path_bytes - length) // step))
    first = dir_path_bytes - length - (count - 1) * step - 1
    if first < 5:  # too short for its "NNN-" prefix: one folder fewer, the first one longer (at most 205 bytes)
        count, first = count - 1, first + step
    widths = [first] + [200] * (count - 1)
    while length < dir_path_bytes:
        name = f"{len(names):03d}-" + "d" * (widths[len(names)] - 4)
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
        names.append(name)
        length += 1 + len(name)
    assert length == dir_path_bytes, (length, dir_path_bytes)
    return fd, names


def _remove_tree(root: Path) -> None:
    """Remove ``root`` and everything below it through directory fds (paths past PATH_MAX cannot be unlinked by
    name)."""
    if not root.exists():
        return
    for _dirpath, dirnames, filenames, dirfd in os.fwalk(root, topdown=False):
        for name in filenames:
            os.unlink(name, dir_fd=dirfd)
        for name in dirnames:
            os.rmdir(name, dir_fd=dirfd)
    os.rmdir(root)


@pytest.fixture
def deep_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "deep"
    root.mkdir()
    try:
        yield root
    finally:
        _remove_tree(root)


@pytest.mark.parametrize("what", ["file", "folder"])
def test_path_beyond_path_max_counts_as_failed(run_cli: CliRunner, tmp_path: Path, deep_root: Path,
                                               what: str) -> None:
    # "file": the folder can be listed but the file's absolute path is longer than PATH_MAX; "folder": the folder
    # holding the file cannot even be listed by path. Old behaviour: a warning at most, and exit 0.
    copy_good(deep_root / "good.jpg")
    fd, names = _deep_tree(deep_root, PATH_MAX - 150 if what == "file" else PATH_MAX + 10)
    leaf = "p" * 200 + ".jpg"
    try:
        out = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        try:
            os.write(out, GOOD.read_bytes())
        finally:
            os.close(out)
    finally:
        os.close(fd)
    full = len(os.fsencode(deep_root)) + sum(1 + len(n) for n in names) + 1 + len(leaf)
    assert full > PATH_MAX

    db = tmp_path / "index.db"
    result = cli(run_cli, db, "scan", "--no-caption", deep_root)
    line = assert_one_line_error(result, code=1)
    assert (leaf if what == "file" else names[-1]) in line, line[-300:]
    summary = summary_line(result)
    assert "1 failed" in summary, summary
    state = status(run_cli, db)
    assert state["images"] == 1, state  # the good image is indexed


# -- 3. one line per failed file --------------------------------------------------------------------------------------


def test_caption_prints_one_line_for_a_truncated_jpeg(run_cli: CliRunner, tmp_path: Path) -> None:
    bad = truncated_jpeg(tmp_path / "lib" / "bad.jpg")
    good = copy_good(tmp_path / "lib" / "good.jpg")
    result = cli(run_cli, tmp_path / "index.db", "caption", bad, good)
    line = assert_one_line_error(result, code=1)
    assert "bad.jpg" in line and result.err.count("bad.jpg") == 1, result.err
    assert "good.jpg" not in result.err
    assert "good.jpg" in result.out and "written" in result.out, result.out
    assert "bad.jpg" not in result.out, result.out


@pytest.mark.parametrize("damage", ["truncated-scan", "header"])
def test_scan_prints_one_line_for_a_damaged_file(run_cli: CliRunner, tmp_path: Path, damage: str) -> None:
    # "header" fails while reading (reconcile), "truncated-scan" while decoding pixels (captioning): each path
    # reports the file once, never both.
    lib = tmp_path / "lib"
    copy_good(lib / "good.jpg")
    (truncated_jpeg if damage == "truncated-scan" else header_damaged_jpeg)(lib / "bad.jpg")
    db = tmp_path / "index.db"
    result = cli(run_cli, db, "scan", lib)
    line = assert_one_line_error(result, code=1)
    assert "bad.jpg" in line and result.err.count("bad.jpg") == 1, result.err
    summary = summary_line(result)
    assert "1 captioned" in summary and "1 failed" in summary, summary
    state = status(run_cli, db)
    assert state["errors"] == 1 and state["captioned"] == 1, state
    # A second scan has nothing new to say about the file: it is not reported (or counted) again.
    again = cli(run_cli, db, "scan", lib)
    assert "Traceback" not in again.err
    assert again.err.count("bad.jpg") <= 1, again.err


# -- 4. no stale error row --------------------------------------------------------------------------------------------


def _hook(tmp_path: Path, times: int | None) -> dict[str, str]:
    """CAPWATCH_HOOK_BEFORE_WRITE: replace the file by a copy of itself (same pixels and metadata; new inode and
    times: another program re-saved it), ``times`` times in all (None: every time)."""
    script = tmp_path / "resave.py"
    script.write_text(
        "import os, shutil, sys\n"
        "from pathlib import Path\n"
        "count_file, limit, path = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])\n"
        "done = int(count_file.read_text()) if count_file.exists() else 0\n"
        "count_file.write_text(str(done + 1))\n"
        "if limit < 0 or done < limit:\n"
        "    tmp = path.with_name(path.name + '.resave-tmp')\n"
        "    shutil.copyfile(path, tmp)\n"
        "    os.replace(tmp, path)\n"
    )
    count = tmp_path / "hook-count"
    command = " ".join(shlex.quote(str(a)) for a in (sys.executable, script, count, -1 if times is None else times))
    return {"CAPWATCH_HOOK_BEFORE_WRITE": command}


def _hook_runs(tmp_path: Path) -> int:
    count = tmp_path / "hook-count"
    return int(count.read_text()) if count.exists() else 0


@pytest.mark.parametrize("command", ["caption", "scan"])
def test_a_file_changed_once_during_captioning_leaves_no_error_row(run_cli: CliRunner, tmp_path: Path,
                                                                   command: str) -> None:
    photo = copy_good(tmp_path / "lib" / "photo.jpg")
    db = tmp_path / "index.db"
    target = photo if command == "caption" else photo.parent
    result = cli(run_cli, db, command, target, env=_hook(tmp_path, 1))
    assert result.code == 0, (result.out, result.err)
    assert "Traceback" not in result.err and result.err_lines == [], result.err
    assert _hook_runs(tmp_path) >= 2, "the hook did not run: the test tests nothing"
    state = status(run_cli, db)
    assert state["errors"] == 0 and state["last_errors"] == [], state
    assert state["captioned"] == 1 and state["images"] == 1, state


def test_a_file_that_keeps_changing_is_one_line_and_no_error_row(run_cli: CliRunner, tmp_path: Path) -> None:
    # Documented: one that keeps changing ends as an error outcome, nothing written, nothing recorded (the next
    # run takes it).
    photo = copy_good(tmp_path / "lib" / "photo.jpg")
    db = tmp_path / "index.db"
    result = cli(run_cli, db, "caption", photo, env=_hook(tmp_path, None))
    line = assert_one_line_error(result, code=1)
    assert "photo.jpg" in line and line.count("photo.jpg") == 1, line
    assert photo.read_bytes() == GOOD.read_bytes()
    state = status(run_cli, db)
    assert state["errors"] == 0 and state["captioned"] == 0, state


def test_an_error_row_is_cleared_once_the_file_is_captioned(run_cli: CliRunner, tmp_path: Path) -> None:
    photo = truncated_jpeg(tmp_path / "lib" / "photo.jpg")
    db = tmp_path / "index.db"
    assert_one_line_error(cli(run_cli, db, "caption", photo), code=1)
    assert status(run_cli, db)["errors"] == 1
    shutil.copyfile(GOOD, photo)  # the full copy arrives
    result = cli(run_cli, db, "caption", photo)
    assert result.code == 0 and result.err_lines == [], result.err
    state = status(run_cli, db)
    assert state["errors"] == 0 and state["last_errors"] == [], state
    assert state["captioned"] == 1 and state["images"] == 1, state
