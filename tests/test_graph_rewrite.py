"""The split of ViT-GPT2's merged decoder (cross-attention keys/values once per image) and its cache; int8 weights
(s8), attention splits moved before their transposes and quantised convolutions run in fp32 (tidy).

Token parity of the split with transformers is in test_vit_gpt2_parity.py (every case runs on both graphs); here:
what the rewrite produces, that it is made once and reused, and that anything wrong with it (a graph that computes
something else, a tampered or planted cache entry, a folder it cannot write) falls back to the published graph.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from capwatch.config import ModelConfig
from capwatch.errors import ModelError
from capwatch.models import derived, rewrite
from capwatch.models.captioner import VisionEncoderDecoderCaptioner, open_captioner
from capwatch.models.derived import DerivedCache
from capwatch.models.rewrite import RewriteError, split_invariant
from tests.conftest import CliRunner

FIXTURES = Path(__file__).parent / "fixtures" / "models"
GREEDY = FIXTURES / "vit-gpt2-tiny-greedy"
BEAM = FIXTURES / "vit-gpt2-tiny-beam"
FLORENCE = FIXTURES / "florence2-tiny"
PHOTOS = Path(__file__).parent / "fixtures" / "photos"


def _pixels(model_dir: Path) -> np.ndarray:
    data = np.load(model_dir / "pixel_values.npz")
    return np.stack([data[name] for name in data.files])


def _goldens(model_dir: Path) -> list[list[int]]:
    goldens = json.loads((model_dir / "goldens.json").read_text())
    return [goldens["token_ids"]["default"][name] for name in np.load(model_dir / "pixel_values.npz").files]


def _open(model_dir: Path, store: DerivedCache | None, precision: str = "fp32") -> VisionEncoderDecoderCaptioner:
    config = ModelConfig(dir=model_dir, precision=precision, threads=1)  # type: ignore[arg-type]
    cap = open_captioner(model_dir, config, derived=store)
    assert isinstance(cap, VisionEncoderDecoderCaptioner)
    return cap


def _tokens(cap: VisionEncoderDecoderCaptioner, model_dir: Path) -> list[list[int]]:
    """Token ids per fixture image, one image per call: int8 graphs quantise activations per call, so in a batch
    an image's tokens may depend on its batch-mates (the published graph's and the split's in different ways)."""
    pixels = _pixels(model_dir)
    return [list(cap.caption_pixels(pixels[i : i + 1])[0].token_ids) for i in range(len(pixels))]


@pytest.fixture
def store(tmp_path: Path) -> DerivedCache:
    return DerivedCache(tmp_path / "cache" / "derived", b"k" * 32)


@pytest.mark.parametrize("name", ["decoder_model_merged.onnx", "decoder_model_merged_quantized.onnx"])
@pytest.mark.parametrize("model_dir", [GREEDY, BEAM], ids=lambda p: p.name)
def test_split_moves_every_cross_attention_projection_out_of_the_step_graph(model_dir: Path, name: str) -> None:
    source = onnx.load(str(model_dir / "onnx" / name))
    split = split_invariant(source)
    step_inputs = {i.name for i in split.step.graph.input}
    assert "encoder_hidden_states" not in step_inputs
    assert "use_cache_branch" not in step_inputs
    assert {*split.data_outputs, *split.shape_outputs} <= step_inputs
    assert not any(n.op_type == "If" for n in split.step.graph.node)
    layers = json.loads((model_dir / "config.json").read_text())["decoder"]["n_layer"]
    # one key and one value per layer, each already in the layout the attention MatMul reads
    assert len(split.data_outputs) == 2 * layers
    heavy = {"Gemm", "MatMul", "MatMulInteger"}
    assert sum(n.op_type in heavy for n in split.cross.graph.node) >= layers
    # each weight is kept once: the pair is no bigger than the published graph (which holds both branches)
    weights = {t.name: t.ByteSize() for g in (split.cross, split.step) for t in g.graph.initializer}
    shared = {t.name for t in split.cross.graph.initializer} & {t.name for t in split.step.graph.initializer}
    assert all(weights[n] < 4096 for n in shared)
    assert sum(weights.values()) <= sum(t.ByteSize() for t in source.graph.initializer) + 4096 * len(shared)
    onnx.checker.check_model(split.cross)
    onnx.checker.check_model(split.step)


def test_florence2_decoder_has_nothing_to_split() -> None:
    # its cached branch reads the cross-attention keys/values from past_key_values.*.encoder.*
    with pytest.raises(RewriteError, match="nothing is computed"):
        split_invariant(onnx.load(str(FLORENCE / "onnx" / "decoder_model_merged.onnx")))


def test_a_graph_without_the_source_input_is_refused() -> None:
    model = onnx.load(str(GREEDY / "onnx" / "encoder_model.onnx"))
    with pytest.raises(RewriteError, match="no input 'encoder_hidden_states'"):
        split_invariant(model)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_split_is_made_once_then_loaded_from_the_cache(store: DerivedCache, precision: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    first = _open(GREEDY, store, precision)
    published = _open(GREEDY, None, precision)
    assert _tokens(first, GREEDY) == _tokens(published, GREEDY)
    assert first.split is not None and published.split is None
    manifest = first.split.step.parent / "manifest.json"
    before = manifest.stat().st_mtime_ns

    def no_rewrite(*args: object) -> None:
        raise AssertionError("rewritten again")

    monkeypatch.setattr(derived, "make", no_rewrite)
    again = _open(GREEDY, store, precision)
    assert _tokens(again, GREEDY) == _tokens(published, GREEDY)
    assert again.split == first.split
    assert manifest.stat().st_mtime_ns == before


def test_fp32_split_gives_the_transformers_goldens_and_is_used(store: DerivedCache) -> None:
    cap = _open(GREEDY, store)
    assert _tokens(cap, GREEDY) == _goldens(GREEDY)
    with cap.sessions.use() as sessions:
        assert set(sessions) == {"encoder_model", "decoder_cross", "decoder_step"}


def _corrupt_cross(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the rewrite return a pair whose cross graph scales one value: a real graph that computes the wrong thing."""
    real = rewrite.split_invariant

    def wrong(model: onnx.ModelProto) -> rewrite.SplitGraphs:
        split = real(model)
        graph = split.cross.graph
        target = split.data_outputs[0]
        for node in graph.node:
            node.output[:] = [f"{o}_raw" if o == target else o for o in node.output]
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.5, dtype=np.float32), "capwatch_test_k"))
        graph.node.append(helper.make_node("Mul", [f"{target}_raw", "capwatch_test_k"], [target]))
        return split

    monkeypatch.setattr(rewrite, "split_invariant", wrong)


def test_a_split_that_computes_something_else_is_refused_by_the_probe(
        store: DerivedCache, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _corrupt_cross(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="capwatch.models.derived"):
        cap = _open(GREEDY, store)
        assert _tokens(cap, GREEDY) == _goldens(GREEDY)
    assert cap.split is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "keeping the published decoder" in lines[0] and "differ" in lines[0]
    assert not [p for p in store.root.iterdir() if p.is_dir() and p.name != "sources"]
    # refused once, not probed again at every start
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="capwatch.models.derived"):
        again = _open(GREEDY, store)
        assert _tokens(again, GREEDY) == _goldens(GREEDY)
    assert again.split is None
    assert not caplog.records


@pytest.mark.parametrize("tamper", ["step graph edited", "manifest from another key", "memo edited"])
def test_a_tampered_cache_entry_is_made_again_not_used(store: DerivedCache, tamper: str) -> None:
    first = _open(GREEDY, store)
    _tokens(first, GREEDY)
    assert first.split is not None
    folder = first.split.step.parent
    if tamper == "step graph edited":
        data = bytearray(first.split.step.read_bytes())
        data[-100] ^= 0xFF
        first.split.step.write_bytes(bytes(data))
    elif tamper == "manifest from another key":
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["stamp"] = "0" * 64
        (folder / "manifest.json").write_text(json.dumps(manifest))
    else:
        memo = next((store.root / "sources").iterdir())
        record = json.loads(memo.read_text())
        record["sha256"] = "f" * 64
        memo.write_text(json.dumps(record))
    again = _open(GREEDY, store)
    assert _tokens(again, GREEDY) == _goldens(GREEDY)
    assert again.split is not None
    assert again.split.step.parent == folder
    assert json.loads((folder / "manifest.json").read_text())["stamp"] != "0" * 64


def test_a_symlink_in_the_cache_is_never_followed(store: DerivedCache, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    first = _open(GREEDY, DerivedCache(tmp_path / "elsewhere", store.key))
    _tokens(first, GREEDY)
    assert first.split is not None
    store.root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / first.split.step.parent.name).symlink_to(outside)
    with caplog.at_level(logging.WARNING, logger="capwatch.models.derived"):
        cap = _open(GREEDY, store)
        assert _tokens(cap, GREEDY) == _goldens(GREEDY)
    assert cap.split is None
    assert list(outside.iterdir()) == []
    assert any("symbolic link" in r.getMessage() for r in caplog.records)


def test_big_graphs_are_rewritten_in_a_child_process(store: DerivedCache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(derived, "IN_PROCESS_BYTES", 0)

    def not_here(*args: object) -> None:
        raise AssertionError("rewritten in the calling process")

    monkeypatch.setattr(derived, "make", not_here)
    cap = _open(BEAM, store)
    assert _tokens(cap, BEAM) == _goldens(BEAM)
    assert cap.split is not None


def test_a_cache_that_cannot_be_written_runs_the_published_graph(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="capwatch.models.derived"):
        cap = _open(GREEDY, DerivedCache(blocked / "derived", b"k" * 32))
        assert _tokens(cap, GREEDY) == _goldens(GREEDY)
    assert cap.split is None
    assert len(caplog.records) == 1
    assert "keeping the published decoder" in caplog.records[0].getMessage()


def test_rewrite_graphs_false_runs_the_published_graph(store: DerivedCache) -> None:
    config = ModelConfig(dir=GREEDY, precision="fp32", threads=1, rewrite_graphs=False)
    cap = open_captioner(GREEDY, config, derived=store)
    assert [list(r.token_ids) for r in cap.caption_pixels(_pixels(GREEDY))] == _goldens(GREEDY)
    assert isinstance(cap, VisionEncoderDecoderCaptioner) and cap.split is None
    assert not store.root.exists()


def test_caption_cli_makes_the_split_in_the_user_cache_once(run_cli: CliRunner, tmp_path: Path) -> None:
    photo = tmp_path / "a.png"
    shutil.copy(Path(__file__).parent / "fixtures" / "images" / "checker.png", photo)
    published = tmp_path / "published.toml"
    published.write_text("[model]\nrewrite_graphs = false\n")
    reference = run_cli("--config", published, "--model", GREEDY, "caption", "--dry-run", "--json", photo)
    assert reference.code == 0, reference.err
    want = json.loads(reference.out)["caption"]
    assert not (tmp_path / "home" / ".cache" / "capwatch" / "derived").exists()
    for _ in range(2):
        result = run_cli("--model", GREEDY, "caption", "--dry-run", "--json", photo)
        assert result.code == 0, result.err
        assert json.loads(result.out)["caption"] == want
        assert result.err_lines == []
    made = list((tmp_path / "home" / ".cache" / "capwatch" / "derived").glob("*-split*/manifest.json"))
    assert len(made) == 1


# -- int8 weights (s8) --------------------------------------------------------------------------------------------


def test_signed_weights_turns_the_published_uint8_encoder_into_int8_with_the_same_real_values() -> None:
    source = onnx.load(str(GREEDY / "onnx" / "encoder_model_quantized.onnx"))
    before = {t.name: onnx.numpy_helper.to_array(t) for t in source.graph.initializer}
    changed = rewrite.signed_weights(source)
    assert changed == sum(n.op_type == "MatMulInteger" for n in source.graph.node) > 0
    after = {t.name: onnx.numpy_helper.to_array(t) for t in source.graph.initializer}
    for node in (n for n in source.graph.node if n.op_type == "MatMulInteger"):
        weight, zero = node.input[1], node.input[3]
        assert after[weight].dtype == np.int8 and after[zero].dtype == np.int8
        assert np.array_equal(after[weight].astype(np.int32) - after[zero].astype(np.int32),
                              before[weight].astype(np.int32) - before[zero].astype(np.int32))


@pytest.mark.parametrize("path", [GREEDY / "onnx" / "encoder_model.onnx",
                                  GREEDY / "onnx" / "decoder_model_merged_quantized.onnx",
                                  FLORENCE / "onnx" / "decoder_model_merged_quantized.onnx"], ids=lambda p: p.name)
def test_signed_weights_leaves_fp32_and_int8_weight_graphs_alone(path: Path) -> None:
    model = onnx.load(str(path))
    before = model.SerializeToString()
    assert rewrite.signed_weights(model) == 0
    assert model.SerializeToString() == before


def _matmul_integer_graph(shared_with_gather: bool) -> onnx.ModelProto:
    weight = onnx.numpy_helper.from_array(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, "w")
    zero = onnx.numpy_helper.from_array(np.array(128, dtype=np.uint8), "wz")
    nodes = [helper.make_node("MatMulInteger", ["a", "w", "az", "wz"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [2, 4])]
    if shared_with_gather:
        nodes.append(helper.make_node("Gather", ["w", "i"], ["g"]))
        outputs.append(helper.make_tensor_value_info("g", onnx.TensorProto.UINT8, [1, 4]))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("a", onnx.TensorProto.UINT8, [2, 3]),
         helper.make_tensor_value_info("az", onnx.TensorProto.UINT8, []),
         helper.make_tensor_value_info("i", onnx.TensorProto.INT64, [1])],
        outputs, [weight, zero])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_weight_another_operator_reads_keeps_its_uint8_values() -> None:
    shared = _matmul_integer_graph(shared_with_gather=True)
    assert rewrite.signed_weights(shared) == 0
    alone = _matmul_integer_graph(shared_with_gather=False)
    assert rewrite.signed_weights(alone) == 1


@pytest.mark.parametrize(("flags", "machine", "exact"), [
    ("fpu sse2 avx2 avx512f avx512_vnni", "x86_64", True),
    ("fpu sse2 avx2 avx_vnni", "x86_64", True),
    ("fpu sse2 avx2 fma", "x86_64", False),
    ("fp asimd asimddp", "aarch64", False),
])
def test_int8_weights_are_used_only_where_onnxruntime_accumulates_them_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str, machine: str, exact: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(derived.platform, "machine", lambda: machine)
    assert derived.signed_is_exact(cpuinfo) is exact


@pytest.mark.skipif(not derived.signed_is_exact(), reason="int8 weights are exact only on CPUs with VNNI")
@pytest.mark.parametrize("model_dir", [GREEDY, BEAM], ids=lambda p: p.name)
def test_int8_captioner_runs_int8_weights_with_the_published_graphs_tokens(store: DerivedCache,
                                                                           model_dir: Path) -> None:
    cap = _open(model_dir, store, "int8")
    assert _tokens(cap, model_dir) == _tokens(_open(model_dir, None, "int8"), model_dir)
    with cap.sessions.use() as sessions:
        encoder = sessions["encoder_model"]
    assert "-s8-v" in str(cap.sessions.describe()["encoder_model"]["path"])
    assert encoder is not None
    manifest = json.loads((Path(cap.sessions.describe()["encoder_model"]["path"]).parent / "manifest.json")
                          .read_text())
    assert manifest["signed_matmuls"] > 0


def test_fp32_captioner_never_signs_weights(store: DerivedCache) -> None:
    cap = _open(GREEDY, store)
    _tokens(cap, GREEDY)
    assert "-s8" not in json.dumps(cap.sessions.describe())


def test_entries_nothing_can_use_any_more_are_pruned_when_a_new_one_is_made(store: DerivedCache,
                                                                            tmp_path: Path) -> None:
    gone = tmp_path / "gone-model"
    shutil.copytree(GREEDY, gone)
    old = _open(gone, store)
    _tokens(old, gone)
    assert old.split is not None
    old_entry = old.split.step.parent
    stale = store.root / f"{'0' * 64}-split-v{derived.VERSION + 1}"
    stale.mkdir()
    (stale / "step.onnx").write_bytes(b"from another capwatch version")
    # a recipe bumped alone: its older results go, the other recipes' stay
    old_tidy = store.root / f"{'1' * 64}-tidy-s8-v{derived.recipe_version('tidy') - 1}"
    old_tidy.mkdir()
    shutil.rmtree(gone)  # the model folder is deleted (or the model moved to another revision)
    fresh = _open(BEAM, store)
    _tokens(fresh, BEAM)
    assert fresh.split is not None and fresh.split.step.is_file()
    assert not old_entry.exists() and not stale.exists() and not old_tidy.exists()
    memos = [json.loads(m.read_text())["facts"][0] for m in (store.root / "sources").iterdir()]
    assert memos and not any(str(gone) in m for m in memos)  # the deleted model's memo went too
    # an entry whose source is still there is kept
    kept = _open(GREEDY, store)
    _tokens(kept, GREEDY)
    again = _open(GREEDY, DerivedCache(store.root, store.key))
    _tokens(again, GREEDY)
    assert derived.prune(store.root) == []
    assert kept.split is not None and kept.split.step.is_file()


def test_an_idle_unload_releases_every_session_of_the_split(store: DerivedCache) -> None:
    cap = _open(GREEDY, store)
    _tokens(cap, GREEDY)
    with cap.sessions.use() as sessions:
        alive = [weakref.ref(s) for s in sessions.values()]
    del sessions
    assert len(alive) == 3
    cap.sessions.unload()
    gc.collect()
    assert [r() for r in alive] == [None, None, None]
    assert _tokens(cap, GREEDY) == _goldens(GREEDY)  # and loads again on the next image


def test_a_graph_onnx_cannot_parse_keeps_the_published_graph(store: DerivedCache, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    model = tmp_path / "model"
    shutil.copytree(GREEDY, model)
    decoder = model / "onnx" / "decoder_model_merged.onnx"
    decoder.write_bytes(decoder.read_bytes() + b"\x07\x00garbage")  # protobuf no longer parses; the file is unusable
    with caplog.at_level(logging.WARNING, logger="capwatch.models.derived"):
        cap = _open(model, store)
        with pytest.raises(ModelError, match="cannot load ONNX graph"):
            _tokens(cap, model)
    assert cap.split is None
    assert any("cannot rewrite the graph" in r.getMessage() for r in caplog.records)


def test_a_rewrite_that_would_not_fit_in_memory_is_not_started(store: DerivedCache, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    source = GREEDY / "onnx" / "decoder_model_merged.onnx"
    monkeypatch.setattr(derived, "memory_available", lambda: derived.PEAK_PER_SOURCE_BYTE * source.stat().st_size - 1)
    with caplog.at_level(logging.INFO, logger="capwatch.models.derived"):
        cap = _open(GREEDY, store)
        assert _tokens(cap, GREEDY) == _goldens(GREEDY)
    assert cap.split is None
    assert any("needs about" in r.getMessage() for r in caplog.records)
    assert not list(store.root.glob("*.failed"))  # tried again when memory allows
    monkeypatch.setattr(derived, "memory_available", lambda: None)
    again = _open(GREEDY, store)
    assert _tokens(again, GREEDY) == _goldens(GREEDY)
    assert again.split is not None


def test_memory_available_is_lowered_by_a_cgroup_limit(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    assert derived.memory_available(meminfo, tmp_path / "no-cgroup") == 20_000_000 * 1024
    relative = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[-1].lstrip("/")
    group = tmp_path / "cgroup" / relative
    group.mkdir(parents=True)
    (group / "memory.max").write_text("1572864000\n")
    (group / "memory.current").write_text("104857600\n")
    assert derived.memory_available(meminfo, tmp_path / "cgroup") == 1572864000 - 104857600
    (group / "memory.max").write_text("max\n")
    assert derived.memory_available(meminfo, tmp_path / "cgroup") == 20_000_000 * 1024


# -- attention splits before their transposes (tidy) ------------------------------------------------------------


def _transpose_split_graph(opset: int, read_elsewhere: bool = False) -> onnx.ModelProto:
    """x [b, 7, 3, 4, 5] -> Transpose(2, 0, 3, 4, 1) -> Split(axis 0) -> Squeeze(0) per part -> q, k, v: what
    DaViT's attention does with its query/key/value tensor (opset 11: split sizes and squeeze axes as attributes;
    13 and later: as inputs)."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 7, 3, 4, 5])
    outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, "b", 4, 5, 7][1:]) for n in "qkv"]
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name="transpose", perm=[2, 0, 3, 4, 1])]
    initializers = []
    if opset >= 13:
        initializers = [onnx.numpy_helper.from_array(np.array([1, 1, 1], dtype=np.int64), "sizes")]
        nodes.append(helper.make_node("Split", ["t", "sizes"], ["p0", "p1", "p2"], name="split", axis=0))
        nodes.append(helper.make_node("Constant", [], ["zero"], value=onnx.numpy_helper.from_array(
            np.array([0], dtype=np.int64))))
        nodes += [helper.make_node("Squeeze", [f"p{i}", "zero"], [n], name=f"squeeze{i}") for i, n in enumerate("qkv")]
    else:
        nodes.append(helper.make_node("Split", ["t"], ["p0", "p1", "p2"], name="split", axis=0, split=[1, 1, 1]))
        nodes += [helper.make_node("Squeeze", [f"p{i}"], [n], name=f"squeeze{i}", axes=[0])
                  for i, n in enumerate("qkv")]
    if read_elsewhere:
        outputs.append(helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "attention", [x], outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from capwatch.models.runtime import ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run(None, feeds)]


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_before_transpose_gives_the_same_parts_through_4d_transposes(opset: int) -> None:
    model = _transpose_split_graph(opset)
    x = np.random.default_rng(opset).standard_normal((2, 7, 3, 4, 5)).astype(np.float32)
    before = _run(model, {"x": x})
    assert rewrite.split_before_transpose(model) == 1
    onnx.checker.check_model(model, full_check=True)
    transposes = [n for n in model.graph.node if n.op_type == "Transpose"]
    assert len(transposes) == 3 and all(list(n.attribute[0].ints) == [0, 2, 3, 1] for n in transposes)
    assert not [n for n in model.graph.node if n.op_type == "Constant"]  # the old squeeze axes went with it
    after = _run(model, {"x": x})
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_split_before_transpose_leaves_a_transpose_read_elsewhere_alone() -> None:
    model = _transpose_split_graph(13, read_elsewhere=True)
    before = model.SerializeToString()
    assert rewrite.split_before_transpose(model) == 0
    assert model.SerializeToString() == before


# -- quantised convolutions in fp32 over the same integers (tidy) -----------------------------------------------


def _conv_integer_graph(weights: dict[str, tuple[np.ndarray, np.ndarray | None, int]]) -> onnx.ModelProto:
    """x [1, 256, 9, 9] -> DynamicQuantizeLinear -> per entry ``name: (weight, weight zero point, group)`` a
    ConvInteger (3x3, stride 2, padded: the padding must count as x's zero point) -> Cast -> Mul by both scales,
    as onnxruntime's quantize_dynamic writes a quantised Conv; each result is a graph output."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 256, 9, 9])
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["x_q", "x_scale", "x_zero"])]
    initializers, outputs = [], []
    for name, (weight, zero, group) in weights.items():
        initializers.append(onnx.numpy_helper.from_array(weight, f"{name}_w"))
        inputs = ["x_q", f"{name}_w", "x_zero"]
        if zero is not None:
            initializers.append(onnx.numpy_helper.from_array(zero, f"{name}_wz"))
            inputs.append(f"{name}_wz")
        initializers.append(onnx.numpy_helper.from_array(np.array(0.02, dtype=np.float32), f"{name}_ws"))
        nodes += [helper.make_node("ConvInteger", inputs, [f"{name}_i"], name=name, group=group,
                                   kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
                  helper.make_node("Cast", [f"{name}_i"], [f"{name}_f"], to=onnx.TensorProto.FLOAT),
                  helper.make_node("Mul", ["x_scale", f"{name}_ws"], [f"{name}_s"]),
                  helper.make_node("Mul", [f"{name}_f", f"{name}_s"], [name])]
        outputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1, weight.shape[0], 5, 5]))
    graph = helper.make_graph(nodes, "convs", [x], outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_grouped_quantised_convolutions_run_in_fp32_give_the_integer_results_bit_for_bit() -> None:
    rng = np.random.default_rng(7)
    model = _conv_integer_graph({
        # uint8 weights with a per-tensor zero point (quantize_dynamic's default), depthwise (DaViT's position
        # encodings); onnxruntime's ConvInteger takes no zero point per channel
        "depthwise": (rng.integers(0, 256, (256, 1, 3, 3)).astype(np.uint8), np.array(131, dtype=np.uint8), 256),
        # int8 weights with a zero point, 4 groups
        "grouped": (rng.integers(-128, 128, (8, 64, 3, 3)).astype(np.int8), np.array(-3, dtype=np.int8), 4),
        # int8 weights without a zero point, 2 groups
        "halves": (rng.integers(-20, 21, (4, 128, 3, 3)).astype(np.int8), None, 2),
        # a full convolution: faster as ConvInteger, left as it is
        "full": (rng.integers(-128, 128, (6, 256, 3, 3)).astype(np.int8), None, 1),
    })
    # heavy tails: most values near 0, a few large ones, so x_q - x_zero spans most of [-255, 255]
    inputs = [rng.standard_t(2, (1, 256, 9, 9)).astype(np.float32) * s for s in (0.1, 1.0, 30.0)]
    before = [_run(model, {"x": x}) for x in inputs]
    assert rewrite.convs_in_float(model) == 3
    onnx.checker.check_model(model)  # nodes in order, every input defined
    kinds = [n.op_type for n in model.graph.node]
    assert [n.name for n in model.graph.node if n.op_type == "ConvInteger"] == ["full"]
    assert kinds.count("DequantizeLinear") == 1  # x's integers made once, shared
    assert kinds.count("Conv") == 3 and kinds.count("Cast") == 1
    assert not {"depthwise_w", "depthwise_wz", "grouped_w", "grouped_wz", "halves_w"} & {
        t.name for t in model.graph.initializer}
    for x, expected in zip(inputs, before, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(_run(model, {"x": x}), expected, strict=True))


def test_a_convolution_whose_fp32_sums_could_round_stays_integer() -> None:
    # 128 channels per group x 3 x 3 weights of -128: 1152 x 128 x 255 > 2**24, so an fp32 partial sum could round
    wide = np.full((2, 128, 3, 3), -128, dtype=np.int8)
    narrow = np.full((2, 128, 3, 3), -7, dtype=np.int8)
    model = _conv_integer_graph({"wide": (wide, None, 2), "narrow": (narrow, None, 2)})
    x = np.random.default_rng(3).standard_normal((1, 256, 9, 9)).astype(np.float32)
    before = _run(model, {"x": x})
    assert rewrite.convs_in_float(model) == 1
    assert [n.name for n in model.graph.node if n.op_type == "ConvInteger"] == ["wide"]
    assert "wide_w" in {t.name for t in model.graph.initializer}
    assert all(np.array_equal(a, b) for a, b in zip(_run(model, {"x": x}), before, strict=True))


def test_a_weight_zero_point_per_output_channel_is_taken_off_each_channel() -> None:
    # onnxruntime's ConvInteger cannot run a zero point per channel (the ONNX operator allows it), so the rewritten
    # graph is checked against the operator's definition computed here: sum((x_q - x_zero) * (w - w_zero[m])).
    rng = np.random.default_rng(11)
    weight = rng.integers(-128, 128, (256, 1, 3, 3)).astype(np.int8)
    zero = rng.integers(-5, 6, 256).astype(np.int8)
    model = _conv_integer_graph({"depthwise": (weight, zero, 256)})
    assert rewrite.convs_in_float(model) == 1
    x = rng.standard_t(2, (1, 256, 9, 9)).astype(np.float32)
    got = _run(model, {"x": x})[0]
    scale = np.float32(max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / np.float32(255)
    x_zero = np.clip(np.round(-min(float(x.min()), 0.0) / scale), 0, 255)
    x_q = np.clip(np.round(x / scale) + x_zero, 0, 255)  # DynamicQuantizeLinear (round half to even, as numpy)
    padded = np.pad(x_q - x_zero, ((0, 0), (0, 0), (1, 1), (1, 1)))
    centred = weight.astype(np.int64)[:, 0] - zero.astype(np.int64)[:, None, None]
    want = np.zeros((1, 256, 5, 5), dtype=np.int64)
    for i in range(5):
        for j in range(5):
            window = padded[0, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].astype(np.int64)
            want[0, :, i, j] = (window * centred).sum(axis=(1, 2))
    np.testing.assert_allclose(got, want.astype(np.float32) * (scale * np.float32(0.02)), rtol=1e-6, atol=1e-6)


def test_a_convolution_read_as_integers_elsewhere_stays_integer() -> None:
    model = _conv_integer_graph({"conv": (np.ones((2, 1, 3, 3), dtype=np.int8), None, 256)})
    model.graph.output.append(helper.make_tensor_value_info("conv_i", onnx.TensorProto.INT32, [1, 2, 5, 5]))
    before = model.SerializeToString()
    assert rewrite.convs_in_float(model) == 0
    assert model.SerializeToString() == before


def _florence(store: DerivedCache | None) -> Any:
    config = ModelConfig(dir=FLORENCE, precision="int8", threads=1)  # type: ignore[arg-type]
    return open_captioner(FLORENCE, config, derived=store)


@pytest.mark.parametrize("signs", [False, True], ids=["uint8-weights", "int8-weights"])
def test_int8_florence_image_encoder_runs_tidied_with_the_published_graphs_tokens(
        store: DerivedCache, monkeypatch: pytest.MonkeyPatch, signs: bool) -> None:
    if signs and not derived.signed_is_exact():
        # Without VNNI onnxruntime's u8s8 kernel may saturate, so capwatch never signs weights there (tested by
        # test_int8_weights_are_used_only_where_onnxruntime_accumulates_them_exactly); the uint8 case runs here.
        pytest.skip("capwatch signs int8 weights only on CPUs with VNNI; this CPU runs the uint8 case")
    # the CPU kind decides whether weights are signed too: both paths are checked wherever VNNI is present
    monkeypatch.setattr("capwatch.models.captioner.signed_is_exact", lambda: signs)
    pixels = np.stack([_florence(None).preprocess_file(p) for p in sorted(PHOTOS.glob("*.jpg"))[:2]])
    published = [list(r.token_ids) for r in _florence(None).caption_pixels(pixels)]
    cap = _florence(store)
    assert [list(r.token_ids) for r in cap.caption_pixels(pixels)] == published
    vision = Path(cap.sessions.describe()["vision_encoder"]["path"])
    manifest = json.loads((vision.parent / "manifest.json").read_text())
    assert manifest["recipe"] == ("tidy-s8" if signs else "tidy")
    assert manifest["split_transposes"] == 4  # the tiny DaViT: 2 stages x (window + channel attention)
    assert manifest["float_convs"] == 8  # the depthwise position encodings; the 2 patch embeddings stay integer
    graph = onnx.load(str(vision), load_external_data=False)
    assert len([n for n in graph.graph.node if n.op_type == "ConvInteger"]) == 2
    assert Path(manifest["source"]) == FLORENCE / "onnx" / "vision_encoder_quantized.onnx"
    # the fp32 graphs are left as published (onnxruntime moves those splits itself)
    fp32 = open_captioner(FLORENCE, ModelConfig(dir=FLORENCE, precision="fp32", threads=1), derived=store)
    fp32.caption_pixels(pixels[:1])
    assert "tidy" not in json.dumps(fp32.sessions.describe())
