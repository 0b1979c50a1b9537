"""The two schedules of a run, as pure functions of the step number (1-based: step t is the
t-th optimizer update). Resuming a run therefore needs no scheduler state beyond the step.
"""

from __future__ import annotations

import math


def lambda_at(step: int, stages: list[list[float]], relu_steps: int = 0) -> float:
    """λ(t) of ProSparse's progressive sparsity regularisation (REFERENCE §1, Algorithm 1).

    ``stages`` = [[λ1, T1], …, [λS, TS]] with λ1 ≤ … ≤ λS and relu_steps < T1 < … < TS
    (cumulative step numbers).

    - t ≤ relu_steps: stage 0, activation substitution only, λ = 0;
    - relu_steps < t ≤ T1: the warm-up stage, λ = λ1 constant;
    - T(i−1) < t ≤ Ti: η = ½·[sin(−π/2 + π·(t − T(i−1)) / (Ti − T(i−1))) + 1],
      λ = λ(i−1) + η·(λi − λ(i−1)) — a sine rise that ends at λi; equal neighbours stay constant;
    - t > TS: λS.
    """
    if step <= relu_steps or not stages:
        return 0.0
    previous_peak, previous_end = None, relu_steps
    for peak, end in stages:
        if step <= end:
            if previous_peak is None:
                return float(peak)
            eta = 0.5 * (math.sin(-math.pi / 2 + math.pi * (step - previous_end) / (end - previous_end)) + 1.0)
            return previous_peak + eta * (peak - previous_peak)
        previous_peak, previous_end = float(peak), end
    return float(stages[-1][0])


def lr_at(step: int, peak_lr: float, total_steps: int, warmup_steps: int,
          decay: str = "cosine", min_lr_ratio: float = 0.1) -> float:
    """Linear warm-up over ``warmup_steps`` to ``peak_lr``, then cosine down to
    ``min_lr_ratio · peak_lr`` at ``total_steps`` (``decay="cosine"``) or flat (``"constant"``)."""
    if warmup_steps > 0 and step <= warmup_steps:
        return peak_lr * step / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    floor = min_lr_ratio * peak_lr
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
