"""Next-token sampling: llama.cpp's default sampler chain, vectorised in numpy.

Order (llama.cpp ``common_params_sampling::samplers``, with the samplers we do not implement
— DRY, top-n-sigma, typical-p, XTC — left out since their defaults disable them):

    repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw

top-p and min-p look at the probabilities *before* temperature (softmax at T = 1 of the
surviving candidates), exactly as in llama.cpp; temperature only reshapes the final draw.
``temperature <= 0`` is greedy: the argmax after the repetition penalty, which is what
llama.cpp's chain yields there (its temperature sampler keeps only the largest logit).

Speed: with the default top-k the work after one ``argpartition`` over the vocabulary is on
k candidates, so a 128k vocabulary costs ~0.2 ms. With top-k disabled, top-p first sorts
only the 256 largest logits (llama.cpp's heuristic too) and widens that prefix 8x at a time
while its mass falls short of p.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# top-p without top-k: the prefix tried before sorting the whole vocabulary.
_TOP_P_FIRST_PREFIX = 256
_TOP_P_PREFIX_GROWTH = 8


@dataclass
class SamplingParams:
    """Sampler settings; the defaults are llama.cpp's (``--temp 0.8 --top-k 40 …``).

    temperature <= 0: greedy. top_k <= 0, top_p == 1, min_p == 0, repeat_penalty == 1:
    that stage is off. repeat_last_n: how many recent tokens the penalty looks at
    (0: none, -1: the whole history).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first setting that makes no sense."""
        if math.isnan(self.temperature):
            raise ValueError("temperature is NaN; use a number (<= 0 means greedy)")
        if not isinstance(self.top_k, (int, np.integer)):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r} (<= 0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p} (1 disables it)")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p} (0 disables it)")
        if not 0.0 < self.repeat_penalty < math.inf:
            raise ValueError(
                f"repeat_penalty must be a finite number > 0, got {self.repeat_penalty} "
                "(1 disables it)"
            )
        if not isinstance(self.repeat_last_n, (int, np.integer)) or self.repeat_last_n < -1:
            raise ValueError(
                f"repeat_last_n must be an integer >= -1, got {self.repeat_last_n!r} "
                "(0: no penalty window, -1: the whole history)"
            )


class Sampler:
    """Picks the next token from logits; reproducible for a given seed.

    ``seed=None`` draws a random seed and records it in ``.seed``, so a run can be repeated.
    """

    def __init__(self, params: SamplingParams, seed: int | None = None) -> None:
        params.validate()
        if seed is None:
            seed = secrets.randbits(32)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
        self.params = params
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)

    def sample(self, logits: np.ndarray, history: Sequence[int]) -> int:
        """The next token id. ``logits``: (n_vocab,), not modified. ``history``: token ids so
        far (prompt and generated), oldest first; only the repetition penalty reads it."""
        p = self.params
        logits = _checked_logits(logits)
        logits = apply_repeat_penalty(logits, history, p.repeat_penalty, p.repeat_last_n)
        if p.temperature <= 0.0:
            return int(np.argmax(logits))
        ids, cand, is_sorted = top_k(logits, p.top_k)
        ids, cand, is_sorted = top_p(ids, cand, is_sorted, p.top_p)
        ids, cand = min_p(ids, cand, p.min_p)
        return int(ids[self._draw(cand / p.temperature)])

    def _draw(self, logits: np.ndarray) -> int:
        """Index drawn from softmax(logits), by one uniform number (inverse CDF)."""
        cdf = np.cumsum(_softmax(logits))
        index = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
        return min(index, cdf.size - 1)


# --- the stages, each usable on its own ---------------------------------------------------


class NonFiniteLogits(ValueError):
    """The logits' maximum is NaN or inf: nothing can be sampled from them."""


def _checked_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array (n_vocab,), got {logits.shape}")
    top = logits.max()
    if not np.isfinite(top):
        raise NonFiniteLogits(
            f"logits contain {top} as their maximum; the forward pass produced NaN or inf"
        )
    return logits


def apply_repeat_penalty(
    logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int
) -> np.ndarray:
    """llama.cpp's repetition penalty: each distinct token among the last ``last_n`` of
    ``history`` has its logit divided by ``penalty`` if positive, multiplied if not (dividing
    a negative logit would *raise* its probability). Returns a copy when anything changes."""
    if penalty == 1.0 or last_n == 0 or len(history) == 0:
        return logits
    window = history if last_n < 0 else history[-last_n:]
    seen = np.unique(np.asarray(window, dtype=np.int64))
    if seen[0] < 0 or seen[-1] >= logits.size:
        raise ValueError(
            f"history holds token id {seen[0] if seen[0] < 0 else seen[-1]}, outside the "
            f"vocabulary of {logits.size} logits"
        )
    out = logits.copy()
    hit = out[seen]
    out[seen] = np.where(hit > 0, hit / penalty, hit * penalty)
    return out


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The k largest logits as (ids, logits, sorted): sorted descending when k is on, else
    the whole vocabulary unsorted (sorting 128k logits for nothing would cost ~1 ms)."""
    if k <= 0 or k >= logits.size:
        return np.arange(logits.size), logits, False
    ids = np.argpartition(logits, -k)[-k:]
    ids = ids[np.argsort(logits[ids])[::-1]]
    return ids, logits[ids], True


def top_p(
    ids: np.ndarray, logits: np.ndarray, is_sorted: bool, p: float
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Nucleus: the shortest run of most-likely candidates whose probability reaches p
    (at least one). Returns the kept candidates sorted descending."""
    if p >= 1.0:
        return ids, logits, is_sorted
    probs = _softmax(logits)
    order = np.arange(logits.size) if is_sorted else _nucleus_candidates(logits, probs, p)
    n_keep = _nucleus_size(probs[order], p)
    kept = order[:n_keep]
    return ids[kept], logits[kept], True


def min_p(ids: np.ndarray, logits: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep candidates with probability >= p x the largest probability; in logits that is
    logit >= max + ln p, which needs no softmax. The most likely token always survives."""
    if p <= 0.0:
        return ids, logits
    keep = logits >= logits.max() + math.log(p)
    return ids[keep], logits[keep]


def _nucleus_candidates(logits: np.ndarray, probs: np.ndarray, p: float) -> np.ndarray:
    """Indices, descending, of a prefix of the most likely tokens that holds mass >= p: the
    first 256, then 8x as many until enough, so that a peaked distribution is never sorted
    in full."""
    n = min(_TOP_P_FIRST_PREFIX, logits.size)
    while True:
        order = _largest_first(logits, n)
        if n == logits.size or probs[order].sum() >= p:
            return order
        n = min(n * _TOP_P_PREFIX_GROWTH, logits.size)


def _largest_first(logits: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest logits, descending."""
    part = np.argpartition(logits, -n)[-n:] if n < logits.size else np.arange(logits.size)
    return part[np.argsort(logits[part])[::-1]]


def _nucleus_size(sorted_probs: np.ndarray, p: float) -> int:
    """How many leading probabilities it takes for their sum to reach p (llama.cpp: cum >= p)."""
    reached = np.searchsorted(np.cumsum(sorted_probs), p, side="left")
    return int(min(reached + 1, sorted_probs.size))


def _softmax(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits.astype(np.float64) - logits.max())
    return weights / weights.sum()
