"""The write journal: every temp file and every in-place backup capwatch creates is registered here first, so
that after a crash (kill -9, power loss) the next writing command can finish or undo the write, deciding by
inode and content, never by times (which the write itself changes).

One small entry per write in flight, in one directory per user (``$XDG_STATE_HOME/capwatch/journal``, or the
service's ``$STATE_DIRECTORY/journal``): JSON lines, the registration first, then the facts learnt as the write
proceeds. The writer creates the entry, takes an exclusive ``flock`` on it and only then makes the entry visible
(rename from a hidden name), so an entry anyone can see is locked for as long as its writer lives; the kernel
drops the lock when the writer dies, however it dies. :meth:`Journal.recover` resolves only unlocked entries:

``replace`` (temp file renamed over the target)
    Decided by inode, never by content: once the temp file is complete its inode is appended to the entry, and
    only then may it be exchanged with the target. No inode recorded: the exchange never happened and the temp
    file (complete or not) is ours: delete it. Our inode still at the temp name: likewise. The inode of the file
    we read at the temp name: the exchange happened, the target holds our new version, the old one goes. Any
    other inode there: another program replaced the target at that very instant; if the target holds our inode,
    exchange back, so their version stays.
``replace_group`` (group commit: several ``replace`` writes under one entry)
    One registration for a batch of files, and one note with every complete temp file's inode, each item then
    resolved exactly as a ``replace`` entry; the entry goes once every item is settled.
``create`` (a new sidecar linked into place)
    A temp file still there is ours: delete it.
``in_place`` (hard-linked files and files we do not own, edited in place after a full backup)
    The backup is checked against its recorded sha256. The target is then compared with the old and the new
    content: equal to either, the write is settled and the backup goes; anything else is a write we interrupted
    and the target is restored from the verified backup (what it held is kept in ``conflicts/`` first, should it
    have been someone's later edit). A backup is never deleted unless the target was verified.

Nothing else is ever deleted: a file is removed only when an entry names it and its content proves it is ours.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capwatch import paths
from capwatch.errors import MetadataError
from capwatch.metadata.fsops import exchange, fsync_dir, overwrite, sha256_regular, write_all
from capwatch.metadata.identity import FileIdentity
from capwatch.metadata.safeopen import open_binary

log = logging.getLogger(__name__)

ENTRY_SUFFIX = ".json"


class JournalError(MetadataError):
    """The journal directory cannot be used, so no write is started (nothing could be recovered after a crash)."""


@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`Journal.recover` did: ``settled`` entries closed with nothing to repair, ``restored`` targets
    put back from a backup, ``removed`` leftover temp files deleted, ``kept`` one line per entry it could not
    resolve safely (left in place, nothing deleted)."""

    settled: int = 0
    restored: tuple[str, ...] = ()
    removed: int = 0
    kept: tuple[str, ...] = ()
    live: int = 0
    messages: tuple[str, ...] = field(default=())


def sha256_bytes(data: bytes | memoryview) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _identity_dict(identity: FileIdentity) -> dict[str, Any]:
    return {"dev": identity.dev, "ino": identity.ino, "size": identity.size, "mtime_ns": identity.mtime_ns,
            "ctime_ns": identity.ctime_ns, "fingerprint": identity.fingerprint}


def _encode(path: Path) -> str:
    # File names need not be UTF-8: keep their bytes through JSON (surrogateescape survives json's \\u escapes).
    return os.fspath(path)


class Entry:
    """One registered write, locked by this process until :meth:`close`."""

    def __init__(self, journal: Journal, path: Path, fd: int) -> None:
        self.journal = journal
        self.path = path
        self._fd: int | None = fd

    def abandon(self) -> None:
        """Leave the entry for :meth:`Journal.recover` (the write could not be settled): release only the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def note(self, facts: Mapping[str, Any]) -> None:
        """Append ``facts`` to the entry and fsync it before returning (recovery reads the latest value of each
        key; a line cut short by a crash is ignored). Raises JournalError."""
        assert self._fd is not None
        line = json.dumps(dict(facts), ensure_ascii=True, sort_keys=True).encode("ascii") + b"\n"
        try:
            os.lseek(self._fd, 0, os.SEEK_END)
            write_all(self._fd, line)
            os.fsync(self._fd)
        except OSError as exc:
            raise JournalError(f"cannot write the write journal {self.journal.directory}: "
                               f"{exc.strerror or exc}") from None

    def close(self) -> None:
        """The write is settled: remove the entry and release its lock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


class Journal:
    """The write journal in ``directory`` (created on first use, mode 0700)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @classmethod
    def default(cls, env: Mapping[str, str] = os.environ) -> Journal:
        """The journal of this user (or service): ``<state dir>/journal``."""
        return cls(paths.state_dir(env) / "journal")

    # -- writing side -----------------------------------------------------------------------------------------

    def _ensure(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise JournalError(f"cannot create the write journal {self.directory}: {exc.strerror or exc}") from None

    def begin(self, record: Mapping[str, Any]) -> Entry:
        """Register a write described by ``record`` and return its locked entry, fsynced with its directory (so
        not even a power loss can leave a temp file nobody knows about). Raises JournalError when the journal
        cannot be written: the caller must then not start the write.
        """
        self._ensure()
        token = secrets.token_hex(6)
        hidden = self.directory / f".{os.getpid()}-{token}.new"
        visible = self.directory / f"{os.getpid()}-{token}{ENTRY_SUFFIX}"
        payload = json.dumps({"version": 1, "pid": os.getpid(), "created": _utc_now(), **record},
                             ensure_ascii=True, sort_keys=True).encode("ascii") + b"\n"
        try:
            fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                         0o600)
        except OSError as exc:
            raise JournalError(f"cannot write the write journal {self.directory}: {exc.strerror or exc}") from None
        try:
            # Locked before it has its visible name: recover() never sees an unlocked entry of a live writer.
            fcntl.flock(fd, fcntl.LOCK_EX)
            write_all(fd, payload)
            os.fsync(fd)
            os.rename(hidden, visible)
            fsync_dir(self.directory)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(hidden)
            raise JournalError(f"cannot write the write journal {self.directory}: {exc.strerror or exc}") from None
        return Entry(self, visible, fd)

    def replace(self, target: Path, temp: Path, expected: FileIdentity) -> Entry:
        """Register a temp file that will be renamed (or exchanged) over ``target``. Before the rename the caller
        notes the complete temp file's inode (``{"temp_dev": ..., "temp_ino": ...}``); it closes the entry once
        the write is settled, or abandons it to recovery."""
        return self.begin({"kind": "replace", "target": _encode(target), "temp": _encode(temp),
                           "expected": _identity_dict(expected)})

    def replace_group(self, items: Sequence[tuple[Path, Path, FileIdentity]]) -> Entry:
        """Register several (target, temp, expected) writes under one entry: a batch pays for one registration
        instead of one per file. Before any exchange the caller notes every complete temp file's inode at once
        (``{"temp_inodes": {"<item>": [dev, ino], ...}}``); it closes the entry once every write is settled, or
        abandons it to recovery."""
        return self.begin({"kind": "replace_group", "items": [
            {"target": _encode(target), "temp": _encode(temp), "expected": _identity_dict(expected)}
            for target, temp, expected in items]})

    @contextlib.contextmanager
    def create(self, target: Path, temp: Path) -> Iterator[Entry]:
        """Register a temp file that will be hard-linked as the new file ``target``."""
        entry = self.begin({"kind": "create", "target": _encode(target), "temp": _encode(temp)})
        try:
            yield entry
        finally:
            entry.close()

    def in_place(self, target: Path, backup: Path, expected: FileIdentity, old_sha256: str, new_sha256: str,
                 times: tuple[int, int]) -> Entry:
        """Register an in-place edit of ``target`` whose original is copied to ``backup`` first. The caller
        closes the entry only after the target was verified and the backup removed."""
        return self.begin({"kind": "in_place", "target": _encode(target), "backup": _encode(backup),
                           "expected": _identity_dict(expected), "old_sha256": old_sha256,
                           "new_sha256": new_sha256, "atime_ns": times[0], "mtime_ns": times[1]})

    # -- recovery ----------------------------------------------------------------------------------------------

    def pending(self) -> list[Path]:
        """Visible entries (of live and dead writers alike)."""
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return []
        return [self.directory / n for n in names if n.endswith(ENTRY_SUFFIX) and not n.startswith(".")]

    def recover(self) -> RecoveryReport:
        """Resolve the entries of writers that are gone (see the module docstring). Entries of live writers are
        left alone. Never raises for one entry; an entry that cannot be resolved safely stays and is reported."""
        settled = removed = live = 0
        restored: list[str] = []
        kept: list[str] = []
        messages: list[str] = []
        self._drop_abandoned()
        for entry_path in self.pending():
            try:
                fd = os.open(entry_path, os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                continue  # settled by its writer meanwhile
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                        live += 1
                    else:
                        kept.append(f"journal entry {entry_path}: cannot lock it ({exc.strerror or exc}); left")
                    continue
                if not os.path.exists(entry_path):
                    continue  # the writer settled it between our open and our lock
                try:
                    record = _parse_entry(os.pread(fd, 1 << 20, 0))
                    outcome = self._resolve(record)
                except (ValueError, KeyError, TypeError) as exc:
                    outcome = _Outcome(keep=True, message=f"unreadable journal entry {entry_path} ({exc}); kept")
                except OSError as exc:
                    outcome = _Outcome(keep=True, message=f"journal entry {entry_path}: {exc.strerror or exc}; "
                                                          "kept for the next run")
                removed += outcome.removed
                restored.extend(outcome.restored)
                if outcome.message:
                    messages.append(outcome.message)
                if outcome.keep:
                    kept.append(outcome.message or str(entry_path))
                    continue
                settled += 1
                os.unlink(entry_path)
            finally:
                os.close(fd)
        if settled or removed or restored:
            fsync_dir(self.directory)
        return RecoveryReport(settled, tuple(restored), removed, tuple(kept), live, tuple(messages))

    def _drop_abandoned(self) -> None:
        """Remove hidden entries whose writer died before making them visible (its write never began)."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if not (name.startswith(".") and name.endswith(".new")):
                continue
            path = self.directory / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                continue
            try:
                # Its writer locks it right after creating it: unlocked and not brand new means that writer died.
                if time.time() - os.fstat(fd).st_mtime > 60:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.unlink(path)
            except OSError:
                pass  # still being created by a live writer
            finally:
                os.close(fd)

    def _resolve(self, record: Mapping[str, Any]) -> _Outcome:
        kind = record["kind"]
        if kind == "create":
            return _remove_temp(Path(record["temp"]))
        if kind == "replace":
            return _resolve_replace(record)
        if kind == "replace_group":
            return _resolve_group(record)
        if kind == "in_place":
            return self._resolve_in_place(record)
        return _Outcome(keep=True, message=f"journal entry of unknown kind {kind!r}; kept")

    def _resolve_in_place(self, record: Mapping[str, Any]) -> _Outcome:
        target, backup = Path(record["target"]), Path(record["backup"])
        expected = record["expected"]
        checked = sha256_regular(backup)
        if checked is None or checked != record["old_sha256"]:
            # No complete backup: the in-place overwrite only starts after the backup is written and fsynced,
            # so the target was never touched. A partial backup is ours (named by the entry): remove it.
            removed = 0
            if checked is not None:
                os.unlink(backup)
                removed = 1
            return _Outcome(removed=removed)
        try:
            st = os.stat(target)
        except FileNotFoundError:
            return _Outcome(keep=True, message=f"{target}: gone since capwatch's interrupted write; its original "
                                               f"content is kept in {backup}")
        if (st.st_dev, st.st_ino) != (expected["dev"], expected["ino"]):
            return _Outcome(keep=True, message=f"{target}: replaced by another program since capwatch's "
                                               f"interrupted write; the original is kept in {backup}")
        current = sha256_regular(target)
        if current is not None and current in (record["new_sha256"], record["old_sha256"]):
            os.unlink(backup)
            return _Outcome(removed=1)
        # Half-written by us (or, rarely, edited by someone after the crash): restore the verified original, but
        # keep whatever the file held, in case it was someone's edit.
        saved = self._save_conflict(target)
        original = Path(backup).read_bytes()
        if sha256_bytes(original) != record["old_sha256"]:
            return _Outcome(keep=True, message=f"{backup}: backup changed during recovery; kept")
        overwrite(target, original, (int(record["atime_ns"]), int(record["mtime_ns"])))
        verify = sha256_regular(target)
        if verify is None or verify != record["old_sha256"]:
            return _Outcome(keep=True, message=f"{target}: could not be restored; the original is kept in {backup}")
        os.unlink(backup)
        note = f"; what it held is kept in {saved}" if saved else ""
        return _Outcome(removed=1, restored=(str(target),),
                        message=f"{target}: restored from its backup after an interrupted write{note}")

    def _save_conflict(self, target: Path) -> Path | None:
        folder = self.directory / "conflicts"
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            saved = folder / f"{_utc_now().replace(':', '')}-{secrets.token_hex(3)}-{target.name}"
            with open_binary(target, noatime=False) as src, open(saved, "xb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            return saved
        except OSError as exc:
            log.warning("cannot keep a copy of %s before restoring it: %s", target, exc.strerror or exc)
            return None


@dataclass(frozen=True)
class _Outcome:
    keep: bool = False
    removed: int = 0
    restored: tuple[str, ...] = ()
    message: str | None = None


def _remove_temp(temp: Path) -> _Outcome:
    try:
        st = os.lstat(temp)
    except FileNotFoundError:
        return _Outcome()
    if not stat.S_ISREG(st.st_mode):
        return _Outcome(keep=True, message=f"{temp}: not a regular file; left alone")
    os.unlink(temp)
    return _Outcome(removed=1)


def _parse_entry(data: bytes) -> dict[str, Any]:
    """The registration line updated by every later complete line. Raises ValueError when there is none."""
    lines = data.split(b"\n")
    record: dict[str, Any] = {}
    for line in lines[:-1]:  # the part after the last newline is a line cut short by a crash: ignored
        record.update(json.loads(line.decode("ascii")))
    if "kind" not in record:
        raise ValueError("no registration line")
    return record


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _resolve_replace(record: Mapping[str, Any]) -> _Outcome:
    target, temp = Path(record["target"]), Path(record["temp"])
    at_temp = _inode(temp)
    if at_temp is None:
        return _Outcome()  # renamed into place, or never created
    ours = (record["temp_dev"], record["temp_ino"]) if "temp_ino" in record else None
    if ours is None or at_temp == ours:
        # The exchange never happened (it only happens once the inode is noted): the temp file is ours.
        return _remove_temp(temp)
    expected = record["expected"]
    if at_temp == (expected["dev"], expected["ino"]):
        # Exchanged: the target holds our complete new version, the temp name the file we read.
        return _remove_temp(temp)
    if _inode(target) == ours and exchange(temp, target) and _inode(temp) == ours:
        # Another program's file was swapped out at the instant of our write: it goes back, ours goes.
        os.unlink(temp)
        return _Outcome(removed=1, restored=(str(target),),
                        message=f"{target}: another program's version put back after an interrupted write")
    return _Outcome(keep=True, message=f"{temp}: left from an interrupted write of {target}, holding a file that "
                                       "is neither capwatch's nor the one it read; left alone")


def _resolve_group(record: Mapping[str, Any]) -> _Outcome:
    """Each item of a ``replace_group`` entry resolved as its own ``replace`` entry; the entry is kept while any
    item is (items already settled resolve to nothing the next time)."""
    inodes = record.get("temp_inodes", {})
    outcomes: list[_Outcome] = []
    for number, item in enumerate(record["items"]):
        single = dict(item)
        if str(number) in inodes:
            single["temp_dev"], single["temp_ino"] = inodes[str(number)]
        try:
            outcomes.append(_resolve_replace(single))
        except OSError as exc:
            outcomes.append(_Outcome(keep=True, message=f"{item['target']}: {exc.strerror or exc}; kept for the "
                                                        "next run"))
    messages = [o.message for o in outcomes if o.message]
    return _Outcome(keep=any(o.keep for o in outcomes), removed=sum(o.removed for o in outcomes),
                    restored=tuple(r for o in outcomes for r in o.restored),
                    message="; ".join(messages) if messages else None)


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
