"""The daemon's footprint next to the index: an exclusive lock and a live-state file for `capwatch status`.

Both live beside the index (``index.db.lock``, ``index.db.daemon.json``) so that any process that knows the index
finds the daemon that serves it, and a second daemon on the same index refuses to start.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capwatch.errors import CapwatchError


class DaemonAlreadyRunning(CapwatchError):
    """Another daemon holds the lock on the same index."""


# -- files next to the index ----------------------------------------------------------------------------------


def lock_path(index_path: Path) -> Path:
    """The lock file of the daemon that uses ``index_path``."""
    return index_path.with_name(index_path.name + ".lock")


def live_state_path(index_path: Path) -> Path:
    """The live-state JSON file of the daemon that uses ``index_path``."""
    return index_path.with_name(index_path.name + ".daemon.json")


class InstanceLock:
    """An exclusive ``flock`` on ``<index>.lock``, held for the daemon's lifetime (released by the kernel on
    any exit, including kill -9)."""

    def __init__(self, index_path: Path) -> None:
        self.path = lock_path(index_path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock. Raises DaemonAlreadyRunning (one line) when another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            other = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                who = f" (pid {other})" if other else ""
                raise DaemonAlreadyRunning(
                    f"another capwatch daemon{who} is already running on {self.path.with_suffix('')}"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a starting daemon)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or "0") or None
    except (OSError, ValueError):
        return None


def _lock_is_held(index_path: Path) -> bool:
    try:
        fd = os.open(lock_path(index_path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases the shared lock we may have taken
    return False


def read_live_state(index_path: Path) -> dict[str, Any] | None:
    """Return the running daemon's live state for ``index_path``, or None when no daemon runs.

    A state file left by a daemon that died (kill -9, power loss) is recognised by its lock being free, or its
    pid gone, and reported as None. Never raises.
    """
    path = live_state_path(Path(index_path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not _lock_is_held(Path(index_path)):
        return None
    pid = data.get("pid")
    if not isinstance(pid, int) or not _pid_alive(pid):
        return None
    return data


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user (the system service)
    return True


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``data`` as JSON in one rename (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
