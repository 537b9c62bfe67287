"""`capwatch status` about a running daemon's model: no "reload to switch" when a reload would not switch (the
daemon was started with --model), and no "model model NAME" in its model line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from daemon_helpers import MODELS, REPO, copy_images, stop_daemon, wait_until, write_config

from tests.conftest import isolated_env

VIT = MODELS / "vit-gpt2-tiny-greedy"


def _env(tmp_path: Path) -> dict[str, str]:
    env = isolated_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)
    return env


def _capwatch(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "capwatch", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def _status(env: dict[str, str], config: Path) -> tuple[dict[str, object], str]:
    as_json = _capwatch(env, "--config", config, "status", "--json")
    assert as_json.returncode == 0, as_json.stderr
    text = _capwatch(env, "--config", config, "status")
    assert text.returncode == 0, text.stderr
    return json.loads(as_json.stdout), text.stdout


def _watch(env: dict[str, str], config: Path, *args: str | Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "capwatch", "--config", str(config), *map(str, args), "watch"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_status_does_not_offer_a_reload_to_a_daemon_started_with_a_model(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    copy_images(root, 1)
    config = write_config(tmp_path / "config.toml", db=tmp_path / "index.db", roots=[root])  # the default model
    env = _env(tmp_path)
    proc = _watch(env, config, "--model", VIT)
    try:
        wait_until(lambda: (_status(env, config)[0].get("daemon") or {}).get("model_id"), what="the model running")
        payload, text = _status(env, config)
        [line] = [line for line in text.splitlines() if line.startswith("model ")]
        assert "reload the daemon to switch" not in line, line
        assert f"started with the model {VIT}" in line and "restart it" in line, line
        assert payload["daemon"]["model_override"] == str(VIT)  # type: ignore[index]
    finally:
        assert stop_daemon(proc) == 0


def test_status_names_a_missing_model_once(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    copy_images(root, 1)
    config = write_config(tmp_path / "config.toml", db=tmp_path / "index.db", roots=[root])
    env = _env(tmp_path)  # CAPWATCH_OFFLINE=1 and an empty cache: the default model is not there
    proc = _watch(env, config)
    try:
        wait_until(lambda: (_status(env, config)[0].get("daemon") or {}).get("model_state") == "missing",
                   what="the daemon saying the model is missing")
        _, text = _status(env, config)
        [line] = [line for line in text.splitlines() if line.startswith("  model ")]
        assert "model model" not in line and "is not downloaded" in line, line
        model = next(line for line in text.splitlines() if line.startswith("model "))
        assert "reload the daemon" not in model, model
    finally:
        assert stop_daemon(proc) == 0
