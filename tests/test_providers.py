"""Execution providers (config model.providers) and the default thread count."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from capwatch.config import ModelConfig
from capwatch.models.captioner import open_captioner
from capwatch.models.session import available_cores, physical_cores, resolve_providers, session_options
from tests.conftest import CliRunner, assert_one_line_error

GREEDY = Path(__file__).parent / "fixtures" / "models" / "vit-gpt2-tiny-greedy"


def test_requested_providers_keep_their_order_and_the_cpu_comes_last() -> None:
    have = ["CUDAExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["openvino", "cuda", "cpu"], have) == (
        ["OpenVINOExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], [])
    assert resolve_providers(["cpu", "cuda"], have) == (["CUDAExecutionProvider", "CPUExecutionProvider"], [])
    assert resolve_providers(["cuda"], have) == (["CUDAExecutionProvider", "CPUExecutionProvider"], [])


def test_providers_this_onnxruntime_lacks_are_reported_and_skipped() -> None:
    assert resolve_providers(["cuda", "coreml"], ["CPUExecutionProvider"]) == (["CPUExecutionProvider"],
                                                                               ["cuda", "coreml"])


def test_a_missing_gpu_provider_falls_back_to_the_cpu_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    goldens = json.loads((GREEDY / "goldens.json").read_text())
    pixels = np.load(GREEDY / "pixel_values.npz")
    config = ModelConfig(dir=GREEDY, precision="fp32", threads=1, providers=("cuda", "cpu"))
    cap = open_captioner(GREEDY, config)
    assert cap.provider is None  # nothing loaded yet
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            got = [list(r.token_ids) for r in cap.caption_pixels(np.stack([pixels[n] for n in goldens["images"]]))]
    assert got == [goldens["token_ids"]["default"][n] for n in goldens["images"]]
    assert cap.provider == "cpu"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "cuda not available in this onnxruntime" in warnings[0] and "running on cpu" in warnings[0]
    assert all(entry["providers"] == ["cpu"] for entry in cap.sessions.describe().values())


def test_default_threads_are_the_physical_cores() -> None:
    assert 1 <= physical_cores() <= available_cores()
    assert session_options(0).intra_op_num_threads == physical_cores()
    assert session_options(3).intra_op_num_threads == 3


def test_an_unknown_provider_name_is_a_config_error(run_cli: CliRunner, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[model]\nproviders = ["gpu"]\n')
    line = assert_one_line_error(run_cli("--config", config, "models", "info", GREEDY))
    assert "model.providers" in line and "'cuda'" in line


def test_models_info_says_where_the_model_runs(run_cli: CliRunner, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[model]\nproviders = ["tensorrt", "cpu"]\n')
    result = run_cli("--config", config, "models", "info", GREEDY)
    assert result.code == 0, result.err
    line = next(line for line in result.out.splitlines() if line.startswith("runs on"))
    assert line.split()[2] == "cpu" and "not available: tensorrt" in line
    data = json.loads(run_cli("--config", config, "models", "info", "--json", GREEDY).out)
    assert data["provider"] == "cpu" and data["providers_missing"] == ["tensorrt"]


def test_status_names_the_provider_the_daemon_runs_on() -> None:
    from capwatch.cli.find import _running_model

    live = {"model": "vit-gpt2", "model_id": "Xenova/vit-gpt2-image-captioning", "model_revision": "215b4edcb7ec",
            "model_precision": "int8+encoder_model=fp32", "model_provider": "cuda"}
    line = _running_model(live, "vit-gpt2")
    assert line == "vit-gpt2 (Xenova/vit-gpt2-image-captioning @ 215b4edcb7ec, int8+encoder_model=fp32, on cuda)"
