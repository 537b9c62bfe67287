"""Image–text embeddings equal transformers' (CLIP and SigLIP families) on the tiny fixtures.

The goldens (tools/make_embed_fixtures.py) hold, per fixture, transformers' tokenizer ids and
``get_text_features`` for texts of every kind (empty, truncated, punctuation, non-ASCII, odd whitespace), and the
slow image processor's pixels and ``get_image_features`` for every test image (odd sizes, grey, alpha,
EXIF-rotated, real photos). Only onnxruntime runs here.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from capwatch.config import Config, EmbedConfig, ModelConfig, load_config, load_config_file
from capwatch.errors import ModelError
from capwatch.models.embedding import GRAPHS, ImageTextEmbedder, open_embedder
from capwatch.models.preprocess import load_image

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "fixtures" / "models"
FIXTURES = ["clip-tiny", "clip-tiny-b", "siglip-tiny", "siglip2-tiny"]


def _goldens(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MODELS / name / "goldens.json").read_text())
    return data


def _embedder(name: str, precision: str = "fp32", **kwargs: Any) -> ImageTextEmbedder:
    config = Config(embed=EmbedConfig(model=str(MODELS / name), precision=precision, **kwargs))  # type: ignore[arg-type]
    embedder = open_embedder(config, {})
    assert embedder is not None
    return embedder


def _unit(rows: list[list[float]]) -> np.ndarray:
    data = np.asarray(rows, dtype=np.float64)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


@pytest.mark.parametrize("name", FIXTURES)
def test_token_ids_equal_transformers_tokenizer(name: str) -> None:
    embedder = _embedder(name)
    for row in _goldens(name)["texts"]:
        batch = embedder.tokenizer.encode([row["text"]])
        assert batch.input_ids[0].tolist() == row["input_ids"], row["text"]
        assert batch.attention_mask[0].tolist() == row["attention_mask"], row["text"]


@pytest.mark.parametrize("name", FIXTURES)
def test_pixels_equal_transformers_image_processor(name: str) -> None:
    embedder = _embedder(name)
    pixels = np.load(MODELS / name / "goldens_pixels.npz")
    for item in _goldens(name)["images"]:
        ours = embedder.preprocess_image(load_image(ROOT / item["file"]))
        expected = pixels[Path(item["file"]).name]
        assert ours.shape == expected.shape
        np.testing.assert_allclose(ours, expected, atol=1e-6, err_msg=item["file"])


@pytest.mark.parametrize("name", FIXTURES)
def test_cosine_of_text_and_image_equals_transformers_within_1e4(name: str) -> None:
    golden = _goldens(name)
    embedder = _embedder(name)
    texts = embedder.embed_texts([row["text"] for row in golden["texts"]])
    images = embedder.embed_images([load_image(ROOT / item["file"]) for item in golden["images"]])
    expected = _unit([r["features"] for r in golden["texts"]]) @ _unit([r["features"] for r in golden["images"]]).T
    assert np.abs(texts @ images.T - expected).max() < 1e-4
    # The vectors themselves, not only their cosines.
    np.testing.assert_allclose(texts, _unit([r["features"] for r in golden["texts"]]), atol=1e-5)
    np.testing.assert_allclose(images, _unit([r["features"] for r in golden["images"]]), atol=1e-5)
    # The goldens tell inputs apart (a constant model would pass any comparison).
    assert expected.max() - expected.min() > 0.2


@pytest.mark.parametrize("name", FIXTURES)
def test_vectors_are_unit_float32_rows_of_the_model_width(name: str) -> None:
    embedder = _embedder(name)
    texts = embedder.embed_texts(["a", "b c"])
    images = embedder.embed_images([load_image(ROOT / "tests/fixtures/images/red.png")])
    for vectors, rows in ((texts, 2), (images, 1)):
        assert vectors.dtype == np.float32 and vectors.shape == (rows, embedder.dim)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert embedder.embed_texts([]).shape == (0, embedder.dim)
    assert embedder.embed_images([]).shape == (0, embedder.dim)


@pytest.mark.parametrize("name", ["clip-tiny", "siglip2-tiny"])
def test_batches_give_the_same_vectors_as_one_at_a_time(name: str) -> None:
    golden = _goldens(name)
    texts = [row["text"] for row in golden["texts"]]
    images = [load_image(ROOT / item["file"]) for item in golden["images"]]
    embedder = _embedder(name, batch_size=4)
    together_t, together_i = embedder.embed_texts(texts), embedder.embed_images(images)
    alone_t = np.concatenate([embedder.embed_texts([t]) for t in texts])
    alone_i = np.concatenate([embedder.embed_images([i]) for i in images])
    np.testing.assert_allclose(together_t, alone_t, atol=1e-5)
    np.testing.assert_allclose(together_i, alone_i, atol=1e-5)


def test_long_text_is_cut_to_the_text_window_keeping_eos_last() -> None:
    embedder = _embedder("clip-tiny-b")  # a 20-token window
    long_text = " ".join(["children playing football on the grass"] * 20)
    ids = embedder.tokenizer.encode([long_text]).input_ids[0].tolist()
    assert len(ids) == 20
    assert ids[-1] == embedder.tokenizer.encode([""]).input_ids[0].tolist()[-1]  # EOS
    # Cut text means equal vectors past the window: the cut is made, not an error from the graph.
    np.testing.assert_allclose(embedder.embed_texts([long_text]), embedder.embed_texts([long_text + " more"]),
                               atol=1e-6)


def test_siglip_text_is_canonicalised_as_the_siglip_tokenizer_does() -> None:
    embedder = _embedder("siglip-tiny")
    np.testing.assert_allclose(embedder.embed_texts(["A Dog, on the BEACH!"]),
                               embedder.embed_texts(["a dog on the beach"]), atol=1e-6)
    assert embedder.tokenizer.encode(["x"]).input_ids.shape == (1, embedder.tokenizer.max_length)  # max_length


def test_gemma_style_tokenizer_follows_tokenizer_config_bos_eos_and_left_padding() -> None:
    embedder = _embedder("siglip2-tiny")
    tok = embedder.tokenizer
    ids = tok.encode(["a dog"]).input_ids[0].tolist()
    settings = json.loads((MODELS / "siglip2-tiny" / "tokenizer_config.json").read_text())
    vocab = json.loads((MODELS / "siglip2-tiny" / "tokenizer.json").read_text())["added_tokens"]
    by_name = {t["content"]: t["id"] for t in vocab}
    assert settings["add_bos_token"] is False and settings["add_eos_token"] is True
    assert ids[-1] == by_name["<eos>"] and by_name["<bos>"] not in ids
    assert ids[0] == by_name["<pad>"] and tok.pad_left


def test_int8_precision_runs_the_quantized_graphs() -> None:
    fp32, int8 = _embedder("clip-tiny", "fp32"), _embedder("clip-tiny", "int8")
    assert all(int8.paths[g].name == f"{g}_quantized.onnx" for g in GRAPHS)
    assert int8.model_id.endswith("/int8") and fp32.model_id.endswith("/fp32") and int8.model_id != fp32.model_id
    image = load_image(ROOT / "tests/fixtures/photos/chelsea.jpg")
    a, b = fp32.embed_images([image])[0], int8.embed_images([image])[0]
    assert abs(float(np.linalg.norm(b)) - 1.0) < 1e-5
    assert float(a @ b) > 0.9  # close to fp32, as dynamic int8 is
    # auto on a directory: fp32, the reference, when it is there.
    assert _embedder("clip-tiny", "auto").precision == "fp32"


def test_text_graph_threads_sleep_after_a_query_and_the_image_graphs_spin() -> None:
    embedder = _embedder("clip-tiny")
    embedder.embed_texts(["a dog"])
    embedder.embed_images([load_image(ROOT / "tests/fixtures/images/red.png")])

    def spinning(session: Any) -> str | None:
        try:
            return str(session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning"))
        except RuntimeError:  # not set: onnxruntime's default, spinning
            return None

    with embedder.sessions.use() as sessions:
        assert spinning(sessions["text_model"]) == "0"
        # The image graphs run batch after batch during a scan: they keep the default.
        assert spinning(sessions["vision_model"]) is None


def test_model_id_of_a_directory_follows_its_weights(tmp_path: Path) -> None:
    copy = tmp_path / "clip-tiny"
    shutil.copytree(MODELS / "clip-tiny", copy)
    first = _embedder(str(copy)).model_id
    assert first.startswith("dir:clip-tiny@") and _embedder(str(copy)).model_id == first
    graph = copy / "onnx" / "vision_model.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")  # any other bytes: other weights
    assert _embedder(str(copy)).model_id != first


def test_sessions_load_on_first_use_and_unload_when_idle() -> None:
    now = [0.0]
    config = Config(model=ModelConfig(idle_unload_seconds=10), embed=EmbedConfig(model=str(MODELS / "siglip-tiny")))
    embedder = open_embedder(config, {}, clock=lambda: now[0])
    assert embedder is not None and not embedder.loaded
    embedder.embed_texts(["a dog"])
    assert embedder.loaded
    now[0] = 5.0
    assert not embedder.unload_if_idle()
    now[0] = 20.0
    assert embedder.unload_if_idle() and not embedder.loaded
    with embedder:
        assert embedder.embed_texts(["a dog"]).shape == (1, embedder.dim)
    assert not embedder.loaded


def test_a_query_embedder_loads_its_text_graph_ahead_and_only_that(tmp_path: Path) -> None:
    config = Config(embed=EmbedConfig(model=str(MODELS / "clip-tiny")))
    embedder = open_embedder(config, {}, load_text=True)
    assert embedder is not None
    loading = [t for t in threading.enumerate() if t.name == "capwatch-text-model"]
    for thread in loading:
        thread.join(30)
    assert embedder.loaded
    assert [name for name, s in embedder.sessions._sessions.items() if s.loaded] == ["text_model"]
    golden = _goldens("clip-tiny")["texts"]
    np.testing.assert_allclose(embedder.embed_texts([row["text"] for row in golden]),
                               _unit([row["features"] for row in golden]), atol=1e-5)
    # a text graph that cannot load: nothing raised ahead, the first query says what is wrong in one line
    broken = tmp_path / "broken"
    shutil.copytree(MODELS / "clip-tiny", broken)
    (broken / "onnx" / "text_model.onnx").write_bytes(b"not a graph")
    bad = open_embedder(Config(embed=EmbedConfig(model=str(broken))), {}, load_text=True)
    assert bad is not None
    with pytest.raises(ModelError, match=r"text_model\.onnx: cannot load ONNX graph"):
        bad.embed_texts(["a dog"])


def test_off_gives_no_embedder() -> None:
    assert open_embedder(Config(embed=EmbedConfig(model="off")), {}) is None
    assert open_embedder(Config(embed=EmbedConfig(model="OFF")), {}) is None


def test_env_variable_overrides_the_configured_embedding_model(tmp_path: Path) -> None:
    toml = tmp_path / "config.toml"
    toml.write_text('[embed]\nmodel = "clip-vit-b32"\nprecision = "int8"\n')
    config = load_config(toml, env={"CAPWATCH_EMBED_MODEL": str(MODELS / "siglip-tiny")})
    assert config.embed.dir == MODELS / "siglip-tiny" and config.embed.precision == "int8"
    assert load_config(toml, env={"CAPWATCH_EMBED_MODEL": "off"}).embed.off
    assert load_config(toml, env={}).embed.model == "clip-vit-b32"
    assert Config().embed.model == "siglip2-base"


def test_relative_directory_in_the_config_file_is_relative_to_that_file(tmp_path: Path) -> None:
    shutil.copytree(MODELS / "clip-tiny", tmp_path / "models" / "clip")
    (tmp_path / "config.toml").write_text('[embed]\nmodel = "./models/clip"\n')
    config = load_config_file(tmp_path / "config.toml")
    assert config.embed.dir is not None and config.embed.dir.resolve() == (tmp_path / "models" / "clip").resolve()
    embedder = open_embedder(config, {})
    assert embedder is not None and embedder.embed_texts(["x"]).shape == (1, 16)


def test_a_captioning_model_directory_is_a_one_line_error() -> None:
    with pytest.raises(ModelError) as info:
        _embedder("vit-gpt2-tiny-greedy")
    text = str(info.value)
    assert "\n" not in text and "model_type 'vision-encoder-decoder'" in text and "clip, siglip" in text


def test_a_missing_directory_or_graph_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        open_embedder(Config(embed=EmbedConfig(model=str(tmp_path / "nowhere"))), {})
    copy = tmp_path / "siglip"
    shutil.copytree(MODELS / "siglip-tiny", copy)
    (copy / "onnx" / "text_model.onnx").unlink()
    with pytest.raises(ModelError, match=r"text_model\.onnx") as info:
        open_embedder(Config(embed=EmbedConfig(model=str(copy), precision="fp32")), {})
    assert "\n" not in str(info.value)
    # auto falls back to the precision that is complete
    embedder = open_embedder(Config(embed=EmbedConfig(model=str(copy))), {})
    assert embedder is not None and embedder.precision == "int8"


def test_graph_with_other_output_names_is_refused_on_load(tmp_path: Path) -> None:
    # A SigLIP folder whose config says CLIP: the graphs lack image_embeds / text_embeds.
    copy = tmp_path / "mixed"
    shutil.copytree(MODELS / "siglip-tiny", copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "clip"
    config["projection_dim"] = 32
    (copy / "config.json").write_text(json.dumps(config))
    embedder = open_embedder(Config(embed=EmbedConfig(model=str(copy))), {})
    assert embedder is not None
    with pytest.raises(ModelError, match="image_embeds") as info:
        embedder.embed_images([load_image(ROOT / "tests/fixtures/images/red.png")])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("name", "family", "window"), [("siglip2-tiny", "siglip", 64), ("clip-tiny", "clip", 77)])
def test_text_window_defaults_to_transformers_when_config_json_leaves_it_out(tmp_path: Path, name: str, family: str,
                                                                             window: int) -> None:
    from capwatch.models.embedtext import EmbeddingTokenizer

    copy = tmp_path / name
    shutil.copytree(MODELS / name, copy)
    settings = json.loads((copy / "tokenizer_config.json").read_text())
    settings["model_max_length"] = 1000000000000000019884624838656  # transformers' "no limit"
    (copy / "tokenizer_config.json").write_text(json.dumps(settings))
    config = json.loads((copy / "config.json").read_text())
    del config["text_config"]["max_position_embeddings"]  # save_pretrained leaves out default values
    assert EmbeddingTokenizer.from_dir(copy, family, config).max_length == window


def test_int8_graphs_with_a_derived_cache_give_the_same_vectors(tmp_path: Path) -> None:
    from capwatch.models.derived import DerivedCache, signed_is_exact

    plain = _embedder("clip-tiny", "int8")
    config = Config(embed=EmbedConfig(model=str(MODELS / "clip-tiny"), precision="int8"))
    rewritten = open_embedder(config, {}, derived=DerivedCache(tmp_path / "derived", b"k" * 32))
    assert rewritten is not None
    image = load_image(ROOT / "tests/fixtures/photos/coffee.jpg")
    np.testing.assert_array_equal(rewritten.embed_images([image]), plain.embed_images([image]))
    np.testing.assert_array_equal(rewritten.embed_texts(["a dog"]), plain.embed_texts(["a dog"]))
    # Signed weights only where the CPU makes them exact (VNNI); elsewhere the published graphs run.
    assert any((tmp_path / "derived").glob("*-s8-v*[0-9]")) is signed_is_exact()


@pytest.mark.parametrize(("name", "precision"), [("clip-tiny", "fp32"), ("clip-tiny", "int8"),
                                                 ("siglip2-tiny", "fp32")])
def test_the_text_graph_loads_preoptimised_with_the_published_vectors(tmp_path: Path, name: str,
                                                                       precision: str) -> None:
    from capwatch.models import derived
    from capwatch.models.derived import DerivedCache
    from capwatch.models.session import PREOPTIMIZED_NAME

    store = DerivedCache(tmp_path / "derived", b"k" * 32)
    config = Config(embed=EmbedConfig(model=str(MODELS / name), precision=precision))  # type: ignore[arg-type]
    golden = [row["text"] for row in _goldens(name)["texts"]]
    published = _embedder(name, precision).embed_texts(golden)
    first = open_embedder(config, {}, derived=store)
    assert first is not None
    np.testing.assert_array_equal(first.embed_texts(golden), published)
    text = Path(first.sessions.describe()["text_model"]["path"])
    assert text.name == PREOPTIMIZED_NAME
    manifest = json.loads((text.parent / "manifest.json").read_text())
    assert manifest["recipe"] == f"optimized-{derived.runtime_fingerprint()}"
    source = Path(manifest["source"])  # the published graph, or its int8-weights rewrite where that runs (VNNI)
    published_graph = "text_model_quantized.onnx" if precision == "int8" else "text_model.onnx"
    assert source == MODELS / name / "onnx" / published_graph or source.parent.parent == store.root
    # made once: the next process loads it as it is
    made = text.stat().st_mtime_ns
    again = open_embedder(config, {}, derived=DerivedCache(store.root, store.key))
    assert again is not None
    np.testing.assert_array_equal(again.embed_texts(golden), published)  # int8: one batch, one quantisation scale
    assert Path(again.sessions.describe()["text_model"]["path"]) == text and text.stat().st_mtime_ns == made


def test_a_graph_optimised_for_another_runtime_or_cpu_is_made_again_and_the_old_one_pruned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from capwatch.models import derived
    from capwatch.models.derived import DerivedCache

    store = DerivedCache(tmp_path / "derived", b"k" * 32)
    config = Config(embed=EmbedConfig(model=str(MODELS / "clip-tiny")))
    first = open_embedder(config, {}, derived=store)
    assert first is not None
    vector = first.embed_texts(["a dog"])
    old = Path(first.sessions.describe()["text_model"]["path"]).parent
    monkeypatch.setattr(derived, "runtime_fingerprint", lambda: "0123456789ab")  # onnxruntime upgraded, say
    second = open_embedder(config, {}, derived=store)
    assert second is not None
    np.testing.assert_array_equal(second.embed_texts(["a dog"]), vector)
    new = Path(second.sessions.describe()["text_model"]["path"]).parent
    assert new.name.endswith("-optimized-0123456789ab-v2") and not old.exists()


def test_the_preoptimised_text_graph_keeps_its_weights_in_a_stamped_file_of_their_own(tmp_path: Path) -> None:
    from capwatch.models.derived import DerivedCache
    from capwatch.models.session import PREOPTIMIZED_DATA, PREOPTIMIZED_NAME

    store = DerivedCache(tmp_path / "derived", b"k" * 32)
    config = Config(embed=EmbedConfig(model=str(MODELS / "clip-tiny-b"), precision="int8"))
    embedder = open_embedder(config, {}, derived=store)
    assert embedder is not None
    embedder.embed_texts(["a dog"])
    folder = Path(embedder.sessions.describe()["text_model"]["path"]).parent
    listed = {entry["path"] for entry in json.loads((folder / "manifest.json").read_text())["files"]}
    assert {PREOPTIMIZED_NAME, PREOPTIMIZED_DATA} <= listed
    # every initializer of 1 KB or more is in the data file, not the graph file (onnxruntime maps them at load)
    graph = onnx.load(str(folder / PREOPTIMIZED_NAME), load_external_data=False).graph
    inline = [t.name for t in graph.initializer
              if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= 1024]
    external = [t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert not inline and len(external) > 10


@pytest.mark.parametrize(("name", "precision"), [("clip-tiny", "int8"), ("clip-tiny", "fp32"),
                                                 ("siglip2-tiny", "int8")])
def test_a_one_shot_query_loads_the_text_graph_unpacked_only_where_the_probe_found_the_same_bits(
        tmp_path: Path, name: str, precision: str) -> None:
    from capwatch.library.embed import query_embedder
    from capwatch.models import stamp
    from capwatch.models.session import PREOPTIMIZED_NAME, PREOPTIMIZED_UNPACKED_NAME

    env = {"CAPWATCH_CACHE_DIR": str(tmp_path / "cache"), "STATE_DIRECTORY": str(tmp_path / "state")}
    stamp.local_key(env)
    config = Config(embed=EmbedConfig(model=str(MODELS / name), precision=precision))  # type: ignore[arg-type]
    golden = [row["text"] for row in _goldens(name)["texts"]]
    published = _embedder(name, precision).embed_texts(golden)
    one_shot, _ = query_embedder(config, env, load_text=True)
    assert one_shot is not None
    np.testing.assert_array_equal(one_shot.embed_texts(golden), published)
    loaded = Path(one_shot.sessions.describe()["text_model"]["path"])
    listed = {entry["path"] for entry in json.loads((loaded.parent / "manifest.json").read_text())["files"]}
    assert loaded.name == (PREOPTIMIZED_UNPACKED_NAME if PREOPTIMIZED_UNPACKED_NAME in listed else PREOPTIMIZED_NAME)
    if precision == "int8":  # integer products are exact whichever way the weights are laid out
        assert loaded.name == PREOPTIMIZED_UNPACKED_NAME
    # a long-lived process (the daemon's query server) keeps the prepacked weights
    serving, _ = query_embedder(config, env)
    assert serving is not None
    np.testing.assert_array_equal(serving.embed_texts(golden), published)
    assert Path(serving.sessions.describe()["text_model"]["path"]).name == PREOPTIMIZED_NAME


def test_an_unpacked_graph_the_stamp_does_not_list_is_never_loaded(tmp_path: Path) -> None:
    from capwatch.library.embed import query_embedder
    from capwatch.models import stamp
    from capwatch.models.session import PREOPTIMIZED_NAME, PREOPTIMIZED_UNPACKED_NAME

    env = {"CAPWATCH_CACHE_DIR": str(tmp_path / "cache"), "STATE_DIRECTORY": str(tmp_path / "state")}
    key = stamp.local_key(env)
    config = Config(embed=EmbedConfig(model=str(MODELS / "clip-tiny"), precision="int8"))
    first, _ = query_embedder(config, env, load_text=True)
    assert first is not None
    vector = first.embed_texts(["a dog"])
    folder = Path(first.sessions.describe()["text_model"]["path"]).parent
    # An entry sealed without the unpacked copy (as for fp32 products that round differently), and a file of that
    # name put there afterwards: it is not what the stamp covers, so the prepacked graph loads.
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = [entry for entry in manifest["files"] if entry["path"] != PREOPTIMIZED_UNPACKED_NAME]
    manifest["stamp"] = stamp.compute(key, folder, manifest["recipe"], manifest["files"])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / PREOPTIMIZED_UNPACKED_NAME).write_bytes(b"not a graph")
    again, _ = query_embedder(config, env, load_text=True)
    assert again is not None
    np.testing.assert_array_equal(again.embed_texts(["a dog"]), vector)
    assert Path(again.sessions.describe()["text_model"]["path"]).name == PREOPTIMIZED_NAME


def test_a_search_query_uses_the_preoptimised_text_graph_only_where_a_stamp_key_exists(tmp_path: Path) -> None:
    from capwatch.library.embed import query_embedder
    from capwatch.models import stamp
    from capwatch.models.session import PREOPTIMIZED_NAME

    env = {"CAPWATCH_CACHE_DIR": str(tmp_path / "cache"), "STATE_DIRECTORY": str(tmp_path / "state")}
    config = Config(embed=EmbedConfig(model=str(MODELS / "clip-tiny")))
    embedder, _ = query_embedder(config, env)
    assert embedder is not None
    embedder.embed_texts(["a dog"])
    assert Path(embedder.sessions.describe()["text_model"]["path"]).name == "text_model.onnx"
    assert not (tmp_path / "state").exists()  # a search never makes the key
    stamp.local_key(env)  # a scan made it
    embedder, _ = query_embedder(config, env)
    assert embedder is not None
    embedder.embed_texts(["a dog"])
    assert Path(embedder.sessions.describe()["text_model"]["path"]).name == PREOPTIMIZED_NAME


def test_a_text_query_loads_only_the_text_graph() -> None:
    embedder = _embedder("clip-tiny")
    embedder.embed_texts(["a dog"])
    loaded = {name: state["loaded"] for name, state in embedder.sessions.describe().items()}
    assert loaded == {"vision_model": False, "text_model": True}
    embedder.embed_images([load_image(ROOT / "tests/fixtures/photos/chelsea.jpg")])
    assert all(state["loaded"] for state in embedder.sessions.describe().values())


def test_model_id_of_a_directory_memoises_its_graphs_digests_until_they_change(tmp_path: Path) -> None:
    import hashlib

    from capwatch.models.derived import DerivedCache

    copy = tmp_path / "clip-tiny"
    shutil.copytree(MODELS / "clip-tiny", copy)
    big = copy / "onnx" / "text_model.onnx"
    big.write_bytes(big.read_bytes() + b"\0" * (2 << 20))  # past the size whose digest is memoised
    memo = DerivedCache(tmp_path / "cache" / "derived", b"k" * 32)
    files = _embedder(str(copy)).files
    first = ImageTextEmbedder(files, digests=memo).model_id
    st = big.stat()
    record = json.loads((memo.root / "sources" / f"{st.st_dev}-{st.st_ino}.json").read_text())
    assert record["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    assert ImageTextEmbedder(files, digests=memo).model_id == first == _embedder(str(copy)).model_id
    big.write_bytes(big.read_bytes() + b"\1")  # other weights: the memo no longer applies
    assert ImageTextEmbedder(files, digests=memo).model_id != first
