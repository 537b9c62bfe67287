"""The model store: pull named models into the cache (resumable, sha256-verified), find them offline, inspect any
model directory.

Layout under ``capwatch.paths.cache_dir(env)`` (``$CAPWATCH_CACHE_DIR`` wins)::

    models/<name>/<commit>/                              the model directory handed to the engine (hub layout)
    models/<name>/<commit>/.capwatch/<precision>.json    completion marker: files, sizes, sha256, where from
    models/<name>/.staging/<commit>/<path>.part          downloads in progress (resumed with HTTP Range)
    models/<name>/.lock                                  one pull per model at a time (flock)

A precision is usable only when its completion marker exists and every file it lists is present with the
recorded size, so a half-pulled model is never used. Each file is downloaded into the staging directory, verified
(size; sha256 against the registry pin and against the LFS sha256 the hub reports in ``X-Linked-Etag``; small
non-LFS files against the git blob sha1 the hub reports as ``ETag``) and only then renamed into the model
directory. A file that fails verification is deleted together with the staging directory, and nothing is marked
complete.

Network access (HEAD for metadata, GET with Range to resume) lives in ``capwatch.models.hub``; describing a
directory in ``capwatch.models.modelinfo``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from capwatch import paths
from capwatch.config import ModelConfig
from capwatch.errors import ModelError, ModelUnreachable
from capwatch.models import cache, hub, stamp
from capwatch.models.cache import MARKER_DIR, MARKER_FORMAT
from capwatch.models.modelinfo import ModelInfo, PrecisionInfo, inspect_dir
from capwatch.models.registry import (
    REGISTRY,
    FileSpec,
    Kind,
    ModelSpec,
    custom_spec,
    get_spec,
    is_commit,
    precision_key,
)

DEFAULT_ENDPOINT = "https://huggingface.co"
STAGING_DIR = ".staging"
#: Room left free on the cache's file system after a pull, on top of the files themselves.
FREE_SPACE_MARGIN = 64 << 20

ProgressCallback = Callable[[str, int, int], None]
#: Called once per pull with (path, size) of every file it will fetch, before the first byte arrives.
PlanCallback = Callable[[Sequence[tuple[str, int]]], None]

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


def models_root(env: Mapping[str, str] = os.environ) -> Path:
    """The directory that holds pulled models (not created here)."""
    return paths.cache_dir(env) / "models"


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
        with _model_lock(home):
            return _pull_locked(spec, chosen, files, home, cache_root, base, env, progress, on_plan)
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
# Pulling


@contextlib.contextmanager
def _model_lock(home: Path) -> Iterator[None]:
    # Two pulls of one model (a CLI pull while the daemon auto-pulls) would fight over the same staging files.
    fd = os.open(home / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _pull_locked(
    spec: ModelSpec,
    precision: str,
    files: tuple[FileSpec, ...],
    home: Path,
    cache_root: Path,
    endpoint: str,
    env: Mapping[str, str],
    progress: ProgressCallback | None,
    on_plan: PlanCallback | None = None,
) -> ResolvedModel:
    # Resolve the revision once, from the first required file, and fetch every file at that commit: a branch
    # that moves in the middle of a pull must not mix files from two commits.
    anchor = next(f for f in files if not f.optional)
    first = _head(spec, anchor, spec.revision, endpoint, env)
    commit = first.commit if first is not None else None
    if commit is None or not is_commit(commit):
        raise ModelError(f"{endpoint} did not report a commit for {spec.repo}@{spec.revision}; is it a model hub?")
    if spec.pinned and commit != spec.revision:
        raise ModelError(f"{endpoint} served {spec.repo} at commit {commit} instead of the pinned {spec.revision}")
    model_dir = home / commit
    staging = home / STAGING_DIR / commit
    for folder in (model_dir, staging):
        cache.refuse_links(cache_root, folder)
    # Every size and checksum first: the whole pull is checked against the free space before a byte arrives.
    plan: list[tuple[FileSpec, hub.RemoteFile, str | None, int]] = []
    for file in files:
        remote = first if file is anchor else _head(spec, file, commit, endpoint, env)
        if remote is None:  # an optional file the repository does not have
            continue
        expected_sha = _expected_sha256(spec, file, remote, commit)
        expected_size = remote.size if remote.size is not None else file.size
        if expected_size is None:
            raise ModelError(f"{spec.repo}/{file.path}@{commit[:12]}: neither {endpoint} nor the registry gives "
                             "its size; refusing an unbounded download")
        # Without a registry pin the size is the mirror's word: no single file may be far larger than the model.
        ceiling = max(2 * spec.precision(precision).approx_bytes, 64 << 20)
        if file.size is None and expected_size > ceiling:
            raise ModelError(f"{spec.repo}/{file.path}@{commit[:12]}: {endpoint} announces {expected_size:,} bytes, "
                             f"far more than the whole model ({spec.precision(precision).approx_bytes:,}); refused")
        plan.append((file, remote, expected_sha, expected_size))
    _check_free_space(spec, cache_root, model_dir, staging, [(f.path, size) for f, _r, _s, size in plan])
    if on_plan is not None:
        on_plan([(f.path, size) for f, _r, _s, size in plan])
    records: list[dict[str, Any]] = []
    for file, remote, expected_sha, expected_size in plan:
        target = model_dir / file.path
        part = staging / f"{file.path}.part"
        cache.refuse_links(cache_root, target)
        cache.refuse_links(cache_root, part)
        if progress is not None:
            progress(file.path, 0, expected_size)
        computed = _already_in_place(target, expected_size, expected_sha, remote.git_sha1)
        if computed is None:
            staged = _download(spec, file, commit, endpoint, part, expected_size, env, progress)
            computed = _verify(spec, file, commit, staged, expected_size, expected_sha, remote.git_sha1, staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            cache.refuse_links(cache_root, target)
            os.replace(staged, target)
        size = os.lstat(target).st_size
        records.append({"path": file.path, "size": size, "sha256": computed})
        if progress is not None:
            progress(file.path, size, size)
    marker: dict[str, Any] = {
        "format": MARKER_FORMAT, "name": spec.name, "repo": spec.repo, "revision": spec.revision, "commit": commit,
        "precision": precision, "endpoint": endpoint, "files": records,
        "pulled_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    # capwatch hashed every file itself just now: stamp the marker so later starts trust it without hashing.
    signed = stamp.compute(stamp.local_key(env), model_dir, precision, records)
    if signed is not None:
        marker["stamp"] = signed
    cache.refuse_links(cache_root, cache.marker_path(model_dir, precision))
    cache.write_json_atomic(cache.marker_path(model_dir, precision), marker)
    _drop_staging(staging)
    return ResolvedModel(dir=model_dir, model_id=spec.repo, revision=commit, precision=precision, name=spec.name)


def _check_free_space(spec: ModelSpec, cache_root: Path, model_dir: Path, staging: Path,
                      files: Sequence[tuple[str, int]]) -> None:
    """Raise ModelError when the files still to download do not fit on the cache's file system (with a margin)."""
    needed = 0
    for relative, size in files:
        with contextlib.suppress(OSError):
            if os.lstat(model_dir / relative).st_size == size:
                continue  # already in place (checked by hash later)
        try:
            have = os.lstat(staging / f"{relative}.part").st_size
        except OSError:
            have = 0
        needed += max(0, size - have)
    if not needed:
        return
    probe = next((p for p in (staging, model_dir, model_dir.parent, cache_root) if p.exists()), cache_root)
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # cannot tell: the download itself reports a full disk
    if free < needed + FREE_SPACE_MARGIN:
        raise ModelError(f"not enough free space to pull {spec.name}: it needs {needed / 1e6:,.0f} MB more in "
                         f"{cache_root}, which has {free / 1e6:,.0f} MB free")


def _head(
    spec: ModelSpec, file: FileSpec, revision: str, endpoint: str, env: Mapping[str, str]
) -> hub.RemoteFile | None:
    try:
        return hub.head_file(endpoint, spec.repo, revision, file.path, env, optional=file.optional)
    except hub.Unreachable as exc:
        raise ModelUnreachable(_network_message(spec, endpoint, str(exc), env), problem=str(exc)) from None


def _network_message(spec: ModelSpec, endpoint: str, problem: str, env: Mapping[str, str]) -> str:
    # Also a mirror that was too slow: what arrived is kept, and the next pull resumes it.
    # `models pull` knows registry names only; a model.repo model is pulled again by whatever uses it next.
    again = "try again later" if spec.from_config else f"run `capwatch models pull {spec.name}` again later"
    return (
        f"cannot download {spec.name} from {endpoint} ({problem or 'no answer'}): {again} (it resumes), or on a "
        f"machine with network and copy {models_root(env)} here, or use --model DIR"
    )


def _expected_sha256(spec: ModelSpec, file: FileSpec, remote: hub.RemoteFile, commit: str) -> str | None:
    """The sha256 the file must have: the registry pin and the hub's LFS sha256 must agree when both exist."""
    where = f"{spec.repo}/{file.path}@{commit[:12]}"
    if file.sha256 and remote.sha256 and file.sha256 != remote.sha256:
        raise ModelError(f"{where}: the hub reports sha256 {remote.sha256} but the registry pins {file.sha256}")
    if file.size is not None and remote.size is not None and file.size != remote.size:
        raise ModelError(f"{where}: the hub reports {remote.size} bytes but the registry pins {file.size}")
    expected = file.sha256 or remote.sha256
    if expected is None and remote.git_sha1 is None:
        # Large files live in LFS, whose sha256 the hub always reports; with neither that nor a pin, nothing could
        # tell a corrupted graph from a good one.
        raise ModelError(f"{where}: the hub reported no checksum and the registry pins none; refusing to use it")
    return expected


def _already_in_place(target: Path, size: int, sha256: str | None, git_sha1: str | None) -> str | None:
    """The sha256 of a verified copy already in place from an earlier (interrupted or other-precision) pull, or
    None when there is none (missing, a link, another size or another content)."""
    try:
        st = os.lstat(target)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        return None
    try:
        actual = stamp.sha256_nofollow(target)
        if sha256 is not None:
            return actual if actual == sha256 else None
        return actual if git_sha1 is not None and _git_blob_sha1(target) == git_sha1 else None
    except OSError:
        return None


def _download(
    spec: ModelSpec,
    file: FileSpec,
    commit: str,
    endpoint: str,
    part: Path,
    size: int,
    env: Mapping[str, str],
    progress: ProgressCallback | None,
) -> Path:
    """Fetch one file into ``part`` (resuming a partial one). Returns the part file, unverified. Raises ModelError."""
    part.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(part)
    except FileNotFoundError:
        pass
    else:
        # Resume only what capwatch itself left there: a regular file of this user.
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise ModelError(f"model cache: {part} is not a partial download of this user; remove it")

    def report(done: int) -> None:
        if progress is not None:
            progress(file.path, done, size)

    try:
        hub.download_file(endpoint, spec.repo, commit, file.path, part, size, env, report)
    except hub.Unreachable as exc:
        raise ModelUnreachable(_network_message(spec, endpoint, str(exc), env), problem=str(exc)) from None
    return part


def _verify(
    spec: ModelSpec,
    file: FileSpec,
    commit: str,
    staged: Path,
    size: int | None,
    sha256: str | None,
    git_sha1: str | None,
    staging: Path,
) -> str:
    """Check size and checksum of a downloaded file and return its sha256 (computed here); on a mismatch delete it
    (and the staging area) and raise ModelError."""
    where = f"{spec.repo}/{file.path}@{commit[:12]}"
    actual = os.lstat(staged).st_size
    problem = None
    computed = ""
    if size is not None and actual != size:
        problem = f"size {actual} bytes, expected {size}"
    else:
        computed = stamp.sha256_nofollow(staged)
        if sha256 is not None and computed != sha256:
            problem = f"sha256 {computed}, expected {sha256}"
        elif sha256 is None and git_sha1 is not None:
            got = _git_blob_sha1(staged)
            if got != git_sha1:
                problem = f"git blob sha1 {got}, expected {git_sha1}"
    if problem is None:
        return computed
    staged.unlink(missing_ok=True)
    # The resumable part of a corrupt download must not be resumed either: start clean next time.
    _drop_staging(staging)
    raise ModelError(f"{where}: checksum mismatch ({problem}); the download was deleted and nothing was cached")


# --------------------------------------------------------------------------------------------------------------
# Files


def _git_blob_sha1(path: Path) -> str:
    """The git object id of a file (never read through a link), which the hub reports as the ETag of files not
    stored in LFS. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        digest = hashlib.sha1(f"blob {os.fstat(fd).st_size}\0".encode(), usedforsecurity=False)
        while block := os.read(fd, 1 << 20):
            digest.update(block)
        return digest.hexdigest()
    finally:
        os.close(fd)


def _drop_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()  # only when no other commit is half-downloaded


def _tree_bytes(root: Path) -> int:
    total = 0
    if not root.is_dir():
        return 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
