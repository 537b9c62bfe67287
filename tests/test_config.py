"""Configuration loading: the example file, load order, overrides and one-line errors."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from capwatch.config import Config, ModelConfig, apply_overrides, load_config, load_config_file
from capwatch.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.toml"


def _all_keys(cls: type, prefix: str = "") -> set[str]:
    keys = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name == "source":
            continue
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            keys |= _all_keys(tp, f"{prefix}{field.name}.")  # type: ignore[arg-type]
        else:
            keys.add(prefix + field.name)
    return keys


def test_example_config_loads_and_matches_defaults_where_given(tmp_path: Path) -> None:
    config = load_config_file(EXAMPLE)
    defaults = Config()
    assert config.model == defaults.model
    assert config.metadata == defaults.metadata
    assert config.watch == defaults.watch
    assert config.library.extensions == defaults.library.extensions
    assert config.library.exclude == defaults.library.exclude
    assert config.library.roots == defaults.library.roots  # left out: the pictures folder, if there is one


def test_example_config_mentions_every_key() -> None:
    text = EXAMPLE.read_text()
    for key in _all_keys(Config):
        section, name = key.split(".", 1)
        assert f"[{section}]" in text, section
        assert f"{name} =" in text or f"# {name} =" in text, f"config.example.toml does not document {key}"


def test_roots_accept_strings_and_tables_relative_to_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[library]\nroots = ["photos", { path = "/srv/p", include = ["**/*.jpg"], exclude = ["x/**"] }]\n')
    config = load_config_file(cfg)
    assert config.library.roots[0].path == tmp_path / "photos"
    assert config.library.roots[1].include == ("**/*.jpg",)
    assert config.library.roots[1].exclude == ("x/**",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[model]\nprecision = 'int4'\n",
         "model.precision: expected one of 'auto', 'fp32', 'int8', 'fp16', got 'int4'"),
        ("[model]\nthreads = 'two'\n", "model.threads: expected an integer, got 'two'"),
        ("[model]\nint8_image_encoder = 'fast'\n",
         "model.int8_image_encoder: expected one of 'dynamic', 'static', got 'fast'"),
        ("[model]\nthreads = -1\n", "model.threads: expected a non-negative integer"),
        ("[watch]\nsettle_seconds = true\n", "watch.settle_seconds: expected a number"),
        ("[metadata]\nwrite = 'everywhere'\n", "metadata.write: expected one of"),
        ("[metadta]\nwrite = 'none'\n", "metadta: unknown key; allowed keys here: library, index"),
        ("[model]\nnmae = 'x'\n", "model.nmae: unknown key"),
        ("[library]\nroots = [3]\n", "library.roots.0: expected a table"),
        ("[library]\nroots = 'x'\n", "library.roots: expected a list"),
        ("model = 3\n", "model: expected a table"),
        ("[model\n", "invalid TOML"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config_file(cfg)
    assert str(cfg) in str(info.value)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", env={})


def test_load_order_explicit_then_env_then_xdg_then_defaults(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg" / "capwatch"
    xdg.mkdir(parents=True)
    (xdg / "config.toml").write_text("[model]\nthreads = 3\n")
    env_file = tmp_path / "env.toml"
    env_file.write_text("[model]\nthreads = 2\n")
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[model]\nthreads = 1\n")
    base_env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}
    import os

    old = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")  # platformdirs reads the real environment
    try:
        assert load_config(explicit, env={**base_env, "CAPWATCH_CONFIG": str(env_file)}).model.threads == 1
        assert load_config(None, env={**base_env, "CAPWATCH_CONFIG": str(env_file)}).model.threads == 2
        assert load_config(None, env=base_env).model.threads == 3
        (xdg / "config.toml").unlink()
        assert load_config(None, env=base_env) == Config()
    finally:
        if old is None:
            del os.environ["XDG_CONFIG_HOME"]
        else:
            os.environ["XDG_CONFIG_HOME"] = old


def test_env_and_cli_overrides_for_db_and_model(tmp_path: Path) -> None:
    config = load_config(None, env={"CAPWATCH_DB": str(tmp_path / "x.db"), "CAPWATCH_MODEL": "vit-gpt2",
                                    "CAPWATCH_CONFIG": ""})
    assert config.index_path() == tmp_path / "x.db"
    assert config.model.name == "vit-gpt2" and config.model.dir is None
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    config = apply_overrides(config, model=str(model_dir))
    assert config.model.dir == model_dir


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().threads = 3  # type: ignore[misc]
