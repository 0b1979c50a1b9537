"""λ(t) (REFERENCE §1, Algorithm 1) and the learning-rate schedule, against the formulas."""

import math

import pytest

from prosparse.training.schedule import lambda_at, lr_at

# the paper's 7B schedule: stage 0 to 5,000 steps, then (peak, cumulative end step)
RELU_STEPS = 5000
STAGES = [[5e-3, 6000], [5e-2, 10000], [5e-2, 12000], [2e-1, 16000], [2e-1, 16500]]


def sine_eta(t, start, end):
    return 0.5 * (math.sin(-math.pi / 2 + math.pi * (t - start) / (end - start)) + 1)


def test_stage_zero_has_no_regularisation():
    assert lambda_at(1, STAGES, RELU_STEPS) == 0.0
    assert lambda_at(RELU_STEPS, STAGES, RELU_STEPS) == 0.0


def test_warmup_stage_is_constant_first_peak():
    for t in (RELU_STEPS + 1, 5500, 6000):
        assert lambda_at(t, STAGES, RELU_STEPS) == 5e-3


@pytest.mark.parametrize("t", [6001, 7000, 8000, 9000, 9999, 10000])
def test_rising_stage_follows_the_sine(t):
    expected = 5e-3 + sine_eta(t, 6000, 10000) * (5e-2 - 5e-3)
    assert lambda_at(t, STAGES, RELU_STEPS) == pytest.approx(expected, rel=1e-12)


def test_rising_stage_midpoint_and_ends():
    assert lambda_at(8000, STAGES, RELU_STEPS) == pytest.approx((5e-3 + 5e-2) / 2, rel=1e-12)
    assert lambda_at(10000, STAGES, RELU_STEPS) == pytest.approx(5e-2, rel=1e-12)
    # just after a boundary the rise has barely begun
    assert lambda_at(6001, STAGES, RELU_STEPS) - 5e-3 < 1e-6


def test_equal_neighbouring_peaks_give_a_constant_stage():
    for t in (10001, 11000, 12000):
        assert lambda_at(t, STAGES, RELU_STEPS) == pytest.approx(5e-2, rel=1e-12)
    for t in (16001, 16250, 16500):
        assert lambda_at(t, STAGES, RELU_STEPS) == pytest.approx(2e-1, rel=1e-12)


def test_second_rise_midpoint_and_after_the_last_stage():
    assert lambda_at(14000, STAGES, RELU_STEPS) == pytest.approx((5e-2 + 2e-1) / 2, rel=1e-12)
    assert lambda_at(20000, STAGES, RELU_STEPS) == 2e-1


def test_monotone_over_the_whole_schedule():
    values = [lambda_at(t, STAGES, RELU_STEPS) for t in range(1, 17001, 7)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_fixed_lambda_and_empty_schedule():
    assert lambda_at(1, [[0.05, 100]]) == 0.05
    assert lambda_at(500, [[0.05, 100]]) == 0.05
    assert lambda_at(3, []) == 0.0


def test_lr_warmup_cosine_and_constant():
    assert lr_at(1, 1e-3, 100, 10) == pytest.approx(1e-4)
    assert lr_at(10, 1e-3, 100, 10) == pytest.approx(1e-3)
    assert lr_at(55, 1e-3, 100, 10, min_lr_ratio=0.1) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(100, 1e-3, 100, 10, min_lr_ratio=0.1) == pytest.approx(1e-4)
    assert lr_at(80, 1e-3, 100, 10, decay="constant") == 1e-3
