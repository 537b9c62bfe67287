"""The daemon's lifecycle with real processes, real sockets and a real index."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import (
    IMAGES,
    NotifySocket,
    copy_images,
    rows,
    start_daemon,
    stop_daemon,
    wait_until,
    write_config,
)

from capwatch.config import load_config
from capwatch.daemon.service import DaemonAlreadyRunning, SystemdNotifier, live_state_path, read_live_state, run_daemon


class ThreadDaemon:
    """run_daemon in a thread of this process (fast; no signals), stopped through its stop_event."""

    def __init__(self, config_path: Path, *, caption: bool = False) -> None:
        self.config = load_config(config_path)
        self.stop_event = threading.Event()
        self.result: list[object] = []
        self.thread = threading.Thread(target=self._run, args=(caption,), daemon=True)

    def _run(self, caption: bool) -> None:
        try:
            self.result.append(run_daemon(self.config, None, stop_event=self.stop_event, caption=caption))
        except BaseException as exc:
            self.result.append(exc)

    def __enter__(self) -> ThreadDaemon:
        self.thread.start()
        index = self.config.index_path()
        wait_until(lambda: read_live_state(index) or self.result, what="daemon start")
        assert not self.result, self.result
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(60)
        assert not self.thread.is_alive()
        assert self.result == [0], self.result


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    root = tmp_path / "photos"
    root.mkdir()
    db = tmp_path / "state" / "index.db"
    config = write_config(tmp_path / "config.toml", db=db, roots=[root])
    yield config, root, db


def test_dropped_files_are_indexed_and_live_state_is_published(setup: tuple[Path, Path, Path]) -> None:
    config, root, db = setup
    (root / "old.jpg").write_bytes((IMAGES / "blobs.jpg").read_bytes())  # there before start: backfill
    with ThreadDaemon(config):
        wait_until(lambda: str(root / "old.jpg") in rows(db), what="backfill")
        shutil.copyfile(IMAGES / "gradient.jpg", root / "new.jpg")
        wait_until(lambda: str(root / "new.jpg") in rows(db), what="live event")
        state = read_live_state(db)
        assert state is not None
        assert state["pid"] == os.getpid()
        assert {"queue", "rate_per_minute", "errors", "model_loaded", "started"} <= set(state)
        assert state["roots"] == {str(root): "inotify"}
    assert read_live_state(db) is None
    assert not live_state_path(db).exists()


def test_stale_live_state_is_not_reported(setup: tuple[Path, Path, Path]) -> None:
    _, _, db = setup
    db.parent.mkdir(parents=True)
    # A daemon killed with -9 leaves its state file behind; its lock died with it.
    live_state_path(db).write_text(json.dumps({"pid": os.getpid(), "queue": 3}))
    assert read_live_state(db) is None


def test_second_instance_on_the_same_index_is_refused(setup: tuple[Path, Path, Path]) -> None:
    config, _, _ = setup
    with ThreadDaemon(config) as first:
        with pytest.raises(DaemonAlreadyRunning) as info:
            run_daemon(first.config, None, stop_event=threading.Event(), caption=False)
        message = str(info.value)
        assert "\n" not in message
        assert "already running" in message and f"pid {os.getpid()}" in message


def _missing(db: Path) -> list[str] | None:
    state = read_live_state(db)
    return None if state is None else list(state["missing_roots"])


def test_root_unmounted_replaced_and_remounted_keeps_its_index_entries(
    tmp_path: Path, setup: tuple[Path, Path, Path]
) -> None:
    config, root, db = setup
    copy_images(root, 5)
    with ThreadDaemon(config):
        wait_until(lambda: len(rows(db)) == 5, what="backfill of 5 files")
        away = tmp_path / "away"
        root.rename(away)  # unmounted: the folder is gone
        wait_until(lambda: _missing(db) == [str(root)], what="root reported missing")
        root.mkdir()  # the empty mount point is back, without the disk
        wait_until(lambda: (read_live_state(db) or {}).get("roots") == {str(root): "inotify"},
                   what="empty mount point watched")
        wait_until(lambda: _missing(db) == [str(root)], what="empty root still counted as missing")
        assert len(rows(db)) == 5
        root.rmdir()
        away.rename(root)  # remounted
        wait_until(lambda: _missing(db) == [] and (read_live_state(db) or {}).get("roots") == {str(root): "inotify"},
                   what="root back")
        assert len(rows(db)) == 5


def test_root_deleted_with_rm_rf_keeps_its_index_entries(setup: tuple[Path, Path, Path]) -> None:
    config, root, db = setup
    copy_images(root, 20)
    with ThreadDaemon(config):
        wait_until(lambda: len(rows(db)) == 20, what="backfill")
        shutil.rmtree(root)  # a delete event for every file, then the folder
        wait_until(lambda: _missing(db) == [str(root)], what="root reported missing")
        root.mkdir()
        wait_until(lambda: (read_live_state(db) or {}).get("roots") == {str(root): "inotify"}, what="re-watched")
    assert len(rows(db)) == 20


def test_deleting_one_file_removes_its_row(setup: tuple[Path, Path, Path]) -> None:
    config, root, db = setup
    files = copy_images(root, 3)
    with ThreadDaemon(config):
        wait_until(lambda: len(rows(db)) == 3, what="backfill")
        files[0].unlink()
        wait_until(lambda: str(files[0]) not in rows(db), what="row removed")
        files[1].rename(root / "renamed.jpg")
        wait_until(lambda: str(root / "renamed.jpg") in rows(db) and str(files[1]) not in rows(db),
                   what="row moved")
    assert set(rows(db)) == {str(files[2]), str(root / "renamed.jpg")}


def test_sd_notify_sigterm_and_sighup_with_a_real_process(tmp_path: Path, setup: tuple[Path, Path, Path]) -> None:
    config, root, db = setup
    other = tmp_path / "more"
    other.mkdir()
    notify = NotifySocket(tmp_path / "notify.sock")
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, caption=False, log=log,
                        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
    try:
        notify.wait_for("READY=1")
        notify.wait_for("STATUS=")
        notify.wait_for("WATCHDOG=1")
        state = wait_until(lambda: read_live_state(db), what="live state")
        assert state["pid"] == proc.pid
        # SIGHUP: the new configuration (a second root) is picked up without a restart.
        write_config(config, db=db, roots=[root, other])
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: str(other) in (read_live_state(db) or {}).get("roots", {}), what="reloaded roots")
        assert proc.poll() is None
        assert stop_daemon(proc, signal.SIGTERM) == 0
        notify.wait_for("STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert read_live_state(db) is None


def test_sigint_also_stops_cleanly(setup: tuple[Path, Path, Path]) -> None:
    config, _, db = setup
    proc = start_daemon(config, caption=False)
    try:
        wait_until(lambda: read_live_state(db), what="daemon start")
        assert stop_daemon(proc, signal.SIGINT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_notifier_supports_abstract_sockets_and_ignores_missing_socket() -> None:
    assert SystemdNotifier({}).notify("READY=1") is False
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        name = f"capwatch-test-{os.getpid()}"
        sock.bind(b"\0" + name.encode())
        sock.settimeout(10)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000"})
        assert notifier.watchdog_interval == 1.0
        assert notifier.notify("READY=1", "STATUS=hello")
        assert sock.recv(100) == b"READY=1\nSTATUS=hello"
    # systemd asked another process for watchdog pings: not us.
    assert SystemdNotifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
