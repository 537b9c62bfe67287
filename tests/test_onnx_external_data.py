"""The installed onnxruntime must refuse a model whose external data lies outside the model's folder.

A model directory is untrusted input: an initializer stored as external data names its file with a ``location``
that onnxruntime up to 1.23 read as given, so a model could pull any file the daemon can read (``../secret``,
``/etc/...``, a symlink in its folder) into a weight and leak it through its outputs. From 1.24.1 on, a model
loaded from a path is refused for all three; 1.24.1 also refused the Hugging Face cache layout (model and data
symlinked into ``blobs/``), which 1.24.2 accepts again. These tests fail when an older onnxruntime is installed.

The model is hand-encoded protobuf, so the tests need no ``onnx`` package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from capwatch.models.session import session_options

_FLOAT = 1  # TensorProto.DataType.FLOAT
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_X = np.array([0.5, 1.5, 2.5, 3.5], dtype=np.float32)
_INSIDE = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
_OUTSIDE = np.array([100.0, 200.0, 300.0, 400.0], dtype=np.float32)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _len(field: int, data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return _varint(field << 3 | 2) + _varint(len(raw)) + raw


def _float_vector_info(name: str, length: int) -> bytes:
    """ValueInfoProto for a float tensor of shape [length]."""
    shape = _len(1, _int(1, length))  # TensorShapeProto.dim -> Dimension.dim_value
    tensor_type = _int(1, _FLOAT) + _len(2, shape)  # TypeProto.Tensor: elem_type, shape
    return _len(1, name) + _len(2, _len(1, tensor_type))  # name, type -> TypeProto.tensor_type


def external_data_model(location: str) -> bytes:
    """ModelProto computing ``y = x + w``, with the float[4] initializer ``w`` read from ``location``."""
    entries = {"location": location, "offset": "0", "length": "16"}
    w = (
        _int(1, 4)  # dims
        + _int(2, _FLOAT)  # data_type
        + _len(8, "w")  # name
        + b"".join(_len(13, _len(1, key) + _len(2, value)) for key, value in entries.items())  # external_data
        + _int(14, _EXTERNAL)  # data_location
    )
    node = _len(1, "x") + _len(1, "w") + _len(2, "y") + _len(4, "Add")  # input, input, output, op_type
    graph = (
        _len(1, node)
        + _len(2, "external_data_probe")
        + _len(5, w)  # initializer
        + _len(11, _float_vector_info("x", 4))  # input
        + _len(12, _float_vector_info("y", 4))  # output
    )
    opset = _len(1, "") + _int(2, 17)  # OperatorSetIdProto: domain "", version 17
    return _int(1, 8) + _len(8, opset) + _len(7, graph)  # ir_version 8, opset_import, graph


def _model_folder(tmp_path: Path, variant: str) -> Path:
    """Write a model folder under tmp_path and return its model.onnx, whose ``w`` is read from:

    inside: w.bin next to it; hf_cache: w.bin next to it, both files symlinks into ``blobs/`` as in the Hugging Face
    cache; parent, absolute, symlink: tmp_path/outside.bin, as ``../outside.bin``, its absolute path, or w.bin
    being a symlink to it.
    """
    outside = tmp_path / "outside.bin"
    outside.write_bytes(_OUTSIDE.tobytes())
    if variant == "hf_cache":
        blobs, folder = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
        blobs.mkdir()
        folder.mkdir(parents=True)
        (blobs / "model").write_bytes(external_data_model("w.bin"))
        (blobs / "w").write_bytes(_INSIDE.tobytes())
        (folder / "model.onnx").symlink_to("../../blobs/model")
        (folder / "w.bin").symlink_to("../../blobs/w")
        return folder / "model.onnx"
    folder = tmp_path / "model"
    folder.mkdir()
    location = {"inside": "w.bin", "parent": "../outside.bin", "absolute": str(outside), "symlink": "w.bin"}[variant]
    if variant == "inside":
        (folder / "w.bin").write_bytes(_INSIDE.tobytes())
    elif variant == "symlink":
        (folder / "w.bin").symlink_to(outside)
    (folder / "model.onnx").write_bytes(external_data_model(location))
    return folder / "model.onnx"


def _session(model: Path) -> ort.InferenceSession:
    """A session made as capwatch makes it (capwatch.models.session.LazySession)."""
    return ort.InferenceSession(str(model), sess_options=session_options(1), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("variant", ["inside", "hf_cache"])
def test_onnxruntime_loads_external_data_inside_the_model_folder(tmp_path: Path, variant: str) -> None:
    (y,) = _session(_model_folder(tmp_path, variant)).run(["y"], {"x": _X})
    np.testing.assert_array_equal(y, _X + _INSIDE)


@pytest.mark.parametrize("variant", ["parent", "absolute", "symlink"])
def test_onnxruntime_refuses_external_data_outside_the_model_folder(tmp_path: Path, variant: str) -> None:
    with pytest.raises(Exception, match=r"(?i)external data"):
        _session(_model_folder(tmp_path, variant))
