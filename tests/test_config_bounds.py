"""Every number in the configuration is finite and within its field's range: nan, inf, -inf, huge and negative
values are one-line ConfigErrors naming the file, the dotted key and the allowed range, in-process and through the
CLI (exit 2, no traceback)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import pytest

from capwatch.config import Config, Range, load_config, load_config_file
from capwatch.errors import ConfigError
from tests.conftest import CliRunner, assert_one_line_error

REPO = Path(__file__).resolve().parent.parent


def _numeric_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, type, Range | None]]:
    """(dotted key, int or float, its Range or None) for every numeric field of the config dataclasses."""
    out: list[tuple[str, type, Range | None]] = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for field in dataclasses.fields(cls):
        if field.name == "source":
            continue
        tp: Any = hints[field.name]
        if dataclasses.is_dataclass(tp):
            out += _numeric_fields(tp, f"{prefix}{field.name}.")  # type: ignore[arg-type]
            continue
        optional = get_origin(tp) in (typing.Union, types.UnionType)
        args = [a for a in get_args(tp) if a is not type(None)] if optional else [tp]
        for arg in args:
            bounds = None
            if get_origin(arg) is Annotated:
                arg, *extras = get_args(arg)
                bounds = next((e for e in extras if isinstance(e, Range)), None)
            if arg in (int, float):
                out.append((prefix + field.name, arg, bounds))
    return out


NUMERIC = _numeric_fields()
KEYS = [key for key, _, _ in NUMERIC]


def _field(key: str) -> tuple[type, Range]:
    for name, tp, bounds in NUMERIC:
        if name == key:
            assert bounds is not None
            return tp, bounds
    raise KeyError(key)


def _write(tmp_path: Path, key: str, literal: str) -> Path:
    section, name = key.split(".")
    path = tmp_path / "config.toml"
    path.write_text(f"[{section}]\n{name} = {literal}\n")
    return path


def _config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_every_numeric_field_has_a_range_and_its_default_is_inside_it() -> None:
    assert len(NUMERIC) >= 14  # index 1, model 8, watch 5: the walk found them all
    defaults = Config()
    for key, tp, bounds in NUMERIC:
        assert bounds is not None, f"{key} has no Range"
        section, name = key.split(".")
        value = getattr(getattr(defaults, section), name)
        if value is not None:
            assert bounds.problem(value, integer=tp is int) is None, (key, value)


def test_example_with_generation_overrides_uncommented_loads(tmp_path: Path) -> None:
    # config.example.toml comments the generation overrides out; uncommented, its values must be valid too.
    text = (REPO / "config.example.toml").read_text()
    for name in ("num_beams", "max_new_tokens", "min_length", "length_penalty", "no_repeat_ngram_size",
                 "early_stopping"):
        text = text.replace(f"# {name} =", f"{name} =")
    path = tmp_path / "example.toml"
    path.write_text(text)
    assert load_config_file(path).model.num_beams == 3


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("literal", ["nan", "inf", "-inf", "+inf", "1e300", "-1e300", "100000000000000000000000",
                                     "-100000000000000000000000", "-1"])
def test_out_of_range_numbers_are_one_line_errors_naming_file_key_and_range(
    tmp_path: Path, key: str, literal: str
) -> None:
    _, bounds = _field(key)
    path = _write(tmp_path, key, literal)
    if bounds.lo <= float(literal) <= bounds.hi:  # -1 is a valid length_penalty
        load_config_file(path)
        return
    message = _config_error(path)
    assert message.startswith(f"{path}: {key}: "), message
    assert str(bounds) in message, message  # e.g. "0 to 86400"


@pytest.mark.parametrize("key", KEYS)
def test_both_ends_of_each_range_are_accepted_and_one_step_outside_is_not(tmp_path: Path, key: str) -> None:
    tp, bounds = _field(key)
    section, name = key.split(".")
    for value in (bounds.lo, bounds.hi):
        literal = str(int(value)) if tp is int else repr(float(value))
        loaded = getattr(getattr(load_config_file(_write(tmp_path, key, literal)), section), name)
        assert loaded == value and type(loaded) is tp
    step = 1 if tp is int else 0.001
    for value in (bounds.lo - step, bounds.hi + step):
        literal = str(int(value)) if tp is int else repr(float(value))
        assert str(bounds) in _config_error(_write(tmp_path, key, literal))


def test_nan_seconds_name_the_key_and_the_range(tmp_path: Path) -> None:
    message = _config_error(_write(tmp_path, "watch.settle_seconds", "nan"))
    assert "watch.settle_seconds: expected a finite number from 0 to 86400, got nan" in message
    message = _config_error(_write(tmp_path, "model.idle_unload_seconds", "nan"))
    assert "model.idle_unload_seconds: expected a finite number from 0 to 86400, got nan" in message
    message = _config_error(_write(tmp_path, "index.busy_timeout_seconds", "inf"))
    assert "index.busy_timeout_seconds: expected a finite number from 0 to 86400, got inf" in message


def test_generation_overrides_are_bounded(tmp_path: Path) -> None:
    assert "model.num_beams: expected an integer from 1 to 32, got 1000000" in _config_error(
        _write(tmp_path, "model.num_beams", "1000000"))
    assert "model.max_new_tokens: expected an integer from 1 to 4096, got 1000000000" in _config_error(
        _write(tmp_path, "model.max_new_tokens", "1000000000"))
    assert "model.no_repeat_ngram_size: expected a non-negative integer from 0 to 16, got 99" in _config_error(
        _write(tmp_path, "model.no_repeat_ngram_size", "99"))
    assert "model.max_new_tokens: expected an integer, got 1.5 (allowed: 1 to 4096)" in _config_error(
        _write(tmp_path, "model.max_new_tokens", "1.5"))


def test_integer_fields_refuse_floats_and_float_fields_take_integers(tmp_path: Path) -> None:
    assert "expected an integer, got 2.0" in _config_error(_write(tmp_path, "model.threads", "2.0"))
    assert load_config_file(_write(tmp_path, "watch.settle_seconds", "3")).watch.settle_seconds == 3.0


def test_integers_too_long_for_python_and_nesting_too_deep_for_tomllib_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[model]\nthreads = " + "9" * 5000 + "\n")
    assert "invalid TOML" in _config_error(path)
    path.write_text("[library]\nexclude = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert "invalid TOML: nested too deeply" in _config_error(path)
    path.write_text("# padding\n" * 200_000)
    assert "too large" in _config_error(path)


def test_load_config_goes_through_the_same_checks(tmp_path: Path) -> None:
    path = _write(tmp_path, "watch.queue_size", "inf")
    with pytest.raises(ConfigError, match=r"watch\.queue_size: expected an integer, got inf \(allowed: 1 to 1000000\)"):
        load_config(path, env={})


def test_range_problem_is_none_inside_and_describes_outside() -> None:
    bounds = Range(0, 10)
    assert bounds.problem(0, integer=True) is None and bounds.problem(10.0, integer=False) is None
    assert bounds.problem(True, integer=True) == "expected an integer, got True (allowed: 0 to 10)"
    assert bounds.problem(math.nan, integer=False) == "expected a finite number from 0 to 10, got nan"
    assert bounds.problem(10**5000, integer=True) == (
        "expected a non-negative integer from 0 to 10, got an integer of more than 80 digits")
    assert bounds.problem("x" * 500, integer=False) is not None
    assert len(bounds.problem("x" * 500, integer=False) or "") < 150


# -- through the CLI ---------------------------------------------------------------------------------------------

_CLI_VALUES = ["nan", "inf", "-inf", "1e300", "100000000000000000000000", "-1"]


@pytest.mark.parametrize("key", KEYS)
def test_cli_status_with_a_bad_number_is_one_line_exit_2(run_cli: CliRunner, tmp_path: Path, key: str) -> None:
    # Each key gets a different bad value, so that every kind of value is also seen by the CLI.
    literal = _CLI_VALUES[KEYS.index(key) % len(_CLI_VALUES)]
    path = _write(tmp_path, key, literal)
    line = assert_one_line_error(run_cli("--config", path, "status"))
    assert line.startswith("capwatch: error: ") and f"{path}: {key}: " in line
    assert str(_field(key)[1]) in line


@pytest.mark.parametrize("literal", _CLI_VALUES)
def test_cli_busy_timeout_inf_and_friends_are_one_line(run_cli: CliRunner, tmp_path: Path, literal: str) -> None:
    path = _write(tmp_path, "index.busy_timeout_seconds", literal)
    db = tmp_path / "index.db"
    line = assert_one_line_error(run_cli("--config", path, "--db", db, "status"))
    assert "index.busy_timeout_seconds" in line and "0 to 86400" in line


def test_cli_deeply_nested_toml_is_one_line(run_cli: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("[library]\nexclude = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert "nested too deeply" in assert_one_line_error(run_cli("--config", path, "status"))
