"""`python -m dpscale.report.paper`: our summary.csv beside the published numbers.

paper_comparison.csv: one row per `paper:` entry of the experiment config (source, setting,
metric, the published value), joined to the mean of that metric over our runs that its
`match` selects (summary.csv columns -> values), with how many runs, their spread, our epsilon
and what qualifies it (accountant, delta, sampling) and the scale we ran at, so nobody reads a
smoke-scale number as a reproduction of the paper's.

simulation_check.csv (Sander et al. 2023): for every run that simulates a large batch, the real
large-batch run of the same split, backend, level and seed when the grid has one (a variant
with batch_size = simulated_batch_size, the same epochs, not simulating): the predicted and the
real accuracy, the predicted run's epsilon and the real run's (equal by construction), and the
simulating run's own epsilon (its real, much weaker, guarantee).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence

import pandas as pd

from dpscale import atomic
from dpscale.report.aggregate import AggregateError, to_csv

COMPARISON_COLUMNS = (
    "source",
    "setting",
    "metric",
    "paper_value",
    "ours_value",
    "ours_sd",
    "ours_runs",
    "ours_match",
    "ours_epsilon",
    "ours_accountant",
    "ours_delta",
    "ours_sampling",
    "scale",
    "dataset",
    "n_train",
)
SIMULATION_KEYS = ("split", "backend", "level", "seed")
SIMULATION_COLUMNS = (
    *SIMULATION_KEYS,
    "simulating_variant",
    "real_variant",
    "batch_size",
    "simulated_batch_size",
    "steps",
    "predicted_test_accuracy",
    "real_test_accuracy",
    "accuracy_gap",
    "predicted_epsilon",
    "real_epsilon",
    "simulating_run_own_epsilon",
    "accountant",
    "delta",
    "sampling",
)


def _matches(summary: pd.DataFrame, match: Mapping) -> pd.Series:
    keep = pd.Series(True, index=summary.index)
    for column, value in match.items():
        if column not in summary:
            raise AggregateError(
                f"paper: match key {column!r} is not a summary.csv column; expected one of "
                f"{', '.join(summary.columns[:12])}, ..."
            )
        keep &= _equal(summary[column], value)
    return keep


def _equal(column: pd.Series, value) -> pd.Series:
    """Cells equal to a config value: numbers as numbers (a float column with empty cells reads
    8 as 8.0), everything else as text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return pd.to_numeric(column, errors="coerce") == value
    return column.astype(str) == str(value)


def _first(rows: pd.DataFrame, column: str):
    values = rows[column].dropna().unique() if column in rows else []
    return values[0] if len(values) == 1 else (";".join(map(str, values)) or None)


def comparison(summary: pd.DataFrame, paper: Sequence[Mapping], scale: str | None) -> list[dict]:
    """One row per published number, with ours beside it (empty when no run matches)."""
    out = []
    for entry in paper:
        metric, match = entry["metric"], dict(entry.get("match") or {})
        if metric not in summary:
            raise AggregateError(
                f"paper: metric {metric!r} is not a summary.csv column; expected e.g. "
                "test_accuracy, epsilon, train_loss, seconds_per_epoch"
            )
        rows = summary[_matches(summary, match)]
        values = pd.to_numeric(rows[metric], errors="coerce").dropna()
        private = rows[rows["private"].astype(str) == "True"] if "private" in rows else rows
        out.append(
            {
                "source": entry["source"],
                "setting": entry["setting"],
                "metric": metric,
                "paper_value": float(entry["value"]),
                "ours_value": float(values.mean()) if len(values) else None,
                "ours_sd": float(values.std(ddof=0)) if len(values) else None,
                "ours_runs": int(len(values)),
                "ours_match": json.dumps(match, sort_keys=True),
                "ours_epsilon": (
                    float(pd.to_numeric(private["epsilon"]).mean()) if len(private) else None
                ),
                "ours_accountant": _first(private, "accountant"),
                "ours_delta": _first(private, "delta"),
                "ours_sampling": _first(private, "sampling"),
                "scale": scale or "as written",
                "dataset": _first(rows, "dataset_name"),
                "n_train": _first(rows, "n_train"),
            }
        )
    return out


def simulation_check(summary: pd.DataFrame) -> list[dict]:
    """Each simulating run beside the real large-batch run it predicts (when the grid has it)."""
    if "simulated_batch_size" not in summary:
        return []
    sims = summary[summary["simulated_batch_size"].notna()]
    reals = summary[summary["simulated_batch_size"].isna()]
    out = []
    for _, sim in sims.iterrows():
        same = reals[list(SIMULATION_KEYS)].astype(str) == sim[list(SIMULATION_KEYS)].astype(str)
        candidates = reals[
            same.all(axis=1)
            & (pd.to_numeric(reals["batch_size"]) == float(sim["simulated_batch_size"]))
            & (pd.to_numeric(reals["steps"]) == float(sim["steps"]))
        ]
        real = candidates.iloc[0] if len(candidates) else None

        def real_value(column, real=real):
            return None if real is None else real[column]

        predicted, actual = sim["test_accuracy"], real_value("test_accuracy")
        out.append(
            {
                **{k: sim[k] for k in SIMULATION_KEYS},
                "simulating_variant": sim["variant"],
                "real_variant": real_value("variant"),
                "batch_size": sim["batch_size"],
                "simulated_batch_size": int(sim["simulated_batch_size"]),
                "steps": sim["steps"],
                "predicted_test_accuracy": predicted,
                "real_test_accuracy": actual,
                "accuracy_gap": None if actual is None else predicted - actual,
                "predicted_epsilon": sim["simulated_epsilon"],
                "real_epsilon": real_value("epsilon"),
                "simulating_run_own_epsilon": sim["epsilon"],
                "accountant": sim["accountant"],
                "delta": sim["delta"],
                "sampling": sim["sampling"],
            }
        )
    return out


def _plain(value):
    """numpy scalars as Python ones (their repr would reach the CSV), NaN as an empty cell."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and value != value else value


def _nan_to_none(rows: list[dict]) -> list[dict]:
    return [{k: _plain(v) for k, v in r.items()} for r in rows]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", required=True, help="results/<exp>/summary.csv")
    parser.add_argument("--paper", default="[]", help="the config's paper rows (JSON list)")
    parser.add_argument("--scale", default="", help="the scale the runs were made at")
    parser.add_argument("--out", help="paper_comparison.csv to write")
    parser.add_argument("--simulation-out", help="simulation_check.csv to write")
    parser.add_argument("--threads", type=int, default=1, help="unused")
    args = parser.parse_args(argv)
    try:
        paper = json.loads(args.paper)
        summary = pd.read_csv(args.summary)
        if args.out:
            rows = comparison(summary, paper, args.scale or None)
            atomic.write_text(args.out, to_csv(list(COMPARISON_COLUMNS), _nan_to_none(rows)))
            print(f"wrote {len(rows)} published numbers beside ours to {args.out}", flush=True)
        if args.simulation_out:
            sims = simulation_check(summary)
            atomic.write_text(
                args.simulation_out, to_csv(list(SIMULATION_COLUMNS), _nan_to_none(sims))
            )
            print(f"wrote {len(sims)} simulated runs to {args.simulation_out}", flush=True)
    except (AggregateError, json.JSONDecodeError, KeyError) as err:
        sys.exit(f"dpscale.report.paper: {err}")


if __name__ == "__main__":
    main()
