"""Daemon ingest benchmark: throughput, event-to-searchable latency, reconcile cost, idle memory.

    python bench/ingest.py [--files 200] [--latency-files 40] [--reconcile-files 100000] [--model DIR]
                           [--precision int8] [--num-beams 1] [--transformers HF_DIR]

With ``--transformers`` (a transformers save of the same model, e.g. bench/_work/vit-gpt2-random-hf made by
bench/caption.py), the same images are also captioned by transformers ``generate()`` one at a time (greedy, or
``--num-beams``) in this run, and the daemon's throughput is printed as a ratio to it.

1. Throughput: N images dropped at once into a watched folder (real ``capwatch watch`` process, fixture model):
   files/s until every one is captioned and searchable.
2. Latency: images copied one at a time (spaced out, so queueing does not dominate); time from the copy's
   close to the file being findable through the index, p50/p99.
3. Reconcile: 100 000 already-indexed, unchanged files; ``capwatch.library.scan.reconcile`` vs
   ``find ROOT -printf '%s %T@\\n'`` over the same tree, warm cache, best of 3 (target: ratio <= 3).
4. Idle RSS of the daemon after the model was unloaded (target <= 120 MB).

Prints one line per figure and a JSON summary at the end. Uses a temporary directory; nothing is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FIXTURE_MODEL = REPO / "tests" / "fixtures" / "models" / "vit-gpt2-tiny-greedy"


def _images(directory: Path, count: int, offset: int = 0) -> list[Path]:
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(offset, offset + count):
        image = Image.new("RGB", (640, 480), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
        image.putpixel((i % 640, (i // 640) % 480), (255, 255, 255))
        path = directory / f"bench{i:06d}.jpg"
        image.save(path, quality=85)
        out.append(path)
    return out


def _config(path: Path, *, db: Path, root: Path, model: Path, idle_unload: float = 300.0, precision: str = "fp32",
            num_beams: int | None = None) -> Path:
    beams = f"num_beams = {num_beams}\n" if num_beams else ""
    path.write_text(
        f'[library]\nroots = ["{root}"]\n[index]\npath = "{db}"\n'
        f'[model]\ndir = "{model}"\nprecision = "{precision}"\nbatch_size = 8\nidle_unload_seconds = {idle_unload}\n'
        f"{beams}[watch]\nsettle_seconds = 2.0\nbatch_wait_ms = 500\n"
    )
    return path


def bench_transformers(hf_dir: Path, model_dir: Path, images: list[Path], num_beams: int) -> dict[str, Any]:
    """transformers generate() one image at a time on ``images`` (the daemon's own preprocessing gives the pixels)."""
    import torch
    from transformers import VisionEncoderDecoderModel

    from capwatch.models.preprocess import Preprocessor, load_image

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = VisionEncoderDecoderModel.from_pretrained(hf_dir).eval()
    prep = Preprocessor.from_config(json.loads((model_dir / "preprocessor_config.json").read_text()))
    pixels = [torch.from_numpy(prep(load_image(p, target_size=prep.output_size))[None]) for p in images]
    with torch.no_grad():
        model.generate(pixels[0], num_beams=num_beams)  # warm-up
        started = time.perf_counter()
        for pv in pixels:
            model.generate(pv, num_beams=num_beams)
        seconds = time.perf_counter() - started
    rate = len(images) / seconds
    print(f"transformers generate(), one at a time, num_beams {num_beams}: {rate:.2f} files/s")
    return {"transformers_files_per_s": round(rate, 2)}


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ}
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen([sys.executable, "-m", "capwatch", "--config", str(config), "watch"],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)


def _live(db: Path) -> dict[str, Any] | None:
    from capwatch.daemon.service import read_live_state

    return read_live_state(db)


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def _captioned(conn: sqlite3.Connection, paths: list[str] | None = None) -> set[str]:
    rows = conn.execute("SELECT path FROM images WHERE status = 'captioned' AND caption IS NOT NULL").fetchall()
    return {r[0] for r in rows}


def _connect(db: Path) -> sqlite3.Connection:
    _wait(db.exists, 60, "index file")
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)


def bench_daemon(work: Path, model: Path, files: int, latency_files: int, precision: str = "fp32",
                 num_beams: int | None = None) -> dict[str, Any]:
    root = work / "photos"
    root.mkdir()
    db = work / "index.db"
    config = _config(work / "config.toml", db=db, root=root, model=model, idle_unload=3.0, precision=precision,
                     num_beams=num_beams)
    staging = work / "staging"
    burst = _images(staging / "burst", files)
    spaced = _images(staging / "spaced", latency_files, offset=files)
    # Rewritten graphs are made (once, cached) at a model's first load: not part of the throughput figure.
    warm = _images(staging / "warm", 1, offset=files + latency_files)
    done = subprocess.run([sys.executable, "-m", "capwatch", "--config", str(config), "caption", "--dry-run",
                           str(warm[0])], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"warm-up caption failed: {done.stderr.strip()}")
    proc = _start(config, work / "daemon.log")
    result: dict[str, Any] = {}
    try:
        _wait(lambda: _live(db), 60, "daemon start")
        conn = _connect(db)
        # -- throughput: everything at once
        t0 = time.monotonic()
        for path in burst:
            shutil.copyfile(path, root / path.name)
        _wait(lambda: len(_captioned(conn)) >= files, 3600, "burst captioned")
        elapsed = time.monotonic() - t0
        result["throughput_files_per_s"] = round(files / elapsed, 2)
        print(f"throughput: {files} files dropped at once -> all searchable in {elapsed:.1f} s "
              f"= {files / elapsed:.2f} files/s")
        # -- latency: one at a time
        latencies = []
        for path in spaced:
            target = root / path.name
            shutil.copyfile(path, target)
            t_event = time.monotonic()
            _wait(lambda target=target: str(target) in _captioned(conn), 600, "latency file captioned")
            latencies.append(time.monotonic() - t_event)
        latencies.sort()
        p50 = statistics.median(latencies)
        p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
        result.update(latency_p50_s=round(p50, 3), latency_p99_s=round(p99, 3), settle_seconds=2.0)
        print(f"event-to-searchable latency over {len(latencies)} files (settle_seconds=2.0, close fast path): "
              f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
        conn.close()
        # -- idle RSS once the model is unloaded
        _wait(lambda: (_live(db) or {}).get("model_loaded") is False, 120, "model unloaded")
        rss = _rss_kb(proc.pid)
        result["idle_rss_mb_model_unloaded"] = round(rss / 1024, 1)
        print(f"daemon RSS idle, model unloaded: {rss / 1024:.1f} MB (target <= 120 MB)")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    return result


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def bench_reconcile(work: Path, count: int) -> dict[str, Any]:
    from capwatch.config import Config, RootConfig
    from capwatch.library.index import ImageRecord, Index
    from capwatch.library.scan import reconcile

    root = work / "tree"
    per_dir = 1000
    t0 = time.monotonic()
    records = []
    for i in range(count):
        directory = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            directory.mkdir(parents=True)
        path = directory / f"IMG_{i:06d}.jpg"
        path.write_bytes(b"\xff\xd8")
        st = path.stat()
        records.append(ImageRecord(path=str(path), size=st.st_size, mtime_ns=st.st_mtime_ns,
                                   fingerprint="0" * 32, caption="a photo", source="model", status="captioned"))
    db = work / "reconcile.db"
    with Index.open(db) as index:
        index.upsert_many(records)
    print(f"reconcile: built {count} indexed files in {time.monotonic() - t0:.1f} s")
    config = Config()
    root_config = RootConfig(root)

    def run_reconcile() -> float:
        with Index.open(db) as index:
            start = time.perf_counter()
            result = reconcile(root_config, config, index)
            took = time.perf_counter() - start
        assert result.unchanged == count and not result.to_caption, result
        return took

    def run_find() -> float:
        start = time.perf_counter()
        subprocess.run(["find", str(root), "-printf", "%s %T@\\n"], stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - start

    run_find()  # warm the dentry/inode cache for both
    ours = min(run_reconcile() for _ in range(3))
    find = min(run_find() for _ in range(3))
    ratio = ours / find
    print(f"reconcile {count} unchanged files: {ours:.2f} s vs find -printf {find:.2f} s -> ratio {ratio:.2f} "
          f"(target <= 3)")
    return {"reconcile_files": count, "reconcile_s": round(ours, 3), "find_s": round(find, 3),
            "reconcile_vs_find_ratio": round(ratio, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200, help="images dropped at once (throughput)")
    parser.add_argument("--latency-files", type=int, default=40, help="images copied one at a time (latency)")
    parser.add_argument("--reconcile-files", type=int, default=100_000)
    parser.add_argument("--model", type=Path, default=FIXTURE_MODEL, help="model directory (default: tiny fixture)")
    parser.add_argument("--precision", default="fp32", help="the daemon's model.precision")
    parser.add_argument("--num-beams", type=int, help="the daemon's model.num_beams (default: the model's own)")
    parser.add_argument("--transformers", type=Path, help="a transformers save of the model: measured alongside")
    parser.add_argument("--skip-daemon", action="store_true")
    parser.add_argument("--skip-reconcile", action="store_true")
    args = parser.parse_args()
    args.model = args.model.resolve()  # the daemon's config file lives elsewhere: relative paths would move
    summary: dict[str, Any] = {"model": str(args.model), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="capwatch-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_daemon:
            daemon_dir = work / "daemon"
            daemon_dir.mkdir()
            summary.update(bench_daemon(daemon_dir, args.model, args.files, args.latency_files, args.precision,
                                        args.num_beams))
            if args.transformers is not None:
                sample = _images(work / "transformers", min(args.files, 16))
                summary.update(bench_transformers(args.transformers, args.model, sample, args.num_beams or 1))
                ratio = summary["throughput_files_per_s"] / summary["transformers_files_per_s"]
                summary["throughput_vs_transformers"] = round(ratio, 2)
                print(f"daemon throughput vs transformers one at a time: {ratio:.2f}x")
        if not args.skip_reconcile:
            reconcile_dir = work / "reconcile"
            reconcile_dir.mkdir()
            summary.update(bench_reconcile(reconcile_dir, args.reconcile_files))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
