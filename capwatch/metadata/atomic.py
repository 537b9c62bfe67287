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

Group commit (:func:`replace_files`): a batch of files pays the waits once instead of once per file: one journal
entry for all of them, every temp file written before any is fsynced (so the file system commits them together),
one journal note with every temp inode, then the identity check and exchange file by file, and one fsync per
directory at the end. Each file keeps the guarantees of :func:`replace_file`: nothing lands unless it is still the
file that was read, right before its own exchange.
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
from capwatch.metadata.fsops import exchange, fsync_dir, overwrite, start_writeback, write_all
from capwatch.metadata.identity import FileChanged, FileIdentity, same_stat, unchanged
from capwatch.metadata.journal import Entry, Journal, sha256_bytes
from capwatch.metadata.safeopen import NotRegularFile, open_file

__all__ = ["Content", "FileChanged", "Part", "Replacement", "Tail", "create_file", "is_temp_file", "replace_file",
           "replace_files", "temp_path", "write_all"]

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
        fd = open_file(path)  # never blocks: a FIFO or device swapped in is a change, not a wait
    except FileNotFoundError:
        raise FileChanged(f"{path}: file vanished during the write; left alone") from None
    except NotRegularFile as exc:
        raise FileChanged(f"{path}: {exc.strerror} now, during the write; left alone") from None
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
        fd = open_file(path, noatime=False)
    except FileNotFoundError:
        raise FileChanged(f"{path}: file vanished during the write; left alone") from None
    except NotRegularFile as exc:
        raise FileChanged(f"{path}: {exc.strerror} now, during the write; left alone") from None
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
    st = _stat_as_read(path, expected)
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


@dataclass(frozen=True)
class Replacement:
    """One file of a group commit: give ``path`` the content ``data`` if it still is ``expected``."""

    path: Path
    data: Content
    expected: FileIdentity
    #: Called with ``path`` right before its final identity check (tests drive concurrent editors with it).
    before_commit: Hook | None = None


@dataclass
class _Staged:
    """A group member on its way: its temp file, the open descriptors, and the stat of the file it replaces."""

    number: int
    item: Replacement
    st: os.stat_result
    tmp: Path
    src_fd: int | None = None
    fd: int | None = None
    inode: tuple[int, int] | None = None


def replace_files(items: Sequence[Replacement], *, journal: Journal, keep_mtime: bool = True,
                  ) -> list[MetadataError | None]:
    """Group commit: :func:`replace_file` for each of ``items``, with the same guarantees per file, but one journal
    entry, one pass of fsyncs over temp files all written first, one journal note and one fsync per directory for
    the whole group.

    Gives one result per item, in order: None when the new content landed, else the FileChanged or MetadataError
    that :func:`replace_file` would have raised for that file (nothing written to it). Hard-linked files and files
    whose owner cannot be kept are edited in place one by one (:func:`replace_file`). Raises JournalError when the
    journal cannot be written (nothing written to any file).
    """
    results: list[MetadataError | None] = [None] * len(items)
    staged: list[_Staged] = []
    in_place: list[int] = []
    for number, item in enumerate(items):
        try:
            st = _stat_as_read(item.path, item.expected)
        except MetadataError as exc:
            results[number] = exc
            continue
        if needs_in_place(st):
            in_place.append(number)
        else:
            staged.append(_Staged(number, item, st, temp_path(item.path, "tmp")))
    if staged:
        entry = journal.replace_group([(s.item.path, s.tmp, s.item.expected) for s in staged])
        try:
            _commit_group(staged, results, entry, keep_mtime=keep_mtime)
        finally:
            for member in staged:
                for fd in (member.fd, member.src_fd):
                    if fd is not None:
                        with contextlib.suppress(OSError):
                            os.close(fd)
            if any(os.path.lexists(s.tmp) for s in staged):
                entry.abandon()  # whatever a temp name holds now, recovery decides by inode
            else:
                entry.close()
    # After the group, so that a journal failure above still means nothing was written to any file.
    for number in in_place:
        item = items[number]
        try:
            replace_file(item.path, item.data, item.expected, journal=journal, keep_mtime=keep_mtime,
                         before_commit=item.before_commit)
        except MetadataError as exc:
            results[number] = exc
    return results


def _stat_as_read(path: Path, expected: FileIdentity) -> os.stat_result:
    """``path``'s stat, provided it still is the file that was read. Raises FileChanged or MetadataError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileChanged(f"{path}: file vanished before the write; left alone") from None
    except OSError as exc:
        raise MetadataError(f"{path}: cannot read: {_describe(exc)}") from None
    if not same_stat(st, expected):
        raise FileChanged(f"{path}: file changed since it was read; left alone")
    return st


def _commit_group(staged: list[_Staged], results: list[MetadataError | None], entry: Entry, *,
                  keep_mtime: bool) -> None:
    """The phases of :func:`replace_files` after its journal entry exists; a member that fails gets its error in
    ``results``, its temp file removed, and drops out."""

    def fail(member: _Staged, exc: BaseException) -> None:
        with contextlib.suppress(OSError):
            os.unlink(member.tmp)
        if isinstance(exc, OSError):
            exc = MetadataError(f"{member.item.path}: write failed: {_describe(exc)}")
        assert isinstance(exc, MetadataError)
        results[member.number] = exc

    # 1. Every temp file written, none fsynced yet: the file system can then commit them all in one go.
    for member in staged:
        item = member.item
        try:
            if any(isinstance(p, Tail) for p in _parts(item.data)):
                member.src_fd = _open_source(item.path, item.expected)
            member.fd = os.open(member.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                | getattr(os, "O_CLOEXEC", 0), 0o600)
            written = _write_parts(member.fd, item.data, member.src_fd)
            if os.fstat(member.fd).st_size != written:
                raise MetadataError(f"{item.path}: internal check failed: temp file has the wrong size")
            _give_attributes(member.fd, item.path, member.st)
            # The disk writes this file while the next one is prepared; the fsync pass then waits less.
            start_writeback(member.fd)
        except (OSError, MetadataError) as exc:
            fail(member, exc)
    # 2. The durability pass.
    for member in staged:
        if results[member.number] is not None or member.fd is None:
            continue
        try:
            os.fsync(member.fd)
            done = os.fstat(member.fd)
            member.inode = (done.st_dev, done.st_ino)
        except OSError as exc:
            fail(member, exc)
        finally:
            os.close(member.fd)
            member.fd = None
        if member.src_fd is not None:
            os.close(member.src_fd)
            member.src_fd = None
    # 3. One note: from here on each temp file may change places with its target (recovery tells them apart by
    # these inodes; the keys are the members' places in the journal entry).
    live = [(slot, m) for slot, m in enumerate(staged) if results[m.number] is None and m.inode is not None]
    entry.note({"temp_inodes": {str(slot): list(m.inode) for slot, m in live if m.inode is not None}})
    # 4. File by file, the identity check right before the exchange.
    directories: dict[Path, None] = {}
    for _, member in live:
        item = member.item
        try:
            if keep_mtime:
                os.utime(member.tmp, ns=(member.st.st_atime_ns, member.st.st_mtime_ns))
            if item.before_commit is not None:
                item.before_commit(item.path)
            verify_unchanged(item.path, item.expected)
            try:
                swapped = exchange(member.tmp, item.path)
            except FileNotFoundError:
                raise FileChanged(f"{item.path}: file vanished during the write; left alone") from None
            if not swapped:
                os.replace(member.tmp, item.path)
        except (OSError, MetadataError) as exc:
            fail(member, exc)
            continue
        directories[item.path.parent] = None
        if swapped:
            try:
                _settle_exchange(item.path, member.tmp, item.expected)
            except MetadataError as exc:
                # Exchanged back (FileChanged), or unsettled: then its leftovers stay for the journal's recovery.
                results[member.number] = exc
    # 5. One fsync per directory makes every rename in it durable.
    for directory in directories:
        fsync_dir(directory)


def _give_attributes(fd: int, path: Path, st: os.stat_result) -> None:
    """Mode, owner (where allowed) and extended attributes of the file at ``path`` onto the temp file ``fd``."""
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    if hasattr(os, "fchown") and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
        with contextlib.suppress(PermissionError):
            # Group may fail for a non-root user outside the group: keeping the mode matters more.
            os.fchown(fd, st.st_uid, st.st_gid)
    _copy_xattrs(path, fd)


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
            _give_attributes(fd, path, st)
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
