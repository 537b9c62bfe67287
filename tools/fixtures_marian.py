"""Build the tiny random Marian (opus-mt) translation fixture and transformers' goldens.

Usage::

    python tools/fixtures_marian.py [OUT_DIR]        # default: tests/fixtures/models

What it writes to ``OUT_DIR/marian-tiny-en-xx``, in the layout the Xenova/opus-mt-* repositories publish:

* ``source.spm`` / ``target.spm`` (two SentencePiece unigram models trained here on a few English and German
  sentences, as Helsinki-NLP's models have), ``vocab.json`` (the joint vocabulary: ``</s>`` = 0, ``<unk>`` = 1, the
  pieces of both, ``<pad>`` last), ``tokenizer_config.json``: transformers' ``MarianTokenizer`` reads these;
* ``tokenizer.json``: built from them exactly as transformers.js's ``scripts/extra/marian.py`` converts a Marian
  tokenizer (Unigram over the joint vocabulary, each piece scored with the higher of its two SentencePiece scores,
  ``Precompiled`` normalizer with a null charsmap, ``unk_id`` 2, ``</s>`` appended);
* ``config.json`` (``MarianConfig``: d_model 16, 2+2 layers, sinusoidal positions, scale_embedding, shared
  embeddings, an untied lm_head, a random ``final_logits_bias``), ``generation_config.json`` (as opus-mt-en-de's:
  bad_words_ids [[pad]], decoder start = pad, num_beams 4, with a short max_length);
* ``onnx/encoder_model.onnx`` and ``onnx/decoder_model_merged.onnx`` (optimum ``main_export``, task
  ``text2text-generation-with-past``) and their ``_quantized`` int8 variants (``quantize_dynamic`` with
  ``EnableSubgraph``, as the published ones);
* ``goldens.json``: for English sentences, ``MarianTokenizer``'s source ids, and per generation setting
  ``MarianMTModel.generate()``'s token ids and ``decode(skip_special_tokens=True)`` text.

Only tools/ and bench/ import torch/transformers/sentencepiece; the tests need onnxruntime alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from optimum.exporters.onnx import main_export
from transformers import GenerationConfig, MarianConfig, MarianMTModel, MarianTokenizer

REPO = Path(__file__).resolve().parent.parent
NAME = "marian-tiny-en-xx"

ENGLISH = [
    "A dog running on the beach.", "Two people sitting on a bench in a park.", "A red car parked on the street.",
    "A cat sleeping on a bed.", "A group of people standing in front of a building.", "A plate of food on a table.",
    "A man riding a bicycle down the road.", "A bird sitting on a branch of a tree.", "A boat on the water at sunset.",
    "A woman holding an umbrella in the rain.", "Snow covered mountains under a blue sky.",
    "A child playing with a ball in the garden.", "A close up of a flower.", "An old church in a small town.",
    "A train at the station.", "Houses along a river with bridges.", "The dog is brown and white.",
]
GERMAN = [
    "Ein Hund rennt am Strand.", "Zwei Menschen sitzen auf einer Bank im Park.", "Ein rotes Auto parkt auf der Straße.",
    "Eine Katze schläft auf einem Bett.", "Eine Gruppe von Menschen steht vor einem Gebäude.",
    "Ein Teller mit Essen auf einem Tisch.", "Ein Mann fährt mit dem Fahrrad die Straße entlang.",
    "Ein Vogel sitzt auf einem Ast eines Baumes.", "Ein Boot auf dem Wasser bei Sonnenuntergang.",
    "Eine Frau hält einen Regenschirm im Regen.", "Schneebedeckte Berge unter einem blauen Himmel.",
    "Ein Kind spielt mit einem Ball im Garten.", "Eine Nahaufnahme einer Blume.",
    "Eine alte Kirche in einer Kleinstadt.",
    "Ein Zug am Bahnhof.", "Häuser an einem Fluss mit Brücken.", "Der Hund ist braun und weiß.",
]
#: Sentences whose translations are the goldens: seen and unseen words, punctuation, digits, an accent, a word the
#: source model never saw (unknown pieces).
SOURCES = [
    "A dog running on the beach.", "Two cats sitting on a red bench", "A close up of a flower in the garden.",
    "People walking in the rain, 3 umbrellas.", "A café by the river", "Zebra", "A xylophone quokka!",
]
#: Generation settings the goldens cover (on top of the model's generation_config.json).
SETTINGS: Mapping[str, Mapping[str, Any]] = {
    "model": {},
    "greedy": {"num_beams": 1},
    "beam2": {"num_beams": 2},
    "beam4-ngram2": {"num_beams": 4, "no_repeat_ngram_size": 2},
    "greedy-ngram3": {"num_beams": 1, "no_repeat_ngram_size": 3},
    "beam3-max6": {"num_beams": 3, "max_length": 6},
    "greedy-max4": {"num_beams": 1, "max_length": 4},
}


def _train_spm(lines: Sequence[str], prefix: Path, size: int) -> None:
    corpus = prefix.with_suffix(".txt")
    corpus.write_text("\n".join(lines * 4) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=size, model_type="unigram",
                                   character_coverage=1.0, bos_id=-1, eos_id=2, unk_id=1, pad_id=-1,
                                   hard_vocab_limit=False)


def _tokenizer_json(tokenizer: MarianTokenizer, vocab: Mapping[str, int]) -> dict[str, Any]:
    """transformers.js's conversion of a Marian tokenizer (scripts/extra/marian.py), rewritten here."""
    specials = list(tokenizer.all_special_tokens)
    added = [{"id": vocab[t], "special": True, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False} for t in specials]
    src = {tokenizer.spm_source.IdToPiece(i): tokenizer.spm_source.GetScore(i)
           for i in range(tokenizer.spm_source.GetPieceSize())}
    tgt = {tokenizer.spm_target.IdToPiece(i): tokenizer.spm_target.GetScore(i)
           for i in range(tokenizer.spm_target.GetPieceSize())}
    eos = tokenizer.eos_token
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Precompiled", "precompiled_charsmap": None},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"}, {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}}],
            "special_tokens": {eos: {"id": eos, "ids": [tokenizer.eos_token_id], "tokens": [eos]}},
        },
        "decoder": {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True},
        # transformers.js writes unk_id 2 whatever the vocabulary (Helsinki-NLP's <unk> is 1): copied as published.
        "model": {"type": "Unigram", "unk_id": 2, "vocab": [
            [k, 0.0 if k in specials else max(src.get(k, -100), tgt.get(k, -100))] for k in vocab]},
    }


def build(out_dir: Path, *, d_model: int = 16, layers: int = 2, heads: int = 2, ffn: int = 32,
          max_length: int = 12, seed: int = 0) -> Path:
    """Write the fixture directory ``out_dir / NAME``; returns it."""
    target = out_dir / NAME
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        _train_spm(ENGLISH, tmp / "source", 90)
        _train_spm(GERMAN, tmp / "target", 100)
        shutil.copy(tmp / "source.model", target / "source.spm")
        shutil.copy(tmp / "target.model", target / "target.spm")
        vocab = _joint_vocab(target / "source.spm", target / "target.spm")
        (target / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
        tokenizer = MarianTokenizer(vocab=str(target / "vocab.json"), source_spm=str(target / "source.spm"),
                                    target_spm=str(target / "target.spm"), source_lang="en", target_lang="xx")
        tokenizer.save_pretrained(target)
        (target / "tokenizer.json").write_text(json.dumps(_tokenizer_json(tokenizer, vocab), ensure_ascii=False),
                                               encoding="utf-8")
        pad = vocab["<pad>"]
        torch.manual_seed(seed)
        config = MarianConfig(
            vocab_size=len(vocab), decoder_vocab_size=len(vocab), d_model=d_model, encoder_layers=layers,
            decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
            encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=64, pad_token_id=pad, eos_token_id=0,
            decoder_start_token_id=pad, forced_eos_token_id=0, scale_embedding=True,
            share_encoder_decoder_embeddings=True, activation_function="swish", dropout=0.1,
            # Wider weights and an lm_head of its own: with the real models' tiny init and tied embeddings a random
            # model repeats one token whatever the input, which would make a weak parity test.
            init_std=0.3, tie_word_embeddings=False,
        )
        model = MarianMTModel(config).eval()
        with torch.no_grad():
            # A random bias (the real models' is zero) makes the test notice a graph that leaves it out; EOS is
            # raised so that some translations end before max_length.
            bias = torch.randn_like(model.final_logits_bias) * 0.2
            bias[0, 0] += 2.8
            model.final_logits_bias.copy_(bias)
        model.generation_config = GenerationConfig(
            bad_words_ids=[[pad]], bos_token_id=0, decoder_start_token_id=pad, eos_token_id=0, forced_eos_token_id=0,
            max_length=max_length, num_beams=4, pad_token_id=pad)
        staged = tmp / "hf"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        onnx_tmp = tmp / "onnx"
        main_export(str(staged), output=str(onnx_tmp), task="text2text-generation-with-past", opset=17,
                    device="cpu", do_validation=False)
        (target / "onnx").mkdir()
        for stem in ("encoder_model", "decoder_model_merged"):
            shutil.copy(onnx_tmp / f"{stem}.onnx", target / "onnx" / f"{stem}.onnx")
            quantize_dynamic(target / "onnx" / f"{stem}.onnx", target / "onnx" / f"{stem}_quantized.onnx",
                             per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                             extra_options={"EnableSubgraph": True})
        for name in ("config.json", "generation_config.json"):
            shutil.copy(staged / name, target / name)
        model = MarianMTModel.from_pretrained(staged).eval()  # export may flip modules to train mode: reload
        (target / "goldens.json").write_text(json.dumps(_goldens(model, tokenizer), indent=1, ensure_ascii=False),
                                             encoding="utf-8")
    for leftover in ("special_tokens_map.json",):
        (target / leftover).unlink(missing_ok=True)
    return target


def _joint_vocab(source: Path, target: Path) -> dict[str, int]:
    """The joint vocabulary as Helsinki-NLP's conversions order it: ``</s>``, ``<unk>``, pieces, ``<pad>`` last."""
    vocab: dict[str, int] = {"</s>": 0, "<unk>": 1}
    for path in (source, target):
        model = spm.SentencePieceProcessor(model_file=str(path))
        for i in range(model.GetPieceSize()):
            piece = model.IdToPiece(i)
            if piece not in vocab and piece not in ("<s>", "<unk>", "</s>"):
                vocab[piece] = len(vocab)
    vocab["<pad>"] = len(vocab)
    return vocab


def _goldens(model: MarianMTModel, tokenizer: MarianTokenizer) -> dict[str, Any]:
    model.eval()
    rows = []
    for text in SOURCES:
        encoded = tokenizer(text, return_tensors="pt")
        outputs: dict[str, Any] = {}
        for name, overrides in SETTINGS.items():
            with torch.no_grad():
                ids = model.generate(**encoded, **overrides)[0].tolist()
            outputs[name] = {"ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True)}
        rows.append({"source": text, "source_ids": encoded["input_ids"][0].tolist(), "outputs": outputs})
    return {"transformers": __import__("transformers").__version__, "settings": SETTINGS, "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", nargs="?", type=Path, default=REPO / "tests" / "fixtures" / "models")
    args = parser.parse_args(argv)
    print(build(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
