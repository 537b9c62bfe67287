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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from capwatch.config import ModelConfig

#: transformers' "finished / impossible" score offset (not -inf, so arithmetic on it stays finite).
_BIG = np.float32(1.0e9)
#: transformers' GenerationConfig().max_length; a config that leaves it at this value gets it counted in
#: *new* tokens.
_DEFAULT_MAX_LENGTH = 20


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

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_return_sequences < 1 or self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences must be between 1 and num_beams ({self.num_beams}), "
                f"got {self.num_return_sequences}"
            )
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

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
        token can be found or a value is invalid.
        """
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
# Logits processors (transformers' order: repetition penalty, no-repeat n-gram, min length, forced BOS,
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

    def __call__(self, history: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Apply the processors in place to ``scores`` [rows, vocab] given ``history`` [rows, cur_len]."""
        cur_len = history.shape[1]
        if self.repetition_penalty != 1.0:
            seen = np.take_along_axis(scores, history, axis=1)
            seen = np.where(seen < 0, seen * self.repetition_penalty, seen / self.repetition_penalty)
            np.put_along_axis(scores, history, seen.astype(scores.dtype), axis=1)
        if self.ngram > 0 and cur_len + 1 >= self.ngram:
            _ban_repeated_ngrams(history, scores, self.ngram)
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


def _topk(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values per row, best first (ties: lower index first)."""
    n = values.shape[1]
    if k < n:
        part = np.argpartition(-values, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), values.shape).copy()
    chosen = np.take_along_axis(values, part, axis=1)
    order = np.lexsort((part, -chosen), axis=1)
    result: np.ndarray = np.take_along_axis(part, order, axis=1)
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
    state = decoder.start(encoder_batch, nb)
    tokens = running[:, :, 0].reshape(-1, 1).copy()
    cur_len = prompt_len
    while alive.size:
        n_alive = alive.size
        logits, state = decoder.step(state, tokens)
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
        state = decoder.select(state, rows.astype(np.int64))
        tokens = running[alive, :, cur_len - 1].reshape(-1, 1).copy()

    out: list[list[int]] = []
    for item in range(batch_size):
        for j in range(settings.num_return_sequences):
            out.append(finished[item, j, : finished_len[item, j]].tolist())
    return out
