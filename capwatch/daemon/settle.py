"""Decide when a file has stopped changing and may be captioned: pure logic with an injected clock.

A file that a watcher reports is not processed at once: a copy may still be in progress, a browser may still
be downloading into it, an editor may be about to rename a new version over it. The :class:`Settler` keeps one
small entry per such path and says a path is *ready* when either

* the writer closed it (``IN_CLOSE_WRITE``) or it was renamed into place, and nothing changed it for a short
  grace period afterwards (the fast path: ``cp``, atomic saves, our own writes), or
* its size and mtime have not changed for ``settle_seconds`` (the general rule; the only one on a polling
  observer, which sees no close events),

and, when the owner passes a ``complete`` check, the file's structure says it is whole (a large video copied over a
slow share stalls longer than ``settle_seconds``; until its boxes reach its end, it keeps waiting).

Names that copy tools, browsers and editors use for unfinished files (``.part``, ``.crdownload``, ``.tmp``,
rsync's ``.name.XXXXXX``, our own metadata temp files) are never settled: the final rename produces an
event for the real name. A path that changes again while waiting starts over, so a file replaced while queued
is reported once, in its final state. Nothing here touches the file system: callers pass stat results in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from capwatch.metadata import is_temp_file

#: Suffixes (lower case) of files that are still being written by some other program.
TEMP_SUFFIXES: tuple[str, ...] = (
    ".part", ".partial", ".crdownload", ".download", ".tmp", ".temp", ".swp", ".!qb", ".opdownload",
)

# rsync writes into ".<name>.<6 random characters>" next to the destination and renames when done.
_RSYNC_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{6}$")


def _default_own_temp(name: str) -> bool:
    return is_temp_file(name)


def is_temp_name(name: str, *, own_temp: Callable[[str], bool] = _default_own_temp) -> bool:
    """Return True when ``name`` (a base name) looks like a file that is still being written elsewhere.

    Covers partial downloads (``.part``, ``.crdownload`` ...), editors' temp files (``.tmp``, ``~`` backups),
    rsync's ``.name.XXXXXX`` and, through ``own_temp``, capwatch's own metadata temp files. Never raises.
    """
    lower = name.lower()
    if lower.endswith(TEMP_SUFFIXES) or name.endswith("~") or name.startswith(".~lock."):
        return True
    if _RSYNC_TEMP.match(name):
        return True
    return own_temp(name)


@dataclass(frozen=True)
class FileState:
    """What the settler compares: size and mtime (nanoseconds) of one stat result, and the digest of the file's
    XMP sidecars (a sidecar still being written keeps the image waiting too)."""

    size: int
    mtime_ns: int
    sidecars: str = ""


@dataclass
class _Entry:
    # Mutable on purpose: one per waiting path, updated in place on every event; never handed out.
    state: FileState | None
    stable_since: float
    last_event: float
    check_at: float
    closed: bool


@dataclass(frozen=True)
class SettleDecision:
    """The result of one :meth:`Settler.poll`: paths ready now, and paths that vanished while waiting.

    ``gone`` is informational (the path is no longer tracked); deletions are handled from delete events.
    """

    ready: tuple[Path, ...]
    gone: tuple[Path, ...]


class Settler:
    """Tracks paths that changed recently and reports them once they are stable.

    Not thread-safe: the owner (the watcher's settle loop) serialises calls. ``clock`` returns seconds on a
    monotonic scale; every method that needs the time takes it from ``clock`` so tests drive time explicitly.
    """

    def __init__(
        self,
        settle_seconds: float,
        *,
        clock: Callable[[], float],
        close_grace_seconds: float | None = None,
        temp_name: Callable[[str], bool] = is_temp_name,
        complete: Callable[[Path], bool] | None = None,
        incomplete_patience_seconds: float = 600.0,
    ) -> None:
        self._settle = max(0.0, settle_seconds)
        # After a close-after-write or a rename into place, wait a little for a follow-up write (cp -p sets
        # the times right after closing; some tools close and reopen) before trusting the fast path.
        default_grace = min(self._settle, 0.25)
        self._grace = default_grace if close_grace_seconds is None else max(0.0, close_grace_seconds)
        self._clock = clock
        self._temp_name = temp_name
        # A file can be quiet and still unfinished: a copy of a large video that stalls on a slow network share.
        # ``complete`` (a look at its structure, e.g. an MP4 whose boxes do not reach its end yet) keeps it waiting,
        # for at most ``incomplete_patience_seconds`` of quiet; then it is handed on and fails as what it is.
        self._complete = complete
        self._patience = max(0.0, incomplete_patience_seconds)
        self._entries: dict[Path, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, path: object) -> bool:
        return path in self._entries

    def pending(self) -> list[Path]:
        """Return the paths currently waiting to settle (a copy)."""
        return list(self._entries)

    def changed(self, path: Path, state: FileState | None, *, closed: bool = False) -> bool:
        """Record that ``path`` changed (created, written, attributes); ``state`` is its stat now, if known.

        ``closed`` marks a close-after-write or a rename into place (the writer is done). Returns False when
        the path is ignored because its name is a temp name, True when it is now tracked.
        """
        if self._temp_name(path.name):
            return False
        now = self._clock()
        entry = self._entries.get(path)
        if entry is None:
            wait = self._grace if closed else self._settle
            self._entries[path] = _Entry(state, now, now, now + wait, closed)
            return True
        if state != entry.state:
            entry.state = state
            entry.stable_since = now
        entry.last_event = now
        # A write after a close means the writer is back: no fast path until the next close.
        entry.closed = closed
        entry.check_at = now + (self._grace if closed else self._settle)
        return True

    def moved(self, src: Path, dest: Path, state: FileState | None) -> bool:
        """Record a rename ``src`` -> ``dest``: ``src`` stops being tracked, ``dest`` is complete (fast path).

        Returns True when ``dest`` is now tracked (False when ``dest`` has a temp name).
        """
        self._entries.pop(src, None)
        return self.changed(dest, state, closed=True)

    def forget(self, path: Path) -> bool:
        """Stop tracking ``path`` (deleted, or handled elsewhere). Returns True when it was tracked."""
        return self._entries.pop(path, None) is not None

    def forget_under(self, directory: Path) -> int:
        """Stop tracking every path below ``directory`` (a folder went away); returns the count."""
        doomed = [p for p in self._entries if p.is_relative_to(directory)]
        for path in doomed:
            del self._entries[path]
        return len(doomed)

    def next_check(self) -> float | None:
        """Return the earliest clock time at which :meth:`poll` may report something, or None when idle."""
        if not self._entries:
            return None
        return min(e.check_at for e in self._entries.values())

    def poll(self, stat: Callable[[Path], FileState | None], *, limit: int | None = None) -> SettleDecision:
        """Check the paths whose wait is over, using ``stat`` (None = the file is gone).

        Returns the paths that are ready (no longer tracked afterwards; at most ``limit`` of them, the rest
        stay tracked and are reported by a later poll) and those that disappeared. A path whose stat differs
        from the last one seen, or that changed within the wait, keeps waiting. Empty files never count as
        ready: a later write brings them back.
        """
        now = self._clock()
        ready: list[Path] = []
        gone: list[Path] = []
        due = sorted((e.check_at, p) for p, e in self._entries.items() if e.check_at <= now)
        for _, path in due:
            if limit is not None and len(ready) >= limit:
                break
            entry = self._entries[path]
            current = stat(path)
            if current is None:
                del self._entries[path]
                gone.append(path)
                continue
            if current != entry.state:
                # Changed since the last look without an event (polling observer, or events still in flight).
                entry.state = current
                entry.stable_since = now
                entry.closed = False
                entry.check_at = now + self._settle
                continue
            quiet_for = now - max(entry.stable_since, entry.last_event)
            needed = self._grace if entry.closed else self._settle
            if quiet_for + 1e-9 < needed:
                entry.check_at = max(entry.stable_since, entry.last_event) + needed
                continue
            if self._complete is not None and quiet_for < self._patience and not self._complete(path):
                entry.closed = False
                entry.check_at = now + max(self._settle, 1.0)
                continue
            del self._entries[path]
            if current.size == 0:
                # Nothing to caption yet; the write that fills it brings it back.
                continue
            ready.append(path)
        return SettleDecision(tuple(ready), tuple(gone))

    def paths(self) -> Iterable[Path]:
        """Iterate over the tracked paths (do not mutate the settler while iterating)."""
        return iter(self._entries)
