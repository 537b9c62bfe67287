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

Why urllib and not ``huggingface_hub.hf_hub_download`` (which the first version of this module used):

* resume across runs: hub client versions up to 1.x keep ``<etag>.incomplete`` and continue it, but current
  releases (huggingface_hub PR #4228) download to a process-unique temporary file that is deleted on failure, so an
  interrupted 1 GB pull would start again from zero depending on which version is installed;
* "no network" must be one quick line: the client retries a dead network with backoff for ~25 s per request;
* it does not check sha256 at all, and it cannot report progress per chunk portably across 0.23 - 1.x;
* on Xet-backed repositories it writes a chunk cache under ``~/.cache/huggingface``, outside capwatch's cache.

The protocol used here is the hub's plain file endpoint, ``{endpoint}/{repo}/resolve/{revision}/{path}`` (HEAD
for metadata, GET with redirects to the CDN and ``Range`` to resume); ``$HF_ENDPOINT`` (mirrors) and
``$HF_TOKEN`` (sent only to the endpoint's own host, never to the CDN) are honoured, as are the usual
``https_proxy``/``no_proxy`` variables.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from capwatch import paths
from capwatch.config import ModelConfig
from capwatch.errors import ModelError
from capwatch.models.registry import (
    FAMILY_GRAPHS,
    PRECISION_SUFFIX,
    REGISTRY,
    FileSpec,
    ModelSpec,
    get_spec,
    is_commit,
)

DEFAULT_ENDPOINT = "https://huggingface.co"
MARKER_DIR = ".capwatch"
STAGING_DIR = ".staging"
MARKER_FORMAT = 1
#: Seconds to wait for the hub's answer to a metadata request (HEAD) before giving up.
METADATA_TIMEOUT = 15.0
#: Download attempts per file; each later attempt resumes the partial file with an HTTP Range request.
DOWNLOAD_ATTEMPTS = 3

ProgressCallback = Callable[[str, int, int], None]

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")


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
    default: bool
    #: Precisions with a complete, verified copy in the cache.
    cached_precisions: tuple[str, ...]
    #: Everything stored for this model, partial downloads included.
    bytes_on_disk: int
    description: str


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
) -> ResolvedModel:
    """The model directory ``config`` points at.

    ``config.dir`` set: that directory (it must exist). Otherwise the registry name's complete cached copy for
    ``config.precision``; when there is none and ``download`` is True (and ``$CAPWATCH_OFFLINE`` is not set) it is
    pulled first. Raises ModelError with one line saying how to fix it (pull on a machine with network and copy the
    cache directory, or ``--model DIR``).
    """
    if config.dir is not None:
        return _resolve_dir(config.dir, config.precision)
    spec = get_spec(config.name, registry)
    spec.precision(config.precision)  # unknown precision: one clear line before anything else
    found = _find_complete(models_root(env) / spec.name, spec, config.precision)
    if found is not None:
        return found
    if download and not is_offline(env):
        return pull(spec.name, config.precision, env, registry=registry)
    raise ModelError(_not_cached_message(spec, config.precision, env))


def pull(
    name: str,
    precision: str | None,
    env: Mapping[str, str],
    *,
    endpoint: str | None = None,
    progress: ProgressCallback | None = None,
    registry: Sequence[ModelSpec] = REGISTRY,
) -> ResolvedModel:
    """Download the files of ``name`` at ``precision`` (default: the model's default precision) into the cache.

    Resumable (a partial file continues with an HTTP Range request, also across runs), each file verified by size
    and sha256 before it is moved into the model directory; the precision is marked complete only when every file
    is in place. An already complete copy of a pinned revision is returned without touching the network.
    ``endpoint`` defaults to ``$HF_ENDPOINT`` or https://huggingface.co. ``progress(path, done, total)`` is called
    when each file starts and ends. With ``$CAPWATCH_OFFLINE`` set the network is never touched.

    Raises ModelError (one line) for an unknown name or precision, a missing repository/revision/file (HTTP 404),
    no network, a checksum mismatch (the file is deleted, nothing is marked complete) or a file-system error.
    """
    spec = get_spec(name, registry)
    chosen = precision or spec.default_precision
    files = spec.files(chosen)
    home = models_root(env) / spec.name
    found = _find_complete(home, spec, chosen)
    if is_offline(env):
        if found is not None:
            return found
        raise ModelError(_not_cached_message(spec, chosen, env))
    if found is not None and spec.pinned:
        return found
    base = (endpoint or env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    try:
        home.mkdir(parents=True, exist_ok=True)
        with _model_lock(home):
            return _pull_locked(spec, chosen, files, home, base, env, progress)
    except OSError as exc:
        raise ModelError(f"cannot write model {spec.name} into {home}: {exc.strerror or exc}") from None


def list_models(env: Mapping[str, str], *, registry: Sequence[ModelSpec] = REGISTRY) -> list[ModelStatus]:
    """Every registry model with its cached precisions and bytes on disk. Never touches the network."""
    root = models_root(env)
    out = []
    for spec in registry:
        home = root / spec.name
        cached = tuple(p for p in spec.precision_names if _find_complete(home, spec, p) is not None)
        out.append(ModelStatus(
            name=spec.name, repo=spec.repo, family=spec.family, default=spec.default, cached_precisions=cached,
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
        return _inspect_dir(directory, family_hint=None, marker_info=_any_marker(directory))
    home = models_root(env) / spec.name
    cached = [c for c in (_find_complete(home, spec, p) for p in spec.precision_names) if c is not None]
    approx = tuple((p.precision, p.approx_bytes) for p in spec.precisions)
    if not cached:
        return ModelInfo(
            name=spec.name, dir=None, repo=spec.repo, revision=spec.revision, commit=None, family=spec.family,
            model_type=None, precisions=(), tokenizer=None, special_tokens=(), image_size=None, generation=(),
            task_prompts=spec.task_prompts, description=spec.description, licence=spec.licence,
            approx_bytes=approx,
        )
    directory = cached[0].dir
    info = _inspect_dir(directory, family_hint=spec.family, marker_info=_any_marker(directory))
    return ModelInfo(
        name=spec.name, dir=directory, repo=spec.repo, revision=spec.revision, commit=cached[0].revision,
        family=spec.family, model_type=info.model_type, precisions=info.precisions, tokenizer=info.tokenizer,
        special_tokens=info.special_tokens, image_size=info.image_size, generation=info.generation,
        task_prompts=info.task_prompts or spec.task_prompts, description=spec.description, licence=spec.licence,
        approx_bytes=approx,
    )


# --------------------------------------------------------------------------------------------------------------
# Resolving


def _resolve_dir(directory: Path, precision: str) -> ResolvedModel:
    directory = directory.expanduser()
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise ModelError(f"model directory {directory} {what} (from --model, $CAPWATCH_MODEL or model.dir)")
    marker = _any_marker(directory)
    model_id = str(marker.get("repo")) if marker and marker.get("repo") else directory.resolve().name
    revision = str(marker["commit"]) if marker and marker.get("commit") else None
    return ResolvedModel(dir=directory, model_id=model_id, revision=revision, precision=precision, name=None)


def _not_cached_message(spec: ModelSpec, precision: str, env: Mapping[str, str]) -> str:
    flag = "" if precision == spec.default_precision else f" --precision {precision}"
    why = "offline ($CAPWATCH_OFFLINE) and " if is_offline(env) else ""
    return (
        f"model {spec.name} ({precision}) is {why}not in the cache {models_root(env)}: run "
        f"`capwatch models pull {spec.name}{flag}` (on a machine with network, then copy that directory here), "
        f"or use --model DIR"
    )


def _marker_path(model_dir: Path, precision: str) -> Path:
    return model_dir / MARKER_DIR / f"{precision}.json"


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def _any_marker(model_dir: Path) -> dict[str, Any] | None:
    """The newest completion marker in ``model_dir`` (any precision), for provenance of a copied directory."""
    markers = sorted((model_dir / MARKER_DIR).glob("*.json")) if (model_dir / MARKER_DIR).is_dir() else []
    best: dict[str, Any] | None = None
    for path in markers:
        data = _read_marker(path)
        if data is not None and (best is None or str(data.get("pulled_at", "")) > str(best.get("pulled_at", ""))):
            best = data
    return best


def _marker_intact(model_dir: Path, marker: dict[str, Any]) -> bool:
    # A stat per file, not a re-hash: this runs at every daemon start and the graphs are hundreds of MB. The hash
    # was checked when the file arrived; a truncated or deleted file still shows up here.
    files = marker.get("files")
    if not isinstance(files, list) or not files:
        return False
    for entry in files:
        if not isinstance(entry, dict):
            return False
        try:
            size = (model_dir / str(entry["path"])).stat().st_size
        except (OSError, KeyError):
            return False
        if size != entry.get("size"):
            return False
    return True


def _find_complete(home: Path, spec: ModelSpec, precision: str) -> ResolvedModel | None:
    """The cached copy of ``spec`` at ``precision`` whose marker is present and intact, else None."""
    if not home.is_dir():
        return None
    if spec.pinned:
        candidates = [home / spec.revision]
    else:
        candidates = [p for p in home.iterdir() if p.is_dir() and is_commit(p.name)]
    best: tuple[str, ResolvedModel] | None = None
    for model_dir in candidates:
        marker = _read_marker(_marker_path(model_dir, precision))
        if marker is None or marker.get("repo") != spec.repo or not _marker_intact(model_dir, marker):
            continue
        if not spec.pinned and marker.get("revision") != spec.revision:
            continue
        stamp = str(marker.get("pulled_at", ""))
        resolved = ResolvedModel(dir=model_dir, model_id=spec.repo, revision=model_dir.name, precision=precision,
                                 name=spec.name)
        if best is None or stamp > best[0]:  # for a branch, the most recently pulled commit wins
            best = (stamp, resolved)
    return best[1] if best else None


# --------------------------------------------------------------------------------------------------------------
# Pulling


@contextlib.contextmanager
def _model_lock(home: Path) -> Iterator[None]:
    # Two pulls of one model (a CLI pull while the daemon auto-pulls) would fight over the same staging files.
    with open(home / ".lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@dataclass(frozen=True)
class _Remote:
    """What the hub says about one file: the commit it resolved to, its size and its checksum."""

    commit: str | None
    size: int | None
    sha256: str | None
    git_sha1: str | None


class _Transient(Exception):
    """A failure worth retrying (network trouble, a short body, a 5xx): the next attempt resumes."""


def _pull_locked(
    spec: ModelSpec,
    precision: str,
    files: tuple[FileSpec, ...],
    home: Path,
    endpoint: str,
    env: Mapping[str, str],
    progress: ProgressCallback | None,
) -> ResolvedModel:
    # Resolve the revision once, from the first required file, and fetch every file at that commit: a branch
    # that moves in the middle of a pull must not mix files from two commits.
    anchor = next(f for f in files if not f.optional)
    first = _remote_file(spec, anchor, spec.revision, endpoint, env)
    commit = first.commit if first is not None else None
    if commit is None or not is_commit(commit):
        raise ModelError(f"{endpoint} did not report a commit for {spec.repo}@{spec.revision}; is it a model hub?")
    if spec.pinned and commit != spec.revision:
        raise ModelError(f"{endpoint} served {spec.repo} at commit {commit} instead of the pinned {spec.revision}")
    model_dir = home / commit
    staging = home / STAGING_DIR / commit
    records: list[dict[str, Any]] = []
    for file in files:
        remote = first if file is anchor else _remote_file(spec, file, commit, endpoint, env)
        if remote is None:  # an optional file the repository does not have
            continue
        expected_sha = _expected_sha256(spec, file, remote, commit)
        expected_size = remote.size if remote.size is not None else file.size
        target = model_dir / file.path
        if progress is not None:
            progress(file.path, 0, expected_size or 0)
        if not _already_in_place(target, expected_size, expected_sha, remote.git_sha1):
            staged = _download(spec, file, commit, endpoint, staging, expected_size, env, progress)
            _verify(spec, file, commit, staged, expected_size, expected_sha, remote.git_sha1, staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
        size = target.stat().st_size
        records.append({"path": file.path, "size": size, "sha256": expected_sha or _sha256(target)})
        if progress is not None:
            progress(file.path, size, size)
    marker = {
        "format": MARKER_FORMAT, "name": spec.name, "repo": spec.repo, "revision": spec.revision, "commit": commit,
        "precision": precision, "endpoint": endpoint, "files": records,
        "pulled_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    _write_json_atomic(_marker_path(model_dir, precision), marker)
    _drop_staging(staging)
    return ResolvedModel(dir=model_dir, model_id=spec.repo, revision=commit, precision=precision, name=spec.name)


def _file_url(endpoint: str, repo: str, revision: str, path: str) -> str:
    return f"{endpoint}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(path)}"


def _remote_file(
    spec: ModelSpec, file: FileSpec, revision: str, endpoint: str, env: Mapping[str, str]
) -> _Remote | None:
    """Ask the hub (HEAD) for one file's commit, size and checksum; None for a missing optional file.

    Raises ModelError (one line) for a missing repository, revision or required file, a refusal, or when the hub
    cannot be reached after a few quick attempts.
    """
    url = _file_url(endpoint, spec.repo, revision, file.path)
    problem = ""
    for attempt in range(DOWNLOAD_ATTEMPTS):
        if attempt:
            time.sleep(0.2 * attempt)
        try:
            with _open(url, "HEAD", env) as response:
                status, headers = response.status, _lower(response.headers)
        except _Transient as exc:
            problem = str(exc)
            continue
        except urllib.error.HTTPError as exc:
            status, headers = exc.code, _lower(exc.headers)
            exc.close()
        if status == 404 and file.optional and headers.get("x-error-code", "EntryNotFound") == "EntryNotFound":
            return None
        failure = _status_failure(status, headers, spec, file.path, revision, endpoint)
        if isinstance(failure, ModelError):
            raise failure
        if failure:
            problem = failure
            continue
        etag = (headers.get("x-linked-etag") or headers.get("etag") or "").strip()
        etag = etag.removeprefix("W/").strip('"').lower()
        size = headers.get("x-linked-size") or headers.get("content-length")
        return _Remote(
            commit=headers.get("x-repo-commit"),
            size=int(size) if size and size.isdigit() else None,
            sha256=etag if _SHA256_RE.match(etag) else None,
            git_sha1=etag if _SHA1_RE.match(etag) else None,
        )
    raise ModelError(_network_message(spec, endpoint, problem, env))


def _status_failure(
    status: int, headers: Mapping[str, str], spec: ModelSpec, path: str, revision: str, endpoint: str
) -> ModelError | str | None:
    """None for a usable answer, a reason string for one worth retrying, a ModelError for a final one."""
    if status < 400:
        return None
    if status >= 500 or status == 429:
        return f"HTTP {status}"
    where = f"{spec.repo}@{revision[:12] if is_commit(revision) else revision}"
    code = headers.get("x-error-code", "")
    if code == "RepoNotFound":
        return ModelError(f"{spec.repo}: repository not found on {endpoint} (HTTP {status})")
    if code == "RevisionNotFound":
        return ModelError(f"{spec.repo}: revision {revision} not found on {endpoint} (HTTP {status})")
    if status == 404:
        return ModelError(f"{where}: file {path} not found on {endpoint} (HTTP 404)")
    if status in (401, 403):
        return ModelError(f"{where}: access to {path} refused by {endpoint} (HTTP {status}; is HF_TOKEN needed?)")
    return ModelError(f"{where}: {endpoint} answered HTTP {status} for {path}")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Redirects are followed by _open itself: the hub answers LFS files with a redirect to its CDN that carries the
    # file's sha256 and size in X-Linked-* headers (only on the redirect), and a token must not follow to the CDN.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@contextlib.contextmanager
def _open(
    url: str, method: str, env: Mapping[str, str], *, offset: int = 0, follow: bool = False
) -> Iterator[http.client.HTTPResponse]:
    """Send one request; with ``follow`` also follow redirects to other hosts (without the token).

    Relative redirects (a renamed repository) are always followed, as the hub client does. Yields the response;
    raises urllib.error.HTTPError for an error status (or an unfollowed redirect) and _Transient for network
    trouble.
    """
    opener = urllib.request.build_opener(_NoRedirect())
    origin = urllib.parse.urlsplit(url).netloc
    for _hop in range(10):
        headers = {"User-Agent": "capwatch", "Accept-Encoding": "identity"}
        token = env.get("HF_TOKEN")
        if token and urllib.parse.urlsplit(url).netloc == origin:
            headers["Authorization"] = f"Bearer {token}"
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(url, method=method, headers=headers)
        try:
            response = opener.open(request, timeout=METADATA_TIMEOUT)
        except urllib.error.HTTPError as exc:
            location = exc.headers.get("Location", "") if 300 <= exc.code < 400 else ""
            if location and (follow or not urllib.parse.urlsplit(location).netloc):
                exc.close()
                url = urllib.parse.urljoin(url, location)
                continue
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError, refused, reset, timeout
            raise _Transient(_first_line(getattr(exc, "reason", None) or exc)) from None
        with response:
            yield response
        return
    raise _Transient(f"too many redirects for {url}")


def _lower(headers: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}


def _network_message(spec: ModelSpec, endpoint: str, problem: str, env: Mapping[str, str]) -> str:
    return (
        f"cannot download {spec.name} from {endpoint} ({problem or 'no answer'}): run "
        f"`capwatch models pull {spec.name}` on a machine with network and copy {models_root(env)} here, "
        f"or use --model DIR"
    )


def _expected_sha256(spec: ModelSpec, file: FileSpec, remote: _Remote, commit: str) -> str | None:
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


def _already_in_place(target: Path, size: int | None, sha256: str | None, git_sha1: str | None) -> bool:
    """True when a verified copy from an earlier (interrupted or other-precision) pull is already in place."""
    try:
        actual = target.stat().st_size
    except OSError:
        return False
    if size is not None and actual != size:
        return False
    if sha256 is not None:
        return _sha256(target) == sha256
    return git_sha1 is not None and _git_blob_sha1(target) == git_sha1


def _download(
    spec: ModelSpec,
    file: FileSpec,
    commit: str,
    endpoint: str,
    staging: Path,
    size: int | None,
    env: Mapping[str, str],
    progress: ProgressCallback | None,
) -> Path:
    """Fetch one file into ``staging/<path>.part``, resuming what an earlier attempt or run left there.

    Retries network trouble and short bodies (each retry asks for the rest with a Range request). Returns the
    part file (complete, not yet verified). Raises ModelError (one line) when the hub refuses or cannot be reached.
    """
    part = staging / f"{file.path}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    url = _file_url(endpoint, spec.repo, commit, file.path)
    problem = ""

    def report(done: int) -> None:
        if progress is not None:
            progress(file.path, done, size or 0)

    for attempt in range(DOWNLOAD_ATTEMPTS):
        if attempt:
            time.sleep(0.2 * attempt)
        offset = part.stat().st_size if part.exists() else 0
        if size is not None and offset > size:  # not ours to resume: start over
            part.unlink()
            offset = 0
        if size is not None and offset == size:
            return part
        try:
            _fetch(url, part, offset, size, env, report)
            return part
        except _Transient as exc:
            problem = str(exc)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416:  # our part is not a prefix the server recognises
                part.unlink(missing_ok=True)
                problem = "HTTP 416"
                continue
            failure = _status_failure(exc.code, _lower(exc.headers), spec, file.path, commit, endpoint)
            if isinstance(failure, ModelError):
                raise failure from None
            problem = failure or f"HTTP {exc.code}"
    raise ModelError(_network_message(spec, endpoint, problem, env))


def _fetch(
    url: str, part: Path, offset: int, size: int | None, env: Mapping[str, str], report: Callable[[int], None]
) -> None:
    """GET ``url`` from byte ``offset`` and append to ``part``; raises _Transient when the body comes up short."""
    with _open(url, "GET", env, offset=offset, follow=True) as response:
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            match = re.match(r"bytes (\d+)-", content_range)
            if match is None or int(match.group(1)) != offset:
                raise _Transient(f"unexpected Content-Range {content_range!r} for a request from byte {offset}")
            mode, done = "ab", offset
        else:  # 200: the server ignored the Range header, so the body is the whole file
            mode, done = "wb", 0
        length = response.headers.get("Content-Length")
        expected_end = done + int(length) if length and length.isdigit() else size
        with open(part, mode) as out:
            while True:
                try:
                    block = response.read(1 << 20)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Transient(_first_line(exc)) from None
                if not block:
                    break
                out.write(block)
                done += len(block)
                report(done)
            out.flush()
            os.fsync(out.fileno())
        if expected_end is not None and done < expected_end:
            # http.client returns a short body quietly when the connection drops; what arrived is kept.
            raise _Transient(f"connection closed after {done} of {expected_end} bytes")


def _verify(
    spec: ModelSpec,
    file: FileSpec,
    commit: str,
    staged: Path,
    size: int | None,
    sha256: str | None,
    git_sha1: str | None,
    staging: Path,
) -> None:
    """Check size and checksum of a downloaded file; on a mismatch delete it (and the staging area) and raise."""
    where = f"{spec.repo}/{file.path}@{commit[:12]}"
    actual = staged.stat().st_size
    problem = None
    if size is not None and actual != size:
        problem = f"size {actual} bytes, expected {size}"
    elif sha256 is not None:
        got = _sha256(staged)
        if got != sha256:
            problem = f"sha256 {got}, expected {sha256}"
    elif git_sha1 is not None:
        got = _git_blob_sha1(staged)
        if got != git_sha1:
            problem = f"git blob sha1 {got}, expected {git_sha1}"
    if problem is None:
        return
    staged.unlink(missing_ok=True)
    # The resumable part of a corrupt download must not be resumed either: start clean next time.
    _drop_staging(staging)
    raise ModelError(f"{where}: checksum mismatch ({problem}); the download was deleted and nothing was cached")


def _first_line(exc: object) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.splitlines()[0].split())[:200]


# --------------------------------------------------------------------------------------------------------------
# Files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    """The git object id of a file, which the hub reports as the ETag of files not stored in LFS."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _drop_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()  # only when no other commit is half-downloaded


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _tree_bytes(root: Path) -> int:
    total = 0
    if not root.is_dir():
        return 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


# --------------------------------------------------------------------------------------------------------------
# Inspecting a model directory


_KNOWN_SUFFIXES = ("_quantized", "_fp16", "_q4f16", "_q4", "_bnb4", "_int8", "_uint8")
_PRECISION_OF_SUFFIX = {suffix: precision for precision, suffix in PRECISION_SUFFIX.items()}
_FAMILY_OF_MODEL_TYPE = {"florence2": "florence2", "vision-encoder-decoder": "vision-encoder-decoder"}
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "forced_bos_token_id",
               "forced_eos_token_id")
_GENERATION_KEYS = ("num_beams", "max_length", "max_new_tokens", "min_length", "no_repeat_ngram_size",
                    "early_stopping", "length_penalty", "do_sample")


def _load_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{path}: not valid JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def _graph_precision(stem: str) -> tuple[str, str | None]:
    """Split an ONNX file stem into (graph, precision); precision None for variants capwatch does not run."""
    for suffix in _KNOWN_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)], _PRECISION_OF_SUFFIX.get(suffix)
    return stem, "fp32"


def _precisions(directory: Path, family: str | None) -> tuple[PrecisionInfo, ...]:
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
        marker = _read_marker(_marker_path(directory, precision))
        out.append(PrecisionInfo(
            precision=precision, files=files, bytes=sum(size for _, size in files),
            complete=bool(needed) and needed <= present[precision],
            verified=marker is not None and _marker_intact(directory, marker),
        ))
    return tuple(out)


def _tokenizer_kind(directory: Path) -> str | None:
    path = directory / "tokenizer.json"
    if path.is_file():
        data = _load_json(path) or {}
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


def _special_tokens(config: dict[str, Any] | None, generation: dict[str, Any] | None) -> tuple[tuple[str, int], ...]:
    # generation_config.json is what generate() uses, so it wins; then the top-level config; then the text part
    # of a composite config (decoder for VisionEncoderDecoder, text_config for Florence-2).
    sources: list[dict[str, Any]] = [generation or {}, config or {}]
    for key in ("decoder", "text_config"):
        sub = (config or {}).get(key)
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


def _image_size(preprocessor: dict[str, Any] | None) -> tuple[int, int] | None:
    if not preprocessor:
        return None
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


def _task_prompts(preprocessor: dict[str, Any] | None) -> tuple[tuple[str, str], ...]:
    prompts = (preprocessor or {}).get("task_prompts_without_inputs")
    if not isinstance(prompts, dict):
        return ()
    return tuple((str(k), str(v)) for k, v in prompts.items() if isinstance(v, str))


def _inspect_dir(directory: Path, *, family_hint: str | None, marker_info: dict[str, Any] | None) -> ModelInfo:
    config = _load_json(directory / "config.json")
    generation = _load_json(directory / "generation_config.json")
    preprocessor = _load_json(directory / "preprocessor_config.json")
    model_type = str(config["model_type"]) if config and isinstance(config.get("model_type"), str) else None
    family = family_hint or (_FAMILY_OF_MODEL_TYPE.get(model_type, model_type) if model_type else None)
    gen = tuple((k, generation[k]) for k in _GENERATION_KEYS if generation and k in generation)
    return ModelInfo(
        name=marker_info.get("name") if marker_info else None,
        dir=directory,
        repo=marker_info.get("repo") if marker_info else None,
        revision=marker_info.get("revision") if marker_info else None,
        commit=marker_info.get("commit") if marker_info else None,
        family=family,
        model_type=model_type,
        precisions=_precisions(directory, family),
        tokenizer=_tokenizer_kind(directory),
        special_tokens=_special_tokens(config, generation),
        image_size=_image_size(preprocessor),
        generation=gen,
        task_prompts=_task_prompts(preprocessor),
        description=None,
        licence=None,
    )
