"""Classification metrics for balanced and long-tailed data (pure numpy, labels 0..C-1).

Long-tail protocol (dp-science.md; Liu et al. 2019, Cao et al. 2019): per-class recall,
balanced accuracy (their mean), accuracy on many-shot (> 100 training images), medium-shot
(20-100) and few-shot (< 20) classes, macro-F1, one-vs-rest ROC AUC and the confusion matrix.
A quantity with nothing to average over (no test example of a class, no few-shot class) is
None, never 0, so a figure cannot mistake "undefined" for "always wrong".
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from dpscale.metrics.losses import per_example_loss, softmax

#: Shot groups by training images per class: many > 100 >= medium >= 20 > few
MANY_SHOT_ABOVE = 100
FEW_SHOT_BELOW = 20


def check_logits(logits: np.ndarray, labels: np.ndarray, name: str = "logits") -> None:
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"{name}: shape {logits.shape} with labels {labels.shape}; expected (n, C) and (n,)"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"{name}: labels outside 0..{logits.shape[1] - 1}")
    if not np.isfinite(logits).all():
        raise ValueError(f"{name}: non-finite logits; expected finite numbers")


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 (C, C): row = true class, column = predicted class."""
    flat = labels.astype(np.int64) * num_classes + predicted.astype(np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class_recall(confusion: np.ndarray) -> np.ndarray:
    """Recall of each class; NaN for a class without test examples."""
    return _ratio(np.diag(confusion).astype(float), confusion.sum(axis=1).astype(float))


def per_class_f1(confusion: np.ndarray) -> np.ndarray:
    """F1 = 2TP / (2TP + FP + FN); NaN for a class neither present nor predicted."""
    tp = np.diag(confusion).astype(float)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    return _ratio(2 * tp, 2 * tp + fp + fn)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve = P(score of a positive > a negative's), ties counting 1/2.

    Mann-Whitney U from average ranks; None without both positives and negatives.
    """
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores, method="average")
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def shot_group(train_count: int) -> str:
    if train_count > MANY_SHOT_ABOVE:
        return "many"
    if train_count < FEW_SHOT_BELOW:
        return "few"
    return "medium"


def _none_if_nan(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def classification_report(
    logits: np.ndarray,
    labels: np.ndarray,
    train_counts: np.ndarray,
    class_names: list[str] | None = None,
) -> dict:
    """Every metric above for one evaluated set (the test set), as JSON-ready values."""
    check_logits(logits, labels)
    num_classes = logits.shape[1]
    train_counts = np.asarray(train_counts, np.int64)
    if train_counts.shape != (num_classes,):
        raise ValueError(
            f"train_counts: shape {train_counts.shape}; "
            f"expected one count per class ({num_classes})"
        )
    names = class_names or [str(c) for c in range(num_classes)]
    predicted = logits.argmax(axis=1)
    probs = softmax(logits)
    confusion = confusion_matrix(labels, predicted, num_classes)
    recall = per_class_recall(confusion)
    f1 = per_class_f1(confusion)
    auc = [roc_auc(probs[:, c], labels == c) for c in range(num_classes)]
    support = confusion.sum(axis=1)

    groups = {}
    for group in ("many", "medium", "few"):
        members = [c for c in range(num_classes) if shot_group(train_counts[c]) == group]
        in_group = np.isin(labels, members)
        groups[f"{group}_shot_classes"] = len(members)
        groups[f"{group}_shot_accuracy"] = (
            float((predicted[in_group] == labels[in_group]).mean()) if in_group.any() else None
        )

    present = support > 0
    f1_defined = np.isfinite(f1)
    aucs = [a for a in auc if a is not None]
    return {
        "accuracy": float((predicted == labels).mean()) if len(labels) else None,
        "loss": float(per_example_loss(logits, labels).mean()) if len(labels) else None,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else None,
        # Classes never present nor predicted are left out (sklearn's labels=None behaviour).
        "macro_f1": float(f1[f1_defined].mean()) if f1_defined.any() else None,
        "auc_ovr_macro": float(np.mean(aucs)) if aucs else None,
        **groups,
        "per_class": [
            {
                "class": c,
                "name": names[c],
                "train_count": int(train_counts[c]),
                "shot": shot_group(train_counts[c]),
                "test_count": int(support[c]),
                "recall": _none_if_nan(recall[c]),
                "f1": _none_if_nan(f1[c]),
                "auc": auc[c],
            }
            for c in range(num_classes)
        ],
        "confusion": confusion.tolist(),
    }
