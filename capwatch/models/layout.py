"""Find and validate the files of a Hugging Face / transformers.js-layout ONNX model directory.

A model directory holds ``config.json``, ``generation_config.json``, ``preprocessor_config.json``, a tokenizer
(``tokenizer.json``, or ``vocab.json`` + ``merges.txt``) and ONNX graphs either at the root or in ``onnx/``, with the
precision chosen by file-name suffix: ``""`` fp32, ``_quantized`` int8, ``_fp16``. Every problem is reported as a
one-line :class:`~capwatch.errors.ModelError` that names the directory and what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capwatch.config import Precision
from capwatch.errors import ModelError

#: File-name suffix of each precision, as Optimum / transformers.js name them.
PRECISION_SUFFIX: Mapping[str, str] = {"fp32": "", "int8": "_quantized", "fp16": "_fp16"}


@dataclass(frozen=True)
class ModelDir:
    """A model directory whose JSON files have been read (ONNX graphs are located on demand)."""

    path: Path
    config: Mapping[str, Any]
    generation_config: Mapping[str, Any]
    preprocessor_config: Mapping[str, Any]

    @property
    def model_type(self) -> str:
        """``config.json``'s ``model_type`` (e.g. ``vision-encoder-decoder``, ``florence2``)."""
        return str(self.config.get("model_type", ""))

    def onnx_file(self, stem: str, precision: Precision) -> Path:
        """Return the ONNX graph ``stem`` + precision suffix, from ``onnx/`` or the root.

        Raises ModelError naming the file (and the precisions that are present) when it does not exist.
        """
        return find_onnx(self.path, stem, precision)


def read_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    """Return the JSON object in ``path`` ({} when it is missing and not required).

    Raises ModelError when a required file is missing or any file is not a JSON object.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ModelError(f"{path.parent}: missing {path.name}") from None
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def open_model_dir(path: Path) -> ModelDir:
    """Read the configuration files of the model directory ``path``.

    ``generation_config.json`` is optional (older exports keep generation settings in ``config.json``);
    ``config.json`` and ``preprocessor_config.json`` are required. Raises ModelError (one line).
    """
    if not path.exists():
        raise ModelError(f"{path}: model directory not found")
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory (expected a model directory with config.json and onnx/)")
    return ModelDir(
        path=path,
        config=read_json(path / "config.json"),
        generation_config=read_json(path / "generation_config.json", required=False),
        preprocessor_config=read_json(path / "preprocessor_config.json"),
    )


def find_onnx(root: Path, stem: str, precision: Precision) -> Path:
    """Locate ``<stem><suffix>.onnx`` in ``root/onnx/`` or ``root``; raise ModelError naming what is there."""
    suffix = PRECISION_SUFFIX[precision]
    for folder in (root / "onnx", root):
        candidate = folder / f"{stem}{suffix}.onnx"
        if candidate.is_file():
            return candidate
    present = [p for p, s in PRECISION_SUFFIX.items() if _exists(root, f"{stem}{s}.onnx")]
    if present:
        raise ModelError(f"{root}: no {stem}{suffix}.onnx for precision {precision}; available: {', '.join(present)}")
    raise ModelError(f"{root}: missing {stem}{suffix}.onnx (looked in onnx/ and the directory itself)")


def _exists(root: Path, name: str) -> bool:
    return (root / "onnx" / name).is_file() or (root / name).is_file()


def check_names(
    what: Path, kind: str, actual: Iterable[str], required: Sequence[str], *, optional: Iterable[str] = ()
) -> None:
    """Raise ModelError when ``actual`` tensor names lack one of ``required`` or have one not expected.

    ``kind`` is "input" or "output"; the message names the file and the first offending tensor.
    """
    names = list(actual)
    missing = [n for n in required if n not in names]
    if missing:
        raise ModelError(
            f"{what}: {kind} tensor {missing[0]!r} not found (has: {', '.join(names[:8])}"
            f"{', ...' if len(names) > 8 else ''})"
        )
    allowed = set(required) | set(optional)
    extra = [n for n in names if n not in allowed]
    if extra and kind == "input":
        raise ModelError(f"{what}: unexpected {kind} tensor {extra[0]!r} for this model family")
