"""Sampler: each stage keeps the hand-computed set, draws follow the softmax, seeds repeat."""

from __future__ import annotations

import time

import numpy as np
import pytest

from prosparse.sampling import (
    Sampler,
    SamplingParams,
    apply_repeat_penalty,
    min_p,
    top_k,
    top_p,
)

# probabilities 0.5, 0.3, 0.15, 0.05 as logits, shuffled so that ids differ from ranks
PROBS = np.array([0.15, 0.5, 0.05, 0.3])
LOGITS = np.log(PROBS).astype(np.float32)
ONLY_DRAW = dict(top_k=0, top_p=1.0, min_p=0.0)  # every filter off


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def kept_ids(ids: np.ndarray) -> set[int]:
    return {int(i) for i in ids}


# --- greedy and the repetition penalty ----------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_greedy_is_argmax(temperature):
    logits = np.random.default_rng(0).standard_normal(49152).astype(np.float32)
    sampler = Sampler(SamplingParams(temperature=temperature), seed=1)
    assert sampler.sample(logits, history=[]) == int(np.argmax(logits))


def test_greedy_sees_the_penalty():
    logits = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.5), seed=1)
    assert sampler.sample(logits, history=[0]) == 1  # 2.0 / 1.5 < 1.9


def test_penalty_divides_positive_and_multiplies_the_rest():
    logits = np.array([2.0, -1.0, 0.0, 3.0], dtype=np.float32)
    before = logits.copy()
    out = apply_repeat_penalty(logits, [0, 1, 2, 0], penalty=2.0, last_n=64)
    # token 0 appears twice but is penalised once; token 3 is not in the history
    np.testing.assert_array_equal(out, [1.0, -2.0, 0.0, 3.0])
    np.testing.assert_array_equal(logits, before)  # the caller's array is untouched


@pytest.mark.parametrize(
    "last_n, expected",
    [
        (0, [2.0, -1.0, 4.0]),  # window off
        (1, [2.0, -1.0, 2.0]),  # only the latest token (2)
        (2, [2.0, -2.0, 2.0]),  # tokens 1 and 2
        (-1, [1.0, -2.0, 2.0]),  # the whole history
    ],
)
def test_penalty_window(last_n, expected):
    logits = np.array([2.0, -1.0, 4.0], dtype=np.float32)
    out = apply_repeat_penalty(logits, [0, 1, 2], penalty=2.0, last_n=last_n)
    np.testing.assert_array_equal(out, expected)


def test_penalty_rejects_token_outside_vocabulary():
    with pytest.raises(ValueError, match="token id 7"):
        apply_repeat_penalty(np.zeros(4, np.float32), [7], penalty=1.1, last_n=64)


# --- the filters keep exactly the expected sets -------------------------------------------


def test_top_k_keeps_the_k_largest_sorted():
    logits = np.array([0.1, 5.0, -2.0, 3.0, 4.0, 1.0], dtype=np.float32)
    ids, kept, is_sorted = top_k(logits, 3)
    assert is_sorted
    assert ids.tolist() == [1, 4, 3]
    assert kept.tolist() == [5.0, 4.0, 3.0]


@pytest.mark.parametrize("k", [0, -1, 6, 100])
def test_top_k_off_keeps_everything(k):
    logits = np.arange(6, dtype=np.float32)
    ids, _, _ = top_k(logits, k)
    assert kept_ids(ids) == set(range(6))


@pytest.mark.parametrize("is_sorted", [False, True])
@pytest.mark.parametrize(
    "p, expected",
    [
        (0.4, {1}),  # 0.5 alone reaches it
        (0.75, {1, 3}),  # 0.5 + 0.3
        (0.85, {1, 3, 0}),  # 0.5 + 0.3 + 0.15
        (0.99, {1, 3, 0, 2}),
    ],
)
def test_top_p_keeps_shortest_prefix_reaching_p(p, expected, is_sorted):
    ids = np.argsort(-LOGITS) if is_sorted else np.arange(4)
    kept, _, now_sorted = top_p(ids, LOGITS[ids], is_sorted, p)
    assert kept_ids(kept) == expected
    assert now_sorted


def test_top_p_beyond_the_first_prefix_sorts_everything():
    # 1000 equal logits: the 256 largest hold 25.6% of the mass, short of p
    ids, kept_logits, _ = top_p(np.arange(1000), np.zeros(1000, np.float32), False, 0.4995)
    assert ids.size == 500 and np.unique(ids).size == 500
    assert kept_logits.size == 500


@pytest.mark.parametrize(
    "p, expected", [(0.2, {1, 3, 0}), (0.5, {1, 3}), (1.0, {1}), (0.0, {0, 1, 2, 3})]
)
def test_min_p_keeps_relative_to_the_largest(p, expected):
    # threshold p x 0.5: 0.2 -> 0.1, 0.5 -> 0.25, 1.0 -> only the largest
    ids, _ = min_p(np.arange(4), LOGITS, p)
    assert kept_ids(ids) == expected


def test_chain_draws_only_from_the_surviving_set():
    # 10 tokens; top-k 6 drops 4 of them, top-p 0.9 then min-p 0.2 narrow further
    logits = np.log(np.array([0.30, 0.02, 0.25, 0.01, 0.15, 0.10, 0.08, 0.04, 0.03, 0.02]))
    # top-k 6: {0,2,4,5,6,7}; top-p 0.9 on their renormalised mass (0.92 in all):
    # 0.326, 0.598, 0.761, 0.870, 0.957 -> {0,2,4,5,6}; min-p 0.2 x 0.30 = 0.06 -> same
    params = SamplingParams(temperature=1.0, top_k=6, top_p=0.9, min_p=0.2)
    sampler = Sampler(params, seed=3)
    drawn = {sampler.sample(logits, []) for _ in range(2000)}
    assert drawn == {0, 2, 4, 5, 6}
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=6, top_p=0.9, min_p=0.3), seed=3)
    # min-p 0.3 x 0.30 = 0.09 now also drops token 6 (0.08)
    assert {sampler.sample(logits, []) for _ in range(2000)} == {0, 2, 4, 5}


# --- the draw -----------------------------------------------------------------------------


def test_frequencies_follow_softmax_at_temperature():
    logits = np.array([1.0, 0.2, -0.5, 2.0, 0.0], dtype=np.float32)
    temperature, n = 0.7, 40_000
    sampler = Sampler(SamplingParams(temperature=temperature, **ONLY_DRAW), seed=1234)
    counts = np.bincount([sampler.sample(logits, []) for _ in range(n)], minlength=5)
    expected = softmax(logits.astype(np.float64) / temperature)
    # binomial sd <= sqrt(0.25 / n) = 0.0025; allow 4 sd
    np.testing.assert_allclose(counts / n, expected, atol=0.01)


def test_frequencies_renormalise_over_the_kept_set():
    # min-p 0.2 keeps {1, 3, 0} (threshold 0.1); temperature 1 -> 0.5/0.95, 0.3/0.95, 0.15/0.95
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2), seed=7)
    n = 40_000
    counts = np.bincount([sampler.sample(LOGITS, []) for _ in range(n)], minlength=4)
    np.testing.assert_allclose(counts / n, [0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95], atol=0.01)


def test_same_seed_same_tokens_different_seed_different():
    logits = np.zeros(1000, dtype=np.float32)
    params = SamplingParams(temperature=1.0, **ONLY_DRAW)

    def run(seed: int) -> list[int]:
        sampler = Sampler(params, seed=seed)
        return [sampler.sample(logits, []) for _ in range(50)]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_random_seed_is_recorded_and_replays():
    logits = np.zeros(1000, dtype=np.float32)
    params = SamplingParams(temperature=1.0, **ONLY_DRAW)
    first = Sampler(params)
    replay = Sampler(params, seed=first.seed)
    drawn = [first.sample(logits, []) for _ in range(20)]
    assert drawn == [replay.sample(logits, []) for _ in range(20)]


def test_default_chain_is_fast_on_a_large_vocabulary():
    logits = np.random.default_rng(0).standard_normal(128_256).astype(np.float32) * 3
    history = list(range(0, 6400, 100))
    sampler = Sampler(SamplingParams(repeat_penalty=1.1), seed=0)
    times = []
    for _ in range(50):
        start = time.perf_counter()
        sampler.sample(logits, history)
        times.append(time.perf_counter() - start)
    # typically ~0.2 ms; the bound leaves room for a busy machine
    assert np.median(times) < 5e-3


# --- invalid input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(repeat_penalty=-1.0), "repeat_penalty"),
        (dict(repeat_penalty=0.0), "repeat_penalty"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(repeat_last_n=-2), "repeat_last_n"),
        (dict(top_k=2.5), "top_k"),
        (dict(temperature=float("nan")), "temperature"),
    ],
)
def test_invalid_params_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad)


def test_params_changed_after_construction_are_checked_by_sampler():
    params = SamplingParams()
    params.top_p = 2.0
    with pytest.raises(ValueError, match="top_p"):
        Sampler(params)


@pytest.mark.parametrize("seed", [-1, 1.5])
def test_invalid_seed_raises(seed):
    with pytest.raises(ValueError, match="seed"):
        Sampler(SamplingParams(), seed=seed)


@pytest.mark.parametrize(
    "logits, match",
    [
        (np.zeros((2, 3), np.float32), "1-D"),
        (np.zeros(0, np.float32), "1-D"),
        (np.array([0.0, np.nan], np.float32), "NaN or inf"),
        (np.full(3, -np.inf, np.float32), "NaN or inf"),
    ],
)
def test_invalid_logits_raise(logits, match):
    with pytest.raises(ValueError, match=match):
        Sampler(SamplingParams(), seed=0).sample(logits, [])
