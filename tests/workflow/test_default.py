"""The embedded default, end to end through Snakemake, as `make run` runs it (smaller)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import PROJECT, SNAKEFILE

pytestmark = pytest.mark.slow


def snakemake(workdir: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The embedded default exactly as `make run` runs it (no --configfile), once per module."""
    workdir = tmp_path_factory.mktemp("demo")
    cfg = yaml.safe_load((PROJECT / "config/config.yaml").read_text())
    proc = snakemake(workdir, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, cfg, proc


def test_summary_has_one_row_per_run(demo):
    workdir, cfg, proc = demo
    summary = pd.read_csv(workdir / "results" / cfg["experiment"] / "summary.csv")
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
    assert summary["test_accuracy"].between(0, 1).all()
    assert f"results/{cfg['experiment']}" in proc.stdout + proc.stderr


def test_every_run_has_the_four_outputs(demo):
    workdir, cfg, _ = demo
    runs = sorted((workdir / "results" / cfg["experiment"] / "runs").glob("*/*/*/*/seed*"))
    assert runs
    for run in runs:
        for name in ("metrics.json", "history.csv", "predictions.npz", "weights.npz"):
            assert (run / name).stat().st_size > 0, run / name
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["backend"] == run.parts[-4] and metrics["variant"] == run.parts[-2]


def test_rerun_recomputes_nothing(demo):
    workdir, _, _ = demo
    proc = snakemake(workdir, "--cores", "2", "-n")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr
