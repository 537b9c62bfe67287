"""Marian translation (capwatch.models.marian): token parity with transformers' MarianMTModel.generate() and
MarianTokenizer on the tiny fixture, onnxruntime only.

tests/fixtures/models/marian-tiny-en-xx was built by tools/fixtures_marian.py (transformers 4.57.6): a random tiny
MarianMTModel exported by optimum (text2text-generation-with-past), a tokenizer.json converted as transformers.js does,
and goldens.json with MarianTokenizer's source ids and generate()'s ids and decoded text for several settings.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from capwatch.errors import ModelError
from capwatch.models.marian import Translator, load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "models" / "marian-tiny-en-xx"
GOLDENS: dict[str, Any] = json.loads((FIXTURE / "goldens.json").read_text(encoding="utf-8"))
ROWS: list[dict[str, Any]] = GOLDENS["rows"]


@pytest.fixture(scope="module")
def translator() -> Translator:
    return Translator(FIXTURE, precision="fp32", idle_unload_seconds=0)


def test_source_ids_equal_marian_tokenizer(translator: Translator) -> None:
    for row in ROWS:
        assert translator.encode(row["source"]) == row["source_ids"], row["source"]
        assert row["source_ids"][-1] == 0  # </s>


@pytest.mark.parametrize("name", list(GOLDENS["settings"]))
def test_translation_ids_equal_transformers_generate(translator: Translator, name: str) -> None:
    settings = dataclasses.replace(translator.settings, **GOLDENS["settings"][name])
    for row in ROWS:
        ids = translator.generate_ids([row["source_ids"]], settings)[0]
        assert ids == row["outputs"][name]["ids"], (row["source"], name)
        assert translator.decode(ids) == row["outputs"][name]["text"]


def test_model_settings_come_from_generation_config(translator: Translator) -> None:
    s = translator.settings
    assert s.num_beams == 4 and s.bad_words_ids == ((148,),) and s.decoder_start_token_id == 148
    assert [t.token_ids for t in translator.translate([r["source"] for r in ROWS])] == [
        tuple(r["outputs"]["model"]["ids"]) for r in ROWS]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_translations_equal_one_at_a_time(batch_size: int) -> None:
    translator = Translator(FIXTURE, precision="fp32", idle_unload_seconds=0, batch_size=batch_size)
    got = translator.translate([r["source"] for r in ROWS])
    assert [t.text for t in got] == [r["outputs"]["model"]["text"] for r in ROWS]


def test_empty_text_translates_to_empty_without_the_model(translator: Translator) -> None:
    out = translator.translate(["", "   ", ROWS[0]["source"]])
    assert out[0].text == "" and out[1].text == "" and out[2].text == ROWS[0]["outputs"]["model"]["text"]


def test_int8_variant_translates_with_the_same_engine() -> None:
    translator = Translator(FIXTURE, precision="int8", idle_unload_seconds=0)
    assert translator.precision == "int8"
    out = translator.translate([r["source"] for r in ROWS])
    assert all(t.token_ids[0] == 148 and t.token_ids[-1] == 0 for t in out)


def test_published_tokenizer_json_loads_despite_null_precompiled_charsmap() -> None:
    raw = (FIXTURE / "tokenizer.json").read_text(encoding="utf-8")
    assert json.loads(raw)["normalizer"] == {"type": "Precompiled", "precompiled_charsmap": None}
    with pytest.raises(BaseException):  # noqa: B017 - the tokenizers library panics on the published file
        Tokenizer.from_str(raw)
    tokenizer = load_tokenizer(FIXTURE / "tokenizer.json")
    assert tokenizer.encode("A dog").ids[-1] == 0


def test_tokenizer_json_unk_id_is_pointed_at_unk() -> None:
    assert json.loads((FIXTURE / "tokenizer.json").read_text(encoding="utf-8"))["model"]["unk_id"] == 2
    tokenizer = load_tokenizer(FIXTURE / "tokenizer.json")
    encoded = tokenizer.encode("\u2603")  # a snowman: in no vocabulary
    assert encoded.tokens[-2:] == ["\u2603", "</s>"] and encoded.ids[-2:] == [1, 0]  # <unk> is 1, not 2


def test_without_source_spm_tokenizer_json_encodes(tmp_path: Path) -> None:
    copy = tmp_path / "marian"
    shutil.copytree(FIXTURE, copy, ignore=shutil.ignore_patterns("source.spm", "goldens.json"))
    translator = Translator(copy, precision="fp32", idle_unload_seconds=0)
    assert translator.encode(ROWS[0]["source"]) == ROWS[0]["source_ids"]  # same pieces for this sentence
    assert translator.translate([ROWS[0]["source"]])[0].text == ROWS[0]["outputs"]["model"]["text"]


def test_not_a_marian_directory_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        Translator(tmp_path / "missing")
    other = tmp_path / "other"
    shutil.copytree(FIXTURE, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "bart"}))
    with pytest.raises(ModelError, match="not a Marian"):
        Translator(other)
    (other / "config.json").write_text(json.dumps(config))
    (other / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="tokenizer"):
        Translator(other)


def test_a_damaged_source_spm_is_one_line_error(tmp_path: Path) -> None:
    copy = tmp_path / "marian"
    shutil.copytree(FIXTURE, copy, ignore=shutil.ignore_patterns("goldens.json"))
    (copy / "source.spm").write_bytes(b"\x0a\xff\xff\xff\xff\x0f garbage")
    with pytest.raises(ModelError, match=r"source\.spm: not a SentencePiece model") as info:
        Translator(copy)
    assert "\n" not in str(info.value)


def test_spm_reader_gives_the_pieces_and_normalizer_of_the_model() -> None:
    from capwatch.models.spm import UNKNOWN, parse_spm

    model = parse_spm((FIXTURE / "source.spm").read_bytes())
    assert model.pieces[model.unk_id][0] == "<unk>" and model.pieces[model.unk_id][2] == UNKNOWN
    assert model.charsmap and model.add_dummy_prefix and model.remove_extra_whitespaces
    vocab = json.loads((FIXTURE / "vocab.json").read_text(encoding="utf-8"))
    assert all(piece in vocab for piece, _score, kind in model.pieces if kind == 1)
