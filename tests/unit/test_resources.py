"""The training job's SLURM time limit grows with the experiment's size."""

from __future__ import annotations

from dpscale.resources import OVERHEAD_MIN, feature_pixels, train_minutes


def test_stems_set_the_feature_map_size():
    assert feature_pixels(32, "auto") == 32 * 32  # CIFAR stem up to 64 px
    assert feature_pixels(224, "auto") == 56 * 56  # ImageNet stem: stride 4
    assert feature_pixels(64, "imagenet") == 16 * 16


def test_limit_follows_images_epochs_pixels_and_width():
    base = dict(n_train=1_281_167, epochs=10, resolution=64, width=64)
    minutes = train_minutes(**base)
    # 12.8M images at 500/s with a 2x margin: 14.2 h, plus the fixed overhead.
    assert minutes == OVERHEAD_MIN + 855
    doubled = train_minutes(**{**base, "epochs": 20}) - OVERHEAD_MIN
    assert abs(doubled - 2 * (minutes - OVERHEAD_MIN)) <= 1  # each rounded up to a minute
    assert train_minutes(**{**base, "width": 32}) < minutes
    assert train_minutes(**{**base, "resolution": 32}) < minutes
    assert train_minutes(**base, attempt=2) == 2 * minutes


def test_tiny_experiments_get_the_overhead():
    assert train_minutes(n_train=1100, epochs=6, resolution=16, width=16) == OVERHEAD_MIN + 1
