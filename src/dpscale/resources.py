"""Cluster requests that follow an experiment's size: the time limit of a training job.

An estimate, meant as an upper bound: SLURM kills a job at its limit (the retry resumes from the
last checkpoint, but a limit that is too short for one epoch never finishes), while a generous
limit only costs queue priority. Override per run with `--set-resources train_<backend>:runtime=`.
"""

from __future__ import annotations

import math

# DP-SGD images per second of one GPU for full-width (64) ResNet-18 at 64 px (CIFAR stem):
# deliberately low, a fraction of a V100's non-private throughput, so that the slowest backend
# (TF Privacy's two-pass clipping) fits too.
GPU_IMAGES_PER_S = 500.0
OVERHEAD_MIN = 15  # venv start, compilation, per-epoch evaluation and checkpoints
MARGIN = 2.0


def feature_pixels(resolution: int, stem: str) -> float:
    """Pixels of the first stage's feature maps: the ImageNet stem downsamples by 4."""
    if stem == "auto":
        stem = "cifar" if resolution <= 64 else "imagenet"
    side = resolution if stem == "cifar" else resolution / 4
    return side * side


def train_minutes(
    n_train: int,
    epochs: float,
    resolution: int,
    width: int,
    stem: str = "auto",
    attempt: int = 1,
    images_per_second: float = GPU_IMAGES_PER_S,
) -> int:
    """Time limit in minutes: convolution cost grows with feature pixels and width squared."""
    cost = feature_pixels(resolution, stem) / 64**2 * (width / 64) ** 2
    seconds = n_train * epochs * cost / images_per_second
    return attempt * math.ceil(OVERHEAD_MIN + MARGIN * seconds / 60)
