"""Embedding models in the model store: `capwatch models list|info|pull` and `[embed] model = NAME`, against a real
HTTP server on 127.0.0.1 that answers like the hub (tests/hub_server.py) and serves a tiny CLIP as the registry's
clip-vit-b32 at its pinned commit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hub_server import FakeHub

from capwatch.config import Config, EmbedConfig, ModelConfig
from capwatch.errors import ModelError
from capwatch.models.embedding import open_embedder
from capwatch.models.preprocess import load_image
from capwatch.models.registry import get_spec
from capwatch.models.store import list_models, model_spec, resolve_model
from tests.conftest import FIXTURES, CliRunner, assert_one_line_error

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("loopback_only")]

CLIP = get_spec("clip-vit-b32")
TINY = FIXTURES / "models" / "clip-tiny"
#: What the hub serves: the fixture's files under the registry's names (no special_tokens_map.json: it is optional).
SERVED = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
          "onnx/vision_model.onnx", "onnx/text_model.onnx", "onnx/vision_model_quantized.onnx",
          "onnx/text_model_quantized.onnx")


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as server:
        server.add_commit(CLIP.repo, CLIP.revision, {name: (TINY / name).read_bytes() for name in SERVED})
        yield server


def _golden_cosines() -> tuple[list[str], list[Path], np.ndarray]:
    golden = json.loads((TINY / "goldens.json").read_text())
    texts = [row["text"] for row in golden["texts"]]
    images = [FIXTURES.parent.parent / item["file"] for item in golden["images"]]
    t = np.array([row["features"] for row in golden["texts"]])
    i = np.array([item["features"] for item in golden["images"]])
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    i /= np.linalg.norm(i, axis=1, keepdims=True)
    return texts, images, t @ i.T


def test_models_list_shows_the_embedding_models_and_marks_the_configured_one(run_cli: CliRunner,
                                                                              tmp_path: Path) -> None:
    rows = [json.loads(line) for line in run_cli("models", "list", "--json").out.splitlines()]
    kinds = {row["name"]: row["kind"] for row in rows}
    assert kinds["siglip2-base"] == kinds["clip-vit-b32"] == "embed" and kinds["florence-2-base-ft"] == "caption"
    assert [r["name"] for r in rows if r["default"] and r["kind"] == "embed"] == ["siglip2-base"]
    text = run_cli("models", "list").out.splitlines()
    assert any(line.startswith("* siglip2-base") for line in text)
    assert any(line.startswith("* florence-2-base-ft") for line in text)
    config = tmp_path / "c.toml"
    config.write_text('[embed]\nmodel = "clip-vit-b32"\n')
    text = run_cli("--config", config, "models", "list").out.splitlines()
    assert any(line.startswith("* clip-vit-b32") for line in text)
    assert not any(line.startswith("* siglip2-base") for line in text)


def test_models_info_of_an_embedding_directory_and_name(run_cli: CliRunner) -> None:
    info = json.loads(run_cli("models", "info", TINY, "--json").out)
    assert info["model_type"] == "clip" and info["family"] == "clip"
    assert {p["precision"]: p["complete"] for p in info["precisions"]} == {"fp32": True, "int8": True}
    result = run_cli("models", "info", "siglip2-base")
    assert result.code == 0, result.err
    assert "onnx-community/siglip2-base-patch16-224-ONNX@ba1f3b0843f2" in result.out
    assert "siglip" in result.out and "not downloaded" in result.out


def test_models_pull_of_an_embedding_model_then_embedding_offline(hub: FakeHub, run_cli: CliRunner,
                                                                  tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {"CAPWATCH_CACHE_DIR": str(cache), "CAPWATCH_OFFLINE": "", "HF_ENDPOINT": hub.url}
    result = run_cli("models", "pull", "clip-vit-b32", env=env)
    assert result.code == 0, result.err
    assert "clip-vit-b32 int8 ->" in result.out and CLIP.revision[:12] in result.out
    # Only the default precision's graphs came down.
    fetched = {r.path.split("/resolve/")[-1].split("/", 1)[1] for r in hub.requests if "/resolve/" in r.path}
    assert "onnx/vision_model_quantized.onnx" in fetched and "onnx/vision_model.onnx" not in fetched
    rows = [json.loads(line) for line in run_cli("models", "list", "--json", env={"CAPWATCH_CACHE_DIR": str(cache)})
            .out.splitlines()]
    assert next(r for r in rows if r["name"] == "clip-vit-b32")["cached_precisions"] == ["int8"]
    # [embed] model = NAME now works with no network at all.
    store_env = {"CAPWATCH_CACHE_DIR": str(cache), "CAPWATCH_OFFLINE": "1", "XDG_STATE_HOME": str(tmp_path / "st")}
    embedder = open_embedder(Config(embed=EmbedConfig(model="clip-vit-b32")), store_env)
    assert embedder is not None
    assert embedder.model_id == f"{CLIP.repo}@{CLIP.revision[:12]}/int8" and embedder.precision == "int8"
    assert embedder.embed_texts(["a dog"]).shape == (1, 16)


def test_embed_model_by_name_is_pulled_on_first_use_and_equals_transformers(hub: FakeHub, tmp_path: Path) -> None:
    env = {"CAPWATCH_CACHE_DIR": str(tmp_path / "cache"), "HF_ENDPOINT": hub.url,
           "XDG_STATE_HOME": str(tmp_path / "state")}
    config = Config(embed=EmbedConfig(model="clip-vit-b32", precision="fp32"))
    embedder = open_embedder(config, env)
    assert embedder is not None and embedder.dir.name == CLIP.revision
    assert embedder.model_id == f"{CLIP.repo}@{CLIP.revision[:12]}/fp32"
    # The same files named as a directory (the cache folder capwatch stamped) keep the same id.
    same = open_embedder(Config(embed=EmbedConfig(model=str(embedder.dir), precision="fp32")), env)
    assert same is not None and same.model_id == embedder.model_id
    texts, images, expected = _golden_cosines()
    got = embedder.embed_texts(texts) @ embedder.embed_images([load_image(p) for p in images]).T
    assert np.abs(got - expected).max() < 1e-4
    gets = hub.count("GET")
    assert open_embedder(config, env) is not None and hub.count("GET") == gets  # cached: no download again


def test_not_cached_offline_is_one_line_saying_how_to_get_it(tmp_path: Path) -> None:
    env = {"CAPWATCH_CACHE_DIR": str(tmp_path / "cache"), "CAPWATCH_OFFLINE": "1"}
    with pytest.raises(ModelError) as info:
        open_embedder(Config(), env)
    text = str(info.value)
    assert "\n" not in text and "capwatch models pull siglip2-base" in text and "[embed] model = DIR" in text
    assert open_embedder(Config(embed=EmbedConfig(model="off")), env) is None  # off needs nothing


def test_a_model_of_the_other_kind_is_refused_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"captioning model, not an image–text embedding model") as info:
        open_embedder(Config(embed=EmbedConfig(model="florence-2-base-ft")), {"CAPWATCH_OFFLINE": "1"})
    assert "\n" not in str(info.value) and "siglip2-base" in str(info.value)
    with pytest.raises(ModelError, match=r"set it as \[embed\] model"):
        model_spec(ModelConfig(name="clip-vit-b32"))
    with pytest.raises(ModelError, match="embedding model"):
        resolve_model(ModelConfig(name="siglip2-base"), {"CAPWATCH_CACHE_DIR": str(tmp_path)})
    with pytest.raises(ModelError, match="unknown model 'no-such'"):
        open_embedder(Config(embed=EmbedConfig(model="no-such")), {"CAPWATCH_OFFLINE": "1"})


def test_captioner_name_through_the_cli_refuses_an_embedding_model(run_cli: CliRunner, tmp_path: Path) -> None:
    image = tmp_path / "red.png"
    image.write_bytes((FIXTURES / "images" / "red.png").read_bytes())
    line = assert_one_line_error(run_cli("--model", "clip-vit-b32", "caption", "--dry-run", image))
    assert "[embed] model" in line


def test_list_models_knows_every_embedding_entry(tmp_path: Path) -> None:
    statuses = {s.name: s for s in list_models({"CAPWATCH_CACHE_DIR": str(tmp_path)})}
    for name in ("siglip2-base", "clip-vit-b32", "siglip-base"):
        assert statuses[name].kind == "embed" and statuses[name].cached_precisions == ()
