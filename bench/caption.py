"""Caption throughput: transformers generate() vs capwatch's ONNX engine on a real-size random-weight ViT-GPT2.

Needs the ``export`` extra. Usage (from the repository root)::

    python bench/caption.py [--images 16] [--threads 0] [--skip-transformers]

The model (ViT-B/16 224 + GPT-2 small with cross-attention, vocab 50257, random weights) is built and exported once
into bench/_work/vit-gpt2-random/ (transformers.js layout, fp32 + int8 made with the published quantize_dynamic
recipe) and reused afterwards. Each configuration runs in its own subprocess so that its peak RSS is its own;
one warm-up image is captioned first (session load, allocator warm-up) and not timed.

A random-weight GPT-2 essentially never emits EOS, so every caption runs to max_length (16 tokens): the timings are
the worst case per caption, with identical work in every configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
MODEL = WORK / "vit-gpt2-random"
HF = WORK / "vit-gpt2-random-hf"
#: Same model, but the int8 encoder quantised with QInt8 weights (u8s8) instead of the published QUInt8 (u8u8).
MODEL_S8 = WORK / "vit-gpt2-random-s8enc"
GENERATION = {"max_length": 16, "num_beams": 4}  # nlpconnect/vit-gpt2-image-captioning's card


# ----------------------------------------------------------------------------------------------------------------
# Build (parent process, once)


def build_model() -> None:
    if (MODEL / "onnx" / "decoder_model_merged_quantized.onnx").is_file() and (HF / "config.json").is_file():
        return
    import torch
    from optimum.exporters.onnx import main_export
    from tokenizers import Tokenizer, decoders, models
    from transformers import GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderModel, ViTConfig, ViTModel

    sys.path.insert(0, str(ROOT / "tools"))
    from make_fixture_models import quantize

    print("building and exporting the real-size random ViT-GPT2 (once; a few minutes)...", file=sys.stderr)
    torch.manual_seed(0)
    eos = 50256
    encoder = ViTModel(ViTConfig(image_size=224, patch_size=16), add_pooling_layer=False)
    decoder = GPT2LMHeadModel(GPT2Config(vocab_size=50257, add_cross_attention=True, is_decoder=True,
                                         bos_token_id=eos, eos_token_id=eos))
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id = eos
    model.config.pad_token_id = eos
    model.config.eos_token_id = eos
    model.generation_config.update(decoder_start_token_id=eos, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                                   **GENERATION)
    model.eval()
    if HF.exists():
        shutil.rmtree(HF)
    model.save_pretrained(HF)
    tmp = WORK / "export-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    main_export(str(HF), output=str(tmp), task="image-to-text-with-past", opset=14, do_validation=False)
    (MODEL / "onnx").mkdir(parents=True, exist_ok=True)
    for name in ("encoder_model.onnx", "decoder_model_merged.onnx"):
        shutil.move(tmp / name, MODEL / "onnx" / name)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(HF / name, MODEL / name)
    shutil.rmtree(tmp)
    quantize(MODEL / "onnx")
    (MODEL / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    # Any vocabulary of the right size will do for timing: the real GPT-2 merges are not available offline.
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(50257)}, unk_token="w0"))
    tok.decoder = decoders.WordPiece()
    tok.save(str(MODEL / "tokenizer.json"))


def build_s8_variant() -> None:
    """A model directory identical to MODEL except for a QInt8-weight int8 encoder (not the published recipe)."""
    target = MODEL_S8 / "onnx" / "encoder_model_quantized.onnx"
    if target.is_file():
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    (MODEL_S8 / "onnx").mkdir(parents=True, exist_ok=True)
    for f in MODEL.iterdir():
        if f.is_file() and not (MODEL_S8 / f.name).exists():
            (MODEL_S8 / f.name).symlink_to(f)
    for name in ("decoder_model_merged_quantized.onnx", "decoder_model_merged.onnx", "encoder_model.onnx"):
        if not (MODEL_S8 / "onnx" / name).exists():
            (MODEL_S8 / "onnx" / name).symlink_to(MODEL / "onnx" / name)
    quantize_dynamic(MODEL / "onnx" / "encoder_model.onnx", target, per_channel=True, reduce_range=True,
                     weight_type=QuantType.QInt8, extra_options={"EnableSubgraph": True})


def make_images(n: int) -> Path:
    from PIL import Image

    folder = WORK / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:480, 0:640]
    for i in range(n):
        path = folder / f"img{i:02d}.jpg"
        if path.exists():
            continue
        a, b, c = rng.uniform(0.5, 4, 3)
        rgb = np.stack([np.sin(x / 80 * a + i), np.cos(y / 70 * b), np.sin((x + y) / 90 * c)], -1)
        Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8)).save(path, quality=90)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# One configuration (child process)


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Caption the images with one configuration; returns timings, peak RSS and token ids."""
    sys.path.insert(0, str(ROOT))
    from capwatch.config import ModelConfig
    from capwatch.models.captioner import open_captioner

    threads = spec["threads"] or len(os.sched_getaffinity(0))
    images = sorted(Path(spec["images"]).glob("*.jpg"))[: spec["n"]]
    # Everyone gets the same tensors: capwatch's preprocessing (tested equal to ViTImageProcessor's).
    prep = open_captioner(MODEL, ModelConfig(dir=MODEL, precision="fp32"))
    pixels = np.stack([prep.preprocess_file(p) for p in images])
    beams = spec["beams"]
    batch = spec["batch"]
    if spec["engine"] == "transformers":
        import torch
        from transformers import VisionEncoderDecoderModel

        torch.set_num_threads(threads)
        model = VisionEncoderDecoderModel.from_pretrained(HF).eval()

        def caption(chunk: np.ndarray) -> list[list[int]]:
            with torch.no_grad():
                out = model.generate(torch.from_numpy(chunk), num_beams=beams)
            return [row[: _trim(row)] for row in out.tolist()]
    else:
        model_dir = MODEL_S8 if spec.get("s8_encoder") else MODEL
        cfg = ModelConfig(dir=model_dir, precision=spec["precision"], threads=spec["threads"], batch_size=batch,
                          num_beams=beams, idle_unload_seconds=0)
        cap = open_captioner(model_dir, cfg, derived=_derived() if spec.get("graphs", "split") == "split" else None)

        def caption(chunk: np.ndarray) -> list[list[int]]:
            return [list(r.token_ids) for r in cap.caption_pixels(chunk)]

    caption(pixels[:1])  # warm-up: session load, first-run allocations
    start = time.perf_counter()
    ids: list[list[int]] = []
    for i in range(0, len(pixels), batch):
        ids.extend(caption(pixels[i : i + batch]))
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "images": len(pixels), "peak_rss_mb": _peak_rss_kb() / 1024, "ids": ids}


def _derived() -> Any:
    """The bench's own cache of rewritten graphs (made once, by the first configuration's warm-up)."""
    from capwatch.models.derived import DerivedCache

    key_file = WORK / "derived-key"
    if not key_file.is_file():
        key_file.write_bytes(os.urandom(32))
    return DerivedCache(WORK / "derived", key_file.read_bytes())


def _peak_rss_kb() -> int:
    # VmHWM belongs to this process image; ru_maxrss would also count the parent's peak (it survives fork+exec).
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _trim(row: list[int]) -> int:
    # transformers pads finished rows of a batch; a random GPT-2 never finishes early, so nothing to trim.
    return len(row)


# ----------------------------------------------------------------------------------------------------------------
# Parent: run every configuration, compare, print


CONFIGS = [
    ("transformers greedy", {"engine": "transformers", "beams": 1, "batch": 1}),
    ("transformers beam-4", {"engine": "transformers", "beams": 4, "batch": 1}),
    ("capwatch fp32 greedy", {"engine": "capwatch", "precision": "fp32", "beams": 1, "batch": 1}),
    ("published graph fp32 greedy",
     {"engine": "capwatch", "precision": "fp32", "beams": 1, "batch": 1, "graphs": "published"}),
    ("capwatch fp32 beam-4", {"engine": "capwatch", "precision": "fp32", "beams": 4, "batch": 1}),
    ("published graph fp32 beam-4",
     {"engine": "capwatch", "precision": "fp32", "beams": 4, "batch": 1, "graphs": "published"}),
    ("capwatch fp32 greedy batch 8", {"engine": "capwatch", "precision": "fp32", "beams": 1, "batch": 8}),
    ("capwatch fp32 beam-4 batch 8", {"engine": "capwatch", "precision": "fp32", "beams": 4, "batch": 8}),
    ("capwatch int8 greedy", {"engine": "capwatch", "precision": "int8", "beams": 1, "batch": 1}),
    ("capwatch int8 beam-4", {"engine": "capwatch", "precision": "int8", "beams": 4, "batch": 1}),
    ("capwatch int8 greedy batch 8", {"engine": "capwatch", "precision": "int8", "beams": 1, "batch": 8}),
    ("capwatch int8 beam-4 batch 8", {"engine": "capwatch", "precision": "int8", "beams": 4, "batch": 8}),
    ("int8 QInt8-encoder greedy batch 8",
     {"engine": "capwatch", "precision": "int8", "beams": 1, "batch": 8, "s8_encoder": True}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description="capwatch caption benchmark")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="0 = all cores")
    parser.add_argument("--only", help="comma-separated substrings of configuration names to run")
    parser.add_argument("--rounds", type=int, default=2,
                        help="run every configuration this many times, round-robin, and keep each one's fastest "
                             "round (a shared machine's load comes in bursts)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_config(json.loads(args.child))))
        return 0

    build_model()
    build_s8_variant()
    folder = make_images(args.images)
    results: dict[str, dict[str, Any]] = {}
    load_before = os.getloadavg()[0]
    selected = [(n, s) for n, s in CONFIGS if not args.only or any(o in n for o in args.only.split(","))]
    for round_no in range(args.rounds):
        for name, spec in selected:
            full = {**spec, "threads": args.threads, "images": str(folder), "n": args.images}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(full)], capture_output=True,
                                  text=True, check=False)
            if proc.returncode != 0:
                print(f"{name}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  round {round_no + 1} {name:32s} {1000 * r['seconds'] / r['images']:8.0f} ms/image "
                  f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr)
            if name in results and results[name]["ids"] != r["ids"]:
                print(f"  {name}: tokens differ between rounds!", file=sys.stderr)
            if name not in results or r["seconds"] < results[name]["seconds"]:
                r["peak_rss_mb"] = max(r["peak_rss_mb"], results.get(name, {}).get("peak_rss_mb", 0))
                results[name] = r
    load_after = os.getloadavg()[0]

    print(f"\n{args.images} images, 224x224, max_length {GENERATION['max_length']}, "
          f"threads {args.threads or len(os.sched_getaffinity(0))}, every caption runs to max_length; best of "
          f"{args.rounds} round(s); 1-min load average {load_before:.1f} before, {load_after:.1f} after")
    print(f"{'configuration':34s} {'ms/image':>9s} {'img/min':>8s} {'peak RSS':>9s} {'vs tf greedy':>13s} "
          f"{'vs tf beam-4':>13s}")
    base = {k: results[k]["seconds"] / results[k]["images"] for k in ("transformers greedy", "transformers beam-4")
            if k in results}
    for name, r in results.items():
        per = r["seconds"] / r["images"]
        ratios = [f"{base[k] / per:12.2f}x" if k in base else f"{'-':>13s}" for k in
                  ("transformers greedy", "transformers beam-4")]
        print(f"{name:34s} {1000 * per:9.0f} {60 / per:8.1f} {r['peak_rss_mb']:8.0f}M {ratios[0]} {ratios[1]}")

    print()
    checks = [("capwatch fp32 greedy", "transformers greedy"), ("capwatch fp32 beam-4", "transformers beam-4"),
              ("published graph fp32 greedy", "transformers greedy"),
              ("published graph fp32 beam-4", "transformers beam-4"),
              ("capwatch fp32 greedy batch 8", "transformers greedy"),
              ("capwatch fp32 beam-4 batch 8", "transformers beam-4"),
              ("capwatch int8 greedy", "capwatch fp32 greedy"), ("capwatch int8 beam-4", "capwatch fp32 beam-4"),
              ("capwatch int8 greedy batch 8", "capwatch fp32 greedy"),
              ("capwatch int8 beam-4 batch 8", "capwatch fp32 beam-4"),
              ("capwatch int8 greedy batch 8", "capwatch int8 greedy"),
              ("capwatch int8 beam-4 batch 8", "capwatch int8 beam-4"),
              ("int8 QInt8-encoder greedy batch 8", "capwatch fp32 greedy")]
    status = 0
    for ours, ref in checks:
        if ours in results and ref in results:
            same = sum(a == b for a, b in zip(results[ours]["ids"], results[ref]["ids"], strict=True))
            total = len(results[ref]["ids"])
            print(f"tokens identical, {ours} vs {ref}: {same}/{total}")
            if ref.startswith("transformers") and same != total:
                status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
