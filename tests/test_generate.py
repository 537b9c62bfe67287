"""capwatch.models.generate on small numpy decoders: processors, lengths, batching and row dropping.

Token-level parity with transformers is checked on real ONNX fixtures in test_vit_gpt2_parity.py; these tests pin
the behaviours one at a time with decoders whose logits are known.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest

from capwatch.config import ModelConfig
from capwatch.models.generate import GenerationSettings, generate

VOCAB = 12
EOS = 1
START = 0


def settings(**changes: Any) -> GenerationSettings:
    base = GenerationSettings(
        max_length=10, max_new_tokens=None, min_length=0, min_new_tokens=None, num_beams=1, length_penalty=1.0,
        early_stopping=False, no_repeat_ngram_size=0, decoder_start_token_id=START, bos_token_id=None,
        eos_token_id=(EOS,), pad_token_id=EOS, forced_bos_token_id=None, forced_eos_token_id=None,
    )
    return replace(base, **changes)


@dataclass(frozen=True)
class RnnState:
    enc: np.ndarray
    h: np.ndarray


class ToyRnn:
    """A deterministic little recurrent decoder: each row's logits depend only on its own history."""

    def __init__(self, seed: int = 0, eos_bias: float = 0.0) -> None:
        rng = np.random.default_rng(seed)
        self.emb = rng.normal(size=(VOCAB, 16)) * 1.5
        self.rec = rng.normal(size=(16, 16)) * 0.5
        self.out = rng.normal(size=(16, VOCAB)) * 2.0
        self.bias = np.zeros(VOCAB)
        self.bias[EOS] = eos_bias
        self.rows_per_step: list[int] = []

    def start(self, encoder_batch: Any, expand: int) -> RnnState:
        enc = np.repeat(np.asarray(encoder_batch, dtype=np.float64), expand, axis=0)
        return RnnState(enc, np.zeros_like(enc))

    def step(self, state: Any, input_ids: np.ndarray) -> tuple[np.ndarray, RnnState]:
        self.rows_per_step.append(input_ids.shape[0])
        h = np.tanh(state.h @ self.rec + self.emb[input_ids[:, 0]] + state.enc)
        return (h @ self.out + self.bias).astype(np.float32), RnnState(state.enc, h)

    def select(self, state: Any, rows: np.ndarray) -> RnnState:
        assert rows.size > 0
        return RnnState(state.enc[rows], state.h[rows])


class StaticLogits:
    """Every row, every step: the same logits vector."""

    def __init__(self, logits: list[float]) -> None:
        self.logits = np.asarray(logits, dtype=np.float32)

    def start(self, encoder_batch: Any, expand: int) -> int:
        return len(encoder_batch) * expand

    def step(self, state: Any, input_ids: np.ndarray) -> tuple[np.ndarray, int]:
        return np.tile(self.logits, (input_ids.shape[0], 1)), input_ids.shape[0]

    def select(self, state: Any, rows: np.ndarray) -> int:
        return rows.size


def encoders(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 16))


@pytest.mark.parametrize("num_beams", [1, 2, 4])
def test_batch_results_equal_one_item_at_a_time(num_beams: int) -> None:
    enc = encoders(5)
    s = settings(num_beams=num_beams, max_length=12, length_penalty=1.3, no_repeat_ngram_size=2)
    batched = generate(ToyRnn(eos_bias=2.0), enc, 5, s)
    single = [generate(ToyRnn(eos_bias=2.0), enc[i : i + 1], 1, s)[0] for i in range(5)]
    assert batched == single
    assert all(seq[0] == START for seq in batched)


def test_greedy_drops_finished_rows_so_later_steps_run_fewer_rows() -> None:
    enc = encoders(6)
    decoder = ToyRnn(seed=3, eos_bias=1.0)
    out = generate(decoder, enc, 6, settings(max_length=15))
    ended = [s for s in out if s[-1] == EOS and len(s) < 15]
    assert ended and len(ended) < 6, "the toy model should stop some rows early and not others"
    assert decoder.rows_per_step[0] == 6
    assert decoder.rows_per_step == sorted(decoder.rows_per_step, reverse=True)
    assert decoder.rows_per_step[-1] < 6
    # Each row's tokens stop at its EOS: nothing (no padding) after it.
    assert all(EOS not in s[1:-1] for s in out)


def test_beam_search_runs_one_row_per_item_first_and_drops_items_that_are_done() -> None:
    enc = encoders(4, seed=3)
    decoder = ToyRnn(seed=2, eos_bias=3.0)
    generate(decoder, enc, 4, settings(num_beams=3, max_length=16, early_stopping=True))
    assert decoder.rows_per_step[0] == 4  # every beam starts as the same row: the first step runs one per item
    assert decoder.rows_per_step[1] == 12
    assert decoder.rows_per_step[-1] < 12
    assert all(n % 3 == 0 for n in decoder.rows_per_step[1:])


def test_greedy_without_eos_runs_to_max_length_and_max_new_tokens_wins() -> None:
    out = generate(ToyRnn(eos_bias=-50.0), encoders(2), 2, settings(max_length=9))
    assert [len(s) for s in out] == [9, 9]
    out = generate(ToyRnn(eos_bias=-50.0), encoders(2), 2, settings(max_length=9, max_new_tokens=4))
    assert [len(s) for s in out] == [5, 5]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_min_length_blocks_eos_until_reached(num_beams: int) -> None:
    eager = StaticLogits([0.0, 5.0] + [1.0] * (VOCAB - 2))  # EOS is always the best token
    out = generate(eager, [0], 1, settings(num_beams=num_beams, min_length=5, max_length=10))[0]
    assert len(out) == 6 and out[-1] == EOS and EOS not in out[:-1]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_no_repeat_ngram_size_bans_repeated_ngrams(num_beams: int) -> None:
    loops = StaticLogits([0.0, -10.0, 3.0, 2.9, 2.8] + [0.0] * (VOCAB - 5))
    out = generate(loops, [0], 1, settings(num_beams=num_beams, no_repeat_ngram_size=2, max_length=10))[0]
    bigrams = list(itertools.pairwise(out))
    assert len(bigrams) == len(set(bigrams))
    plain = generate(loops, [0], 1, settings(num_beams=num_beams, max_length=10))[0]
    assert plain == [START] + [2] * 9


def test_repetition_penalty_as_transformers_applies_it_to_greedy_logits() -> None:
    # A (2.0) wins, then as a seen token it scores 2.0/1.3 = 1.54 < B (1.9); then both are seen: 1.54 > 1.46.
    logits = StaticLogits([-5.0, -10.0, 2.0, 1.9] + [-1.0] * (VOCAB - 4))
    out = generate(logits, [0], 1, settings(repetition_penalty=1.3, max_length=5))[0]
    assert out == [START, 2, 3, 2, 2]


@pytest.mark.parametrize("num_beams", [1, 2])
def test_forced_bos_and_forced_eos(num_beams: int) -> None:
    never_ends = StaticLogits([0.0, -20.0, 1.0, 3.0] + [0.0] * (VOCAB - 4))
    s = settings(num_beams=num_beams, forced_bos_token_id=5, forced_eos_token_id=EOS, max_length=7)
    out = generate(never_ends, [0, 0], 2, s)
    for seq in out:
        assert seq[1] == 5
        assert seq[-1] == EOS and len(seq) == 7


def test_num_return_sequences_returns_distinct_best_first_hypotheses() -> None:
    out = generate(ToyRnn(), encoders(2), 2, settings(num_beams=4, num_return_sequences=3, max_length=8))
    assert len(out) == 6
    assert len({tuple(s) for s in out[:3]}) == 3


def test_length_penalty_and_early_stopping_change_beam_results() -> None:
    enc = encoders(6, seed=5)
    results = {
        (lp, es): generate(ToyRnn(seed=4, eos_bias=1.0), enc, 6,
                           settings(num_beams=3, max_length=14, length_penalty=lp, early_stopping=es))
        for lp in (-1.0, 2.0)
        for es in (True, False, "never")
    }
    assert len({tuple(map(tuple, r)) for r in results.values()}) >= 2
    short = sum(len(s) for s in results[(-1.0, False)])
    long = sum(len(s) for s in results[(2.0, False)])
    assert short <= long  # a negative penalty favours shorter hypotheses


def test_settings_from_configs_precedence_and_transformers_length_rules() -> None:
    gen = {"num_beams": 4, "max_length": 16, "eos_token_id": [7, 8], "decoder_start_token_id": 3,
           "no_repeat_ngram_size": 3, "length_penalty": 2.0}
    s = GenerationSettings.from_configs(gen, {}, ModelConfig())
    assert (s.num_beams, s.max_length, s.eos_token_id, s.pad_token_id) == (4, 16, (7, 8), 7)
    s = GenerationSettings.from_configs(gen, {}, ModelConfig(num_beams=1, max_new_tokens=5, length_penalty=1.0,
                                                             no_repeat_ngram_size=0, early_stopping=True))
    assert (s.num_beams, s.max_length, s.length_penalty, s.no_repeat_ngram_size, s.early_stopping) == (
        1, 6, 1.0, 0, True)
    # max_length left at transformers' default (20) means 20 new tokens, capped by max_position_embeddings.
    assert GenerationSettings.from_configs({"decoder_start_token_id": 0}, {}, ModelConfig()).max_length == 21
    assert GenerationSettings.from_configs({"bos_token_id": 0}, {"max_position_embeddings": 18},
                                           ModelConfig()).max_length == 18
    # min_new_tokens counts after the decoder start token.
    assert GenerationSettings.from_configs({"bos_token_id": 0, "min_new_tokens": 4}, {}, ModelConfig()).min_length == 5


def test_settings_fall_back_to_legacy_model_config_and_decoder_subconfig() -> None:
    model_config = {"decoder_start_token_id": 50256, "pad_token_id": 50256,
                    "decoder": {"bos_token_id": 50256, "eos_token_id": 50256, "num_beams": 4, "max_length": 16}}
    s = GenerationSettings.from_configs({}, model_config, ModelConfig())
    assert (s.decoder_start_token_id, s.eos_token_id, s.num_beams, s.max_length) == (50256, (50256,), 4, 16)
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        GenerationSettings.from_configs({"eos_token_id": 2}, {}, ModelConfig())
    with pytest.raises(ValueError, match="early_stopping"):
        settings(early_stopping="sometimes")


@pytest.mark.parametrize("num_beams", [1, 3])
def test_bad_words_ids_one_token_is_never_generated(num_beams: int) -> None:
    favourite = StaticLogits([0.0, -10.0, 5.0, 4.0] + [0.0] * (VOCAB - 4))  # token 2 always wins unless banned
    assert generate(favourite, [0], 1, settings(num_beams=num_beams, max_length=6))[0][1:] == [2] * 5
    out = generate(favourite, [0], 1, settings(num_beams=num_beams, max_length=6, bad_words_ids=((2,),)))[0]
    assert 2 not in out and out[1:] == [3] * 5


def test_bad_words_ids_sequence_bans_its_last_token_only_after_its_prefix() -> None:
    # 2 then 3 alternate by repetition penalty; banning (2, 3) forbids 3 right after 2 only.
    logits = StaticLogits([-5.0, -10.0, 2.0, 1.9] + [-1.0] * (VOCAB - 4))
    plain = generate(logits, [0], 1, settings(repetition_penalty=1.3, max_length=5))[0]
    assert plain == [START, 2, 3, 2, 2]
    banned = generate(logits, [0], 1, settings(repetition_penalty=1.3, max_length=5, bad_words_ids=((2, 3),)))[0]
    assert all(pair != (2, 3) for pair in itertools.pairwise(banned))


def test_bad_words_ids_equal_to_eos_are_ignored_as_transformers_does() -> None:
    eager = StaticLogits([0.0, 5.0] + [1.0] * (VOCAB - 2))
    out = generate(eager, [0], 1, settings(bad_words_ids=((EOS,),), max_length=6))[0]
    assert out == [START, EOS]


def test_bad_words_ids_are_read_from_generation_config_and_checked() -> None:
    s = GenerationSettings.from_configs({"bad_words_ids": [[7], [3, 4]], "decoder_start_token_id": 0}, {},
                                        ModelConfig())
    assert s.bad_words_ids == ((7,), (3, 4))
    from capwatch.models.generate import check_generation_keys
    with pytest.raises(ValueError, match="bad_words_ids"):
        check_generation_keys({"bad_words_ids": [[99]]}, max_positions=None, vocab_size=12)
    with pytest.raises(ValueError, match="bad_words_ids"):
        check_generation_keys({"bad_words_ids": [5]}, max_positions=None, vocab_size=12)


@pytest.mark.parametrize("k", [1, 6, 12])
def test_top_k_of_wide_rows_is_the_k_largest_best_first_ties_by_lower_index(k: int) -> None:
    from capwatch.models.generate import _topk

    rng = np.random.default_rng(k)
    rows = rng.normal(size=(4, 3 * 51289)).astype(np.float32)
    rows[1, rng.integers(0, rows.shape[1], 5000)] = -np.inf  # banned tokens
    rows[2, :] = np.round(rows[2, :], 1)  # many ties, some of them at the boundary
    rows[3, : rows.shape[1] - 3] = -np.inf  # fewer finite values than k: -inf ones fill in, by index
    expected = [np.lexsort((np.arange(row.size), -row))[:k] for row in rows]
    assert np.array_equal(_topk(rows, k), np.stack(expected))
