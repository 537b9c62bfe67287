"""What a file *is* at one moment: its stat identity and a content fingerprint.

Every write capwatch makes is checked against the identity the file had when it was read (an optimistic
transaction): device, inode, size, mtime **and ctime** (which no program can set back, so an editor that keeps size
and mtime still changes it), plus a content fingerprint for edits that land within one tick of the kernel's
coarse clock.

A fingerprint is a BLAKE2b-128 digest of the file size and three 256 KiB windows (start, middle, end), so a 40 MB
RAW costs the same ~1 ms as a 3 MB JPEG. Any metadata edit changes the first window (metadata lives at the start
of every container capwatch edits), and any change of length changes the size, so the things it is used for —
recognising our own writes, matching moved files, noticing a concurrent edit — are covered. It is not a security
hash.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from capwatch.errors import MetadataError
from capwatch.metadata.safeopen import open_file

WINDOW = 256 * 1024


class FileChanged(MetadataError):
    """The file changed (or vanished) since capwatch read it; nothing was written. Read it afresh and retry."""


def fingerprint_fd(fd: int, size: int) -> str:
    """The fingerprint (32 hex characters) of the open file ``fd`` whose size is ``size``.

    Reads with pread, so the file position is not used. Raises OSError when the file cannot be read.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(size.to_bytes(8, "little"))
    if size <= 3 * WINDOW:
        spans = [(0, size)]
    else:
        spans = [(0, WINDOW), ((size - WINDOW) // 2, WINDOW), (size - WINDOW, WINDOW)]
    for offset, length in spans:
        end = offset + length
        while offset < end:
            chunk = os.pread(fd, min(1 << 20, end - offset), offset)
            if not chunk:
                break  # the file shrank meanwhile: the digest differs, which is what a caller must see
            digest.update(chunk)
            offset += len(chunk)
    return digest.hexdigest()


def fingerprint_file(path: str | os.PathLike[str]) -> str:
    """The fingerprint of the regular file at ``path``. Raises OSError when it cannot be opened or read
    (NotRegularFile, without blocking, when a FIFO or device is there)."""
    fd = open_file(path)
    try:
        return fingerprint_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class FileIdentity:
    """A file as it was read: stat identity and content fingerprint (``read_ns``: when, wall clock)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    fingerprint: str
    read_ns: int = field(default=0, compare=False)

    @classmethod
    def of(cls, st: os.stat_result, fingerprint: str) -> FileIdentity:
        """The identity of a file whose stat is ``st`` (taken just now) and whose content has ``fingerprint``."""
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, fingerprint, time.time_ns())

    @property
    def settled(self) -> bool:
        """True when the file's last change lay well before it was read, so that any later change must move its
        ctime: then an unchanged stat proves unchanged content and the fingerprint need not be read again.

        The kernel stamps ctime from a clock that ticks every few milliseconds (whole seconds on some file systems:
        FAT, some network mounts); a change within the same tick as the previous one would keep the ctime, so a
        file changed just before it was read is not settled.
        """
        if self.ctime_ns % 1_000_000_000 == 0:
            margin = 3_000_000_000  # a file system that stores whole seconds (2 s on FAT)
        elif self.ctime_ns % 10_000_000 == 0:
            margin = 200_000_000
        else:
            margin = 50_000_000
        return self.read_ns - self.ctime_ns > margin

    def matches_stat_of(self, other: FileIdentity) -> bool:
        """True when ``other`` has this identity's inode, size, mtime and ctime (fingerprints not compared)."""
        return (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns) == (
            other.dev, other.ino, other.size, other.mtime_ns, other.ctime_ns)

    def matches_stat(self, st: os.stat_result) -> bool:
        """True when ``st`` still describes this file untouched (same inode, size, mtime and ctime)."""
        return same_stat(st, self)

    def same_content(self, other: FileIdentity) -> bool:
        """True when ``other`` is the same unchanged file (stat identity and fingerprint)."""
        return self == other


def unchanged(st: os.stat_result, identity: FileIdentity, fd: int) -> bool:
    """True when the open file ``fd`` whose stat is ``st`` is still the file ``identity`` describes: same stat,
    and (unless the identity is ``settled``) the same fingerprint. Raises OSError when it cannot be read."""
    if not same_stat(st, identity):
        return False
    return identity.settled or fingerprint_fd(fd, st.st_size) == identity.fingerprint


def same_stat(st: os.stat_result, identity: FileIdentity) -> bool:
    """True when ``st`` has the device, inode, size, mtime and ctime recorded in ``identity``."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (
        identity.dev, identity.ino, identity.size, identity.mtime_ns, identity.ctime_ns)


def stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """The parts of a stat result that change whenever anything changes the file."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def identify(path: Path) -> FileIdentity:
    """The current identity of ``path`` (symlinks followed), read consistently: the stat before and after the
    fingerprint agree. Raises OSError when the file cannot be read (NotRegularFile, without blocking, for a FIFO
    or device) and FileNotFoundError when it is gone."""
    fd = open_file(path)
    try:
        st = os.fstat(fd)
        fingerprint = fingerprint_fd(fd, st.st_size)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if stat_key(after) != stat_key(st):
        # Changed while being fingerprinted: report the later stat, whose fingerprint cannot match anything
        # recorded before, so every comparison says "changed".
        return FileIdentity.of(after, "changing")
    return FileIdentity.of(st, fingerprint)
