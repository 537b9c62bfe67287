"""The BART-style merged decoder (``decoder_model_merged``) as a :class:`capwatch.models.generate.Decoder`.

Optimum exports BART-like encoder-decoders (Florence-2's language model, Marian) with one merged decoder graph:
``encoder_hidden_states``, ``encoder_attention_mask``, ``past_key_values.{i}.decoder.key|value`` (self-attention
cache), ``past_key_values.{i}.encoder.key|value`` (cross-attention K/V) and ``use_cache_branch``; out ``logits`` and
``present.*``. The new token comes in as ``input_ids`` (Marian: the graph embeds and scales it itself) or as
``inputs_embeds`` (Florence-2: an ``embed_tokens`` graph embeds it first). On the first step the uncached branch
runs (empty past); later steps feed the grown self-attention cache. On the cached branch the
``present.*.encoder.*`` outputs come back empty, so the cross-attention K/V of step 0 are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capwatch.errors import ModelError
from capwatch.models.generate import DecoderState
from capwatch.models.layout import check_names
from capwatch.models.runtime import ort

#: The names a merged decoder may take the new token under.
TOKEN_INPUTS = ("inputs_embeds", "input_ids")


@dataclass(frozen=True)
class DecoderShape:
    """What the merged decoder's inputs look like: layer count, heads, head size, dtypes, how tokens come in."""

    layers: int
    heads: int
    head_dim: int
    float_dtype: type[np.floating[Any]] = np.float32
    mask_dtype: type[np.integer[Any]] = np.int64
    #: ``inputs_embeds`` (fed from an embed_tokens graph) or ``input_ids`` (embedded inside the decoder).
    token_input: str = "inputs_embeds"

    @classmethod
    def from_session(cls, session: ort.InferenceSession, path: Path, text_config: Mapping[str, Any],
                     token_input: str = "inputs_embeds") -> DecoderShape:
        """Check the merged decoder's tensor names and read its cache layout (``text_config`` for symbolic dims).

        ``token_input`` is the input the family feeds tokens through (one of :data:`TOKEN_INPUTS`). Raises
        ModelError naming ``path`` and the first missing or unexpected tensor.
        """
        inputs = {i.name: i for i in session.get_inputs()}
        layers = 0
        while f"past_key_values.{layers}.decoder.key" in inputs:
            layers += 1
        if layers == 0:
            raise ModelError(f"{path}: input tensor 'past_key_values.0.decoder.key' not found (not a merged decoder?)")
        past = [f"past_key_values.{i}.{kind}.{kv}" for i in range(layers)
                for kind in ("decoder", "encoder") for kv in ("key", "value")]
        check_names(path, "input", inputs, [token_input, "encoder_hidden_states", "encoder_attention_mask",
                                            *past, "use_cache_branch"])
        check_names(path, "output", [o.name for o in session.get_outputs()],
                    ["logits", *[n.replace("past_key_values", "present") for n in past]])
        shape = inputs["past_key_values.0.decoder.key"].shape
        d_model = text_config.get("d_model")
        heads = shape[1] if isinstance(shape[1], int) else text_config.get("decoder_attention_heads")
        head_dim = shape[3] if isinstance(shape[3], int) else None
        if head_dim is None and isinstance(d_model, int) and isinstance(heads, int) and heads > 0:
            head_dim = d_model // heads
        if not isinstance(heads, int) or not isinstance(head_dim, int) or heads <= 0 or head_dim <= 0:
            raise ModelError(f"{path}: cannot tell the decoder's attention heads from the graph or config.json")
        float_dtype = np.float16 if inputs["encoder_hidden_states"].type == "tensor(float16)" else np.float32
        mask_type = inputs["encoder_attention_mask"].type
        mask_dtype: type[np.integer[Any]] = np.int32 if mask_type == "tensor(int32)" else np.int64
        return cls(layers=layers, heads=heads, head_dim=head_dim, float_dtype=float_dtype, mask_dtype=mask_dtype,
                   token_input=token_input)


@dataclass(frozen=True)
class EncodedBatch:
    """Encoder output for b items: ``hidden`` [b,S,d] and its ``mask`` [b,S] (0 on padding)."""

    hidden: np.ndarray
    mask: np.ndarray


@dataclass
class _DecoderState:
    """Rows of an ongoing generation (mutable only inside MergedDecoder; every step returns a new one)."""

    row_items: np.ndarray  # encoder item of each row
    hidden: np.ndarray  # [rows,S,d] encoder states, per row
    mask: np.ndarray  # [rows,S]
    self_kv: list[np.ndarray] = field(default_factory=list)  # per layer: key, value [rows,h,t,hd]
    cross_kv: list[np.ndarray] = field(default_factory=list)  # per layer: key, value [rows,h,S,hd]; [] before step 0


class MergedDecoder:
    """A merged decoder graph as a :class:`capwatch.models.generate.Decoder` over numpy arrays.

    ``embed`` is the embed_tokens session when the decoder takes ``inputs_embeds`` (None for ``input_ids``).
    """

    def __init__(self, decoder: Any, shape: DecoderShape, embed: Any = None) -> None:
        if shape.token_input == "inputs_embeds" and embed is None:
            raise ValueError("a decoder fed inputs_embeds needs an embed_tokens session")
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
        """Return the state with each encoded item (an EncodedBatch) repeated ``expand`` times (beams)."""
        assert isinstance(encoder_batch, EncodedBatch)
        items = np.repeat(np.arange(encoder_batch.hidden.shape[0]), expand)
        return _DecoderState(row_items=items, hidden=encoder_batch.hidden[items], mask=encoder_batch.mask[items])

    def _token_feed(self, input_ids: np.ndarray) -> np.ndarray:
        ids = input_ids.astype(np.int64)
        if self._shape.token_input == "input_ids":
            return ids
        embeds: np.ndarray = self._embed.run(["inputs_embeds"], {"input_ids": ids})[0]
        return embeds.astype(self._shape.float_dtype, copy=False)

    def step(self, state: DecoderState, input_ids: np.ndarray) -> tuple[np.ndarray, DecoderState]:
        """Run one token per row; returns logits [rows,vocab] and the state with the caches advanced."""
        assert isinstance(state, _DecoderState)
        rows = input_ids.shape[0]
        first = not state.cross_kv
        s = self._shape
        feeds: dict[str, np.ndarray] = {
            s.token_input: self._token_feed(input_ids),
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
        assert isinstance(state, _DecoderState)
        if rows.shape[0] == state.row_items.shape[0] and np.array_equal(rows, np.arange(rows.shape[0])):
            return state
        items = state.row_items[rows]
        self_kv = [kv[rows] for kv in state.self_kv]
        if np.array_equal(items, state.row_items):
            # Beam reordering within the same items: the encoder rows and cross K/V (by far the largest arrays)
            # depend only on the item, so they are already right and need no copy.
            return _DecoderState(state.row_items, state.hidden, state.mask, self_kv, state.cross_kv)
        return _DecoderState(items, state.hidden[rows], state.mask[rows], self_kv, [kv[rows] for kv in state.cross_kv])
