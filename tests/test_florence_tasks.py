"""Florence-2's keyword (<OD>) and text (<OCR>) tasks on the caption's image features.

Goldens: tools/florence_task_goldens.py (transformers' native generate() and post_process_generation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from capwatch.config import Config, MetadataConfig, ModelConfig, OcrConfig
from capwatch.models import florence2
from capwatch.models.captioner import DescribeOptions, ImageDescription, open_captioner
from capwatch.models.florence2 import OCR_TASK, OD_TASK, Florence2Captioner
from capwatch.models.florence_post import Detection, clean_pure_text, parse_od
from capwatch.models.keywords import keywords_from_detections

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "models" / "florence2-tiny"
GOLDENS: dict[str, Any] = json.loads((FIXTURE / "goldens.json").read_text())
TASK_GOLDENS: dict[str, Any] = json.loads((FIXTURE / "goldens_tasks.json").read_text())
POST_GOLDENS: list[dict[str, Any]] = json.loads((FIXTURES / "florence_post_goldens.json").read_text())
PIXELS = np.load(FIXTURE / GOLDENS["pixels"])
SIZES = [tuple(s) for s in TASK_GOLDENS["sizes"]]


def _captioner(**overrides: Any) -> Florence2Captioner:
    captioner = open_captioner(FIXTURE, ModelConfig(**{"precision": "fp32", "idle_unload_seconds": 0, **overrides}))
    assert isinstance(captioner, Florence2Captioner)
    return captioner


def _answer_detections(answer: dict[str, Any]) -> list[Detection]:
    return [Detection(label, tuple(box)) for label, box in zip(answer["labels"], answer["bboxes"], strict=True)]


# -- token parity with transformers generate() ------------------------------------------------------------------


@pytest.mark.parametrize("task", [OD_TASK, OCR_TASK])
@pytest.mark.parametrize(("mode", "beams"), [("greedy", 1), ("beam", 3)])
def test_task_tokens_equal_transformers_generate(task: str, mode: str, beams: int) -> None:
    with _captioner(num_beams=beams) as captioner:
        assert list(captioner.task_prompt_ids[task]) == TASK_GOLDENS["tasks"][task]["prompt_ids"]
        assert captioner.task_ids(PIXELS, task) == TASK_GOLDENS["tasks"][task][mode]


def test_task_goldens_are_discriminating() -> None:
    od = TASK_GOLDENS["tasks"][OD_TASK]
    # location tokens were generated and parsed into labelled boxes; greedy and beam differ somewhere
    assert sum(len(a["labels"]) for a in od["answer_greedy"]) >= 4
    assert od["greedy"] != od["beam"]
    assert TASK_GOLDENS["tasks"][OCR_TASK]["greedy"] != od["greedy"]


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_od_labels_and_boxes_equal_post_process_generation(mode: str) -> None:
    captioner = _captioner()
    entry = TASK_GOLDENS["tasks"][OD_TASK]
    for ids, text, answer, size in zip(entry[mode], entry[f"text_{mode}"], entry[f"answer_{mode}"], SIZES,
                                       strict=True):
        decoded = captioner.text.decode_raw(ids)
        assert decoded == text
        assert parse_od(decoded, size) == _answer_detections(answer)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_ocr_text_equals_post_process_generation(mode: str) -> None:
    captioner = _captioner()
    entry = TASK_GOLDENS["tasks"][OCR_TASK]
    for ids, answer in zip(entry[mode], entry[f"answer_{mode}"], strict=True):
        assert clean_pure_text(captioner.text.decode_raw(ids)) == answer


# -- the parser on realistic outputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", POST_GOLDENS, ids=lambda c: f"{c['task']}:{c['text'][:40]}")
def test_parser_equals_transformers_post_processor(case: dict[str, Any]) -> None:
    if case["task"] == OD_TASK:
        assert parse_od(case["text"], tuple(case["size"])) == _answer_detections(case["answer"])
    else:
        assert clean_pure_text(case["text"]) == case["answer"]


def test_realistic_detection_becomes_keywords_largest_first() -> None:
    case = next(c for c in POST_GOLDENS if c["text"].startswith("</s><s>car<loc_52>"))
    assert keywords_from_detections(parse_od(case["text"], (640, 480)), 10) == ("car", "wheel", "door")
    many = next(c for c in POST_GOLDENS if "CARS" in c["text"])
    # Car / CARS are one keyword; wheels singular; a label glued to <od> markup is not a keyword
    assert keywords_from_detections(parse_od(many["text"], (6000, 4000)), 10) == ("car", "wheel")


# -- describe: one vision pass, every product -------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "beams"), [("greedy", 1), ("beam", 3)])
def test_describe_gives_caption_keywords_and_text_of_the_reference(mode: str, beams: int) -> None:
    with _captioner(num_beams=beams) as captioner:
        got = captioner.describe_pixels(PIXELS, DescribeOptions(keywords=True, max_keywords=3, text=True),
                                        image_sizes=SIZES)
    od, ocr = TASK_GOLDENS["tasks"][OD_TASK], TASK_GOLDENS["tasks"][OCR_TASK]
    for i, description in enumerate(got):
        assert description.caption is not None
        assert list(description.caption.token_ids) == GOLDENS["tasks"]["<CAPTION>"][mode][i]
        expected = keywords_from_detections(_answer_detections(od[f"answer_{mode}"][i]), 3)
        assert description.keywords == expected
        assert description.text == ocr[f"answer_{mode}"][i]
    assert any(d.keywords for d in got)


def test_describe_runs_the_vision_encoder_once_per_image(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = florence2.image_features

    def counting(vision: Any, pixel_values: np.ndarray, shape: Any) -> list[np.ndarray]:
        seen.append(pixel_values.shape[0])
        return real(vision, pixel_values, shape)

    monkeypatch.setattr(florence2, "image_features", counting)
    with _captioner(batch_size=4) as captioner:
        captioner.describe_pixels(PIXELS, DescribeOptions(text=True))
    assert sum(seen) == PIXELS.shape[0]


def test_describe_of_image_objects_scales_boxes_to_each_image() -> None:
    names = GOLDENS["images"]
    images = [Image.open(FIXTURE / "goldens" / f"{n}.png").convert("RGB") for n in names]
    with _captioner() as captioner:
        got = captioner.describe_batch(images, DescribeOptions(max_keywords=50))
        plain = captioner.caption_batch(images)
    assert [d.caption for d in got] == plain
    assert all(d.text is None for d in got)
    answers = TASK_GOLDENS["tasks"][OD_TASK]["answer_beam"]
    assert [d.keywords for d in got] == [keywords_from_detections(_answer_detections(a), 50) for a in answers]


def test_options_turn_products_off() -> None:
    with _captioner() as captioner:
        none = captioner.describe_pixels(PIXELS[:2], DescribeOptions(caption=False, keywords=False))
        zero = captioner.describe_pixels(PIXELS[:2], DescribeOptions(max_keywords=0))
    assert none == [ImageDescription(caption=None)] * 2
    assert all(d.keywords == () and d.caption is not None for d in zero)


def test_vit_gpt2_has_no_detector_and_says_nothing_more() -> None:
    model = FIXTURES / "models" / "vit-gpt2-tiny-greedy"
    with open_captioner(model, ModelConfig(precision="fp32")) as captioner:
        image = Image.new("RGB", (40, 30), (200, 10, 10))
        got = captioner.describe_batch([image], DescribeOptions(keywords=True, text=True))
        assert got == [ImageDescription(caption=captioner.caption_batch([image])[0])]


def test_options_from_config() -> None:
    config = Config(model=ModelConfig(keywords=False), metadata=MetadataConfig(max_keywords=4),
                    ocr=OcrConfig(engine="florence"))
    assert DescribeOptions.from_config(config) == DescribeOptions(keywords=False, max_keywords=4, text=True)
    assert DescribeOptions.from_config(Config(ocr=OcrConfig(engine="rapidocr"))).text is False
    assert DescribeOptions.from_config(Config()) == DescribeOptions(keywords=True, max_keywords=10, text=False)


def test_task_prompts_come_from_the_processor_config() -> None:
    config = json.loads((FIXTURE / "preprocessor_config.json").read_text())
    assert florence2.prompt_for_task(FIXTURE, OD_TASK) == config["task_prompts_without_inputs"][OD_TASK]
    assert florence2.prompt_for_task(FIXTURE, OCR_TASK) == "What is the text in the image?"


_PIECES = ["<s>", "</s>", "<pad>", "<od>", "</od>", "car", " traffic light", "Ünïcode", "\n", " ", "<", ">", "<loc_",
           "<loc_0>", "<loc_999>", "<loc_512>", "<loc_123456789012345678901234567890>", "<ground>", "<obj>"]


@given(st.lists(st.sampled_from(_PIECES), max_size=60), st.integers(1, 20000), st.integers(1, 20000))
@settings(max_examples=100, deadline=None)
def test_parser_takes_any_output(pieces: list[str], width: int, height: int) -> None:
    detections = parse_od("".join(pieces), (width, height))
    for d in detections:
        assert d.label.isascii() and d.label == d.label.strip()
        assert all(v >= 0 for v in d.box)
    keywords = keywords_from_detections(detections, 5)
    assert len(keywords) == len(set(keywords)) <= 5
