"""Tidy tables for the figures, from the run outputs (pure functions; numpy and pandas only).

No metric is computed here: per-class recall, the confusion matrix, per-example losses and the
attack's ROC come from the `evaluate` step (dpscale.metrics: evaluation.json and evaluation.npz
beside each run's metrics.json), so a figure and summary.csv always show the same numbers.
Tables only gather them with the run keys, and join or sum across runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from dpscale.metrics import evaluate

#: Run keys every table carries, so a figure can facet or colour by any of them.
RUN_KEYS = ("split", "backend", "mode", "level", "seed")
#: The members (trained on) and non-members (same distribution, never seen) of the attacks.
MEMBER, NON_MEMBER = "train (member)", "holdout (non-member)"


class PlotDataError(ValueError):
    """A run output or table that cannot be turned into a figure's data."""


# --- labels ------------------------------------------------------------------------------


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


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PlotDataError(f"{path}: not found; expected {what}") from None
    except json.JSONDecodeError as err:
        raise PlotDataError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None


def read_metrics(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    metrics = _read_json(path, "a run's metrics.json")
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


def read_evaluation(run_dir: str | Path) -> dict:
    """The evaluate step's evaluation.json of one run."""
    return _read_json(Path(run_dir) / "evaluation.json", "the run's evaluation.json")


def read_evaluation_arrays(run_dir: str | Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Arrays of the evaluate step's evaluation.npz of one run."""
    path = Path(run_dir) / "evaluation.npz"
    try:
        return evaluate.read_arrays(path, list(names), "the evaluate step's evaluation.npz")
    except evaluate.EvaluationError as err:
        raise PlotDataError(str(err)) from None


def _test_report(run_dir: str | Path) -> dict:
    """evaluation.json's test-set report: per-class rows and the confusion matrix."""
    test = read_evaluation(run_dir).get("test") or {}
    if "per_class" not in test or "confusion" not in test:
        raise PlotDataError(
            f"{Path(run_dir) / 'evaluation.json'}: no test per_class and confusion; expected "
            "the evaluate step's output"
        )
    return test


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


# --- tidy tables ---------------------------------------------------------------------------


def history_table(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    frames = [read_history(d) for d in run_dirs]
    if not frames:
        raise PlotDataError("no runs given; expected at least one run directory")
    return pd.concat(frames, ignore_index=True)


def membership_scores(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """One row per train (member) and holdout (non-member) example: its loss (evaluation.npz)."""
    frames = []
    for run in run_dirs:
        keys = run_keys(read_metrics(run))
        losses = read_evaluation_arrays(run, ("member_loss", "nonmember_loss"))
        for name, member in (("member_loss", MEMBER), ("nonmember_loss", NON_MEMBER)):
            frames.append(pd.DataFrame({**keys, "member": member, "loss": losses[name]}))
    if not frames:
        raise PlotDataError("no runs given; expected at least one run directory")
    return pd.concat(frames, ignore_index=True)


def roc_table(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """ROC points of each run's loss-threshold attack (evaluation.npz), one curve per run.

    Each row also carries the run's AUC and TPR at 1% FPR (evaluation.json) for the legend.
    """
    frames = []
    for run in run_dirs:
        keys = run_keys(read_metrics(run))
        mia = read_evaluation(run).get("membership") or {}
        points = read_evaluation_arrays(run, ("loss_roc_fpr", "loss_roc_tpr"))
        if "loss" not in mia or not len(points["loss_roc_fpr"]):
            raise PlotDataError(
                f"{run}: no loss-attack ROC; the ROC needs members and non-members, got "
                f"{mia.get('n_members', 0)} members, {mia.get('n_nonmembers', 0)} non-members"
            )
        frame = pd.DataFrame({"fpr": points["loss_roc_fpr"], "tpr": points["loss_roc_tpr"]})
        frame = frame.assign(
            **keys,
            auc=mia["loss"]["auc"],
            tpr_at_fpr=mia["loss"]["tpr_at_fpr_1pct"],
            n_members=mia["n_members"],
            n_nonmembers=mia["n_nonmembers"],
        )
        frames.append(frame)
    if not frames:
        raise PlotDataError("no runs given; expected at least one run directory")
    return pd.concat(frames, ignore_index=True)


def per_class_table(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """Test recall of every class in every run, beside the class's training count."""
    frames = []
    for run in run_dirs:
        keys = run_keys(read_metrics(run))
        rows = _test_report(run)["per_class"]
        frames.append(
            pd.DataFrame(
                {
                    **keys,
                    "class": [str(r["name"]) for r in rows],
                    "class_index": [r["class"] for r in rows],
                    "train_count": [r["train_count"] for r in rows],
                    # None (no test example of the class) is NaN: no recall to average
                    "recall": np.array([r["recall"] for r in rows], dtype=float),
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


def confusion_table(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """Test-set confusion counts summed over runs (seeds): rows true, columns predicted."""
    total, names = None, None
    for run in run_dirs:
        test = _test_report(run)
        counts = np.asarray(test["confusion"], np.int64)
        if total is None:
            total, names = counts, [str(r["name"]) for r in test["per_class"]]
        elif counts.shape != total.shape:
            raise PlotDataError(
                f"{run}: a {counts.shape} confusion matrix; expected {total.shape} as the "
                "other runs' (one class list per figure)"
            )
        else:
            total = total + counts
    if total is None:
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
    # A ratio of two devices' step times would measure the devices, not the DP step.
    extra = [k for k in ("variant", "device") if k in summary]
    keys = ["split", "backend", "mode", "seed", *extra]
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
