"""Crashes in the middle of a write, with real processes killed by SIGKILL at moments taken from real file events:
no photo is damaged, nothing is lost, and the next writing command cleans up only what is provably capwatch's."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from crash_helpers import Writer
from daemon_helpers import IMAGES, MODELS, wait_until
from PIL import Image

from capwatch.config import MetadataConfig
from capwatch.metadata import Journal, Provenance, is_temp_file, write_caption
from tests.conftest import CliRunner

MODEL = MODELS / "vit-gpt2-tiny-greedy"
REPO = Path(__file__).resolve().parent.parent
PROV = Provenance("tiny/model", "rev1", "2026-03-01T12:00:00Z")
CAPTION = "a lighthouse on a cliff above a stormy sea"

pytestmark = pytest.mark.slow


def _noise_jpeg(path: Path, size: tuple[int, int] = (2400, 1600)) -> Path:
    """A large JPEG (several MB): an in-place write of it takes long enough for a kill to land inside."""
    rng = random.Random(7)
    Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).save(path, quality=95)
    return path


def _reset(path: Path, content: bytes, mtime_ns: int) -> None:
    # In place, so the hard link stays a hard link.
    with open(path, "r+b") as f:
        f.write(content)
        f.truncate()
    os.utime(path, ns=(mtime_ns, mtime_ns))


def _row(db: Path, path: Path) -> tuple[str, str | None] | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT status, caption FROM images WHERE path = ?", (str(path),)).fetchone()
    return None if row is None else (row[0], row[1])


@pytest.mark.timeout(600)
def test_kill_9_during_the_in_place_write_of_a_hard_linked_photo_never_damages_it(
        tmp_path: Path, run_cli: CliRunner) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    original = _noise_jpeg(tmp_path / "original.jpg").read_bytes()
    # What a completed write gives (a file without hard links takes the rename path; the content is the same).
    reference = tmp_path / "reference.jpg"
    reference.write_bytes(original)
    write_caption(reference, CAPTION, PROV, MetadataConfig(), journal=Journal(tmp_path / "ref-journal"))
    captioned = reference.read_bytes()
    assert captioned != original

    target, link = photos / "photo.jpg", photos / "album-copy.jpg"
    target.write_bytes(original)
    os.link(target, link)
    base_mtime = 1_600_000_000_000_000_000
    state = tmp_path / "state"  # the CLI's write journal is $XDG_STATE_HOME/capwatch/journal
    journal = state / "capwatch" / "journal"
    db = tmp_path / "index.db"
    env = {"XDG_STATE_HOME": str(state)}
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kills = outcomes_new = outcomes_old = restored = 0
    for attempt in range(200):
        if kills >= 30:
            break
        _reset(target, original, base_mtime)
        writer = Writer(target, journal, CAPTION, PROV)
        proc = writer.go()
        killed = False
        while proc.poll() is None:
            if os.stat(target).st_mtime_ns != base_mtime:
                # The in-place overwrite has begun: kill at a random moment within the next few milliseconds.
                deadline = time.perf_counter() + rng.random() * 0.0015
                while time.perf_counter() < deadline:
                    pass
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
        writer.close()
        if not killed or proc.returncode != -signal.SIGKILL:
            continue
        kills += 1
        # Recovery happens at the start of every writing command; a real one runs here.
        result = run_cli("--db", db, "scan", "--no-caption", photos, env=env)
        assert result.code == 0, (result.err, f"seed {seed}, attempt {attempt}")
        restored += "restored from its backup" in result.err
        content = target.read_bytes()
        assert content in (original, captioned), f"damaged photo after kill {kills} (seed {seed})"
        assert os.stat(target).st_ino == os.stat(link).st_ino, "the hard link was split"
        assert sorted(os.listdir(photos)) == ["album-copy.jpg", "photo.jpg"], "a temp file or backup was left"
        assert not any(journal.glob("*.json")), "a journal entry was left"
        row = _row(db, target)
        assert row is not None
        if content == captioned:
            outcomes_new += 1
            assert row == ("captioned", CAPTION), row
        else:
            outcomes_old += 1
            assert row[0] == "pending", f"a restored original recorded as {row} (seed {seed})"
    assert kills >= 30, f"only {kills} kills landed in the write (seed {seed})"
    assert outcomes_new + outcomes_old == kills
    print(f"{kills} kills: {restored} half-written files restored, {outcomes_new} complete, {outcomes_old} original")


@pytest.mark.timeout(300)
def test_kill_9_of_scan_mid_write_leaves_no_temp_file_after_the_next_scan(tmp_path: Path,
                                                                         run_cli: CliRunner) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("blobs.jpg", "gradient.jpg"):
        (photos / name).write_bytes((IMAGES / name).read_bytes())
    originals = {p.name: p.read_bytes() for p in photos.iterdir()}
    ready = tmp_path / "ready"
    hold = tmp_path / "hold.py"
    # Holds the writer right before its final check: the full-size temp file is on disk at that moment.
    hold.write_text(f"import pathlib, time\npathlib.Path({str(ready)!r}).touch()\ntime.sleep(120)\n")
    state = tmp_path / "state"
    env = {**os.environ, "XDG_STATE_HOME": str(state), "CAPWATCH_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "CAPWATCH_HOOK_BEFORE_COMMIT": f"{sys.executable} {hold}"}
    db = tmp_path / "index.db"
    command = [sys.executable, "-m", "capwatch", "--db", str(db), "--model", str(MODEL), "scan", str(photos)]
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, what="the write to reach its hook")
        # Group commit: every file of the batch has its complete temp file before the first one lands.
        temps = [n for n in os.listdir(photos) if is_temp_file(n)]
        assert len(temps) == 2, os.listdir(photos)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert all((photos / temp).exists() for temp in temps)
    assert {p.name: p.read_bytes() for p in photos.iterdir() if not is_temp_file(p.name)} == originals

    result = run_cli("--db", db, "--model", MODEL, "scan", photos, env={"XDG_STATE_HOME": str(state)})
    assert result.code == 0, result.err
    assert sorted(os.listdir(photos)) == ["blobs.jpg", "gradient.jpg"]
    assert not any((state / "capwatch" / "journal").glob("*.json"))
    for name in originals:
        row = _row(db, photos / name)
        assert row is not None and row[0] == "captioned", (name, row)
