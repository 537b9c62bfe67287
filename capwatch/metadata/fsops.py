"""Small file-system operations shared by the atomic writer and the write journal."""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYNC_FILE_RANGE_WRITE = 2


def open_regular(path: Path) -> int | None:
    """A read-only descriptor of the regular file at ``path``, never through a symlink; None when ``path`` is
    missing, a link or not a regular file (the caller closes the descriptor). Raises nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def sha256_regular(path: Path) -> str | None:
    """The hex sha256 of the regular file at ``path``, never read through a symlink; None when ``path`` is missing,
    a link or not a regular file. Raises OSError when reading fails."""
    fd = open_regular(path)
    if fd is None:
        return None
    try:
        digest = hashlib.sha256()
        while block := os.read(fd, 1 << 20):
            digest.update(block)
        return digest.hexdigest()
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename or a new name in it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (certain network mounts) cannot fsync directories
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (os.write may write less than asked). Raises OSError."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def overwrite(path: Path, data: bytes, times: tuple[int, int] | None) -> None:
    """Write ``data`` into the existing file ``path`` in place (same inode), truncate, fsync, and set
    (atime_ns, mtime_ns) when ``times`` is given. Raises OSError."""
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        write_all(fd, data)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    if times is not None:
        os.utime(path, ns=times)


@functools.cache
def _sync_file_range() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    function = getattr(libc, "sync_file_range", None)
    if function is None:
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    result: Callable[..., int] = function
    return result


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages to disk now, without waiting (Linux
    sync_file_range SYNC_FILE_RANGE_WRITE): a later fsync then finds most of the work done. Not a durability
    guarantee (only fsync is); a no-op where unsupported. Raises nothing."""
    function = _sync_file_range()
    if function is not None:
        function(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    function: Callable[..., int] | None = getattr(libc, "renameat2", None)
    return function


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b`` (renameat2 RENAME_EXCHANGE): both must exist.

    Returns False when the system or file system cannot do it (then nothing happened); raises OSError for other
    failures (nothing happened either).
    """
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))
