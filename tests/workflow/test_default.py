"""The embedded default, end to end through Snakemake, as `make run` runs it: the shared run of
tests/conftest.py (`demo`), checked for content."""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def summary(demo) -> pd.DataFrame:
    return pd.read_csv(demo.results / "summary.csv")


def test_summary_has_one_row_per_run(demo, summary):
    cfg = demo.cfg
    n_runs = (
        len(cfg["splits"]["profiles"])
        * len(cfg["backends"])
        * len(cfg["privacy"]["levels"])
        * len(cfg["seeds"])
    )
    assert len(summary) == n_runs
    assert set(summary["backend"]) == set(cfg["backends"])
    assert set(summary["split"]) == set(cfg["splits"]["profiles"])
    for column in (
        "epsilon",
        "noise_multiplier",
        "test_accuracy",
        "test_loss",
        "step_time_steady_s",
    ):
        assert column in summary.columns
    private = summary[summary["level"] == "eps8"]
    assert (private["epsilon"] <= 8.0 + 1e-6).all() and (private["epsilon"] > 7.0).all()
    assert (private["accountant"] == "rdp").all() and (private["sampling"] == "poisson").all()
    assert summary.loc[summary["level"] == "none", "epsilon"].isna().all()
    assert f"results/{cfg['experiment']}" in demo.output


def test_every_backend_learns_and_dp_costs_accuracy(demo, summary):
    """Non-private test accuracy far above chance (1 / classes) in every backend and split, and
    each backend's DP run below its non-private run: a backend that does not train, or whose
    "DP" run is not private, fails here."""
    chance = 1 / demo.cfg["splits"]["classes"]
    acc = summary.set_index(["split", "backend", "level"])["test_accuracy"]
    for (split, backend, level), value in acc.items():
        if level == "none":
            # balanced ~0.95 and long-tailed ~0.67 after four epochs (README): 3x chance is a
            # floor that a learning backend clears on either split and a broken one does not.
            assert value >= 3 * chance, f"{backend} on {split} reached {value:.3f}"
            private = acc[(split, backend, "eps8")]
            assert private < value, f"{backend} on {split}: DP {private:.3f} >= non-private"


def test_every_run_has_the_four_outputs(demo):
    runs = demo.runs()
    assert runs
    for run in runs:
        for name in ("metrics.json", "history.csv", "predictions.npz", "weights.npz"):
            assert (run / name).stat().st_size > 0, run / name
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["backend"] == run.parts[-4] and metrics["variant"] == run.parts[-2]


def test_rerun_recomputes_nothing(demo):
    proc = demo.snakemake("--cores", "2", "-n")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr
