"""`scan --cluster` against a local `scan` on this box: the same images, the same cores, the same model.

    python bench/cluster.py [--images 200] [--workers 2] [--model DIR] [--precision int8]

Anchor: `capwatch scan DIR` on this machine with ``threads = WORKERS`` (all the cores the cluster gets). Then the
same images (a fresh copy, a fresh index) through `capwatch scan DIR --cluster ADDR` with a
``distributed.LocalCluster`` of WORKERS processes of one thread each on 127.0.0.1, started before the clock runs
(a standing cluster). Both runs load the model inside the timed run (the workers through the plugin); graph rewrites
are made once by a warm-up scan first, so neither pays for them.

Prints the cluster run's overhead against the anchor (target <= 10 % at equal cores), each worker's own rate
(images per second of its working time), and the coordinator's ceiling: the rate at which this machine alone reads,
sends-ready (snapshot + bytes) and writes results (file + index) through the same code path with the captions
given, i.e. images/s = min(coordinator ceiling, sum of worker rates) for N workers.

The default model is the tiny test fixture (overhead at its worst: almost no work per image). For real figures use
a full-size model, e.g. ``--model bench/_work/vit-gpt2-random`` made by bench/caption.py.

    python bench/cluster.py --ocr [--images 60] [--size 2000x1500] [--anchor-tree /work/main]

With ``--ocr`` (issue 24): photo-like images with a line of text, ``[ocr] engine = "rapidocr"``; a local scan and a
cluster scan with OCR on and off, each with the coordinator's own CPU time (user + system of the `capwatch scan`
process, from wait4) per image. ``--anchor-tree`` runs the cluster scan with OCR once more with the coordinator from
another checkout (e.g. main, where the coordinator read the text itself), against the same workers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE_MODEL = REPO / "tests" / "fixtures" / "models" / "vit-gpt2-tiny-greedy"


def _images(directory: Path, count: int) -> None:
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (640, 480), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
        image.putpixel((i % 640, (i // 640) % 480), (255, 255, 255))
        image.save(directory / f"bench{i:05d}.jpg", quality=85)


def _text_images(directory: Path, count: int, size: tuple[int, int]) -> None:
    """Photo-like images (gradient + noise) with a line of text each, for the OCR figures."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 200 + 30, y / height * 200 + 30, (x + y) / (width + height) * 200], axis=-1)
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", max(24, height // 12))
    for i in range(count):
        pixels = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        draw.rectangle((width // 10, height // 10, width * 9 // 10, height // 10 + height // 6), fill=(250, 245, 230))
        draw.text((width // 10 + 20, height // 10 + 10), f"SHOP {i:04d} OPEN", fill=(20, 20, 20), font=font)
        image.save(directory / f"text{i:05d}.jpg", quality=88)


def _scan(env: dict[str, str], config: Path, db: Path, root: Path, *extra: str) -> tuple[float, str]:
    elapsed, _, stderr = _scan_cpu(env, config, db, root, *extra)
    return elapsed, stderr


def _scan_cpu(env: dict[str, str], config: Path, db: Path, root: Path, *extra: str) -> tuple[float, float, str]:
    """Run `capwatch scan`: (wall seconds, the scan process's own CPU seconds, its stderr)."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "capwatch", "--config", str(config), "--db", str(db),
                                 "scan", str(root), *extra], env=env, stdout=subprocess.DEVNULL, stderr=err,
                                # `python -m` puts the working folder first on sys.path: the tree to run
                                cwd=env.get("PYTHONPATH", str(REPO)))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.monotonic() - started
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    if proc.returncode not in (0,):
        sys.exit(f"scan failed ({proc.returncode}): {stderr.strip()}")
    return elapsed, usage.ru_utime + usage.ru_stime, stderr


def bench_ocr(args: argparse.Namespace, work: Path, env: dict[str, str]) -> None:
    """Local and cluster scans with OCR on and off: wall time, images/s, the coordinator's CPU per image."""
    from distributed import LocalCluster

    size = tuple(int(v) for v in args.size.split("x"))
    configs = {}
    for ocr in ("off", "rapidocr"):
        configs[ocr] = work / f"config-{ocr}.toml"
        configs[ocr].write_text(f'[model]\ndir = "{args.model.resolve()}"\nprecision = "{args.precision}"\n'
                                f"threads = {args.workers}\nbatch_size = 8\n\n[cluster]\nbatches_per_worker = 2\n\n"
                                f'[ocr]\nengine = "{ocr}"\n')
    _text_images(work / "warm", 1, size)  # type: ignore[arg-type]
    _scan(env, configs["rapidocr"], work / "warm.db", work / "warm")
    runs: list[tuple[str, float, float]] = []

    def run(label: str, ocr: str, *extra: str, run_env: dict[str, str] = env) -> None:
        root = work / label.replace(" ", "-")
        _text_images(root, args.images, size)  # type: ignore[arg-type]
        wall, cpu, _ = _scan_cpu(run_env, configs[ocr], work / f"{label.replace(' ', '-')}.db", root, *extra)
        runs.append((label, wall, cpu))
        print(f"  {label:34s} {wall:6.1f} s = {args.images / wall:5.2f} img/s; coordinator CPU {cpu:6.1f} s = "
              f"{1000 * cpu / args.images:7.1f} ms/image   (load {os.getloadavg()[0]:.2f})", flush=True)

    print(f"{args.images} images of {args.size} with text, model {args.model.name}, {args.workers} workers x 1 "
          f"thread on 127.0.0.1 (the same {os.cpu_count()} cores as the local scan)")
    run("local OCR off", "off")
    run("local OCR on", "rapidocr")
    os.environ.update(env)
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        address = cluster.scheduler_address
        run("cluster OCR off", "off", "--cluster", address)
        run("cluster OCR on", "rapidocr", "--cluster", address)
        if args.anchor_tree is not None:
            run("cluster OCR on, anchor coordinator", "rapidocr", "--cluster", address,
                run_env={**env, "PYTHONPATH": str(args.anchor_tree.resolve())})
    walls = {label: wall for label, wall, _ in runs}
    print(f"cluster OCR on / local OCR on: {walls['local OCR on'] / walls['cluster OCR on']:.2f}x the local "
          "scan's images/s")


def _coordinator_ceiling(work: Path, model: Path, precision: str, count: int, env: dict[str, str]) -> float:
    """Images/s this machine prepares (snapshot + bytes) and writes (file + index) with the captions given."""
    os.environ.update(env)
    from capwatch.cluster.coordinator import _read_bytes
    from capwatch.config import Config, ModelConfig
    from capwatch.library.index import Index
    from capwatch.library.process import Processor
    from capwatch.metadata import Journal
    from capwatch.models.captioner import open_captioner

    root = work / "ceiling"
    _images(root, count)
    config = Config(model=ModelConfig(dir=model, precision=precision))  # type: ignore[arg-type]
    captioner = open_captioner(model, config.model)  # identity only: nothing is loaded
    index = Index.open(work / "ceiling.db")
    processor = Processor(config, index, captioner, journal=Journal.default())
    paths = sorted(root.glob("*.jpg"))
    started = time.monotonic()
    size = config.model.batch_size
    for start in range(0, len(paths), size):
        _, jobs = processor.prepare(paths[start:start + size])
        sent = [(position, job) for position, job in jobs if _read_bytes(job) is not None]
        processor.complete(sent, [f"a photo numbered {position}" for position, _ in sent])
    elapsed = time.monotonic() - started
    index.close()
    return len(paths) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", type=Path, default=FIXTURE_MODEL)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--ocr", action="store_true", help="only the OCR figures (issue 24)")
    parser.add_argument("--size", default="2000x1500", help="image size for --ocr, WIDTHxHEIGHT")
    parser.add_argument("--anchor-tree", type=Path, default=None,
                        help="with --ocr: also run the coordinator from this checkout (e.g. /work/main)")
    args = parser.parse_args()
    from distributed import LocalCluster

    work = Path(tempfile.mkdtemp(prefix="capwatch-bench-cluster-"))
    try:
        env = {**os.environ, "HOME": str(work / "home"), "XDG_STATE_HOME": str(work / "state"),
               "XDG_CONFIG_HOME": str(work / "config"), "CAPWATCH_CACHE_DIR": str(work / "cache"),
               "CAPWATCH_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        if args.ocr:
            bench_ocr(args, work, env)
            return
        config = work / "config.toml"
        config.write_text(f'[model]\ndir = "{args.model.resolve()}"\nprecision = "{args.precision}"\n'
                          f"threads = {args.workers}\nbatch_size = 8\n\n[cluster]\nbatches_per_worker = 2\n")
        _images(work / "warm", 1)
        _images(work / "local", args.images)
        _images(work / "remote", args.images)
        _scan(env, config, work / "warm.db", work / "warm")  # graph rewrites made and cached once
        local, _ = _scan(env, config, work / "local.db", work / "local")
        print(f"local scan      : {args.images} images in {local:6.1f} s = {args.images / local:6.2f} img/s "
              f"(threads = {args.workers}; anchor)")
        os.environ.update(env)
        sys.path.insert(0, str(REPO))
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster:
            remote, log = _scan(env, config, work / "remote.db", work / "remote", "--cluster",
                                cluster.scheduler_address)
        print(f"cluster scan    : {args.images} images in {remote:6.1f} s = {args.images / remote:6.2f} img/s "
              f"({args.workers} workers x 1 thread) -> {remote / local:.2f}x the local scan "
              f"(overhead {100 * (remote / local - 1):+.0f} %, target <= +10 %)")
        rates = [(m[1], int(m[2]), float(m[4])) for m in
                 re.finditer(r"worker (\S+): (\d+) images in ([\d.]+) s of work \(([\d.]+) img/s\)", log)]
        for address, images, rate in rates:
            print(f"  worker {address}: {images} images, {rate:.2f} img/s of its working time")
        ceiling = _coordinator_ceiling(work, args.model.resolve(), args.precision, args.images, env)
        total = sum(rate for _, _, rate in rates)
        print(f"coordinator     : {ceiling:6.1f} img/s read + write ceiling (snapshot, bytes, file + index)")
        print(f"predicted       : min({ceiling:.1f}, sum of worker rates {total:.2f}) = {min(ceiling, total):.2f} "
              "img/s")
        print(json.dumps({"images": args.images, "workers": args.workers, "model": str(args.model),
                          "local_s": round(local, 2), "cluster_s": round(remote, 2),
                          "ratio": round(remote / local, 3), "worker_rates": [r for _, _, r in rates],
                          "coordinator_ceiling": round(ceiling, 1)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
