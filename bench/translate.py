"""Caption translation (Marian opus-mt-en-de size): transformers (PyTorch) vs capwatch (onnxruntime), and vs the
caption itself (Florence-2-base size), side by side.

    python bench/translate.py [--captions 16] [--threads 2] [--new-tokens 23] [--florence] [--rebuild]

Builds once, into bench/_work/ (gitignored), a MarianMTModel with opus-mt-en-de's architecture (its config.json:
d_model 512, 6+6 layers, 8 heads, FFN 2048, 58101 tokens, 512 positions, sinusoidal positions, scale_embedding,
tied embeddings) and random weights (no hub here), exported as the fixture is (tools/fixtures_marian.py: optimum
``main_export`` text2text-generation-with-past, int8 with ``quantize_dynamic`` + EnableSubgraph). Then, for the same
source ids (14 tokens each, the length of a short English caption):

* transformers ``MarianMTModel.generate()`` fp32, one caption at a time, with the model's settings (beam 4, bad
  words [[pad]]) and greedy;
* capwatch fp32 (tokens must be identical to transformers') and int8, one caption at a time;

and prints seconds per caption and the speed ratio. Random weights never emit </s> early, so every translation runs
to ``--new-tokens`` (a fixed, comparable amount of decoding work; a real caption's translation is 10-25 tokens).

``--florence`` also times the caption itself: capwatch Florence-2 (base-ft architecture, random weights, built by
bench/caption_florence.py's recipe into bench/_work/florence2-base-random) int8, beam 3, 20 new tokens, one image
at a time, and prints the translation's cost as a share of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
FIXTURE = ROOT / "tests" / "fixtures" / "models" / "marian-tiny-en-xx"
sys.path.insert(0, str(ROOT))

#: opus-mt-en-de's config.json (Helsinki-NLP), the parts that make its size and shape.
OPUS_EN_DE: dict[str, Any] = {
    "vocab_size": 58101, "decoder_vocab_size": 58101, "d_model": 512, "encoder_layers": 6, "decoder_layers": 6,
    "encoder_attention_heads": 8, "decoder_attention_heads": 8, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048,
    "max_position_embeddings": 512, "pad_token_id": 58100, "eos_token_id": 0, "decoder_start_token_id": 58100,
    "forced_eos_token_id": 0, "scale_embedding": True, "activation_function": "swish",
    "share_encoder_decoder_embeddings": True, "static_position_embeddings": True,
}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def build(model_dir: Path, new_tokens: int) -> None:
    """Export the random opus-mt-en-de-size replica into ``model_dir`` (fp32 + int8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from optimum.exporters.onnx import main_export
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    if model_dir.exists():
        shutil.rmtree(model_dir)
    staged = model_dir.parent / (model_dir.name + "-hf")
    if staged.exists():
        shutil.rmtree(staged)
    torch.manual_seed(0)
    model = MarianMTModel(MarianConfig(**OPUS_EN_DE)).eval()
    model.generation_config = GenerationConfig(
        bad_words_ids=[[58100]], bos_token_id=0, decoder_start_token_id=58100, eos_token_id=0, forced_eos_token_id=0,
        max_length=new_tokens + 1, num_beams=4, pad_token_id=58100)
    model.save_pretrained(staged)
    onnx_tmp = model_dir.parent / (model_dir.name + "-onnx")
    main_export(str(staged), output=str(onnx_tmp), task="text2text-generation-with-past", opset=17, device="cpu",
                do_validation=False)
    (model_dir / "onnx").mkdir(parents=True)
    for stem in ("encoder_model", "decoder_model_merged"):
        shutil.move(str(onnx_tmp / f"{stem}.onnx"), model_dir / "onnx" / f"{stem}.onnx")
        quantize_dynamic(model_dir / "onnx" / f"{stem}.onnx", model_dir / "onnx" / f"{stem}_quantized.onnx",
                         per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                         extra_options={"EnableSubgraph": True})
    for name in ("config.json", "generation_config.json"):
        shutil.copy(staged / name, model_dir / name)
    # The fixture's tokenizer files: the bench feeds token ids, so only their presence matters.
    for name in ("tokenizer.json", "source.spm", "vocab.json"):
        shutil.copy(FIXTURE / name, model_dir / name)
    shutil.rmtree(onnx_tmp, ignore_errors=True)
    (model_dir / "bench-spec.json").write_text(json.dumps({"new_tokens": new_tokens, **OPUS_EN_DE}, sort_keys=True))


def florence_caption_seconds(threads: int, images: int, replica: Path | None = None,
                             translate: Callable[[int], object] | None = None) -> tuple[float, float, float]:
    """Seconds per image of capwatch's Florence-2-base-size caption alone (int8, beam 3, 20 new tokens): one image
    at a time, and all ``images`` in one batch (as the pipeline runs them); and, interleaved with the one-at-a-time
    captions (image i, then caption i's translation, so that both see the same load), ``translate(i)``'s seconds."""
    spec_file = ROOT / "bench" / "caption_florence.py"
    spec = importlib.util.spec_from_file_location("caption_florence", spec_file)
    assert spec is not None and spec.loader is not None
    cf = importlib.util.module_from_spec(spec)
    sys.modules["caption_florence"] = cf
    spec.loader.exec_module(cf)
    fspec = cf.base_spec(20)
    want = json.dumps({k: dict(v) if k == "vision" else v for k, v in fspec._asdict().items()}, sort_keys=True)
    model_dir = WORK / fspec.name
    if replica is not None and (replica / "bench-spec.json").is_file() \
            and (replica / "bench-spec.json").read_text() == want:
        model_dir = replica  # the same recipe, already built (read only)
    stamp = model_dir / "bench-spec.json"
    if not stamp.is_file() or stamp.read_text() != want:
        print(f"exporting {fspec.name} (several minutes) ...", file=sys.stderr)
        cf.ff.build_model_dir(fspec, WORK, goldens=False)
        stamp.write_text(want)
    from capwatch.config import ModelConfig
    from capwatch.models.captioner import DescribeOptions, open_captioner

    cap = open_captioner(model_dir, ModelConfig(precision="int8", num_beams=3, threads=threads,
                                                idle_unload_seconds=0, batch_size=images))
    pics = cf.images(images)
    pixels = np.stack([cap.preprocess_image(im) for im in pics])
    options = DescribeOptions(keywords=False)
    cap.describe_pixels(pixels[:1], options)  # load + warm up
    single = translated = 0.0
    for i in range(images):
        single += timed(lambda i=i: cap.describe_pixels(pixels[i : i + 1], options))[0]
        if translate is not None:
            translated += timed(lambda i=i: translate(i))[0]
    batched = min(timed(lambda: cap.describe_pixels(pixels, options))[0] for _ in range(2))
    cap.close()
    return single / images, batched / images, translated / images


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--captions", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=23)
    parser.add_argument("--florence", action="store_true", help="also time the Florence-2-base-size caption")
    parser.add_argument("--florence-images", type=int, default=4)
    parser.add_argument("--florence-dir", type=Path, default=None,
                        help="a Florence-2-base replica bench/caption_florence.py already built (used when its "
                             "bench-spec.json is this recipe's)")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--beams", default="4,1", help="beam counts to measure (comma-separated)")
    parser.add_argument("--no-transformers", action="store_true", help="capwatch only (with --florence)")
    parser.add_argument("--batch", type=int, default=8, help="captions per call in the batched capwatch run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import MarianMTModel

    from capwatch.models.marian import Translator

    model_dir = WORK / "opus-mt-en-de-random"
    stamp = model_dir / "bench-spec.json"
    if args.rebuild or not stamp.is_file() or json.loads(stamp.read_text()).get("new_tokens") != args.new_tokens:
        print(f"exporting {model_dir.name} (a minute or two) ...", file=sys.stderr)
        t, _ = timed(lambda: build(model_dir, args.new_tokens))
        print(f"  export + quantize: {t:.0f} s", file=sys.stderr)
    hf = MarianMTModel.from_pretrained(model_dir.parent / (model_dir.name + "-hf")).eval()
    rng = np.random.default_rng(0)
    sources = [[*rng.integers(3, 58000, size=13).tolist(), 0] for _ in range(args.captions)]
    translators = {p: Translator(model_dir, precision=p, threads=args.threads, idle_unload_seconds=0,
                                 batch_size=args.batch) for p in ("fp32", "int8")}

    def transformers_run(beams: int) -> list[list[int]]:
        with torch.inference_mode():
            return [hf.generate(torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long),
                                num_beams=beams)[0].tolist() for s in sources]

    def capwatch_run(precision: str, beams: int, batched: bool = False) -> list[list[int]]:
        t = translators[precision]
        settings = dataclasses.replace(t.settings, num_beams=beams)
        if batched:  # the pipeline translates a model batch's captions in one call per language
            return t.generate_ids(sources, settings)
        return [t.generate_ids([s], settings)[0] for s in sources]

    rows = []
    batched_int8: dict[int, float] = {}
    for beams in (int(b) for b in args.beams.split(",")):
        capwatch_run("int8", beams, batched=True)
        batched_int8[beams] = min(timed(lambda b=beams: capwatch_run("int8", b, batched=True))[0]
                                  for _ in range(2)) / len(sources)
        if args.no_transformers:
            t_8, _ = min((timed(lambda b=beams: capwatch_run("int8", b)) for _ in range(2)), key=lambda r: r[0])
            rows.append((beams, float("nan"), float("nan"), t_8 / len(sources), 0, 0, len(sources)))
            continue
        capwatch_run("fp32", beams), capwatch_run("int8", beams), transformers_run(beams)  # warm up
        t_hf, ids_hf = min((timed(lambda b=beams: transformers_run(b)) for _ in range(2)), key=lambda r: r[0])
        t_32, ids_32 = min((timed(lambda b=beams: capwatch_run("fp32", b)) for _ in range(2)), key=lambda r: r[0])
        t_8, ids_8 = min((timed(lambda b=beams: capwatch_run("int8", b)) for _ in range(2)), key=lambda r: r[0])
        n = len(sources)
        same = sum(a == b for a, b in zip(ids_hf, ids_32, strict=True))
        same8 = sum(a == b for a, b in zip(ids_32, ids_8, strict=True))
        rows.append((beams, t_hf / n, t_32 / n, t_8 / n, same, same8, n))
    print(f"Marian opus-mt-en-de size, random weights, {args.captions} captions of 14 source tokens, "
          f"{args.new_tokens} new tokens each, {args.threads} threads (shared, noisy box: ratios matter more than "
          "absolute times)")
    print(f"{'beams':>5} {'transformers':>13} {'capwatch fp32':>14} {'ratio':>6} {'capwatch int8':>14} {'ratio':>6} "
          f"{'fp32 tokens = transformers':>27} {'int8 = fp32':>11}")
    for beams, hf_s, c32, c8, same, same8, n in rows:
        print(f"{beams:>5} {hf_s * 1000:>10.1f} ms {c32 * 1000:>11.1f} ms {hf_s / c32:>5.2f}x {c8 * 1000:>11.1f} ms "
              f"{hf_s / c8:>5.2f}x {same:>19}/{n} {same8:>8}/{n}")
    for beams, seconds in batched_int8.items():
        print(f"capwatch int8, beam {beams}, {args.batch} captions per call (as the pipeline translates a batch): "
              f"{seconds * 1000:.1f} ms per caption")
    if args.florence:
        beams = rows[0][0]
        first = translators["int8"]
        settings = dataclasses.replace(first.settings, num_beams=beams)
        single, batched, int8_s = florence_caption_seconds(
            args.threads, args.florence_images, args.florence_dir,
            lambda i: first.generate_ids([sources[i % len(sources)]], settings))
        print(f"caption itself (capwatch Florence-2-base size, int8, beam 3, 20 tokens): {single * 1000:.0f} ms per "
              f"image one at a time, {batched * 1000:.0f} ms in a batch of {args.florence_images}")
        print(f"one translation (int8, beam {beams}), timed between the captions: {int8_s * 1000:.0f} ms = "
              f"{100 * int8_s / single:.1f} % of the caption one at a time; batched (measured apart): "
              f"{100 * batched_int8[beams] / batched:.1f} % of the batched caption")


if __name__ == "__main__":
    main()
