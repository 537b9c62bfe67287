"""Watch library roots with watchdog and turn file-system events into a few plain facts for the daemon.

One observer per root: inotify where it works, a polling observer when the configuration asks for one
(NFS/SMB, where inotify sees no remote changes) or when the kernel runs out of inotify watches — then one
log line names ``fs.inotify.max_user_watches`` and the fallback taken. Events are filtered with the library
rules (:func:`capwatch.library.scan.is_candidate`: extensions, include/exclude globs, hidden names, our own temp files);
symlinks that lead out of a root are ignored unless ``library.follow_symlinks`` is set.

The handler runs on watchdog's threads and only forwards :class:`WatchEvent` values to a sink (a thread-safe
queue in the daemon); all decisions are taken by the consumer.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.inotify import InotifyObserver
from watchdog.observers.polling import PollingObserver

from capwatch.config import LibraryConfig, RootConfig, WatchConfig
from capwatch.library.scan import is_candidate
from capwatch.metadata.sidecar import possible_sidecar_names

log = logging.getLogger(__name__)

EventKind = Literal["changed", "closed", "moved", "deleted", "dir_gone"]
WatchMode = Literal["inotify", "polling"]

# Event types we act on; everything else (opened, closed-without-write, directory modified) is noise.
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, FileDeletedEvent,
    DirMovedEvent, DirDeletedEvent,
]
try:  # watchdog >= 5 reports attribute changes (cp -p, touch) separately
    from watchdog.events import FileAttribEvent

    _EVENT_FILTER.append(FileAttribEvent)
except ImportError:  # pragma: no cover - older watchdog reports them as modified
    pass


@dataclass(frozen=True)
class WatchEvent:
    """One relevant change below ``root``.

    ``changed``: written or created (may still be in progress); ``closed``: the writer closed it, or it was
    renamed into place (complete); ``moved``: a candidate renamed to another candidate (``dest``);
    ``deleted``: a candidate file went away; ``dir_gone``: a folder went away or moved out of the root.
    """

    kind: EventKind
    root: Path
    path: Path
    dest: Path | None = None


def _escapes_root(path: Path, root_real: str) -> bool:
    """True when ``path`` is (or passes through) a symlink that resolves outside the root."""
    try:
        real = os.path.realpath(path)
    except OSError:
        return True
    return not (real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep))


class RootHandler(FileSystemEventHandler):
    """Filters one root's watchdog events and forwards them to ``sink`` as :class:`WatchEvent`."""

    def __init__(self, root: RootConfig, library: LibraryConfig, sink: Callable[[WatchEvent], None]) -> None:
        super().__init__()
        self.root = root
        self.library = library
        self.sink = sink
        self._root_path = Path(os.path.abspath(root.path))
        self._root_real = os.path.realpath(self._root_path)

    def _wanted(self, path: Path, *, must_exist: bool) -> bool:
        if not is_candidate(path, self.root, self.library):
            return False
        if self.library.follow_symlinks or not must_exist:
            return True
        # A link inside the root that points elsewhere would make us caption (and write into) files outside
        # the library the user gave us.
        return not _escapes_root(path, self._root_real)

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._dispatch(event)
        except Exception:  # an exception here would kill watchdog's dispatcher thread for every root
            log.exception("error while handling %r", event)

    def _sidecar_images(self, sidecar: Path) -> list[Path]:
        """The images in the library whose XMP sidecar ``sidecar`` is (``a.CR2.xmp`` and ``a.xmp`` both belong
        to ``a.CR2``; ``a.xmp`` also to ``a.jpg`` beside it). Lists the folder: sidecar events are rare."""
        try:
            names = os.listdir(sidecar.parent)
        except OSError:
            return []
        return [sidecar.parent / name for name in names
                if sidecar.name in possible_sidecar_names(name) and self._wanted(sidecar.parent / name,
                                                                                 must_exist=True)]

    def _dispatch(self, event: FileSystemEvent) -> None:
        src = Path(os.fsdecode(event.src_path))
        root = self._root_path
        if not event.is_directory and _is_sidecar_name(src.name, event):
            # An edited, new or deleted sidecar changes the image's description: the image is read again.
            touched = [src]
            if isinstance(event, FileMovedEvent) and event.dest_path:
                touched.append(Path(os.fsdecode(event.dest_path)))
            for sidecar in touched:
                if sidecar.name.lower().endswith(".xmp"):
                    for image in self._sidecar_images(sidecar):
                        self.sink(WatchEvent("changed", root, image))
            return
        if event.is_directory:
            if isinstance(event, DirDeletedEvent):
                self.sink(WatchEvent("dir_gone", root, src))
            elif isinstance(event, DirMovedEvent):
                dest = Path(os.fsdecode(event.dest_path)) if event.dest_path else None
                if dest is None or not dest.is_relative_to(root):
                    self.sink(WatchEvent("dir_gone", root, src))
                # Within the root watchdog also reports each file's move, handled below.
            return
        if isinstance(event, FileMovedEvent):
            dest = Path(os.fsdecode(event.dest_path)) if event.dest_path else None
            src_ok = is_candidate(src, self.root, self.library)
            dest_ok = dest is not None and self._wanted(dest, must_exist=True)
            if src_ok and dest_ok and dest is not None:
                self.sink(WatchEvent("moved", root, src, dest))
            elif dest_ok and dest is not None:
                self.sink(WatchEvent("closed", root, dest))  # a temp/partial name renamed into place
            elif src_ok:
                self.sink(WatchEvent("deleted", root, src))
            return
        if isinstance(event, FileDeletedEvent):
            if is_candidate(src, self.root, self.library):
                self.sink(WatchEvent("deleted", root, src))
            return
        if not self._wanted(src, must_exist=True):
            return
        kind: EventKind = "closed" if isinstance(event, FileClosedEvent) else "changed"
        self.sink(WatchEvent(kind, root, src))


def _is_sidecar_name(name: str, event: FileSystemEvent) -> bool:
    dest = os.fsdecode(event.dest_path) if isinstance(event, FileMovedEvent) and event.dest_path else ""
    return name.lower().endswith(".xmp") or dest.lower().endswith(".xmp")


ObserverFactory = Callable[[WatchMode, WatchConfig], Any]


def default_observer_factory(mode: WatchMode, watch: WatchConfig) -> Any:
    """Return a new, unstarted watchdog observer for ``mode``."""
    if mode == "polling":
        return PollingObserver(timeout=max(0.1, watch.poll_interval_seconds))
    return InotifyObserver()


def inotify_watch_limit() -> int | None:
    """Return ``fs.inotify.max_user_watches``, or None when it cannot be read."""
    try:
        return int(Path("/proc/sys/fs/inotify/max_user_watches").read_text().strip())
    except (OSError, ValueError):
        return None


class Watcher:
    """Owns one observer per root. Thread-safe; ``stop`` stops and joins every observer."""

    def __init__(
        self,
        library: LibraryConfig,
        watch: WatchConfig,
        sink: Callable[[WatchEvent], None],
        *,
        observer_factory: ObserverFactory = default_observer_factory,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self._library = library
        self._watch = watch
        self._sink = sink
        self._factory = observer_factory
        self._lock = threading.Lock()
        self._observers: dict[Path, tuple[Any, WatchMode, tuple[int, int]]] = {}
        self._overflow_hook: _OverflowHook | None = None
        if on_overflow is not None:
            # watchdog rebuilds its watches after the kernel's event queue overflowed but only logs it; the
            # events are lost, so the daemon must reconcile. The log record is the only signal it gives.
            self._overflow_hook = _OverflowHook(on_overflow)
            for name in _WATCHDOG_INOTIFY_LOGGERS:
                logging.getLogger(name).addHandler(self._overflow_hook)

    def start_root(self, root: RootConfig) -> WatchMode:
        """Start watching ``root`` (recursively). Returns the mode used.

        Raises FileNotFoundError / NotADirectoryError when the root is not a directory (the caller re-checks
        later), OSError for other failures to set up even a polling observer.
        """
        path = Path(os.path.abspath(root.path))
        st = os.stat(path)
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
        handler = RootHandler(root, self._library, self._sink)
        mode: WatchMode = "polling" if self._watch.poll else "inotify"
        try:
            observer = self._start(mode, handler, path)
        except OSError as exc:
            if mode != "inotify" or exc.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            self._log_fallback(path, exc)
            mode = "polling"
            observer = self._start(mode, handler, path)
        with self._lock:
            old = self._observers.pop(path, None)
            self._observers[path] = (observer, mode, (st.st_dev, st.st_ino))
        if old is not None:
            _stop_observer(old[0])
        log.info("watching %s (%s)", path, mode)
        return mode

    def _start(self, mode: WatchMode, handler: RootHandler, path: Path) -> Any:
        observer = self._factory(mode, self._watch)
        try:
            observer.schedule(handler, str(path), recursive=True, event_filter=_EVENT_FILTER,
                              follow_symlink=self._library.follow_symlinks)
            observer.start()
        except BaseException:
            _stop_observer(observer)
            raise
        return observer

    def _log_fallback(self, path: Path, exc: OSError) -> None:
        limit = inotify_watch_limit()
        what = "watches" if exc.errno == errno.ENOSPC else "instances"
        setting = "fs.inotify.max_user_" + ("watches" if exc.errno == errno.ENOSPC else "instances")
        if exc.errno == errno.EMFILE:
            limit = None
        log.warning(
            "inotify %s exhausted (%s=%s); falling back to polling %s every %.0f s "
            "(raise it: sysctl -w %s=524288)",
            what, setting, limit if limit is not None else "?", path, self._watch.poll_interval_seconds,
            setting,
        )

    def stop_root(self, root: Path) -> None:
        """Stop watching ``root`` (no-op when it is not watched)."""
        with self._lock:
            entry = self._observers.pop(Path(os.path.abspath(root)), None)
        if entry is not None:
            _stop_observer(entry[0])

    def watched(self) -> dict[Path, WatchMode]:
        """Return the watched roots and their modes."""
        with self._lock:
            return {p: mode for p, (_, mode, _) in self._observers.items()}

    def healthy(self, root: Path) -> bool:
        """True when ``root`` is watched, its observer runs, and the folder is the one we started on.

        False after the folder was deleted (the inotify emitter stops itself), replaced by another folder of
        the same name, or never started.
        """
        path = Path(os.path.abspath(root))
        with self._lock:
            entry = self._observers.get(path)
        if entry is None:
            return False
        observer, _, identity = entry
        try:
            st = os.stat(path)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) != identity:
            return False
        emitters = getattr(observer, "emitters", ())
        return bool(observer.is_alive()) and all(e.is_alive() for e in emitters)

    def stop(self) -> None:
        """Stop and join every observer."""
        if self._overflow_hook is not None:
            for name in _WATCHDOG_INOTIFY_LOGGERS:
                logging.getLogger(name).removeHandler(self._overflow_hook)
            self._overflow_hook = None
        with self._lock:
            entries = list(self._observers.values())
            self._observers.clear()
        for observer, _, _ in entries:
            _stop_observer(observer)


_WATCHDOG_INOTIFY_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")


class _OverflowHook(logging.Handler):
    """Calls back when watchdog reports that the kernel dropped inotify events."""

    def __init__(self, callback: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self._callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            try:
                self._callback()
            except Exception:  # a logging handler must never raise into watchdog's thread
                self.handleError(record)


def _stop_observer(observer: Any) -> None:
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(10.0)
    except Exception:  # stopping must never prevent the rest of shutdown
        log.debug("error while stopping an observer", exc_info=True)


def roots_for(paths: Sequence[Path | RootConfig], library: LibraryConfig) -> tuple[RootConfig, ...]:
    """Turn command-line folders and configured roots into RootConfig values (absolute paths).

    A folder that is also a configured root keeps that root's include/exclude globs.
    """
    configured = {Path(os.path.abspath(r.path)): r for r in library.roots}
    out: list[RootConfig] = []
    for item in paths:
        if isinstance(item, RootConfig):
            path = Path(os.path.abspath(item.path))
            out.append(RootConfig(path, item.include, item.exclude))
            continue
        path = Path(os.path.abspath(Path(item).expanduser()))
        known = configured.get(path)
        out.append(RootConfig(path, known.include, known.exclude) if known else RootConfig(path))
    return tuple(out)
