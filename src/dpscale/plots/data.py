"""Tidy tables for the figures, from the run outputs (pure functions; numpy and pandas only).

Everything here is recomputed from `predictions.npz` (train/holdout/test logits and model labels)
so the figures need nothing beyond the backend contract's outputs. Per-example losses are the
cross-entropy of the final model on un-augmented inputs, as `metrics.json` reports them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

#: Run keys every table carries, so a figure can facet or colour by any of them.
RUN_KEYS = ("split", "backend", "mode", "level", "seed")
#: The members (trained on) and non-members (same distribution, never seen) of the attacks.
MEMBER, NON_MEMBER = "train (member)", "holdout (non-member)"


class PlotDataError(ValueError):
    """A run output or table that cannot be turned into a figure's data."""


# --- privacy levels -----------------------------------------------------------------------


def level_order(level: str) -> tuple:
    """none first, then eps<target> by target (eps2 before eps10), then sigma<multiplier>."""
    match = re.match(r"^(eps|sigma)([0-9.]+)$", str(level))
    if level == "none":
        return (0, 0.0)
    if match:
        return (1 if match.group(1) == "eps" else 2, float(match.group(2)))
    return (3, 0.0)


def sorted_levels(levels: Iterable[str]) -> list[str]:
    return sorted(set(levels), key=level_order)


def level_text(level: str) -> str:
    """What a level means before it is run: the report's `epsilon` label."""
    match = re.match(r"^(eps|sigma)([0-9.]+)$", str(level))
    if level == "none":
        return "∞ (non-private)"
    if match and match.group(1) == "eps":
        return f"≤ {match.group(2)} (target)"
    if match:
        return f"sigma {match.group(2)} (calibrated: see summary)"
    return str(level)


def with_variant(label: str, variant=None) -> str:
    """'k64: ε=3.2': a label prefixed by its variant, unless the variant is the only default."""
    if variant is None or _isnan(variant) or str(variant) == "default":
        return label
    return f"{variant}: {label}"


def privacy_label(level: str, epsilon, variant=None) -> str:
    """A run's legend entry: the realised epsilon, or non-private (after its variant's name)."""
    if level == "none" or epsilon is None or _isnan(epsilon):
        return with_variant("non-private", variant)
    return with_variant(f"ε={float(epsilon):.3g}", variant)


def privacy_labels(table: pd.DataFrame) -> list[str]:
    variants = table["variant"] if "variant" in table else [None] * len(table)
    return [
        privacy_label(lv, e, v)
        for lv, e, v in zip(table["level"], table["epsilon"], variants, strict=True)
    ]


def accounting_text(rows: pd.DataFrame) -> str:
    """'RDP accountant, δ=1e-05, Poisson sampling' from the private rows' qualifying columns."""
    private = rows[rows["level"] != "none"] if "level" in rows else rows
    parts = []
    for column, fmt in (
        ("accountant", "{} accountant"),
        ("delta", "δ={:g}"),
        ("sampling", "{} sampling"),
    ):
        values = private[column].dropna().unique() if column in private else []
        if len(values):
            text = ", ".join(
                fmt.format(v.upper() if column == "accountant" else v) for v in sorted(values)
            )
            parts.append(text.replace("poisson", "Poisson"))
    return ", ".join(parts)


def _isnan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


# --- loading run outputs -------------------------------------------------------------------


def read_metrics(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlotDataError(f"{path}: not found; expected a run's metrics.json") from None
    except json.JSONDecodeError as err:
        raise PlotDataError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    missing = [k for k in RUN_KEYS if k not in metrics]
    if missing:
        raise PlotDataError(f"{path}: missing run keys {missing}; expected {list(RUN_KEYS)}")
    return metrics


def run_keys(metrics: Mapping) -> dict:
    """The run keys plus the realised epsilon and its qualifiers, for every table's rows."""
    keys = {k: metrics.get(k) for k in RUN_KEYS}
    # Runs from before variants existed are the one default variant.
    keys["variant"] = metrics.get("variant") or "default"
    for k in ("epsilon", "accountant", "delta", "sampling"):
        keys[k] = metrics.get(k)
    keys["privacy"] = privacy_label(keys["level"], keys["epsilon"], keys["variant"])
    return keys


def read_predictions(run_dir: str | Path, parts=("train", "holdout", "test")) -> dict:
    path = Path(run_dir) / "predictions.npz"
    try:
        with np.load(path) as npz:
            out = {}
            for part in parts:
                for kind in ("logits", "labels"):
                    name = f"{part}_{kind}"
                    if name not in npz.files:
                        raise PlotDataError(
                            f"{path}: no array {name!r}; expected {{train,holdout,test}}_logits"
                            " and _labels"
                        )
                    out[name] = npz[name]
    except FileNotFoundError:
        raise PlotDataError(f"{path}: not found; expected a run's predictions.npz") from None
    return out


def read_history(run_dir: str | Path, metrics: Mapping | None = None) -> pd.DataFrame:
    """One run's history.csv with its run keys as columns (`privacy`: the final epsilon)."""
    path = Path(run_dir) / "history.csv"
    if not path.exists():
        raise PlotDataError(f"{path}: not found; expected a run's history.csv")
    history = pd.read_csv(path)
    for column in ("epoch", "train_loss"):
        if column not in history:
            raise PlotDataError(f"{path}: no column {column!r}; expected the runner's columns")
    for key, value in run_keys(metrics or read_metrics(run_dir)).items():
        if key not in history:  # history's own epsilon is per epoch: keep it
            history[key] = value
    return history


def read_split(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """(train_counts, class names) of a split file."""
    path = Path(path)
    try:
        with np.load(path) as npz:
            counts = npz["train_counts"].astype(np.int64)
            meta = json.loads(str(npz["meta"])) if "meta" in npz.files else {}
    except FileNotFoundError:
        raise PlotDataError(f"{path}: not found; expected a split .npz") from None
    except KeyError as err:
        raise PlotDataError(f"{path}: no array {err}; expected train_counts and meta") from None
    names = meta.get("class_names") or [str(c) for c in range(len(counts))]
    if len(names) != len(counts):
        raise PlotDataError(
            f"{path}: {len(names)} class names for {len(counts)} train_counts; expected one each"
        )
    return counts, [str(n) for n in names]


# --- per-example and per-class quantities --------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def example_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of each example: the loss-threshold attack's score (low = member)."""
    labels = np.asarray(labels, np.int64)
    return -log_softmax(logits)[np.arange(len(labels)), labels]


def per_class_recall(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy on the examples of each class (NaN for a class with none)."""
    labels = np.asarray(labels, np.int64)
    correct = np.asarray(logits).argmax(axis=1) == labels
    hits = np.bincount(labels[correct], minlength=num_classes).astype(np.float64)
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hits / total, np.nan)


def confusion(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    pred = np.asarray(logits).argmax(axis=1)
    flat = np.asarray(labels, np.int64) * num_classes + pred
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, -1)


def roc_points(member_scores: np.ndarray, nonmember_scores: np.ndarray):
    """(fpr, tpr) of the attack 'member if score >= t' over every threshold t, from (0,0) to (1,1).

    Ties are one threshold (one point), so the curve never favours an order inside a tie.
    """
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if len(m) == 0 or len(n) == 0:
        raise PlotDataError(
            f"ROC needs members and non-members; got {len(m)} members, {len(n)} non-members"
        )
    scores = np.concatenate([m, n])
    is_member = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]
    tp = np.cumsum(is_member)[last_of_tie]
    fp = np.cumsum(1 - is_member)[last_of_tie]
    return np.r_[0.0, fp / len(n)], np.r_[0.0, tp / len(m)]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    """Best true-positive rate among thresholds whose false-positive rate is at most max_fpr."""
    return float(tpr[fpr <= max_fpr].max())


# --- tidy tables ---------------------------------------------------------------------------


def history_table(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    frames = [read_history(d) for d in run_dirs]
    if not frames:
        raise PlotDataError("no runs given; expected at least one run directory")
    return pd.concat(frames, ignore_index=True)


def membership_scores(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """One row per train (member) and holdout (non-member) example: its loss and confidence."""
    frames = []
    for run in run_dirs:
        keys = run_keys(read_metrics(run))
        pred = read_predictions(run, ("train", "holdout"))
        for part, member in (("train", MEMBER), ("holdout", NON_MEMBER)):
            logits, labels = pred[f"{part}_logits"], pred[f"{part}_labels"]
            loss = example_losses(logits, labels)
            frames.append(
                pd.DataFrame({**keys, "member": member, "loss": loss, "confidence": np.exp(-loss)})
            )
    if not frames:
        raise PlotDataError("no runs given; expected at least one run directory")
    return pd.concat(frames, ignore_index=True)


def roc_table(scores: pd.DataFrame, max_fpr: float = 0.01) -> pd.DataFrame:
    """ROC points of the loss-threshold attack per (split, backend, mode, level, variant), seeds
    pooled.

    Each row also carries the curve's AUC and TPR at `max_fpr` FPR for the legend.
    """
    frames = []
    by = ["split", "backend", "mode", "level", "variant"]
    for keys, group in scores.groupby(by, sort=False):
        member = -group.loc[group["member"] == MEMBER, "loss"].to_numpy()
        nonmember = -group.loc[group["member"] == NON_MEMBER, "loss"].to_numpy()
        fpr, tpr = roc_points(member, nonmember)
        frame = pd.DataFrame({"fpr": fpr, "tpr": tpr})
        frame[by] = keys
        frame["privacy"] = group["privacy"].iloc[0]
        frame["auc"] = auc(fpr, tpr)
        frame["tpr_at_fpr"] = tpr_at_fpr(fpr, tpr, max_fpr)
        frame["n_members"], frame["n_nonmembers"] = len(member), len(nonmember)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def per_class_table(run_dirs: Iterable[str | Path], split_file: str | Path) -> pd.DataFrame:
    """Test recall of every class in every run, beside the class's training count."""
    counts, names = read_split(split_file)
    frames = []
    for run in run_dirs:
        keys = run_keys(read_metrics(run))
        pred = read_predictions(run, ("test",))
        recall = per_class_recall(pred["test_logits"], pred["test_labels"], len(counts))
        frames.append(
            pd.DataFrame(
                {
                    **keys,
                    "class": names,
                    "class_index": np.arange(len(counts)),
                    "train_count": counts,
                    "recall": recall,
                }
            )
        )
    if not frames:
        raise PlotDataError("no runs given; expected at least one run directory")
    return pd.concat(frames, ignore_index=True)


def accuracy_drop(per_class: pd.DataFrame) -> pd.DataFrame:
    """Per class: non-private recall minus private recall (seeds averaged first).

    One row per (split, backend, mode, variant, private level, class); a positive drop means DP
    cost the class accuracy. Needs the non-private runs of the same split/backend/mode/variant.
    """
    group = ["split", "backend", "mode", "variant", "class", "class_index", "train_count"]
    if "variant" not in per_class:  # tables built before variants: all one default variant
        per_class = per_class.assign(variant="default")
    mean = (
        per_class.groupby([*group, "level"], as_index=False)
        .agg(recall=("recall", "mean"), epsilon=("epsilon", "mean"))
        .astype({"epsilon": float})
    )
    base = mean[mean["level"] == "none"].drop(columns=["level", "epsilon"])
    private = mean[mean["level"] != "none"]
    if base.empty or private.empty:
        raise PlotDataError(
            "accuracy drop needs non-private (level none) and private runs; got levels "
            f"{sorted(mean['level'].unique())}"
        )
    drop = private.merge(base, on=group, suffixes=("", "_nonprivate"))
    drop["drop"] = drop["recall_nonprivate"] - drop["recall"]
    drop["privacy"] = privacy_labels(drop)
    return drop


def confusion_table(run_dirs: Iterable[str | Path], split_file: str | Path) -> pd.DataFrame:
    """Test-set confusion counts summed over runs (seeds): rows true, columns predicted."""
    counts, names = read_split(split_file)
    total = np.zeros((len(counts), len(counts)), np.int64)
    n_runs = 0
    for run in run_dirs:
        pred = read_predictions(run, ("test",))
        total += confusion(pred["test_logits"], pred["test_labels"], len(counts))
        n_runs += 1
    if not n_runs:
        raise PlotDataError("no runs given; expected at least one run directory")
    return pd.DataFrame(
        total,
        index=pd.Index(names, name="true"),
        columns=pd.Index(names, name="predicted"),
    )


def step_time_ratios(summary: pd.DataFrame) -> pd.DataFrame:
    """Steady-state DP step time over the non-private one, per (split, backend, mode, seed)."""
    need = {"split", "backend", "mode", "level", "seed", "step_time_steady_s"}
    missing = sorted(need - set(summary.columns))
    if missing:
        raise PlotDataError(f"summary: missing columns {missing}")
    keys = ["split", "backend", "mode", "seed"] + (["variant"] if "variant" in summary else [])
    base = summary.loc[summary["level"] == "none", [*keys, "step_time_steady_s"]]
    private = summary[summary["level"] != "none"]
    ratio = private.merge(base, on=keys, suffixes=("", "_nonprivate")).copy()  # one block
    if ratio.empty:
        raise PlotDataError(
            "step-time ratio needs non-private (level none) and private runs of the same "
            f"backend; got levels {sorted(summary['level'].unique())}"
        )
    ratio["ratio"] = ratio["step_time_steady_s"] / ratio["step_time_steady_s_nonprivate"]
    ratio["privacy"] = privacy_labels(ratio)
    return ratio
