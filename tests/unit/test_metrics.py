"""Evaluation metrics against scikit-learn / scipy, and the membership audit's soundness."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import optimize, stats
from sklearn import metrics as skm

from dpscale.metrics import classification as cls
from dpscale.metrics import evaluate as ev
from dpscale.metrics import losses
from dpscale.metrics import membership as mia
from dpscale.runner import loop


def _random_predictions(seed=0, n=300, c=5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[labels]
    return logits.astype(np.float32), labels


def test_classification_metrics_match_sklearn():
    logits, labels = _random_predictions()
    pred = logits.argmax(1)
    rep = cls.classification_report(logits, labels, train_counts=np.full(5, 50))
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert rep["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred))
    assert rep["macro_f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"))
    assert rep["confusion"] == skm.confusion_matrix(labels, pred).tolist()
    recall = skm.recall_score(labels, pred, average=None)
    assert [p["recall"] for p in rep["per_class"]] == pytest.approx(recall.tolist())
    probs = cls.softmax(logits)
    assert probs.sum(1) == pytest.approx(np.ones(len(labels)))
    auc = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert rep["auc_ovr_macro"] == pytest.approx(auc)
    assert rep["loss"] == pytest.approx(skm.log_loss(labels, probs, labels=range(5)), rel=1e-6)


def test_roc_auc_with_ties_matches_sklearn():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 200).astype(float)  # many ties
    positive = rng.random(200) < 0.3
    assert cls.roc_auc(scores, positive) == pytest.approx(skm.roc_auc_score(positive, scores))
    assert cls.roc_auc(scores, np.ones(200, bool)) is None


def test_shot_groups_and_undefined_classes():
    # Classes 0..3 with 150, 50, 10, 5 training images; class 3 has no test example.
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 0, 2, 1])
    logits = np.eye(4)[pred] * 5.0
    rep = cls.classification_report(logits, labels, train_counts=[150, 50, 10, 5])
    assert [p["shot"] for p in rep["per_class"]] == ["many", "medium", "few", "few"]
    assert rep["many_shot_accuracy"] == 1.0 and rep["many_shot_classes"] == 1
    assert rep["medium_shot_accuracy"] == 0.5
    assert rep["few_shot_accuracy"] == 0.5 and rep["few_shot_classes"] == 2
    assert rep["per_class"][3]["recall"] is None and rep["per_class"][3]["auc"] is None
    assert rep["balanced_accuracy"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert cls.shot_group(100) == "medium" and cls.shot_group(101) == "many"
    assert cls.shot_group(20) == "medium" and cls.shot_group(19) == "few"


def test_bad_logits_are_one_line_errors():
    with pytest.raises(ValueError, match=r"labels outside 0..2"):
        cls.classification_report(np.zeros((2, 3)), np.array([0, 3]), [1, 1, 1])
    with pytest.raises(ValueError, match="non-finite logits"):
        cls.classification_report(np.full((1, 3), np.nan), np.array([0]), [1, 1, 1])
    with pytest.raises(ValueError, match=r"expected one count per class \(3\)"):
        cls.classification_report(np.zeros((1, 3)), np.array([0]), [1, 1])


def test_roc_curve_and_low_fpr_rates_match_sklearn():
    rng = np.random.default_rng(2)
    members, nonmembers = rng.normal(0.5, 1, 2000), rng.normal(0, 1, 3000)
    fpr, tpr = mia.roc_curve(members, nonmembers)
    y = np.r_[np.ones(2000), np.zeros(3000)]
    sk_fpr, sk_tpr, _ = skm.roc_curve(y, np.r_[members, nonmembers], drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr) and np.allclose(tpr, sk_tpr)
    for target in (0.01, 0.001):
        assert mia.tpr_at_fpr(fpr, tpr, target) == sk_tpr[sk_fpr <= target].max()


def test_clopper_pearson_matches_scipy_exact_interval():
    for k, n in [(0, 20), (7, 20), (20, 20), (3, 1000)]:
        lo, hi = mia.clopper_pearson(k, n, 0.05)
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert (float(lo), float(hi)) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_epsilon_from_rates():
    assert mia.epsilon_from_rates(0.5, 0.05, 0.0) == pytest.approx(math.log(10))
    # The complementary inequality: 1 - FPR <= e^eps (1 - TPR).
    assert mia.epsilon_from_rates(0.9, 0.6, 0.0) == pytest.approx(math.log(0.4 / 0.1))
    assert mia.epsilon_from_rates(0.3, 0.3, 1e-5) == 0.0
    assert mia.epsilon_from_rates(0.5, 0.0, 0.0) == math.inf


def test_per_example_loss_is_cross_entropy_and_the_runners_loss():
    logits, labels = _random_predictions()
    loss = losses.per_example_loss(logits, labels)
    probs = losses.softmax(logits)
    assert loss.dtype == np.float64
    assert loss.mean() == pytest.approx(skm.log_loss(labels, probs, labels=range(5)), rel=1e-9)
    # The runner's metrics.json loss is the same function's mean, bit for bit.
    assert loop.cross_entropy(logits, labels) == float(loss.mean())
    # Large logits stay finite: the log-softmax is shifted by the row maximum.
    assert np.isfinite(losses.per_example_loss(np.array([[1000.0, -1000.0]]), np.array([1]))).all()


def test_loss_attack_arrays_are_the_reports_roc():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 3, 50)
    train = rng.normal(size=(50, 3)) + 2.0 * np.eye(3)[labels]
    hold = rng.normal(size=(40, 3)) + np.eye(3)[labels[:40]]
    arrays = mia.loss_attack_arrays(train, labels, hold, labels[:40])
    np.testing.assert_array_equal(arrays["member_loss"], losses.per_example_loss(train, labels))
    truth = np.r_[np.ones(50), np.zeros(40)]
    scores = -np.r_[arrays["member_loss"], arrays["nonmember_loss"]]
    sk_fpr, sk_tpr, _ = skm.roc_curve(truth, scores, drop_intermediate=False)
    np.testing.assert_allclose(arrays["loss_roc_fpr"], sk_fpr)
    np.testing.assert_allclose(arrays["loss_roc_tpr"], sk_tpr)
    report = mia.membership_report(train, labels, hold, labels[:40], 1e-5, None)
    fpr, tpr = arrays["loss_roc_fpr"], arrays["loss_roc_tpr"]
    assert report["loss"]["tpr_at_fpr_1pct"] == mia.tpr_at_fpr(fpr, tpr, 0.01)
    assert report["loss"]["auc"] == pytest.approx(float(np.trapezoid(tpr, fpr)), abs=1e-12)
    empty = mia.loss_attack_arrays(train, labels, hold[:0], labels[:0])
    assert len(empty["loss_roc_fpr"]) == 0 and len(empty["nonmember_loss"]) == 0


def _gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """Exact eps(delta) of distinguishing N(mu, 1) from N(0, 1) (Balle & Wang 2018)."""

    def excess(eps):
        return (
            stats.norm.cdf(-eps / mu + mu / 2)
            - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
            - delta
        )

    return optimize.brentq(excess, 0.0, 50.0)


def test_audit_bound_is_sound_and_informative_on_a_known_mechanism():
    """Scores from a mechanism whose exact epsilon is known: the bound is below it, yet > 0."""
    mu, delta = 2.0, 1e-5
    exact = _gaussian_dp_epsilon(mu, delta)  # about 6.0
    rng = np.random.default_rng(3)
    for seed in range(3):
        members, nonmembers = rng.normal(mu, 1, 20000), rng.normal(0, 1, 20000)
        audit = mia.empirical_epsilon(members, nonmembers, delta, seed=seed)
        assert 1.0 < audit["eps_lower"] <= audit["eps_point"] <= exact, (audit, exact)


def test_no_leak_gives_no_bound_and_perfect_leak_fails_the_audit():
    rng = np.random.default_rng(4)
    c = 4
    same_train = rng.normal(size=(400, c))
    same_hold = rng.normal(size=(400, c))
    labels = rng.integers(0, c, 400)
    rep = mia.membership_report(same_train, labels, same_hold, labels, 1e-5, 1.0)
    assert rep["audit_passed"] and rep["eps_lower_bound"] < 0.5
    assert 0.4 < rep["loss"]["auc"] < 0.6

    # Members predicted with certainty, non-members wrong: a model that memorized.
    train = np.eye(c)[labels] * 20.0
    hold = np.eye(c)[(labels + 1) % c] * 20.0
    rep = mia.membership_report(train, labels, hold, labels, 1e-5, 1.0)
    assert rep["loss"]["auc"] == 1.0 and rep["loss"]["tpr_at_fpr_0p1pct"] == 1.0
    assert rep["eps_lower_bound"] > 3.0 and not rep["audit_passed"]
    assert sum(rep["loss"]["histogram"]["members"]) == 400


def _write_inputs(tmp_path, leak: bool, private: bool = True):
    rng = np.random.default_rng(5)
    c, n = 3, 300
    arrays = {}
    for part in ("train", "holdout", "test"):
        labels = rng.integers(0, c, n)
        if leak:
            guess = labels if part == "train" else (labels + 1) % c
            logits = np.eye(c)[guess] * 20.0
        else:
            logits = rng.normal(size=(n, c)) + np.eye(c)[labels]
        arrays[f"{part}_logits"] = logits.astype(np.float32)
        arrays[f"{part}_labels"] = labels
        arrays[f"{part}_indices"] = np.arange(n)
    np.savez(tmp_path / "predictions.npz", **arrays)
    privacy = {
        "level": "eps1" if private else "none",
        "private": private,
        "epsilon": 1.0 if private else None,
        "accountant": "rdp",
        "delta": 1e-5,
        "sampling": "poisson",
    }
    (tmp_path / "privacy.json").write_text(json.dumps(privacy))
    return [sys.executable, "-m", "dpscale.metrics.evaluate"] + [
        *("--predictions", str(tmp_path / "predictions.npz")),
        *("--privacy", str(tmp_path / "privacy.json")),
        *("--out", str(tmp_path / "run/evaluation.json")),
        *("--arrays", str(tmp_path / "run/evaluation.npz")),
    ]


def test_evaluate_step_writes_evaluation_json(tmp_path):
    done = subprocess.run(_write_inputs(tmp_path, leak=False), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "run/evaluation.json").read_text())
    assert out["epsilon"] == 1.0 and out["accountant"] == "rdp" and out["delta"] == 1e-5
    assert set(out["test"]) >= {"balanced_accuracy", "macro_f1", "auc_ovr_macro", "confusion"}
    assert out["membership"]["audit_passed"] is True
    assert {"auc", "tpr_at_fpr_1pct", "tpr_at_fpr_0p1pct"} <= set(out["membership"]["loss"])
    assert "empirical eps >=" in done.stdout
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "evaluation.json",
        "evaluation.npz",
    ]
    with np.load(tmp_path / "run/evaluation.npz") as arrays:
        assert len(arrays["member_loss"]) == len(arrays["nonmember_loss"]) == 300
        assert arrays["loss_roc_fpr"][0] == 0.0 and arrays["loss_roc_tpr"][-1] == 1.0


def test_evaluate_step_fails_loudly_when_the_bound_exceeds_the_accounted_epsilon(tmp_path):
    done = subprocess.run(_write_inputs(tmp_path, leak=True), capture_output=True, text=True)
    assert done.returncode != 0
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("dpscale.metrics.evaluate: membership audit: empirical epsilon lower")
    assert "exceeds the accounted epsilon 1 (rdp, delta=1e-05, poisson sampling)" in line
    assert not (tmp_path / "run").exists()


def test_non_private_leak_is_reported_not_failed(tmp_path):
    cmd = _write_inputs(tmp_path, leak=True, private=False)
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "run/evaluation.json").read_text())
    assert out["epsilon"] is None and out["membership"]["eps_lower_bound"] > 3.0


def test_missing_prediction_arrays_are_named(tmp_path):
    np.savez(tmp_path / "p.npz", test_logits=np.zeros((2, 2)))
    with pytest.raises(ev.EvaluationError, match="missing train_logits, train_labels"):
        ev.load_predictions(tmp_path / "p.npz")
