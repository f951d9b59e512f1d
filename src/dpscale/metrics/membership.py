"""Membership inference on one trained model: training examples (members) vs holdout examples
(non-members from the same distribution, never trained on), and an empirical epsilon bound.

Attacks are global thresholds on a score, higher = "member":
- "loss": minus the cross-entropy of the true label (Yeom et al. 2018),
- "confidence": the largest softmax probability, no label needed (Salem et al. 2019).
Reported per attack: ROC AUC and TPR at 1% and 0.1% FPR (Carlini et al. 2022: the low-FPR
regime, not only AUC), and histograms of loss / confidence for members and non-members.

Empirical epsilon. An (eps, delta)-DP training run bounds every membership test:
TPR <= e^eps FPR + delta and 1 - FPR <= e^eps (1 - TPR) + delta, so
eps >= max(log((TPR - delta) / FPR), log((1 - FPR - delta) / (1 - TPR))) (Kairouz et al.
2015; Jagielski et al. 2020). The threshold is chosen on a random half of members and
non-members and the rates are measured on the other half, with Clopper-Pearson intervals
(examples treated as independent trials); the lower end of the interval is the bound. Both
attacks' bounds are taken at alpha/2 (Bonferroni) so their maximum holds at confidence
1 - alpha. Because train/holdout is a random split of one distribution this approximates a
one-run audit (Steinke et al. 2023) on a population, not a worst-case example: it is a sanity
check, typically far below the accounted epsilon, and a bound ABOVE it means a bug.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta

from dpscale.metrics.classification import check_logits, roc_auc
from dpscale.metrics.losses import per_example_loss, softmax

ATTACKS = ("loss", "confidence")
#: Low-FPR operating points reported per attack.
FPR_POINTS = {"tpr_at_fpr_1pct": 0.01, "tpr_at_fpr_0p1pct": 0.001}
#: Confidence of the empirical epsilon bound (over both attacks together).
ALPHA = 0.05
#: The threshold search looks at most this many candidate thresholds (score quantiles).
MAX_THRESHOLDS = 512
HIST_BINS = 30


def attack_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Each attack's membership score per example, higher = more likely a member."""
    check_logits(logits, labels)
    return {
        "loss": -per_example_loss(logits, labels),
        "confidence": softmax(logits).max(axis=1),
    }


def roc_curve(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of "member if score >= t" for every distinct t, from (0, 0) to (1, 1)."""
    scores = np.concatenate([members, nonmembers])
    is_member = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
    order = np.argsort(-scores, kind="mergesort")
    scores, is_member = scores[order], is_member[order]
    # The last position of each block of tied scores: thresholds between distinct values.
    last = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), len(scores) - 1]
    tp = np.cumsum(is_member)[last]
    fp = np.cumsum(~is_member)[last]
    return np.r_[0.0, fp / len(nonmembers)], np.r_[0.0, tp / len(members)]


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Best TPR among thresholds with FPR <= target (no interpolation: LiRA's convention)."""
    return float(tpr[fpr <= target].max())


def clopper_pearson(k, n, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided 1 - alpha interval of a binomial proportion k / n (exact, conservative)."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    lo = np.where(k > 0, beta.ppf(alpha / 2, k, n - k + 1), 0.0)
    hi = np.where(k < n, beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    return lo, hi


def epsilon_from_rates(tpr, fpr, delta: float) -> np.ndarray:
    """The smallest eps consistent with a test of these rates under (eps, delta)-DP (>= 0)."""
    tpr, fpr = np.asarray(tpr, float), np.asarray(fpr, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.clip(tpr - delta, 0, None) / fpr)
        b = np.log(np.clip(1 - fpr - delta, 0, None) / (1 - tpr))
    a = np.where(np.isnan(a), -np.inf, a)
    b = np.where(np.isnan(b), -np.inf, b)
    return np.maximum(0.0, np.maximum(a, b))


def _counts_at(members, nonmembers, thresholds):
    m, n = np.sort(members), np.sort(nonmembers)
    tp = len(m) - np.searchsorted(m, thresholds, side="left")
    fp = len(n) - np.searchsorted(n, thresholds, side="left")
    return tp, fp


def empirical_epsilon(
    members: np.ndarray,
    nonmembers: np.ndarray,
    delta: float,
    alpha: float = ALPHA,
    seed: int = 0,
) -> dict:
    """Threshold from one random half, eps with its Clopper-Pearson interval on the other."""
    rng = np.random.default_rng(seed)
    m, n = rng.permutation(members), rng.permutation(nonmembers)
    m_fit, m_audit = m[: len(m) // 2], m[len(m) // 2 :]
    n_fit, n_audit = n[: len(n) // 2], n[len(n) // 2 :]
    if min(len(m_fit), len(m_audit), len(n_fit), len(n_audit)) == 0:
        return {"threshold": None, "eps_lower": None, "eps_point": None, "eps_upper": None}
    candidates = np.unique(np.concatenate([m_fit, n_fit]))
    if len(candidates) > MAX_THRESHOLDS:
        candidates = np.unique(np.quantile(candidates, np.linspace(0, 1, MAX_THRESHOLDS)))
    tp, fp = _counts_at(m_fit, n_fit, candidates)
    tpr_lo, _ = clopper_pearson(tp, len(m_fit), alpha)
    _, fpr_hi = clopper_pearson(fp, len(n_fit), alpha)
    threshold = float(candidates[int(np.argmax(epsilon_from_rates(tpr_lo, fpr_hi, delta)))])

    (tp,), (fp,) = _counts_at(m_audit, n_audit, np.array([threshold]))
    tpr_lo, tpr_hi = clopper_pearson(tp, len(m_audit), alpha)
    fpr_lo, fpr_hi = clopper_pearson(fp, len(n_audit), alpha)
    tpr, fpr = tp / len(m_audit), fp / len(n_audit)

    def finite(x) -> float | None:
        x = float(x)
        return x if math.isfinite(x) else None  # inf: the data cannot bound it from above

    return {
        "threshold": threshold,
        "tpr": float(tpr),
        "fpr": float(fpr),
        "n_members": len(m_audit),
        "n_nonmembers": len(n_audit),
        "eps_lower": finite(epsilon_from_rates(tpr_lo, fpr_hi, delta)),
        "eps_point": finite(epsilon_from_rates(tpr, fpr, delta)),
        "eps_upper": finite(epsilon_from_rates(tpr_hi, fpr_lo, delta)),
    }


def _histogram(members: np.ndarray, nonmembers: np.ndarray, lo: float, hi: float) -> dict:
    """Shared bins over [lo, hi] (values beyond go to the end bins) for the two groups."""
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, HIST_BINS + 1)
    return {
        "edges": edges.tolist(),
        "members": np.histogram(np.clip(members, edges[0], edges[-1]), edges)[0].tolist(),
        "nonmembers": np.histogram(np.clip(nonmembers, edges[0], edges[-1]), edges)[0].tolist(),
    }


def loss_attack_arrays(
    train_logits: np.ndarray,
    train_labels: np.ndarray,
    holdout_logits: np.ndarray,
    holdout_labels: np.ndarray,
) -> dict[str, np.ndarray]:
    """What the membership figures draw, too long for evaluation.json: each member's and
    non-member's loss and the loss attack's ROC points (empty without both groups)."""
    member = per_example_loss(train_logits, train_labels)
    nonmember = per_example_loss(holdout_logits, holdout_labels)
    fpr, tpr = roc_curve(-member, -nonmember) if len(member) and len(nonmember) else ([], [])
    return {
        "member_loss": member,
        "nonmember_loss": nonmember,
        "loss_roc_fpr": np.asarray(fpr, np.float64),
        "loss_roc_tpr": np.asarray(tpr, np.float64),
    }


def membership_report(
    train_logits: np.ndarray,
    train_labels: np.ndarray,
    holdout_logits: np.ndarray,
    holdout_labels: np.ndarray,
    delta: float,
    accounted_epsilon: float | None,
    alpha: float = ALPHA,
    seed: int = 0,
) -> dict:
    """Both attacks, their low-FPR rates, histograms and the empirical epsilon bound."""
    members = attack_scores(train_logits, train_labels)
    nonmembers = attack_scores(holdout_logits, holdout_labels)
    report: dict = {"n_members": len(train_labels), "n_nonmembers": len(holdout_labels)}
    if not len(train_labels) or not len(holdout_labels):
        report["eps_lower_bound"] = None
        report["audit_passed"] = True
        return report
    for attack in ATTACKS:
        m, n = members[attack], nonmembers[attack]
        fpr, tpr = roc_curve(m, n)
        scores = np.concatenate([m, n])
        if attack == "loss":
            # Plotted as the loss itself; the top 0.5% share the last bin.
            hist = _histogram(-m, -n, 0.0, float(np.quantile(-scores, 0.995)))
        else:
            hist = _histogram(m, n, 0.0, 1.0)
        report[attack] = {
            "auc": roc_auc(scores, np.r_[np.ones(len(m), bool), np.zeros(len(n), bool)]),
            **{name: tpr_at_fpr(fpr, tpr, target) for name, target in FPR_POINTS.items()},
            "audit": empirical_epsilon(m, n, delta, alpha / len(ATTACKS), seed),
            "histogram": hist,
        }
    lower = [report[a]["audit"]["eps_lower"] for a in ATTACKS]
    bound = max((x for x in lower if x is not None), default=None)
    report.update(
        eps_lower_bound=bound,
        eps_lower_bound_confidence=1 - alpha,
        accounted_epsilon=accounted_epsilon,
        delta=delta,
        audit_passed=bool(bound is None or accounted_epsilon is None or bound <= accounted_epsilon),
    )
    return report
