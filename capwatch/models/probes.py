"""The probes that decide whether a rewritten graph may stand in for the published one (see
:mod:`capwatch.models.derived`): each runs both on the same made-up inputs and raises :class:`Mismatch`, saying
where, when the rewrite computes anything else.

* :func:`same_outputs`: bit-identical outputs on random inputs (the ``s8``, ``tidy`` and ``optimized`` recipes);
* :func:`split_steps`: a split decoder pair steps like the merged decoder it came from, through beam reordering and
  dropped rows, to the same next tokens (logits within float noise).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class Mismatch(Exception):
    """The rewritten graph differs from the published one, or could not run on the probe; the message says how."""


@dataclass(frozen=True)
class ProbeSpec:
    """What the split probe needs to drive the decoder: the model's config.json, the encoder width, the start token."""

    config_path: Path
    hidden: int
    start_token: int


def same_outputs(source: Path, rewritten: Path, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise Mismatch (saying where) unless ``rewritten`` gives bit-identical outputs to ``source`` on random inputs."""
    from capwatch.models.session import LazySession

    published = LazySession(source, 0).get()
    candidate = LazySession(rewritten, 0).get()
    rng = np.random.default_rng(20240611)
    feeds: dict[str, np.ndarray] = {}
    for spec in published.get_inputs():
        dims = shapes.get(spec.name) or tuple(
            d if isinstance(d, int) and d > 0 else (1 if "batch" in str(d).lower() else 3) for d in spec.shape)
        if spec.type == "tensor(float)":
            feeds[spec.name] = rng.normal(size=dims).astype(np.float32)
        elif spec.type == "tensor(int64)":
            feeds[spec.name] = (np.ones(dims, dtype=np.int64) if "mask" in spec.name
                                else rng.integers(0, 4, size=dims, dtype=np.int64))
        elif spec.type == "tensor(bool)":
            feeds[spec.name] = np.ones(dims, dtype=bool)
        else:
            raise Mismatch(f"no probe input for {spec.name} of type {spec.type}")
    try:
        want = published.run(None, feeds)
        got = candidate.run(None, feeds)
    except Exception as exc:  # onnxruntime's own error types
        raise Mismatch(f"the probe could not run: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    for spec, a, b in zip(published.get_outputs(), want, got, strict=True):
        if a.shape != b.shape or not np.array_equal(a, b):
            raise Mismatch(f"output {spec.name} differs from the published graph's on the probe")


def split_steps(source: Path, cross: Path, step: Path, data: tuple[str, ...], shapes: tuple[str, ...],
                 probe: ProbeSpec) -> None:
    """Raise Mismatch unless the split pair steps exactly like the published graph on random encoder states."""
    from capwatch.models import vision_encoder_decoder as ved
    from capwatch.models.layout import read_json
    from capwatch.models.session import LazySession

    config = read_json(probe.config_path)
    published = LazySession(source, 0).get()
    cross_session = LazySession(cross, 0).get()
    step_session = LazySession(step, 0).get()
    reference_layout = ved.DecoderLayout.from_session(published, source, config)
    layout = ved.DecoderLayout.from_session(step_session, step, config, item_names=(*data, *shapes))
    if (layout.layers, layout.heads, layout.head_dim) != (
            reference_layout.layers, reference_layout.heads, reference_layout.head_dim):
        raise Mismatch("the step graph's cache layout differs from the published graph's")
    rng = np.random.default_rng(20240611)
    first = rng.normal(size=(1, 9, probe.hidden)).astype(np.float32)
    # The second item is a permutation of the first's values: the same range, so an int8 graph's dynamic
    # quantisation picks the same scale whether the encoder states are quantised per item or all together.
    second = rng.permutation(first.ravel()).reshape(first.shape)
    encoder = np.concatenate([first, second])
    reference = ved.VitGpt2Decoder(published, reference_layout)
    candidate = ved.VitGpt2Decoder(step_session, layout, item_inputs=ved.SplitInputs(cross_session, data, shapes))
    ref_state = reference.start(encoder, 2)
    new_state = candidate.start(encoder, 2)
    tokens = np.full((4, 1), probe.start_token, dtype=np.int64)
    # Beam reorder inside each item, then the first item dropped: both change how rows are fed.
    selections = {2: np.array([1, 0, 3, 2]), 4: np.array([2, 3])}
    for index in range(6):
        try:
            want, ref_state = reference.step(ref_state, tokens)
            got, new_state = candidate.step(new_state, tokens)
        except Exception as exc:  # onnxruntime's own error types
            raise Mismatch(f"the step graph failed on the probe: {str(exc).splitlines()[0]}") from None
        scale = float(np.abs(want).max()) or 1.0
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5 * scale):
            raise Mismatch(f"the step graph's logits differ from the published graph's at step {index}")
        if not np.array_equal(got.argmax(axis=1), want.argmax(axis=1)):
            raise Mismatch(f"the step graph's next tokens differ from the published graph's at step {index}")
        tokens = want.argmax(axis=1).astype(np.int64).reshape(-1, 1)
        if index in selections:
            rows = selections[index]
            ref_state = reference.select(ref_state, rows)
            new_state = candidate.select(new_state, rows)
            tokens = tokens[rows]
