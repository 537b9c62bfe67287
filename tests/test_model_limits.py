"""A crafted model directory cannot crash capwatch: every JSON file goes through one size-capped, depth-limited
reader, and every generation and preprocessing setting is checked against sane bounds when the model is opened
(``capwatch models info DIR`` and ``capwatch --model DIR caption``): one line naming the file, the key and the
allowed range, exit 2, no traceback.

Each case tampers with a copy of a tiny fixture model (never the fixture itself).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from capwatch.config import ModelConfig
from capwatch.errors import ModelError
from capwatch.models.captioner import open_captioner
from capwatch.models.florence2 import task_prompt
from capwatch.models.generate import GenerationSettings, check_generation_keys
from capwatch.models.layout import (
    MAX_CONFIG_BYTES,
    MAX_JSON_DEPTH,
    MAX_TOKENIZER_BYTES,
    check_model_files,
    open_model_dir,
    read_json,
)
from capwatch.models.modelinfo import inspect_dir
from capwatch.models.preprocess import Preprocessor
from tests.conftest import FIXTURES, CliRunner, assert_one_line_error

MODELS = FIXTURES / "models"
GREEDY = MODELS / "vit-gpt2-tiny-greedy"  # decoder: 40 positions, vocabulary 400
FLORENCE = MODELS / "florence2-tiny"  # text_config: 256 positions, vocabulary 1717
IMAGE = FIXTURES / "images" / "blobs.jpg"

DEEP = '{"a":' * 100_000 + "1" + "}" * 100_000


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _set(path: Path, dotted: str, value: Any) -> None:
    """Set ``dotted`` (e.g. ``decoder.n_positions``) in the JSON file ``path``; NaN is written as JSON's NaN."""
    data = json.loads(path.read_text())
    node = data
    *parents, last = dotted.split(".")
    for name in parents:
        node = node[name]
    node[last] = value
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------------------------------------------
# The cases: (id, fixture, file, tamper, text the one-line error must contain besides the file path)

Tamper = Callable[[Path], None]


def _key(file: str, dotted: str, value: Any) -> Tamper:
    return lambda model: _set(model / file, dotted, value)


def _raw(file: str, text: str | bytes) -> Tamper:
    def tamper(model: Path) -> None:
        target = model / file
        if isinstance(text, bytes):
            target.write_bytes(text)
        else:
            target.write_text(text)
    return tamper


def _both(*tampers: Tamper) -> Tamper:
    def tamper(model: Path) -> None:
        for t in tampers:
            t(model)
    return tamper


def _sparse(file: str, size: int) -> Tamper:
    def tamper(model: Path) -> None:
        with open(model / file, "wb") as handle:
            handle.truncate(size)
    return tamper


GEN = "generation_config.json"
CFG = "config.json"
PRE = "preprocessor_config.json"

CASES: list[tuple[str, Path, str, Tamper, str]] = [
    # -- JSON that the reader refuses --------------------------------------------------------------------------
    ("config-deep", GREEDY, CFG, _raw(CFG, DEEP), "nested more than"),
    ("generation-deep", GREEDY, GEN, _raw(GEN, DEEP), "nested more than"),
    ("preprocessor-deep", GREEDY, PRE, _raw(PRE, DEEP), "nested more than"),
    ("config-nested-just-too-deep", GREEDY, CFG,
     _raw(CFG, '{"a":' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1)), "nested more than"),
    ("config-too-large", GREEDY, CFG, _raw(CFG, "{" + " " * MAX_CONFIG_BYTES + "}"), "too large"),
    ("config-array", GREEDY, CFG, _raw(CFG, "[1, 2]"), "expected a JSON object"),
    ("config-latin1", GREEDY, CFG, _raw(CFG, b'{"model_type": "vision-encoder-decoder\xe9"}'), "not UTF-8"),
    ("config-huge-integer", GREEDY, CFG, _raw(CFG, '{"a": ' + "9" * 5000 + "}"), "invalid JSON"),
    # -- generation_config.json ------------------------------------------------------------------------------
    ("max_new_tokens-1e9", GREEDY, GEN, _key(GEN, "max_new_tokens", 1e9), "max_new_tokens: expected an integer"),
    ("max_new_tokens-huge", GREEDY, GEN, _key(GEN, "max_new_tokens", 10**9), "max_new_tokens: expected an integer "
     "from 1 to 40, got 1000000000; the decoder has 40 positions"),
    ("max_length-huge", GREEDY, GEN, _key(GEN, "max_length", 10**9), "max_length: expected an integer from 1 to 41"),
    ("max_length-1e9", GREEDY, GEN, _key(GEN, "max_length", 1e9), "max_length: expected an integer, got 1000000000.0"),
    ("max_length-0", GREEDY, GEN, _key(GEN, "max_length", 0), "max_length: expected an integer from 1 to 41, got 0"),
    ("max_length-positions", GREEDY, GEN, _key(GEN, "max_length", 42), "from 1 to 41, got 42"),
    ("num_beams-1e6", GREEDY, GEN, _key(GEN, "num_beams", 1_000_000), "num_beams: expected an integer from 1 to 32"),
    ("num_beams-negative", GREEDY, GEN, _key(GEN, "num_beams", -3), "num_beams: expected an integer from 1 to 32"),
    ("num_beams-float", GREEDY, GEN, _key(GEN, "num_beams", 2.5), "num_beams: expected an integer, got 2.5"),
    ("num_beams-bool", GREEDY, GEN, _key(GEN, "num_beams", True), "num_beams: expected an integer, got True"),
    ("num_beams-string", GREEDY, GEN, _key(GEN, "num_beams", "4"), "num_beams: expected an integer, got '4'"),
    ("num_return_sequences", GREEDY, GEN, _both(_key(GEN, "num_beams", 2), _key(GEN, "num_return_sequences", 3)),
     "num_return_sequences: expected at most num_beams (2), got 3"),
    ("no_repeat_ngram_size", GREEDY, GEN, _key(GEN, "no_repeat_ngram_size", 10**6),
     "no_repeat_ngram_size: expected a non-negative integer from 0 to 16"),
    ("min_length-above-max", GREEDY, GEN, _both(_key(GEN, "max_length", 20), _key(GEN, "min_length", 30)),
     "min_length: expected at most max_length (20), got 30"),
    ("min_length-negative", GREEDY, GEN, _key(GEN, "min_length", -1), "min_length: expected a non-negative integer"),
    ("length_penalty-nan", GREEDY, GEN, _key(GEN, "length_penalty", float("nan")),
     "length_penalty: expected a finite number from -10 to 10, got nan"),
    ("length_penalty-inf", GREEDY, GEN, _key(GEN, "length_penalty", float("inf")), "length_penalty: expected a finite"),
    ("repetition_penalty-0", GREEDY, GEN, _key(GEN, "repetition_penalty", 0), "repetition_penalty: expected a "),
    ("early_stopping", GREEDY, GEN, _key(GEN, "early_stopping", "sometimes"), "early_stopping: expected true, false"),
    ("decoder_start_token_id", GREEDY, GEN, _key(GEN, "decoder_start_token_id", 400),
     "decoder_start_token_id: expected a non-negative integer from 0 to 399, got 400; the vocabulary has 400 tokens"),
    ("eos_token_id", GREEDY, GEN, _key(GEN, "eos_token_id", [0, 100_000]), "eos_token_id: expected a non-negative "
     "integer from 0 to 399, got 100000"),
    ("eos_token_id-too-many", GREEDY, GEN, _key(GEN, "eos_token_id", list(range(100))), "eos_token_id: expected a "
     "token id or a list of 0 to 32 token ids, got a list of 100"),
    ("bos_token_id", GREEDY, GEN, _key(GEN, "bos_token_id", -1), "bos_token_id: expected a non-negative integer"),
    ("pad_token_id", GREEDY, GEN, _key(GEN, "pad_token_id", 99_999), "pad_token_id: expected a non-negative integer"),
    ("pad_token_id-list", GREEDY, GEN, _key(GEN, "pad_token_id", [1]), "pad_token_id: expected an integer, got [1]"),
    ("forced_bos_token_id", GREEDY, GEN, _key(GEN, "forced_bos_token_id", 400), "forced_bos_token_id: expected a "
     "non-negative integer from 0 to 399"),
    ("forced_eos_token_id", GREEDY, GEN, _key(GEN, "forced_eos_token_id", 1e9), "forced_eos_token_id: expected an "
     "integer, got 1000000000.0 (allowed: 0 to 399)"),
    ("decoder_start_token_id-empty-list", GREEDY, GEN, _key(GEN, "decoder_start_token_id", []),
     "decoder_start_token_id: expected a token id or a list of 1 to 32 token ids, got a list of 0"),
    # -- config.json (architecture and legacy generation keys) -----------------------------------------------
    ("config-n_positions-0", GREEDY, CFG, _key(CFG, "decoder.n_positions", 0), "decoder.n_positions: expected an "
     "integer from 1 to 1048576, got 0"),
    ("config-vocab_size-string", GREEDY, CFG, _key(CFG, "decoder.vocab_size", "big"), "decoder.vocab_size: expected "
     "an integer, got 'big'"),
    ("config-n_head-nan", GREEDY, CFG, _key(CFG, "decoder.n_head", float("nan")), "decoder.n_head: expected an "
     "integer, got nan"),
    ("config-decoder-not-object", GREEDY, CFG, _key(CFG, "decoder", "gpt2"), "decoder: expected an object"),
    ("config-legacy-max_length", GREEDY, CFG, _key(CFG, "decoder.max_length", 10**6), "decoder.max_length: expected "
     "an integer from 1 to 41"),
    ("config-decoder_start_token_id", GREEDY, CFG, _key(CFG, "decoder_start_token_id", 5000),
     "decoder_start_token_id: expected a non-negative integer from 0 to 399"),
    ("florence-max_length", FLORENCE, GEN, _key(GEN, "max_length", 1000), "max_length: expected an integer from 1 "
     "to 257, got 1000; the decoder has 256 positions"),
    ("florence-forced_bos", FLORENCE, GEN, _key(GEN, "forced_bos_token_id", 1717), "forced_bos_token_id: expected a "
     "non-negative integer from 0 to 1716"),
    ("florence-text_config-eos", FLORENCE, CFG, _key(CFG, "text_config.eos_token_id", -2), "text_config.eos_token_id:"),
    ("florence-text_config-positions", FLORENCE, CFG, _key(CFG, "text_config.max_position_embeddings", 1e9),
     "text_config.max_position_embeddings: expected an integer, got 1000000000.0"),
    # -- preprocessor_config.json ----------------------------------------------------------------------------
    ("size-0", GREEDY, PRE, _key(PRE, "size", {"height": 0, "width": 48}), "size.height: expected an integer from 1 "
     "to 4096, got 0"),
    ("size-negative", GREEDY, PRE, _key(PRE, "size", {"height": 48, "width": -48}), "size.width: expected an integer "
     "from 1 to 4096, got -48"),
    ("size-1e9", GREEDY, PRE, _key(PRE, "size", 10**9), "size: expected an integer from 1 to 4096, got 1000000000"),
    ("size-float", GREEDY, PRE, _key(PRE, "size", {"height": 1e9, "width": 48}), "size.height: expected an integer"),
    ("size-shortest_edge", GREEDY, PRE, _key(PRE, "size", {"shortest_edge": 10**6}), "size.shortest_edge: expected "
     "an integer from 1 to 4096"),
    ("size-shape", GREEDY, PRE, _key(PRE, "size", [48, 48]), "size: expected {height, width} or {shortest_edge}"),
    ("crop_size-0", FLORENCE, PRE, _key(PRE, "crop_size", {"height": 0, "width": 0}), "crop_size.height: expected "
     "an integer from 1 to 4096"),
    ("crop_size-no-width", FLORENCE, PRE, _key(PRE, "crop_size", {"height": 64}), "crop_size: expected"),
    ("image_size-florence-1e9", FLORENCE, PRE, _key(PRE, "size", {"height": 10**9, "width": 10**9}),
     "size.height: expected an integer from 1 to 4096"),
    ("image_mean-length", GREEDY, PRE, _key(PRE, "image_mean", [0.5, 0.5]), "image_mean: expected 3 numbers"),
    ("image_std-zero", GREEDY, PRE, _key(PRE, "image_std", [0.0, 0.5, 0.5]), "image_std.0: expected a number from "
     "0.001 to 255, got 0.0"),
    ("image_std-scalar-zero", GREEDY, PRE, _key(PRE, "image_std", 0), "image_std.0: expected a number from 0.001"),
    ("rescale_factor-nan", GREEDY, PRE, _key(PRE, "rescale_factor", float("nan")), "rescale_factor: expected a finite "
     "number"),
    ("rescale_factor-0", GREEDY, PRE, _key(PRE, "rescale_factor", 0), "rescale_factor: expected a number from "
     "1e-06 to 1, got 0"),
    ("do_normalize-string", GREEDY, PRE, _key(PRE, "do_normalize", "false"), "do_normalize: expected true or false"),
    ("resample", GREEDY, PRE, _key(PRE, "resample", 42), "resample: unknown PIL filter 42"),
]


def _tampered(tmp_path: Path, case: tuple[str, Path, str, Tamper, str]) -> tuple[Path, Path, str]:
    _name, fixture, file, tamper, expected = case
    model = _copy(fixture, tmp_path)
    tamper(model)
    return model, model / file, expected


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_open_model_dir_and_inspect_dir_refuse_with_one_line(tmp_path: Path, case: Any) -> None:
    model, file, expected = _tampered(tmp_path, case)
    for opener in (open_model_dir, inspect_dir):
        with pytest.raises(ModelError) as info:
            opener(model)
        message = str(info.value)
        assert "\n" not in message and len(message) < 300, message
        assert message.startswith(f"{file}: "), message
        assert expected in message, message


# The CLI cases: one of every kind (the table above covers every key in-process).
CLI_CASES = [c for c in CASES if c[0] in {
    "config-deep", "generation-deep", "preprocessor-deep", "config-too-large", "config-array", "config-huge-integer",
    "max_new_tokens-1e9", "max_length-huge", "num_beams-1e6", "num_beams-negative", "num_beams-float",
    "num_beams-bool", "num_beams-string", "no_repeat_ngram_size", "min_length-above-max", "length_penalty-nan",
    "decoder_start_token_id", "eos_token_id", "bos_token_id", "pad_token_id", "forced_bos_token_id",
    "forced_eos_token_id", "config-n_positions-0", "config-legacy-max_length", "florence-max_length", "size-0",
    "size-negative", "size-1e9", "crop_size-0", "image_mean-length", "image_std-zero", "rescale_factor-nan",
}]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_models_info_and_caption_refuse_with_one_line(run_cli: CliRunner, tmp_path: Path, case: Any) -> None:
    model, file, expected = _tampered(tmp_path, case)
    for args in (("models", "info", model), ("--db", tmp_path / "index.db", "--model", model, "caption", IMAGE)):
        line = assert_one_line_error(run_cli(*args))
        assert line.startswith("capwatch: error: "), line
        assert f"{file}: " in line and expected in line, line


# --------------------------------------------------------------------------------------------------------------
# The tokenizer: read by the tokenizers library for captioning, by Python for `models info`


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 10, 100_000])
def test_deeply_nested_tokenizer_json_is_one_line_for_info_and_caption(
    run_cli: CliRunner, tmp_path: Path, depth: int
) -> None:
    model = _copy(GREEDY, tmp_path)
    path = model / "tokenizer.json"
    # A real tokenizer whose normalizer is a Sequence of Sequences ...: the shape the tokenizers library accepts.
    text = path.read_text().replace('"normalizer": null', '"normalizer": ' + '{"type": "Sequence", "normalizers": ['
                                    * depth + '{"type": "Lowercase"}' + "]}" * depth)
    assert text != path.read_text()
    path.write_text(text)
    line = assert_one_line_error(run_cli("models", "info", model))
    assert f"{path}: invalid JSON: nested more than {MAX_JSON_DEPTH} levels deep" in line
    line = assert_one_line_error(run_cli("--db", tmp_path / "i.db", "--model", model, "caption", IMAGE))
    assert f"{path}: cannot load the tokenizer" in line and "recursion limit exceeded" in line


def test_huge_tokenizer_json_is_refused_before_parsing(run_cli: CliRunner, tmp_path: Path) -> None:
    model = _copy(GREEDY, tmp_path)
    _sparse("tokenizer.json", MAX_TOKENIZER_BYTES + 1)(model)  # sparse: no disk space used
    for args in (("models", "info", model), ("--db", tmp_path / "i.db", "--model", model, "caption", IMAGE)):
        line = assert_one_line_error(run_cli(*args))
        assert f"{model / 'tokenizer.json'}: too large" in line, line


def test_huge_vocab_json_is_refused(tmp_path: Path) -> None:
    model = _copy(GREEDY, tmp_path)
    (model / "tokenizer.json").unlink()  # so vocab.json + merges.txt are used
    _sparse("vocab.json", MAX_TOKENIZER_BYTES + 1)(model)
    with pytest.raises(ModelError, match=r"vocab\.json: too large"):
        open_captioner(model, ModelConfig(dir=model, precision="fp32"))


def test_the_tokenizer_read_through_the_cap_still_decodes_as_before(tmp_path: Path) -> None:
    with open_captioner(GREEDY, ModelConfig(dir=GREEDY, precision="fp32", threads=1)) as cap:
        ids = cap.text.encode("a photo")
        assert ids and cap.text.decode(ids) == "a photo"


# --------------------------------------------------------------------------------------------------------------
# The reader itself


def test_read_json_does_not_block_on_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    outcome: list[BaseException | dict[str, Any]] = []

    def read() -> None:
        try:
            outcome.append(read_json(fifo))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock the reader so the test process can end
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("read_json blocked on a FIFO")
    assert isinstance(outcome[0], ModelError) and "not a regular file" in str(outcome[0])


def test_read_json_accepts_nesting_up_to_the_limit_and_missing_optional_files(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"a":' * (MAX_JSON_DEPTH - 1) + "1" + "}" * (MAX_JSON_DEPTH - 1))
    assert read_json(path)["a"]
    assert read_json(tmp_path / "absent.json", required=False) == {}
    with pytest.raises(ModelError, match=r"missing absent\.json"):
        read_json(tmp_path / "absent.json")
    path.write_text('{"a": 1}' + " " * 100)
    with pytest.raises(ModelError, match="too large"):
        read_json(path, max_bytes=50)


def test_processor_config_prompt_table_goes_through_the_reader(tmp_path: Path) -> None:
    model = _copy(FLORENCE, tmp_path)
    (model / "processor_config.json").write_text(DEEP)
    with pytest.raises(ModelError, match=r"processor_config\.json: invalid JSON: nested"):
        task_prompt(model, "short")
    (model / "processor_config.json").write_text(json.dumps(
        {"task_prompts_without_inputs": {"<CAPTION>": "describe " * 1000}}))
    with pytest.raises(ModelError, match=r"task_prompts_without_inputs\.<CAPTION>: expected at most 1000 characters"):
        task_prompt(model, "short")


# --------------------------------------------------------------------------------------------------------------
# The validator on its own: real models' values pass, bad ones are named (table-driven)

VIT_GPT2_REAL: dict[str, Any] = {  # nlpconnect / Xenova vit-gpt2-image-captioning
    "config": {"model_type": "vision-encoder-decoder", "decoder_start_token_id": 50256, "eos_token_id": 50256,
               "pad_token_id": 50256,
               "decoder": {"n_positions": 1024, "vocab_size": 50257, "n_head": 12, "n_embd": 768, "max_length": 20,
                           "min_length": 0, "num_beams": 1, "no_repeat_ngram_size": 0, "length_penalty": 1.0,
                           "early_stopping": False, "bos_token_id": 50256, "eos_token_id": 50256}},
    "generation": {"bos_token_id": 50256, "decoder_start_token_id": 50256, "eos_token_id": 50256,
                   "pad_token_id": 50256, "max_length": 16, "num_beams": 4},
    "preprocessor": {"image_processor_type": "ViTImageProcessor", "size": {"height": 224, "width": 224},
                     "do_resize": True, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
                     "image_std": [0.5, 0.5, 0.5], "resample": 2, "rescale_factor": 1 / 255},
}
FLORENCE_REAL: dict[str, Any] = {  # onnx-community/Florence-2-base-ft
    "config": {"model_type": "florence2", "vocab_size": 51289, "bos_token_id": 0, "eos_token_id": 2,
               "pad_token_id": 1,
               "text_config": {"vocab_size": 51289, "max_position_embeddings": 1024, "d_model": 768,
                               "decoder_attention_heads": 12, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                               "decoder_start_token_id": 2, "forced_eos_token_id": 2, "max_length": 20,
                               "no_repeat_ngram_size": 3, "num_beams": 3}},
    "generation": {"bos_token_id": 0, "decoder_start_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
                   "forced_bos_token_id": 0, "forced_eos_token_id": 2, "max_length": 1025, "num_beams": 3,
                   "no_repeat_ngram_size": 3, "early_stopping": True},
    "preprocessor": {"image_processor_type": "CLIPImageProcessor", "size": {"height": 768, "width": 768},
                     "crop_size": {"height": 768, "width": 768}, "do_center_crop": False, "resample": 3,
                     "rescale_factor": 0.00392156862745098, "image_mean": [0.485, 0.456, 0.406],
                     "image_std": [0.229, 0.224, 0.225]},
}


@pytest.mark.parametrize("real", [VIT_GPT2_REAL, FLORENCE_REAL], ids=["vit-gpt2", "florence-2"])
def test_real_models_values_pass(tmp_path: Path, real: dict[str, Any]) -> None:
    check_model_files(tmp_path, real["config"], real["generation"], real["preprocessor"])
    check_model_files(tmp_path, real["config"], {}, {})  # legacy: generation keys only in config.json


@pytest.mark.parametrize("fixture", sorted(p for p in MODELS.iterdir() if p.is_dir()), ids=lambda p: p.name)
def test_fixture_models_pass(fixture: Path) -> None:
    from capwatch.models.marian import Translator, is_translation_dir

    if is_translation_dir(fixture):
        Translator(fixture)  # a translation model has no image preprocessor: its own opener checks it
    else:
        open_model_dir(fixture)
    inspect_dir(fixture)


GENERATION_TABLE: list[tuple[dict[str, Any], int | None, int | None, str | None]] = [
    # (keys, max_positions, vocab_size, expected message or None when valid)
    ({"max_length": 1025}, 1024, None, None),  # Florence-2: max_length = positions + 1
    ({"max_length": 1026}, 1024, None, "max_length: expected an integer from 1 to 1025, got 1026"),
    ({"max_new_tokens": 1024}, 1024, None, None),
    ({"max_new_tokens": 1025}, 1024, None, "max_new_tokens: expected an integer from 1 to 1024"),
    ({"max_length": 4097}, None, None, None),  # positions unknown: 4096 new tokens at most
    ({"max_length": 4098}, None, None, "max_length: expected an integer from 1 to 4097"),
    ({"max_length": 10**6}, 10**6, None, "max_length: expected an integer from 1 to 4097"),  # never past 4096 new
    ({"max_new_tokens": 0}, None, None, "max_new_tokens: expected an integer from 1 to 4096, got 0"),
    ({"num_beams": 32, "num_return_sequences": 32}, None, None, None),
    ({"num_beams": 33}, None, None, "num_beams: expected an integer from 1 to 32, got 33"),
    ({"num_beams": 0}, None, None, "num_beams: expected an integer from 1 to 32, got 0"),
    ({"no_repeat_ngram_size": 16}, None, None, None),
    ({"no_repeat_ngram_size": 17}, None, None, "no_repeat_ngram_size: expected a non-negative integer from 0 to 16"),
    ({"length_penalty": -10.0, "repetition_penalty": 100}, None, None, None),
    ({"length_penalty": 10.5}, None, None, "length_penalty: expected a number from -10 to 10, got 10.5"),
    ({"min_length": 5, "max_length": 5}, None, None, None),
    ({"min_new_tokens": 6, "max_new_tokens": 5}, None, None, "min_new_tokens: expected at most max_new_tokens (5)"),
    ({"early_stopping": "never"}, None, None, None),
    ({"early_stopping": 1}, None, None, "early_stopping: expected true, false or \"never\", got 1"),
    ({"eos_token_id": [], "pad_token_id": 0}, None, 10, None),
    ({"eos_token_id": [9, 10]}, None, 10, "eos_token_id: expected a non-negative integer from 0 to 9, got 10"),
    ({"decoder_start_token_id": [3]}, None, 10, None),
    ({"forced_bos_token_id": 2**40}, None, None, "forced_bos_token_id: expected a non-negative integer from 0 to "
     "4194303"),
    ({"max_length": None, "num_beams": None, "eos_token_id": None}, 8, 8, None),  # null = unset
    ({"temperature": "hot", "top_k": -1}, None, None, None),  # keys capwatch does not use are not its business
]


@pytest.mark.parametrize(("keys", "positions", "vocab", "expected"), GENERATION_TABLE)
def test_check_generation_keys_table(
    keys: dict[str, Any], positions: int | None, vocab: int | None, expected: str | None
) -> None:
    if expected is None:
        check_generation_keys(keys, max_positions=positions, vocab_size=vocab)
        return
    with pytest.raises(ValueError) as info:
        check_generation_keys(keys, max_positions=positions, vocab_size=vocab, prefix="text_config.")
    assert str(info.value).startswith("text_config.") and expected in str(info.value), str(info.value)


PREPROCESSOR_TABLE: list[tuple[dict[str, Any], str | None]] = [
    ({"size": {"height": 4096, "width": 1}}, None),
    ({"size": 768, "crop_size": 768, "do_center_crop": True}, None),
    ({"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}, None),
    ({"image_mean": 0.5, "image_std": 0.001, "rescale_factor": 1}, None),
    ({"size": None, "crop_size": None, "do_center_crop": None, "resample": None, "image_std": None}, None),
    ({"size": {"height": 4097, "width": 8}}, "size.height: expected an integer from 1 to 4096, got 4097"),
    ({"size": True}, "size: expected {height, width} or {shortest_edge}, got True"),
    ({"crop_size": "768"}, "crop_size: expected {height, width} or an integer, got '768'"),
    ({"image_mean": [0.5, 0.5, 300]}, "image_mean.2: expected a number from -255 to 255, got 300"),
    ({"image_mean": "gray"}, "image_mean: expected 3 numbers (one per RGB channel), got 'gray'"),
    ({"image_std": [0.5, 0.5, float("inf")]}, "image_std.2: expected a finite number from 0.001 to 255, got inf"),
    ({"rescale_factor": 2}, "rescale_factor: expected a number from 1e-06 to 1, got 2"),
    ({"rescale_factor": "1/255"}, "rescale_factor: expected a number, got '1/255'"),
    ({"do_resize": 1}, "do_resize: expected true or false, got 1"),
    ({"resample": True}, "resample: unknown PIL filter True"),
]


@pytest.mark.parametrize(("keys", "expected"), PREPROCESSOR_TABLE)
def test_preprocessor_from_config_table(keys: dict[str, Any], expected: str | None) -> None:
    if expected is None:
        Preprocessor.from_config(keys)
        return
    with pytest.raises(ValueError) as info:
        Preprocessor.from_config(keys)
    assert expected in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------------------------------
# Merged settings: capwatch's own overrides against the model


def test_merged_min_length_above_max_length_is_a_model_error(tmp_path: Path) -> None:
    config = ModelConfig(dir=FLORENCE, precision="fp32", min_length=100)  # the model says max_length 24
    with pytest.raises(ModelError) as info:
        open_captioner(FLORENCE, config)
    assert str(info.value) == f"{FLORENCE}: generation settings: min_length: expected at most max_length (24), got 100"


def test_florence_min_length_is_checked_against_the_budget_that_applies(tmp_path: Path) -> None:
    # Without a length in its configs, a paragraph gets 512 new tokens: min_length 100 fits that budget (and must not
    # be compared with transformers' implicit max_length of 20 first).
    model = _copy(FLORENCE, tmp_path)
    data = json.loads((model / GEN).read_text())
    del data["max_length"]
    (model / GEN).write_text(json.dumps(data))
    config = ModelConfig(dir=model, precision="fp32", min_length=100, caption_length="paragraph")
    with open_captioner(model, config) as cap:
        assert (cap.settings.min_length, cap.settings.max_length) == (100, 513)


def test_generation_settings_refuse_what_the_files_would(tmp_path: Path) -> None:
    base = GenerationSettings.from_configs({"decoder_start_token_id": 0}, {}, ModelConfig())
    cases: list[tuple[dict[str, Any], str]] = [
        ({"num_beams": 10**6}, "num_beams: expected an integer from 1 to 32"),
        ({"max_length": 10**9}, "max_length: expected an integer from 1 to 4097"),
        ({"length_penalty": float("nan")}, "length_penalty: expected a finite number"),
        ({"pad_token_id": -1}, "pad_token_id: expected a non-negative integer"),
        ({"min_length": 30, "max_length": 20}, r"min_length: expected at most max_length \(20\)"),
    ]
    for change, expected in cases:
        with pytest.raises(ValueError, match=expected):
            dataclasses.replace(base, **change)
    with pytest.raises(ValueError, match="invalid generation setting"):
        GenerationSettings.from_configs({"decoder_start_token_id": 0, "max_length": float("inf")}, {}, ModelConfig())


def test_a_length_budget_beyond_the_decoder_positions_is_cut_not_run_into_the_graph() -> None:
    # The decoder has 40 positions. Without the cut, step 41 feeds position 40 and onnxruntime fails (Gather index
    # out of range); min_length keeps EOS banned so generation really goes that far.
    with open_captioner(GREEDY, ModelConfig(dir=GREEDY, precision="fp32", threads=1, max_new_tokens=4096)) as cap:
        pixels = cap.preprocess_file(IMAGE)[None]
        asked = dataclasses.replace(cap.settings, min_length=200, max_length=300, max_new_tokens=None)
        result = cap.caption_pixels(pixels, settings=asked)[0]
        assert len(result.token_ids) == 41  # the start token and 40 generated
        assert len(cap.caption_pixels(np.repeat(pixels, 2, axis=0))[0].token_ids) <= 41


def test_cli_caption_with_max_new_tokens_beyond_the_model_runs(run_cli: CliRunner, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[model]\nmax_new_tokens = 4096\nmin_length = 4000\n")
    result = run_cli("--config", config, "--model", GREEDY, "caption", "--dry-run", "--json", IMAGE)
    assert result.code == 0 and "Traceback" not in result.err, result.err
    assert json.loads(result.out.splitlines()[0])["caption"]


def test_config_without_generation_config_is_checked_as_legacy_keys(tmp_path: Path) -> None:
    model = _copy(GREEDY, tmp_path)
    (model / GEN).unlink()
    _set(model / CFG, "decoder.num_beams", 64)
    with pytest.raises(ModelError, match=r"config\.json: decoder\.num_beams: expected an integer from 1 to 32"):
        open_model_dir(model)
    _set(model / CFG, "decoder.num_beams", 4)
    open_model_dir(model)
