"""The model store: find named models in the cache offline (verifying a copy capwatch has not stamped), pull them
when asked, list them, inspect any model directory.

Layout under ``capwatch.paths.cache_dir(env)`` (``$CAPWATCH_CACHE_DIR`` wins)::

    models/<name>/<commit>/                              the model directory handed to the engine (hub layout)
    models/<name>/<commit>/.capwatch/<precision>.json    completion marker: files, sizes, sha256, where from
    models/<name>/.staging/<commit>/<path>.part          downloads in progress (resumed with HTTP Range)
    models/<name>/.lock                                  one pull per model at a time (flock)

A precision is usable only when its completion marker exists and every file it lists is present with the
recorded size, so a half-pulled model is never used.

Fetching and verifying the files of a pull lives in ``capwatch.models.fetch``; network access (HEAD for metadata,
GET with Range to resume) in ``capwatch.models.hub``; describing a directory in ``capwatch.models.modelinfo``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capwatch import paths
from capwatch.config import ModelConfig
from capwatch.errors import ModelError
from capwatch.models import cache, stamp
from capwatch.models.cache import MARKER_DIR
from capwatch.models.fetch import (
    DEFAULT_ENDPOINT,
    PlanCallback,
    ProgressCallback,
    model_lock,
    models_root,
    pull_locked,
)
from capwatch.models.modelinfo import ModelInfo, PrecisionInfo, inspect_dir
from capwatch.models.registry import (
    REGISTRY,
    Kind,
    ModelSpec,
    custom_spec,
    get_spec,
    is_commit,
    precision_key,
)

__all__ = [
    "ModelInfo", "ModelStatus", "PlanCallback", "PrecisionInfo", "ProgressCallback", "ResolvedModel", "find_model",
    "is_offline", "list_models", "model_info", "model_spec", "models_root", "pull", "resolve_model",
]


# --------------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class ResolvedModel:
    """A model directory ready for ``open_captioner``.

    ``model_id`` is the hub repository (or the directory name for a plain local directory), ``revision`` the commit
    the files came from (None when unknown), ``name`` the registry name (None for a local directory).
    """

    dir: Path
    model_id: str
    revision: str | None
    precision: str
    name: str | None


@dataclass(frozen=True)
class ModelStatus:
    """One registry entry as ``capwatch models list`` shows it."""

    name: str
    repo: str
    family: str
    #: "caption" ([model]) or "embed" ([embed], search by meaning).
    kind: str
    default: bool
    #: Precisions with a complete, verified copy in the cache.
    cached_precisions: tuple[str, ...]
    #: Everything stored for this model, partial downloads included.
    bytes_on_disk: int
    description: str


# --------------------------------------------------------------------------------------------------------------
# Public API


def is_offline(env: Mapping[str, str]) -> bool:
    """True when ``$CAPWATCH_OFFLINE`` asks capwatch never to touch the network."""
    return env.get("CAPWATCH_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model(
    config: ModelConfig,
    env: Mapping[str, str],
    *,
    download: bool = False,
    registry: Sequence[ModelSpec] = REGISTRY,
    kind: Kind = "caption",
) -> ResolvedModel:
    """The model directory ``config`` points at.

    ``config.dir`` set: that directory (it must exist). Otherwise the registry name's complete cached copy for
    ``config.precision``; when there is none and ``download`` is True (and ``$CAPWATCH_OFFLINE`` is not set) it is
    pulled first. Raises ModelError with one line saying how to fix it (pull on a machine with network and copy the
    cache directory, or ``--model DIR``).
    """
    if config.dir is not None:
        return _resolve_dir(config.dir, config.precision, env)
    found = find_model(config, env, registry=registry, kind=kind)
    if found is not None:
        return found
    spec = model_spec(config, registry, kind=kind)
    wanted = wanted_precision(spec, config)
    if download and not is_offline(env):
        return pull(spec.name, wanted, env, registry=_with_spec(spec, registry))
    raise ModelError(_not_cached_message(spec, wanted, env))


def model_spec(config: ModelConfig, registry: Sequence[ModelSpec] = REGISTRY, *, kind: Kind = "caption") -> ModelSpec:
    """The spec of the named model ``config`` asks for: the registry entry called ``config.name``, or, with
    ``config.repo`` set, a spec for that hub repository (cached under ``config.name``).

    Checks ``config.precision`` and ``config.graph_precision`` against it too. Never touches the disk or the
    network. Raises ModelError (one line) for an unknown name, a precision or graph the model does not publish, an
    unusable repository or revision, a revision without a repository, or a model of another ``kind`` (an
    embedding model named as the captioner, or the other way round).
    """
    if config.repo is not None:
        spec = custom_spec(config.name, config.repo, config.revision)
    elif config.revision is not None:
        raise ModelError(f"model.revision {config.revision!r} needs model.repo (the registry pins its own models)")
    else:
        spec = get_spec(config.name, registry)
    if spec.kind != kind:
        raise ModelError(_wrong_kind(spec, kind, registry))
    spec.precision(wanted_precision(spec, config))
    return spec


def _wrong_kind(spec: ModelSpec, kind: Kind, registry: Sequence[ModelSpec]) -> str:
    others = ", ".join(s.name for s in registry if s.kind == kind)
    what = {"caption": "captioning model", "embed": "image–text embedding model", "translate": "translation model"}
    where = {"caption": "[model] name", "embed": "[embed] model", "translate": "[language] models"}
    article = {"caption": "a", "embed": "an", "translate": "a"}
    return (f"model {spec.name} is {article[spec.kind]} {what[spec.kind]}, not {article[kind]} {what[kind]} "
            f"({where[kind]}): set it as {where[spec.kind]}; {what[kind]}s: {others}")


def find_model(
    config: ModelConfig, env: Mapping[str, str], *, registry: Sequence[ModelSpec] = REGISTRY,
    kind: Kind = "caption",
) -> ResolvedModel | None:
    """The model ``config`` points at if it is there now, without touching the network.

    ``config.dir`` set: that directory, or None while it does not exist (a mount not there yet). Otherwise the
    complete, verified cached copy of the named model (see :func:`model_spec`) at its precision, or None when the
    cache has none (a partial download does not count). Raises ModelError (one line) for an unknown name or
    precision, or a ``dir`` that exists but is not a directory.
    """
    if config.dir is not None:
        if not config.dir.expanduser().exists():
            return None
        return _resolve_dir(config.dir, config.precision, env)
    spec = model_spec(config, registry, kind=kind)
    wanted = wanted_precision(spec, config)
    return _find_complete(models_root(env) / spec.name, spec, wanted, env, verify=True)


def wanted_precision(spec: ModelSpec, config: ModelConfig) -> str:
    """The precision key (see registry.precision_key) the configuration asks of ``spec``: with precision "auto"
    and no graph_precision, the model's default mix; otherwise the configured precision (auto: the default one)
    with the configured per-graph exceptions."""
    if config.precision == "auto" and not config.graph_precision:
        return spec.default_key
    base = spec.default_precision if config.precision == "auto" else config.precision
    return precision_key(base, config.graph_precision)


def _with_spec(spec: ModelSpec, registry: Sequence[ModelSpec]) -> Sequence[ModelSpec]:
    # A spec built from the configuration (model.repo) goes first, so it wins over a registry entry of its name.
    return registry if spec in registry else (spec, *registry)


def pull(
    name: str,
    precision: str | None,
    env: Mapping[str, str],
    *,
    endpoint: str | None = None,
    progress: ProgressCallback | None = None,
    registry: Sequence[ModelSpec] = REGISTRY,
    on_plan: PlanCallback | None = None,
) -> ResolvedModel:
    """Download the files of ``name`` at ``precision`` (default: the model's default precision) into the cache.

    Resumable (a partial file continues with an HTTP Range request, also across runs), each file verified by size
    and sha256 before it is moved into the model directory; the precision is marked complete only when every file
    is in place. An already complete copy of a pinned revision is returned without touching the network.
    ``endpoint`` defaults to ``$HF_ENDPOINT`` or https://huggingface.co. ``progress(path, done, total)`` is called
    when each file starts, after every 1 MiB that arrives, and when it is in place; ``on_plan`` once with every
    file's path and size, before the first byte arrives (for progress over the whole model). An exception raised
    by either callback ends the pull (what arrived is kept for the next one) and propagates. With
    ``$CAPWATCH_OFFLINE`` set the network is never touched.

    Raises ModelError (one line) for an unknown name or precision, a missing repository/revision/file (HTTP 404),
    no network (ModelUnreachable: trying again later may work), a checksum mismatch (the file is deleted, nothing
    is marked complete) or a file-system error.
    """
    spec = get_spec(name, registry)
    chosen = precision or spec.default_precision
    files = spec.files(chosen)
    home = models_root(env) / spec.name
    found = _find_complete(home, spec, chosen, env, verify=True)
    if is_offline(env):
        if found is not None:
            return found
        raise ModelError(f"cannot download {spec.name}: CAPWATCH_OFFLINE is set (unset it, or copy a cache "
                         f"that has it into {models_root(env)})")
    if found is not None and spec.pinned:
        return found
    base = (endpoint or env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    cache_root = paths.cache_dir(env)
    try:
        cache.refuse_links(cache_root, home)
        home.mkdir(parents=True, exist_ok=True)
        cache.refuse_links(cache_root, home)  # created by someone else a moment ago, as a link
        with model_lock(home):
            model_dir = pull_locked(spec, chosen, files, home, cache_root, base, env, progress, on_plan)
        return ResolvedModel(dir=model_dir, model_id=spec.repo, revision=model_dir.name, precision=chosen,
                             name=spec.name)
    except OSError as exc:
        raise ModelError(f"cannot write model {spec.name} into {home}: {exc.strerror or exc}") from None


def list_models(env: Mapping[str, str], *, registry: Sequence[ModelSpec] = REGISTRY) -> list[ModelStatus]:
    """Every registry model with its cached precisions and bytes on disk. Never touches the network."""
    root = models_root(env)
    out = []
    for spec in registry:
        home = root / spec.name
        cached = tuple(p for p in spec.precision_names if _find_complete(home, spec, p, env) is not None)
        out.append(ModelStatus(
            name=spec.name, repo=spec.repo, family=spec.family, kind=spec.kind, default=spec.default,
            cached_precisions=cached,
            bytes_on_disk=_tree_bytes(home), description=spec.description,
        ))
    return out


def model_info(
    name_or_dir: str, env: Mapping[str, str], *, registry: Sequence[ModelSpec] = REGISTRY
) -> ModelInfo:
    """Describe a registry model (its cached copy when there is one) or any local model directory.

    Never touches the network. Raises ModelError (one line) when ``name_or_dir`` is neither a registry name nor an
    existing directory, or a config file in the directory is not valid JSON.
    """
    spec = next((s for s in registry if s.name == name_or_dir), None)
    if spec is None:
        directory = Path(name_or_dir).expanduser()
        if not directory.is_dir():
            known = ", ".join(s.name for s in registry)
            raise ModelError(f"{name_or_dir}: neither a known model ({known}) nor a model directory")
        if not (directory / "config.json").is_file() and not any(directory.glob("*.onnx")) \
                and not any(directory.glob("onnx/*.onnx")):
            raise ModelError(f"{directory}: not a model directory (no config.json and no ONNX graphs)")
        key = stamp.existing_key(env)
        return inspect_dir(directory, provenance=cache.stamped_marker(directory, key),
                           verified=cache.verified(directory, key))
    home = models_root(env) / spec.name
    cached = [c for c in (_find_complete(home, spec, p, env) for p in spec.precision_names) if c is not None]
    approx = tuple((p.precision, p.approx_bytes) for p in spec.precisions)
    if not cached:
        return ModelInfo(
            name=spec.name, dir=None, repo=spec.repo, revision=spec.revision, commit=None, family=spec.family,
            model_type=None, precisions=(), tokenizer=None, special_tokens=(), image_size=None, generation=(),
            task_prompts=spec.task_prompts, description=spec.description, licence=spec.licence,
            approx_bytes=approx,
        )
    directory = cached[0].dir
    info = inspect_dir(directory, family_hint=spec.family, verified=cache.verified(directory, stamp.existing_key(env)))
    return dataclasses.replace(
        info, name=spec.name, repo=spec.repo, revision=spec.revision, commit=cached[0].revision,
        task_prompts=info.task_prompts or spec.task_prompts, description=spec.description, licence=spec.licence,
        approx_bytes=approx,
    )


# --------------------------------------------------------------------------------------------------------------
# Resolving


def _resolve_dir(directory: Path, precision: str, env: Mapping[str, str]) -> ResolvedModel:
    directory = directory.expanduser()
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise ModelError(f"model directory {directory} {what} (from --model, $CAPWATCH_MODEL or model.dir)")
    # The repository and commit a folder claims become the provenance written into every photo: believed only from
    # a marker capwatch stamped itself.
    marker = cache.stamped_marker(directory, stamp.existing_key(env))
    model_id = str(marker.get("repo")) if marker and marker.get("repo") else directory.resolve().name
    revision = str(marker["commit"]) if marker and marker.get("commit") else None
    return ResolvedModel(dir=directory, model_id=model_id, revision=revision, precision=precision, name=None)


def _not_cached_message(spec: ModelSpec, precision: str, env: Mapping[str, str]) -> str:
    flag = "" if precision == spec.default_precision else f" --precision {precision}"
    why = "offline ($CAPWATCH_OFFLINE) and " if is_offline(env) else ""
    if spec.from_config:
        # `models pull` knows registry names only; a model.repo model is pulled by the command that uses it.
        return (f"model {spec.name} ({spec.repo}@{spec.revision}, {precision}) is {why}not in the cache "
                f"{models_root(env)}: run capwatch once with network access (it downloads it), or use --model DIR")
    local = "[embed] model = DIR ($CAPWATCH_EMBED_MODEL)" if spec.kind == "embed" else "--model DIR"
    return (
        f"model {spec.name} ({precision}) is {why}not in the cache {models_root(env)}: run "
        f"`capwatch models pull {spec.name}{flag}` (on a machine with network, then copy that directory here), "
        f"or use {local}"
    )


def _find_complete(home: Path, spec: ModelSpec, precision: str, env: Mapping[str, str], *,
                   verify: bool = False) -> ResolvedModel | None:
    """The cached copy of ``spec`` at ``precision`` whose marker is present and whose files are intact, else None.

    A copy capwatch has stamped is taken at once. One it has not (a cache copied from another machine, or planted)
    is, with ``verify``, hashed once: every file must match the registry's sha256 pin where there is one, and the
    marker's sum otherwise; then it is stamped. Without ``verify`` (listing) an unstamped intact copy counts as
    cached. Links inside the cache are never followed.
    """
    if not cache.is_real_dir(home) or not cache.is_real_dir(home.parent):
        return None
    candidates = [home / spec.revision] if spec.pinned else [p for p in home.iterdir() if is_commit(p.name)]
    key = stamp.local_key(env) if verify else stamp.existing_key(env)
    best: tuple[str, ResolvedModel] | None = None
    for model_dir in candidates:
        if not cache.is_real_dir(model_dir):
            continue
        marker = cache.read_marker(cache.marker_path(model_dir, precision)) \
            if cache.is_real_dir(model_dir / MARKER_DIR) else None
        if marker is None or marker.get("repo") != spec.repo or not cache.marker_intact(model_dir, marker):
            continue
        if not spec.pinned and marker.get("revision") != spec.revision:
            continue
        if verify and not (key is not None and stamp.is_valid(key, model_dir, precision, marker)):
            assert key is not None
            if not _reverify(spec, model_dir, precision, marker, key):
                continue
        stamp_time = str(marker.get("pulled_at", ""))
        resolved = ResolvedModel(dir=model_dir, model_id=spec.repo, revision=model_dir.name, precision=precision,
                                 name=spec.name)
        if best is None or stamp_time > best[0]:  # for a branch, the most recently pulled commit wins
            best = (stamp_time, resolved)
    return best[1] if best else None


def _reverify(spec: ModelSpec, model_dir: Path, precision: str, marker: dict[str, Any], key: bytes) -> bool:
    """Hash every file of an unstamped copy; stamp it when all match (registry pins first, then the marker)."""
    pins = {f.path: f.sha256 for f in spec.files(precision) if f.sha256}
    for entry in marker["files"]:
        expected = pins.get(entry["path"]) or entry.get("sha256")
        try:
            actual = stamp.sha256_nofollow(model_dir / entry["path"])
        except OSError:
            return False
        if actual != expected:
            return False
    signed = stamp.compute(key, model_dir, precision, marker["files"])
    if signed is None:
        return False
    cache.write_json_atomic(cache.marker_path(model_dir, precision), {**marker, "stamp": signed})
    return True


# --------------------------------------------------------------------------------------------------------------
# Files


def _tree_bytes(root: Path) -> int:
    total = 0
    if not root.is_dir():
        return 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
