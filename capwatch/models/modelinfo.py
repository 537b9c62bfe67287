"""Describe a model directory in the Hugging Face / transformers.js ONNX layout, for ``capwatch models info``.

Reads only the small JSON files and lists the ONNX graphs by precision (nothing is loaded into onnxruntime), so it
is cheap and works on any directory, complete or not.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capwatch.models.layout import MAX_TOKENIZER_BYTES, check_model_files, read_json
from capwatch.models.registry import FAMILY_GRAPHS, PRECISION_SUFFIX


@dataclass(frozen=True)
class PrecisionInfo:
    """The ONNX graphs of one precision found in a model directory (paths relative to it, sizes in bytes)."""

    precision: str
    files: tuple[tuple[str, int], ...]
    bytes: int
    #: Every graph the family needs is present.
    complete: bool
    #: A completion marker written by ``pull`` vouches for these files (sha256-verified at download).
    verified: bool


@dataclass(frozen=True)
class ModelInfo:
    """What ``capwatch models info NAME|DIR`` shows. Fields read from files are None when the file is absent."""

    name: str | None
    dir: Path | None
    repo: str | None
    revision: str | None
    commit: str | None
    family: str | None
    model_type: str | None
    precisions: tuple[PrecisionInfo, ...]
    tokenizer: str | None
    special_tokens: tuple[tuple[str, int], ...]
    image_size: tuple[int, int] | None
    generation: tuple[tuple[str, Any], ...]
    task_prompts: tuple[tuple[str, str], ...]
    description: str | None
    licence: str | None
    #: Registry estimate of each precision's download (registry names only).
    approx_bytes: tuple[tuple[str, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (paths as strings, pairs as objects)."""
        return {
            "name": self.name,
            "dir": str(self.dir) if self.dir is not None else None,
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "family": self.family,
            "model_type": self.model_type,
            "precisions": [
                {"precision": p.precision, "bytes": p.bytes, "complete": p.complete, "verified": p.verified,
                 "files": [{"path": f, "bytes": s} for f, s in p.files]}
                for p in self.precisions
            ],
            "tokenizer": self.tokenizer,
            "special_tokens": dict(self.special_tokens),
            "image_size": list(self.image_size) if self.image_size else None,
            "generation": dict(self.generation),
            "task_prompts": dict(self.task_prompts),
            "description": self.description,
            "licence": self.licence,
            "approx_bytes": dict(self.approx_bytes),
        }


_KNOWN_SUFFIXES = ("_quantized", "_fp16", "_q4f16", "_q4", "_bnb4", "_int8", "_uint8")
_PRECISION_OF_SUFFIX = {suffix: precision for precision, suffix in PRECISION_SUFFIX.items()}
_FAMILY_OF_MODEL_TYPE = {"florence2": "florence2", "vision-encoder-decoder": "vision-encoder-decoder",
                         "clip": "clip", "siglip": "siglip"}
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "forced_bos_token_id",
               "forced_eos_token_id")
_GENERATION_KEYS = ("num_beams", "max_length", "max_new_tokens", "min_length", "no_repeat_ngram_size",
                    "early_stopping", "length_penalty", "do_sample")


def _graph_precision(stem: str) -> tuple[str, str | None]:
    """Split an ONNX file stem into (graph, precision); precision None for variants capwatch does not run."""
    for suffix in _KNOWN_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)], _PRECISION_OF_SUFFIX.get(suffix)
    return stem, "fp32"


def _precisions(directory: Path, family: str | None, verified: Collection[str]) -> tuple[PrecisionInfo, ...]:
    found: dict[str, list[tuple[str, int]]] = {}
    present: dict[str, set[str]] = {}
    for folder in (directory, directory / "onnx"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.onnx")):
            graph, precision = _graph_precision(path.stem)
            if precision is None:
                continue
            found.setdefault(precision, []).append((path.relative_to(directory).as_posix(), path.stat().st_size))
            present.setdefault(precision, set()).add(graph)
    needed = set(next((graphs for name, graphs in FAMILY_GRAPHS.items() if name == family), ()))
    out = []
    for precision in ("int8", "fp32", "fp16"):
        if precision not in found:
            continue
        files = tuple(found[precision])
        out.append(PrecisionInfo(
            precision=precision, files=files, bytes=sum(size for _, size in files),
            complete=bool(needed) and needed <= present[precision], verified=precision in verified,
        ))
    return tuple(out)


def _tokenizer_kind(directory: Path) -> str | None:
    path = directory / "tokenizer.json"
    if path.is_file():
        data = read_json(path, max_bytes=MAX_TOKENIZER_BYTES)
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        kind = str(model.get("type") or "unknown model") if isinstance(model, dict) else "unknown model"
        pre = data.get("pre_tokenizer")
        byte_level = isinstance(pre, dict) and (
            pre.get("type") == "ByteLevel"
            or any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in pre.get("pretokenizers") or [])
        )
        return f"tokenizer.json ({kind}{', byte-level' if byte_level else ''})"
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return "vocab.json + merges.txt (BPE)"
    return None


def _special_tokens(config: Mapping[str, Any], generation: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    # generation_config.json is what generate() uses, so it wins; then the top-level config; then the text part
    # of a composite config (decoder for VisionEncoderDecoder, text_config for Florence-2).
    sources: list[Mapping[str, Any]] = [generation, config]
    for key in ("decoder", "text_config"):
        sub = config.get(key)
        if isinstance(sub, dict):
            sources.append(sub)
    out = []
    for key in _TOKEN_KEYS:
        for source in sources:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                out.append((key, value))
                break
    return tuple(out)


def _image_size(preprocessor: Mapping[str, Any]) -> tuple[int, int] | None:
    size = preprocessor.get("size", preprocessor.get("crop_size"))
    if isinstance(size, int) and not isinstance(size, bool):
        return (size, size)
    if isinstance(size, dict):
        height, width = size.get("height"), size.get("width")
        if isinstance(height, int) and isinstance(width, int):
            return (height, width)
        edge = size.get("shortest_edge")
        if isinstance(edge, int):
            return (edge, edge)
    return None


def _task_prompts(preprocessor: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    prompts = preprocessor.get("task_prompts_without_inputs")
    if not isinstance(prompts, dict):
        return ()
    return tuple((str(k), str(v)) for k, v in prompts.items() if isinstance(v, str))


def inspect_dir(
    directory: Path,
    *,
    family_hint: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    verified: Collection[str] = (),
) -> ModelInfo:
    """Describe ``directory``: model type and family from config.json, ONNX graphs per precision, tokenizer,
    special token ids, image size, generation defaults and task prompts.

    ``provenance`` (a store completion marker: name, repo, revision, commit) and ``verified`` (precisions whose
    files a marker vouches for) come from the caller. Missing files give None/empty fields. Raises ModelError (one
    line, naming the file) when a JSON file is unreadable, too large, nested too deeply or not a JSON object, and
    (naming the key and its allowed range) when a setting is out of bounds, exactly as opening the model would.
    """
    config = read_json(directory / "config.json", required=False)
    generation = read_json(directory / "generation_config.json", required=False)
    preprocessor = read_json(directory / "preprocessor_config.json", required=False)
    check_model_files(directory, config, generation, preprocessor)
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    family = family_hint or (_FAMILY_OF_MODEL_TYPE.get(model_type, model_type) if model_type else None)
    origin = provenance or {}
    return ModelInfo(
        name=_str_or_none(origin.get("name")),
        dir=directory,
        repo=_str_or_none(origin.get("repo")),
        revision=_str_or_none(origin.get("revision")),
        commit=_str_or_none(origin.get("commit")),
        family=family,
        model_type=model_type,
        precisions=_precisions(directory, family, verified),
        tokenizer=_tokenizer_kind(directory),
        special_tokens=_special_tokens(config, generation),
        image_size=_image_size(preprocessor),
        generation=tuple((k, generation[k]) for k in _GENERATION_KEYS if k in generation),
        task_prompts=_task_prompts(preprocessor),
        description=None,
        licence=None,
    )


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
