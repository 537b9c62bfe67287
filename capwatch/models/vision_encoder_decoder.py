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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capwatch.errors import ModelError
from capwatch.models.generate import DecoderState
from capwatch.models.layout import check_names
from capwatch.models.runtime import ort

ENCODER = "encoder_model"
DECODER = "decoder_model_merged"
#: The split of DECODER (see capwatch.models.rewrite): once per image, once per token.
CROSS = "decoder_cross"
STEP = "decoder_step"
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


@dataclass(frozen=True)
class DecoderLayout:
    """What the merged decoder expects: layer count, heads, head size, and whether it has the cache switch."""

    layers: int
    heads: int
    head_dim: int
    has_cache_branch: bool

    @classmethod
    def from_session(
        cls,
        session: ort.InferenceSession,
        path: Path,
        config: Mapping[str, Any],
        item_names: Sequence[str] = ("encoder_hidden_states",),
    ) -> DecoderLayout:
        """Read and check the decoder's tensor names (``item_names``: its per-item inputs, see :class:`ItemInputs`);
        raise ModelError naming the first bad tensor."""
        inputs = {i.name: i for i in session.get_inputs()}
        layers = sorted({int(m.group(1)) for n in inputs if (m := _PAST.match(n))})
        if not layers:
            raise ModelError(f"{path}: input tensor 'past_key_values.0.key' not found (not a merged KV decoder?)")
        if layers != list(range(len(layers))):
            raise ModelError(f"{path}: past_key_values layers are not numbered 0..{len(layers) - 1}")
        past = [f"past_key_values.{i}.{kind}" for i in layers for kind in ("key", "value")]
        check_names(path, "input", inputs, ["input_ids", *item_names, *past], optional=["use_cache_branch"])
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
class ItemInputs:
    """The decoder inputs that depend on the image alone, for a batch of items.

    ``tensors`` are arrays with the item on axis 0 (the encoder states for the published graph; the precomputed
    cross-attention keys/values for a split one, see :mod:`capwatch.models.rewrite`), fed row by row. ``shapes``
    are 1-D int64 shapes of such tensors whose entry 0 is the batch: it is set to the number of rows fed.
    """

    tensors: Mapping[str, np.ndarray]
    shapes: Mapping[str, np.ndarray]

    @property
    def items(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def feeds(self, index: slice | np.ndarray) -> dict[str, np.ndarray]:
        """The inputs for the items ``index`` selects (a slice is a view; an index array gathers a copy)."""
        feeds = {name: value[index] for name, value in self.tensors.items()}
        rows = next(iter(feeds.values())).shape[0] if feeds else 0
        for name, shape in self.shapes.items():
            fed = shape.copy()
            fed[0] = rows
            feeds[name] = fed
        return feeds


@dataclass(frozen=True)
class _Segment:
    """Decoder rows [start, stop) run in one session call with ``feeds`` as their per-item inputs."""

    start: int
    stop: int
    feeds: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class _State:
    items: ItemInputs
    row_item: np.ndarray  # the item of each decoder row
    plan: tuple[_Segment, ...]  # how the rows are fed to the graph
    past: tuple[np.ndarray, ...]  # 2 * layers arrays [rows, heads, past, head_dim]
    past_len: int


def published_inputs(encoder_batch: np.ndarray) -> ItemInputs:
    """Per-item inputs of the published merged decoder: the encoder states themselves."""
    return ItemInputs({"encoder_hidden_states": np.asarray(encoder_batch, dtype=np.float32)}, {})


class VitGpt2Decoder:
    """A ViT-GPT2 decoder graph as a :class:`capwatch.models.generate.Decoder`.

    Either the published merged graph (``item_inputs`` = :func:`published_inputs`), which recomputes the
    cross-attention keys/values from ``encoder_hidden_states`` at every step, or the step graph of a split pair,
    fed those keys/values computed once per image (:class:`SplitInputs`). With ``broadcast_encoder`` (see
    :func:`encoder_broadcasts`), the beams of one image are fed a single item row, one session call per image,
    instead of one row per beam in a single call: for the published graph that divides the cross-attention cost
    by the number of beams; for a split one it saves copying the keys/values per beam.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        layout: DecoderLayout,
        *,
        broadcast_encoder: bool = False,
        item_inputs: Callable[[np.ndarray], ItemInputs] = published_inputs,
    ) -> None:
        self._session = session
        self._layout = layout
        self._broadcast = broadcast_encoder
        self._item_inputs = item_inputs
        self._past_names = [f"past_key_values.{i}.{k}" for i in range(layout.layers) for k in ("key", "value")]
        self._outputs = ["logits"] + [f"present.{i}.{k}" for i in range(layout.layers) for k in ("key", "value")]
        self._true = np.ones(1, dtype=bool)
        self._false = np.zeros(1, dtype=bool)

    def start(self, encoder_batch: Any, expand: int) -> DecoderState:
        items = self._item_inputs(np.asarray(encoder_batch, dtype=np.float32))
        row_item = np.repeat(np.arange(items.items), expand)
        lay = self._layout
        empty = np.zeros((row_item.size, lay.heads, 0, lay.head_dim), dtype=np.float32)
        return _State(items, row_item, self._plan(items, row_item), tuple(empty for _ in self._past_names), 0)

    def _plan(self, items: ItemInputs, row_item: np.ndarray) -> tuple[_Segment, ...]:
        rows = row_item.size
        # Worth it only when images have several rows each (beams).
        if self._broadcast and rows >= 2 and (per_item := self._per_item(items, row_item, min_rows=2)) is not None:
            return per_item
        if rows == items.items and np.array_equal(row_item, np.arange(rows)):
            return (_Segment(0, rows, items.feeds(slice(None))),)
        return (_Segment(0, rows, items.feeds(row_item)),)

    @staticmethod
    def _per_item(items: ItemInputs, row_item: np.ndarray, *, min_rows: int) -> tuple[_Segment, ...] | None:
        """One segment (one session call) per image, fed that image's single item row, when each image's rows are
        contiguous and they average ``min_rows`` or more; else None."""
        bounds = np.flatnonzero(np.diff(row_item)) + 1
        starts = np.concatenate([[0], bounds])
        stops = np.concatenate([bounds, [row_item.size]])
        if (stops - starts).mean() < min_rows or np.unique(row_item[starts]).size != starts.size:
            return None
        return tuple(_Segment(int(a), int(b), items.feeds(slice(int(row_item[a]), int(row_item[a]) + 1)))
                     for a, b in zip(starts, stops, strict=True))

    def step(self, state: DecoderState, input_ids: np.ndarray) -> tuple[np.ndarray, DecoderState]:
        assert isinstance(state, _State)
        branch = self._true if state.past_len > 0 else self._false
        results = []
        plan = state.plan
        if state.past_len == 0 and self._broadcast and len(plan) == 1 and state.row_item.size > 1:
            # At the first step every image has one row (a beam search starts so too, see capwatch.models.generate):
            # one call per image there, so that an int8 graph's per-call quantisation gives each image what it
            # gives it alone, as a beam search's per-image calls do at the later steps.
            plan = self._per_item(state.items, state.row_item, min_rows=1) or plan
        whole = len(plan) == 1
        for seg in plan:
            feeds: dict[str, Any] = {"input_ids": input_ids if whole else input_ids[seg.start : seg.stop]}
            feeds.update(seg.feeds)
            feeds.update(
                zip(self._past_names, (p if whole else p[seg.start : seg.stop] for p in state.past), strict=True)
            )
            if self._layout.has_cache_branch:
                feeds["use_cache_branch"] = branch
            results.append(self._session.run(self._outputs, feeds))
        if len(results) == 1:
            outputs = results[0]
        else:
            outputs = [np.concatenate([r[k] for r in results]) for k in range(len(self._outputs))]
        logits = outputs[0][:, -1, :]
        advanced = _State(
            state.items, state.row_item, state.plan, tuple(outputs[1:]), state.past_len + input_ids.shape[1]
        )
        return logits, advanced

    def select(self, state: DecoderState, rows: np.ndarray) -> DecoderState:
        assert isinstance(state, _State)
        row_item = state.row_item[rows]
        # A beam reorder keeps every item's rows in place: the feed plan is unchanged, no per-item copy needed.
        same = np.array_equal(row_item, state.row_item)
        plan = state.plan if same else self._plan(state.items, row_item)
        past = tuple(p[rows] for p in state.past)
        return _State(state.items, row_item, plan, past, state.past_len)


class SplitInputs:
    """Per-item inputs of a split step graph: the cross graph run once per image.

    One run per image (not per batch) so that an int8 cross graph, whose dynamic quantisation picks one scale per
    call, gives each image the same keys/values whatever its batch-mates.
    """

    def __init__(self, cross: ort.InferenceSession, data_outputs: Sequence[str], shape_outputs: Sequence[str],
                 source: str = "encoder_hidden_states") -> None:
        self._cross = cross
        self._data = list(data_outputs)
        self._shapes = list(shape_outputs)
        self._source = source

    def __call__(self, encoder_batch: np.ndarray) -> ItemInputs:
        names = self._data + self._shapes
        runs = [self._cross.run(names, {self._source: encoder_batch[i : i + 1]}) for i in range(encoder_batch.shape[0])]
        tensors = {name: np.concatenate([r[k] for r in runs]) if len(runs) > 1 else runs[0][k]
                   for k, name in enumerate(self._data)}
        shapes = {name: np.asarray(runs[0][len(self._data) + k], dtype=np.int64)
                  for k, name in enumerate(self._shapes)}
        return ItemInputs(tensors, shapes)


def encoder_broadcasts(
    session: ort.InferenceSession,
    layout: DecoderLayout,
    hidden: int,
    start_token: int,
    item_inputs: Callable[[np.ndarray], ItemInputs] = published_inputs,
) -> bool:
    """True when the decoder graph gives the same logits for one item row broadcast over two decoder rows.

    Optimum's GPT-2 export derives the cross-attention shapes from the encoder tensor itself, so ONNX MatMul
    broadcasting makes this work; a graph that reshapes with a fixed batch would fail or differ, so it is checked
    once per session instead of assumed.
    """
    rng = np.random.default_rng(0)
    items = item_inputs(rng.normal(size=(1, 5, hidden)).astype(np.float32))
    empty = np.zeros((2, layout.heads, 0, layout.head_dim), dtype=np.float32)
    feeds: dict[str, Any] = {"input_ids": np.full((2, 1), start_token, dtype=np.int64)}
    feeds.update({f"past_key_values.{i}.{k}": empty for i in range(layout.layers) for k in ("key", "value")})
    if layout.has_cache_branch:
        feeds["use_cache_branch"] = np.zeros(1, dtype=bool)
    try:
        shared = session.run(["logits"], {**feeds, **items.feeds(slice(None))})[0]
        full = session.run(["logits"], {**feeds, **items.feeds(np.zeros(2, dtype=np.int64))})[0]
    except Exception:  # onnxruntime raises its own error types for shape mismatches
        return False
    return bool(shared.shape == full.shape and np.allclose(shared, full, rtol=1e-5, atol=1e-5))


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
