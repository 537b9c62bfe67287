"""``[model] repo`` / ``revision`` (a hub model the registry does not know), ``find_model``, ``model_spec`` and the
pull's ``on_plan`` hook, against the local hub on 127.0.0.1."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import MODELS
from hub_server import FakeHub

from capwatch.config import ModelConfig, apply_overrides, load_config_file
from capwatch.errors import ModelError, ModelUnreachable
from capwatch.models.store import find_model, model_spec, pull, resolve_model
from tests.conftest import CliRunner

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("loopback_only")]

TINY = MODELS / "vit-gpt2-tiny-greedy"
HUB_REPO = "capwatch-test/vit-gpt2-tiny"
COMMIT = hashlib.sha1(b"tiny model, repo config").hexdigest()


def _files() -> dict[str, bytes]:
    files = {name: (TINY / name).read_bytes()
             for name in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json")}
    files.update({f"onnx/{g.name}": g.read_bytes() for g in (TINY / "onnx").glob("*.onnx")})
    return files


def _env(tmp_path: Path, **more: str) -> dict[str, str]:
    return {"CAPWATCH_CACHE_DIR": str(tmp_path / "cache"), "XDG_STATE_HOME": str(tmp_path / "state"), **more}


def test_repo_and_revision_load_from_the_config_and_a_model_named_elsewhere_drops_them(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[model]\nname = "tiny"\nrepo = "{HUB_REPO}"\nrevision = "{COMMIT}"\n')
    config = load_config_file(path)
    assert (config.model.name, config.model.repo, config.model.revision) == ("tiny", HUB_REPO, COMMIT)
    # The same name again (CAPWATCH_MODEL=tiny) keeps them; another name means another model.
    assert apply_overrides(config, model="tiny").model.repo == HUB_REPO
    other = apply_overrides(config, model="vit-gpt2").model
    assert (other.name, other.repo, other.revision) == ("vit-gpt2", None, None)


@pytest.mark.parametrize(("model", "message"), [
    (ModelConfig(name="tiny", revision="main"), "needs model.repo"),
    (ModelConfig(name="tiny", repo="no-slash"), "not a hub repository name"),
    (ModelConfig(name="tiny", repo="a/../b"), "not a hub repository name"),
    (ModelConfig(name="../escape", repo=HUB_REPO), "cannot name a model folder"),
    (ModelConfig(name="tiny", repo=HUB_REPO, revision="has space"), "not a commit, branch or tag"),
    (ModelConfig(name="no-such-model"), "unknown model 'no-such-model'"),
    (ModelConfig(name="vit-gpt2", precision="fp16"), "has no fp16 variant"),
])
def test_model_spec_refuses_what_no_waiting_can_fix_in_one_line(model: ModelConfig, message: str) -> None:
    with pytest.raises(ModelError) as info:
        model_spec(model)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_find_model_never_downloads_and_says_none_while_the_model_is_missing(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert find_model(ModelConfig(dir=tmp_path / "not-mounted-yet"), env) is None
    assert find_model(ModelConfig(name="tiny", repo=HUB_REPO, revision=COMMIT), env) is None
    assert find_model(ModelConfig(), env) is None  # florence-2-base-ft, not in this cache
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ModelError):
        find_model(ModelConfig(dir=tmp_path / "a-file"), env)  # there, but not a folder: no waiting fixes it


def test_a_repo_model_is_downloaded_by_resolve_model_and_found_in_the_cache_afterwards(tmp_path: Path) -> None:
    model = ModelConfig(name="tiny", repo=HUB_REPO, revision=COMMIT, precision="fp32")
    with FakeHub() as hub:
        hub.add_commit(HUB_REPO, COMMIT, _files())
        env = _env(tmp_path, HF_ENDPOINT=hub.url)
        resolved = resolve_model(model, env, download=True)
        assert (resolved.model_id, resolved.revision, resolved.precision, resolved.name) == \
            (HUB_REPO, COMMIT, "fp32", "tiny")
        assert (resolved.dir / "onnx" / "encoder_model.onnx").read_bytes() == (TINY / "onnx/encoder_model.onnx") \
            .read_bytes()
        assert not (resolved.dir / "onnx" / "vision_encoder.onnx").exists()  # Florence-2's graphs are optional
        before = len(hub.requests)
        assert find_model(model, env) == resolved
        assert len(hub.requests) == before


def test_a_repo_model_without_network_says_so_without_naming_models_pull(tmp_path: Path) -> None:
    with FakeHub() as hub:
        url = hub.url
    model = ModelConfig(name="tiny", repo=HUB_REPO, revision=COMMIT)
    with pytest.raises(ModelUnreachable) as info:
        resolve_model(model, _env(tmp_path, HF_ENDPOINT=url), download=True)
    text = str(info.value)
    assert "cannot download tiny" in text and "capwatch models pull" not in text and info.value.problem
    with pytest.raises(ModelError) as missing:
        resolve_model(model, _env(tmp_path, CAPWATCH_OFFLINE="1"), download=True)
    assert "not in the cache" in str(missing.value) and "models pull" not in str(missing.value)


def test_pull_announces_every_file_and_its_size_before_the_first_byte(tmp_path: Path) -> None:
    from capwatch.models.registry import custom_spec

    files = _files()
    spec = custom_spec("tiny", HUB_REPO, COMMIT)
    events: list[tuple[str, Any]] = []
    with FakeHub() as hub:
        hub.add_commit(HUB_REPO, COMMIT, files)
        pull("tiny", "fp32", _env(tmp_path), endpoint=hub.url, registry=[spec],
             on_plan=lambda plan: events.append(("plan", list(plan))),
             progress=lambda path, done, total: events.append(("progress", path)))
    assert events[0][0] == "plan" and all(kind == "progress" for kind, _ in events[1:])
    planned = dict(events[0][1])
    expected = {p: len(d) for p, d in files.items() if not p.endswith("_quantized.onnx")}
    assert planned == expected


def test_recaption_model_changed_works_with_a_repo_model_that_is_not_downloaded_yet(
        tmp_path: Path, run_cli: CliRunner) -> None:
    # Which files were captioned by another model is decided without the model: a [model] repo the registry does
    # not know must not be looked up by name there.
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\nname = "tiny"\nrepo = "{HUB_REPO}"\nrevision = "{COMMIT}"\n')
    photos = tmp_path / "photos"
    photos.mkdir()
    assert run_cli("--config", config, "--db", tmp_path / "index.db", "scan", "--no-caption", photos).code == 0
    result = run_cli("--config", config, "--db", tmp_path / "index.db", "recaption", "--model-changed", "--dry-run",
                     photos)
    assert result.code == 0, result.err
    assert "0 files would be captioned again" in result.out
