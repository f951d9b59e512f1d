"""Softmax cross-entropy, the one implementation: the runner's losses (in every backend's venv,
numpy only, so no scipy here), evaluate's and, through evaluate's outputs, the figures'."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 and shifted by the row maximum, so large logits stay finite."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def per_example_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Softmax cross-entropy of each example (float64)."""
    labels = np.asarray(labels, np.int64)
    return -log_softmax(logits)[np.arange(len(labels)), labels]
