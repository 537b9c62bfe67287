"""The daemon's index lock against `capwatch status` readers: a reader asking "is a daemon running?" at the
moment a daemon starts must not make that daemon refuse to start."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from capwatch.daemon.instance import DaemonAlreadyRunning, InstanceLock, lock_path


def _hold_shared(path: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process that takes the shared lock `capwatch status` takes, says so, and keeps it a while."""
    code = f"""
        import fcntl, os, sys, time
        fd = os.open({str(path)!r}, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH)
        print("held", flush=True)
        time.sleep({seconds})
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_daemon_starting_while_status_peeks_at_the_lock_waits_for_the_reader(tmp_path: Path) -> None:
    index = tmp_path / "index.db"
    lock_path(index).write_text("")
    reader = _hold_shared(lock_path(index), 0.3)
    lock = InstanceLock(index)
    try:
        lock.acquire()  # used to raise "another capwatch daemon is already running"
    finally:
        lock.release()
        reader.wait(10)


def test_a_second_daemon_is_still_refused(tmp_path: Path) -> None:
    index = tmp_path / "index.db"
    first = InstanceLock(index)
    first.acquire()
    try:
        with pytest.raises(DaemonAlreadyRunning):
            InstanceLock(index).acquire()
    finally:
        first.release()
