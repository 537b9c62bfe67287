"""Find and validate the files of a Hugging Face / transformers.js-layout ONNX model directory.

A model directory holds ``config.json``, ``generation_config.json``, ``preprocessor_config.json``, a tokenizer
(``tokenizer.json``, or ``vocab.json`` + ``merges.txt``) and ONNX graphs either at the root or in ``onnx/``, with the
precision chosen by file-name suffix: ``""`` fp32, ``_quantized`` int8, ``_fp16``. Every problem is reported as a
one-line :class:`~capwatch.errors.ModelError` that names the directory and what is wrong.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capwatch.config import Precision, Range, short_repr
from capwatch.errors import ModelError
from capwatch.models.generate import check_generation_keys
from capwatch.models.preprocess import Preprocessor

#: File-name suffix of each precision, as Optimum / transformers.js name them.
PRECISION_SUFFIX: Mapping[str, str] = {"fp32": "", "int8": "_quantized", "fp16": "_fp16"}

#: Largest config.json / generation_config.json / preprocessor_config.json / processor config accepted: real ones are
#: a few KB (Florence-2's config.json, the largest, is under 10 KB).
MAX_CONFIG_BYTES = 1 << 20
#: Largest tokenizer.json (and vocab.json / merges.txt) accepted: GPT-2's and BART's are about 1.4 MB, the largest
#: multilingual tokenizers around 35 MB.
MAX_TOKENIZER_BYTES = 64 << 20
#: Deepest nesting accepted in a model's JSON files. Real ones nest fewer than 10 levels; 128 is where the
#: tokenizers library (serde_json) stops, so `models info` (Python) and captioning (tokenizers) accept the same
#: tokenizer.json. Python's own decoder would only stop near its recursion limit (~1000) with a RecursionError.
MAX_JSON_DEPTH = 128

#: The config.json keys capwatch reads about the text decoder (VisionEncoderDecoder's ``decoder``, Florence-2's
#: ``text_config``, or the top level), with bounds far beyond any real captioning model (ViT-GPT2: vocabulary 50257,
#: 1024 positions, 12 heads, width 768; Florence-2: 51289, 1024, 16, 1024).
ARCHITECTURE_BOUNDS: Mapping[str, Range] = {
    "vocab_size": Range(1, 1 << 22),
    "n_positions": Range(1, 1 << 20),
    "max_position_embeddings": Range(1, 1 << 20),
    "n_head": Range(1, 1024),
    "decoder_attention_heads": Range(1, 1024),
    "n_embd": Range(1, 1 << 16),
    "d_model": Range(1, 1 << 16),
}
_TEXT_PARTS = ("decoder", "text_config")


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


def read_capped(path: Path, max_bytes: int) -> bytes:
    """Return the contents of the regular file ``path``, which may hold at most ``max_bytes`` bytes.

    Raises FileNotFoundError when it does not exist (callers decide whether that is an error) and ModelError (one
    line, naming the file) when it is not a regular file (a FIFO would block, a device never end), is larger than
    ``max_bytes`` or cannot be read.
    """
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as handle:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ModelError(f"{path}: not a regular file")
            # Read one byte more than allowed, so a file that grows while we read is still caught.
            data = handle.read(max_bytes + 1)
        except OSError as exc:
            raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ModelError(f"{path}: too large (more than {max_bytes} bytes allowed for this file)")
    return data


def read_json(path: Path, *, required: bool = True, max_bytes: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    """Return the JSON object in ``path`` ({} when it is missing and not required).

    This is the one reader for every JSON file of a model directory: the size is capped (``max_bytes``), and
    nesting deeper than :data:`MAX_JSON_DEPTH` levels, invalid UTF-8, invalid JSON (including numbers with more
    digits than Python converts) and a top level that is not an object are refused. Raises ModelError (one line,
    naming the file) for those, and when a required file is missing.
    """
    try:
        raw = read_capped(path, max_bytes)
    except FileNotFoundError:
        if required:
            raise ModelError(f"{path.parent}: missing {path.name}") from None
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except RecursionError:
        # The C decoder recurses once per level: a file of nothing but brackets exhausts the stack.
        raise ModelError(f"{path}: invalid JSON: nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as exc:  # e.g. an integer with more digits than int() accepts
        raise ModelError(f"{path}: invalid JSON: {_first_line(exc)}") from None
    except MemoryError:
        raise ModelError(f"{path}: invalid JSON: too large to parse") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object at the top level, got {_json_kind(data)}")
    if _depth_exceeds(data, MAX_JSON_DEPTH):
        # Parsed, but code that walks it (repr, json.dumps, validators) could still hit the recursion limit.
        raise ModelError(f"{path}: invalid JSON: nested more than {MAX_JSON_DEPTH} levels deep")
    return data


def _depth_exceeds(data: object, limit: int) -> bool:
    """True when ``data`` has containers nested more than ``limit`` deep (iterative: no recursion to exhaust)."""
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _json_kind(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), "null")


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def open_model_dir(path: Path) -> ModelDir:
    """Read and check the configuration files of the model directory ``path``; return them as a ModelDir.

    ``generation_config.json`` is optional (older exports keep generation settings in ``config.json``);
    ``config.json`` and ``preprocessor_config.json`` are required. Every setting capwatch uses is checked
    (:func:`check_model_files`). Raises ModelError (one line, naming the file and the key at fault).
    """
    if not path.exists():
        raise ModelError(f"{path}: model directory not found")
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory (expected a model directory with config.json and onnx/)")
    model = ModelDir(
        path=path,
        config=read_json(path / "config.json"),
        generation_config=read_json(path / "generation_config.json", required=False),
        preprocessor_config=read_json(path / "preprocessor_config.json"),
    )
    check_model_files(path, model.config, model.generation_config, model.preprocessor_config)
    return model


def text_parts(config: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The parts of config.json that describe the text decoder, most specific first, each with its key prefix.

    ``decoder`` (VisionEncoderDecoder) and ``text_config`` (Florence-2) when present, then the top level.
    """
    parts: list[tuple[str, Mapping[str, Any]]] = [
        (f"{key}.", config[key]) for key in _TEXT_PARTS if isinstance(config.get(key), Mapping)
    ]
    return [*parts, ("", config)]


def decoder_positions(config: Mapping[str, Any]) -> int | None:
    """Return how many positions the text decoder has (``n_positions`` / ``max_position_embeddings``), or None.

    Read from the decoder's own part of config.json first (see :func:`text_parts`); None when no part states it or
    the value is not a positive integer (:func:`check_model_files` reports that).
    """
    return _first_int(config, ("n_positions", "max_position_embeddings"))


def vocab_size(config: Mapping[str, Any]) -> int | None:
    """Return the text decoder's vocabulary size from config.json (as :func:`decoder_positions`), or None."""
    return _first_int(config, ("vocab_size",))


def _first_int(config: Mapping[str, Any], keys: Sequence[str]) -> int | None:
    for _prefix, part in text_parts(config):
        for key in keys:
            value = part.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_model_files(
    path: Path,
    config: Mapping[str, Any],
    generation_config: Mapping[str, Any],
    preprocessor_config: Mapping[str, Any],
) -> None:
    """Check every setting capwatch reads from a model directory's JSON files against sane bounds.

    config.json: the decoder's architecture keys (:data:`ARCHITECTURE_BOUNDS`) and any generation keys, at the top
    level and in its ``decoder`` / ``text_config`` part; generation_config.json: the generation keys; both with
    lengths bounded by the decoder's positions and token ids by its vocabulary
    (:func:`capwatch.models.generate.check_generation_keys`); preprocessor_config.json: everything
    :meth:`capwatch.models.preprocess.Preprocessor.from_config` uses. An empty mapping (a file that is missing and
    optional) is checked as the defaults. Returns None; raises ModelError with one line ``<file>: <key>: expected
    ..., got ...`` naming the allowed range, for the first bad key.
    """
    check_text_model_files(path, config, generation_config)
    try:
        Preprocessor.from_config(preprocessor_config)
    except ValueError as exc:
        raise ModelError(f"{path / 'preprocessor_config.json'}: {exc}") from None


def check_text_model_files(path: Path, config: Mapping[str, Any], generation_config: Mapping[str, Any]) -> None:
    """As :func:`check_model_files` for a text-to-text model (a translation model has no preprocessor config).

    Returns None; raises ModelError (one line ``<file>: <key>: expected ..., got ...``) for the first bad key.
    """
    config_file = path / "config.json"
    for key in _TEXT_PARTS:
        if config.get(key) is not None and not isinstance(config[key], Mapping):
            raise ModelError(f"{config_file}: {key}: expected an object, got {short_repr(config[key])}")
    parts = text_parts(config)
    for prefix, part in parts:
        for key, bounds in ARCHITECTURE_BOUNDS.items():
            value = part.get(key)
            if value is not None and (problem := bounds.problem(value, integer=True)) is not None:
                raise ModelError(f"{config_file}: {prefix}{key}: {problem}")
    positions, vocab = decoder_positions(config), vocab_size(config)
    sources = [(config_file, prefix, part) for prefix, part in parts]
    sources.append((path / "generation_config.json", "", generation_config))
    for file, prefix, data in sources:
        try:
            check_generation_keys(data, max_positions=positions, vocab_size=vocab, prefix=prefix)
        except ValueError as exc:
            raise ModelError(f"{file}: {exc}") from None


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
