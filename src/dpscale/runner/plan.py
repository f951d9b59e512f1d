"""The batch plan: which training examples each step sees, the same for every backend.

Poisson subsampling: at every step each of the n training examples joins the logical batch
independently with probability q, which is the sampling the accountant assumes. The plan of
epoch e comes from `np.random.default_rng([seed, epoch])` alone, so a run resumed at an epoch
boundary draws exactly the batches an unbroken run draws.

A logical batch of b examples is cut into ceil(b / P) physical chunks (at least one) of the
fixed size P, each padded with a mask, so jit-compiled frameworks see one shape only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

# Index of the substream for the Poisson plan in np.random.default_rng([seed, epoch, stream]);
# the plan uses the two-word seed [seed, epoch] itself, other streams add a third word.
AUGMENT_STREAM = 1
NOISE_STREAM = 2


def epoch_rng(seed: int, epoch: int, stream: int | None = None) -> np.random.Generator:
    """The generator of one epoch's stream: [seed, epoch] for the plan, plus a word for others."""
    words = [int(seed), int(epoch)] if stream is None else [int(seed), int(epoch), int(stream)]
    return np.random.default_rng(words)


def poisson_batch(rng: np.random.Generator, n: int, q: float) -> np.ndarray:
    """Sorted indices of one Poisson-subsampled batch: each of n examples kept with prob. q.

    Drawn as b ~ Binomial(n, q), then a uniform b-subset: the same joint law as n independent
    coin flips, at O(b) cost instead of O(n) per step (ImageNet has n = 1.28M).
    """
    b = int(rng.binomial(n, q))
    return np.sort(rng.choice(n, size=b, replace=False)).astype(np.int64)


def epoch_plan(n: int, q: float, steps: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The index lists of the `steps` logical batches of `epoch` (1-based), from (seed, epoch)."""
    if n < 1:
        raise ValueError(f"the training split is empty (n={n}); expected at least one example")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sample_rate q={q} is out of range; expected 0 < q <= 1")
    if steps < 0:
        raise ValueError(f"steps={steps} is negative; expected a count of steps")
    rng = epoch_rng(seed, epoch)
    return [poisson_batch(rng, n, q) for _ in range(steps)]


def default_physical_batch_size(expected_batch_size: float) -> int:
    """B + 4 sqrt(B) rounded up to a multiple of 8: one chunk holds all but ~3e-5 of batches."""
    b = float(expected_batch_size)
    if not b > 0:
        raise ValueError(f"expected_batch_size={b} must be positive")
    return math.ceil((b + 4.0 * math.sqrt(b)) / 8.0) * 8


def physical_batch_size(expected_batch_size: float, configured: int | None = None) -> int:
    """training.physical_batch_size if set, else the default above."""
    if configured is None:
        return default_physical_batch_size(expected_batch_size)
    if int(configured) != configured or configured < 1:
        raise ValueError(
            f"training.physical_batch_size={configured!r} is invalid; expected a positive integer"
        )
    return int(configured)


def num_chunks(batch_len: int, physical: int) -> int:
    """ceil(b / P), at least 1 (an empty Poisson batch is still a step: it draws noise)."""
    return max(1, math.ceil(batch_len / physical))


def chunk_indices(indices: np.ndarray, physical: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Split a logical batch into (padded index array, mask) pairs, each of length `physical`.

    Padding rows repeat index 0 (any valid row would do; the mask makes them count for nothing).
    """
    indices = np.asarray(indices, dtype=np.int64)
    for c in range(num_chunks(len(indices), physical)):
        part = indices[c * physical : (c + 1) * physical]
        padded = np.zeros(physical, dtype=np.int64)
        padded[: len(part)] = part
        mask = np.zeros(physical, dtype=bool)
        mask[: len(part)] = True
        yield padded, mask


def epoch_lengths(total_steps: int, steps_per_epoch: int) -> list[int]:
    """Steps in each epoch: full epochs, then the remainder (epochs may be fractional)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must be at least 1")
    if total_steps < 1:
        raise ValueError(f"steps={total_steps} must be at least 1")
    full, rest = divmod(int(total_steps), int(steps_per_epoch))
    return [int(steps_per_epoch)] * full + ([rest] if rest else [])


def noise_seed(seed: int, epoch: int) -> int:
    """The seed given to adapter.reseed at the start of `epoch`: a 31-bit int from (seed, epoch)."""
    state = np.random.SeedSequence([int(seed), int(epoch), NOISE_STREAM]).generate_state(1)
    return int(state[0] >> 1)
