"""Opening a photo (or sidecar) for reading so that whatever its name now leads to costs one line, never a hang.

Every reader in capwatch learns about a file from a stat or a directory listing and opens it a moment later; in
between, anything may be swapped in under the same name. A FIFO blocks ``open()`` until a writer appears (for
ever, if none does) and a character device (``/dev/zero``) never ends; either would hold a worker, a decode slot
or the daemon's model thread. :func:`open_file` opens with ``O_NONBLOCK`` (a FIFO opens at once) and keeps the
descriptor only when ``fstat`` says it is a regular file; everything then reads from that one descriptor.

:func:`open_beneath` is the same below a root folder, for the web page: the path is walked from the root's
descriptor without following any symbolic link (``openat2`` with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`` where
the kernel has it, otherwise one ``O_NOFOLLOW`` step per component), so a folder swapped for a link after the
path was checked cannot lead out of the root.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import stat
from pathlib import Path
from typing import BinaryIO, Literal

_BASE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
#: openat2(2) is syscall 437 on every architecture with the unified syscall table (Linux 5.6+).
_OPENAT2 = 437
_OPENAT2_MACHINES = frozenset({"x86_64", "amd64", "aarch64", "arm64", "riscv64", "ppc64le", "ppc64", "s390x",
                               "armv7l", "armv8l", "loongarch64"})
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08

Method = Literal["auto", "openat2", "walk"]


class NotRegularFile(OSError):
    """The name leads to a FIFO, socket or device rather than a file (``strerror`` says which, in one line)."""


def file_kind(mode: int) -> str:
    """What a non-regular file of this ``st_mode`` is, for a message ("a FIFO", "a socket", ...)."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a file"


def _keep_regular(fd: int, path: str | os.PathLike[str]) -> int:
    """``fd`` when it is a regular file; otherwise closes it and raises IsADirectoryError or NotRegularFile."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if stat.S_ISREG(mode):
        # O_NONBLOCK was only for the open; some FUSE file systems would honour it on reads of a regular file.
        os.set_blocking(fd, True)
        return fd
    os.close(fd)
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", os.fspath(path))
    raise NotRegularFile(errno.EINVAL, f"not a regular file ({file_kind(mode)})", os.fspath(path))


def open_file(path: str | os.PathLike[str], *, noatime: bool = True) -> int:
    """A read-only descriptor of the regular file ``path`` names (symlinks followed), opened without blocking
    and, where the OS allows it (the file's owner or root), without updating its access time.

    The caller closes it. Raises NotRegularFile (a FIFO, socket or device: nothing was read from it),
    IsADirectoryError, FileNotFoundError or another OSError. Never blocks on the kind of file it finds.
    """
    noatime_flag = getattr(os, "O_NOATIME", 0) if noatime else 0
    try:
        fd = os.open(path, _BASE_FLAGS | noatime_flag)
    except PermissionError:
        if not noatime_flag:
            raise
        fd = os.open(path, _BASE_FLAGS)
    return _keep_regular(fd, path)


def open_binary(path: str | os.PathLike[str], *, noatime: bool = True) -> BinaryIO:
    """:func:`open_file` as a binary file object (closing it closes the descriptor). Raises as open_file."""
    return os.fdopen(open_file(path, noatime=noatime), "rb")


def read_regular(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit`` + 1 when a limit is given, so a caller can tell
    that it was over). Raises as :func:`open_file`."""
    with open_binary(path) as handle:
        return handle.read() if limit is None else handle.read(limit + 1)


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


@functools.cache
def _syscall() -> object | None:
    """libc's syscall(), when openat2 can be asked for on this machine at all."""
    if platform.system() != "Linux" or platform.machine().lower() not in _OPENAT2_MACHINES:
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_long
    return function


def _openat2(dir_fd: int, relative: str, flags: int) -> int | None:
    """openat2(dir_fd, relative, flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS); None
    when the kernel (or a seccomp filter) does not offer it. Raises OSError as open would."""
    function = _syscall()
    if function is None:
        return None
    how = _OpenHow(flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = int(function(ctypes.c_long(_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(os.fsencode(relative)),  # type: ignore[operator]
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))))
    if fd >= 0:
        return fd
    code = ctypes.get_errno()
    # ENOSYS: an older kernel; EPERM: a seccomp filter refusing unknown calls; EINVAL/E2BIG: a kernel that does
    # not know these resolve flags. The walk is as strict, only slower.
    if code in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG):
        return None
    raise OSError(code, os.strerror(code), relative)


def _walk(dir_fd: int, parts: list[str], flags: int) -> int:
    """Open ``parts`` below ``dir_fd`` one component at a time, never following a symbolic link (O_NOFOLLOW on
    each step: a link anywhere is ELOOP or ENOTDIR). Raises OSError."""
    current = dir_fd
    try:
        for part in parts[:-1]:
            step = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                           dir_fd=current)
            if current != dir_fd:
                os.close(current)
            current = step
        return os.open(parts[-1], flags | _NOFOLLOW, dir_fd=current)
    finally:
        if current != dir_fd:
            os.close(current)


def open_beneath(root: Path, path: Path, *, method: Method = "auto") -> int:
    """A read-only, non-blocking descriptor of the regular file ``path``, which must lie below the folder
    ``root`` (both already resolved: ``path`` is checked lexically against ``root`` first), reached from the
    root's descriptor without following any symbolic link on the way, so that nothing swapped in after the
    check can lead outside ``root``.

    ``method``: "openat2" (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), "walk" (an O_NOFOLLOW step per component), or
    "auto" (openat2 where the kernel has it, else the walk); both refuse the same things. The caller closes the
    descriptor. Raises OSError: ELOOP, ENOTDIR or EXDEV for a link on the way, NotRegularFile for a FIFO or a
    device, IsADirectoryError, FileNotFoundError when gone.
    """
    try:
        relative = path.relative_to(root)
    except ValueError:
        raise OSError(errno.EXDEV, "not below the folder", os.fspath(path)) from None
    parts = list(relative.parts)
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise OSError(errno.EXDEV, "not below the folder", os.fspath(path))
    flags = _BASE_FLAGS
    dir_fd = os.open(root, os.O_RDONLY | _DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = _openat2(dir_fd, "/".join(parts), flags) if method in ("auto", "openat2") else None
        if fd is None:
            if method == "openat2":
                raise OSError(errno.ENOSYS, "openat2 is not available here", os.fspath(path))
            fd = _walk(dir_fd, parts, flags)
    finally:
        os.close(dir_fd)
    return _keep_regular(fd, path)


def openat2_available() -> bool:
    """True when this kernel answers openat2 (tests run both ways where it does)."""
    dir_fd = os.open("/", os.O_RDONLY | _DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = _openat2(dir_fd, ".", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return True  # it answered (with a refusal)
    finally:
        os.close(dir_fd)
    if fd is None:
        return False
    os.close(fd)
    return True
