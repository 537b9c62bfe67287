"""The shipped systemd units are valid (``systemd-analyze verify``) and keep the promises the daemon relies on."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def _parse(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(UNITS / name)
    return parser


def _analyze_works() -> bool:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        return False
    probe = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return probe.returncode == 0


def _capwatch_command() -> str:
    found = shutil.which("capwatch") or str(Path(sys.executable).with_name("capwatch"))
    return found


@pytest.mark.skipif(not _analyze_works(), reason="systemd-analyze is not available here")
def test_system_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at the capwatch installed here.
    text = (UNITS / "capwatch.service").read_text().replace("/usr/local/bin/capwatch", _capwatch_command())
    unit = tmp_path / "capwatch.service"
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.skipif(not _analyze_works(), reason="systemd-analyze is not available here")
def test_user_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = (UNITS / "capwatch-user.service").read_text().replace("%h/.local/bin/capwatch", _capwatch_command())
    unit = tmp_path / "capwatch.service"
    unit.write_text(text)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    result = subprocess.run(["systemd-analyze", "--user", "verify", str(unit)], capture_output=True, text=True,
                            check=False, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_system_unit_is_a_sandboxed_notify_service() -> None:
    service = _parse("capwatch.service")["Service"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # a config error is not fixed by restarting every 10 s
    assert service["WatchdogSec"]
    assert service["User"] == "capwatch"
    assert service["StateDirectory"] == "capwatch"
    assert service["CacheDirectory"] == "capwatch"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"]
    assert service["NoNewPrivileges"] == "true"
    assert service["PrivateTmp"] == "true"
    assert service["IOSchedulingClass"] == "idle"
    assert int(service["Nice"]) > 0
    assert service["MemoryMax"]
    assert service["OOMPolicy"] == "continue"  # a killed helper process does not stop the service
    assert "-HUP" in service["ExecReload"]
    assert service["ExecStart"].split()[-1] == "watch"


def test_user_unit_is_a_notify_service_started_with_the_session() -> None:
    parsed = _parse("capwatch-user.service")
    assert parsed["Service"]["Type"] == "notify"
    assert parsed["Service"]["ExecStart"].endswith(" watch")
    assert parsed["Install"]["WantedBy"] == "default.target"
