"""`python -m dpscale.metrics.evaluate`: a run's predictions.npz -> evaluation.json and .npz.

Test-set classification metrics for balanced and long-tailed data (per-class recall, balanced
accuracy, many/medium/few-shot accuracy, macro-F1, one-vs-rest AUC, confusion matrix), train and
holdout accuracy, and membership inference (train = members, holdout = non-members) with an
empirical epsilon lower bound next to the accounted one. A bound above the accounted epsilon
is a bug somewhere (sampling, noise, clipping or accounting): the step then fails loudly,
after logging the whole evaluation.

evaluation.npz holds the arrays too long for JSON that the membership figures draw: every
member's and non-member's loss and the loss attack's ROC points (`loss_attack_arrays`). The
figures read these two files, never the predictions: this step is the one metrics engine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dpscale.atomic import json_safe, write_json, write_npz
from dpscale.metrics.classification import (
    check_logits,
    classification_report,
    per_example_loss,
)
from dpscale.metrics.membership import ALPHA, loss_attack_arrays, membership_report

PARTS = ("train", "holdout", "test")


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated, or an audit that contradicts the accounted epsilon."""


def read_arrays(path: str | Path, names, expected: str) -> dict[str, np.ndarray]:
    """The named arrays of an .npz (the runner's predictions.npz, this step's evaluation.npz);
    EvaluationError naming what is missing, or why the file is unreadable."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in names if k not in z.files]
            if missing:
                raise EvaluationError(f"{path}: missing {', '.join(missing)}; expected {expected}")
            return {k: z[k] for k in names}
    except (OSError, ValueError) as err:
        if isinstance(err, EvaluationError):
            raise
        message = f"{path}: not readable as .npz ({err}); expected {expected}"
        raise EvaluationError(message) from None


def load_predictions(path: str | Path) -> dict[str, np.ndarray]:
    needed = [f"{p}_{k}" for p in PARTS for k in ("logits", "labels")]
    arrays = read_arrays(path, needed, "the runner's predictions.npz")
    for part in PARTS:
        try:
            check_logits(arrays[f"{part}_logits"], arrays[f"{part}_labels"], f"{path}: {part}")
        except ValueError as err:
            raise EvaluationError(str(err)) from None
    return arrays


def class_names_of(split_path: str | Path | None, num_classes: int) -> list[str] | None:
    if split_path is None:
        return None
    with np.load(split_path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    names = meta.get("class_names")
    return [str(n) for n in names] if names and len(names) == num_classes else None


def evaluate(
    predictions: dict[str, np.ndarray],
    privacy: dict,
    class_names: list[str] | None = None,
    alpha: float = ALPHA,
    seed: int = 0,
) -> dict:
    """The evaluation of one run (pure): see the module docstring."""
    num_classes = predictions["test_logits"].shape[1]
    train_counts = np.bincount(predictions["train_labels"], minlength=num_classes)
    accounted = privacy.get("epsilon") if privacy.get("private") else None
    delta = float(privacy.get("delta", 1e-5))

    def acc_loss(part):
        logits, labels = predictions[f"{part}_logits"], predictions[f"{part}_labels"]
        if not len(labels):
            return {"accuracy": None, "loss": None, "n": 0}
        return {
            "accuracy": float((logits.argmax(axis=1) == labels).mean()),
            "loss": float(per_example_loss(logits, labels).mean()),
            "n": len(labels),
        }

    train, holdout = acc_loss("train"), acc_loss("holdout")
    gap = (
        train["accuracy"] - holdout["accuracy"]
        if train["accuracy"] is not None and holdout["accuracy"] is not None
        else None
    )
    return {
        "level": privacy.get("level"),
        "private": bool(privacy.get("private")),
        # The accounted epsilon with what qualifies it (None = infinite, non-private).
        "epsilon": accounted,
        "accountant": privacy.get("accountant"),
        "delta": delta,
        "sampling": privacy.get("sampling"),
        "test": classification_report(
            predictions["test_logits"], predictions["test_labels"], train_counts, class_names
        ),
        "train": train,
        "holdout": holdout,
        "generalization_gap": gap,
        "membership": membership_report(
            predictions["train_logits"],
            predictions["train_labels"],
            predictions["holdout_logits"],
            predictions["holdout_labels"],
            delta,
            accounted,
            alpha,
            seed,
        ),
    }


def evaluation_arrays(predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """evaluation.npz's content (pure): see the module docstring."""
    return loss_attack_arrays(
        predictions["train_logits"],
        predictions["train_labels"],
        predictions["holdout_logits"],
        predictions["holdout_labels"],
    )


def check_audit(evaluation: dict) -> None:
    """Fail loudly when the empirical lower bound exceeds the accounted epsilon."""
    mia = evaluation["membership"]
    if not mia.get("audit_passed", True):
        raise EvaluationError(
            f"membership audit: empirical epsilon lower bound {mia['eps_lower_bound']:.4g} "
            f"(confidence {mia['eps_lower_bound_confidence']:.3g}) exceeds the accounted "
            f"epsilon {mia['accounted_epsilon']:.4g} ({evaluation['accountant']}, "
            f"delta={evaluation['delta']:g}, {evaluation['sampling']} sampling); expected a "
            "bound at most the accounted epsilon: check sampling, clipping, noise and accounting"
        )


def _summary_line(ev: dict) -> str:
    t, mia = ev["test"], ev["membership"]

    def f(x):
        return "n/a" if x is None else f"{x:.4f}"

    eps = "inf (non-private)" if ev["epsilon"] is None else f"{ev['epsilon']:.4g}"
    line = (
        f"test accuracy {f(t['accuracy'])} balanced {f(t['balanced_accuracy'])} "
        f"macro-F1 {f(t['macro_f1'])} AUC {f(t['auc_ovr_macro'])}; "
        f"many/medium/few {f(t['many_shot_accuracy'])}/{f(t['medium_shot_accuracy'])}/"
        f"{f(t['few_shot_accuracy'])}"
    )
    if "loss" in mia:
        line += (
            f"; MIA AUC loss {f(mia['loss']['auc'])} confidence {f(mia['confidence']['auc'])}, "
            f"TPR@1%FPR {f(mia['loss']['tpr_at_fpr_1pct'])}; empirical eps >= "
            f"{f(mia['eps_lower_bound'])} vs accounted {eps}"
        )
    return line


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", required=True, help="the run's predictions.npz")
    parser.add_argument("--privacy", required=True, help="the run's privacy file")
    parser.add_argument("--split", default=None, help="split file (class names), optional")
    parser.add_argument("--out", required=True, help="evaluation.json to write")
    parser.add_argument("--arrays", required=True, help="evaluation.npz to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the audit's half split")
    parser.add_argument("--threads", type=int, default=1, help="unused")
    args = parser.parse_args(argv)
    try:
        predictions = load_predictions(args.predictions)
        try:
            privacy = json.loads(Path(args.privacy).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise EvaluationError(f"{args.privacy}: unreadable privacy file ({err})") from None
        names = class_names_of(args.split, predictions["test_logits"].shape[1])
        evaluation = evaluate(predictions, privacy, names, seed=args.seed)
        print(_summary_line(evaluation), flush=True)
        check_audit(evaluation)
    except EvaluationError as err:
        if "evaluation" in locals():
            print(json.dumps(json_safe(evaluation), indent=1), flush=True)
        sys.exit(f"dpscale.metrics.evaluate: {err}")
    write_npz(Path(args.arrays), evaluation_arrays(predictions))
    write_json(Path(args.out), evaluation)
    print(f"wrote {args.out} and {args.arrays}", flush=True)


if __name__ == "__main__":
    main()
