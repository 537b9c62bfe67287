"""Build the tiny image–text embedding fixtures (CLIP, SigLIP, SigLIP 2 style) and transformers' own goldens.

Needs the ``export`` extra (torch, transformers, onnx). Run from the repository root::

    python tools/make_embed_fixtures.py

For every fixture this writes ``tests/fixtures/models/<name>/`` in the transformers.js layout — ``config.json``,
``preprocessor_config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
``onnx/vision_model{,_quantized}.onnx`` and ``onnx/text_model{,_quantized}.onnx`` with the tensor names
transformers.js's conversion exports:

* CLIP: ``text_model``: ``input_ids`` + ``attention_mask`` -> ``text_embeds`` (the projection of the pooled output,
  i.e. ``get_text_features``), ``last_hidden_state``; ``vision_model``: ``pixel_values`` -> ``image_embeds``
  (``get_image_features``), ``last_hidden_state``.
* SigLIP: ``text_model``: ``input_ids`` -> ``last_hidden_state``, ``pooler_output`` (``get_text_features``);
  ``vision_model``: ``pixel_values`` -> ``last_hidden_state``, ``pooler_output`` (``get_image_features``).

and ``goldens.json`` (+ ``goldens_pixels.npz``): for several texts (empty, long enough to be truncated, non-ASCII,
odd whitespace) the input ids transformers' tokenizer gives and ``get_text_features``; for every image in
``tests/fixtures/images`` and ``tests/fixtures/photos`` (odd sizes, grey, alpha, EXIF-rotated) the pixel tensor
transformers' slow image processor makes from the decoded image and ``get_image_features`` of it. Tests then need
only onnxruntime.

The fixtures differ where real checkpoints differ: CLIP with a crop smaller than the resize (shortest edge 36, crop
32, bicubic) and the legacy ``eos_token_id = 2`` pooling (argmax of the ids, EOS the largest id), CLIP with the
modern pooling (first EOS), padding with ``!`` as LAION's exports do and a short text window (20); SigLIP with a
Unigram tokenizer that appends ``</s>``, punctuation stripped and lower-cased text as ``SiglipTokenizer`` does,
fixed-size bicubic resize; SigLIP 2 with a Gemma-style byte-fallback BPE whose ``tokenizer_config.json`` asks for
no BOS but an EOS (transformers' ``GemmaTokenizerFast`` rebuilds the post-processor from those flags), bilinear
resize.

The trap from design.md applies: ``torch.onnx.export`` restores the *wrapper's* training mode, which puts the shared
submodules of the model back into train mode; ``model.eval()`` is called again before any golden is computed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import string
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "fixtures" / "models"
IMAGE_DIRS = (ROOT / "tests" / "fixtures" / "images", ROOT / "tests" / "fixtures" / "photos")
OPSET = 17

CORPUS = [
    "a dog running on the beach", "a cat sitting on a red sofa", "two people riding bikes in the park",
    "a plate of food on a wooden table", "a bus parked next to a building", "a man holding a surfboard",
    "a bird standing on a branch", "a train on the tracks near a station", "a group of sheep in a green field",
    "a woman with an umbrella in the rain", "a bowl of fruit with apples and bananas", "snow on the mountains",
    "a boat on a calm lake at sunset", "children playing football on the grass", "a kitchen with white cabinets",
    "ein Hund läuft am Strand", "eine Katze auf dem Sofa", "un chat sur le canapé", "un perro en la playa",
    "Photo of a beach, at sunset!", "It's a dog's life (really).",
]

#: Texts whose features the goldens hold: short, empty, punctuation and case, non-ASCII, emoji, odd whitespace,
#: and one far longer than any fixture's text window (truncation).
TEXTS = [
    "a dog running on the beach",
    "",
    "A Cat, sitting on a RED sofa!!",
    "Ein Hund läuft am Strand — 海辺の犬 🐕",
    "  snow\ton the\n\nmountains  ",
    " ".join(["a boat on a calm lake at sunset with children playing football on the grass"] * 8),
]


@dataclass(frozen=True)
class Fixture:
    name: str
    family: str  # "clip" | "siglip"
    tokenizer: str  # "clip" | "unigram" | "gemma"
    image_size: int
    patch_size: int
    preprocessor: dict[str, Any]
    max_positions: int
    #: CLIP: text_config.eos_token_id = 2 (argmax pooling, as openai's checkpoints) instead of the real EOS id.
    legacy_eos: bool = False
    pad_token: str = "<|endoftext|>"
    seed: int = 0


OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]

FIXTURES = (
    Fixture("clip-tiny", "clip", "clip", 32, 8, {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 36},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": OPENAI_MEAN, "image_std": OPENAI_STD,
        "do_convert_rgb": True}, max_positions=77, legacy_eos=True, seed=1),
    Fixture("clip-tiny-b", "clip", "clip", 24, 6, {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 24},
        "resample": 2, "do_center_crop": True, "crop_size": {"height": 24, "width": 24}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": OPENAI_MEAN, "image_std": OPENAI_STD,
        "do_convert_rgb": True}, max_positions=20, legacy_eos=False, pad_token="!", seed=2),
    Fixture("siglip-tiny", "siglip", "unigram", 32, 8, {
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, max_positions=16, pad_token="</s>", seed=3),
    Fixture("siglip2-tiny", "siglip", "gemma", 28, 7, {
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 28, "width": 28},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, max_positions=24, pad_token="<pad>", seed=4),
)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers (trained here, offline, in the shape of the real ones)

CLIP_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                r"[^\s\p{L}\p{N}]+")


def clip_tokenizer(pad_token: str) -> tuple[Any, dict[str, Any]]:
    """A byte-level BPE with CLIP's normaliser, split pattern, ``</w>`` suffix and BOS/EOS as the largest ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])  # appended: the largest ids, as in CLIP
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.RobertaProcessing(sep=("<|endoftext|>", eos), cls=("<|startoftext|>", bos),
                                                      trim_offsets=False, add_prefix_space=False)
    config = {"tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": pad_token, "do_lower_case": True}
    return tok, config


def unigram_tokenizer() -> tuple[Any, dict[str, Any]]:
    """A SentencePiece-style Unigram (Metaspace) tokenizer appending ``</s>``, as SigLIP's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=180, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator([t.lower() for t in CORPUS] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    config = {"tokenizer_class": "SiglipTokenizer", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
              "do_lower_case": True, "model_max_length": 64}
    return tok, config


def gemma_tokenizer() -> tuple[Any, dict[str, Any]]:
    """A Gemma-style BPE (``▁`` for spaces, byte fallback ``<0xNN>``) whose tokenizer.json adds ``<bos>``, while
    tokenizer_config.json asks for no BOS and an EOS (so the post-processor must come from the config)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=260, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):  # byte-fallback pieces, as in Gemma's vocabulary
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    data["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    config = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
              "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": True, "model_max_length": 64}
    return tok, config


def make_tokenizer(fixture: Fixture, out: Path) -> tuple[Any, dict[str, Any]]:
    if fixture.tokenizer == "clip":
        tok, config = clip_tokenizer(fixture.pad_token)
    elif fixture.tokenizer == "unigram":
        tok, config = unigram_tokenizer()
    else:
        tok, config = gemma_tokenizer()
    config.setdefault("model_max_length", fixture.max_positions)
    config = {**config, "clean_up_tokenization_spaces": False}
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {k: v for k, v in config.items() if k.endswith("_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return tok, config


def siglip_canonical(text: str) -> str:
    """What transformers' slow SiglipTokenizer does to a text before SentencePiece: lower-case (do_lower_case),
    punctuation removed, whitespace runs collapsed, stripped (tokenization_siglip.canonicalize_text)."""
    import re

    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def reference_tokenizer(fixture: Fixture, out: Path, config: dict[str, Any]) -> Any:
    """transformers' tokenizer for the fixture, loaded from its folder as a user would."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if fixture.tokenizer == "unigram":
        # SiglipTokenizer is SentencePiece-only (no tokenizer.json): the fast tokenizer on tokenizer.json, with the
        # slow tokenizer's text canonicalisation applied by the caller.
        return PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"),
                                       **{k: v for k, v in config.items() if k.endswith("_token")},
                                       model_max_length=config["model_max_length"])
    return AutoTokenizer.from_pretrained(str(out))


def tokenize_reference(fixture: Fixture, tokenizer: Any, text: str) -> dict[str, list[int]]:
    max_length = min(fixture.max_positions, int(tokenizer.model_max_length))
    if fixture.family == "clip":
        enc = tokenizer([text], padding=True, truncation=True, max_length=max_length)
    else:
        source = siglip_canonical(text) if fixture.tokenizer == "unigram" else text
        enc = tokenizer([source], padding="max_length", truncation=True, max_length=max_length)
    return {"input_ids": list(enc["input_ids"][0]), "attention_mask": list(enc["attention_mask"][0])}


# ----------------------------------------------------------------------------------------------------------------
# Models


def build_model(fixture: Fixture, tok: Any, config: dict[str, Any]) -> Any:
    import torch
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    torch.manual_seed(fixture.seed)
    vocab = tok.get_vocab_size()
    ids = {k: tok.token_to_id(config[k]) for k in ("bos_token", "eos_token", "pad_token") if k in config}
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision = {**common, "image_size": fixture.image_size, "patch_size": fixture.patch_size}
    if fixture.family == "clip":
        text = {**common, "vocab_size": vocab, "max_position_embeddings": fixture.max_positions,
                "bos_token_id": ids["bos_token"], "pad_token_id": ids["pad_token"],
                "eos_token_id": 2 if fixture.legacy_eos else ids["eos_token"]}
        cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, initializer_factor=4.0)
        model = CLIPModel._from_config(cfg, attn_implementation="eager")
    else:
        text = {**common, "vocab_size": vocab, "max_position_embeddings": fixture.max_positions,
                "pad_token_id": ids["pad_token"], "eos_token_id": ids["eos_token"]}
        if "bos_token" in ids:
            text["bos_token_id"] = ids["bos_token"]
        cfg = SiglipConfig(text_config=text, vision_config=vision)
        model = SiglipModel._from_config(cfg, attn_implementation="eager")
        # SigLIP's default init leaves tiny random towers nearly constant; widen it so inputs are told apart.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() >= 2 and "embedding" not in name:
                    param.normal_(0.0, 0.2)
    model.eval()
    return model


def export_onnx(model: Any, fixture: Fixture, onnx_dir: Path) -> None:
    import torch

    onnx_dir.mkdir(parents=True, exist_ok=True)
    side = fixture.image_size
    pixels = torch.randn(2, 3, side, side)
    input_ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)

    if fixture.family == "clip":
        class Text(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                out = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
                return self.model.text_projection(out.pooler_output), out.last_hidden_state

        class Vision(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, pixel_values: Any) -> Any:
                out = self.model.vision_model(pixel_values=pixel_values)
                return self.model.visual_projection(out.pooler_output), out.last_hidden_state

        text_io = (("input_ids", "attention_mask"), ("text_embeds", "last_hidden_state"), (input_ids, mask))
        vision_io = (("pixel_values",), ("image_embeds", "last_hidden_state"), (pixels,))
    else:
        class Text(torch.nn.Module):  # type: ignore[no-redef]
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any) -> Any:
                out = self.model.text_model(input_ids=input_ids)
                return out.last_hidden_state, out.pooler_output

        class Vision(torch.nn.Module):  # type: ignore[no-redef]
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, pixel_values: Any) -> Any:
                out = self.model.vision_model(pixel_values=pixel_values)
                return out.last_hidden_state, out.pooler_output

        text_io = (("input_ids",), ("last_hidden_state", "pooler_output"), (input_ids,))
        vision_io = (("pixel_values",), ("last_hidden_state", "pooler_output"), (pixels,))

    for stem, module, (inputs, outputs, args) in (("text_model", Text(), text_io),
                                                  ("vision_model", Vision(), vision_io)):
        axes: dict[str, dict[int, str]] = {}
        for name in inputs:
            axes[name] = {0: "batch_size"} if name == "pixel_values" else {0: "batch_size", 1: "sequence_length"}
        for name in outputs:
            axes[name] = {0: "batch_size", 1: "sequence_length"} if name == "last_hidden_state" else {0: "batch_size"}
        module.eval()
        with torch.no_grad():
            torch.onnx.export(module, args, str(onnx_dir / f"{stem}.onnx"), input_names=list(inputs),
                              output_names=list(outputs), dynamic_axes=axes, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
    model.eval()  # the trap: export restored the wrappers' (and so the shared submodules') training mode


def quantize(onnx_dir: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # As the published int8 variants: QUInt8 for graphs with Conv (the patch embedding), QInt8 for text.
    for stem, weight_type in (("vision_model", QuantType.QUInt8), ("text_model", QuantType.QInt8)):
        quantize_dynamic(onnx_dir / f"{stem}.onnx", onnx_dir / f"{stem}_quantized.onnx", per_channel=True,
                         reduce_range=True, weight_type=weight_type)


# ----------------------------------------------------------------------------------------------------------------
# Goldens


def decoded(path: Path) -> Image.Image:
    """What capwatch.models.preprocess.load_image gives for these small files: first frame, EXIF orientation, RGB."""
    with Image.open(path) as img:
        img.seek(0)
        img.load()
        return ImageOps.exif_transpose(img).convert("RGB")


def image_processor(fixture: Fixture, out: Path) -> Any:
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    cls = CLIPImageProcessor if fixture.family == "clip" else SiglipImageProcessor
    return cls.from_pretrained(str(out))  # the slow (PIL) processor: transformers' reference implementation


def goldens(model: Any, fixture: Fixture, out: Path, tokenizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    processor = image_processor(fixture, out)
    images = sorted(p for d in IMAGE_DIRS for p in d.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    pixels: dict[str, np.ndarray] = {}
    image_features = []
    for path in images:
        batch = processor(images=decoded(path), return_tensors="np")["pixel_values"].astype(np.float32)
        pixels[path.name] = batch[0]
        with torch.no_grad():
            image_features.append(model.get_image_features(pixel_values=torch.from_numpy(batch))[0].tolist())
    text_rows = []
    for text in TEXTS:
        enc = tokenize_reference(fixture, tokenizer, text)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            if fixture.family == "clip":
                feats = model.get_text_features(input_ids=ids, attention_mask=torch.tensor([enc["attention_mask"]]))
            else:
                feats = model.get_text_features(input_ids=ids)
        text_rows.append({"text": text, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                          "features": feats[0].tolist()})
    data = {
        "family": fixture.family,
        "note": "transformers get_text_features / get_image_features (fp32) of these texts and of the pixel tensors "
                "in goldens_pixels.npz, made by the slow image processor from the EXIF-oriented RGB image",
        "texts": text_rows,
        "images": [{"file": str(p.relative_to(ROOT)), "features": f}
                   for p, f in zip(images, image_features, strict=True)],
    }
    return data, pixels


def check_onnx(fixture: Fixture, out: Path, data: dict[str, Any], pixels: dict[str, np.ndarray]) -> float:
    """Largest |difference| between onnxruntime on the exported fp32 graphs and transformers' features."""
    import onnxruntime as ort

    text = ort.InferenceSession(str(out / "onnx" / "text_model.onnx"))
    vision = ort.InferenceSession(str(out / "onnx" / "vision_model.onnx"))
    worst = 0.0
    text_out = "text_embeds" if fixture.family == "clip" else "pooler_output"
    image_out = "image_embeds" if fixture.family == "clip" else "pooler_output"
    for row in data["texts"]:
        feeds = {"input_ids": np.array([row["input_ids"]], dtype=np.int64)}
        if fixture.family == "clip":
            feeds["attention_mask"] = np.array([row["attention_mask"]], dtype=np.int64)
        got = text.run([text_out], feeds)[0][0]
        worst = max(worst, float(np.abs(got - np.array(row["features"])).max()))
    for item in data["images"]:
        got = vision.run([image_out], {"pixel_values": pixels[Path(item["file"]).name][None]})[0][0]
        worst = max(worst, float(np.abs(got - np.array(item["features"])).max()))
    return worst


def spread(data: dict[str, Any]) -> tuple[float, float]:
    """Smallest and largest cosine between the golden text and image features (a constant model would give ~1)."""
    t = np.array([r["features"] for r in data["texts"]])
    i = np.array([r["features"] for r in data["images"]])
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    i /= np.linalg.norm(i, axis=1, keepdims=True)
    cos = t @ i.T
    return float(cos.min()), float(cos.max())


def build(fixture: Fixture) -> None:
    out = MODELS / fixture.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok, tok_config = make_tokenizer(fixture, out)
    model = build_model(fixture, tok, tok_config)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        config = json.loads((Path(tmp) / "config.json").read_text())
    config.pop("transformers_version", None)
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor = "CLIPProcessor" if fixture.family == "clip" else "SiglipProcessor"
    prep = {**fixture.preprocessor, "processor_class": processor}
    (out / "preprocessor_config.json").write_text(json.dumps(prep, indent=2) + "\n")
    export_onnx(model, fixture, out / "onnx")
    quantize(out / "onnx")
    tokenizer = reference_tokenizer(fixture, out, tok_config)
    data, pixels = goldens(model, fixture, out, tokenizer)
    (out / "goldens.json").write_text(json.dumps(data) + "\n")
    np.savez_compressed(out / "goldens_pixels.npz", **pixels)
    worst = check_onnx(fixture, out, data, pixels)
    low, high = spread(data)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{fixture.name}: onnx vs torch max |diff| {worst:.2e}; cosine text-image {low:+.3f}..{high:+.3f}; "
          f"{size / 1e6:.2f} MB")
    if worst > 1e-4:
        raise SystemExit(f"{fixture.name}: the ONNX export differs from transformers by {worst}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="fixtures to build (default: all)")
    args = parser.parse_args(argv)
    chosen = [f for f in FIXTURES if not args.names or f.name in args.names]
    for fixture in chosen:
        build(fixture)
    return 0


if __name__ == "__main__":
    sys.exit(main())
