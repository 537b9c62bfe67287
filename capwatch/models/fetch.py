"""Fetching one model's files from a hub into the cache: resumable, every file verified before it is used.

Layout under :func:`models_root` (see :mod:`capwatch.models.store` for the whole cache)::

    models/<name>/<commit>/                              the model directory handed to the engine (hub layout)
    models/<name>/<commit>/.capwatch/<precision>.json    completion marker: files, sizes, sha256, where from
    models/<name>/.staging/<commit>/<path>.part          downloads in progress (resumed with HTTP Range)
    models/<name>/.lock                                  one pull per model at a time (flock)

Each file is downloaded into the staging directory, verified (size; sha256 against the registry pin and against the
LFS sha256 the hub reports in ``X-Linked-Etag``; small non-LFS files against the git blob sha1 the hub reports as
``ETag``) and only then renamed into the model directory. A file that fails verification is deleted together with
the staging directory, and nothing is marked complete. The marker is written last, stamped (see
:mod:`capwatch.models.stamp`), so a half-pulled model is never used.

Network access (HEAD for metadata, GET with Range to resume) lives in ``capwatch.models.hub``; finding, listing and
describing cached models in ``capwatch.models.store``, which calls :func:`pull_locked` under :func:`model_lock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capwatch import paths
from capwatch.errors import ModelError, ModelUnreachable
from capwatch.models import cache, stamp
from capwatch.models.cache import MARKER_FORMAT
from capwatch.models.registry import FileSpec, ModelSpec, is_commit

if TYPE_CHECKING:
    # The network side (http.client, urllib, email: ~35 ms to import on this box) only when a pull talks to a
    # hub: a search that resolves a cached or local model never loads it.
    from capwatch.models import hub

DEFAULT_ENDPOINT = "https://huggingface.co"
STAGING_DIR = ".staging"
#: Room left free on the cache's file system after a pull, on top of the files themselves.
FREE_SPACE_MARGIN = 64 << 20

ProgressCallback = Callable[[str, int, int], None]
#: Called once per pull with (path, size) of every file it will fetch, before the first byte arrives.
PlanCallback = Callable[[Sequence[tuple[str, int]]], None]


def models_root(env: Mapping[str, str] = os.environ) -> Path:
    """The directory that holds pulled models (not created here)."""
    return paths.cache_dir(env) / "models"


@contextlib.contextmanager
def model_lock(home: Path) -> Iterator[None]:
    """Hold the model's pull lock (``home/.lock``, flock) for the block. Raises OSError."""
    # Two pulls of one model (a CLI pull while the daemon auto-pulls) would fight over the same staging files.
    fd = os.open(home / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def pull_locked(
    spec: ModelSpec,
    precision: str,
    files: tuple[FileSpec, ...],
    home: Path,
    cache_root: Path,
    endpoint: str,
    env: Mapping[str, str],
    progress: ProgressCallback | None,
    on_plan: PlanCallback | None = None,
) -> Path:
    """Fetch ``files`` of ``spec`` at ``precision`` into ``home/<commit>`` (the caller holds :func:`model_lock`),
    each verified before it is moved in, then write the stamped completion marker. Gives the model directory, named
    for the commit it came from. Raises ModelError (ModelUnreachable for the network) or OSError."""
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
    return model_dir


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
    from capwatch.models import hub

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

    from capwatch.models import hub

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
