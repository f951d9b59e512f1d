"""The Poisson batch plan, chunking and physical batch size."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpscale.runner import plan


def test_plan_is_deterministic_per_seed_and_epoch():
    a = plan.epoch_plan(500, 0.1, 20, seed=3, epoch=2)
    b = plan.epoch_plan(500, 0.1, 20, seed=3, epoch=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    other_epoch = plan.epoch_plan(500, 0.1, 20, seed=3, epoch=3)
    other_seed = plan.epoch_plan(500, 0.1, 20, seed=4, epoch=2)
    assert not all(np.array_equal(x, y) for x, y in zip(a, other_epoch, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, other_seed, strict=True))


def test_batches_are_sorted_unique_in_range_int64():
    for batch in plan.epoch_plan(300, 0.2, 30, seed=0, epoch=1):
        assert batch.dtype == np.int64
        assert np.array_equal(batch, np.unique(batch))
        assert batch.min(initial=0) >= 0 and batch.max(initial=0) < 300


def test_batch_size_is_binomial_not_fixed():
    n, q, steps = 1000, 0.05, 4000
    sizes = np.array([len(b) for b in plan.epoch_plan(n, q, steps, seed=1, epoch=1)])
    # mean q*n = 50, variance n q (1 - q) = 47.5; 4000 draws: the sample mean's sd is ~0.11
    assert abs(sizes.mean() - n * q) < 0.5
    assert abs(sizes.var() - n * q * (1 - q)) < 5.0
    assert len(np.unique(sizes)) > 20  # Poisson, not a fixed batch size


def test_each_example_joins_with_probability_q_independently():
    n, q, steps = 40, 0.25, 8000
    counts = np.zeros(n)
    together = 0
    for b in plan.epoch_plan(n, q, steps, seed=2, epoch=1):
        counts[b] += 1
        together += 0 in b and 1 in b
    freq = counts / steps
    # binomial sd of each frequency: sqrt(q (1-q) / steps) ~ 0.0048
    assert np.all(np.abs(freq - q) < 0.025)
    assert abs(together / steps - q * q) < 0.015  # pairs join independently: q^2


def test_empty_batches_happen_at_small_rates():
    sizes = [len(b) for b in plan.epoch_plan(10, 0.05, 200, seed=0, epoch=1)]
    assert 0 in sizes  # (0.95)^10 ~ 0.6 of the steps are empty: still steps


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="sample_rate"):
        plan.epoch_plan(10, 0.0, 1, 0, 1)
    with pytest.raises(ValueError, match="empty"):
        plan.epoch_plan(0, 0.5, 1, 0, 1)


@pytest.mark.parametrize("b", [1, 16, 64, 100, 256, 1024, 4096])
def test_default_physical_batch_size(b):
    p = plan.default_physical_batch_size(b)
    assert p % 8 == 0
    assert b + 4 * math.sqrt(b) <= p < b + 4 * math.sqrt(b) + 8


def test_physical_batch_size_prefers_config():
    assert plan.physical_batch_size(64, 96) == 96
    assert plan.physical_batch_size(64, None) == 96  # 64 + 32 = 96
    with pytest.raises(ValueError, match="physical_batch_size"):
        plan.physical_batch_size(64, 0)


@pytest.mark.parametrize("b", [0, 1, 7, 8, 9, 24, 25])
def test_chunks_pad_to_fixed_size_with_mask(b):
    idx = np.arange(100, 100 + b)
    chunks = list(plan.chunk_indices(idx, 8))
    assert len(chunks) == max(1, math.ceil(b / 8)) == plan.num_chunks(b, 8)
    for rows, mask in chunks:
        assert rows.shape == mask.shape == (8,)
        assert mask.dtype == bool
    real = np.concatenate([rows[mask] for rows, mask in chunks])
    assert np.array_equal(real, idx)
    # real rows come first in each chunk, so only the last one is padded
    for _rows, mask in chunks[:-1]:
        assert mask.all()


def test_epoch_lengths_cover_steps_exactly():
    assert plan.epoch_lengths(10, 4) == [4, 4, 2]
    assert plan.epoch_lengths(8, 4) == [4, 4]
    assert plan.epoch_lengths(3, 4) == [3]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        plan.epoch_lengths(3, 0)


def test_streams_differ_and_noise_seed_is_stable():
    a = plan.epoch_rng(0, 1).random(4)
    b = plan.epoch_rng(0, 1, plan.AUGMENT_STREAM).random(4)
    assert not np.allclose(a, b)
    s = plan.noise_seed(0, 1)
    assert s == plan.noise_seed(0, 1) and 0 <= s < 2**31
    assert len({plan.noise_seed(seed, e) for seed in range(3) for e in range(1, 5)}) == 12
