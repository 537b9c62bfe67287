"""Greedy and beam-search generation over any encoder-decoder ONNX model, in numpy.

The search logic here is model-agnostic: a model family supplies a :class:`Decoder` (how to run one decoder
step over a set of rows and how to reorder/drop rows of its KV cache) and this module decides which tokens to
pick. The semantics are those of transformers 4.57 ``generate()`` (``_sample`` without sampling for greedy,
the vectorised ``_beam_search`` for beams, and the same logits processors in the same order), so that for the
same encoder output the token ids are the same.

Work is vectorised over rows: one decoder call per step for every image and beam together, and rows whose
result can no longer change (finished greedy rows, beam groups that are done) are dropped with
``Decoder.select`` so later steps do less work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from capwatch.config import LENGTH_PENALTY, NEW_TOKENS, NO_REPEAT_NGRAM, NUM_BEAMS, Range, short_repr

if TYPE_CHECKING:
    from capwatch.config import ModelConfig

#: transformers' "finished / impossible" score offset (not -inf, so arithmetic on it stays finite).
_BIG = np.float32(1.0e9)
#: transformers' GenerationConfig().max_length; a config that leaves it at this value gets it counted in
#: *new* tokens.
_DEFAULT_MAX_LENGTH = 20

#: repetition_penalty divides (or multiplies) a seen token's score: must be positive; real configs use 1.0-2.0.
REPETITION_PENALTY = Range(0.01, 100)
#: Token ids when the vocabulary size is unknown: far above any real tokenizer's (the largest have ~256 000).
ANY_TOKEN_ID = Range(0, (1 << 22) - 1)
#: eos_token_id may list several ids (every one ends a sequence); real configs list one to three.
MAX_EOS_IDS = 32
#: Generation keys that hold token ids. Each may be one id or (taking the first, as transformers does for these) a
#: list, except pad_token_id, which is only ever one id.
#: bad_words_ids: at most this many banned sequences, each at most MAX_BAD_WORD_TOKENS long (Marian's generation
#: config bans one one-token sequence, the pad token).
MAX_BAD_WORDS = 4096
MAX_BAD_WORD_TOKENS = 32
TOKEN_ID_KEYS = ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "forced_bos_token_id",
                 "forced_eos_token_id")


def new_token_limit(max_positions: int | None) -> int:
    """Return the most tokens generation may add after the decoder start token.

    A decoder with ``max_positions`` positions is fed positions 0 .. max_length - 2 (the last token generated is never
    fed back), so it can produce ``max_positions`` new tokens, i.e. max_length up to ``max_positions + 1`` (Florence-2:
    1024 positions, max_length 1025). Never more than :data:`capwatch.config.NEW_TOKENS` allows; that bound alone
    when ``max_positions`` is None (unknown).
    """
    top = int(NEW_TOKENS.hi)
    return top if max_positions is None else max(1, min(top, max_positions))


def check_generation_keys(
    data: Mapping[str, Any], *, max_positions: int | None, vocab_size: int | None, prefix: str = ""
) -> None:
    """Check the generation keys of one config mapping (generation_config.json, or config.json and its text part).

    Absent and null keys are not checked (defaults apply). Lengths are bounded by :func:`new_token_limit`, token
    ids by ``vocab_size`` (0 .. vocab_size - 1; :data:`ANY_TOKEN_ID` when unknown), the rest by the Ranges in
    :mod:`capwatch.config`. Keys capwatch does not use (temperature, top_k, ...) are ignored. Returns None; raises
    ValueError with one line ``<prefix><key>: expected ..., got ...`` naming the allowed range, for the first bad key.
    """
    new = new_token_limit(max_positions)
    why = f"; the decoder has {max_positions} positions" if max_positions is not None and new == max_positions else ""
    lengths = {"max_length": Range(1, new + 1), "max_new_tokens": Range(1, new), "min_length": Range(0, new + 1),
               "min_new_tokens": Range(0, new)}
    others = {"num_beams": (NUM_BEAMS, True), "num_return_sequences": (NUM_BEAMS, True),
              "no_repeat_ngram_size": (NO_REPEAT_NGRAM, True), "length_penalty": (LENGTH_PENALTY, False),
              "repetition_penalty": (REPETITION_PENALTY, False)}
    checks = {**{k: (r, True, why) for k, r in lengths.items()}, **{k: (r, i, "") for k, (r, i) in others.items()}}
    for key, (bounds, integer, note) in checks.items():
        value = data.get(key)
        if value is not None and (problem := bounds.problem(value, integer=integer)) is not None:
            raise ValueError(f"{prefix}{key}: {problem}{note}")
    for low, high, what in (("min_length", "max_length", "max_length"),
                            ("min_new_tokens", "max_new_tokens", "max_new_tokens"),
                            ("num_return_sequences", "num_beams", "num_beams")):
        if data.get(low) is not None and data.get(high) is not None and data[low] > data[high]:
            raise ValueError(f"{prefix}{low}: expected at most {what} ({data[high]}), got {data[low]}")
    early = data.get("early_stopping")
    if early is not None and not (isinstance(early, bool) or early == "never"):
        raise ValueError(f"{prefix}early_stopping: expected true, false or \"never\", got {early!r}")
    ids = ANY_TOKEN_ID if vocab_size is None else Range(0, vocab_size - 1)
    vocab = "" if vocab_size is None else f"; the vocabulary has {vocab_size} tokens"
    for key in TOKEN_ID_KEYS:
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, list) and key != "pad_token_id":
            # An empty eos list means "no EOS"; the others take their first entry, so they need one.
            smallest = 0 if key == "eos_token_id" else 1
            if not smallest <= len(value) <= MAX_EOS_IDS:
                raise ValueError(f"{prefix}{key}: expected a token id or a list of {smallest} to {MAX_EOS_IDS} token "
                                 f"ids, got a list of {len(value)}")
            items = list(value)
        else:
            items = [value]
        for item in items:
            if (problem := ids.problem(item, integer=True)) is not None:
                raise ValueError(f"{prefix}{key}: {problem}{vocab}")
    bad = data.get("bad_words_ids")
    if bad is not None:
        if not isinstance(bad, list) or len(bad) > MAX_BAD_WORDS:
            raise ValueError(f"{prefix}bad_words_ids: expected a list of at most {MAX_BAD_WORDS} token id lists")
        for seq in bad:
            if not isinstance(seq, list) or not 1 <= len(seq) <= MAX_BAD_WORD_TOKENS:
                raise ValueError(f"{prefix}bad_words_ids: expected lists of 1 to {MAX_BAD_WORD_TOKENS} token ids, "
                                 f"got {short_repr(seq)}")
            for item in seq:
                if (problem := ids.problem(item, integer=True)) is not None:
                    raise ValueError(f"{prefix}bad_words_ids: {problem}{vocab}")


class DecoderState(Protocol):
    """Opaque per-row decoder state (KV caches, encoder rows, ...), owned by the model family's Decoder."""


class Decoder(Protocol):
    """One model family's incremental decoder, driven by :func:`generate`.

    Rows are the unit of work: ``start`` creates ``batch_size * expand`` rows (row ``i * expand + j`` belongs
    to encoder item ``i``); ``step`` advances every row by one token; ``select`` builds the state for a new
    row list.
    """

    def start(self, encoder_batch: Any, expand: int) -> DecoderState:
        """Return the state before the first step, each encoder item repeated ``expand`` times (beams)."""
        ...

    def step(self, state: DecoderState, input_ids: np.ndarray) -> tuple[np.ndarray, DecoderState]:
        """Feed ``input_ids`` [rows, 1] int64 (the last token of each row; on the first step the decoder start
        token).

        Returns the next-token logits [rows, vocab] float32 and the advanced state.
        """
        ...

    def select(self, state: DecoderState, rows: np.ndarray) -> DecoderState:
        """Return the state whose row ``k`` is the current row ``rows[k]``.

        ``rows`` is an int64 array; it may repeat rows (beam reordering) and may be shorter than the current
        row count (finished rows dropped); it is never empty.
        """
        ...


@dataclass(frozen=True)
class GenerationSettings:
    """Generation parameters, every field as transformers ``GenerationConfig`` means it.

    ``max_length`` / ``min_length`` count the whole decoder sequence including the decoder start token;
    ``max_new_tokens`` / ``min_new_tokens``, when set, take precedence (as in transformers).
    """

    max_length: int
    max_new_tokens: int | None
    min_length: int
    min_new_tokens: int | None
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    no_repeat_ngram_size: int
    decoder_start_token_id: int
    bos_token_id: int | None
    eos_token_id: tuple[int, ...]
    pad_token_id: int
    forced_bos_token_id: int | None
    forced_eos_token_id: int | None
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    #: Token sequences never generated (transformers' NoBadWordsLogitsProcessor); a one-token EOS entry is ignored.
    bad_words_ids: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        """Check the merged settings, whatever their source (model files, capwatch's config, code).

        Raises ValueError (one line naming the setting and its allowed range) for a value outside the bounds of
        :func:`check_generation_keys` (without a model's position limit, which only the caller knows) or for a
        min_length above max_length.
        """
        new = new_token_limit(None)
        checks: list[tuple[str, object, Range, bool]] = [
            ("max_length", self.max_length, Range(1, new + 1), True),
            ("max_new_tokens", self.max_new_tokens, Range(1, new), True),
            ("min_length", self.min_length, Range(0, new + 1), True),
            ("min_new_tokens", self.min_new_tokens, Range(0, new), True),
            ("num_beams", self.num_beams, NUM_BEAMS, True),
            ("num_return_sequences", self.num_return_sequences, Range(1, self.num_beams), True),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size, NO_REPEAT_NGRAM, True),
            ("length_penalty", self.length_penalty, LENGTH_PENALTY, False),
            ("repetition_penalty", self.repetition_penalty, REPETITION_PENALTY, False),
            ("decoder_start_token_id", self.decoder_start_token_id, ANY_TOKEN_ID, True),
            ("pad_token_id", self.pad_token_id, ANY_TOKEN_ID, True),
            *[(name, value, ANY_TOKEN_ID, True) for name, value in (
                ("bos_token_id", self.bos_token_id), ("forced_bos_token_id", self.forced_bos_token_id),
                ("forced_eos_token_id", self.forced_eos_token_id), *(("eos_token_id", t) for t in self.eos_token_id),
                *(("bad_words_ids", t) for seq in self.bad_words_ids for t in seq))],
        ]
        for name, value, bounds, integer in checks:
            if value is not None and (problem := bounds.problem(value, integer=integer)) is not None:
                raise ValueError(f"{name}: {problem}")
        if any(not 1 <= len(seq) <= MAX_BAD_WORD_TOKENS for seq in self.bad_words_ids):
            raise ValueError(f"bad_words_ids: expected sequences of 1 to {MAX_BAD_WORD_TOKENS} token ids")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if self.effective_min_length > self.effective_max_length:
            raise ValueError(f"min_length: expected at most max_length ({self.effective_max_length}), "
                             f"got {self.effective_min_length}")

    @property
    def effective_max_length(self) -> int:
        """The decoder sequence length generation stops at (start token included): max_new_tokens wins."""
        return self.max_length if self.max_new_tokens is None else self.max_new_tokens + 1

    @property
    def effective_min_length(self) -> int:
        """The length before which EOS is banned (start token included): min_new_tokens wins."""
        return self.min_length if self.min_new_tokens is None else self.min_new_tokens + 1

    def fit_positions(self, max_positions: int | None) -> GenerationSettings:
        """Return these settings with the length budget cut to what a decoder with ``max_positions`` can take.

        The budget from capwatch's config (``model.max_new_tokens``) or a built-in default is an "at most": a model
        with fewer positions simply cannot produce more, so it is cut rather than refused. (A model whose own
        files ask for more is refused when its directory is opened.) A minimum length above the cut maximum is cut
        to it too (EOS stays banned to the end, as before). Returns ``self`` when nothing needs cutting.
        """
        limit = new_token_limit(max_positions)
        if self.effective_max_length - 1 <= limit:
            return self
        return dataclasses.replace(
            self,
            max_length=limit + 1,
            max_new_tokens=None if self.max_new_tokens is None else limit,
            min_length=min(self.min_length, limit + 1),
            min_new_tokens=None if self.min_new_tokens is None else min(self.min_new_tokens, limit),
        )

    @classmethod
    def from_configs(
        cls, generation_config: Mapping[str, Any], model_config: Mapping[str, Any], overrides: ModelConfig
    ) -> GenerationSettings:
        """Merge ``generation_config.json``, ``config.json`` and the user's overrides the way transformers
        does.

        Precedence: ``overrides`` (fields that are not None) > ``generation_config`` > legacy generation keys
        in ``model_config`` (top level, then the decoder sub-config) > transformers' defaults. Lengths are
        resolved for a one-token decoder prompt: ``max_new_tokens`` becomes ``max_length = max_new_tokens +
        1``, and a ``max_length`` left at transformers' default of 20 means 20 *new* tokens (capped by
        ``max_position_embeddings``), exactly as ``generate()`` does. Raises ValueError when no decoder start
        token can be found or a value is invalid (also for values of the wrong type, when the mappings were not
        checked with :func:`check_generation_keys` first).
        """
        try:
            return cls._from_configs(generation_config, model_config, overrides)
        except (TypeError, OverflowError, IndexError) as exc:  # int(None), int(inf), [][0]: unchecked mappings
            raise ValueError(f"invalid generation setting: {exc}") from None

    @classmethod
    def _from_configs(
        cls, generation_config: Mapping[str, Any], model_config: Mapping[str, Any], overrides: ModelConfig
    ) -> GenerationSettings:
        merged: dict[str, Any] = {}
        if not generation_config:
            # as transformers' GenerationConfig.from_model_config: top-level keys, then the decoder's
            decoder = model_config.get("decoder")
            if isinstance(decoder, Mapping):
                merged.update({k: v for k, v in decoder.items() if v is not None})
            merged.update({k: v for k, v in model_config.items() if v is not None})
        else:
            merged.update({k: v for k, v in generation_config.items() if v is not None})

        def pick(name: str, default: Any) -> Any:
            return merged.get(name, default)

        num_beams = int(overrides.num_beams if overrides.num_beams is not None else pick("num_beams", 1))
        length_penalty = float(
            overrides.length_penalty if overrides.length_penalty is not None else pick("length_penalty", 1.0)
        )
        early_stopping: bool | str = (
            overrides.early_stopping
            if overrides.early_stopping is not None
            else pick("early_stopping", False)
        )
        no_repeat = int(
            overrides.no_repeat_ngram_size
            if overrides.no_repeat_ngram_size is not None
            else pick("no_repeat_ngram_size", 0)
        )
        prompt_len = 1  # encoder-decoder generation starts from the decoder start token alone
        max_new_tokens = (
            overrides.max_new_tokens if overrides.max_new_tokens is not None else pick("max_new_tokens", None)
        )
        if max_new_tokens is not None:
            max_length = int(max_new_tokens) + prompt_len
        else:
            max_length = int(pick("max_length", _DEFAULT_MAX_LENGTH))
            if max_length == _DEFAULT_MAX_LENGTH:
                max_length += prompt_len
                max_pos = model_config.get("max_position_embeddings")
                if isinstance(max_pos, int):
                    max_length = min(max_length, max_pos)
        min_new_tokens = pick("min_new_tokens", None)
        if overrides.min_length is not None:
            min_length = int(overrides.min_length)
            min_new_tokens = None
        elif min_new_tokens is not None:
            min_length = int(min_new_tokens) + prompt_len
        else:
            min_length = int(pick("min_length", 0))

        eos_raw = pick("eos_token_id", None)
        eos: tuple[int, ...]
        if eos_raw is None:
            eos = ()
        elif isinstance(eos_raw, list | tuple):
            eos = tuple(int(t) for t in eos_raw)
        else:
            eos = (int(eos_raw),)
        bos = pick("bos_token_id", None)
        start = pick("decoder_start_token_id", None)
        if start is None:
            start = model_config.get("decoder_start_token_id", bos)
        if isinstance(start, list):  # per-language starts (Whisper-style) are not supported: take the first
            start = start[0]
        if start is None:
            raise ValueError("neither decoder_start_token_id nor bos_token_id is set in the model's configs")
        pad = pick("pad_token_id", None)
        if pad is None:
            pad = eos[0] if eos else 0

        def opt_int(value: Any) -> int | None:
            if isinstance(value, list):
                value = value[0] if value else None
            return None if value is None else int(value)

        return cls(
            max_length=max_length,
            max_new_tokens=None if max_new_tokens is None else int(max_new_tokens),
            min_length=min_length,
            min_new_tokens=None if min_new_tokens is None else int(min_new_tokens),
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            no_repeat_ngram_size=no_repeat,
            decoder_start_token_id=int(start),
            bos_token_id=opt_int(bos),
            eos_token_id=eos,
            pad_token_id=int(pad),
            forced_bos_token_id=opt_int(pick("forced_bos_token_id", None)),
            forced_eos_token_id=opt_int(pick("forced_eos_token_id", None)),
            repetition_penalty=float(pick("repetition_penalty", 1.0)),
            num_return_sequences=int(pick("num_return_sequences", 1)),
            bad_words_ids=tuple(tuple(int(t) for t in seq) for seq in (pick("bad_words_ids", None) or ())),
        )


def generate(
    decoder: Decoder, encoder_batch: Any, batch_size: int, settings: GenerationSettings
) -> list[list[int]]:
    """Generate token ids for ``batch_size`` encoder items.

    Greedy when ``settings.num_beams == 1``, otherwise beam search. Returns ``batch_size *
    num_return_sequences`` lists (item-major), each the sequence transformers' ``generate()`` returns for that
    item alone: the decoder start token first, then the generated tokens up to and including EOS (or up to
    max_length), without batch padding.
    """
    if batch_size == 0:
        return []
    prompt_len = 1
    max_length = settings.max_length
    if settings.max_new_tokens is not None:
        max_length = settings.max_new_tokens + prompt_len
    min_length = settings.min_length
    if settings.min_new_tokens is not None:
        min_length = settings.min_new_tokens + prompt_len
    if max_length <= prompt_len:
        return [[settings.decoder_start_token_id] for _ in range(batch_size * settings.num_return_sequences)]
    processors = _Processors(settings, max_length, min_length)
    if settings.num_beams == 1:
        return _greedy(decoder, encoder_batch, batch_size, settings, processors, max_length)
    return _beam_search(decoder, encoder_batch, batch_size, settings, processors, max_length)


# ------------------------------------------------------------------------------------------------------------
# Logits processors (transformers' order: repetition penalty, no-repeat n-gram, bad words, min length, forced BOS,
# forced EOS)


class _Processors:
    def __init__(self, settings: GenerationSettings, max_length: int, min_length: int) -> None:
        self.repetition_penalty = settings.repetition_penalty
        self.ngram = settings.no_repeat_ngram_size
        self.eos = np.asarray(settings.eos_token_id, dtype=np.int64)
        self.min_length = min_length
        self.forced_bos = settings.forced_bos_token_id
        self.forced_eos = settings.forced_eos_token_id
        self.max_length = max_length
        # As NoBadWordsLogitsProcessor: a one-token sequence equal to an EOS id is dropped (EOS must stay possible).
        eos_set = {(int(t),) for t in settings.eos_token_id}
        bad = [seq for seq in settings.bad_words_ids if seq not in eos_set]
        self.bad_single = np.asarray(sorted({seq[0] for seq in bad if len(seq) == 1}), dtype=np.int64)
        self.bad_multi = [seq for seq in bad if len(seq) > 1]

    def __call__(self, history: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Apply the processors in place to ``scores`` [rows, vocab] given ``history`` [rows, cur_len]."""
        cur_len = history.shape[1]
        if self.repetition_penalty != 1.0:
            seen = np.take_along_axis(scores, history, axis=1)
            seen = np.where(seen < 0, seen * self.repetition_penalty, seen / self.repetition_penalty)
            np.put_along_axis(scores, history, seen.astype(scores.dtype), axis=1)
        if self.ngram > 0 and cur_len + 1 >= self.ngram:
            _ban_repeated_ngrams(history, scores, self.ngram)
        if self.bad_single.size:
            scores[:, self.bad_single] = -np.inf
        for seq in self.bad_multi:
            # Ban the last token of a bad sequence where the history ends with the rest of it.
            prefix = np.asarray(seq[:-1], dtype=np.int64)
            if cur_len >= prefix.size:
                hit = np.all(history[:, cur_len - prefix.size :] == prefix[None, :], axis=1)
                scores[hit, seq[-1]] = -np.inf
        if self.eos.size and cur_len < self.min_length:
            scores[:, self.eos] = -np.inf
        if self.forced_bos is not None and cur_len == 1:
            scores[:] = -np.inf
            scores[:, self.forced_bos] = 0
        if self.forced_eos is not None and cur_len == self.max_length - 1:
            scores[:] = -np.inf
            scores[:, self.forced_eos] = 0
        return scores


def _ban_repeated_ngrams(history: np.ndarray, scores: np.ndarray, n: int) -> None:
    """Set to -inf every token that would complete an n-gram already present in the row's history."""
    cur_len = history.shape[1]
    if cur_len < n:
        return  # no complete n-gram yet (transformers bans nothing either)
    windows = np.lib.stride_tricks.sliding_window_view(history, n, axis=1)  # [rows, cur_len-n+1, n]
    prefix = history[:, cur_len - n + 1 :]  # the last n-1 tokens
    match = np.all(windows[:, :, : n - 1] == prefix[:, None, :], axis=2)
    rows, where = np.nonzero(match)
    if rows.size:
        scores[rows, windows[rows, where, n - 1]] = -np.inf


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return out


#: Rows at least this wide take the sampled-threshold path of :func:`_topk`.
_TOPK_SAMPLED_FROM = 4096


def _topk(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values per row, best first (ties: lower index first)."""
    n = values.shape[1]
    if n >= _TOPK_SAMPLED_FROM and 0 < k <= n // 64:
        return _topk_sampled(values, k)
    if k < n:
        part = np.argpartition(-values, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), values.shape).copy()
    chosen = np.take_along_axis(values, part, axis=1)
    order = np.lexsort((part, -chosen), axis=1)
    result: np.ndarray = np.take_along_axis(part, order, axis=1)
    return result


def _topk_sampled(values: np.ndarray, k: int) -> np.ndarray:
    """:func:`_topk` over wide rows (beam search over a 51 k vocabulary times the beams: numpy's argpartition
    takes ~2 ms a row there). The k-th largest of every 64th value is at most the row's k-th largest, so the values
    at or above it hold the top k; they are few, and sorting them by (-value, index) gives the order."""
    threshold = np.partition(values[:, ::64], -k, axis=1)[:, -k]
    result = np.empty((values.shape[0], k), dtype=np.int64)
    for row, (line, floor) in enumerate(zip(values, threshold, strict=True)):
        candidates = np.flatnonzero(line >= floor)
        if candidates.size < k:  # NaN in the sample: no usable floor
            candidates = np.arange(line.size)
        chosen = line[candidates]
        result[row] = candidates[np.lexsort((candidates, -chosen))[:k]]
    return result


# ------------------------------------------------------------------------------------------------------------
# Greedy


def _greedy(
    decoder: Decoder,
    encoder_batch: Any,
    batch_size: int,
    settings: GenerationSettings,
    processors: _Processors,
    max_length: int,
) -> list[list[int]]:
    seqs = np.full((batch_size, max_length), settings.pad_token_id, dtype=np.int64)
    seqs[:, 0] = settings.decoder_start_token_id
    lengths = np.full(batch_size, max_length, dtype=np.int64)
    alive = np.arange(batch_size)  # original item of each decoder row
    eos = np.asarray(settings.eos_token_id, dtype=np.int64)
    state = decoder.start(encoder_batch, 1)
    tokens = seqs[:, :1].copy()
    cur_len = 1
    while True:
        logits, state = decoder.step(state, tokens)
        scores = processors(seqs[alive, :cur_len], np.array(logits, dtype=np.float32, copy=True))
        nxt = scores.argmax(axis=1)
        seqs[alive, cur_len] = nxt
        cur_len += 1
        if cur_len >= max_length:
            break
        finished = np.isin(nxt, eos) if eos.size else np.zeros(len(alive), dtype=bool)
        if finished.any():
            lengths[alive[finished]] = cur_len
            keep = np.nonzero(~finished)[0]
            if keep.size == 0:
                break
            alive = alive[keep]
            nxt = nxt[keep]
            state = decoder.select(state, keep)
        tokens = nxt[:, None].astype(np.int64)
    return [seqs[i, : lengths[i]].tolist() for i in range(batch_size)]


# ------------------------------------------------------------------------------------------------------------
# Beam search (transformers 4.57 `_beam_search`, per batch item; done items are dropped from the decoder)


def _beam_search(
    decoder: Decoder,
    encoder_batch: Any,
    batch_size: int,
    settings: GenerationSettings,
    processors: _Processors,
    max_length: int,
) -> list[list[int]]:
    nb = settings.num_beams
    prompt_len = 1
    eos = np.asarray(settings.eos_token_id, dtype=np.int64)
    k_keep = max(2, 1 + eos.size) * nb  # top-K candidates so that nb non-finished ones always remain
    top_nb_mask = np.arange(k_keep) < nb
    lp = settings.length_penalty
    es = settings.early_stopping

    running = np.full((batch_size, nb, max_length), settings.pad_token_id, dtype=np.int64)
    running[:, :, 0] = settings.decoder_start_token_id
    running_scores = np.zeros((batch_size, nb), dtype=np.float32)
    running_scores[:, 1:] = -_BIG  # only beam 0 may expand at first: all beams start identical
    finished = running.copy()
    finished_scores = np.full((batch_size, nb), -_BIG, dtype=np.float32)
    finished_len = np.full((batch_size, nb), prompt_len, dtype=np.int64)
    is_finished = np.zeros((batch_size, nb), dtype=bool)
    heuristic_open = np.ones(batch_size, dtype=bool)

    alive = np.arange(batch_size)  # items still searched; decoder rows are alive-item-major, beam-minor
    # Every beam starts as the same row, so the first step runs one row per item and its logits stand for all nb
    # (the first step is the dear one: a decoder computes its cross-attention keys and values there).
    state = decoder.start(encoder_batch, 1)
    state_beams = 1  # decoder rows per alive item in ``state``: 1 until the first select, nb after
    tokens = running[:, 0, :1].copy()
    cur_len = prompt_len
    while alive.size:
        n_alive = alive.size
        logits, state = decoder.step(state, tokens)
        if state_beams == 1:
            logits = np.repeat(logits, nb, axis=0)
        vocab = logits.shape[1]
        log_probs = _log_softmax(np.asarray(logits, dtype=np.float32))
        history = running[alive, :, :cur_len].reshape(n_alive * nb, cur_len)
        log_probs = processors(history, log_probs)
        acc = (log_probs.reshape(n_alive, nb, vocab) + running_scores[alive][:, :, None]).reshape(n_alive, -1)

        # c. top-K continuations over all beams of each item
        top_idx = _topk(acc, k_keep)
        top_scores = np.take_along_axis(acc, top_idx, axis=1)
        top_beam = top_idx // vocab
        top_ids = top_idx % vocab
        top_seqs = np.take_along_axis(running[alive], top_beam[:, :, None], axis=1)
        top_seqs[:, :, cur_len] = top_ids

        # d. which continuations hit a stopping criterion (EOS, or max_length reached)
        hits = np.isin(top_ids, eos) if eos.size else np.zeros_like(top_ids, dtype=bool)
        if cur_len + 1 >= max_length:
            hits[:] = True

        # e. best nb non-finished continuations keep running
        run_scores = top_scores + hits.astype(np.float32) * -_BIG
        next_idx = _topk(run_scores, nb)
        running[alive] = np.take_along_axis(top_seqs, next_idx[:, :, None], axis=1)
        running_scores[alive] = np.take_along_axis(run_scores, next_idx, axis=1)
        source_beam = np.take_along_axis(top_beam, next_idx, axis=1)

        # f. merge newly finished hypotheses into the finished set
        just_finished = hits & top_nb_mask[None, :]
        cand = top_scores / np.float32((cur_len + 1 - prompt_len) ** lp)
        if es is True:
            cand = cand + (is_finished[alive].all(axis=1, keepdims=True)).astype(np.float32) * -_BIG
        cand = cand + (~heuristic_open[alive])[:, None].astype(np.float32) * -_BIG
        cand = cand + (~just_finished).astype(np.float32) * -_BIG
        merged_scores = np.concatenate([finished_scores[alive], cand.astype(np.float32)], axis=1)
        merged_seqs = np.concatenate([finished[alive], top_seqs], axis=1)
        merged_len = np.concatenate(
            [finished_len[alive], np.full((n_alive, k_keep), cur_len + 1, dtype=np.int64)], axis=1
        )
        merged_fin = np.concatenate([is_finished[alive], just_finished], axis=1)
        best = _topk(merged_scores, nb)
        finished_scores[alive] = np.take_along_axis(merged_scores, best, axis=1)
        finished[alive] = np.take_along_axis(merged_seqs, best[:, :, None], axis=1)
        finished_len[alive] = np.take_along_axis(merged_len, best, axis=1)
        is_finished[alive] = np.take_along_axis(merged_fin, best, axis=1)

        cur_len += 1

        # g. early-stop heuristic and per-item "done"
        best_len = max_length - prompt_len if es == "never" and lp > 0.0 else cur_len - prompt_len
        best_running = running_scores[alive][:, 0] / np.float32(best_len**lp)
        worst_finished = np.where(
            is_finished[alive], finished_scores[alive].min(axis=1, keepdims=True), -_BIG
        )
        heuristic_open[alive] &= np.any(best_running[:, None] > worst_finished, axis=1)
        done = ~heuristic_open[alive] | hits.all(axis=1)
        if es is True:
            done |= is_finished[alive].all(axis=1)
        if cur_len >= max_length:
            done[:] = True
        keep_items = np.nonzero(~done)[0]
        if keep_items.size == 0:
            break
        rows = (keep_items[:, None] * nb + source_beam[keep_items]).reshape(-1)
        alive = alive[keep_items]
        state = decoder.select(state, (rows // (nb // state_beams)).astype(np.int64))
        state_beams = nb
        tokens = running[alive, :, cur_len - 1].reshape(-1, 1).copy()

    out: list[list[int]] = []
    for item in range(batch_size):
        for j in range(settings.num_return_sequences):
            out.append(finished[item, j, : finished_len[item, j]].tolist())
    return out
