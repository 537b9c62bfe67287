"""Image-embedding cost per image against the default captioner's (Florence-2-base int8), side by side.

    python bench/embed.py [--images 8] [--repeat 3] [--threads 2] [--batch 8] [--models siglip2-base,clip-vit-b32]
                          [--precisions int8,fp32] [--greedy] [--rebuild]

Issue 21's goal: embedding an image costs at most 15 % of captioning it with the default captioner.

No hub is reachable here, so every model is a full-size replica with RANDOM weights (compute does not depend on the
weights), built once into bench/_work/ (gitignored):

* ``siglip2-base``: SigLIP 2 base/16 at 224 px (``SiglipModel``: ViT-B/16, 12 layers, width 768, MAP head;
  196 patches), SiglipImageProcessor at 224x224 bilinear as google/siglip2-base-patch16-224. Its text tower is
  full size except the vocabulary (32,000 instead of Gemma's 256,000: only the embedding table, a lookup, shrinks).
* ``clip-vit-b32``: OpenAI CLIP ViT-B/32 at 224 px (vision ViT-B/32, 12 layers, width 768, 49 patches; text 12
  layers, width 512, vocabulary 49,408), CLIPImageProcessor shortest edge 224 + center crop 224 bicubic.
* Florence-2-base-ft (the default captioner), built by bench/caption_florence.py's recipe into
  bench/_work/florence2-base-random (shared with that bench), run by capwatch at int8 with its default
  generation (3 beams) and at most ``--max-new-tokens`` tokens (random weights never stop early, so every caption
  costs the full budget: 20 tokens is a typical real short caption), in batches of ``--batch`` and one image at a
  time; the faster of the two is the anchor. Its image encoder alone is timed too: a floor under any caption,
  whatever the decoding costs.

Embedding graphs are exported as tools/make_embed_fixtures.py exports the fixtures (transformers.js tensor names)
and quantised the same way (onnxruntime quantize_dynamic, per channel, QUInt8 for the vision graph).

All measured in this one process, alternately, ``--repeat`` times; the best run of each counts (other load on the
box hits all alike, and the best is the least disturbed). Both sides start from the same decoded PIL images of
assorted sizes (480-1200 px), so each pays its own resize and normalisation. Prints seconds per image, the
embedding/caption ratio, and the query-text latency (one text, best of 5).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
sys.path.insert(0, str(ROOT))

from capwatch.config import ModelConfig  # noqa: E402

#: The goal of issue 21: image embedding <= 15 % of the default captioner's per-image cost.
GOAL = 0.15


def _module(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


REPLICAS: dict[str, dict[str, Any]] = {
    "siglip2-base": {
        "family": "siglip",
        "vision": {"image_size": 224, "patch_size": 16, "hidden_size": 768, "intermediate_size": 3072,
                   "num_hidden_layers": 12, "num_attention_heads": 12},
        "text": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "max_position_embeddings": 64},
        "preprocessor": {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
                         "size": {"height": 224, "width": 224}, "resample": 2, "do_rescale": True,
                         "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
                         "image_std": [0.5, 0.5, 0.5]},
    },
    "clip-vit-b32": {
        "family": "clip",
        "vision": {"image_size": 224, "patch_size": 32, "hidden_size": 768, "intermediate_size": 3072,
                   "num_hidden_layers": 12, "num_attention_heads": 12},
        "text": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77},
        "projection_dim": 512,
        "preprocessor": {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                         "size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True,
                         "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
                         "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                         "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True},
    },
}


def build_replica(name: str, rebuild: bool) -> Path:
    """bench/_work/embed-NAME: the replica's folder in the transformers.js layout (fp32 + int8 graphs)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    spec = REPLICAS[name]
    out = WORK / f"embed-{name}"
    stamp = out / "bench-spec.json"
    want = json.dumps(spec, sort_keys=True)
    if not rebuild and stamp.is_file() and stamp.read_text() == want:
        return out
    fixtures = _module("make_embed_fixtures", ROOT / "tools" / "make_embed_fixtures.py")
    print(f"building {out} (random weights, a few minutes) ...", file=sys.stderr, flush=True)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.manual_seed(0)
    if spec["family"] == "clip":
        tok, tok_config = fixtures.clip_tokenizer("<|endoftext|>")
        ids = {k: tok.token_to_id(tok_config[k]) for k in ("bos_token", "eos_token", "pad_token")}
        text = {**spec["text"], "bos_token_id": ids["bos_token"], "eos_token_id": 2, "pad_token_id": ids["pad_token"]}
        config = CLIPConfig(text_config=text, vision_config=spec["vision"], projection_dim=spec["projection_dim"])
        model = CLIPModel._from_config(config, attn_implementation="eager")
    else:
        tok, tok_config = fixtures.gemma_tokenizer()
        text = {**spec["text"], "pad_token_id": tok.token_to_id("<pad>"), "eos_token_id": tok.token_to_id("<eos>")}
        config = SiglipConfig(text_config=text, vision_config=spec["vision"])
        model = SiglipModel._from_config(config, attn_implementation="eager")
    model.eval()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({**tok_config, "model_max_length": text[
        "max_position_embeddings"]}))
    model.config.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(spec["preprocessor"]))
    fixture = fixtures.Fixture(name, spec["family"], "bench", spec["vision"]["image_size"],
                               spec["vision"]["patch_size"], spec["preprocessor"], text["max_position_embeddings"])
    fixtures.export_onnx(model, fixture, out / "onnx")
    fixtures.quantize(out / "onnx")
    stamp.write_text(want)
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--models", default="siglip2-base,clip-vit-b32")
    parser.add_argument("--precisions", default="int8,fp32")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--no-captioner", action="store_true", help="embedding only (no Florence-2 anchor)")
    parser.add_argument("--build-only", action="store_true", help="build the embedding replicas and stop")
    parser.add_argument("--greedy", action="store_true",
                        help="also time Florence-2 greedy (1 beam): a cheaper, stricter anchor than its default")
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(args.threads)
    florence = _module("caption_florence", ROOT / "bench" / "caption_florence.py")
    replicas = {name: build_replica(name, args.rebuild) for name in args.models.split(",")}
    if args.build_only:
        return
    from capwatch.models.derived import DerivedCache

    key_file = WORK / "derived-key"
    if not key_file.is_file():
        key_file.write_bytes(os.urandom(32))
    # The derived cache, as capwatch's scans use for both models (signed int8 weights on VNNI CPUs, and so on).
    derived = DerivedCache(WORK / "derived", key_file.read_bytes())
    captioner = greedy = single = None
    if not args.no_captioner:
        fspec = florence.base_spec(args.max_new_tokens)
        florence_dir = WORK / fspec.name
        if not (florence_dir / "onnx" / "decoder_model_merged_quantized.onnx").is_file():
            print(f"building {florence_dir} (bench/caption_florence.py --export-only) ...", file=sys.stderr)
            florence.main(["--export-only", "--threads", str(args.threads),
                           "--max-new-tokens", str(args.max_new_tokens)])
        from capwatch.models.captioner import open_captioner

        captioner = open_captioner(florence_dir, ModelConfig(
            precision="int8", threads=args.threads, idle_unload_seconds=0, batch_size=args.batch,
            max_new_tokens=args.max_new_tokens), derived=derived)
        # One image at a time too: on a CPU without VNNI, batches of 768-px images measured slower per image.
        single = open_captioner(florence_dir, ModelConfig(
            precision="int8", threads=args.threads, idle_unload_seconds=0, batch_size=1,
            max_new_tokens=args.max_new_tokens), derived=derived)
        if args.greedy:
            greedy = open_captioner(florence_dir, ModelConfig(
                precision="int8", threads=args.threads, idle_unload_seconds=0, batch_size=args.batch,
                max_new_tokens=args.max_new_tokens, num_beams=1), derived=derived)

    from capwatch.models.embedding import EmbedModelFiles, ImageTextEmbedder

    embedders = {
        (name, precision): ImageTextEmbedder(EmbedModelFiles(folder, name, None, precision, None),
                                             threads=args.threads, idle_unload_seconds=0, batch_size=args.batch,
                                             derived=derived)
        for name, folder in replicas.items() for precision in args.precisions.split(",")
    }
    pics = florence.images(args.images)
    # Warm-up (session creation, derived graphs, first allocations) outside the timings.
    for cap in (captioner, greedy, single):
        if cap is not None:
            cap.caption_batch(pics[:1])
    for embedder in embedders.values():
        embedder.embed_images(pics[:1])
        embedder.embed_texts(["warm up"])

    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for label, cap in (("caption", captioner), ("single", single), ("greedy", greedy)):
            if cap is not None:
                t, _caps = timed(lambda c=cap: c.caption_batch(pics))
                best[label] = min(best.get(label, float("inf")), t)
        for (name, precision), embedder in embedders.items():
            t, _vecs = timed(lambda e=embedder: e.embed_images(pics))
            key = f"{name} {precision}"
            best[key] = min(best.get(key, float("inf")), t)
    query: dict[str, float] = {}
    for (name, precision), embedder in embedders.items():
        query[f"{name} {precision}"] = min(timed(lambda e=embedder: e.embed_texts(["a dog on the beach"]))[0]
                                           for _ in range(5))

    if single is not None:
        from capwatch.models import florence2 as f2

        vision_pixels = np.stack([single.preprocess_image(im) for im in pics])
        with single.sessions.use() as sessions:
            best["vision"] = min(timed(lambda s=sessions: f2.image_features(  # type: ignore[misc]
                s[f2.VISION], vision_pixels, single._shape))[0] for _ in range(args.repeat))
    n = len(pics)
    load = os.getloadavg()[0]
    print(f"{n} images (480-1200 px), best of {args.repeat}, {args.threads} threads, batch {args.batch}; random "
          f"full-size replicas; load average {load:.1f} on {os.cpu_count()} CPUs (shared, noisy box)", flush=True)
    anchor = min(best["caption"], best["single"]) if "caption" in best else None
    if anchor is not None:
        print(f"{'Florence-2-base int8 caption':34s} {best['caption'] / n:8.3f} s/image  (its default 3 beams, "
              f"{args.max_new_tokens} new tokens, keywords off, batch {args.batch})", flush=True)
        print(f"{'Florence-2-base int8 caption':34s} {best['single'] / n:8.3f} s/image  (the same, one image at a "
              "time)", flush=True)
        print(f"{'Florence-2-base int8 vision encoder':34s} {best['vision'] / n:8.3f} s/image  (its image encoder "
              "alone: a floor under any caption)", flush=True)
        print(f"anchor: the faster caption, {anchor / n:.3f} s/image", flush=True)
    if "greedy" in best:
        print(f"{'Florence-2-base int8 greedy':34s} {best['greedy'] / n:8.3f} s/image  (1 beam; for comparison)",
              flush=True)
    for (name, precision), _embedder in embedders.items():
        key = f"{name} {precision}"
        per = best[key] / n
        ratio = ""
        if anchor:
            verdict = "meets" if best[key] <= GOAL * anchor else "misses"
            ratio = f"{100 * best[key] / anchor:5.1f} % of the caption ({verdict} <= {GOAL:.0%})"
            if "greedy" in best:
                ratio += f", {100 * best[key] / best['greedy']:.1f} % of a greedy one"
            ratio += f", {100 * best[key] / best['vision']:.1f} % of the vision encoder alone"
        print(f"{'embed ' + key:34s} {per:8.3f} s/image  {ratio}; query text {1000 * query[key]:.0f} ms",
              flush=True)
    for cap in (captioner, greedy, single):
        if cap is not None:
            cap.close()
    for embedder in embedders.values():
        embedder.close()


if __name__ == "__main__":
    main()
