"""Helpers shared by the daemon tests: start real daemons, wait for conditions with timeouts (never sleeps)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures"
IMAGES = FIXTURES / "images"
MODELS = FIXTURES / "models"
REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def write_config(path: Path, *, db: Path, roots: list[Path], model_dir: Path | None = None,
                 settle: float = 0.2, batch_wait_ms: int = 50, batch_size: int = 4, queue_size: int = 64,
                 recheck: float = 0.5, extra: str = "") -> Path:
    root_list = ", ".join(f'"{r}"' for r in roots)
    model = f'dir = "{model_dir}"\nprecision = "fp32"\nidle_unload_seconds = 0\n' if model_dir else ""
    path.write_text(
        f'[library]\nroots = [{root_list}]\n\n[index]\npath = "{db}"\n\n'
        f"[model]\n{model}batch_size = {batch_size}\n\n"
        f"[watch]\nsettle_seconds = {settle}\nbatch_wait_ms = {batch_wait_ms}\nqueue_size = {queue_size}\n"
        f"recheck_missing_seconds = {recheck}\n\n[logging]\nlevel = \"info\"\n{extra}"
    )
    return path


def copy_images(dest: Path, count: int, *, names: tuple[str, ...] = ("blobs.jpg", "gradient.jpg")) -> list[Path]:
    """Copy ``count`` fixture images into ``dest`` (cycling through ``names``)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        name = names[i % len(names)]
        target = dest / f"img{i:05d}{Path(name).suffix}"
        shutil.copyfile(IMAGES / name, target)
        out.append(target)
    return out


def rows(db: Path) -> dict[str, tuple[Any, ...]]:
    """path -> (status, caption, source, fingerprint) straight from SQLite (an independent reader)."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return {r[0]: r[1:] for r in conn.execute("SELECT path, status, caption, source, fingerprint FROM images")}
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


def daemon_command(config: Path, *, caption: bool = True, dirs: tuple[Path, ...] = ()) -> list[str]:
    """The real command line that runs the daemon in the foreground: ``capwatch --config C watch [DIRS]``."""
    command = [sys.executable, "-m", "capwatch", "--config", str(config), "watch", *map(str, dirs)]
    if not caption:
        command.append("--no-caption")
    return command


def start_daemon(config: Path, *, env: dict[str, str] | None = None, caption: bool = True,
                 log: Path | None = None) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)}
    full_env.pop("NOTIFY_SOCKET", None)
    full_env.pop("WATCHDOG_USEC", None)
    full_env.update(env or {})
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    return subprocess.Popen(daemon_command(config, caption=caption), env=full_env, stdout=out,
                            stderr=subprocess.STDOUT if log is not None else subprocess.PIPE,
                            start_new_session=True)


def stop_daemon(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout)


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    @staticmethod
    def _has(message: str, needle: str) -> bool:
        # "READY=1" must be a whole line; "STATUS=" matches any status line.
        return any(line == needle or (needle.endswith("=") and line.startswith(needle))
                   for line in message.splitlines())

    def wait_for(self, needle: str, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        for message in self.messages:
            if self._has(message, needle):
                return message
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {needle!r} within {timeout} s; got {self.messages}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            message = data.decode()
            self.messages.append(message)
            if self._has(message, needle):
                return message

    def close(self) -> None:
        self.sock.close()
