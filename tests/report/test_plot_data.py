"""The figures' tables: read from the evaluate step's outputs of small hand-made runs (checked
against scikit-learn), and the DP-vs-non-private joins on small hand-made tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from dpscale.metrics import evaluate
from dpscale.plots import data


def _logits(rng, labels, classes=4):
    return (rng.normal(size=(len(labels), classes)) + 2.0 * np.eye(classes)[labels]).astype(
        np.float32
    )


def _run(root, level, seed, names=("a", "b", "c", "d")):
    """One run folder as the pipeline leaves it: metrics.json and evaluate's two outputs."""
    run = root / f"{level}/seed{seed}"
    rng = np.random.default_rng([seed, len(level)])
    labels = {"train": rng.integers(0, 4, 60), "holdout": rng.integers(0, 4, 40)}
    labels["test"] = np.r_[rng.integers(0, 3, 30), 0]  # class 3 has no test example
    predictions = {f"{k}_labels": v for k, v in labels.items()}
    predictions |= {f"{k}_logits": _logits(rng, v) for k, v in labels.items()}
    private = level != "none"
    # A loose accounted epsilon: these tests read outputs, they do not audit.
    privacy = {"level": level, "private": private, "epsilon": 100.0 if private else None}
    run.mkdir(parents=True)
    ev = evaluate.evaluate(predictions, privacy, list(names), seed=seed)
    (run / "evaluation.json").write_text(json.dumps(ev))
    np.savez(run / "evaluation.npz", **evaluate.evaluation_arrays(predictions))
    metrics = {
        "split": "longtail",
        "backend": "reference",
        "mode": "torch.func",
        "level": level,
        "seed": seed,
        "epsilon": privacy["epsilon"],
        "accountant": "rdp",
        "delta": 1e-5,
        "sampling": "poisson",
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run, predictions


def test_per_class_table_is_evaluates_recall(tmp_path):
    (run, pred), (run1, _) = _run(tmp_path, "none", 0), _run(tmp_path, "eps8", 0)
    table = data.per_class_table([run, run1])
    assert len(table) == 8 and list(table["class"][:4]) == ["a", "b", "c", "d"]
    first = table[table["level"] == "none"]
    expected = skm.recall_score(
        pred["test_labels"], pred["test_logits"].argmax(1), labels=range(3), average=None
    )
    np.testing.assert_allclose(first["recall"][:3], expected)
    assert np.isnan(first["recall"].iloc[3])  # no test example: no recall, not 0
    assert list(first["train_count"]) == np.bincount(pred["train_labels"], minlength=4).tolist()
    assert set(first["privacy"]) == {"non-private"}


def test_confusion_table_sums_evaluates_matrices(tmp_path):
    (run0, p0), (run1, p1) = _run(tmp_path, "eps8", 0), _run(tmp_path, "eps8", 1)
    table = data.confusion_table([run0, run1])
    expected = sum(
        skm.confusion_matrix(p["test_labels"], p["test_logits"].argmax(1), labels=range(4))
        for p in (p0, p1)
    )
    np.testing.assert_array_equal(table.to_numpy(), expected)
    assert list(table.index) == ["a", "b", "c", "d"] and table.index.name == "true"


def test_membership_tables_are_evaluates_losses_and_roc(tmp_path):
    (run, pred), (run1, _) = _run(tmp_path, "none", 0), _run(tmp_path, "eps8", 0)
    scores = data.membership_scores([run, run1])
    members = scores[(scores["level"] == "none") & (scores["member"] == data.MEMBER)]
    probs = np.exp(pred["train_logits"] - pred["train_logits"].max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert members["loss"].mean() == pytest.approx(
        skm.log_loss(pred["train_labels"], probs, labels=range(4)), rel=1e-6
    )
    assert (scores["member"] == data.NON_MEMBER).sum() == 2 * 40

    roc = data.roc_table([run, run1])
    one = roc[roc["level"] == "none"]
    truth = np.r_[np.ones(60), np.zeros(40)]
    nonmembers = scores[(scores["level"] == "none") & (scores["member"] == data.NON_MEMBER)]
    loss = np.r_[members["loss"], nonmembers["loss"]]
    sk_fpr, sk_tpr, _ = skm.roc_curve(truth, -loss, drop_intermediate=False)
    np.testing.assert_allclose(one["fpr"], sk_fpr)
    np.testing.assert_allclose(one["tpr"], sk_tpr)
    assert one["auc"].iloc[0] == pytest.approx(skm.roc_auc_score(truth, -loss))
    assert one["tpr_at_fpr"].iloc[0] == pytest.approx(sk_tpr[sk_fpr <= 0.01].max())
    assert set(roc["privacy"]) == {"non-private", "ε=100"}


def test_privacy_labels():
    assert data.privacy_label("none", None) == "non-private"
    assert data.privacy_label("eps8", 7.93) == "ε=7.93"
    assert data.privacy_label("eps8", 7.93, "k4") == "k4: ε=7.93"


def _per_class(level, epsilon, recalls, seed=0):
    return pd.DataFrame(
        {
            "split": "longtail",
            "backend": "reference",
            "mode": "torch.func",
            "level": level,
            "seed": seed,
            "epsilon": epsilon,
            "class": ["a", "b", "c"],
            "class_index": [0, 1, 2],
            "train_count": [100, 30, 10],
            "recall": recalls,
        }
    )


def test_accuracy_drop_averages_seeds_then_subtracts():
    table = pd.concat(
        [
            _per_class("none", None, [0.9, 0.8, 0.7], seed=0),
            _per_class("none", None, [0.9, 0.6, 0.5], seed=1),
            _per_class("eps8", 7.9, [0.8, 0.4, 0.0], seed=0),
            _per_class("eps8", 7.9, [0.8, 0.4, 0.2], seed=1),
        ]
    )
    drop = data.accuracy_drop(table).sort_values("class_index")
    np.testing.assert_allclose(drop["drop"], [0.1, 0.3, 0.5])
    assert list(drop["train_count"]) == [100, 30, 10]
    assert set(drop["privacy"]) == {"ε=7.9"}


def test_accuracy_drop_needs_both_kinds_of_run():
    with pytest.raises(data.PlotDataError, match="non-private.*got levels \\['eps8'\\]"):
        data.accuracy_drop(_per_class("eps8", 7.9, [0.1, 0.2, 0.3]))


def test_step_time_ratio_pairs_each_private_run_with_its_baseline():
    summary = pd.DataFrame(
        {
            "split": ["b"] * 4,
            "backend": ["opacus", "opacus", "reference", "reference"],
            "mode": ["hooks", "hooks", "torch.func", "torch.func"],
            "level": ["none", "eps8", "none", "eps8"],
            "seed": [0] * 4,
            "epsilon": [None, 7.9, None, 7.9],
            "step_time_steady_s": [0.1, 0.25, 0.2, 0.3],
        }
    )
    ratio = data.step_time_ratios(summary).set_index("backend")["ratio"]
    assert ratio["opacus"] == pytest.approx(2.5) and ratio["reference"] == pytest.approx(1.5)
    with pytest.raises(data.PlotDataError, match="missing columns \\['step_time_steady_s'\\]"):
        data.step_time_ratios(summary.drop(columns="step_time_steady_s"))


def test_bad_run_outputs_get_one_line_errors(tmp_path):
    with pytest.raises(data.PlotDataError, match="metrics.json: not found"):
        data.read_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"backend": "x"}))
    with pytest.raises(data.PlotDataError, match="missing run keys"):
        data.read_metrics(tmp_path)
    with pytest.raises(data.PlotDataError, match="evaluation.json: not found; expected the run"):
        data.read_evaluation(tmp_path)
    (tmp_path / "evaluation.json").write_text(json.dumps({"test": {}}))
    with pytest.raises(data.PlotDataError, match="no test per_class and confusion"):
        data.confusion_table([tmp_path])
    with pytest.raises(data.PlotDataError, match="evaluation.npz: not readable as .npz"):
        data.read_evaluation_arrays(tmp_path, ["member_loss"])
    np.savez(tmp_path / "evaluation.npz", member_loss=np.zeros(2))
    with pytest.raises(data.PlotDataError, match="missing nonmember_loss; expected the evaluate"):
        data.read_evaluation_arrays(tmp_path, ["member_loss", "nonmember_loss"])
    with pytest.raises(data.PlotDataError, match="no runs given"):
        data.confusion_table([])
