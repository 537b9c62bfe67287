"""The watcher on a real folder with real watchdog observers: what reaches the daemon, and what does not."""

from __future__ import annotations

import errno
import logging
import os
import queue
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from capwatch.config import LibraryConfig, RootConfig, WatchConfig
from capwatch.daemon.watcher import Watcher, WatchEvent, default_observer_factory

TIMEOUT = 15.0


class Sink:
    def __init__(self) -> None:
        self.q: queue.SimpleQueue[WatchEvent] = queue.SimpleQueue()
        self.seen: list[WatchEvent] = []

    def __call__(self, event: WatchEvent) -> None:
        self.q.put(event)

    def wait_for(self, predicate: Callable[[WatchEvent], bool], timeout: float = TIMEOUT) -> WatchEvent:
        deadline = time.monotonic() + timeout
        for event in self.seen:
            if predicate(event):
                return event
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching event within {timeout} s; saw {self.seen}")
            try:
                event = self.q.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(event)
            if predicate(event):
                return event

    def drain(self) -> list[WatchEvent]:
        while True:
            try:
                self.seen.append(self.q.get_nowait())
            except queue.Empty:
                return self.seen


@pytest.fixture
def library(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    return root


@pytest.fixture
def watching(library: Path) -> Iterator[tuple[Watcher, Sink]]:
    sink = Sink()
    watcher = Watcher(LibraryConfig(), WatchConfig(), sink)
    watcher.start_root(RootConfig(library))
    try:
        yield watcher, sink
    finally:
        watcher.stop()


def _write(path: Path, data: bytes = b"\xff\xd8\xff\xe0 not really a jpeg") -> None:
    path.write_bytes(data)


def _marker(sink: Sink, library: Path, name: str) -> None:
    """Write a candidate file and wait for it: everything before it has been delivered (inotify keeps order)."""
    _write(library / name)
    sink.wait_for(lambda e: e.path == library / name and e.kind == "closed")


def test_new_image_is_reported_changed_then_closed(watching: tuple[Watcher, Sink], library: Path) -> None:
    _, sink = watching
    _write(library / "a.jpg")
    sink.wait_for(lambda e: e.kind == "closed" and e.path == library / "a.jpg")
    assert all(e.root == library for e in sink.seen)


def test_non_images_hidden_and_partial_files_are_ignored(watching: tuple[Watcher, Sink], library: Path) -> None:
    _, sink = watching
    _write(library / "notes.txt")
    _write(library / ".hidden.jpg")
    _write(library / "download.jpg.part")
    _write(library / "chrome.jpg.crdownload")
    (library / ".git").mkdir()
    _write(library / ".git" / "x.jpg")
    _marker(sink, library, "z.jpg")
    assert {e.path.name for e in sink.drain()} == {"z.jpg"}


def test_partial_download_renamed_into_place_is_complete(watching: tuple[Watcher, Sink], library: Path) -> None:
    _, sink = watching
    _write(library / "photo.jpg.crdownload")
    os.rename(library / "photo.jpg.crdownload", library / "photo.jpg")
    event = sink.wait_for(lambda e: e.path == library / "photo.jpg")
    assert event.kind == "closed"


def test_rsync_temp_name_renamed_into_place_is_complete(watching: tuple[Watcher, Sink], library: Path) -> None:
    _, sink = watching
    _write(library / ".IMG_1.jpg.Ab12Cd")
    os.rename(library / ".IMG_1.jpg.Ab12Cd", library / "IMG_1.jpg")
    assert sink.wait_for(lambda e: e.path == library / "IMG_1.jpg").kind == "closed"


def test_rename_and_delete_are_reported(watching: tuple[Watcher, Sink], library: Path) -> None:
    _, sink = watching
    _marker(sink, library, "a.jpg")
    os.rename(library / "a.jpg", library / "b.jpg")
    moved = sink.wait_for(lambda e: e.kind == "moved")
    assert (moved.path, moved.dest) == (library / "a.jpg", library / "b.jpg")
    os.unlink(library / "b.jpg")
    assert sink.wait_for(lambda e: e.kind == "deleted").path == library / "b.jpg"


def test_renaming_an_image_to_a_non_image_is_a_delete(watching: tuple[Watcher, Sink], library: Path) -> None:
    _, sink = watching
    _marker(sink, library, "a.jpg")
    os.rename(library / "a.jpg", library / "a.jpg.bak")
    assert sink.wait_for(lambda e: e.kind == "deleted").path == library / "a.jpg"


def test_subfolders_are_watched_and_a_removed_folder_is_reported(
    watching: tuple[Watcher, Sink], library: Path
) -> None:
    _, sink = watching
    sub = library / "2024" / "summer"
    sub.mkdir(parents=True)
    _write(sub / "beach.jpg")
    # Written before watchdog's watch on the new folder is in place, its close may be missed; the create is not
    # (watchdog walks new folders), and the settler's stat check covers the rest.
    sink.wait_for(lambda e: e.path == sub / "beach.jpg")
    shutil.rmtree(library / "2024")
    sink.wait_for(lambda e: e.kind == "deleted" and e.path == sub / "beach.jpg")
    sink.wait_for(lambda e: e.kind == "dir_gone" and e.path == library / "2024")


def test_excluded_globs_are_ignored(library: Path) -> None:
    sink = Sink()
    watcher = Watcher(LibraryConfig(), WatchConfig(), sink)
    watcher.start_root(RootConfig(library, exclude=("private/**",)))
    try:
        (library / "private").mkdir()
        (library / "@eaDir").mkdir()  # a NAS thumbnail folder, excluded by default
        _write(library / "private" / "p.jpg")
        _write(library / "@eaDir" / "thumb.jpg")
        _marker(sink, library, "ok.jpg")
        assert {e.path.name for e in sink.drain()} == {"ok.jpg"}
    finally:
        watcher.stop()


def test_symlink_out_of_the_root_is_not_followed(tmp_path: Path, watching: tuple[Watcher, Sink],
                                                  library: Path) -> None:
    _, sink = watching
    outside = tmp_path / "elsewhere.jpg"
    _write(outside)
    (library / "link.jpg").symlink_to(outside)
    (library / "inside.jpg").symlink_to(library / "z.jpg")
    _marker(sink, library, "z.jpg")
    names = {e.path.name for e in sink.drain()}
    assert "link.jpg" not in names
    assert "inside.jpg" in names


def test_polling_observer_when_configured(library: Path) -> None:
    sink = Sink()
    watcher = Watcher(LibraryConfig(), WatchConfig(poll=True, poll_interval_seconds=0.2), sink)
    try:
        assert watcher.start_root(RootConfig(library)) == "polling"
        _write(library / "p.jpg")
        sink.wait_for(lambda e: e.path == library / "p.jpg" and e.kind == "changed")
    finally:
        watcher.stop()


def test_inotify_exhaustion_falls_back_to_polling_with_one_log_line(
    library: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Running the kernel out of inotify watches would break every other process on this machine, so the
    # exhaustion itself is simulated at the one place it surfaces: starting the inotify observer.
    def factory(mode: Any, watch: WatchConfig) -> Any:
        if mode == "inotify":
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return default_observer_factory(mode, watch)

    sink = Sink()
    watcher = Watcher(LibraryConfig(), WatchConfig(poll_interval_seconds=0.2), sink, observer_factory=factory)
    try:
        with caplog.at_level(logging.WARNING, logger="capwatch.daemon.watcher"):
            assert watcher.start_root(RootConfig(library)) == "polling"
        lines = [r.getMessage() for r in caplog.records if "inotify" in r.getMessage()]
        assert len(lines) == 1
        assert "fs.inotify.max_user_watches" in lines[0] and "polling" in lines[0]
        _write(library / "p.jpg")
        sink.wait_for(lambda e: e.path == library / "p.jpg")
    finally:
        watcher.stop()


def test_missing_root_raises_and_removed_or_replaced_root_is_unhealthy(tmp_path: Path) -> None:
    watcher = Watcher(LibraryConfig(), WatchConfig(), Sink())
    root = tmp_path / "gone"
    with pytest.raises(FileNotFoundError):
        watcher.start_root(RootConfig(root))
    root.mkdir()
    watcher.start_root(RootConfig(root))
    try:
        assert watcher.healthy(root)
        root.rename(tmp_path / "old")
        root.mkdir()  # a different folder under the same name (a remount, a restore)
        assert not watcher.healthy(root)
        watcher.start_root(RootConfig(root))
        assert watcher.healthy(root)
        shutil.rmtree(root)
        assert not watcher.healthy(root)
    finally:
        watcher.stop()
    assert watcher.watched() == {}


def test_inotify_queue_overflow_is_reported_so_the_daemon_can_reconcile(library: Path) -> None:
    # The kernel queue limit is system-wide (fs.inotify.max_queued_events); overflowing it here would disturb
    # other processes. watchdog's only signal is its warning, which is what we hook; that warning is emitted
    # here exactly as watchdog words it.
    calls: list[int] = []
    watcher = Watcher(LibraryConfig(), WatchConfig(), Sink(), on_overflow=lambda: calls.append(1))
    watcher.start_root(RootConfig(library))
    logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; filesystem events were lost")
    assert calls == [1]
    watcher.stop()
    logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; filesystem events were lost")
    assert calls == [1]
