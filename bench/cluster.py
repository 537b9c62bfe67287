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

    python bench/cluster.py --ocr [--images 60] [--videos 4] [--size 2000x1500] [--anchor-tree CHECKOUT]

With ``--ocr`` (issue 24): photo-like images with a line of text (and ``--videos`` H.264 videos of three such
signs, 1.5 s each, 1280x720), ``[ocr] engine = "rapidocr"``; a local scan and a cluster scan with OCR on and off,
each with the coordinator's own CPU time (user + system of the `capwatch scan` process, from wait4) per file. The
cluster is `dask scheduler` + WORKERS `dask worker --preload capwatch.cluster` processes of one thread on 127.0.0.1,
all of them running the tree under test. ``--anchor-tree`` runs the cluster scan with OCR once more with
coordinator AND workers from another checkout (e.g. the version before, where the coordinator read a video's text
itself), on a cluster of its own.
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
from collections.abc import Iterator
from contextlib import contextmanager
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


def _text_images(directory: Path, count: int, size: tuple[int, int], first: int = 0) -> None:
    """Photo-like images (gradient + noise) with a line of text each (numbered from ``first``), for the OCR
    figures."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 200 + 30, y / height * 200 + 30, (x + y) / (width + height) * 200], axis=-1)
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", max(24, height // 12))
    for i in range(first, first + count):
        pixels = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        draw.rectangle((width // 10, height // 10, width * 9 // 10, height // 10 + height // 6), fill=(250, 245, 230))
        draw.text((width // 10 + 20, height // 10 + 10), f"SHOP {i:04d} OPEN", fill=(20, 20, 20), font=font)
        image.save(directory / f"text{i:05d}.jpg", quality=88)


def _text_videos(directory: Path, count: int, work: Path) -> None:
    """``count`` H.264 videos (1280x720, 24 fps) of three photo-like signs (as :func:`_text_images` makes them),
    1.5 s each: their chosen frames hold different text."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        frames = work / f"scenes-{i}"
        _text_images(frames, 3, (1280, 720), first=1000 + 3 * i)
        cmd = ["ffmpeg", "-v", "error", "-y"]
        for scene in sorted(frames.glob("*.jpg")):
            cmd += ["-loop", "1", "-framerate", "24", "-t", "1.5", "-i", str(scene)]
        cmd += ["-filter_complex", "[0][1][2]concat=n=3:v=1", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "12",
                str(directory / f"signs{i:03d}.mp4")]
        subprocess.run(cmd, check=True, timeout=300)


@contextmanager
def _dask_cluster(tree: Path, workers: int, work: Path, env: dict[str, str]) -> Iterator[str]:
    """A `dask scheduler` and ``workers`` one-thread `dask worker --preload capwatch.cluster` processes on
    127.0.0.1, importing capwatch from ``tree``; yields the scheduler's address."""
    run_env = {**env, "PYTHONPATH": str(tree)}
    scheduler_file = work / f"scheduler-{tree.name}-{time.monotonic_ns()}.json"
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(scheduler_file)], env=run_env, cwd=tree,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                address = str(json.loads(scheduler_file.read_text())["address"])
                break
            except (OSError, ValueError, KeyError):
                if time.monotonic() > deadline:
                    sys.exit("dask scheduler did not start")
                time.sleep(0.05)
        procs += [subprocess.Popen([sys.executable, "-m", "dask", "worker", address, "--nthreads", "1",
                                    "--no-dashboard", "--preload", "capwatch.cluster"], env=run_env, cwd=tree,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(workers)]
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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
    """Local and cluster scans with OCR on and off: wall time, files/s, the coordinator's CPU per file."""
    size = tuple(int(v) for v in args.size.split("x"))
    configs = {}
    for ocr in ("off", "rapidocr"):
        configs[ocr] = work / f"config-{ocr}.toml"
        configs[ocr].write_text(f'[model]\ndir = "{args.model.resolve()}"\nprecision = "{args.precision}"\n'
                                f"threads = {args.workers}\nbatch_size = 8\n\n[cluster]\nbatches_per_worker = 2\n"
                                f'worker_wait_seconds = 120\n\n[ocr]\nengine = "{ocr}"\n')
    _text_images(work / "warm", 1, size)  # type: ignore[arg-type]
    _scan(env, configs["rapidocr"], work / "warm.db", work / "warm")
    videos = work / "videos"
    _text_videos(videos, args.videos, work)
    files = args.images + args.videos
    runs: list[tuple[str, float, float]] = []

    def run(label: str, ocr: str, *extra: str, run_env: dict[str, str] = env) -> None:
        root = work / label.replace(" ", "-").replace(",", "")
        _text_images(root, args.images, size)  # type: ignore[arg-type]
        for video in sorted(videos.glob("*.mp4")):
            shutil.copy(video, root / video.name)
        wall, cpu, _ = _scan_cpu(run_env, configs[ocr], work / f"{root.name}.db", root, *extra)
        runs.append((label, wall, cpu))
        print(f"  {label:34s} {wall:6.1f} s = {files / wall:5.2f} files/s; coordinator CPU {cpu:6.1f} s = "
              f"{1000 * cpu / files:7.1f} ms/file   (load {os.getloadavg()[0]:.2f})", flush=True)

    print(f"{args.images} images of {args.size} with text and {args.videos} videos of three signs, model "
          f"{args.model.name}, {args.workers} workers x 1 thread on 127.0.0.1 (the same {os.cpu_count()} cores as "
          "the local scan)")
    run("local OCR off", "off")
    run("local OCR on", "rapidocr")
    with _dask_cluster(REPO, args.workers, work, env) as address:
        run("cluster OCR off", "off", "--cluster", address)
        run("cluster OCR on", "rapidocr", "--cluster", address)
    if args.anchor_tree is not None:
        anchor = args.anchor_tree.resolve()
        with _dask_cluster(anchor, args.workers, work, env) as address:
            run("cluster OCR on, anchor tree", "rapidocr", "--cluster", address,
                run_env={**env, "PYTHONPATH": str(anchor)})
    walls = {label: wall for label, wall, _ in runs}
    cpus = {label: cpu for label, _, cpu in runs}
    print(f"cluster OCR on / local OCR on: {walls['local OCR on'] / walls['cluster OCR on']:.2f}x the local "
          "scan's files/s")
    if args.anchor_tree is not None:
        print(f"coordinator CPU with OCR, anchor tree / this tree: "
              f"{cpus['cluster OCR on, anchor tree'] / cpus['cluster OCR on']:.2f}x")


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
    parser.add_argument("--videos", type=int, default=0, help="with --ocr: also this many videos of signs")
    parser.add_argument("--anchor-tree", type=Path, default=None,
                        help="with --ocr: also run coordinator and workers from this checkout (the version "
                             "before)")
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
