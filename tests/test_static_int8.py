"""Static int8 image encoder (``model.int8_image_encoder = "static"``): made from the published dynamic int8 graph,
calibrated on the shipped photos, probed against the published graph, cached; refused -> the published graph runs.

All on the committed tiny Florence-2 fixture with real onnxruntime sessions.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import metadata_corpus as mc
import numpy as np
import onnx
import pytest

from capwatch.config import Config, ModelConfig
from capwatch.library.process import Processor
from capwatch.metadata import read_snapshot
from capwatch.models import derived, florence2, staticq
from capwatch.models.captioner import open_captioner
from capwatch.models.derived import DerivedCache
from capwatch.models.florence2 import Florence2Captioner
from capwatch.models.runtime import ort
from tests.conftest import CliRunner

FLORENCE = Path(__file__).parent / "fixtures" / "models" / "florence2-tiny"
PUBLISHED = FLORENCE / "onnx" / "vision_encoder_quantized.onnx"
PHOTOS = Path(__file__).parent / "fixtures" / "photos"


@pytest.fixture
def store(tmp_path: Path) -> DerivedCache:
    return DerivedCache(tmp_path / "derived", b"k" * 32)


def _open(store: DerivedCache | None, mode: str = "static") -> Florence2Captioner:
    config = ModelConfig(dir=FLORENCE, precision="int8", threads=1, int8_image_encoder=mode)  # type: ignore[arg-type]
    cap = open_captioner(FLORENCE, config, derived=store)
    assert isinstance(cap, Florence2Captioner)
    return cap


def _vision_path(cap: Florence2Captioner) -> Path:
    with cap.sessions.use():
        pass
    return cap.sessions._sessions[florence2.VISION].path


def _features(path: Path, pixels: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"pixel_values": pixels[i : i + 1]})[0] for i in range(len(pixels))])


def _cosines(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(x.ravel() @ y.ravel() / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b, strict=True)]


def test_static_image_encoder_is_made_probed_cached_and_its_features_stay_close(store: DerivedCache) -> None:
    cap = _open(store)
    static = _vision_path(cap)
    assert static.parent.parent == store.root and static.name == "graph.onnx"
    manifest = json.loads((static.parent / "manifest.json").read_text())
    assert manifest["recipe"] == "static" and manifest["min_cosine"] >= derived.STATIC_MIN_COSINE
    assert manifest["split_transposes"] == 4  # attention splits before their transposes, as in the dynamic graph
    ops = {node.op_type for node in onnx.load(str(static)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert not ops & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}
    # features against fp32 on the photos as shipped (not mirrored, not cropped)
    pixels = staticq.calibration_pixels(cap.preprocess_image)[::3]
    fp32 = _features(FLORENCE / "onnx" / "vision_encoder.onnx", pixels)
    assert min(_cosines(_features(static, pixels), fp32)) >= 0.99
    # captions run on it
    results = cap.caption_pixels(pixels[:1])
    assert results[0].token_ids
    cap.close()
    # a second captioner takes it from the cache: not made again
    made = static.stat().st_mtime_ns
    again = _open(store)
    assert _vision_path(again) == static and static.stat().st_mtime_ns == made
    again.close()


def _is_published_dynamic(path: Path) -> bool:
    """True for the published dynamic int8 image encoder as the captioner runs it: the file itself, or its exact
    rewrite (derived recipe ``tidy``: attention splits before their transposes; ``tidy-s8`` on a CPU with VNNI,
    its weights also signed), which computes the same values bit for bit."""
    if path == PUBLISHED:
        return True
    manifest = json.loads((path.parent / "manifest.json").read_text())
    recipe = "tidy-s8" if derived.signed_is_exact() else "tidy"
    return manifest["recipe"] == recipe and Path(manifest["source"]) == PUBLISHED


def test_dynamic_mode_and_no_cache_run_the_published_encoder(store: DerivedCache) -> None:
    assert _is_published_dynamic(_vision_path(_open(store, "dynamic")))
    assert _vision_path(_open(None)) == PUBLISHED
    # nothing static made: only the exact rewrite of the published graph
    made = {json.loads(m.read_text())["recipe"] for m in store.root.glob("*/manifest.json")}
    assert made == {"tidy-s8" if derived.signed_is_exact() else "tidy"}


def test_a_static_graph_that_strays_is_refused_and_the_published_one_runs(
        store: DerivedCache, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(derived, "STATIC_MIN_COSINE", 1.000001)  # no quantised graph reaches it
    with caplog.at_level(logging.WARNING):
        cap = _open(store)
        assert _is_published_dynamic(_vision_path(cap))
    assert "keeping the image encoder's dynamic quantisation" in caplog.text
    assert "cosine" in caplog.text
    assert list(store.root.glob("*-static-v*.failed"))
    assert not [p for p in store.root.glob("*-static-v*") if p.is_dir()]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # refused once, not probed again at every start
        assert _is_published_dynamic(_vision_path(_open(store)))
    assert not caplog.records


def test_dequantize_dynamic_gives_the_float_graph_the_integer_weights_stand_for() -> None:
    model = staticq.dequantize_dynamic(onnx.load(str(PUBLISHED)))
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(3).normal(size=(2, 3, 64, 64)).astype(np.float32)
    got = np.concatenate([session.run(None, {"pixel_values": pixels[i : i + 1]})[0] for i in range(2)])
    # closer to the dynamic graph (same weights, no activation rounding) than that one is to fp32
    published = _features(PUBLISHED, pixels)
    fp32 = _features(FLORENCE / "onnx" / "vision_encoder.onnx", pixels)
    assert min(_cosines(got, published)) >= 0.999
    assert min(_cosines(got, fp32)) >= min(_cosines(published, fp32))


# -- what the captions say they were made with ---------------------------------------------------------------------


def _recorded_precision(path: Path) -> str:
    """capwatch:ModelPrecision as exiftool (the independent reader) finds it in ``path``."""
    out = json.loads(mc.exiftool("-j", "-XMP-capwatch:all", path))[0]
    return str(out.get("ModelPrecision", ""))


@pytest.mark.skipif(not mc.EXIFTOOL, reason="exiftool is the independent reader")
def test_a_caption_made_with_the_static_image_encoder_records_it_and_the_published_one_plain_int8(
        run_cli: CliRunner, tmp_path: Path) -> None:
    photo = tmp_path / "coffee.jpg"
    shutil.copy(PHOTOS / "coffee.jpg", photo)
    config = tmp_path / "config.toml"
    for mode, want in (("static", "int8+vision_encoder=int8-static"), ("dynamic", "int8")):
        config.write_text(f'[model]\nprecision = "int8"\nthreads = 1\nint8_image_encoder = "{mode}"\n')
        result = run_cli("--config", config, "--db", tmp_path / "index.db", "--model", FLORENCE, "caption",
                         "--force", photo)
        assert result.code == 0, result.err
        assert _recorded_precision(photo) == want
        provenance = read_snapshot(photo).metadata.description.provenance  # type: ignore[union-attr]
        assert provenance is not None and provenance.precision == want


def test_a_refused_static_encoder_records_the_published_int8(
        store: DerivedCache, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(derived, "STATIC_MIN_COSINE", 1.000001)  # no quantised graph reaches it
    photo = tmp_path / "coffee.jpg"
    shutil.copy(PHOTOS / "coffee.jpg", photo)
    cap = _open(store)
    assert cap.precision_used == "int8"  # not loaded yet: what the files are
    processor = Processor(Config(model=cap.config), None, cap)
    try:
        [outcome] = processor.process_batch([photo])
    finally:
        processor.close()
        cap.close()
    assert outcome.error is None and outcome.written
    provenance = read_snapshot(photo).metadata.description.provenance  # type: ignore[union-attr]
    assert provenance is not None and provenance.precision == cap.precision_used == "int8"


def test_status_of_a_running_daemon_names_the_static_image_encoder_it_captions_with(tmp_path: Path) -> None:
    from daemon_helpers import rows, start_daemon, stop_daemon, wait_until

    from tests.conftest import isolated_env

    root = tmp_path / "photos"
    root.mkdir()
    shutil.copy(PHOTOS / "coffee.jpg", root / "coffee.jpg")
    db = tmp_path / "index.db"
    config = tmp_path / "config.toml"
    config.write_text(f'[library]\nroots = ["{root}"]\n\n[index]\npath = "{db}"\n\n'
                      f'[model]\ndir = "{FLORENCE}"\nprecision = "int8"\nint8_image_encoder = "static"\nthreads = 1\n'
                      "idle_unload_seconds = 0\n\n[watch]\nsettle_seconds = 0.2\n")
    env = isolated_env(tmp_path)
    proc = start_daemon(config, env=env)
    try:
        wait_until(lambda: rows(db).get(str(root / "coffee.jpg"), ("",))[0] == "captioned", timeout=120,
                   what="the photo captioned by the daemon")

        def precision() -> str | None:
            out = subprocess.run([sys.executable, "-m", "capwatch", "--config", str(config), "status", "--json"],
                                 env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)["daemon"]["model_precision"]  # type: ignore[no-any-return]

        # The daemon publishes its live state once a second: the caption may land before the next one.
        wait_until(lambda: precision() == "int8+vision_encoder=int8-static", timeout=15,
                   what="status naming the static image encoder")
        human = subprocess.run([sys.executable, "-m", "capwatch", "--config", str(config), "status"], env=env,
                               capture_output=True, text=True, timeout=60).stdout
        assert "int8+vision_encoder=int8-static" in human, human
    finally:
        stop_daemon(proc)
