"""The model cache on disk as untrusted input: completion markers, stamps, and never following a link.

The cache may be shared, copied from another machine, or planted: every read here opens files with ``O_NOFOLLOW``
(a link is never followed, never read through), checks that folders below the cache directory are real folders,
and writes only under fresh names. Which markers are believed is decided by their stamp (``capwatch.models.stamp``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from capwatch.errors import ModelError
from capwatch.metadata.fsops import open_regular
from capwatch.models import stamp

MARKER_DIR = ".capwatch"
MARKER_FORMAT = 1


def marker_path(model_dir: Path, precision: str) -> Path:
    return model_dir / MARKER_DIR / f"{precision}.json"


def read_marker(path: Path) -> dict[str, Any] | None:
    """A completion marker (a regular file, never read through a link, at most 1 MiB), or None."""
    fd = open_regular(path)
    if fd is None:
        return None
    try:
        raw = os.read(fd, (1 << 20) + 1)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw.decode("utf-8")) if len(raw) <= 1 << 20 else None
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def markers(model_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """(precision, marker) for every readable marker in ``model_dir`` (none when the marker folder is a link)."""
    folder = model_dir / MARKER_DIR
    if not is_real_dir(folder):
        return []
    out = []
    for path in sorted(folder.glob("*.json")):
        data = read_marker(path)
        if data is not None:
            out.append((path.stem, data))
    return out


def stamped_marker(model_dir: Path, key: bytes | None) -> dict[str, Any] | None:
    """The newest marker in ``model_dir`` that capwatch stamped itself (provenance of a copied directory)."""
    best: dict[str, Any] | None = None
    for precision, data in markers(model_dir) if key is not None else []:
        assert key is not None
        if stamp.is_valid(key, model_dir, precision, data) and (
                best is None or str(data.get("pulled_at", "")) > str(best.get("pulled_at", ""))):
            best = data
    return best


def verified(model_dir: Path, key: bytes | None) -> frozenset[str]:
    """Precisions in ``model_dir`` whose files capwatch hashed itself and that are untouched since (stamp)."""
    if key is None:
        return frozenset()
    return frozenset(p for p, data in markers(model_dir) if stamp.is_valid(key, model_dir, p, data))


def marker_intact(model_dir: Path, marker: dict[str, Any]) -> bool:
    """Every listed file is a regular file (not a link) of the listed size: cheap, no hashing."""
    files = marker.get("files")
    if not isinstance(files, list) or not files:
        return False
    return all(isinstance(entry, dict) and stamp.listed_file(model_dir, entry) is not None for entry in files)


def is_real_dir(path: Path) -> bool:
    """True for a directory that is not a symlink."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def refuse_links(root: Path, path: Path) -> None:
    """Raise ModelError when ``path``, or any folder between ``root`` (the cache directory, which the user may
    have made a link on purpose) and it, is a symbolic link: nothing capwatch writes may land outside its cache."""
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ModelError(f"model cache: cannot check {current}: {exc.strerror or exc}") from None
        if stat.S_ISLNK(st.st_mode):
            raise ModelError(f"model cache: {current} is a symbolic link; capwatch never follows links inside its "
                             "cache (remove it)")


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``data`` as JSON (see :func:`write_atomic`)."""
    text = json.dumps(data, indent=1, sort_keys=True).encode("utf-8")
    write_atomic(path, lambda handle: handle.write(text))


def write_atomic(path: Path, write: Callable[[BinaryIO], object], mode: int = 0o644) -> None:
    """Replace ``path`` with what ``write`` puts into a fresh temp file beside it (``.NAME.PID-RANDOM.tmp``, never an
    existing file or link), flushed to disk before it is renamed over ``path``: after a crash, the old file or the
    new one. The temp file goes on any failure. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
