"""The figures' tables: per-example and per-class quantities against scikit-learn, and the
DP-vs-non-private joins on small hand-made tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from dpscale.plots import data


@pytest.fixture
def logits_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=60)
    logits = rng.normal(size=(60, 4)) + 2.0 * np.eye(4)[labels] * rng.random((60, 1))
    return logits.astype(np.float32), labels


def test_example_losses_are_cross_entropy(logits_labels):
    logits, labels = logits_labels
    losses = data.example_losses(logits, labels)
    probs = np.exp(data.log_softmax(logits))
    assert losses.mean() == pytest.approx(skm.log_loss(labels, probs, labels=range(4)), rel=1e-6)
    # Large logits stay finite: the log-softmax is shifted by the row maximum.
    assert np.isfinite(data.example_losses(np.array([[1000.0, -1000.0]]), np.array([1]))).all()


def test_per_class_recall_and_confusion_match_sklearn(logits_labels):
    logits, labels = logits_labels
    pred = logits.argmax(1)
    recall = data.per_class_recall(logits, labels, 5)  # class 4 has no examples
    expected = skm.recall_score(labels, pred, labels=range(4), average=None)
    np.testing.assert_allclose(recall[:4], expected)
    assert np.isnan(recall[4])
    np.testing.assert_array_equal(
        data.confusion(logits, labels, 4), skm.confusion_matrix(labels, pred, labels=range(4))
    )


def test_roc_points_match_sklearn():
    rng = np.random.default_rng(1)
    members = np.round(rng.normal(0.5, 1, 40), 1)  # rounded: ties across the two groups
    nonmembers = np.round(rng.normal(0.0, 1, 30), 1)
    fpr, tpr = data.roc_points(members, nonmembers)
    truth = np.r_[np.ones(40), np.zeros(30)]
    scores = np.r_[members, nonmembers]
    assert data.auc(fpr, tpr) == pytest.approx(skm.roc_auc_score(truth, scores))
    sk_fpr, sk_tpr, _ = skm.roc_curve(truth, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert data.tpr_at_fpr(fpr, tpr, 0.1) == pytest.approx(sk_tpr[sk_fpr <= 0.1].max())


def test_roc_of_a_perfect_and_a_blind_attack():
    fpr, tpr = data.roc_points(np.array([2.0, 3.0]), np.array([0.0, 1.0]))
    assert data.auc(fpr, tpr) == 1.0 and data.tpr_at_fpr(fpr, tpr, 0.0) == 1.0
    fpr, tpr = data.roc_points(np.zeros(5), np.zeros(5))
    assert data.auc(fpr, tpr) == 0.5 and data.tpr_at_fpr(fpr, tpr, 0.5) == 0.0
    with pytest.raises(data.PlotDataError, match="0 non-members"):
        data.roc_points(np.zeros(3), np.zeros(0))


def test_levels_sort_and_read():
    assert data.sorted_levels(["eps10", "sigma1.0", "none", "eps2"]) == [
        "none",
        "eps2",
        "eps10",
        "sigma1.0",
    ]
    assert data.level_text("none").startswith("∞")
    assert data.level_text("eps8") == "≤ 8 (target)"
    assert data.privacy_label("none", None) == "non-private"
    assert data.privacy_label("eps8", 7.93) == "ε=7.93"


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
    np.savez(tmp_path / "predictions.npz", train_logits=np.zeros((2, 2)))
    with pytest.raises(data.PlotDataError, match="no array 'train_labels'"):
        data.read_predictions(tmp_path)
    np.savez(tmp_path / "split.npz", train_counts=np.array([3, 2]), meta=json.dumps({}))
    counts, names = data.read_split(tmp_path / "split.npz")
    assert list(counts) == [3, 2] and names == ["0", "1"]
