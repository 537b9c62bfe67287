"""Stamps that let capwatch recognise model files whose sha256 it computed itself.

A completion marker (``.capwatch/<precision>.json``) lists every file with its size and sha256. Anyone can write
such a file into a folder, so a marker alone proves nothing. After capwatch has hashed the files itself (when it
pulled them, or when it re-verified a copied cache against the registry's pins or the marker's sums), it adds a
*stamp*: an HMAC-SHA256, under a key that only this user (or service) holds, of the folder, the precision, and each
file's path, size, sha256, device, inode, mtime and ctime. Checking a stamp needs one ``lstat`` per file and no hashing;
a copied, planted or edited folder fails the check (other key, other inodes) and is hashed again once.

The key lives in the state directory (``$XDG_STATE_HOME/capwatch/model-key``, the service's ``$STATE_DIRECTORY``),
never in the model cache, which may be shared or copied between machines.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from capwatch import paths
from capwatch.errors import ModelError
from capwatch.metadata.fsops import sha256_regular

KEY_NAME = "model-key"
KEY_BYTES = 32


def local_key(env: Mapping[str, str]) -> bytes:
    """This user's stamp key, created (0600) on first use. Raises ModelError when it cannot be read or made, or
    when the key file is not a regular file owned by this user (a planted key would let anyone forge stamps)."""
    directory = paths.state_dir(env)
    path = directory / KEY_NAME
    try:
        return _read_key(path)
    except FileNotFoundError:
        return _create_key(directory, path)


def existing_key(env: Mapping[str, str]) -> bytes | None:
    """This user's stamp key if there is one (read-only commands do not create it: without a key, nothing has
    been stamped). Raises ModelError like :func:`local_key`."""
    try:
        return _read_key(paths.state_dir(env) / KEY_NAME)
    except FileNotFoundError:
        return None


def _read_key(path: Path) -> bytes:
    """The key at ``path``. Raises FileNotFoundError when there is none, ModelError when it is unusable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ModelError(f"cannot read the model stamp key {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ModelError(f"{path}: not a private file of this user; remove it and run again")
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise ModelError(f"{path}: damaged model stamp key; remove it and run again")
    return key


def _create_key(directory: Path, path: Path) -> bytes:
    """Make a new key at ``path`` atomically (written in full under a temp name, then linked into place without
    replacing anything), or read the one another process made first."""
    key = secrets.token_bytes(KEY_BYTES)
    tmp = directory / f".{KEY_NAME}.{os.getpid()}-{secrets.token_hex(4)}"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_key(path)
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise ModelError(f"cannot create the model stamp key {path}: {exc.strerror or exc}") from None
    return key


def _file_facts(model_dir: Path, entry: Mapping[str, Any]) -> list[Any] | None:
    """[path, size, sha256, dev, ino, mtime_ns, ctime_ns] of one listed file as it is now; None when it is missing,
    not a regular file (a symlink included) or has another size than listed. (ctime: content rewritten in place
    with its size and mtime put back still moves it.)"""
    sha256 = entry.get("sha256")
    st = listed_file(model_dir, entry)
    if st is None or not isinstance(sha256, str):
        return None
    return [entry["path"], st.st_size, sha256, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def listed_file(model_dir: Path, entry: Mapping[str, Any]) -> os.stat_result | None:
    """The lstat of a file a marker lists (``path`` relative, inside ``model_dir``), when it is a regular file (not
    a link) of the listed ``size``; None otherwise, and for a path that is absolute or climbs out with ``..``."""
    relative = entry.get("path")
    if not isinstance(relative, str) or Path(relative).is_absolute() or ".." in Path(relative).parts:
        return None
    try:
        st = os.lstat(model_dir / relative)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) and st.st_size == entry.get("size") else None


def compute(key: bytes, model_dir: Path, precision: str, files: Sequence[Mapping[str, Any]]) -> str | None:
    """The stamp of ``files`` (marker entries: path, size, sha256) as they are in ``model_dir`` now; None when a
    file is missing, changed size or is not a regular file."""
    facts = []
    for entry in files:
        fact = _file_facts(model_dir, entry)
        if fact is None:
            return None
        facts.append(fact)
    message = json.dumps({"dir": os.path.realpath(model_dir), "precision": precision, "files": facts},
                         sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def is_valid(key: bytes, model_dir: Path, precision: str, marker: Mapping[str, Any]) -> bool:
    """True when ``marker`` carries a stamp this key made for exactly these files, untouched since."""
    files = marker.get("files")
    recorded = marker.get("stamp")
    if not isinstance(files, list) or not files or not isinstance(recorded, str):
        return False
    expected = compute(key, model_dir, precision, files)
    return expected is not None and hmac.compare_digest(expected, recorded)


def sha256_nofollow(path: Path) -> str:
    """The sha256 of the regular file at ``path`` (never through a symlink). Raises OSError (ELOOP for a link)."""
    digest = sha256_regular(path)
    if digest is None:
        raise OSError(errno.EINVAL, "missing, a symbolic link, or not a regular file", os.fspath(path))
    return digest
