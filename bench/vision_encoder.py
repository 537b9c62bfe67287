"""Florence-2-base's vision encoder (DaViT, 768x768 -> 577x768) alone: where its time goes, and what each lever buys.

    python bench/vision_encoder.py profile [--graphs fp32,int8,static,dyns8,tidy,tidys8] [--runs 2]
    python bench/vision_encoder.py levers [--variants ...] [--rounds 3] [--threads 2]

Works on the full-size random replica that bench/caption_florence.py builds into bench/_work/ (run that first, or
``python bench/caption_florence.py --export-only``).

``profile`` runs onnxruntime's profiler on each graph (the session as capwatch makes it: all graph optimisations,
one inter-op thread) and prints, per node type, the total time of one run, its share, the node count, and for the
int8 graph which MatMuls stayed fp32 (both inputs activations: the attention products) and what the activation
quantisation (DynamicQuantizeLinear) costs.

``levers`` times the encoder per image for each variant, interleaved (variant A, B, C, then again: other load on the
shared box hits all alike), and prints the median of ``--rounds`` per variant, its ratio to onnxruntime fp32, and the
fidelity of its features against onnxruntime fp32 on real photos (tests/fixtures/photos: scikit-image's astronaut,
chelsea and coffee), as the lowest cosine over the photos' 577 feature rows (and the mean):

* ``ort-fp32`` the fp32 graph; ``ort-int8`` the published-style int8 graph (quantize_dynamic, uint8 weights,
  reduce_range, per channel);
* ``ort-static`` capwatch's static int8 graph (:mod:`capwatch.models.staticq`: calibrated on the photos, QDQ,
  per-channel int8 weights), as the derived-graph cache makes it;
* ``ort-dyns8``: the published-style graph dequantised and quantised dynamically again with int8 (7-bit) weights
  (onnxruntime's u8s8 kernels instead of u8u8);
* ``ort-tidy``, ``ort-tidys8``: the published-style graph as capwatch runs it on the CPU: its attention splits
  moved before their transposes and its grouped convolutions in fp32 over the same integers
  (capwatch.models.derived.tidy_graph), with int8 weights too (``tidys8``, what
  capwatch runs on CPUs with VNNI); ``profile --graphs tidy,tidys8`` takes the same names;
* ``ov-fp32``, ``ov-int8``, ``ov-static``: those graphs compiled by OpenVINO (``pip install openvino``) for the
  CPU, with as many inference threads; skipped (one line) when it is not installed (capwatch does not use it).

It also prints CPU seconds per variant (process time): with ``--threads 1`` the steadiest measure on a loaded box.

Findings on the 2-core AMD EPYC (AVX2 + FMA, no VNNI, no AVX-512), shared and loaded (load 3.5-13), so shares and
ratios rather than seconds (README "The image encoder at int8" has the full profile table):

* profile, share of node time: fp32 MatMul 71 % + FusedMatMul 2 %, Transpose 7 %, Conv 5 %, BiasGelu 5 %; int8 as
  published DynamicQuantizeMatMul 62 % (97 weight products, u8u8), Transpose 12 %, ConvInteger 8 %, fp32 attention
  products 6 % (48 MatMul/FusedMatMul); static QLinearMatMul 49 % (145), Transpose 15 %, Dequantize/QuantizeLinear
  12 %, QLinearConv 4 %.
* levers --threads 1 --rounds 3 (CPU s, load 3.5-5.9): ort-fp32 5.49, ort-int8 4.40 (1.25x), ort-static 3.85
  (1.43x), ort-dyns8 5.14 (1.07x), ov-fp32 5.71 (0.96x). At 2 threads (wall, load 4.4-5.9): ort-int8 1.14x,
  ort-static 1.12x, ov-fp32 0.81x, ov-int8 0.62x; OpenVINO refuses the static QDQ graph.
* fidelity on this random replica: no int8 graph is near fp32 (mean row cosine dynamic 0.56, static 0.34; the
  tiny fixture: 0.998 and 0.995).

On a 2-core Intel Xeon with AVX-512 VNNI (levers --threads 2, wall, load 1.7-2.0): ort-int8 0.81x, ort-tidy 0.94x,
ort-tidys8 1.35-1.51x (what capwatch runs there), ort-static 1.18x (1.40x once made with the split rewrite too),
ov-fp32 0.97x, ov-int8 0.62x; profile of tidys8: DynamicQuantizeMatMul 38 %, ConvInteger 15 %, Transpose 13 %.

On a 2-core AMD Zen 4 (EPYC, AVX-512 VNNI and BF16), after the grouped convolutions moved to fp32 over the same
integers (part of ``tidy``): profile tidys8 1.29 s a run against fp32 3.30 s; DynamicQuantizeMatMul 0.60 s (47 %,
~300 GMAC/s: the VNNI rate of two cores), Transpose 0.14 s, fp32 attention products 0.13 s, depthwise Conv 0.02 s
(0.14 s as ConvInteger), patch-embedding ConvInteger 0.08 s (fp32 Conv would take 0.11 s).

Random weights: the features' fidelity on a trained model may differ (its activations have other ranges); the
probe in capwatch checks the real model's graph when it is made.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
MODEL = WORK / "florence2-base-random"
PHOTOS = ROOT / "tests" / "fixtures" / "photos"
sys.path.insert(0, str(ROOT))

from capwatch.models.runtime import ort  # noqa: E402


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def pixels_of_photos() -> dict[str, np.ndarray]:
    """The photos preprocessed as capwatch does for this model (768x768 bicubic, ImageNet mean/std), [1,3,768,768]."""
    from capwatch.config import ModelConfig
    from capwatch.models.captioner import open_captioner

    cap = open_captioner(MODEL, ModelConfig(precision="fp32", idle_unload_seconds=0))
    return {p.stem: cap.preprocess_image(Image.open(p))[None] for p in sorted(PHOTOS.glob("*.jpg"))}


def ort_session(path: Path, threads: int, profile: str | None = None) -> Any:
    from capwatch.models.session import session_options

    options = session_options(threads)
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def make_static(remake: bool) -> Path:
    """The static int8 graph made from the published-style int8 graph, as capwatch's derived cache makes it."""
    from capwatch.config import ModelConfig
    from capwatch.models import staticq
    from capwatch.models.captioner import open_captioner

    target = WORK / "vision_encoder_static.onnx"
    if remake or not target.is_file():
        cap = open_captioner(MODEL, ModelConfig(precision="fp32", idle_unload_seconds=0))
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=WORK) as tmp:
            staticq.static_graph(MODEL / "onnx" / "vision_encoder_quantized.onnx", target,
                                 staticq.calibration_pixels(cap.preprocess_image), work=Path(tmp))
        print(f"static int8 graph made in {time.perf_counter() - start:.0f} s", flush=True)
    return target


def make_dynamic_s8(remake: bool) -> Path:
    """The published-style int8 graph dequantised and quantised dynamically again with int8 (7-bit) weights."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from capwatch.models import staticq

    target = WORK / "vision_encoder_dyns8.onnx"
    if remake or not target.is_file():
        with tempfile.TemporaryDirectory(dir=WORK) as tmp:
            plain = Path(tmp) / "plain.onnx"
            published = onnx.load(str(MODEL / "onnx" / "vision_encoder_quantized.onnx"))
            onnx.save_model(staticq.dequantize_dynamic(published), str(plain))
            quantize_dynamic(plain, target, per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)
    return target


def make_tidy(signed: bool) -> Path:
    """The published-style int8 graph as capwatch runs it on the CPU (capwatch.models.derived.tidy_graph): its
    attention splits before their transposes, its grouped convolutions in fp32 over the same integers, and with
    ``signed`` its weights int8 as well (``tidy-s8``, what
    capwatch runs on CPUs with VNNI; elsewhere onnxruntime's u8s8 kernel may saturate, so it is not exact there)."""
    from capwatch.models.derived import DerivedCache, tidy_graph

    key_file = WORK / "derived-key"
    if not key_file.exists():
        key_file.write_bytes(os.urandom(32))
    store = DerivedCache(WORK / "derived", key_file.read_bytes())
    path = tidy_graph(MODEL / "onnx" / "vision_encoder_quantized.onnx", store, {"pixel_values": (1, 3, 768, 768)},
                      signed=signed)
    if path is None:
        sys.exit("the tidy rewrite was refused (see the log line above)")
    return path


def _graph_path(name: str, remake: bool = False) -> Path:
    """The encoder graph called ``name`` (fp32, int8, static, dyns8, tidy, tidys8), made first where needed."""
    if name == "static":
        return make_static(remake)
    if name == "dyns8":
        return make_dynamic_s8(remake)
    if name in ("tidy", "tidys8"):
        return make_tidy(signed=name == "tidys8")
    return MODEL / "onnx" / ("vision_encoder.onnx" if name == "fp32" else "vision_encoder_quantized.onnx")


def profile(args: argparse.Namespace) -> None:
    import onnx

    pixels = next(iter(pixels_of_photos().values()))
    for name in args.graphs.split(","):
        path = _graph_path(name)
        graph = onnx.load(str(path), load_external_data=False)
        initialisers = {i.name for i in graph.graph.initializer}
        counts: dict[str, int] = defaultdict(int)
        act_act = 0
        for node in graph.graph.node:
            counts[node.op_type] += 1
            if node.op_type == "MatMul" and not any(i in initialisers for i in node.input):
                act_act += 1
        with tempfile.TemporaryDirectory(dir=WORK) as tmp:
            session = ort_session(path, args.threads, profile=str(Path(tmp) / "prof"))
            session.run(None, {"pixel_values": pixels})  # warm-up, not counted
            start = time.perf_counter()
            for _ in range(args.runs):
                session.run(None, {"pixel_values": pixels})
            wall = (time.perf_counter() - start) / args.runs
            events = json.loads(Path(session.end_profiling()).read_text())
        per_type: dict[str, float] = defaultdict(float)
        nodes: dict[str, set[str]] = defaultdict(set)
        runs = 0
        for event in events:
            if event.get("cat") == "Session" and event.get("name") == "model_run":
                runs += 1
            if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
                continue
            op = event["args"].get("op_name", "?")
            per_type[op] += event["dur"] / 1e6
            nodes[op].add(event["name"])
        runs = max(runs, 1)
        total = sum(per_type.values()) / runs
        print(f"\n{name}: {path.name}, {args.threads} threads, {wall:.3f} s/run wall (mean of {args.runs} after a "
              f"warm-up), node time {total:.3f} s/run, load {load()}", flush=True)
        print(f"  graph as saved: {sum(counts.values())} nodes; MatMul {counts.get('MatMul', 0)} "
              f"({act_act} with two activation inputs), Conv {counts.get('Conv', 0)}, "
              f"MatMulInteger {counts.get('MatMulInteger', 0)}, ConvInteger {counts.get('ConvInteger', 0)}, "
              f"DynamicQuantizeLinear {counts.get('DynamicQuantizeLinear', 0)}, "
              f"QuantizeLinear {counts.get('QuantizeLinear', 0)}, DequantizeLinear {counts.get('DequantizeLinear', 0)}")
        print(f"  {'node type (as run)':32s} {'s/run':>7s} {'share':>6s} {'nodes':>5s}")
        for op, seconds in sorted(per_type.items(), key=lambda kv: -kv[1]):
            per = seconds / runs
            print(f"  {op:32s} {per:7.3f} {per / total:6.1%} {len(nodes[op]):5d}")


# ------------------------------------------------------------------------------------------------------------
# levers


def variant_runner(name: str, threads: int, remake: bool = False) -> Callable[[np.ndarray], np.ndarray] | None:
    engine, _, graph = name.partition("-")
    path = _graph_path(graph, remake)
    if engine == "ort":
        session = ort_session(path, threads)
        return lambda x: session.run(["image_features"], {"pixel_values": x})[0]
    try:
        import openvino as ov
    except ImportError:
        return None

    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({"pixel_values": x})
        return np.array(request.get_output_tensor(0).data, copy=True)

    return run


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a2, b2 = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return np.asarray((a2 * b2).sum(1) / (np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)))


def levers(args: argparse.Namespace) -> None:
    photos = pixels_of_photos()
    names = args.variants.split(",")
    made = {n: variant_runner(n, args.threads, args.remake) for n in names}
    runners = {n: run for n, run in made.items() if run is not None}
    for n in (n for n, run in made.items() if run is None):
        print(f"{n}: skipped (pip install openvino to measure it)", flush=True)
    names = list(runners)
    reference = runners.get("ort-fp32") or variant_runner("ort-fp32", args.threads)
    assert reference is not None
    want = {k: reference(v) for k, v in photos.items()}
    fidelity = {}
    for n, run in runners.items():
        cos = np.concatenate([cosines(run(v), want[k]) for k, v in photos.items()])
        fidelity[n] = (float(cos.min()), float(cos.mean()))
    x = next(iter(photos.values()))
    times: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    loads = [load()]
    for _ in range(args.rounds):
        for n, run in runners.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run(x)
            times[n].append(time.perf_counter() - start)
            cpu[n].append(time.process_time() - start_cpu)
        loads.append(load())
    base = statistics.median(times.get("ort-fp32", [float("nan")]))
    print(f"vision encoder alone, 1 image 768x768, {args.threads} threads, median of {args.rounds} interleaved "
          f"rounds; load {' '.join(loads)}", flush=True)
    base_cpu = statistics.median(cpu.get("ort-fp32", [float("nan")]))
    print(f"{'variant':12s} {'s/image':>8s} {'vs ort-fp32':>11s} {'cpu s':>7s} {'vs':>6s} {'min cos':>9s} "
          f"{'mean cos':>9s}  all rounds (wall)")
    for n in names:
        med, med_cpu = statistics.median(times[n]), statistics.median(cpu[n])
        print(f"{n:12s} {med:8.3f} {base / med:10.2f}x {med_cpu:7.3f} {base_cpu / med_cpu:5.2f}x "
              f"{fidelity[n][0]:9.5f} {fidelity[n][1]:9.5f}  {' '.join(f'{t:.3f}' for t in times[n])}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("profile", "levers"))
    parser.add_argument("--graphs", default="fp32,int8")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="ort-fp32,ort-int8,ort-static,ort-dyns8,ov-fp32,ov-int8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--remake", action="store_true", help="make the static int8 graph again")
    args = parser.parse_args(argv)
    if not (MODEL / "onnx" / "vision_encoder.onnx").is_file():
        sys.exit(f"no replica in {MODEL}: run python bench/caption_florence.py --export-only first")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    profile(args) if args.what == "profile" else levers(args)


if __name__ == "__main__":
    main()
