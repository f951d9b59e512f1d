"""summary.csv: one tidy row per run, every config parameter a column, gaps as empty cells."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dpscale import config as dp_config
from dpscale.report import aggregate as agg
from tests.conftest import PROJECT


@pytest.fixture(scope="module")
def config():
    """The embedded default, validated (defaults filled) as the workflow sees it."""
    import yaml

    raw = yaml.safe_load((PROJECT / "config/config.yaml").read_text())
    raw["backend_options"] = {"opacus": {"grad_sample_mode": "ghost"}}
    return dp_config.validate(raw, PROJECT / "workflow/schemas/config.schema.yaml")


def _metrics(split, backend, level, seed, **extra):
    """A metrics.json as the runner writes it: flat run keys, privacy fields, results, timing."""
    private = level != "none"
    return {
        "backend": backend,
        "mode": {"opacus": "opacus-hooks"}.get(backend, backend),
        "split": split,
        "level": level,
        "seed": seed,
        "private": private,
        "noise_multiplier": 0.784 if private else 0.0,
        "sample_rate": 64 / 1100,
        "steps_per_epoch": 17,
        "steps": 102,
        "expected_batch_size": 64.0,
        "n_train": 1100,
        "epochs": 6,
        "delta": 1e-5,
        "epsilon": 7.9959 if private else None,
        "accountant": "rdp",
        "eps_rdp": 7.9959 if private else None,
        "eps_pld": 6.95 if private else None,
        "sampling": "poisson",
        "target_epsilon": 8.0 if private else None,
        "backend_epsilon": 7.9959 if private else None,
        "backend_accountant": "opacus-rdp" if private else None,
        "test_accuracy": 0.8123456789012345,
        "test_loss": 0.61,
        "seconds_per_epoch": 1.5,
        "step_time_steady_s": 0.088,
        "version_numpy": "2.4.6",
        **extra,
    }


def _write_run(root: Path, metrics: dict, split, backend, level, seed) -> Path:
    path = root / f"results/demo/runs/{split}/{backend}/{level}/default/seed{seed}/metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics))
    return path


@pytest.fixture
def runs(tmp_path):
    paths = []
    for split in ("longtail", "balanced"):
        for backend in ("reference", "opacus"):
            for level in ("eps8", "none", "eps2"):
                m = _metrics(split, backend, level, 0)
                paths.append(_write_run(tmp_path, m, split, backend, level, 0))
    return paths


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_one_row_per_run_with_required_and_config_columns(tmp_path, runs, config):
    out = tmp_path / "results/demo/summary.csv"
    assert agg.aggregate(runs, config, out) == 12
    rows = _read(out)
    assert len(rows) == 12
    header = list(rows[0])
    assert header[: len(agg.COLUMNS)] == list(agg.COLUMNS)
    for column in ("model_width", "model_groups", "training_batch_size", "training_lr"):
        assert column in header
    for column in ("privacy_delta", "privacy_accountant", "dataset_name", "splits_seed"):
        assert column in header
    row = rows[0]
    assert row["model_width"] == str(config["model"]["width"])
    assert row["training_batch_size"] == str(config["training"]["batch_size"])
    assert row["training_schedule"] == "cosine"  # a schema default, filled by validation
    assert json.loads(row["privacy_levels"]) == config["privacy"]["levels"]
    assert row["experiment"] == "demo"


def test_rows_are_sorted_and_resolve_split_profile_and_backend_options(tmp_path, runs, config):
    out = tmp_path / "summary.csv"
    agg.aggregate(runs, config, out)
    rows = _read(out)
    keys = [(r["split"], r["backend"], r["level"]) for r in rows[:4]]
    assert keys == [
        ("balanced", "opacus", "none"),
        ("balanced", "opacus", "eps2"),
        ("balanced", "opacus", "eps8"),
        ("balanced", "reference", "none"),
    ]
    by_split = {r["split"]: r for r in rows}
    assert by_split["longtail"]["split_kind"] == "exp"
    assert by_split["longtail"]["split_rho"] == "10"
    assert by_split["balanced"]["split_kind"] == "balanced"
    opacus = [r for r in rows if r["backend"] == "opacus"]
    reference = [r for r in rows if r["backend"] == "reference"]
    assert {r["backend_option_grad_sample_mode"] for r in opacus} == {"ghost"}
    assert {r["backend_option_grad_sample_mode"] for r in reference} == {""}


def test_values_round_trip_and_non_private_epsilon_is_empty(tmp_path, runs, config):
    out = tmp_path / "summary.csv"
    agg.aggregate(runs, config, out)
    table = pd.read_csv(out)
    assert table["test_accuracy"].iloc[0] == 0.8123456789012345
    assert table["seed"].dtype.kind == "i"
    none = table[table["level"] == "none"]
    assert none["epsilon"].isna().all() and none["backend_epsilon"].isna().all()
    private = table[table["level"] != "none"]
    assert (private["accountant"] == "rdp").all() and (private["sampling"] == "poisson").all()
    assert (private["delta"] == 1e-5).all()


def test_missing_keys_are_empty_cells_and_run_keys_come_from_the_path(tmp_path, config):
    sparse = {"test_accuracy": 0.5, "custom_metric": 3}
    path = _write_run(tmp_path, sparse, "balanced", "jax", "sigma1.5", 3)
    metrics = _metrics("balanced", "reference", "eps8", 0)
    full = _write_run(tmp_path, metrics, "balanced", "reference", "eps8", 0)
    out = tmp_path / "summary.csv"
    agg.aggregate([path, full], config, out)
    rows = {r["backend"]: r for r in _read(out)}
    assert set(rows) == {"jax", "reference"}
    jax = rows["jax"]
    assert (jax["split"], jax["level"], jax["seed"]) == ("balanced", "sigma1.5", "3")
    assert jax["epsilon"] == "" and jax["step_time_steady_s"] == "" and jax["mode"] == ""
    assert jax["custom_metric"] == "3" and rows["reference"]["custom_metric"] == ""
    assert jax["run_dir"].endswith("runs/balanced/jax/sigma1.5/default/seed3")
    assert jax["variant"] == "default"


def test_nested_values_are_flattened_and_config_name_clashes_are_prefixed(tmp_path, config):
    m = _metrics("balanced", "reference", "none", 0, timing={"compile_s": 2.0}, model_width=99)
    m["epochs_list"] = [1, 2]
    path = _write_run(tmp_path, m, "balanced", "reference", "none", 0)
    out = tmp_path / "summary.csv"
    agg.aggregate([path], config, out)
    (row,) = _read(out)
    assert row["timing_compile_s"] == "2.0"
    assert json.loads(row["epochs_list"]) == [1, 2]
    assert row["model_width"] == "99"
    assert row["config_model_width"] == str(config["model"]["width"])


def test_flatten():
    assert agg.flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1], "f": {}}) == {
        "a_b": 1,
        "a_c_d": None,
        "e": "[1]",
        "f": "{}",
    }


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "a JSON list; expected one flat object per run"),
    ],
)
def test_unreadable_metrics_name_the_file(tmp_path, config, text, message):
    path = tmp_path / "runs/balanced/reference/none/default/seed0/metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(agg.AggregateError, match=message) as err:
        agg.aggregate([path], config, tmp_path / "summary.csv")
    assert str(path) in str(err.value)
    assert not (tmp_path / "summary.csv").exists()


def test_step_writes_atomically_and_fails_in_one_line(tmp_path, runs, config, umask022):
    out = tmp_path / "out/summary.csv"
    cmd = [sys.executable, "-m", "dpscale.report.aggregate", "--metrics"]
    cmd += [json.dumps([str(p) for p in runs]), "--config", json.dumps(config), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "wrote 12 rows" in done.stdout
    assert len(pd.read_csv(out)) == 12
    assert list(out.parent.iterdir()) == [out]
    assert out.stat().st_mode & 0o777 == 0o644  # colleagues can read it, as after open()

    missing = tmp_path / "runs/x/y/none/default/seed0/metrics.json"
    cmd[4] = json.dumps([str(missing)])
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"dpscale.report.aggregate: {missing}: not found; expected a run's metrics.json"
    ]
    assert len(pd.read_csv(out)) == 12  # the old summary is untouched


def test_evaluation_scalars_join_their_run(tmp_path, runs, config):
    evaluation = {
        "level": "ignored: the run's own keys win",
        "test": {"balanced_accuracy": 0.75, "macro_f1": 0.7, "per_class": [{"class": 0}]},
        "membership": {"loss": {"auc": 0.55, "histogram": {"edges": [0, 1]}}},
        "generalization_gap": 0.1,
    }
    target = runs[0]  # longtail/reference/eps8
    evaluation_path = target.parent / "evaluation.json"
    evaluation_path.write_text(json.dumps(evaluation))
    out = tmp_path / "summary.csv"
    agg.aggregate(runs, config, out, [evaluation_path])
    table = pd.read_csv(out)
    evaluated = table[table["run_dir"] == str(target.parent)]
    assert len(evaluated) == 1
    row = evaluated.iloc[0]
    assert row["level"] == "eps8" and row["test_balanced_accuracy"] == 0.75
    assert row["membership_loss_auc"] == 0.55 and row["generalization_gap"] == 0.1
    assert table["test_balanced_accuracy"].isna().sum() == 11  # the runs without evaluation
    assert not any(c.startswith(("test_per_class", "membership_loss_hist")) for c in table.columns)


def test_evaluation_without_its_run_is_an_error(tmp_path, runs, config):
    stray = tmp_path / "results/demo/runs/balanced/jax/none/default/seed0/evaluation.json"
    stray.parent.mkdir(parents=True)
    stray.write_text("{}")
    with pytest.raises(agg.AggregateError, match="no metrics.json in that folder"):
        agg.aggregate(runs, config, tmp_path / "summary.csv", [stray])
