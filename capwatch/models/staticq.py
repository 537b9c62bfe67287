"""Static (calibrated) int8 quantisation of an image encoder: the ``static`` recipe of :mod:`capwatch.models.derived`.

The published int8 graphs were made with dynamic quantisation: before every MatMul and Conv, onnxruntime measures
the activation's range at run time (``DynamicQuantizeLinear``: one extra pass over the tensor) and the product comes
back as float. Static quantisation fixes each activation's scale once, from the ranges seen on calibration photos,
so the graph carries Quantize/DequantizeLinear pairs (QDQ) that onnxruntime fuses into integer kernels
(QLinearConv, QLinearMatMul) with nothing measured at run time.

Weights are int8 per output channel with ``reduce_range`` (7 bits): onnxruntime's AVX2 u8s8 kernel adds pairs of
products in int16 (``vpmaddubsw``), which cannot saturate with 7-bit weights; with VNNI the range costs nothing.
Activations are uint8 (x86's integer kernels take u8 activations), their ranges from the MinMax of the
calibration set: the photos shipped in ``capwatch/data/calibration`` (scikit-image's astronaut, chelsea and coffee),
each also mirrored and cropped.

The source can be the fp32 graph or the published dynamically quantised one: a dynamic int8 graph is first turned
back into the fp32 graph its weights stand for (:func:`dequantize_dynamic`: the integer weights times their scales,
exactly the values its MatMulInteger/ConvInteger multiplied), so the default int8 download is enough.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# onnxruntime itself is imported the quiet way (no telemetry files in the user's home) before its quantization
# package, which would otherwise import it plainly in the child process that makes the static graph.
from capwatch.models import runtime  # noqa: F401

#: The calibration photos shipped with capwatch (file names in capwatch/data/calibration).
CALIBRATION_PHOTOS = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg")


def calibration_images() -> list[Image.Image]:
    """The calibration photos, each as shipped, mirrored, and its centre 70 % (RGB)."""
    images: list[Image.Image] = []
    folder = resources.files("capwatch") / "data" / "calibration"
    for name in CALIBRATION_PHOTOS:
        with (folder / name).open("rb") as handle:
            photo = Image.open(handle).convert("RGB")
        w, h = photo.size
        crop = photo.crop((int(w * 0.15), int(h * 0.15), int(w * 0.85), int(h * 0.85)))
        images += [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), crop]
    return images


def calibration_pixels(preprocess: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """The calibration images through ``preprocess`` (the model's own preprocessing), stacked [n,3,H,W] float32."""
    return np.stack([preprocess(image) for image in calibration_images()]).astype(np.float32)


class Strayed(Exception):
    """A quantised graph's features are too far from its source graph's, or it cannot run (one line why)."""


def lowest_cosine(source: Path, rewritten: Path, pixels: np.ndarray, minimum: float) -> float:
    """The lowest cosine, over the images of ``pixels`` [n,3,H,W], between ``rewritten``'s first output and
    ``source``'s (each flattened). Raises Strayed when one is below ``minimum`` (or not a number) or a graph cannot
    run."""
    from capwatch.models.session import LazySession

    published = LazySession(source, 0).get()
    candidate = LazySession(rewritten, 0).get()
    name = published.get_inputs()[0].name
    lowest = 1.0
    for item in pixels:
        feeds = {name: item[None]}
        try:
            want = published.run(None, feeds)[0].astype(np.float64).ravel()
            got = candidate.run(None, feeds)[0].astype(np.float64).ravel()
        except Exception as exc:  # onnxruntime's own error types
            raise Strayed(f"the probe could not run: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        norms = float(np.linalg.norm(want) * np.linalg.norm(got))
        cosine = float(want @ got) / norms if norms > 0 and want.shape == got.shape else 0.0
        if not cosine >= minimum:  # also refuses NaN
            raise Strayed(f"its features' cosine with the published graph's is {cosine:.4f} on a calibration "
                          f"photo (at least {minimum} needed)")
        lowest = min(lowest, cosine)
    return lowest


class _QuantizerNoise(logging.Filter):
    """Drops the advice onnxruntime's quantiser logs on the root logger (pre-processing hints, shape inference
    notes for the graph's integer tensors): noise in capwatch's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname or "quantization" not in record.pathname


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The block with :class:`_QuantizerNoise` on the root logger's handlers."""
    noise = _QuantizerNoise()
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(noise)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(noise)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a stack of pixel tensors, one image per run."""

    def __init__(self, name: str, pixels: np.ndarray) -> None:
        self._name = name
        self._pixels = pixels
        self._items: Iterator[np.ndarray] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._items, None)
        return None if item is None else {self._name: item[None]}

    def rewind(self) -> None:
        self._items = iter(list(self._pixels))


def static_graph(source: Path, target: Path, pixels: np.ndarray, *, work: Path) -> int:
    """Write the static int8 form of the image encoder at ``source`` (fp32, or dynamic int8 as published) to
    ``target`` (see :func:`quantize_static`), its attention splits moved before their transposes (exact; see
    :func:`capwatch.models.rewrite.split_before_transpose`: onnxruntime runs the 5-d transposes it would leave
    there slowly). Returns the number of splits moved. Raises ValueError, OSError or onnx/onnxruntime's errors."""
    import onnx

    from capwatch.models.rewrite import split_before_transpose

    quantize_static(dequantize_dynamic(onnx.load(str(source))), target, pixels, work=work)
    graph = onnx.load(str(target))
    moved = split_before_transpose(graph)
    if moved:
        onnx.save_model(graph, str(target))
    return moved


def quantize_static(source: Any, target: Path, pixels: np.ndarray, *, work: Path,
                    op_types: Sequence[str] = ("Conv", "MatMul")) -> None:
    """Write the static int8 form of the fp32 image encoder ``source`` (an onnx.ModelProto) to ``target``:
    QDQ, per-channel int8 weights with reduce_range, uint8 activations calibrated (MinMax) on ``pixels``
    [n,3,H,W]; only MatMuls with a constant weight are quantised (attention products stay float). ``work``: a
    folder for the calibration's scratch graphs. Raises whatever onnx/onnxruntime raise on a graph they refuse."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    name = source.graph.input[0].name
    plain = work / "source.onnx"
    onnx.save_model(source, str(plain))
    with _quiet_quantizer():
        ort_quantize_static(
            str(plain), str(target), _Reader(name, pixels), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # (not CalibMaxIntermediateOutputs: onnxruntime 1.32 drops the ranges collected before each flush)
            extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True})
    plain.unlink()


# ------------------------------------------------------------------------------------------------------------
# Back from dynamic int8 to the fp32 graph its weights stand for


def dequantize_dynamic(model: Any) -> Any:
    """``model`` (an onnx.ModelProto made by onnxruntime's quantize_dynamic) with every quantised MatMul and Conv
    turned back into a float MatMul/Conv whose weights are the dequantised integer weights; the graph then computes
    what the dynamic graph computes up to the activations' rounding. Returns ``model`` itself when it has no
    quantised nodes. Raises ValueError on a pattern it does not know (the caller then keeps the published graph)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    integer = [n for n in graph.node if n.op_type in ("MatMulInteger", "ConvInteger")]
    if not integer:
        return model
    drop: set[int] = set()
    add: list[tuple[int, Any]] = []
    new_inits: list[Any] = []
    position = {id(n): i for i, n in enumerate(graph.node)}

    def const(name: str) -> np.ndarray:
        if name not in inits:
            raise ValueError(f"{name} is not a constant")
        return numpy_helper.to_array(inits[name])

    def only_consumer(name: str, op: str) -> Any:
        users = consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op:
            raise ValueError(f"unexpected use of {name}")
        return users[0]

    for node in integer:
        x_q, w_name = node.input[0], node.input[1]
        dq = producers.get(x_q)
        if dq is None or dq.op_type != "DynamicQuantizeLinear":
            raise ValueError(f"{node.name}: its input is not dynamically quantised")
        w = const(w_name).astype(np.int32)
        has_zero = len(node.input) > 3 and bool(node.input[3])
        w_zero = const(node.input[3]).astype(np.int32) if has_zero else np.zeros(1, np.int32)
        cast = only_consumer(node.output[0], "Cast")
        mul = only_consumer(cast.output[0], "Mul")
        scale_name = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
        scale_mul = producers.get(scale_name)
        if scale_mul is None or scale_mul.op_type != "Mul":
            raise ValueError(f"{node.name}: no scale product")
        w_scale_name = next((i for i in scale_mul.input if i in inits), None)
        if w_scale_name is None:
            raise ValueError(f"{node.name}: no weight scale")
        w_scale = const(w_scale_name).astype(np.float32)
        if node.op_type == "MatMulInteger":
            real = ((w - w_zero.reshape(1, -1)) * w_scale.reshape(1, -1)).astype(np.float32)
            op_node = helper.make_node("MatMul", [dq.input[0], f"{w_name}_real"], [mul.output[0]],
                                       name=f"{node.name}_float")
        else:
            shape = (-1,) + (1,) * (w.ndim - 1)
            real = ((w - w_zero.reshape(shape)) * w_scale.reshape(shape)).astype(np.float32)
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            op_node = helper.make_node("Conv", [dq.input[0], f"{w_name}_real"], [mul.output[0]],
                                       name=f"{node.name}_float", **attrs)
        new_inits.append(numpy_helper.from_array(real, f"{w_name}_real"))
        add.append((position[id(mul)], op_node))
        drop.update({id(node), id(cast), id(mul)})
        # the scale product and the DynamicQuantizeLinear go when nothing else uses them
        if all(id(u) in drop for u in consumers.get(scale_name, [])):
            drop.add(id(scale_mul))
    # DynamicQuantizeLinear nodes whose outputs nobody uses any more
    for node in graph.node:
        if node.op_type == "DynamicQuantizeLinear" and all(
                id(u) in drop for out in node.output for u in consumers.get(out, [])):
            drop.add(id(node))
    kept = [(i, n) for i, n in enumerate(graph.node) if id(n) not in drop] + add
    kept.sort(key=lambda pair: pair[0])
    del graph.node[:]
    graph.node.extend(n for _, n in kept)
    graph.initializer.extend(new_inits)
    used = {name for n in graph.node for name in n.input}
    survivors = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(survivors)
    return model
