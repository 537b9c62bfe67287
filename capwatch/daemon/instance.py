"""The daemon's footprint next to the index: an exclusive lock and a live-state file for `capwatch status`.

Both live beside the index (``index.db.lock``, ``index.db.daemon.json``) so that any process that knows the index
finds the daemon that serves it, and a second daemon on the same index refuses to start. A lock per library root
(:class:`RootLocks`, in the state directory) stops a second daemon on another index from watching the same folder.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from capwatch.errors import CapwatchError

log = logging.getLogger(__name__)


class DaemonAlreadyRunning(CapwatchError):
    """Another daemon holds the lock on the same index."""


class RootInUse(DaemonAlreadyRunning):
    """Another daemon, on another index, watches the same library root (``root``)."""

    def __init__(self, message: str, root: Path) -> None:
        super().__init__(message)
        self.root = root


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
            _lock_exclusive(fd)
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


def root_lock_path(root: Path, state_dir: Path) -> Path:
    """The lock file of library root ``root``: ``<state_dir>/roots/<hash of its real path>.lock``, so that a
    symlink to the folder or a path with ``..`` finds the same lock."""
    real = os.path.realpath(root)
    return state_dir / "roots" / f"{hashlib.sha256(os.fsencode(real)).hexdigest()[:32]}.lock"


class RootLocks:
    """Exclusive ``flock``s on the library roots one daemon watches, a file per root's real path in the state
    directory (:func:`root_lock_path`).

    Two daemons with different indexes on one folder would both caption its files and keep indexes that disagree;
    the index lock cannot see that, these locks do. Each file names its holder (pid, index, root) for the message
    the other daemon gives. Daemons see each other's locks when they share a state directory: the same user, or
    the same system service. The kernel releases them on any exit, kill -9 included.
    """

    def __init__(self, index_path: Path, state_dir: Path) -> None:
        self._index = index_path
        self._state_dir = state_dir
        self._held: dict[Path, int] = {}  # lock file -> its open, locked descriptor

    def hold(self, roots: Sequence[Path]) -> list[RootInUse]:
        """Hold the locks of exactly ``roots``: take those not held yet and release those of other roots.

        Returns a RootInUse (one line naming the other daemon's pid and index) for each root that another process
        holds; that root stays unlocked. A lock that cannot be taken for another reason (a read-only state
        directory) is skipped with a warning in the log: the daemon runs, it only cannot notice a second one there.
        """
        wanted = {root_lock_path(root, self._state_dir): root for root in roots}
        for path in [p for p in self._held if p not in wanted]:
            os.close(self._held.pop(path))
        busy: list[RootInUse] = []
        for path, root in wanted.items():
            if path in self._held:
                continue
            try:
                self._held[path] = self._take(path, root)
            except RootInUse as exc:
                busy.append(exc)
            except OSError as exc:
                log.warning("cannot lock root %s (%s: %s): another daemon watching it would not be noticed", root,
                            path, exc.strerror or exc)
        return busy

    def _take(self, path: Path, root: Path) -> int:
        """Lock ``path`` for ``root`` and return its descriptor; raises RootInUse when another process holds it,
        OSError when the file cannot be made or opened."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RootInUse(_root_in_use_message(root, holder), root) from None
            raise
        os.ftruncate(fd, 0)
        holder_info = {"pid": os.getpid(), "index": str(self._index), "root": str(root)}
        os.pwrite(fd, json.dumps(holder_info, ensure_ascii=False).encode(), 0)
        return fd

    def release(self) -> None:
        """Drop every lock (the files stay: removing one would race with a daemon taking it)."""
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()


def _read_holder(fd: int) -> dict[str, Any]:
    """What a root lock file says about its holder ({} when it says nothing readable yet)."""
    try:
        data = json.loads(os.pread(fd, 64 * 1024, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _root_in_use_message(root: Path, holder: Mapping[str, Any]) -> str:
    real = os.path.realpath(root)
    shown = str(root) if real == str(root) else f"{root} ({real})"
    who = ", ".join(f"{key} {holder[key]}" for key in ("pid", "index") if holder.get(key))
    return (f"{shown} is already watched by another capwatch daemon{f' ({who})' if who else ''}; two indexes of "
            "one folder would disagree: stop that daemon, or leave the folder to it")


def _lock_exclusive(fd: int, patience: float = 2.0) -> None:
    """flock ``fd`` exclusively, trying for ``patience`` seconds. Raises OSError (EWOULDBLOCK) when it stays held.

    `capwatch status` asks whether a daemon runs by taking a shared lock on the same file for a moment; a daemon
    starting in that moment must wait it out, not take the reader for a second daemon and refuse to start.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES) or time.monotonic() >= deadline:
                raise
        time.sleep(0.02)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or "0") or None
    except (OSError, ValueError):
        return None


def _lock_is_held(index_path: Path) -> bool | None:
    """Return whether a process holds the daemon lock of ``index_path``; None when this process may not open the
    lock file (another user's daemon with a private lock file: the caller then goes by the pid). Never raises."""
    try:
        fd = os.open(lock_path(index_path), os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:
        return None
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
    pid gone, and reported as None. Works for a reader that is not the daemon's user (``capwatch --system status``
    in the service's group): the lock is only opened read-only, and a lock file it may not open leaves the pid as
    the evidence. A state file it may not read gives None. Never raises.
    """
    path = live_state_path(Path(index_path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or _lock_is_held(Path(index_path)) is False:
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
