"""Two daemons on different indexes must not watch the same folder: their indexes would disagree.

The lock is keyed by the folder's real path (a symlink to it is the same folder) and lives in the state directory;
the second daemon refuses to start with one line naming the first one's pid and index, and a folder that a reload
adds while another daemon holds it is left out (logged) while the daemon keeps serving its other folders.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from daemon_helpers import TIMEOUT, copy_images, rows, start_daemon, stop_daemon, wait_until, write_config

from capwatch.config import load_config
from capwatch.daemon.instance import InstanceLock, RootInUse, read_live_state
from capwatch.daemon.service import run_daemon


@contextmanager
def _daemon(config: Path, db: Path, *, log: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_daemon(config, caption=False, log=log)
    try:
        wait_until(lambda: read_live_state(db) or proc.poll() is not None, what="daemon start")
        assert proc.poll() is None, "daemon exited at start"
        yield proc
        assert stop_daemon(proc, signal.SIGTERM) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "photos", tmp_path / "more"
    copy_images(first, 2)
    copy_images(second, 1)
    return first, second


def test_second_daemon_on_another_index_and_the_same_folder_is_refused(tmp_path: Path,
                                                                        folders: tuple[Path, Path]) -> None:
    root, _ = folders
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    db1, db2 = tmp_path / "one" / "index.db", tmp_path / "two" / "index.db"
    config1 = write_config(tmp_path / "one.toml", db=db1, roots=[root])
    config2 = write_config(tmp_path / "two.toml", db=db2, roots=[alias])  # the same folder, by another name
    with _daemon(config1, db1) as first:
        wait_until(lambda: len(rows(db1)) == 2, what="first daemon's backfill")
        second = start_daemon(config2, caption=False)
        _, err = second.communicate(timeout=TIMEOUT)
        lines = [line for line in err.decode().splitlines() if line.strip()]
        assert second.returncode == 2, err
        assert len(lines) == 1, err
        assert lines[0].startswith("capwatch: error: ")
        assert os.path.realpath(root) in lines[0] and "already watched" in lines[0]
        assert f"pid {first.pid}" in lines[0] and f"index {db1}" in lines[0]
        assert rows(db2) == {}
        assert first.poll() is None  # the first daemon is untouched
        # In-process (tests, embedding): the refusal also gives back the index lock it had taken.
        with pytest.raises(RootInUse):
            run_daemon(load_config(config2), None, stop_event=threading.Event(), caption=False)
        lock = InstanceLock(db2)
        lock.acquire()
        lock.release()
    # The kernel dropped the first daemon's locks with it: now the second one may watch the folder.
    with _daemon(config2, db2):
        wait_until(lambda: len(rows(db2)) == 2, what="second daemon's backfill")


def test_a_folder_another_daemon_holds_is_left_out_on_reload(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    root, other = folders
    db1, db2 = tmp_path / "one" / "index.db", tmp_path / "two" / "index.db"
    config1 = write_config(tmp_path / "one.toml", db=db1, roots=[root])
    config2 = write_config(tmp_path / "two.toml", db=db2, roots=[other])
    log = tmp_path / "second.log"
    with _daemon(config1, db1), _daemon(config2, db2, log=log) as second:
        write_config(config2, db=db2, roots=[other, root])
        second.send_signal(signal.SIGHUP)
        wait_until(lambda: "already watched" in log.read_text(), what="the refusal in the log")
        wait_until(lambda: "configuration reloaded" in log.read_text(), what="reload")
        state = read_live_state(db2)
        assert state is not None and set(state["roots"]) == {str(other)}
        assert second.poll() is None
        assert not any(path.startswith(str(root)) for path in rows(db2))
