"""The ViT-GPT2 (``vision-encoder-decoder``) family: encoder graph + merged decoder graph with a KV cache.

Tensor names (Optimum export, as published by transformers.js):

* ``encoder_model``: ``pixel_values`` [b,3,H,W] -> ``last_hidden_state`` [b,seq,hidden];
* ``decoder_model_merged``: ``input_ids`` [b,s] int64, ``encoder_hidden_states``, ``past_key_values.{i}.key|value``
  [b,heads,past,head_dim], ``use_cache_branch`` bool[1] -> ``logits``, ``present.{i}.key|value``.

Step 0 feeds empty pasts (length 0) with ``use_cache_branch`` false; later steps feed one token and the previous
step's ``present.*`` with ``use_cache_branch`` true. There is no attention mask: every row has the same length,
because beams and images advance in lockstep and finished rows are dropped rather than padded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from capwatch.errors import ModelError
from capwatch.models.generate import DecoderState
from capwatch.models.layout import check_names

ENCODER = "encoder_model"
DECODER = "decoder_model_merged"
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


@dataclass(frozen=True)
class DecoderLayout:
    """What the merged decoder expects: layer count, heads, head size, and whether it has the cache switch."""

    layers: int
    heads: int
    head_dim: int
    has_cache_branch: bool

    @classmethod
    def from_session(cls, session: ort.InferenceSession, path: Path, config: Mapping[str, Any]) -> DecoderLayout:
        """Read and check the decoder's tensor names; raise ModelError naming the first bad tensor."""
        inputs = {i.name: i for i in session.get_inputs()}
        layers = sorted({int(m.group(1)) for n in inputs if (m := _PAST.match(n))})
        if not layers:
            raise ModelError(f"{path}: input tensor 'past_key_values.0.key' not found (not a merged KV decoder?)")
        if layers != list(range(len(layers))):
            raise ModelError(f"{path}: past_key_values layers are not numbered 0..{len(layers) - 1}")
        past = [f"past_key_values.{i}.{kind}" for i in layers for kind in ("key", "value")]
        check_names(path, "input", inputs, ["input_ids", "encoder_hidden_states", *past], optional=["use_cache_branch"])
        outputs = [o.name for o in session.get_outputs()]
        check_names(
            path, "output", outputs, ["logits", *[f"present.{i}.{kind}" for i in layers for kind in ("key", "value")]]
        )
        shape = inputs["past_key_values.0.key"].shape
        decoder_config = config.get("decoder", {}) if isinstance(config.get("decoder"), Mapping) else {}
        heads = shape[1] if isinstance(shape[1], int) else int(decoder_config.get("n_head", 0))
        head_dim = shape[3] if isinstance(shape[3], int) else 0
        if not head_dim and heads:
            head_dim = int(decoder_config.get("n_embd", 0)) // heads
        if heads <= 0 or head_dim <= 0:
            raise ModelError(f"{path}: cannot tell the number of attention heads from the graph or config.json")
        return cls(len(layers), heads, head_dim, "use_cache_branch" in inputs)


@dataclass(frozen=True)
class _State:
    encoder: np.ndarray  # [rows, seq, hidden]
    row_item: np.ndarray  # encoder item of each row: lets a beam reorder reuse `encoder` without a copy
    past: tuple[np.ndarray, ...]  # 2 * layers arrays [rows, heads, past, head_dim]
    past_len: int


class VitGpt2Decoder:
    """The merged decoder as a :class:`capwatch.models.generate.Decoder`."""

    def __init__(self, session: ort.InferenceSession, layout: DecoderLayout) -> None:
        self._session = session
        self._layout = layout
        self._past_names = [f"past_key_values.{i}.{k}" for i in range(layout.layers) for k in ("key", "value")]
        self._outputs = ["logits"] + [f"present.{i}.{k}" for i in range(layout.layers) for k in ("key", "value")]
        self._true = np.ones(1, dtype=bool)
        self._false = np.zeros(1, dtype=bool)

    def start(self, encoder_batch: Any, expand: int) -> DecoderState:
        encoder = np.asarray(encoder_batch, dtype=np.float32)
        items = np.repeat(np.arange(encoder.shape[0]), expand)
        if expand > 1:
            encoder = encoder[items]
        rows = encoder.shape[0]
        lay = self._layout
        empty = np.zeros((rows, lay.heads, 0, lay.head_dim), dtype=np.float32)
        return _State(encoder, items, tuple(empty for _ in self._past_names), 0)

    def step(self, state: DecoderState, input_ids: np.ndarray) -> tuple[np.ndarray, DecoderState]:
        assert isinstance(state, _State)
        feeds: dict[str, Any] = {"input_ids": input_ids, "encoder_hidden_states": state.encoder}
        feeds.update(zip(self._past_names, state.past, strict=True))
        if self._layout.has_cache_branch:
            feeds["use_cache_branch"] = self._true if state.past_len > 0 else self._false
        outputs = self._session.run(self._outputs, feeds)
        logits = outputs[0][:, -1, :]
        return logits, _State(state.encoder, state.row_item, tuple(outputs[1:]), state.past_len + input_ids.shape[1])

    def select(self, state: DecoderState, rows: np.ndarray) -> DecoderState:
        assert isinstance(state, _State)
        row_item = state.row_item[rows]
        # Same items in the same places (a beam reorder): the encoder rows are identical, no copy needed.
        same = np.array_equal(row_item, state.row_item)
        encoder = state.encoder if same else state.encoder[rows]
        past = tuple(p[rows] for p in state.past)
        return _State(encoder, row_item, past, state.past_len)


def encode(session: ort.InferenceSession, pixel_values: np.ndarray) -> np.ndarray:
    """Run the encoder graph: [b,3,H,W] float32 -> last_hidden_state [b,seq,hidden]."""
    out: np.ndarray = session.run(["last_hidden_state"], {"pixel_values": pixel_values})[0]
    return out


def check_encoder(session: ort.InferenceSession, path: Path) -> None:
    """Raise ModelError when the encoder graph does not have the ViT encoder's tensor names."""
    check_names(path, "input", [i.name for i in session.get_inputs()], ["pixel_values"])
    check_names(path, "output", [o.name for o in session.get_outputs()], ["last_hidden_state"])


def graph_stems() -> Sequence[str]:
    """The ONNX graphs this family needs, by file stem."""
    return (ENCODER, DECODER)
