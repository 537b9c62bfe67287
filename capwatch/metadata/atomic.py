"""Replace a file's content as an optimistic transaction against the file as it was read.

The caller passes the :class:`FileIdentity` it read (inode, size, mtime, ctime, fingerprint). Nothing lands unless
the file still has exactly that identity right before the new content takes its place; otherwise
:class:`FileChanged` is raised and the file is left as the other program made it. A failure at any point
(exception, full disk, kill -9, power loss) leaves either the old or the new content, never a mix; every temp file
and backup is registered in the write journal first, so the next writing command removes or restores it by content
(:meth:`capwatch.metadata.journal.Journal.recover`).

Normal path: temp file in the same directory (``.<name>.capwatch-<pid>-<random>.tmp``), write, fsync, copy mode,
owner, extended attributes and (optionally) atime/mtime; check the identity; then *exchange* the temp file with the
target (renameat2 RENAME_EXCHANGE) and check that what was swapped out is the file we read: if another program
replaced the file at that very moment, exchange back, so its version stays. Where the file system cannot exchange,
a plain rename follows the identity check (a replacement landing in the microseconds between the two is then lost).

Hard-linked files (and files whose owner we cannot reproduce) are edited in place so every link sees the change
and the inode keeps its owner: a complete copy of the original is written and fsynced as
``.<name>.capwatch-<pid>-<random>.bak`` (journal entry with the sha256 of the old and the new content first); the
identity is checked; the new content is written into the file and fsynced; the file is verified; only then is the
copy removed.
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
from capwatch.metadata.fsops import exchange, fsync_dir, overwrite, write_all
from capwatch.metadata.identity import FileChanged, FileIdentity, same_stat, unchanged
from capwatch.metadata.journal import Entry, Journal, sha256_bytes

__all__ = ["Content", "FileChanged", "Part", "Tail", "create_file", "is_temp_file", "replace_file", "temp_path",
           "write_all"]

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.capwatch-(?P<pid>\d+)-[0-9a-f]{8}\.(?P<kind>tmp|bak)$")


@dataclass(frozen=True)
class Tail:
    """Bytes ``[offset, offset + length)`` of the original file, copied kernel-side (copy_file_range) instead of
    through Python: the image data of a JPEG never passes through user space."""

    offset: int
    length: int


Part = bytes | memoryview | Tail
Content = bytes | Sequence[Part]
#: Called with the target's path right before the final identity check (tests drive concurrent editors with it).
Hook = Callable[[Path], None]


def is_temp_file(name: str) -> bool:
    """True for capwatch's own temp/backup file names (the watcher and scanner ignore them)."""
    return _TEMP_RE.match(os.path.basename(name)) is not None


def temp_path(target: Path, kind: str) -> Path:
    """A name beside ``target`` that is_temp_file recognises (``kind``: tmp or bak)."""
    return target.with_name(f".{target.name}.capwatch-{os.getpid()}-{secrets.token_hex(4)}.{kind}")


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


def _parts(content: Content) -> Sequence[Part]:
    return [content] if isinstance(content, bytes) else content


def _part_size(part: Part) -> int:
    return part.length if isinstance(part, Tail) else len(part)


def _open_source(path: Path, expected: FileIdentity) -> int:
    """Open the original for reading Tail parts; raises FileChanged unless it is still the file we read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileChanged(f"{path}: file vanished during the write; left alone") from None
    if not same_stat(os.fstat(fd), expected):
        os.close(fd)
        raise FileChanged(f"{path}: file changed during the write; left alone")
    return fd


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


def _write_parts(fd: int, content: Content, src_fd: int | None) -> int:
    total = 0
    for part in _parts(content):
        if isinstance(part, Tail):
            assert src_fd is not None
            _copy_range(src_fd, fd, part.offset, part.length)
            total += part.length
        else:
            write_all(fd, part)
            total += len(part)
    return total


def _materialise(content: Content, src_fd: int | None) -> bytes:
    out = bytearray()
    for part in _parts(content):
        if isinstance(part, Tail):
            assert src_fd is not None
            data = os.pread(src_fd, part.length, part.offset)
            if len(data) != part.length:
                raise FileChanged("file shrank during the write; left alone")
            out += data
        else:
            out += part
    return bytes(out)


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


def verify_unchanged(path: Path, expected: FileIdentity) -> None:
    """Raise FileChanged unless ``path`` still has the identity ``expected`` (stat and content fingerprint)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileChanged(f"{path}: file vanished during the write; left alone") from None
    except OSError as exc:
        raise MetadataError(f"{path}: cannot read: {_describe(exc)}") from None
    try:
        st = os.fstat(fd)
        if not unchanged(st, expected, fd):
            raise FileChanged(f"{path}: file changed during the write; left alone")
    finally:
        os.close(fd)


def replace_file(path: Path, data: Content, expected: FileIdentity, *, journal: Journal, keep_mtime: bool = True,
                 before_commit: Hook | None = None) -> None:
    """Give ``path`` the content ``data`` (bytes, or parts: bytes and Tail ranges of the original), keeping mode,
    owner and xattrs, and atime/mtime when ``keep_mtime`` — but only if the file still is ``expected``.

    ``journal`` registers the temp file or backup before it exists. ``before_commit`` (tests) runs just before the
    final identity check. Raises FileChanged when the file is not the one that was read (nothing written),
    JournalError when the journal cannot be written (nothing written), and MetadataError (one line) on any OS
    error (the original is then byte-identical and no temp file remains).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileChanged(f"{path}: file vanished before the write; left alone") from None
    except OSError as exc:
        raise MetadataError(f"{path}: cannot read: {_describe(exc)}") from None
    if not same_stat(st, expected):
        raise FileChanged(f"{path}: file changed since it was read; left alone")
    src_fd = _open_source(path, expected) if any(isinstance(p, Tail) for p in _parts(data)) else None
    try:
        if needs_in_place(st):
            try:
                whole = _materialise(data, src_fd)
            except OSError as exc:
                raise MetadataError(f"{path}: cannot read: {_describe(exc)}") from None
            _replace_in_place(path, whole, expected, st, journal=journal, keep_mtime=keep_mtime,
                              before_commit=before_commit)
            return
        tmp = temp_path(path, "tmp")
        entry = journal.replace(path, tmp, expected)
        try:
            _replace_by_rename(path, tmp, data, src_fd, expected, st, entry, keep_mtime=keep_mtime,
                               before_commit=before_commit)
        finally:
            if os.path.lexists(tmp):
                entry.abandon()  # whatever the temp name holds now, recovery decides by inode
            else:
                entry.close()
    finally:
        if src_fd is not None:
            os.close(src_fd)


def _replace_by_rename(path: Path, tmp: Path, data: Content, src_fd: int | None, expected: FileIdentity,
                       st: os.stat_result, entry: Entry, *, keep_mtime: bool, before_commit: Hook | None) -> None:
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        raise MetadataError(f"{path}: cannot create a temp file: {_describe(exc)}") from None
    swapped = False
    with discard_on_failure(tmp, f"{path}: write failed"):
        try:
            written = _write_parts(fd, data, src_fd)
            if os.fstat(fd).st_size != written:
                raise MetadataError(f"{path}: internal check failed: temp file has the wrong size")
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            if hasattr(os, "fchown") and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                with contextlib.suppress(PermissionError):
                    # Group may fail for a non-root user outside the group: keeping the mode matters more.
                    os.fchown(fd, st.st_uid, st.st_gid)
            _copy_xattrs(path, fd)
            os.fsync(fd)
            done = os.fstat(fd)
        finally:
            os.close(fd)
        # Complete and durable: from here on the temp file may change places with the target, and recovery
        # tells the two apart by this inode.
        entry.note({"temp_dev": done.st_dev, "temp_ino": done.st_ino})
        if keep_mtime:
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        if before_commit is not None:
            before_commit(path)
        verify_unchanged(path, expected)
        try:
            swapped = exchange(tmp, path)
        except FileNotFoundError:
            raise FileChanged(f"{path}: file vanished during the write; left alone") from None
        if not swapped:
            os.replace(tmp, path)
    if swapped:
        _settle_exchange(path, tmp, expected)
    fsync_dir(path.parent)


class _Unsettled(MetadataError):
    """A write could not be settled either way: its leftovers stay for the journal's recovery."""


def _settle_exchange(path: Path, swapped: Path, expected: FileIdentity) -> None:
    """After the exchange ``swapped`` holds what was at ``path``: remove it when it is the file we read. If it is
    not (a replacement landed between the check and the exchange), exchange back and raise FileChanged."""
    try:
        st = os.lstat(swapped)
        # The same inode we verified a moment ago (the rename itself moved its ctime: compare the rest).
        same = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
            expected.dev, expected.ino, expected.size, expected.mtime_ns)
    except OSError:
        same = False
    if same:
        with contextlib.suppress(OSError):
            os.unlink(swapped)  # if this fails, the journal entry stays and the next run removes it
        return
    try:
        exchange(swapped, path)  # theirs back at the name, ours at the temp name
    except OSError as exc:
        raise _Unsettled(f"{path}: replaced by another program at the moment of the write, and putting its "
                         f"version back failed ({_describe(exc)}); it is kept as {swapped.name}") from None
    with contextlib.suppress(OSError):
        os.unlink(swapped)
    raise FileChanged(f"{path}: file replaced at the moment of the write; left alone")


def _replace_in_place(path: Path, data: bytes, expected: FileIdentity, st: os.stat_result, *, journal: Journal,
                      keep_mtime: bool, before_commit: Hook | None) -> None:
    try:
        with open_noatime(path) as f:
            original = f.read()
            if not same_stat(os.fstat(f.fileno()), expected):
                raise FileChanged(f"{path}: file changed during the write; left alone")
    except OSError as exc:
        raise MetadataError(f"{path}: cannot read: {_describe(exc)}") from None
    if len(original) != expected.size:
        raise FileChanged(f"{path}: file changed during the write; left alone")
    times = (st.st_atime_ns, st.st_mtime_ns)
    backup = temp_path(path, "bak")
    entry = journal.in_place(path, backup, expected, sha256_bytes(original), sha256_bytes(data), times)
    try:
        with discard_on_failure(backup, f"{path}: write failed"):
            _write_new_file(backup, original, 0o600)
            fsync_dir(path.parent)
            if before_commit is not None:
                before_commit(path)
            verify_unchanged(path, expected)
        _overwrite_verified(path, data, original, backup, times, keep_mtime=keep_mtime)
    except BaseException:
        if os.path.lexists(backup):
            entry.abandon()  # the backup could not be proven unneeded: recovery decides by content
        else:
            entry.close()
        raise
    entry.close()


def _overwrite_verified(path: Path, data: bytes, original: bytes, backup: Path, times: tuple[int, int], *,
                        keep_mtime: bool) -> None:
    """Write ``data`` into ``path`` in place and read it back; on any failure put ``original`` back. The backup is
    removed only once the file was verified to hold one or the other."""
    try:
        overwrite(path, data, times if keep_mtime else None)
        with open_noatime(path) as f:
            if sha256_bytes(f.read()) != sha256_bytes(data):
                raise MetadataError(f"{path}: the file does not read back as written")
    except BaseException as exc:
        with contextlib.suppress(OSError):
            overwrite(path, original, times)
            with open_noatime(path) as f:
                if f.read() == original:
                    os.unlink(backup)
        if isinstance(exc, OSError):
            raise MetadataError(f"{path}: write failed: {_describe(exc)}") from None
        raise
    os.unlink(backup)
    fsync_dir(path.parent)


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never over an existing name or through a symlink) holding ``data``, fsynced. Raises
    OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def create_file(target: Path, data: bytes, *, journal: Journal) -> None:
    """Create ``target`` atomically with ``data`` (temp file, then a no-clobber hard link), mode per umask.

    Raises FileChanged when the name appeared meanwhile (never clobbers someone else's file), JournalError when the
    journal cannot be written, and MetadataError when the file cannot be written.
    """
    tmp = temp_path(target, "tmp")
    with journal.create(target, tmp), discard_on_failure(tmp, f"{target}: cannot write"):
        _write_new_file(tmp, data, 0o666)
        try:
            os.link(tmp, target)  # fails if the name appeared meanwhile
        except FileExistsError:
            raise FileChanged(f"{target}: appeared during the write; left alone") from None
        os.unlink(tmp)
        fsync_dir(target.parent)
