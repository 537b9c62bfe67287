"""A FIFO or a device swapped in where a photo was costs one line, never a hang: every reader opens through
capwatch.metadata.safeopen (non-blocking, regular files only).

The commands are driven for real: the swap happens through the documented write hook
($CAPWATCH_HOOK_BEFORE_WRITE runs while the model runs, after the file was stat'ed and read), so `caption`, `scan`
and the daemon meet the FIFO when they open the file again to write. Before the fix each of them blocked for ever
in open(); pytest's timeout turns such a hang into a failure."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import IMAGES, MODELS, rows, start_daemon, stop_daemon, wait_until, write_config

from capwatch.errors import ImageError
from tests.conftest import CliRunner

REPO = Path(__file__).resolve().parent.parent
MODEL = MODELS / "vit-gpt2-tiny-greedy"
ENV = {"PYTHONPATH": str(REPO)}

#: The hook: put a FIFO where the photo is (made beside it, renamed over it: the swap is atomic).
SWAP = """\
import os, sys
path = sys.argv[-1]
if os.path.exists({log!r}):
    sys.exit(0)  # the first photo only
fifo = path + ".fifo-tmp"
os.mkfifo(fifo)
os.replace(fifo, path)
with open({log!r}, "a") as f:
    f.write(path + "\\n")
"""


def swap_hook(tmp_path: Path) -> tuple[dict[str, str], Path]:
    log = tmp_path / "swaps.log"
    script = tmp_path / "swap.py"
    script.write_text(SWAP.format(log=str(log)))
    return {"CAPWATCH_HOOK_BEFORE_WRITE": f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"}, log


def photo(folder: Path, name: str = "photo.jpg") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    shutil.copyfile(IMAGES / "blobs.jpg", target)
    return target


def _fifo_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "FIFO" in line]


@pytest.mark.timeout(120)
def test_caption_of_a_photo_swapped_for_a_fifo_says_one_line_and_finishes(run_cli: CliRunner,
                                                                        tmp_path: Path) -> None:
    target = photo(tmp_path / "photos")
    env, log = swap_hook(tmp_path)
    result = run_cli("--db", tmp_path / "index.db", "--model", MODEL, "caption", target, env={**ENV, **env},
                     timeout=100)
    assert log.read_text().splitlines() == [str(target)]  # the swap happened
    assert result.code == 1, result.err
    assert len(_fifo_lines(result.err)) == 1 and "Traceback" not in result.err, result.err


@pytest.mark.timeout(120)
def test_scan_of_a_photo_swapped_for_a_fifo_says_one_line_and_finishes(run_cli: CliRunner, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    photo(folder)
    photo(folder, "other.jpg")
    env, log = swap_hook(tmp_path)
    result = run_cli("--db", tmp_path / "index.db", "--model", MODEL, "scan", folder, env={**ENV, **env},
                     timeout=100)
    swapped = log.read_text().splitlines()
    assert len(swapped) == 1  # the hook swaps the first file it sees; the other one is captioned
    assert result.code == 1, result.err
    assert len(_fifo_lines(result.err)) == 1 and "Traceback" not in result.err, result.err
    other = next(p for p in folder.iterdir() if str(p) not in swapped)
    assert (rows(tmp_path / "index.db").get(str(other)) or ("",))[0] == "captioned"


@pytest.mark.timeout(120)
def test_the_daemon_meets_a_fifo_swapped_in_with_one_line_and_goes_on(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    db = tmp_path / "index.db"
    config = write_config(tmp_path / "config.toml", db=db, roots=[folder], model_dir=MODEL)
    env, log = swap_hook(tmp_path)
    daemon_log = tmp_path / "daemon.log"
    proc = start_daemon(config, env=env, log=daemon_log)
    try:
        wait_until(lambda: db.exists(), what="the index")
        first = photo(folder, "first.jpg")
        wait_until(lambda: log.exists(), what="the swap")
        wait_until(lambda: _fifo_lines(daemon_log.read_text()), what="the daemon's line about the FIFO")
        # The daemon is not stuck: the next photo is captioned (the hook swaps only the first it sees).
        later = photo(folder, "later.jpg")
        wait_until(lambda: (rows(db).get(str(later)) or ("",))[0] == "captioned", what="the next photo captioned")
    finally:
        code = stop_daemon(proc)
    text = daemon_log.read_text()
    assert code == 0, text
    assert "Traceback" not in text
    assert len(_fifo_lines(text)) == 1, text
    assert log.read_text().splitlines() == [str(first)]


# -- the readers one by one ---------------------------------------------------------------------------------------


def _readers() -> list[tuple[str, Callable[[Path], Any]]]:
    from capwatch.cluster.coordinator import _read_bytes
    from capwatch.metadata import fingerprint_file, read_snapshot
    from capwatch.metadata.identity import identify
    from capwatch.metadata.reader import read_sidecar
    from capwatch.models.preprocess import load_image
    from capwatch.models.rawpreview import extract_preview
    from capwatch.text.reader import load_for_text

    class FakeSnap:  # cluster._read_bytes only needs the snapshot's identity check
        class identity:
            @staticmethod
            def matches_stat(st: os.stat_result) -> bool:
                return True

    class FakeJob:
        def __init__(self, path: Path) -> None:
            self.path = path
            self.snap = FakeSnap()

    return [
        ("load_image", load_image),
        ("load_for_text", lambda p: load_for_text(p, 1_000_000)),
        ("read_snapshot", read_snapshot),
        ("fingerprint_file", fingerprint_file),
        ("identify", identify),
        ("read_sidecar", read_sidecar),
        ("extract_preview", extract_preview),
        ("cluster._read_bytes", lambda p: _read_bytes(FakeJob(p))),  # type: ignore[arg-type]
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_every_reader_refuses_a_fifo_or_device_at_once(tmp_path: Path, kind: str) -> None:
    from capwatch.metadata.safeopen import NotRegularFile

    pytest.importorskip("distributed")
    target = tmp_path / "photo.jpg"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero")  # a character device that never ends, as a photo's name leads to it
    for name, reader in _readers():
        started = time.monotonic()
        try:
            result = reader(target)
        except ImageError as exc:
            assert ("FIFO" if kind == "fifo" else "character device") in str(exc), (name, exc)
            assert len(str(exc).splitlines()) == 1
        except NotRegularFile:
            pass
        except OSError as exc:  # read_snapshot says MetadataError, which is not an OSError; others may be
            raise AssertionError(f"{name}: unexpected {exc!r}") from None
        except Exception as exc:  # MetadataError and friends: one line naming the kind
            assert "not a regular file" in str(exc), (name, exc)
        else:
            assert result is None, (name, result)  # read_sidecar / _read_bytes: "nothing usable"
        assert time.monotonic() - started < 30, name  # generous: a hang is what is being ruled out


# -- below a root, never through a link -----------------------------------------------------------------------


def _methods() -> list[str]:
    from capwatch.metadata.safeopen import openat2_available

    return ["openat2", "walk"] if openat2_available() else ["walk"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["openat2", "walk"])
def test_open_beneath_refuses_a_folder_swapped_for_a_link_out_of_the_root(tmp_path: Path, method: str) -> None:
    from capwatch.metadata.safeopen import NotRegularFile, open_beneath

    if method not in _methods():
        pytest.skip("this kernel has no openat2")
    root = tmp_path / "photos"
    (root / "2024").mkdir(parents=True)
    (root / "2024" / "a.jpg").write_bytes(b"inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.jpg").write_bytes(b"secret")
    fd = open_beneath(root, root / "2024" / "a.jpg", method=method)  # type: ignore[arg-type]
    assert os.read(fd, 10) == b"inside"
    os.close(fd)
    # The folder is swapped for a link out of the root after the path was checked: the open refuses.
    (root / "2024").rename(tmp_path / "moved")
    (root / "2024").symlink_to(outside)
    with pytest.raises(OSError) as refused:
        open_beneath(root, root / "2024" / "a.jpg", method=method)  # type: ignore[arg-type]
    assert not isinstance(refused.value, FileNotFoundError)
    # A link inside the root is not followed either (the path given is already resolved; a link now is a swap).
    (root / "2024").unlink()
    (root / "2024").symlink_to(tmp_path / "moved")
    with pytest.raises(OSError):
        open_beneath(root, root / "2024" / "a.jpg", method=method)  # type: ignore[arg-type]
    (root / "2024").unlink()
    (root / "2024").mkdir()
    (root / "2024" / "a.jpg").symlink_to(outside / "a.jpg")  # the file itself swapped for a link
    with pytest.raises(OSError):
        open_beneath(root, root / "2024" / "a.jpg", method=method)  # type: ignore[arg-type]
    (root / "2024" / "a.jpg").unlink()
    os.mkfifo(root / "2024" / "a.jpg")
    with pytest.raises(NotRegularFile, match="FIFO"):
        open_beneath(root, root / "2024" / "a.jpg", method=method)  # type: ignore[arg-type]
    for bad in (outside / "a.jpg", root / ".." / "outside" / "a.jpg", root):
        with pytest.raises(OSError):
            open_beneath(root, bad, method=method)  # type: ignore[arg-type]
