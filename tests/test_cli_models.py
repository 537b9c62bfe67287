"""`capwatch models list|pull|info` as a user drives them (offline: no hub is reachable from tests)."""

from __future__ import annotations

import json

from tests.conftest import FIXTURES, CliRunner, assert_one_line_error


def test_models_list_marks_the_default_and_the_cache(run_cli: CliRunner) -> None:
    result = run_cli("models", "list")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("* florence-2-base-ft") and "default" in lines[0]
    assert any(line.split()[0] == "vit-gpt2" for line in lines)
    rows = [json.loads(line) for line in run_cli("models", "list", "--json").out.splitlines()]
    assert {r["name"] for r in rows} >= {"florence-2-base-ft", "florence-2-large-ft", "vit-gpt2"}
    assert all(r["cached_precisions"] == [] for r in rows)


def test_models_info_of_a_directory(run_cli: CliRunner) -> None:
    result = run_cli("models", "info", FIXTURES / "models" / "florence2-tiny")
    assert result.code == 0, result.err
    assert "florence2" in result.out and "<CAPTION>" in result.out
    info = json.loads(run_cli("models", "info", FIXTURES / "models" / "vit-gpt2-tiny-beam", "--json").out)
    assert info["model_type"] == "vision-encoder-decoder"
    assert {p["precision"] for p in info["precisions"]} == {"fp32", "int8"}


def test_models_info_of_a_registry_name(run_cli: CliRunner) -> None:
    result = run_cli("models", "info", "vit-gpt2")
    assert result.code == 0, result.err
    assert "Xenova/vit-gpt2-image-captioning@" in result.out


def test_pull_offline_and_unknown_names_are_one_line(run_cli: CliRunner) -> None:
    line = assert_one_line_error(run_cli("models", "pull", "vit-gpt2"))
    assert "offline" in line.lower()
    line = assert_one_line_error(run_cli("models", "pull", "no-such-model"))
    assert "no-such-model" in line
    assert_one_line_error(run_cli("models", "info", "no-such-model"))
    line = assert_one_line_error(run_cli("models", "info", FIXTURES / "images"))
    assert "not a model directory" in line
