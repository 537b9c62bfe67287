"""Access to the index file for readers who may not write it (the system service's group).

SQLite needs a WAL database's ``-wal`` and ``-shm`` files to exist for a read-only connection; the last writer to
close deletes them, so a writable Index recreates them empty when it closes (:func:`keep_wal_files`, what SQLite's
own persistent-WAL mode leaves), and :func:`check_readable` names, in one line, the permission a reader lacks.
"""

from __future__ import annotations

import grp
import os
import stat
import time
from pathlib import Path

from capwatch.errors import IndexUnavailable
from capwatch.metadata.safeopen import open_binary


def _wal_files(path: Path) -> tuple[Path, Path]:
    return Path(f"{path}-wal"), Path(f"{path}-shm")


def keep_wal_files(path: Path) -> None:
    """Make sure the WAL files of the index at ``path`` exist: create ``-wal`` and ``-shm`` empty where they are
    missing, with the index file's mode and (when run as root) owner, as SQLite itself makes them.

    Why: SQLite opens a WAL database read-only only when both files exist, or the opener may create them in the
    index's folder (https://www.sqlite.org/walformat.html, "persistent WAL"; 3.22+ needs no write access to them).
    The last writer to close deletes them, which would lock out every reader that may read the index but not write
    its folder (the system service's group, ``capwatch --system search``). Python cannot set SQLite's
    ``SQLITE_FCNTL_PERSIST_WAL``, so capwatch puts them back: an empty ``-wal`` and ``-shm`` are exactly what a
    persistent-WAL close leaves, and every SQLite connection rebuilds the ``-shm`` from the ``-wal`` when no other
    connection has it open. Never replaces an existing file (O_EXCL), never follows a symlink; never raises.
    """
    try:
        st = os.stat(path)
    except OSError:
        return
    for name in _wal_files(path):
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         st.st_mode & 0o666)
        except OSError:
            continue  # there already (another connection opened meanwhile), or the folder is not writable
        try:
            os.fchmod(fd, st.st_mode & 0o666)  # as SQLite does: the index's mode, whatever the umask
            if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
                os.fchown(fd, st.st_uid, st.st_gid)
        except OSError:
            pass
        finally:
            os.close(fd)


def _group_hint(path: Path) -> str:
    """Return `` (its group NAME may read it: ...)`` when ``path``'s group may read it (enter it, for a folder) and
    this process is not in that group, else "". Never raises."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    needed = 0o010 if stat.S_ISDIR(st.st_mode) else 0o040
    if not st.st_mode & needed or st.st_gid in (os.getegid(), *os.getgroups()):
        return ""
    try:
        name = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        name = str(st.st_gid)
    return f" (its group {name} may read it: `sudo usermod -aG {name} $USER`, then log in again)"


def _is_wal_database(path: Path) -> bool:
    try:
        with open_binary(path, noatime=False) as handle:  # never blocks on a FIFO put in the index's place
            header = handle.read(20)
    except OSError:
        return False
    return len(header) == 20 and header.startswith(b"SQLite format 3\0") and header[19] == 2


def check_readable(path: Path, *, wait_seconds: float = 1.0) -> None:
    """Check that this process can open the index at ``path`` read-only, as far as permissions go.

    Returns when it can, or when ``path`` simply does not exist (the caller decides what that means). Raises
    IndexUnavailable with one line naming what is missing: search permission on a folder on the way, read
    permission on the index or on its ``-wal``/``-shm`` files, or (a WAL index whose ``-wal``/``-shm`` are absent)
    write permission on the folder, which SQLite then needs to create them. Absent WAL files are waited for up to
    ``wait_seconds``: a writer closing deletes them and (capwatch) puts them back a moment later.
    """
    path = Path(path)
    try:
        os.stat(path)
    except FileNotFoundError:
        return
    except PermissionError:
        blocked = next((p for p in reversed(path.parents) if p != path and not os.access(p, os.X_OK)), path.parent)
        raise IndexUnavailable(
            f"cannot read index {path}: no permission to enter {blocked}{_group_hint(blocked)}"
        ) from None
    except OSError as exc:
        raise IndexUnavailable(f"cannot read index {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.R_OK):
        raise IndexUnavailable(f"cannot read index {path}: permission denied{_group_hint(path)}")
    folder = path.parent
    deadline = time.monotonic() + wait_seconds
    while True:
        missing = [p for p in _wal_files(path) if not os.path.lexists(p)]
        if not missing or os.access(folder, os.W_OK) or not _is_wal_database(path):
            break
        if time.monotonic() >= deadline:
            names = " and ".join(p.name for p in missing)
            raise IndexUnavailable(
                f"cannot read index {path}: {names} missing and {folder} not writable for you (SQLite reads a WAL "
                f"index only when both exist; running the daemon or any writing capwatch command as the index's "
                f"owner puts them back)"
            )
        time.sleep(0.05)
    for name in _wal_files(path):
        if os.path.lexists(name) and not os.access(name, os.R_OK):
            raise IndexUnavailable(f"cannot read index {path}: {name} is not readable for you{_group_hint(name)}")
