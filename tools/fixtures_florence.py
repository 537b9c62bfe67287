"""Build the tiny random Florence-2 fixture models and their transformers goldens.

Usage (standalone)::

    python tools/fixtures_florence.py [OUT_DIR]      # default: tests/fixtures/models

``tools/make_fixture_models.py --family florence2`` calls :func:`main` with its output directory.

What it writes, for each fixture directory ``OUT_DIR/florence2-*``:

* ``config.json`` (transformers 4.57 native ``Florence2Config``: tiny DaViT vision tower + tiny BART),
  ``generation_config.json``, ``preprocessor_config.json`` (with the Florence2Processor task prompts, as
  transformers.js reads them), ``tokenizer.json`` / ``tokenizer_config.json`` / ``special_tokens_map.json`` (byte-level
  BPE trained offline here, ``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3, ``<loc_0>``..``<loc_999>`` as added tokens);
* ``onnx/vision_encoder.onnx``, ``onnx/embed_tokens.onnx``, ``onnx/encoder_model.onnx``,
  ``onnx/decoder_model_merged.onnx`` (tensor names as onnx-community/Florence-2-base-ft publishes them) and the
  ``_quantized`` int8 variants (onnxruntime ``quantize_dynamic`` with ``EnableSubgraph``);
* ``goldens_tasks.json`` (<OD>, <OCR>): run ``python tools/florence_task_goldens.py`` after a rebuild;
* ``goldens.json`` + ``goldens/*.png``: transformers' native ``Florence2ForConditionalGeneration.generate()`` token
  ids for several images, greedy and beam search, together with the exact pixel tensors that produced them
  (``goldens/pixels.npy``) so parity can be checked with and without capwatch's own preprocessing.

Only tools/ and bench/ may import torch/transformers; the tests need nothing but onnxruntime.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from optimum.onnx import merge_decoders
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BartConfig,
    CLIPImageProcessor,
    Florence2Config,
    Florence2ForConditionalGeneration,
    GenerationConfig,
)
from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig
from transformers.models.florence2.processing_florence2 import Florence2Processor

REPO = Path(__file__).resolve().parent.parent
OPSET = 17
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Florence-2's captioning tasks; the prompts are read from transformers' own processor at build time (see
#: _task_prompts) so the fixture carries exactly what the reference implementation uses.
CAPTION_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
#: The keyword and text tasks capwatch also runs; their prompts go into the fixture's processor config (as in the real
#: models'), but not into the tokenizer's training corpus (that would change the committed fixture). Their goldens
#: are made by tools/florence_task_goldens.py.
OTHER_TASKS: Mapping[str, str] = MappingProxyType({"<OD>": "description_with_bboxes", "<OCR>": "pure_text"})


#: The smallest sensible DaViT: two stages, one block each, 64x64 input -> 8x8 + 1 = 65 image tokens.
TINY_VISION: Mapping[str, Any] = MappingProxyType({
    "depths": (1, 1),
    "patch_size": (7, 3),
    "patch_stride": (4, 2),
    "patch_padding": (3, 1),
    "patch_prenorm": (False, True),
    "embed_dim": (16, 32),
    "num_heads": (2, 4),
    "num_groups": (2, 4),
    "window_size": 4,
    "max_position_embeddings": 50,
})


class FixtureSpec(NamedTuple):
    """One fixture directory: sizes, seed and generation limits.

    A NamedTuple rather than a dataclass: tools/make_fixture_models.py loads this file by path without registering
    it in sys.modules, which @dataclass cannot cope with.
    """

    name: str
    seed: int
    image_size: int
    d_model: int
    layers: int
    heads: int
    ffn: int
    max_length: int
    bpe_vocab: int
    #: Gain of the variance-preserving re-initialisation of every weight matrix.
    gain: float
    #: Standard deviation of the (untied) LM head: random init makes every logit nearly equal, so widen it.
    head_std: float
    #: Multiplier on the LM head's </s> row so a random model ends some captions before max_length.
    eos_boost: float
    #: Florence2VisionConfig keyword arguments (projection_dim is always d_model).
    vision: Mapping[str, Any] = TINY_VISION
    #: Pad the vocabulary with filler added tokens up to this size (the real models have 51289 + <image>).
    vocab_size: int | None = None
    max_position_embeddings: int = 256




SPECS: tuple[FixtureSpec, ...] = (
    FixtureSpec(name="florence2-tiny", seed=2, image_size=64, d_model=32, layers=2, heads=4, ffn=64,
                max_length=24, bpe_vocab=700, gain=1.0, head_std=0.5, eos_boost=3.5),
)


# ------------------------------------------------------------------------------------------------------------
# Tokenizer


_WORD_TEXT = (
    "a an the of on in with and at near by under over next to front behind two three several some many man woman "
    "child children dog dogs cat cats bird birds car cars bus train boat bicycle street road beach sea ocean "
    "water lake river mountain mountains snow tree trees grass field park city building buildings house room "
    "kitchen table chair bed window door sky cloud clouds sunset sun night light red blue green yellow white "
    "black brown orange small large big old young sitting standing walking running riding playing holding "
    "looking eating lying parked flying swimming wearing shirt hat dress people group person food plate pizza "
    "cake cup bottle phone computer book flowers flower garden wall floor picture photo image shows there is are "
    "this that it close up view"
)
_WORDS = tuple(_WORD_TEXT.split())


def _corpus(seed: int, task_prompts: Sequence[str]) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = list(task_prompts) * 20
    for _ in range(3000):
        n = int(rng.integers(4, 14))
        words = [str(w) for w in rng.choice(_WORDS, size=n)]
        sentence = " ".join(words)
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ",", "!", "?"]))
    return lines


def build_tokenizer(seed: int, bpe_vocab: int, task_prompts: Sequence[str], pad_to: int | None = None) -> Tokenizer:
    """A BART-style byte-level BPE with Florence-2's added tokens (``<loc_N>``, task tags, ``<image>``)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed, task_prompts), trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(
        sep=("</s>", 2), cls=("<s>", 0), trim_offsets=True, add_prefix_space=False
    )
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    # The real Florence-2 vocabulary adds task tags and 1000 location bins after BART's 50265 tokens. They are
    # added here as ordinary (non-special) added tokens, so decoding keeps them and capwatch's post-processing must
    # remove <loc_N> itself, as it must for any model whose tokenizer does not flag them special.
    tags = ["<od>", "</od>", "<ocr>", "</ocr>", "<cap>", "</cap>", "<dcap>", "</dcap>", "<ncap>", "</ncap>",
            "<poly>", "</poly>", "<sep>", "<seg>", "</seg>"]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    tok.add_tokens([AddedToken(f"<loc_{i}>", special=False, normalized=False) for i in range(1000)])
    if pad_to is not None:
        # Filler so that embedding and LM-head sizes match a real model (benchmarks); never produced by BPE.
        missing = pad_to - 2 - tok.get_vocab_size()
        tok.add_tokens([AddedToken(f"<extra_{i}>", special=False, normalized=False) for i in range(missing)])
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok.add_special_tokens([AddedToken("<mask>", special=True, normalized=False, lstrip=True)])
    return tok


def _task_prompts() -> dict[str, str]:
    """Florence2Processor.task_prompts_without_inputs, exactly as transformers defines it."""
    proc = Florence2Processor.__new__(Florence2Processor)
    # __init__ needs a real image processor and tokenizer; only the prompt tables are wanted, so run the part of
    # __init__ that builds them by calling it with stand-ins and catching the first use of the stand-ins.
    class _Stop(Exception):
        pass

    class _ImageProcessor:
        @property
        def image_seq_length(self) -> int:
            raise _Stop

    with contextlib.suppress(_Stop):
        Florence2Processor.__init__(proc, image_processor=_ImageProcessor(), tokenizer=None)
    return dict(proc.task_prompts_without_inputs)


# ------------------------------------------------------------------------------------------------------------
# Model and ONNX export wrappers


def build_model(spec: FixtureSpec, vocab_size: int, image_token_id: int) -> Florence2ForConditionalGeneration:
    torch.manual_seed(spec.seed)
    vision = Florence2VisionConfig(**{"drop_path_rate": 0.1, **spec.vision, "projection_dim": spec.d_model})
    text = BartConfig(
        vocab_size=vocab_size,
        d_model=spec.d_model,
        encoder_layers=spec.layers,
        decoder_layers=spec.layers,
        encoder_attention_heads=spec.heads,
        decoder_attention_heads=spec.heads,
        encoder_ffn_dim=spec.ffn,
        decoder_ffn_dim=spec.ffn,
        max_position_embeddings=spec.max_position_embeddings,
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.1,
        scale_embedding=False,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )
    config = Florence2Config(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=image_token_id,
                             bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                             tie_word_embeddings=False)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = Florence2ForConditionalGeneration(config)
    with torch.no_grad():
        # transformers' init (std 0.02) leaves every sublayer's output tiny next to the post-LN residual, so a
        # random model just repeats its input token whatever the image. Variance-preserving weights make the
        # cross-attention (the image) and the history matter; a wide, untied LM head makes the choice depend on
        # the decoder state, and a stronger </s> row lets some captions end on their own.
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "lm_head" not in name:
                fan_in = param[0].numel()
                std = 1.0 if "embed" in name or "shared" in name else spec.gain / fan_in**0.5
                param.normal_(0.0, std)
        head = model.lm_head.weight
        head.normal_(0.0, spec.head_std)
        head[2].mul_(spec.eos_boost)
    model.eval()
    return model


class VisionWrapper(torch.nn.Module):
    def __init__(self, model: Florence2ForConditionalGeneration) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)


class EmbedWrapper(torch.nn.Module):
    def __init__(self, model: Florence2ForConditionalGeneration) -> None:
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class EncoderWrapper(torch.nn.Module):
    def __init__(self, model: Florence2ForConditionalGeneration) -> None:
        super().__init__()
        self.encoder = model.model.language_model.encoder

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state


class DecoderWrapper(torch.nn.Module):
    """BART decoder step over explicit K/V tensors (transformers' Cache objects do not trace cleanly).

    Written out from the same submodules (so the same weights) as transformers' BartDecoder; the goldens from the
    native generate() are what prove it equivalent.
    """

    def __init__(self, model: Florence2ForConditionalGeneration, with_past: bool) -> None:
        super().__init__()
        self.decoder = model.model.language_model.decoder
        self.lm_head = model.lm_head
        self.with_past = with_past
        cfg = model.config.text_config
        self.heads = cfg.decoder_attention_heads
        self.head_dim = cfg.d_model // cfg.decoder_attention_heads

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
        weights = torch.matmul(q, k.transpose(2, 3)) * scaling + mask
        weights = torch.softmax(weights, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def forward(self, inputs_embeds: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dec = self.decoder
        q_len = inputs_embeds.shape[1]
        past_len = past[0].shape[2] if self.with_past else 0
        positions = torch.arange(q_len, dtype=torch.long) + past_len + dec.embed_positions.offset
        hidden = dec.layernorm_embedding(inputs_embeds + dec.embed_positions.weight[positions])
        neg = torch.finfo(hidden.dtype).min
        enc_mask = encoder_attention_mask[:, None, None, :].to(hidden.dtype)
        cross_mask = (1.0 - enc_mask) * neg
        key_pos = torch.arange(q_len, dtype=torch.long) + past_len
        total = torch.arange(past_len + q_len, dtype=torch.long) if self.with_past else key_pos
        query_pos = key_pos[:, None]
        causal = (total[None, :] > query_pos).to(hidden.dtype) * neg
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(dec.layers):
            sa = layer.self_attn
            residual = hidden
            q = self._split(sa.q_proj(hidden))
            k = self._split(sa.k_proj(hidden))
            v = self._split(sa.v_proj(hidden))
            if self.with_past:
                k = torch.cat([past[4 * i], k], dim=2)
                v = torch.cat([past[4 * i + 1], v], dim=2)
            hidden = sa.out_proj(self._attend(q, k, v, causal, sa.scaling))
            hidden = layer.self_attn_layer_norm(residual + hidden)
            presents += [k, v]

            ca = layer.encoder_attn
            residual = hidden
            q = self._split(ca.q_proj(hidden))
            if self.with_past:
                ck, cv = past[4 * i + 2], past[4 * i + 3]
            else:
                ck = self._split(ca.k_proj(encoder_hidden_states))
                cv = self._split(ca.v_proj(encoder_hidden_states))
                presents += [ck, cv]
            hidden = ca.out_proj(self._attend(q, ck, cv, cross_mask, ca.scaling))
            hidden = layer.encoder_attn_layer_norm(residual + hidden)

            residual = hidden
            hidden = layer.fc2(layer.activation_fn(layer.fc1(hidden)))
            hidden = layer.final_layer_norm(residual + hidden)
        return (self.lm_head(hidden), *presents)


def _export(module: torch.nn.Module, args: tuple[Any, ...], path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> None:
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                      opset_version=OPSET, do_constant_folding=True, dynamo=False)


def export_onnx(model: Florence2ForConditionalGeneration, spec: FixtureSpec, onnx_dir: Path, work: Path) -> None:
    """Write the four fp32 graphs into ``onnx_dir`` under onnx-community's file and tensor names."""
    onnx_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config.text_config
    layers, heads = cfg.decoder_layers, cfg.decoder_attention_heads
    head_dim = cfg.d_model // heads
    b, size = 2, spec.image_size
    with torch.no_grad():
        pixels = torch.randn(b, 3, size, size)
        _export(VisionWrapper(model), (pixels,), onnx_dir / "vision_encoder.onnx", ["pixel_values"],
                ["image_features"], {"pixel_values": {0: "batch_size"}, "image_features": {0: "batch_size"}})
        ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 9, 10, 2]])
        _export(EmbedWrapper(model), (ids,), onnx_dir / "embed_tokens.onnx", ["input_ids"], ["inputs_embeds"],
                {"input_ids": {0: "batch_size", 1: "sequence_length"},
                 "inputs_embeds": {0: "batch_size", 1: "sequence_length"}})
        seq = 9
        embeds = torch.randn(b, seq, cfg.d_model)
        mask = torch.ones(b, seq, dtype=torch.long)
        _export(EncoderWrapper(model), (embeds, mask), onnx_dir / "encoder_model.onnx",
                ["inputs_embeds", "attention_mask"], ["last_hidden_state"],
                {"inputs_embeds": {0: "batch_size", 1: "encoder_sequence_length"},
                 "attention_mask": {0: "batch_size", 1: "encoder_sequence_length"},
                 "last_hidden_state": {0: "batch_size", 1: "encoder_sequence_length"}})

        enc = torch.randn(b, seq, cfg.d_model)
        step = torch.randn(b, 1, cfg.d_model)
        present_names: list[str] = []
        past_names: list[str] = []
        axes: dict[str, dict[int, str]] = {
            "inputs_embeds": {0: "batch_size", 1: "decoder_sequence_length"},
            "encoder_hidden_states": {0: "batch_size", 1: "encoder_sequence_length"},
            "encoder_attention_mask": {0: "batch_size", 1: "encoder_sequence_length"},
            "logits": {0: "batch_size", 1: "decoder_sequence_length"},
        }
        for i in range(layers):
            for kind in ("decoder", "encoder"):
                for kv in ("key", "value"):
                    present_names.append(f"present.{i}.{kind}.{kv}")
                    past_names.append(f"past_key_values.{i}.{kind}.{kv}")
                    if kind == "decoder":
                        axes[f"present.{i}.{kind}.{kv}"] = {0: "batch_size", 2: "past_decoder_sequence_length + 1"}
                        axes[f"past_key_values.{i}.{kind}.{kv}"] = {0: "batch_size", 2: "past_decoder_sequence_length"}
                    else:
                        axes[f"present.{i}.{kind}.{kv}"] = {0: "batch_size", 2: "encoder_sequence_length_out"}
                        axes[f"past_key_values.{i}.{kind}.{kv}"] = {0: "batch_size", 2: "encoder_sequence_length_out"}
        no_past = work / "decoder_model.onnx"
        _export(DecoderWrapper(model, with_past=False), (step, enc, mask), no_past,
                ["inputs_embeds", "encoder_hidden_states", "encoder_attention_mask"], ["logits", *present_names],
                {k: v for k, v in axes.items() if not k.startswith("past_key_values")})
        past = []
        for _ in range(layers):
            past += [torch.randn(b, heads, 3, head_dim), torch.randn(b, heads, 3, head_dim),
                     torch.randn(b, heads, seq, head_dim), torch.randn(b, heads, seq, head_dim)]
        with_past = work / "decoder_with_past_model.onnx"
        past_outputs = [n for n in present_names if ".decoder." in n]
        _export(DecoderWrapper(model, with_past=True), (step, enc, mask, *past), with_past,
                ["inputs_embeds", "encoder_hidden_states", "encoder_attention_mask", *past_names],
                ["logits", *past_outputs],
                {k: v for k, v in axes.items() if not k.startswith("present.") or ".decoder." in k})
    merge_decoders(no_past, with_past, save_path=str(onnx_dir / "decoder_model_merged.onnx"), strict=False)
    # torch.onnx.export put the wrappers back into the training mode they had; the wrappers share submodules
    # with the model, so make sure the model itself is in eval mode again before anything computes goldens.
    model.eval()


def quantize_all(onnx_dir: Path) -> None:
    """int8 variants as the published ones were made: dynamic, per-channel, reduce_range, EnableSubgraph."""
    plan = {
        "vision_encoder": QuantType.QUInt8,  # has Conv
        "embed_tokens": QuantType.QInt8,
        "encoder_model": QuantType.QInt8,
        "decoder_model_merged": QuantType.QInt8,
    }
    for name, weight_type in plan.items():
        quantize_dynamic(onnx_dir / f"{name}.onnx", onnx_dir / f"{name}_quantized.onnx", per_channel=True,
                         reduce_range=True, weight_type=weight_type, extra_options={"EnableSubgraph": True})


# ------------------------------------------------------------------------------------------------------------
# Images, configs, goldens


def golden_images(size: int) -> dict[str, Image.Image]:
    """Smooth or flat images (preprocessing differences at pixel level cannot flip a token)."""
    ys, xs = np.mgrid[0:61, 0:83].astype(np.float32)
    grad = np.stack([xs / 82 * 255, ys / 60 * 255, np.full_like(xs, 128)], axis=-1)
    wave = np.stack([127 + 120 * np.sin(xs / 9), 127 + 120 * np.cos(ys / 7), 127 + 100 * np.sin((xs + ys) / 13)], -1)
    ys2, xs2 = np.mgrid[0:90, 0:50].astype(np.float32)
    radial = np.sqrt((xs2 - 25) ** 2 + (ys2 - 45) ** 2)
    disc = np.stack([255 - radial * 4, 80 + radial * 2, np.full_like(radial, 40)], -1)
    return {
        "red": Image.new("RGB", (size, size), (220, 30, 30)),
        "blue_wide": Image.new("RGB", (size * 2, size), (20, 60, 200)),
        "gradient": Image.fromarray(np.clip(grad, 0, 255).astype(np.uint8)),
        "waves": Image.fromarray(np.clip(wave, 0, 255).astype(np.uint8)),
        "disc_tall": Image.fromarray(np.clip(disc, 0, 255).astype(np.uint8)),
        "dark": Image.new("RGB", (size, size), (12, 10, 14)),
    }


def preprocessor_config(size: int, prompts: dict[str, str], image_seq_length: int) -> dict[str, Any]:
    return {
        "processor_class": "Florence2Processor",
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,
        "do_center_crop": False,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
        "image_seq_length": image_seq_length,
        "tasks_answer_post_processing_type": {t: OTHER_TASKS.get(t, "pure_text") for t in prompts},
        "task_prompts_without_inputs": prompts,
    }


def generation_config(spec: FixtureSpec) -> dict[str, Any]:
    return {
        "bos_token_id": 0,
        "decoder_start_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "forced_bos_token_id": 0,
        "forced_eos_token_id": 2,
        "no_repeat_ngram_size": 3,
        "num_beams": 3,
        "early_stopping": True,
        "max_length": spec.max_length,
    }


def compute_goldens(model: Florence2ForConditionalGeneration, tok: Tokenizer, spec: FixtureSpec,
                    prompts: dict[str, str], out: Path) -> dict[str, Any]:
    """Run transformers' own generate() (greedy and beam) on every golden image and task prompt."""
    image_processor = CLIPImageProcessor(**{k: v for k, v in preprocessor_config(spec.image_size, {}, 0).items()
                                            if k not in ("processor_class", "image_processor_type",
                                                         "tasks_answer_post_processing_type",
                                                         "task_prompts_without_inputs", "image_seq_length")})
    images = golden_images(spec.image_size)
    gdir = out / "goldens"
    gdir.mkdir(parents=True, exist_ok=True)
    names = sorted(images)
    for name in names:
        images[name].save(gdir / f"{name}.png")
    # Reload from the PNG files exactly as a test will see them.
    pixels = image_processor([Image.open(gdir / f"{n}.png").convert("RGB") for n in names],
                             return_tensors="np")["pixel_values"].astype(np.float32)
    np.save(gdir / "pixels.npy", pixels)
    assert not model.training
    with torch.no_grad():
        n_img = model.get_image_features(torch.from_numpy(pixels[:1])).shape[1]
    gen = GenerationConfig(**generation_config(spec))
    result: dict[str, Any] = {"images": names, "pixels": "goldens/pixels.npy", "image_tokens": n_img, "tasks": {}}
    for task in CAPTION_TASKS:
        prompt_ids = tok.encode(prompts[task]).ids  # <s> prompt </s>
        input_ids = torch.tensor([[model.config.image_token_id] * n_img + prompt_ids] * len(names))
        entry: dict[str, Any] = {"prompt": prompts[task], "prompt_ids": prompt_ids}
        for mode, beams in (("greedy", 1), ("beam", 3)):
            with torch.no_grad():
                seqs = model.generate(input_ids=input_ids, pixel_values=torch.from_numpy(pixels),
                                      attention_mask=torch.ones_like(input_ids), generation_config=gen,
                                      num_beams=beams)
            rows = []
            for row in seqs.tolist():
                # generate() pads finished rows of a batch; cut at the first EOS after the decoder start.
                cut = row[: row.index(2, 1) + 1] if 2 in row[1:] else row
                rows.append(cut)
            entry[mode] = rows
            # One-at-a-time must agree with the batch (the reference itself is batch-invariant here).
            for i in (0, len(names) - 1):
                with torch.no_grad():
                    one = input_ids[i : i + 1]
                    single = model.generate(input_ids=one, pixel_values=torch.from_numpy(pixels[i : i + 1]),
                                            attention_mask=torch.ones_like(one), generation_config=gen,
                                            num_beams=beams)[0].tolist()
                assert single == rows[i], (task, mode, i, single, rows[i])
        entry["text_greedy"] = [tok.decode(r, skip_special_tokens=False) for r in entry["greedy"]]
        result["tasks"][task] = entry
    return result


def _describe(goldens: dict[str, Any], max_length: int) -> str:
    lines = []
    for task, entry in goldens["tasks"].items():
        for mode in ("greedy", "beam"):
            rows = entry[mode]
            early = sum(1 for r in rows if len(r) < max_length)
            distinct = len({tuple(r) for r in rows})
            lines.append(f"{task:24s} {mode:6s} lengths={[len(r) for r in rows]} early_eos={early} distinct={distinct}")
        diff = sum(1 for g, b in zip(entry["greedy"], entry["beam"], strict=True) if g != b)
        lines.append(f"{task:24s} greedy!=beam rows: {diff}")
    return "\n".join(lines)


def build_fixture(spec: FixtureSpec, out_root: Path) -> Path:
    """Build one fixture directory (with goldens) under ``out_root``; returns its path.

    Fails (SystemExit) when capwatch's own engine does not reproduce the goldens from the exported graphs.
    """
    path = build_model_dir(spec, out_root, goldens=True)[0]
    check_with_capwatch(path)
    return path


def check_with_capwatch(model_dir: Path) -> None:
    """Run capwatch's Florence2Captioner (fp32) on the golden pixels; exit if any token differs."""
    sys.path.insert(0, str(REPO))
    from capwatch.config import ModelConfig
    from capwatch.models.captioner import open_captioner
    from capwatch.models.florence2 import TASK_FOR_LENGTH

    table = json.loads((model_dir / "goldens.json").read_text())
    pixels = np.load(model_dir / table["pixels"])
    for length, task in TASK_FOR_LENGTH.items():
        for mode, beams in (("greedy", 1), ("beam", 3)):
            config = ModelConfig(precision="fp32", threads=1, num_beams=beams, caption_length=length)
            with open_captioner(model_dir, config) as captioner:
                got = [list(r.token_ids) for r in captioner.caption_pixels(pixels)]
            if got != table["tasks"][task][mode]:
                raise SystemExit(f"{model_dir.name} {task} {mode}: capwatch disagrees with transformers")


def build_model_dir(spec: FixtureSpec, out_root: Path, *, goldens: bool
                    ) -> tuple[Path, Florence2ForConditionalGeneration, Tokenizer]:
    """Build ``out_root/spec.name`` (configs, tokenizer, fp32 + int8 graphs, optionally goldens).

    Returns the directory, the torch model it was exported from (in eval mode) and the tokenizer.
    """
    prompts = _task_prompts()
    caption_prompts = {t: prompts[t] for t in CAPTION_TASKS}
    tok = build_tokenizer(spec.seed, spec.bpe_vocab, list(caption_prompts.values()), spec.vocab_size)
    image_token_id = tok.token_to_id("<image>")
    model = build_model(spec, tok.get_vocab_size(), image_token_id)
    final = out_root / spec.name
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stage = work / spec.name
        stage.mkdir()
        export_onnx(model, spec, stage / "onnx", work)
        quantize_all(stage / "onnx")
        for leftover in (stage / "onnx").glob("*-opt.onnx"):
            leftover.unlink()
        with torch.no_grad():
            n_img = model.get_image_features(torch.zeros(1, 3, spec.image_size, spec.image_size)).shape[1]
        model.config.save_pretrained(stage)  # config.json
        (stage / "generation_config.json").write_text(json.dumps(generation_config(spec), indent=2) + "\n")
        (stage / "preprocessor_config.json").write_text(
            json.dumps(preprocessor_config(spec.image_size, {**caption_prompts, **{t: prompts[t] for t in OTHER_TASKS}},
                                           n_img), indent=2) + "\n")
        tok.save(str(stage / "tokenizer.json"))
        (stage / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "BartTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
            "unk_token": "<unk>", "sep_token": "</s>", "cls_token": "<s>", "mask_token": "<mask>",
            "add_prefix_space": False, "model_max_length": 1024, "clean_up_tokenization_spaces": False,
        }, indent=2) + "\n")
        (stage / "special_tokens_map.json").write_text(json.dumps({
            "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        }, indent=2) + "\n")
        if goldens:
            table = compute_goldens(model, tok, spec, caption_prompts, stage)
            (stage / "goldens.json").write_text(json.dumps(table, indent=1) + "\n")
            print(_describe(table, spec.max_length))
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(stage, final)
    # Sanity: every graph is a valid model (by path: the large ones may not fit a single protobuf in memory).
    for path in sorted((final / "onnx").glob("*.onnx")):
        onnx.checker.check_model(str(path))
    model.eval()
    return final, model, tok


def main(out_dir: Path) -> list[Path]:
    """Build every Florence-2 fixture under ``out_dir`` (e.g. tests/fixtures/models); returns the directories."""
    return [build_fixture(spec, Path(out_dir)) for spec in SPECS]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=REPO / "tests" / "fixtures" / "models")
    ns = parser.parse_args()
    torch.set_num_threads(1)
    for built in main(ns.out_dir):
        print(built, sum(p.stat().st_size for p in built.rglob("*") if p.is_file()) // 1024, "KiB", file=sys.stderr)
