"""model.graph_precision: one precision per graph (Florence-2's image encoder fp32, the rest int8, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from capwatch.config import ConfigError, ModelConfig, load_config
from capwatch.errors import ModelError
from capwatch.models.captioner import open_captioner
from capwatch.models.registry import REGISTRY, precision_key, split_precision_key

FLORENCE = Path(__file__).parent / "fixtures" / "models" / "florence2-tiny"
IMAGES = Path(__file__).parent / "fixtures" / "images"


def test_precision_keys_round_trip_and_leave_out_graphs_at_the_base_precision() -> None:
    assert precision_key("int8") == "int8"
    assert precision_key("int8", {"vision_encoder": "fp32", "embed_tokens": "int8"}) == "int8+vision_encoder=fp32"
    key = precision_key("int8", {"vision_encoder": "fp32", "decoder_model_merged": "fp16"})
    assert key == "int8+decoder_model_merged=fp16,vision_encoder=fp32"
    assert split_precision_key(key) == ("int8", {"decoder_model_merged": "fp16", "vision_encoder": "fp32"})
    with pytest.raises(ModelError):
        split_precision_key("int8+vision_encoder=int4")


def test_registry_mix_takes_each_graph_file_with_its_own_pins() -> None:
    spec = next(s for s in REGISTRY if s.name == "florence-2-base-ft")
    files = {f.path: f for f in spec.files("int8+vision_encoder=fp32")}
    assert "onnx/vision_encoder.onnx" in files and "onnx/vision_encoder_quantized.onnx" not in files
    int8 = {f.path: f for f in spec.files("int8")}
    for stem in ("embed_tokens", "encoder_model", "decoder_model_merged"):
        assert files[f"onnx/{stem}_quantized.onnx"] == int8[f"onnx/{stem}_quantized.onnx"]  # pins kept
    with pytest.raises(ModelError, match="has no graph 'pixel_encoder'"):
        spec.files("int8+pixel_encoder=fp32")


def _tokens(cap: object, images: list[Path]) -> list[tuple[int, ...]]:
    return [cap.caption_pixels(cap.preprocess_file(p)[None])[0].token_ids for p in images]  # type: ignore[attr-defined]


def test_florence_runs_its_image_encoder_fp32_and_the_rest_int8() -> None:
    images = sorted(IMAGES.glob("*"))[:4]
    mixed = open_captioner(FLORENCE, ModelConfig(dir=FLORENCE, precision="int8", threads=1,
                                                 graph_precision={"vision_encoder": "fp32"}))
    assert mixed.precision == "int8+vision_encoder=fp32"
    paths = {stem: Path(entry["path"]).name for stem, entry in mixed.sessions.describe().items()}
    assert paths == {"vision_encoder": "vision_encoder.onnx", "embed_tokens": "embed_tokens_quantized.onnx",
                     "encoder_model": "encoder_model_quantized.onnx",
                     "decoder_model_merged": "decoder_model_merged_quantized.onnx"}
    got = _tokens(mixed, images)
    # the same as running the graphs by hand: fp32 image features into the int8 text model
    int8 = open_captioner(FLORENCE, ModelConfig(dir=FLORENCE, precision="int8", threads=1))
    fp32 = open_captioner(FLORENCE, ModelConfig(dir=FLORENCE, precision="fp32", threads=1))
    assert all(len(t) >= 2 for t in got)
    with mixed.sessions.use() as sessions, fp32.sessions.use() as reference:
        pixels = mixed.preprocess_file(images[0])[None]
        ours = sessions["vision_encoder"].run(None, {"pixel_values": pixels})[0]
        theirs = reference["vision_encoder"].run(None, {"pixel_values": pixels})[0]
        assert np.array_equal(ours, theirs)
    assert int8.precision == "int8" and fp32.precision == "fp32"


def test_a_graph_the_model_does_not_have_is_refused_in_one_line() -> None:
    with pytest.raises(ModelError) as caught:
        open_captioner(FLORENCE, ModelConfig(dir=FLORENCE, graph_precision={"encoder": "fp32"}))
    text = str(caught.value)
    assert "\n" not in text and "no graph 'encoder'" in text and "vision_encoder" in text


def test_graph_precision_is_a_table_of_graph_names_and_precisions(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[model]\nprecision = "int8"\ngraph_precision = { vision_encoder = "fp32" }\n')
    assert load_config(path, {}).model.graph_precision == {"vision_encoder": "fp32"}
    for bad, why in (('graph_precision = "fp32"', "expected a table"),
                     ('graph_precision = { vision_encoder = "int4" }', "'fp32', 'int8', 'fp16'"),
                     ('graph_precision = { "vision encoder" = "fp32" }', "letters, digits")):
        path.write_text(f"[model]\n{bad}\n")
        with pytest.raises(ConfigError, match=why):
            load_config(path, {})
