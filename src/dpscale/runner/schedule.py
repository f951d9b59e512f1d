"""Learning rate per step: linear warm-up, then constant or cosine decay to zero."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def learning_rate(
    step: int, total_steps: int, base_lr: float, schedule: str = "cosine", warmup_steps: int = 0
) -> float:
    """The rate for 0-based `step` of `total_steps`.

    Warm-up: base_lr * (step + 1) / warmup_steps for the first warmup_steps steps (never 0, so
    the first step moves). Cosine: base_lr * (1 + cos(pi * t)) / 2, t the fraction of the
    post-warm-up steps already taken, so the first post-warm-up step has base_lr.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"training.schedule={schedule!r} is unknown; expected one of {SCHEDULES}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} is outside 0..{total_steps - 1}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} is invalid; expected 0 <= warmup < {total_steps} steps"
        )
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return float(base_lr)
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """Warm-up length in steps, kept below the run's length."""
    return min(int(round(warmup_epochs * steps_per_epoch)), max(0, total_steps - 1))
