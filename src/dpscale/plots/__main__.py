"""`python -m dpscale.plots --figure <name>`: one figure of the report, as SVG and PNG.

Figures and what they read (never predictions.npz: metrics come from the evaluate step):
  accuracy    summary.csv                 test accuracy vs epsilon per backend, facets per split
  balanced_accuracy  summary.csv          the same for balanced accuracy (from evaluation.json)
  audit       summary.csv                 empirical epsilon lower bound vs accounted epsilon
  seconds     summary.csv                 seconds per epoch per backend and level
  step_ratio  summary.csv                 DP / non-private steady step time per backend
  training    runs' history.csv           train/test loss per epoch per backend, panel per level
  disparate   runs' evaluation.json       per-class recall drop (DP vs none) vs training count
  mia_hist    runs' evaluation.npz        member vs non-member loss histograms, panel per level
  mia_roc     runs' evaluation.npz/.json  loss-threshold attack ROC, panel per backend
  confusion   runs' evaluation.json       test confusion matrix (seeds summed)
Run figures also read each run's metrics.json (its keys and epsilon).
"""

from __future__ import annotations

import argparse
import json
import sys

import pandas as pd

from dpscale.plots import data, figures

SUMMARY_FIGURES = ("accuracy", "balanced_accuracy", "audit", "seconds", "step_ratio")
RUN_FIGURES = ("training", "disparate", "mia_hist", "mia_roc", "confusion")


def build(args) -> object:
    """The figure named by --figure, from the inputs the arguments name."""
    if args.figure in SUMMARY_FIGURES:
        summary = pd.read_csv(args.summary)
        print(f"read {len(summary)} runs from {args.summary}", flush=True)
        if args.figure == "accuracy":
            return figures.accuracy_vs_epsilon(summary)
        if args.figure == "balanced_accuracy":
            return figures.accuracy_vs_epsilon(summary, "test_balanced_accuracy")
        if args.figure == "audit":
            return figures.epsilon_audit(summary)
        if args.figure == "seconds":
            return figures.seconds_per_epoch(summary)
        return figures.step_time_ratio(data.step_time_ratios(summary))
    runs = args.runs
    print(f"reading {len(runs)} runs", flush=True)
    if args.figure == "training":
        return figures.training_curves(data.history_table(runs))
    if args.figure == "disparate":
        return figures.disparate_impact(data.accuracy_drop(data.per_class_table(runs)))
    if args.figure == "mia_hist":
        return figures.membership_histograms(data.membership_scores(runs))
    if args.figure == "mia_roc":
        return figures.membership_roc(data.roc_table(runs))
    keys = data.run_keys(data.read_metrics(runs[0]))
    seeds = sorted({data.read_metrics(r)["seed"] for r in runs})
    title = (
        f"{keys['backend']} ({keys['mode']}) on {keys['split']}, {keys['privacy']}"
        + (
            f" ({keys['accountant'].upper()}, δ={keys['delta']:g}, {keys['sampling']})"
            if keys["level"] != "none" and keys["accountant"]
            else ""
        )
        + f"; seeds {', '.join(map(str, seeds))} summed"
    )
    return figures.confusion_matrix(data.confusion_table(runs), title)


def _runs_arg(text: str) -> list[str]:
    try:
        runs = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err.msg}); expected a JSON list") from None
    if not isinstance(runs, list) or not runs or not all(isinstance(r, str) for r in runs):
        raise argparse.ArgumentTypeError("expected a non-empty JSON list of run directories")
    return runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", required=True, choices=SUMMARY_FIGURES + RUN_FIGURES)
    parser.add_argument("--summary", help="summary.csv (accuracy, seconds, step_ratio)")
    parser.add_argument("--runs", type=_runs_arg, help="JSON list of run directories")
    parser.add_argument("--svg", required=True, help="SVG to write (the report's)")
    parser.add_argument("--png", help="PNG to write (the README's)")
    parser.add_argument("--threads", type=int, default=1, help="unused")
    args = parser.parse_args(argv)
    if args.figure in SUMMARY_FIGURES and not args.summary:
        parser.error(f"--figure {args.figure} needs --summary (summary.csv)")
    if args.figure in RUN_FIGURES and not args.runs:
        parser.error(f"--figure {args.figure} needs --runs (a JSON list of run directories)")
    try:
        fig = build(args)
    except (data.PlotDataError, FileNotFoundError) as err:
        sys.exit(f"dpscale.plots {args.figure}: {err}")
    figures.save(fig, args.svg, args.png)
    print(f"wrote {args.svg}" + (f" and {args.png}" if args.png else ""), flush=True)


if __name__ == "__main__":
    main()
