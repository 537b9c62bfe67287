"""Marian translation models (Helsinki-NLP opus-mt, in the transformers.js layout) on the shared generation engine.

A model directory holds ``config.json`` (``model_type`` ``marian``), ``generation_config.json`` (opus-mt: num_beams
4, max_length 512, ``bad_words_ids`` [[pad]], decoder start = pad), ``tokenizer.json`` and ``onnx/encoder_model*.onnx``
+ ``onnx/decoder_model_merged*.onnx`` as optimum exports them (task ``text2text-generation-with-past``):

* ``encoder_model``: ``input_ids``, ``attention_mask`` [b,S] -> ``last_hidden_state`` [b,S,d];
* ``decoder_model_merged``: ``input_ids`` (the graph embeds and scales them, adds the sinusoidal positions and, at the
  end, ``final_logits_bias``), ``encoder_hidden_states``, ``encoder_attention_mask``, ``past_key_values.*`` and
  ``use_cache_branch`` -- the BART-style merged decoder of :mod:`capwatch.models.seq2seq`, which Florence-2 uses too.

The source text is encoded as transformers' ``MarianTokenizer`` does (SentencePiece pieces, then ``</s>``): with the
``source.spm`` + ``vocab.json`` the repositories carry (read by :mod:`capwatch.models.spm`), else from transformers.js's
``tokenizer.json`` (a Unigram model over the joint vocabulary; close, not always equal). transformers.js writes that
file's normalizer as ``Precompiled`` with a null charsmap, which the ``tokenizers`` library cannot load (it panics); the
normalizer is replaced by NFKC here, which is what SentencePiece's default ``nmt_nfkc`` rule does for ordinary text,
and its ``unk_id`` (always 2) is pointed at the vocabulary's ``<unk>``.
Generated ids are decoded as ``tokenizer.decode(ids, skip_special_tokens=True)``.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from capwatch.config import ModelConfig, Precision
from capwatch.errors import ModelError
from capwatch.models.generate import GenerationSettings, generate
from capwatch.models.layout import (
    MAX_TOKENIZER_BYTES,
    check_names,
    check_text_model_files,
    decoder_positions,
    find_onnx,
    read_capped,
    read_json,
)
from capwatch.models.runtime import ort
from capwatch.models.seq2seq import DecoderShape, EncodedBatch, MergedDecoder
from capwatch.models.session import SessionGroup, SessionOwner
from capwatch.models.spm import load_spm_tokenizer

ENCODER = "encoder_model"
DECODER = "decoder_model_merged"
GRAPHS = (ENCODER, DECODER)
MODEL_TYPE = "marian"
#: Longest source accepted, in tokens: a caption is 10-60; the encoder's positions (opus-mt: 512) bound it anyway.
MAX_SOURCE_TOKENS = 256


@dataclass(frozen=True)
class Translation:
    """One translated text and the token ids generated for it (decoder start first, as generate() returns)."""

    text: str
    token_ids: tuple[int, ...]


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of ``tokenizer.json`` at ``path``, with transformers.js's unloadable null ``Precompiled``
    normalizer replaced by NFKC.

    Raises ModelError (one line, naming the file) when the file is missing, too large or cannot be parsed.
    """
    try:
        raw = read_capped(path, MAX_TOKENIZER_BYTES)
    except FileNotFoundError:
        raise ModelError(f"{path.parent}: missing {path.name}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: cannot load the tokenizer: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: cannot load the tokenizer: expected a JSON object")
    data["normalizer"] = _usable_normalizer(data.get("normalizer"))
    _fix_unk_id(data.get("model"))
    try:
        return Tokenizer.from_str(json.dumps(data))
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: cannot load the tokenizer: {first}") from None


def _fix_unk_id(model: Any) -> None:
    """Point a Unigram model's ``unk_id`` at its ``<unk>`` piece. transformers.js writes ``unk_id`` 2 for every
    Marian model, but Helsinki-NLP's vocabularies have ``<unk>`` at 1 (2 is an ordinary piece, "▁," in opus-mt-en-de),
    so characters the vocabulary lacks would become that piece instead of ``<unk>`` as in MarianTokenizer."""
    if not isinstance(model, dict) or model.get("type") != "Unigram" or not isinstance(model.get("vocab"), list):
        return
    for index, entry in enumerate(model["vocab"]):
        if isinstance(entry, list) and entry and entry[0] == "<unk>":
            model["unk_id"] = index
            return


def _usable_normalizer(normalizer: Any) -> Any:
    """``normalizer`` with every ``Precompiled`` part that has no charsmap replaced by NFKC."""
    if not isinstance(normalizer, dict):
        return normalizer
    if normalizer.get("type") == "Precompiled" and not normalizer.get("precompiled_charsmap"):
        return {"type": "NFKC"}
    if normalizer.get("type") == "Sequence" and isinstance(normalizer.get("normalizers"), list):
        return {**normalizer, "normalizers": [_usable_normalizer(n) for n in normalizer["normalizers"]]}
    return normalizer


def is_translation_dir(path: Path) -> bool:
    """True when ``path`` is a directory whose config.json says ``model_type`` ``marian`` (no error raised)."""
    try:
        return read_json(path / "config.json").get("model_type") == MODEL_TYPE
    except ModelError:
        return False


class Translator(SessionOwner):
    """One Marian model directory -> translations, with lazily loaded, idle-unloaded sessions.

    Not thread-safe for concurrent translating (one worker translates); ``unload_if_idle`` may be called from
    another thread.
    """

    _shape: DecoderShape

    def __init__(self, model_dir: Path, *, precision: Precision | str = "auto", threads: int = 0,
                 idle_unload_seconds: float = 300.0, providers: Sequence[str] = ("cpu",), batch_size: int = 8,
                 model_id: str | None = None, revision: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Read and check the configs, the tokenizer and where the graphs are; nothing heavy is loaded yet.

        ``precision``: fp32, int8, fp16, or auto (fp32 when the directory has it -- the reference -- else int8,
        else fp16). Raises ModelError (one line) for a missing or invalid file or a model that is not Marian.
        """
        path = Path(model_dir)
        if not path.is_dir():
            raise ModelError(f"{path}: translation model directory not found")
        self.model_dir = path
        self.config = read_json(path / "config.json")
        if self.config.get("model_type") != MODEL_TYPE:
            raise ModelError(f"{path}: not a Marian translation model (config.json model_type "
                             f"{self.config.get('model_type')!r}, expected 'marian')")
        self.generation_config = read_json(path / "generation_config.json", required=False)
        check_text_model_files(path, self.config, self.generation_config)
        self.precision: Precision = self._pick_precision(precision)
        self.model_id = model_id or path.name
        self.revision = revision
        self.batch_size = max(1, batch_size)
        self.max_positions = decoder_positions(self.config)
        try:
            self.settings = GenerationSettings.from_configs(self.generation_config, self.config, ModelConfig())
        except ValueError as exc:
            raise ModelError(f"{path}: generation settings: {exc}") from None
        self.tokenizer = load_tokenizer(path / "tokenizer.json")
        self._source = self._source_tokenizer(path)
        pad = self.config.get("pad_token_id", self.settings.pad_token_id)
        self.pad_token_id = int(pad) if isinstance(pad, int) else self.settings.pad_token_id
        paths = {stem: find_onnx(path, stem, self.precision) for stem in GRAPHS}
        self.sessions = SessionGroup(paths, threads, idle_unload_seconds, clock, self._check_graphs, None, providers)

    def _source_tokenizer(self, path: Path) -> tuple[Tokenizer, dict[str, int], int] | None:
        """MarianTokenizer's own way to encode, when the directory has it: ``source.spm`` + ``vocab.json`` (the
        Helsinki-NLP files transformers.js repositories carry beside tokenizer.json). None without them."""
        spm_path, vocab_path = path / "source.spm", path / "vocab.json"
        if not spm_path.is_file() or not vocab_path.is_file():
            return None
        vocab = read_json(vocab_path, max_bytes=MAX_TOKENIZER_BYTES)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()) or "<unk>" not in vocab:
            raise ModelError(f"{vocab_path}: expected an object of piece -> id with <unk>")
        eos = self.settings.eos_token_id[0] if self.settings.eos_token_id else vocab.get("</s>", 0)
        return load_spm_tokenizer(spm_path), vocab, eos

    def _pick_precision(self, precision: str) -> Precision:
        if precision in ("fp32", "int8", "fp16"):
            return precision  # type: ignore[return-value]
        if precision != "auto":
            raise ModelError(f"{self.model_dir}: unknown precision {precision!r} (fp32, int8, fp16 or auto)")
        candidates: tuple[Precision, ...] = ("fp32", "int8", "fp16")
        for candidate in candidates:
            try:
                for stem in GRAPHS:
                    find_onnx(self.model_dir, stem, candidate)
            except ModelError:
                continue
            return candidate
        find_onnx(self.model_dir, ENCODER, "fp32")  # raises the one-line "missing" error
        raise ModelError(f"{self.model_dir}: no complete set of ONNX graphs")  # pragma: no cover

    def _check_graphs(self, sessions: Mapping[str, ort.InferenceSession]) -> None:
        encoder_path = find_onnx(self.model_dir, ENCODER, self.precision)
        check_names(encoder_path, "input", [i.name for i in sessions[ENCODER].get_inputs()],
                    ["input_ids", "attention_mask"])
        check_names(encoder_path, "output", [o.name for o in sessions[ENCODER].get_outputs()], ["last_hidden_state"])
        self._shape = DecoderShape.from_session(sessions[DECODER], find_onnx(self.model_dir, DECODER, self.precision),
                                                self.config, token_input="input_ids")

    # -- text <-> ids -------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """The source ids of ``text`` as MarianTokenizer gives them: pieces then ``</s>`` (cut to
        :data:`MAX_SOURCE_TOKENS`, keeping ``</s>`` last).

        With ``source.spm`` and ``vocab.json`` this is MarianTokenizer's own method: the source SentencePiece model
        segments, each piece (an unknown one as its surface text) is looked up in the joint vocabulary, ``<unk>``
        when absent. Without them, tokenizer.json encodes; its Unigram scores every piece with the higher of its
        source and target scores, so a word can come out in other pieces than MarianTokenizer's.
        """
        ids: list[int]
        if self._source is not None:
            tokenizer, vocab, eos = self._source
            unk = vocab["<unk>"]
            ids = [vocab.get(token, unk) for token in tokenizer.encode(text, add_special_tokens=False).tokens]
            ids.append(eos)
        else:
            ids = self.tokenizer.encode(unicodedata.normalize("NFKC", text)).ids
        if len(ids) > MAX_SOURCE_TOKENS:
            ids = [*ids[: MAX_SOURCE_TOKENS - 1], ids[-1]]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """``ids`` as text, special tokens skipped (MarianTokenizer.decode(..., skip_special_tokens=True))."""
        text: str = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        return text.strip()

    # -- generation -----------------------------------------------------------------------------------------------

    def generate_ids(self, sources: Sequence[Sequence[int]],
                     settings: GenerationSettings | None = None) -> list[list[int]]:
        """The best sequence of generated ids per source id list (as MarianMTModel.generate() returns it for that
        source alone), in chunks of ``batch_size``. Raises ModelError when the model cannot be loaded."""
        use = (settings or self.settings).fit_positions(self.max_positions)
        out: list[list[int]] = []
        with self.sessions.use() as sessions:
            for start in range(0, len(sources), self.batch_size):
                chunk = sources[start : start + self.batch_size]
                encoded = self._encode_batch(sessions[ENCODER], chunk)
                decoder = MergedDecoder(sessions[DECODER], self._shape)
                sequences = generate(decoder, encoded, len(chunk), use)
                out += sequences[:: use.num_return_sequences]
        return out

    def _encode_batch(self, encoder: Any, sources: Sequence[Sequence[int]]) -> EncodedBatch:
        width = max(len(s) for s in sources)
        ids = np.full((len(sources), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(sources), width), dtype=np.int64)
        for row, source in enumerate(sources):
            ids[row, : len(source)] = source
            mask[row, : len(source)] = 1
        hidden = encoder.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
        return EncodedBatch(hidden=hidden.astype(self._shape.float_dtype, copy=False),
                            mask=mask.astype(self._shape.mask_dtype, copy=False))

    def translate(self, texts: Sequence[str], settings: GenerationSettings | None = None) -> list[Translation]:
        """Translate each text (empty texts give empty translations without running the model). Raises ModelError
        when the model cannot be loaded."""
        results: list[Translation | None] = [None if t.strip() else Translation("", ()) for t in texts]
        todo = [i for i, r in enumerate(results) if r is None]
        if todo:
            ids = self.generate_ids([self.encode(texts[i]) for i in todo], settings)
            for i, seq in zip(todo, ids, strict=True):
                results[i] = Translation(self.decode(seq), tuple(seq))
        return [r for r in results if r is not None]

