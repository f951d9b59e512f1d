"""Learning-rate schedules."""

from __future__ import annotations

import math

import pytest

from dpscale.runner.schedule import learning_rate, warmup_steps


def test_constant():
    assert [learning_rate(s, 5, 0.5, "constant") for s in range(5)] == [0.5] * 5


def test_cosine_starts_at_base_and_decays_monotonically_towards_zero():
    lrs = [learning_rate(s, 100, 2.0, "cosine") for s in range(100)]
    assert lrs[0] == 2.0
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[50] == pytest.approx(1.0)  # half way: cos(pi/2) = 0
    assert 0 < lrs[-1] < 2.0 * (1 - math.cos(math.pi / 100))


def test_linear_warmup_then_schedule():
    lrs = [learning_rate(s, 10, 1.0, "cosine", warmup_steps=4) for s in range(10)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0  # cosine begins after warm-up, at the base rate
    assert lrs[5] < 1.0
    const = [learning_rate(s, 10, 1.0, "constant", warmup_steps=2) for s in range(10)]
    assert const == [0.5] + [1.0] * 9


def test_warmup_steps_from_epochs():
    assert warmup_steps(0.5, 10, 100) == 5
    assert warmup_steps(20, 10, 100) == 99  # clamped below the run length
    assert warmup_steps(0, 10, 100) == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="schedule"):
        learning_rate(0, 10, 1.0, "step")
    with pytest.raises(ValueError, match="step 10"):
        learning_rate(10, 10, 1.0)
    with pytest.raises(ValueError, match="warmup"):
        learning_rate(0, 10, 1.0, warmup_steps=10)
