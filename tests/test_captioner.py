"""open_captioner / Captioner on the tiny fixture models: loading, errors, overrides, batching, idle unload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capwatch.config import ModelConfig
from capwatch.errors import CapwatchError, ImageError, ModelError
from capwatch.models.captioner import CaptionResult, open_captioner
from capwatch.models.session import available_cores, session_options

FIXTURES = Path(__file__).parent / "fixtures"
BEAM = FIXTURES / "models" / "vit-gpt2-tiny-beam"
GREEDY = FIXTURES / "models" / "vit-gpt2-tiny-greedy"
IMAGES = FIXTURES / "images"


def goldens(model_dir: Path) -> dict[str, dict[str, list[int]]]:
    data: dict[str, dict[str, list[int]]] = json.loads((model_dir / "goldens.json").read_text())["token_ids"]
    return data


def config(model_dir: Path, **changes: object) -> ModelConfig:
    base: dict[str, object] = {"dir": model_dir, "precision": "fp32", "threads": 1}
    base.update(changes)
    return ModelConfig(**base)  # type: ignore[arg-type]


def copy_model(tmp_path: Path, source: Path = BEAM) -> Path:
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def test_open_captioner_defaults_model_id_to_directory_name_and_is_lazy() -> None:
    cap = open_captioner(BEAM, config(BEAM))
    assert cap.model_id == "vit-gpt2-tiny-beam" and cap.revision is None
    assert not cap.loaded  # sessions load on the first caption, not at open
    named = open_captioner(BEAM, config(BEAM), model_id="org/model", revision="abc123")
    assert (named.model_id, named.revision) == ("org/model", "abc123")


def test_caption_files_and_pil_images_agree_and_text_is_decoded() -> None:
    with open_captioner(BEAM, config(BEAM)) as cap:
        from_files = cap.caption_pixels(np.stack([cap.preprocess_file(IMAGES / "red.png"),
                                                  cap.preprocess_file(IMAGES / "checker.png")]))
        with Image.open(IMAGES / "red.png") as a, Image.open(IMAGES / "checker.png") as b:
            from_images = cap.caption_batch([a.convert("RGB"), b.convert("RGB")])
        assert cap.loaded
    assert from_files == from_images
    assert [list(r.token_ids) for r in from_files] == [goldens(BEAM)["default"][n] for n in ("red.png", "checker.png")]
    assert all(isinstance(r, CaptionResult) and r.text and r.text == r.text.strip() for r in from_files)
    assert cap.caption_batch([]) == []


def test_config_overrides_replace_generation_config() -> None:
    with open_captioner(BEAM, config(BEAM, num_beams=1)) as cap:
        out = cap.caption_pixels(np.stack([cap.preprocess_file(IMAGES / n) for n in ("red.png", "blobs.jpg")]))
    assert [list(r.token_ids) for r in out] == [goldens(BEAM)["greedy"][n] for n in ("red.png", "blobs.jpg")]
    with open_captioner(GREEDY, config(GREEDY, max_new_tokens=3)) as cap:
        out = cap.caption_pixels(cap.preprocess_file(IMAGES / "gradient.jpg")[None])
    assert len(out[0].token_ids) <= 4
    assert list(out[0].token_ids) == goldens(GREEDY)["default"]["gradient.jpg"][:4]


def test_idle_sessions_unload_and_reload_with_the_same_results() -> None:
    now = [1000.0]
    cap = open_captioner(GREEDY, config(GREEDY, idle_unload_seconds=60.0))
    cap.sessions._clock = lambda: now[0]  # an injected clock keeps the test independent of wall time
    pixels = cap.preprocess_file(IMAGES / "checker.png")[None]
    first = cap.caption_pixels(pixels)
    assert cap.loaded
    assert not cap.unload_if_idle(now[0] + 59.0)
    assert cap.unload_if_idle(now[0] + 61.0)
    assert not cap.loaded
    assert not cap.unload_if_idle(now[0] + 500.0)  # nothing left to unload
    assert cap.caption_pixels(pixels) == first
    never = open_captioner(GREEDY, config(GREEDY, idle_unload_seconds=0.0))
    never.caption_pixels(pixels)
    assert not never.unload_if_idle(1e12) and never.loaded


def test_thread_count_comes_from_config_with_zero_meaning_all_cores() -> None:
    assert session_options(3).intra_op_num_threads == 3
    assert session_options(0).intra_op_num_threads == available_cores() >= 1


def test_vocab_and_merges_work_when_tokenizer_json_is_missing(tmp_path: Path) -> None:
    model = copy_model(tmp_path)
    (model / "tokenizer.json").unlink()
    with open_captioner(BEAM, config(BEAM)) as a, open_captioner(model, config(model)) as b:
        pixels = a.preprocess_file(IMAGES / "blobs.jpg")[None]
        assert a.caption_pixels(pixels)[0].text == b.caption_pixels(pixels)[0].text


def test_onnx_files_at_the_root_are_found(tmp_path: Path) -> None:
    model = copy_model(tmp_path)
    for f in (model / "onnx").iterdir():
        f.rename(model / f.name)
    (model / "onnx").rmdir()
    with open_captioner(model, config(model, precision="int8")) as cap:
        assert cap.caption_pixels(cap.preprocess_file(IMAGES / "red.png")[None])[0].token_ids


def _one_line_model_error(model_dir: Path, cfg: ModelConfig | None = None) -> str:
    with pytest.raises(ModelError) as info:
        cap = open_captioner(model_dir, cfg or config(model_dir))
        cap.caption_pixels(np.zeros((1, 3, 32, 32), dtype=np.float32))
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, CapwatchError)
    return message


def test_broken_model_directories_get_one_line_errors(tmp_path: Path) -> None:
    assert "not found" in _one_line_model_error(tmp_path / "nope")
    not_dir = tmp_path / "file.onnx"
    not_dir.write_bytes(b"x")
    assert "not a directory" in _one_line_model_error(not_dir)

    no_config = copy_model(tmp_path / "a")
    (no_config / "config.json").unlink()
    assert "missing config.json" in _one_line_model_error(no_config)

    bad_json = copy_model(tmp_path / "b")
    (bad_json / "preprocessor_config.json").write_text("{ nope")
    assert "preprocessor_config.json: invalid JSON" in _one_line_model_error(bad_json)

    other = copy_model(tmp_path / "c")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    assert "unsupported model_type 'llama'" in _one_line_model_error(other)

    no_fp16 = copy_model(tmp_path / "d")
    message = _one_line_model_error(no_fp16, config(no_fp16, precision="fp16"))
    assert "decoder" in message or "encoder" in message
    assert "available: fp32, int8" in message

    no_tokenizer = copy_model(tmp_path / "e")
    for name in ("tokenizer.json", "vocab.json"):
        (no_tokenizer / name).unlink()
    assert "tokenizer.json" in _one_line_model_error(no_tokenizer)

    swapped = copy_model(tmp_path / "f")
    enc, dec = swapped / "onnx" / "encoder_model.onnx", swapped / "onnx" / "decoder_model_merged.onnx"
    shutil.copy(dec, enc)  # an "encoder" with the decoder's tensor names
    assert "'pixel_values' not found" in _one_line_model_error(swapped)

    garbage = copy_model(tmp_path / "g")
    (garbage / "onnx" / "encoder_model.onnx").write_bytes(b"this is not protobuf")
    assert "cannot load ONNX graph" in _one_line_model_error(garbage)


def test_unreadable_image_raises_image_error_not_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    cap = open_captioner(BEAM, config(BEAM))
    with pytest.raises(ImageError):
        cap.preprocess_file(bad)
    assert not cap.loaded


def test_caption_pixels_rejects_wrong_shapes() -> None:
    cap = open_captioner(BEAM, config(BEAM))
    with pytest.raises(ValueError, match=r"\[b,3,H,W\]"):
        cap.caption_pixels(np.zeros((3, 32, 32), dtype=np.float32))


def test_beams_fed_one_shared_encoder_row_per_image_give_identical_tokens() -> None:
    from capwatch.models import vision_encoder_decoder as ved
    from capwatch.models.generate import generate

    cap = open_captioner(BEAM, config(BEAM))
    pixels = np.stack([cap.preprocess_file(IMAGES / n) for n in ("red.png", "checker.png", "blobs.jpg")])
    cap.caption_pixels(pixels[:1])
    assert cap._broadcast  # the Optimum export broadcasts one encoder row over the beams
    with cap.sessions.use() as sessions:
        hidden = ved.encode(sessions[ved.ENCODER], pixels)
        outs = [
            generate(ved.VitGpt2Decoder(sessions[ved.DECODER], cap._layout, broadcast_encoder=shared), hidden, 3,
                     cap.settings)
            for shared in (False, True)
        ]
    assert outs[0] == outs[1]


def test_int8_beams_with_shared_encoder_rows_decode_each_image_as_if_alone() -> None:
    """int8 graphs quantise activations per call, so per-image calls keep batched beams equal to single ones."""
    from capwatch.models import vision_encoder_decoder as ved
    from capwatch.models.generate import generate

    cap = open_captioner(BEAM, config(BEAM, precision="int8"))
    pixels = np.stack([cap.preprocess_file(IMAGES / n) for n in ("red.png", "checker.png", "blobs.jpg")])
    cap.caption_pixels(pixels[:1])
    with cap.sessions.use() as sessions:
        hidden = ved.encode(sessions[ved.ENCODER], pixels)
        decoder = ved.VitGpt2Decoder(sessions[ved.DECODER], cap._layout, broadcast_encoder=True)
        batched = generate(decoder, hidden, 3, cap.settings)
        single = [generate(decoder, hidden[i : i + 1], 1, cap.settings)[0] for i in range(3)]
    assert batched == single


def test_auto_precision_takes_fp32_when_present_else_what_the_directory_has(tmp_path: Path) -> None:
    source = Path(__file__).parent / "fixtures" / "models" / "vit-gpt2-tiny-greedy"
    assert open_captioner(source, ModelConfig()).precision == "fp32"
    only_int8 = tmp_path / "int8-only"
    shutil.copytree(source, only_int8)
    for graph in (only_int8 / "onnx").glob("*.onnx"):
        if not graph.stem.endswith("_quantized"):
            graph.unlink()
    assert open_captioner(only_int8, ModelConfig()).precision == "int8"
    with pytest.raises(ModelError, match="fp32"):
        open_captioner(only_int8, ModelConfig(precision="fp32"))
