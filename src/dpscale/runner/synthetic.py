"""Tiny, learnable run inputs in the pipeline's formats, for tests and benchmarks.

Writes what the prepare, split and calibrate steps would: images.npy/labels.npy, a split .npz
and a privacy JSON, so `python -m dpscale.runner` can run end to end in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dpscale import levels


def write_inputs(
    root: Path,
    *,
    num_classes: int = 4,
    image_size: int = 8,
    n_train: int = 64,
    n_holdout: int = 16,
    n_test: int = 32,
    batch_size: int = 16,
    epochs: int = 3,
    private: bool = True,
    noise_multiplier: float = 1.0,
    delta: float = 1e-5,
    seed: int = 0,
) -> dict[str, Path]:
    """Write data/, split.npz and privacy.json under `root`; return their paths.

    Images: a per-class colour pattern plus noise, so a small ResNet learns it in a few epochs.
    The dataset has one extra, unselected class (label num_classes + 1) and labels shifted by
    one, to exercise the mapping of dataset labels to model labels through split['classes'].
    The privacy JSON's epsilons are placeholders (this module does no accounting).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    n = n_train + n_holdout + n_test
    extra = 8  # examples of the unselected class
    model_labels = np.concatenate([np.arange(n) % num_classes, np.full(extra, -1)])
    patterns = rng.uniform(40, 215, size=(num_classes + 1, 1, 1, 3))
    noise = rng.normal(0, 30, size=(n + extra, image_size, image_size, 3))
    images = np.clip(patterns[model_labels] + noise, 0, 255).astype(np.uint8)
    classes = np.arange(1, num_classes + 1, dtype=np.int64)  # dataset label = model label + 1
    ds_labels = np.where(model_labels >= 0, model_labels + 1, num_classes + 1).astype(np.int64)
    order = rng.permutation(n)  # split indices are not sorted in general
    train, holdout, test = np.split(order, [n_train, n_train + n_holdout])

    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    np.save(data_dir / "images.npy", images)
    np.save(data_dir / "labels.npy", ds_labels)

    def counts(idx):
        return np.bincount(model_labels[idx], minlength=num_classes).astype(np.int64)

    split = root / "split.npz"
    np.savez(
        split,
        train=train.astype(np.int64),
        holdout=holdout.astype(np.int64),
        test=test.astype(np.int64),
        classes=classes,
        train_counts=counts(train),
        holdout_counts=counts(holdout),
        test_counts=counts(test),
        meta=np.array(json.dumps({"name": "tiny", "profile": "balanced", "rho": 1, "seed": seed})),
    )

    q = batch_size / n_train
    steps_per_epoch = round(1 / q)
    privacy = {
        "level": levels.Level("sigma", noise_multiplier).name if private else "none",
        "private": private,
        "noise_multiplier": noise_multiplier if private else 0.0,
        "sample_rate": q,
        "steps": epochs * steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "expected_batch_size": q * n_train,
        "n_train": n_train,
        "epochs": epochs,
        "delta": delta,
        "epsilon": 1.0 * epochs if private else None,
        "accountant": "rdp",
        "eps_by_epoch": [float(e) for e in range(1, epochs + 1)] if private else None,
        "sampling": "poisson",
        "target_epsilon": None,
    }
    path = root / "privacy.json"
    path.write_text(json.dumps(privacy, allow_nan=True))
    return {"data_dir": data_dir, "split": split, "privacy": path}
