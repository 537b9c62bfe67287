"""Florence-2 family (onnx-community/Florence-2-base-ft, -large-ft): four ONNX graphs on the shared engine.

Pipeline for a batch of images and one task prompt (the caption length):

1. ``vision_encoder``: ``pixel_values`` [b,3,H,W] -> ``image_features`` [b,N,d] (N = 577 for 768x768 input);
2. ``embed_tokens``: the prompt ids (``<s> What does the image describe? </s>``) -> ``inputs_embeds`` [1,L,d];
3. ``encoder_model``: ``inputs_embeds`` = concat(image features, prompt embeddings) [b,N+L,d] with an all-ones
   ``attention_mask`` -> ``last_hidden_state``. This is what transformers' native Florence2 does too: its processor
   puts N ``<image>`` placeholders before ``<s> prompt </s>`` and the model scatters the image features into them;
4. ``decoder_model_merged``, one token per step through :func:`capwatch.models.generate.generate`: the token is
   embedded with ``embed_tokens`` and fed as ``inputs_embeds``; the self-attention cache grows by one position per
   step; the cross-attention K/V come back only from the first (uncached) step -- on the cached branch the
   ``present.*.encoder.*`` outputs are empty -- so they are kept from step 0.

Decoded text is post-processed into a clean sentence: ``<s>``, ``</s>``, ``<pad>`` and ``<loc_N>`` removed,
whitespace collapsed, no space before punctuation, first letter capitalised.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from capwatch.config import CaptionLength
from capwatch.errors import ModelError
from capwatch.models.generate import DecoderState, GenerationSettings, generate

#: The task token for each caption length (ModelConfig.caption_length).
TASK_FOR_LENGTH: Mapping[CaptionLength, str] = {
    "short": "<CAPTION>",
    "detailed": "<DETAILED_CAPTION>",
    "paragraph": "<MORE_DETAILED_CAPTION>",
}

#: Florence2Processor.task_prompts_without_inputs for the captioning tasks, as in transformers 4.57
#: (models/florence2/processing_florence2.py) and in the remote-code processor the model repositories ship.
#: Used when the model directory's processor config does not carry the table itself.
DEFAULT_TASK_PROMPTS: Mapping[str, str] = {
    "<CAPTION>": "What does the image describe?",
    "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
}

#: Config files that may carry the prompt table: transformers.js reads it from the image processor's config
#: (preprocessor_config.json); transformers' native processor saves its settings in processor_config.json.
_PROMPT_SOURCES = ("processor_config.json", "preprocessor_config.json")

_REMOVE_RE = re.compile(r"</?s>|<pad>|<loc_\d+>")
_SPACE_RE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([.,;:!?])")


def task_prompt(model_dir: Path, caption_length: CaptionLength) -> str:
    """Return the prompt text for ``caption_length``, from the model's processor config when it has one.

    Raises ModelError when a processor config exists but is not valid JSON.
    """
    task = TASK_FOR_LENGTH[caption_length]
    for name in _PROMPT_SOURCES:
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: cannot read processor config: {exc}") from None
        table = data.get("task_prompts_without_inputs") if isinstance(data, dict) else None
        if isinstance(table, dict) and isinstance(table.get(task), str) and table[task].strip():
            return str(table[task])
    return DEFAULT_TASK_PROMPTS[task]


def clean_caption(text: str) -> str:
    """Return decoded Florence-2 output as a clean sentence.

    Removes ``<s>``, ``</s>``, ``<pad>`` and location tokens ``<loc_N>``, collapses whitespace, drops spaces
    before punctuation, trims, and capitalises the first letter. Returns "" when nothing is left.
    """
    text = _REMOVE_RE.sub(" ", text)
    text = _SPACE_RE.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text).strip()
    if text and text[0].islower():
        text = text[0].upper() + text[1:]
    return text


# ------------------------------------------------------------------------------------------------------------
# Graph plumbing


@dataclass(frozen=True)
class DecoderShape:
    """What the merged decoder's cache inputs look like: layer count, heads, head size, dtypes."""

    layers: int
    heads: int
    head_dim: int
    float_dtype: type[np.floating[Any]] = np.float32
    mask_dtype: type[np.integer[Any]] = np.int64

    @classmethod
    def from_session(cls, session: Any, text_config: Mapping[str, Any]) -> DecoderShape:
        """Read the layout from the session's inputs, falling back to ``text_config`` for symbolic dims.

        Raises ModelError when the graph is not a Florence-2 merged decoder.
        """
        inputs = {i.name: i for i in session.get_inputs()}
        required = {"inputs_embeds", "encoder_hidden_states", "encoder_attention_mask", "use_cache_branch"}
        missing = sorted(required - set(inputs))
        if missing:
            raise ModelError(f"decoder_model_merged lacks the Florence-2 input {missing[0]!r}")
        layers = 0
        while f"past_key_values.{layers}.decoder.key" in inputs:
            layers += 1
        if layers == 0:
            raise ModelError("decoder_model_merged has no past_key_values.N.decoder.key inputs")
        shape = inputs["past_key_values.0.decoder.key"].shape
        d_model = text_config.get("d_model")
        heads = shape[1] if isinstance(shape[1], int) else text_config.get("decoder_attention_heads")
        head_dim = shape[3] if isinstance(shape[3], int) else None
        if head_dim is None and isinstance(d_model, int) and isinstance(heads, int) and heads:
            head_dim = d_model // heads
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            raise ModelError("cannot tell the decoder's attention heads from the graph or config.json")
        float_dtype = np.float16 if inputs["inputs_embeds"].type == "tensor(float16)" else np.float32
        mask_type = inputs["encoder_attention_mask"].type
        mask_dtype: type[np.integer[Any]] = np.int32 if mask_type == "tensor(int32)" else np.int64
        return cls(layers=layers, heads=heads, head_dim=head_dim, float_dtype=float_dtype, mask_dtype=mask_dtype)


@dataclass(frozen=True)
class EncodedBatch:
    """Encoder output for b images: ``hidden`` [b,S,d] and its ``mask`` [b,S]."""

    hidden: np.ndarray
    mask: np.ndarray


@dataclass
class _DecoderState:
    """Rows of an ongoing generation (mutable only inside Florence2Decoder; every step returns a new one)."""

    row_items: np.ndarray  # encoder item of each row
    hidden: np.ndarray  # [rows,S,d] encoder states, per row
    mask: np.ndarray  # [rows,S]
    self_kv: list[np.ndarray] = field(default_factory=list)  # per layer: key, value [rows,h,t,hd]
    cross_kv: list[np.ndarray] = field(default_factory=list)  # per layer: key, value [rows,h,S,hd]; [] before step 0


class Florence2Decoder:
    """The merged decoder as a :class:`capwatch.models.generate.Decoder` over numpy arrays."""

    def __init__(self, decoder: Any, embed: Any, shape: DecoderShape) -> None:
        self._decoder = decoder
        self._embed = embed
        self._shape = shape
        self._past_names = [
            (f"past_key_values.{i}.decoder.key", f"past_key_values.{i}.decoder.value",
             f"past_key_values.{i}.encoder.key", f"past_key_values.{i}.encoder.value")
            for i in range(shape.layers)
        ]
        self._outputs = ["logits"]
        for i in range(shape.layers):
            self._outputs += [f"present.{i}.decoder.key", f"present.{i}.decoder.value",
                              f"present.{i}.encoder.key", f"present.{i}.encoder.value"]

    def start(self, encoder_batch: Any, expand: int) -> DecoderState:
        """Return the state with each encoded image (an EncodedBatch) repeated ``expand`` times (beams)."""
        assert isinstance(encoder_batch, EncodedBatch)
        items = np.repeat(np.arange(encoder_batch.hidden.shape[0]), expand)
        return _DecoderState(row_items=items, hidden=encoder_batch.hidden[items], mask=encoder_batch.mask[items])

    def step(self, state: DecoderState, input_ids: np.ndarray) -> tuple[np.ndarray, DecoderState]:
        """Run one token per row; returns logits [rows,vocab] and the state with the caches advanced."""
        state = cast(_DecoderState, state)
        rows = input_ids.shape[0]
        embeds = self._embed.run(["inputs_embeds"], {"input_ids": input_ids.astype(np.int64)})[0]
        first = not state.cross_kv
        s = self._shape
        feeds: dict[str, np.ndarray] = {
            "inputs_embeds": embeds.astype(s.float_dtype, copy=False),
            "encoder_hidden_states": state.hidden,
            "encoder_attention_mask": state.mask,
            "use_cache_branch": np.array([not first]),
        }
        empty = np.zeros((rows, s.heads, 0, s.head_dim), dtype=s.float_dtype)
        for i, (dk, dv, ek, ev) in enumerate(self._past_names):
            if first:
                # The uncached branch ignores these; they must still be fed, with the right rank and dtype.
                feeds[dk] = feeds[dv] = feeds[ek] = feeds[ev] = empty
            else:
                feeds[dk], feeds[dv] = state.self_kv[2 * i], state.self_kv[2 * i + 1]
                feeds[ek], feeds[ev] = state.cross_kv[2 * i], state.cross_kv[2 * i + 1]
        out = self._decoder.run(self._outputs, feeds)
        logits = out[0][:, -1, :]
        self_kv: list[np.ndarray] = []
        cross_kv: list[np.ndarray] = []
        for i in range(s.layers):
            self_kv += [out[1 + 4 * i], out[2 + 4 * i]]
            cross_kv += [out[3 + 4 * i], out[4 + 4 * i]]
        # The cached branch returns empty present.*.encoder.*: keep the cross-attention K/V from step 0.
        new = _DecoderState(state.row_items, state.hidden, state.mask, self_kv, cross_kv if first else state.cross_kv)
        return logits, new

    def select(self, state: DecoderState, rows: np.ndarray) -> DecoderState:
        """Return the state whose row k is row ``rows[k]`` of ``state``."""
        state = cast(_DecoderState, state)
        if rows.shape[0] == state.row_items.shape[0] and np.array_equal(rows, np.arange(rows.shape[0])):
            return state
        items = state.row_items[rows]
        self_kv = [kv[rows] for kv in state.self_kv]
        if np.array_equal(items, state.row_items):
            # Beam reordering within the same images: the encoder rows and cross K/V (by far the largest
            # arrays) depend only on the image, so they are already right and need no copy.
            return _DecoderState(state.row_items, state.hidden, state.mask, self_kv, state.cross_kv)
        return _DecoderState(items, state.hidden[rows], state.mask[rows], self_kv, [kv[rows] for kv in state.cross_kv])


def encode(vision: Any, embed: Any, encoder: Any, pixel_values: np.ndarray, prompt_ids: Sequence[int],
           shape: DecoderShape) -> EncodedBatch:
    """Run the vision encoder, embed the prompt, and run the text encoder over both, for a batch of images."""
    pixels = np.ascontiguousarray(pixel_values, dtype=shape.float_dtype)
    features = vision.run(["image_features"], {"pixel_values": pixels})[0]
    ids = np.asarray([list(prompt_ids)], dtype=np.int64)
    prompt = embed.run(["inputs_embeds"], {"input_ids": ids})[0]
    batch = features.shape[0]
    joint = np.concatenate([features, np.broadcast_to(prompt, (batch, *prompt.shape[1:]))], axis=1)
    mask = np.ones(joint.shape[:2], dtype=shape.mask_dtype)
    hidden = encoder.run(["last_hidden_state"], {"inputs_embeds": joint.astype(shape.float_dtype, copy=False),
                                                 "attention_mask": mask})[0]
    return EncodedBatch(hidden=hidden, mask=mask)


def generate_ids(vision: Any, embed: Any, encoder: Any, decoder: Any, pixel_values: np.ndarray,
                 prompt_ids: Sequence[int], settings: GenerationSettings, shape: DecoderShape) -> list[list[int]]:
    """Token ids (decoder start first, as transformers' generate() returns them) for each image of the batch."""
    encoded = encode(vision, embed, encoder, pixel_values, prompt_ids, shape)
    return generate(Florence2Decoder(decoder, embed, shape), encoded, pixel_values.shape[0], settings)
