"""Replace a file's content so that a failure at any point (exception, disk full, kill -9) leaves either the old
or the new content, never a mix, and no stray temp file after the next ``remove_stale_temp_files``.

Normal path: temp file in the same directory (``.<name>.capwatch-<pid>-<random>.tmp``), write, fsync, copy mode,
owner, extended attributes and (optionally) atime/mtime, re-check that the original did not change meanwhile,
``os.replace``, fsync the directory.

Hard-linked files (and files whose owner we cannot reproduce) are edited in place so every link sees the change
and the inode keeps its owner: first a complete copy of the original is written and fsynced as
``.<name>.capwatch-<pid>-<random>.bak``; then the new content is written into the file and fsynced; then the copy is
removed. If the process dies in between, ``remove_stale_temp_files`` finds the copy and restores the original
from it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from capwatch.errors import MetadataError
from capwatch.metadata.binary import open_noatime

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.capwatch-(?P<pid>\d+)-[0-9a-f]{8}\.(?P<kind>tmp|bak)$")
#: A temp file younger than this whose process still runs belongs to a live writer and is left alone.
LIVE_GRACE_SECONDS = 3600.0


@dataclass(frozen=True)
class Tail:
    """Bytes ``[offset, offset + length)`` of the original file, copied kernel-side (copy_file_range) instead of
    through Python: the image data of a JPEG never passes through user space."""

    offset: int
    length: int


Part = bytes | memoryview | Tail
Content = bytes | Sequence[Part]


class FileChanged(MetadataError):
    """The file changed or vanished while capwatch was preparing its write; nothing was written."""


def is_temp_file(name: str) -> bool:
    """True for capwatch's own temp/backup file names (the watcher and scanner ignore them)."""
    return _TEMP_RE.match(os.path.basename(name)) is not None


def temp_path(target: Path, kind: str) -> Path:
    """A name beside ``target`` that is_temp_file recognises (``kind``: tmp or bak)."""
    return target.with_name(f".{target.name}.capwatch-{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (e.g. certain network mounts) cannot fsync directories
    finally:
        os.close(fd)


def _describe(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "not enough space to write (" + (exc.strerror or "disk full") + ")"
    return exc.strerror or str(exc)


@contextlib.contextmanager
def discard_on_failure(temp: Path, what: str) -> Iterator[None]:
    """Remove ``temp`` when the block fails; an OSError becomes one line, ``"{what}: {reason}"``.

    Other errors (FileChanged, KeyboardInterrupt, ...) pass through unchanged after the clean-up.
    """
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise MetadataError(f"{what}: {_describe(exc)}") from None
        raise


def same_file_state(a: os.stat_result, b: os.stat_result) -> bool:
    """True when two stats describe the same, unchanged file (inode, size and mtime)."""
    return (a.st_ino, a.st_dev, a.st_size, a.st_mtime_ns) == (b.st_ino, b.st_dev, b.st_size, b.st_mtime_ns)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Append ``length`` bytes from ``src_fd`` at ``offset`` to ``dst_fd`` (at its current position)."""
    end = offset + length
    copy_file_range = getattr(os, "copy_file_range", None)
    if copy_file_range is not None:
        try:
            while offset < end:
                n = copy_file_range(src_fd, dst_fd, end - offset, offset_src=offset)
                if n == 0:
                    break
                offset += n
        except OSError as exc:
            # Not supported here (old kernel, cross-device, some FUSE/NFS): fall back to plain reads.
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise
    while offset < end:
        chunk = os.pread(src_fd, min(1 << 20, end - offset), offset)
        if not chunk:
            break
        write_all(dst_fd, chunk)
        offset += len(chunk)
    if offset != end:
        raise FileChanged("file shrank during the write; left alone")


def _parts(content: Content) -> Sequence[Part]:
    return [content] if isinstance(content, bytes) else content


def materialise(path: Path, content: Content) -> bytes:
    """The complete new content as bytes (reads Tail parts from ``path``). Raises OSError."""
    out = bytearray()
    for part in _parts(content):
        if isinstance(part, Tail):
            with open_noatime(path) as f:
                f.seek(part.offset)
                data = f.read(part.length)
            if len(data) != part.length:
                raise FileChanged(f"{path}: file shrank during the write; left alone")
            out += data
        else:
            out += part
    return bytes(out)


def _write_parts(fd: int, path: Path, content: Content, expected: os.stat_result) -> int:
    """Write all parts to ``fd``; returns the number of bytes written. Raises FileChanged / OSError."""
    total = 0
    src_fd: int | None = None
    try:
        for part in _parts(content):
            if isinstance(part, Tail):
                if src_fd is None:
                    src_fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOATIME", 0))
                    if not same_file_state(os.fstat(src_fd), expected):
                        raise FileChanged(f"{path}: file changed during the write; left alone")
                _copy_range(src_fd, fd, part.offset, part.length)
                total += part.length
            else:
                write_all(fd, part)
                total += len(part)
    finally:
        if src_fd is not None:
            os.close(src_fd)
    return total


def _copy_xattrs(src: Path, dst_fd: int) -> None:
    if not hasattr(os, "listxattr"):
        return
    try:
        names = os.listxattr(src)
    except OSError:
        return
    for name in names:
        with contextlib.suppress(OSError):
            os.setxattr(dst_fd, name, os.getxattr(src, name))


def needs_in_place(st: os.stat_result) -> bool:
    """True when a rename would split hard links or lose the owner, so the file must be edited in place."""
    if st.st_nlink > 1:
        return True
    return hasattr(os, "geteuid") and os.geteuid() != 0 and st.st_uid != os.geteuid()


def replace_file(path: Path, data: Content, expected: os.stat_result, *, keep_mtime: bool = True,
                 before_commit: Callable[[], None] | None = None) -> None:
    """Atomically give ``path`` the content ``data`` (bytes, or parts: bytes and Tail ranges of the original;
    see module docstring), keeping mode, owner and xattrs, and atime/mtime when ``keep_mtime``.

    ``expected`` is the stat taken when the original was read; if the file changed since, FileChanged is raised
    and nothing is written. ``before_commit`` (tests) runs just before the point of no return. Raises
    MetadataError (one line) on any OS error; the original is then byte-identical and no temp file remains.
    """
    if needs_in_place(expected):
        try:
            whole = materialise(path, data)
        except OSError as exc:
            raise MetadataError(f"{path}: cannot read: {_describe(exc)}") from None
        _replace_in_place(path, whole, expected, keep_mtime=keep_mtime, before_commit=before_commit)
        return
    tmp = temp_path(path, "tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        raise MetadataError(f"{path}: cannot create a temp file: {_describe(exc)}") from None
    with discard_on_failure(tmp, f"{path}: write failed"):
        try:
            written = _write_parts(fd, path, data, expected)
            if os.fstat(fd).st_size != written:
                raise MetadataError(f"{path}: internal check failed: temp file has the wrong size")
            os.fchmod(fd, stat.S_IMODE(expected.st_mode))
            if hasattr(os, "fchown") and (expected.st_uid, expected.st_gid) != (os.geteuid(), os.getegid()):
                with contextlib.suppress(PermissionError):
                    # Group may fail for a non-root user outside the group: keeping the mode matters more.
                    os.fchown(fd, expected.st_uid, expected.st_gid)
            _copy_xattrs(path, fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        if keep_mtime:
            os.utime(tmp, ns=(expected.st_atime_ns, expected.st_mtime_ns))
        _check_unchanged(path, expected)
        if before_commit is not None:
            before_commit()
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def _check_unchanged(path: Path, expected: os.stat_result) -> None:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        raise FileChanged(f"{path}: file vanished during the write; left alone") from None
    if not same_file_state(now, expected):
        raise FileChanged(f"{path}: file changed during the write; left alone")


def _replace_in_place(path: Path, data: bytes, expected: os.stat_result, *, keep_mtime: bool,
                      before_commit: Callable[[], None] | None) -> None:
    backup = temp_path(path, "bak")
    with discard_on_failure(backup, f"{path}: write failed"):
        with open_noatime(path) as f:
            original = f.read()
        if len(original) != expected.st_size:
            raise FileChanged(f"{path}: file changed during the write; left alone")
        fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            write_all(fd, original)
            os.fsync(fd)
        finally:
            os.close(fd)
        # The copy carries the original's mtime; the file keeps that mtime until the copy is gone, so recovery
        # can tell "possibly half-written by us" (same mtime) from "changed by someone since" (different).
        os.utime(backup, ns=(expected.st_atime_ns, expected.st_mtime_ns))
        _fsync_dir(path.parent)
    try:
        _check_unchanged(path, expected)
        if before_commit is not None:
            before_commit()
        _overwrite(path, data, expected)
    except BaseException as exc:
        # The file may be half-written: put the original back from the verified copy before reporting.
        try:
            _overwrite(path, original, expected)
            os.unlink(backup)
        except OSError:
            pass  # the .bak stays; remove_stale_temp_files restores it on the next start
        if isinstance(exc, OSError):
            raise MetadataError(f"{path}: write failed: {_describe(exc)}") from None
        raise
    with contextlib.suppress(OSError):
        os.unlink(backup)
    _fsync_dir(path.parent)
    if not keep_mtime:
        with contextlib.suppress(OSError):
            os.utime(path)


def _overwrite(path: Path, data: bytes, times: os.stat_result | None) -> None:
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        write_all(fd, data)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    if times is not None:
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(directory: Path) -> int:
    """Delete capwatch temp files left in ``directory`` by a killed process and restore originals from
    in-place backups. Files of a still-running writer (live pid, recent) are left alone. Returns how many
    leftovers were cleaned up; never raises for an unreadable directory (returns 0)."""
    import time

    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    cleaned = 0
    now = time.time()
    for name in names:
        m = _TEMP_RE.match(name)
        if m is None:
            continue
        leftover = Path(directory) / name
        try:
            st = os.lstat(leftover)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if _pid_alive(int(m["pid"])) and now - st.st_ctime < LIVE_GRACE_SECONDS:
            continue
        try:
            if m["kind"] == "bak":
                target = Path(directory) / m["name"]
                if target.exists() and os.stat(target).st_mtime_ns == st.st_mtime_ns:
                    original = leftover.read_bytes()
                    if len(original) == st.st_size:
                        _overwrite(target, original, st)
            os.unlink(leftover)
            cleaned += 1
        except OSError:
            continue
    if cleaned:
        _fsync_dir(Path(directory))
    return cleaned
