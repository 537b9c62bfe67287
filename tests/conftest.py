"""Shared test helpers: run the real `capwatch` CLI in a subprocess with an isolated environment."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


CliRunner = Callable[..., CliResult]


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """An environment where capwatch finds no user config, cache or state outside ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPWATCH_") and k != "NOTIFY_SOCKET"}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update({
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "CAPWATCH_OFFLINE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    return env


@pytest.fixture
def run_cli(tmp_path: Path) -> CliRunner:
    """Run ``python -m capwatch ARGS`` and return its exit code, stdout and stderr."""
    base_env = isolated_env(tmp_path)

    def run(*args: str | Path, env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = 120) -> CliResult:
        proc = subprocess.run(
            [sys.executable, "-m", "capwatch", *map(str, args)],
            env={**base_env, **(env or {})}, input=input, capture_output=True, text=True, timeout=timeout,
            cwd=tmp_path,
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


def assert_one_line_error(result: CliResult, code: int = 2) -> str:
    """The CLI contract for bad input: exit ``code``, exactly one line on stderr, no traceback."""
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err, result.err
    assert len(result.err_lines) == 1, result.err
    return result.err_lines[0]


@contextmanager
def read_only_dir(path: Path) -> Iterator[None]:
    """Make the directory ``path`` unwritable for this process, root included.

    A mode of 0o555 stops ordinary users; root ignores modes, so as root the directory is made immutable with
    ``chattr +i`` (the kernel then refuses creating, renaming and removing entries even for root). Skips the test
    only when neither works (root on a file system without the immutable attribute).
    """
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: no way to make a folder read-only")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write journal (and anything else in the state and cache dirs) of in-process and child capwatch runs goes
    to a fresh folder per test, never into the real home directory."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    # rewritten model graphs (capwatch.models.derived) too
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything in the test (in this process) tries to reach a non-loopback address."""
    original = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"test tried to connect to {address!r}")
        original(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", guarded)


#: The DejaVu font the OCR tests draw text with (Debian's fonts-dejavu-core).
DEJAVU_BOLD = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


def pytest_configure(config: pytest.Config) -> None:
    """In CI everything the tests skip without must be there: the independent readers (exiftool, exiv2), ffmpeg
    (makes and checks the test videos) and the DejaVu font (text drawn for OCR). Their tests must run in CI, never
    skip quietly."""
    if os.environ.get("CI"):
        missing = [tool for tool in ("exiftool", "exiv2", "ffmpeg", "ffprobe") if shutil.which(tool) is None]
        if not DEJAVU_BOLD.is_file():
            missing.append("the DejaVu fonts")
        if missing:
            pytest.exit(f"CI needs {' and '.join(missing)} for the tests that use them: .ci/run must install them",
                        returncode=1)


@pytest.fixture(scope="session", autouse=True)
def _compiled_capwatch() -> None:
    """Every capwatch child process of the tests (CLI runs, daemons, servers, writers: thousands of them) reads
    capwatch's modules compiled once, here, into their usual __pycache__ folders, instead of compiling each again
    at every start ($PYTHONDONTWRITEBYTECODE, set for the CLI runs, keeps them from writing any). The same source,
    compiled by the same Python; Python uses an entry only while it matches its source's mtime and size."""
    import importlib.util
    import py_compile

    for source in sorted((REPO / "capwatch").rglob("*.py")):
        with contextlib.suppress(OSError, py_compile.PyCompileError):  # read-only checkout: children compile
            py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)), doraise=True)
