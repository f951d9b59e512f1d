"""From uint8 images to the padded float32 chunks every adapter receives, identically.

Normalization uses fixed constants (the ImageNet channel mean and std), never statistics of the
private data, which would themselves leak. Augmentation (random crop after zero-padding by 4,
then a horizontal flip with probability 1/2) draws from a seeded generator, so every backend
sees the same pixels.
"""

from __future__ import annotations

import numpy as np

from dpscale.backends.base import Batch

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CROP_PAD = 4


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W, 3) -> float32 (x / 255 - mean) / std."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images have dtype {images.dtype} and shape {images.shape}; "
            "expected uint8 (n, H, W, 3)"
        )
    return ((images.astype(np.float32) / np.float32(255.0) - MEAN) / STD).astype(np.float32)


def augment(images: np.ndarray, rng: np.random.Generator, pad: int = CROP_PAD) -> np.ndarray:
    """Random crop of the zero-padded image (pad `pad`) and a random horizontal flip, per image.

    Draws, in this order: n (dy, dx) offsets in [0, 2 pad], then n flip coins.
    """
    n, h, w, _ = images.shape
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.empty_like(images)
    for i, ((dy, dx), flip) in enumerate(zip(offsets, flips, strict=True)):
        crop = padded[i, dy : dy + h, dx : dx + w]
        out[i] = crop[:, ::-1] if flip else crop
    return out


def make_batch(
    images: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator | None = None,
) -> Batch:
    """One padded chunk: `rows` index `images`/`labels`; rows where `mask` is False are padding.

    Padding rows are all-zero images with label 0 (they must count for nothing). With `rng`,
    the real rows are augmented.
    """
    mask = np.asarray(mask, dtype=bool)
    real = np.asarray(rows, dtype=np.int64)[mask]
    pixels = np.asarray(images[real])
    if rng is not None and len(real):
        pixels = augment(pixels, rng)
    x = np.zeros((len(mask), *images.shape[1:]), dtype=np.float32)
    y = np.zeros(len(mask), dtype=np.int64)
    x[mask] = normalize(pixels)
    y[mask] = labels[real]
    return Batch(x=x, y=y, mask=mask)


def eval_chunks(images: np.ndarray, rows: np.ndarray, size: int):
    """Yield (normalized float32 chunk of exactly `size` rows, number of real rows) for `rows`.

    The last chunk is zero-padded so a jit-compiled predict sees one shape.
    """
    rows = np.asarray(rows, dtype=np.int64)
    for start in range(0, len(rows), size):
        part = rows[start : start + size]
        x = np.zeros((size, *images.shape[1:]), dtype=np.float32)
        x[: len(part)] = normalize(np.asarray(images[part]))
        yield x, len(part)
