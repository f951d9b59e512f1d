"""`python -m dpscale.report.aggregate`: every run's metrics.json -> results/<exp>/summary.csv.

One tidy row per run: the run's keys (backend, mode, split, level, variant, seed), its plan
(epsilon with the accountant, delta and sampling that qualify it), results and timing, every
other scalar the runner recorded, the scalars of the run's evaluation.json when given (lists
such as per-class rows, the confusion matrix and histograms stay in that file), then every
config parameter as a column, flattened with underscores (model.width -> model_width; training
and model as the run's variant resolved them, so training_batch_size is the effective one). Keys a
run lacks are empty cells, never a crash: a backend that does not report its own epsilon
simply leaves backend_epsilon empty.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from dpscale import atomic, levels
from dpscale.config import variant_configs

#: Columns every summary has, in this order, whether or not any run recorded them.
COLUMNS = (
    "backend",
    "mode",
    "split",
    "level",
    "variant",
    "seed",
    "private",
    "epsilon",
    "accountant",
    "delta",
    "sampling",
    "target_epsilon",
    "noise_multiplier",
    "sample_rate",
    "batch_size",
    "expected_batch_size",
    "epochs",
    "steps",
    "steps_per_epoch",
    # Large-batch simulation (Sander et al. 2023): the predicted run's batch, sigma and epsilon;
    # `epsilon` above stays this run's own guarantee. Empty for ordinary runs.
    "simulated_batch_size",
    "simulated_noise_multiplier",
    "simulated_epsilon",
    "n_train",
    "test_accuracy",
    "test_loss",
    "train_accuracy",
    "train_loss",
    "seconds_per_epoch",
    "step_time_steady_s",
    "step_time_first_s",
    "examples_per_s",
    "device",  # "cpu" or "cuda:<model>": runtimes compare only within one
    "precision",
    "eps_rdp",
    "eps_pld",
    "backend_epsilon",
    "backend_accountant",
    # from evaluation.json (dpscale.metrics.evaluate), empty when a run was not evaluated
    "test_balanced_accuracy",
    "test_macro_f1",
    "test_many_shot_accuracy",
    "test_medium_shot_accuracy",
    "test_few_shot_accuracy",
    "membership_loss_auc",
    "membership_loss_tpr_at_fpr_1pct",
    "membership_eps_lower_bound",
)
#: results/<exp>/runs/<split>/<backend>/<level>/<variant>/seed<k>/metrics.json (common.smk)
RUN_PATH = re.compile(
    r"runs/(?P<split>[^/]+)/(?P<backend>[^/]+)/(?P<level>[^/]+)/(?P<variant>[^/]+)"
    r"/seed(?P<seed>\d+)/[^/]+$"
)
#: Config keys that are not one run's parameters: the grid's variants (resolved per row
#: instead), the scales' overrides (already merged) and the published numbers.
NOT_PARAMETERS = ("variants", "scales", "paper")


class AggregateError(ValueError):
    """A metrics file that cannot be read as one run's flat JSON object."""


def flatten(obj: Mapping, prefix: str = "") -> dict:
    """Nested dicts -> one level, keys joined with '_'; lists become JSON text (one cell)."""
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "_"))
        elif isinstance(value, Mapping | list | tuple):
            out[name] = json.dumps(value, sort_keys=True)
        else:
            out[name] = value
    return out


def config_columns(
    config: Mapping, split: str | None, backend: str | None, variant: str | None = None
) -> dict:
    """The flattened config, plus this run's split profile, backend options and variant resolved.

    The grid keys (splits.profiles, backend_options) hold every split's and backend's entry;
    `split_kind`, `split_rho` and `backend_option_<key>` say which one this row used; the
    `training_*` and `model_*` columns are the run's variant's (the config's, overrides merged).
    """
    config = dict(config)
    variants = config.get("variants") or {}
    if variant in variants:
        resolved = variant_configs(config)[variant]
        config["training"], config["model"] = resolved["training"], resolved["model"]
    cols = flatten({k: v for k, v in config.items() if k not in NOT_PARAMETERS})
    profiles = (config.get("splits") or {}).get("profiles") or {}
    for key, value in (profiles.get(split) or {}).items():
        cols[f"split_{key}"] = value
    options = (config.get("backend_options") or {}).get(backend) or {}
    cols.update(flatten(options, "backend_option_"))
    return cols


def read_metrics(path: str | Path) -> dict:
    """One run's metrics.json as a flat dict, with the run keys its path gives as fallback."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise AggregateError(f"{path}: not found; expected a run's metrics.json") from None
    except json.JSONDecodeError as err:
        raise AggregateError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(metrics, dict):
        raise AggregateError(
            f"{path}: a JSON {type(metrics).__name__}; expected one flat object per run"
        )
    match = RUN_PATH.search(path.as_posix())
    if match:
        keys = match.groupdict()
        keys["seed"] = int(keys["seed"])
        for key, value in keys.items():
            if metrics.get(key) is None:
                metrics[key] = value
    metrics["run_dir"] = str(path.parent)
    return flatten(metrics)


def read_evaluation(path: str | Path) -> dict:
    """The scalar entries of a run's evaluation.json, flattened (lists left out)."""
    path = Path(path)
    try:
        evaluation = json.loads(path.read_text())
    except FileNotFoundError:
        raise AggregateError(f"{path}: not found; expected a run's evaluation.json") from None
    except json.JSONDecodeError as err:
        raise AggregateError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(evaluation, dict):
        raise AggregateError(f"{path}: a JSON {type(evaluation).__name__}; expected an object")
    return flatten(_without_lists(evaluation))


def _without_lists(obj: Mapping) -> dict:
    """Lists left out, and the dicts that held only lists (e.g. a histogram)."""
    out = {}
    for key, value in obj.items():
        if isinstance(value, Mapping):
            value = _without_lists(value)
            if not value:
                continue
        elif isinstance(value, list | tuple):
            continue
        out[key] = value
    return out


def merge_evaluations(runs: list[dict], evaluations: Iterable[str | Path]) -> list[dict]:
    """Add each evaluation's scalars to the run in the same folder; the run's own keys win."""
    by_dir = {str(Path(p).parent): read_evaluation(p) for p in evaluations}
    merged = []
    for run in runs:
        extra = by_dir.pop(run["run_dir"], {})
        merged.append({**{k: v for k, v in extra.items() if k not in run}, **run})
    if by_dir:
        orphan = sorted(by_dir)[0]
        raise AggregateError(
            f"{orphan}/evaluation.json: no metrics.json in that folder; "
            "expected evaluations of the aggregated runs only"
        )
    return merged


def summary_rows(metrics: Iterable[dict], config: Mapping) -> tuple[list[str], list[dict]]:
    """(columns, rows): COLUMNS, then other run keys (sorted), then config columns (sorted).

    A config column whose name a run key already uses is kept as `config_<name>`.
    """
    runs = list(metrics)
    run_keys = sorted({k for m in runs for k in m} - set(COLUMNS))
    rows, config_keys = [], set()
    for m in runs:
        row = dict(m)
        cols = config_columns(config, m.get("split"), m.get("backend"), m.get("variant"))
        if row.get("batch_size") is None:  # the variant's B (the plan has only q n)
            row["batch_size"] = cols.get("training_batch_size")
        for key, value in cols.items():
            name = f"config_{key}" if key in COLUMNS or key in run_keys else key
            row[name] = value
            config_keys.add(name)
        rows.append(row)
    columns = [*COLUMNS, *run_keys, *sorted(config_keys)]
    rows.sort(key=_row_order)
    return columns, rows


def _row_order(row: dict) -> tuple:
    return (
        str(row.get("split")),
        str(row.get("backend")),
        str(row.get("mode")),
        levels.order_key(row.get("level")),
        str(row.get("variant")),
        _num(row.get("seed")),
    )


def _num(value) -> tuple:
    return (0, float(value)) if isinstance(value, int | float) else (1, str(value))


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return str(value)


def to_csv(columns: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def aggregate(
    metrics_paths: Iterable[str | Path],
    config: Mapping,
    out: str | Path,
    evaluation_paths: Iterable[str | Path] = (),
) -> int:
    """Write the summary CSV; returns the number of rows."""
    runs = merge_evaluations([read_metrics(p) for p in metrics_paths], evaluation_paths)
    columns, rows = summary_rows(runs, config)
    atomic.write_text(out, to_csv(columns, rows))
    return len(rows)


def _json_arg(name: str, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise AggregateError(f"{name}: not JSON ({err.msg}); expected JSON text") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", required=True, help="JSON list of metrics.json paths")
    parser.add_argument("--evaluations", default="[]", help="JSON list of evaluation.json paths")
    parser.add_argument("--config", default="{}", help="the experiment config as JSON")
    parser.add_argument("--out", required=True, help="summary.csv to write")
    parser.add_argument("--threads", type=int, default=1, help="unused")
    args = parser.parse_args(argv)
    try:
        paths, config = _json_arg("--metrics", args.metrics), _json_arg("--config", args.config)
        evaluations = _json_arg("--evaluations", args.evaluations)
        for name, value in (("--metrics", paths), ("--evaluations", evaluations)):
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise AggregateError(f"{name}: expected a JSON list of paths")
        if not isinstance(config, dict):
            raise AggregateError("--config: expected a JSON object")
        print(f"aggregating {len(paths)} runs into {args.out}", flush=True)
        n = aggregate(paths, config, args.out, evaluations)
    except AggregateError as err:
        sys.exit(f"dpscale.report.aggregate: {err}")
    print(f"wrote {n} rows to {args.out}", flush=True)


if __name__ == "__main__":
    main()
