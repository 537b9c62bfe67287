"""Florence-2 captioner: token parity with transformers' native generate() on the tiny fixture, batching,
task prompts, generation settings, post-processing and int8 -- onnxruntime only.

The goldens (tests/fixtures/models/florence2-tiny/goldens.json) were produced by tools/fixtures_florence.py with
``Florence2ForConditionalGeneration.generate()`` in transformers 4.57.6, greedy and beam-3, for every captioning task.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from capwatch.config import CaptionLength, ModelConfig
from capwatch.errors import ModelError
from capwatch.models.captioner import open_captioner
from capwatch.models.florence2 import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TASK_PROMPTS,
    TASK_FOR_LENGTH,
    Florence2Captioner,
    clean_caption,
    task_prompt,
)

FIXTURE = Path(__file__).parent / "fixtures" / "models" / "florence2-tiny"
GOLDENS: dict[str, Any] = json.loads((FIXTURE / "goldens.json").read_text())
PIXELS = np.load(FIXTURE / GOLDENS["pixels"])
LENGTHS: tuple[CaptionLength, ...] = ("short", "detailed", "paragraph")


def _captioner(model_dir: Path = FIXTURE, **overrides: Any) -> Florence2Captioner:
    config = ModelConfig(**{"precision": "fp32", "idle_unload_seconds": 0, **overrides})
    captioner = open_captioner(model_dir, config)
    assert isinstance(captioner, Florence2Captioner)
    return captioner


def _golden(length: CaptionLength, mode: str) -> list[list[int]]:
    rows: list[list[int]] = GOLDENS["tasks"][TASK_FOR_LENGTH[length]][mode]
    return rows


def _copy_fixture(tmp_path: Path) -> Path:
    target = tmp_path / "florence2-copy"
    shutil.copytree(FIXTURE, target, ignore=shutil.ignore_patterns("goldens*"))
    return target


# -- parity ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize(("mode", "beams"), [("greedy", 1), ("beam", 3)])
def test_tokens_equal_transformers_generate(length: CaptionLength, mode: str, beams: int) -> None:
    with _captioner(caption_length=length, num_beams=beams) as captioner:
        results = captioner.caption_pixels(PIXELS)
    assert [list(r.token_ids) for r in results] == _golden(length, mode)


def test_goldens_are_discriminating() -> None:
    # Guards the fixture itself: parity on degenerate output would prove little.
    for length in LENGTHS:
        greedy, beam = _golden(length, "greedy"), _golden(length, "beam")
        assert greedy != beam
        assert len({tuple(r) for r in greedy}) == len(greedy)  # every image captioned differently
        max_length = json.loads((FIXTURE / "generation_config.json").read_text())["max_length"]
        assert any(len(r) < max_length for r in greedy + beam)  # some stop on their own </s>
        assert any(len(r) == max_length for r in greedy + beam)  # some are cut by forced EOS


def test_captions_from_image_files_equal_transformers() -> None:
    # End to end: capwatch's own decoding + bicubic resize + ImageNet normalisation, then the four graphs.
    with _captioner(num_beams=3) as captioner:
        pixels = np.stack([captioner.preprocess_file(FIXTURE / "goldens" / f"{n}.png") for n in GOLDENS["images"]])
        np.testing.assert_allclose(pixels, PIXELS, atol=1e-5)
        results = captioner.caption_pixels(pixels)
    assert [list(r.token_ids) for r in results] == _golden("short", "beam")


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_equals_one_at_a_time(beams: int) -> None:
    with _captioner(num_beams=beams, batch_size=4, caption_length="detailed") as batched:
        together = batched.caption_pixels(PIXELS)  # chunks of 4 + 2, rows finishing at different steps
    with _captioner(num_beams=beams, batch_size=1, caption_length="detailed") as single:
        alone = [single.caption_pixels(PIXELS[i : i + 1])[0] for i in range(len(PIXELS))]
    assert together == alone
    assert [list(r.token_ids) for r in together] == _golden("detailed", "beam" if beams == 3 else "greedy")


def test_prompt_ids_equal_reference_tokenisation() -> None:
    for length in LENGTHS:
        captioner = _captioner(caption_length=length)
        assert list(captioner.prompt_ids) == GOLDENS["tasks"][TASK_FOR_LENGTH[length]]["prompt_ids"]
        assert captioner.prompt == DEFAULT_TASK_PROMPTS[TASK_FOR_LENGTH[length]]


# -- task prompts ------------------------------------------------------------------------------------------------


def test_task_prompt_comes_from_preprocessor_config(tmp_path: Path) -> None:
    model_dir = _copy_fixture(tmp_path)
    path = model_dir / "preprocessor_config.json"
    data = json.loads(path.read_text())
    data["task_prompts_without_inputs"]["<CAPTION>"] = "Describe the photo briefly."
    path.write_text(json.dumps(data))
    captioner = _captioner(model_dir)
    assert captioner.prompt == "Describe the photo briefly."
    assert captioner.prompt_ids[0] == 0 and captioner.prompt_ids[-1] == 2
    assert list(captioner.prompt_ids) != GOLDENS["tasks"]["<CAPTION>"]["prompt_ids"]
    # a different prompt is a different encoder input: the captions must change for at least one image
    assert [list(r.token_ids) for r in captioner.caption_pixels(PIXELS)] != _golden("short", "beam")


def test_processor_config_json_prompt_table_is_read(tmp_path: Path) -> None:
    model_dir = _copy_fixture(tmp_path)
    table = {"<DETAILED_CAPTION>": "Tell me everything in the picture."}
    (model_dir / "processor_config.json").write_text(json.dumps({"task_prompts_without_inputs": table}))
    assert task_prompt(model_dir, "detailed") == "Tell me everything in the picture."
    assert task_prompt(model_dir, "short") == json.loads((FIXTURE / "preprocessor_config.json").read_text())[
        "task_prompts_without_inputs"]["<CAPTION>"]


def test_task_prompt_defaults_to_transformers_table(tmp_path: Path) -> None:
    model_dir = _copy_fixture(tmp_path)
    path = model_dir / "preprocessor_config.json"
    data = json.loads(path.read_text())
    del data["task_prompts_without_inputs"]
    path.write_text(json.dumps(data))
    assert task_prompt(model_dir, "short") == "What does the image describe?"
    assert task_prompt(model_dir, "detailed") == "Describe in detail what is shown in the image."
    assert task_prompt(model_dir, "paragraph") == "Describe with a paragraph what is shown in the image."
    # identical to the table transformers' processor used for the goldens
    with _captioner(model_dir, num_beams=1) as captioner:
        assert [list(r.token_ids) for r in captioner.caption_pixels(PIXELS)] == _golden("short", "greedy")


# -- generation settings -----------------------------------------------------------------------------------------


def test_generation_settings_follow_generation_config() -> None:
    s = _captioner().settings
    assert (s.decoder_start_token_id, s.forced_bos_token_id, s.forced_eos_token_id) == (2, 0, 2)
    assert (s.num_beams, s.no_repeat_ngram_size, s.eos_token_id, s.pad_token_id) == (3, 3, (2,), 1)
    assert s.max_length == 24


def test_generation_keys_in_text_config_when_no_generation_config(tmp_path: Path) -> None:
    # Older (remote-code) exports have no generation_config.json and keep these keys in config.json's text_config.
    model_dir = _copy_fixture(tmp_path)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").unlink()
    config = json.loads((model_dir / "config.json").read_text())
    for key in ("bos_token_id", "decoder_start_token_id", "eos_token_id", "pad_token_id"):
        config.pop(key, None)
    config["text_config"].update(generation)
    (model_dir / "config.json").write_text(json.dumps(config))
    with _captioner(model_dir) as captioner:
        assert captioner.settings.forced_bos_token_id == 0 and captioner.settings.num_beams == 3
        assert [list(r.token_ids) for r in captioner.caption_pixels(PIXELS)] == _golden("short", "beam")


@pytest.mark.parametrize("length", LENGTHS)
def test_caption_budget_defaults_per_length_when_configs_set_none(tmp_path: Path, length: CaptionLength) -> None:
    model_dir = _copy_fixture(tmp_path)
    path = model_dir / "generation_config.json"
    data = json.loads(path.read_text())
    data["max_length"] = 20  # transformers' implicit default, as remote-code configs serialise it
    path.write_text(json.dumps(data))
    assert _captioner(model_dir, caption_length=length).settings.max_length == DEFAULT_MAX_NEW_TOKENS[length] + 1
    # the user's setting wins
    captioner = _captioner(model_dir, caption_length=length, max_new_tokens=5, num_beams=1)
    assert captioner.settings.max_length == 6
    assert all(len(r.token_ids) <= 6 and r.token_ids[-1] == 2 for r in captioner.caption_pixels(PIXELS[:2]))


# -- post-processing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("</s><s>A green car parked in front of a yellow building.</s>",
         "A green car parked in front of a yellow building."),
        ("<s>a dog on the beach</s><pad><pad>", "A dog on the beach"),
        ("  A cat<loc_12><loc_345> sitting on a sofa<loc_999> . ", "A cat sitting on a sofa."),
        ("<loc_1><loc_2><loc_3>", ""),
        ("", ""),
        ("The image shows a street ,\n\twith  cars .</s>", "The image shows a street, with cars."),
        ("<s>Ölgemälde eines Hauses</s>", "Ölgemälde eines Hauses"),
        ("<loc_5>3 people on a bus", "3 people on a bus"),
        ("A sign reading <location> here", "A sign reading <location> here"),  # only <loc_N> are location tokens
    ],
)
def test_clean_caption(raw: str, clean: str) -> None:
    assert clean_caption(raw) == clean


def test_caption_text_has_no_markup() -> None:
    with _captioner(caption_length="paragraph") as captioner:
        results = captioner.caption_pixels(PIXELS)
    assert any("<loc_" in captioner.text._tokenizer.decode(list(r.token_ids)) for r in results)
    for r in results:
        assert "<loc_" not in r.text and "<s>" not in r.text and "</s>" not in r.text and "<pad>" not in r.text
        assert r.text == r.text.strip() and "  " not in r.text


# -- int8, layout, errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beams", [1, 3])
def test_int8_captions(beams: int) -> None:
    fp32_size = (FIXTURE / "onnx" / "decoder_model_merged.onnx").stat().st_size
    int8_size = (FIXTURE / "onnx" / "decoder_model_merged_quantized.onnx").stat().st_size
    assert int8_size < 0.7 * fp32_size  # the decoder's If branches were quantized too (EnableSubgraph)
    # No batched == one-at-a-time check here: dynamic quantization picks one activation scale per tensor, i.e.
    # over every row of a decoder step, so int8 results legitimately depend on what is batched together.
    with _captioner(precision="int8", num_beams=beams, batch_size=3) as captioner:
        results = captioner.caption_pixels(PIXELS)
    for r in results:
        assert r.token_ids[:2] == (2, 0) and r.token_ids[-1] == 2 and 3 <= len(r.token_ids) <= 24
    # int8 is not bit-exact, but on most images it must still follow the fp32 model
    golden = _golden("short", "beam" if beams == 3 else "greedy")
    assert sum(list(r.token_ids)[:3] == g[:3] for r, g in zip(results, golden, strict=True)) >= 3


def test_graphs_at_model_root(tmp_path: Path) -> None:
    model_dir = _copy_fixture(tmp_path)
    for graph in (model_dir / "onnx").glob("*.onnx"):
        graph.rename(model_dir / graph.name)
    (model_dir / "onnx").rmdir()
    with _captioner(model_dir, num_beams=1) as captioner:
        assert [list(r.token_ids) for r in captioner.caption_pixels(PIXELS)] == _golden("short", "greedy")


def test_caption_image_objects_and_reload_after_idle_unload() -> None:
    now = [0.0]
    config = ModelConfig(precision="fp32", idle_unload_seconds=10)
    captioner = Florence2Captioner(_captioner().model, config, clock=lambda: now[0])
    image = Image.open(FIXTURE / "goldens" / "waves.png")
    first = captioner.caption_batch([image])
    assert captioner.loaded
    now[0] = 11.0
    assert captioner.unload_if_idle()
    assert not captioner.loaded
    assert captioner.caption_batch([image]) == first
    assert list(first[0].token_ids) == _golden("short", "beam")[GOLDENS["images"].index("waves")]


def test_missing_graph_is_a_model_error(tmp_path: Path) -> None:
    model_dir = _copy_fixture(tmp_path)
    (model_dir / "onnx" / "embed_tokens.onnx").unlink()
    with pytest.raises(ModelError, match="embed_tokens"):
        _captioner(model_dir)


def test_wrong_graph_is_a_model_error_naming_the_tensor(tmp_path: Path) -> None:
    model_dir = _copy_fixture(tmp_path)
    shutil.copy(model_dir / "onnx" / "vision_encoder.onnx", model_dir / "onnx" / "encoder_model.onnx")
    captioner = _captioner(model_dir)
    with pytest.raises(ModelError, match=r"encoder_model\.onnx: input tensor 'inputs_embeds' not found") as info:
        captioner.caption_pixels(PIXELS[:1])
    assert "\n" not in str(info.value)
