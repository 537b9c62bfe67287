"""Fault tests with real daemon processes: kill -9 at random points, floods of files, roots that vanish."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import IMAGES, MODELS, rows, start_daemon, stop_daemon, wait_until, write_config
from PIL import Image

from capwatch.daemon.service import read_live_state
from capwatch.metadata import is_temp_file, read_metadata

MODEL = MODELS / "vit-gpt2-tiny-greedy"

pytestmark = pytest.mark.slow


def _make_library(root: Path, count: int) -> dict[str, bytes]:
    """``count`` distinct small JPEGs; returns path -> decoded pixels."""
    root.mkdir(parents=True)
    pixels = {}
    for i in range(count):
        image = Image.new("RGB", (48, 32), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
        image.putpixel((i % 48, (i // 48) % 32), (255, 255, 255))
        path = root / (f"sub{i % 3}" if i % 2 else "") / f"p{i:03d}.jpg"
        path.parent.mkdir(exist_ok=True)
        image.save(path, quality=90)
        with Image.open(path) as decoded:
            pixels[str(path)] = decoded.tobytes()
    return pixels


def _captioned(db: Path) -> int:
    return sum(1 for r in rows(db).values() if r[0] == "captioned")


def _idle(db: Path) -> bool:
    state = read_live_state(db)
    return bool(state) and state["queue"] == 0 and state["in_flight"] == 0 and state["settling"] == 0 \
        and state["backfill_done"] == state["backfill_total"]


def _exiftool_descriptions(root: Path) -> dict[str, list[tuple[str, str]]]:
    """path -> every (tag, value) of XMP dc:description and EXIF ImageDescription, duplicates included."""
    out = subprocess.run(
        ["exiftool", "-j", "-a", "-G1", "-r", "-charset", "UTF8", "-XMP-dc:Description", "-EXIF:ImageDescription",
         str(root)],
        capture_output=True, check=True,
    ).stdout
    result: dict[str, list[tuple[str, str]]] = {}

    def collect(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        entry = dict(pairs)
        if "SourceFile" in entry:
            result[entry["SourceFile"]] = [(k, str(v)) for k, v in pairs if k != "SourceFile"]
        return entry

    json.loads(out, object_pairs_hook=collect)
    return result


@pytest.mark.timeout(600)
def test_kill_9_during_backfill_then_restart_captions_every_image_exactly_once(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    db = tmp_path / "state" / "index.db"
    originals = _make_library(root, 300)
    config = write_config(tmp_path / "config.toml", db=db, roots=[root], model_dir=MODEL, batch_size=8,
                          settle=0.2, queue_size=64)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    log = tmp_path / "daemon.log"
    kills = 0
    for _ in range(8):
        proc = start_daemon(config, log=log)
        try:
            wait_until(lambda: read_live_state(db), what=f"daemon start (seed {seed})")
            done = _captioned(db)
            if done >= 300:
                break
            # A random point: right after start-up (reconcile), or after a random number of further files.
            target = done + rng.choice([0, rng.randint(1, 8), rng.randint(1, 45)])
            wait_until(lambda target=target, proc=proc: _captioned(db) >= target or proc.poll() is not None,
                       what=f"{target} captioned (seed {seed})")
            assert proc.poll() is None, log.read_text()[-3000:]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(60)
        kills += 1
    assert kills >= 4, f"too few kills before the backfill finished (seed {seed})"

    proc = start_daemon(config, log=log)
    try:
        wait_until(lambda: _captioned(db) == 300 and _idle(db), timeout=300, what=f"backfill to finish (seed {seed})")
        assert stop_daemon(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    index_rows = rows(db)
    assert sorted(index_rows) == sorted(originals), f"seed {seed}"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 300
        captioned_at = dict(conn.execute("SELECT path, captioned_at FROM images").fetchall())
        # The FTS index matches its content table exactly (no entries left by interrupted transactions):
        # FTS5's integrity-check raises when the inverted index and the rows disagree.
        conn.execute("INSERT INTO images_fts(images_fts, rank) VALUES ('integrity-check', 1)")
    leftovers = [p for p in root.rglob("*") if p.is_file() and str(p) not in originals]
    assert leftovers == [], f"temp or stray files left behind (seed {seed})"
    assert not any(is_temp_file(p.name) for p in root.rglob("*"))
    described = _exiftool_descriptions(root)
    for path, pixels in originals.items():
        status, caption, source, _ = index_rows[path]
        assert (status, source) == ("captioned", "model"), path
        fields = described[path]
        # One caption, the same in every field and in the index: never two, never a stale one.
        assert [k for k, _ in fields].count("XMP-dc:Description") == 1, fields
        assert {v for _, v in fields} == {caption}, (path, fields, caption)
        # Captioned once: the index records the same caption run as the provenance inside the file.
        meta = read_metadata(Path(path))
        assert meta.description is not None and meta.description.provenance is not None
        assert meta.description.provenance.created_at == captioned_at[path], path
        with Image.open(path) as image:
            assert image.tobytes() == pixels, f"pixels changed in {path}"


@pytest.mark.timeout(600)
def test_ten_thousand_files_dropped_at_once_are_all_processed_in_bounded_memory(tmp_path: Path) -> None:
    # Index-only mode (no model): this is about the watcher, settler, queue and index under a flood; the
    # captioning path is covered by the kill -9 test above.
    root = tmp_path / "photos"
    root.mkdir()
    db = tmp_path / "index.db"
    config = write_config(tmp_path / "config.toml", db=db, roots=[root], batch_size=64, queue_size=256,
                          settle=0.5)
    proc = start_daemon(config, caption=False, log=tmp_path / "daemon.log")
    try:
        wait_until(lambda: read_live_state(db), what="daemon start")
        before = _memory_kb(proc.pid)["VmRSS"]
        staging = tmp_path / "staging"
        staging.mkdir()
        data = (IMAGES / "red.png").read_bytes()
        for i in range(10_000):
            (staging / f"f{i:05d}.png").write_bytes(data)
        os.rename(staging, root / "dropped")
        wait_until(lambda: len(rows(db)) == 10_000, timeout=400, what="10 000 rows")
        wait_until(lambda: _idle(db), what="queue drained")
        peak = _memory_kb(proc.pid)["VmHWM"]
        assert stop_daemon(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Queue, settler and event backlog are bounded: 10 000 pending files cost a few MB, not one buffer each.
    assert peak - before < 80 * 1024, f"RSS grew from {before} kB to a peak of {peak} kB"
    assert all(r[0] in ("pending", "described", "captioned") for r in rows(db).values())


def _memory_kb(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


@pytest.mark.timeout(300)
def test_root_removed_while_captioning_keeps_the_index(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    db = tmp_path / "state" / "index.db"
    _make_library(root, 60)
    config = write_config(tmp_path / "config.toml", db=db, roots=[root], model_dir=MODEL, batch_size=4)
    proc = start_daemon(config, log=tmp_path / "daemon.log")
    try:
        wait_until(lambda: _captioned(db) >= 10, what="some captions")
        # The disk disappears in the middle of the backfill. The daemon may be creating and removing a temp file
        # in there at this very moment: an entry that vanishes under rmtree is simply already gone.
        while root.exists():
            shutil.rmtree(root, onerror=lambda func, path, info: None)
        wait_until(lambda: (read_live_state(db) or {}).get("missing_roots") == [str(root)], what="root missing")
        assert len(rows(db)) == 60
        assert proc.poll() is None
        assert stop_daemon(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(rows(db)) == 60
