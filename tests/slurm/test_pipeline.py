"""The pipeline itself through the real local SLURM with the project's profile: the embedded
default, cut to a small DAG (one split, one backend, two levels, the summary and one figure),
completes with every job accounted as COMPLETED, training jobs alone got a GPU and the time
limit the experiment's size gives, and a training job cancelled mid-run is resubmitted and
resumes from its checkpoint to the same result as the unbroken run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dpscale.resources import train_minutes
from tests import jobs
from tests.slurm.conftest import (
    PROJECT,
    can_start,
    cancel_jobs_of,
    cluster_job,
    run_snakemake,
    sacct_field,
    sacct_states,
    snakemake_cmd,
    wait_for,
)

pytestmark = pytest.mark.slurm

# e.g. "... submitted with SLURM jobid 12 (log: .../slurm_logs/rule_train_opacus/12.log)."
# (A rule with wildcards logs one folder deeper: rule_split/balanced/34.log.)
SUBMISSION = re.compile(
    r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/\S*\d+\.log\)"
)
# Results that must not depend on whether training was interrupted (timing and resumes may).
SAME_AFTER_RESUME = (
    "test_accuracy",
    "test_loss",
    "train_accuracy",
    "train_loss",
    "holdout_accuracy",
    "holdout_loss",
    "epsilon",
    "noise_multiplier",
    "steps_trained",
    "epochs_trained",
)
RESUMED_RUN = ("balanced", "reference", "eps8", 0)
# One CPU per job, so that two jobs share the 2-CPU test node at a time.
JOB_CPUS = 1


def small_default() -> dict:
    """config/config.yaml, smaller to keep CI time down: one split, two levels, two epochs,
    fewer images per class, a narrower model, one backend (the cluster is the subject here, the
    backends are the conformance suite's). Same rules."""
    cfg = yaml.safe_load((PROJECT / "config/config.yaml").read_text())
    cfg["privacy"]["levels"] = ["none", "eps8"]
    # device auto: the test node's two GPUs are fake (the shipped profile's jobs require one).
    cfg["training"].update(epochs=2, batch_size=32, physical_batch_size=48, device="auto")
    cfg["splits"].update(train_per_class=40, holdout_per_class=10, test_per_class=10)
    cfg["splits"]["profiles"] = {"balanced": cfg["splits"]["profiles"]["balanced"]}
    cfg["model"]["width"] = 8
    cfg["backends"] = ["reference"]
    return cfg


def targets(cfg: dict) -> list[str]:
    """The summary (which needs every run and evaluation) and one figure."""
    results = f"results/{cfg['experiment']}"
    return [f"{results}/summary.csv", f"{results}/figures/accuracy_vs_epsilon.svg"]


def submissions(output: str) -> list[tuple[str, str]]:
    """(SLURM job id, rule) for every job snakemake submitted, in order."""
    return SUBMISSION.findall(output)


def pipeline_job() -> jobs.Job:
    """The small DAG through SLURM, as a job of no cores: it mostly waits for the scheduler and
    the plugin's status polls, and runs beside the suite's CPU work from the start."""

    def run():
        jobs.pool().submit(cluster_job(), first=True).result()
        workdir = jobs.workdir("slurm-default")
        cfg = small_default()
        (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))
        # Targets first: --configfile takes every word after it.
        args = (*targets(cfg), "--configfile", str(workdir / "config.yaml"))
        done = run_snakemake(workdir, *args, cpus=JOB_CPUS, timeout=2400)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        return workdir, cfg, done.stdout + done.stderr

    return jobs.Job("slurm pipeline", run, cores=0)


@jobs.source
def _pipeline_job(item):
    if "cluster_run" in item.fixturenames and can_start():
        yield pipeline_job()


@pytest.fixture(scope="module")
def cluster_run(slurm_cluster):
    return jobs.result(pipeline_job())


def run_path(
    workdir: Path, cfg: dict, split: str, backend: str, level: str, seed: int, variant="default"
) -> Path:
    return (
        workdir / f"results/{cfg['experiment']}/runs/{split}/{backend}/{level}/{variant}/seed{seed}"
    )


def test_default_runs_on_slurm_with_every_job_completed(cluster_run):
    workdir, cfg, out = cluster_run
    jobs = submissions(out)
    splits, levels = list(cfg["splits"]["profiles"]), cfg["privacy"]["levels"]
    n_runs = len(splits) * len(levels) * len(cfg["backends"]) * len(cfg["seeds"])
    rules = [rule for _, rule in jobs]
    # Everything but the local rules (build_env, fetch, aggregate, figures, targets) went to SLURM.
    assert rules.count("prepare") == 1
    assert rules.count("split") == len(splits)
    assert rules.count("calibrate") == len(splits) * len(levels)
    assert sum(r.startswith("train_") for r in rules) == n_runs
    for backend in cfg["backends"]:
        assert rules.count(f"train_{backend}") == n_runs // len(cfg["backends"])
    assert rules.count("evaluate") == n_runs
    assert len(rules) == 1 + len(splits) + len(splits) * len(levels) + 2 * n_runs

    states = sacct_states([job for job, _ in jobs])
    assert states == {job: "COMPLETED" for job, _ in jobs}

    summary = pd.read_csv(workdir / f"results/{cfg['experiment']}/summary.csv")
    assert len(summary) == n_runs
    figures = sorted((workdir / f"results/{cfg['experiment']}/figures").rglob("*.svg"))
    assert figures == [workdir / targets(cfg)[1]], "the one figure asked for"
    assert summary["test_accuracy"].between(0, 1).all()
    private = summary[summary["level"] == "eps8"]
    assert (private["epsilon"] <= 8 + 1e-6).all() and (private["accountant"] == "rdp").all()


def test_training_jobs_got_a_gpu_and_data_jobs_none(cluster_run):
    _, cfg, out = cluster_run
    jobs = dict(submissions(out))
    tres = sacct_field(list(jobs), "AllocTRES")
    limits = sacct_field(list(jobs), "TimelimitRaw")  # minutes
    # The training time limit follows the experiment's size (first attempt).
    train_limit = train_minutes(
        n_train=cfg["splits"]["classes"] * cfg["splits"]["train_per_class"],
        epochs=cfg["training"]["epochs"],
        resolution=cfg["dataset"]["resolution"],
        width=cfg["model"]["width"],
    )
    for job, rule in jobs.items():
        assert ("gres/gpu=1" in tres[job]) == rule.startswith("train_"), (rule, tres[job])
        if rule.startswith("train_"):
            assert int(limits[job]) == train_limit, (rule, limits[job])


def resume_job() -> jobs.Job:
    """The cancel-and-resume check: one training job on SLURM that mostly waits (no cores)."""

    def run() -> None:
        cancelled_training_job_resumes_from_its_checkpoint(
            jobs.pool().submit(pipeline_job()).result()
        )

    return jobs.Job("slurm cancel and resume", run, cores=0)


@jobs.source
def _resume_job(item):
    if item.name == "test_cancelled_training_job_resumes_from_its_checkpoint" and can_start():
        yield resume_job()


def test_cancelled_training_job_resumes_from_its_checkpoint(cluster_run):
    jobs.result(resume_job())


def cancelled_training_job_resumes_from_its_checkpoint(cluster_run) -> None:
    workdir, cfg, _ = cluster_run
    split, backend, level, seed = RESUMED_RUN
    run = run_path(workdir, cfg, split, backend, level, seed)
    unbroken = workdir / "unbroken"
    shutil.copytree(run, unbroken)
    checkpoint = (
        workdir
        / f"results/{cfg['experiment']}/checkpoints/{split}/{backend}/{level}/default/seed{seed}"
        / "state.json"
    )
    assert not checkpoint.exists(), "a finished run leaves no checkpoint behind"

    # Train that one run again (--force), cancel its job once the first epoch is checkpointed.
    target = str(run.relative_to(workdir) / "metrics.json")
    cmd = snakemake_cmd(
        workdir,
        "--configfile",
        str(workdir / "config.yaml"),
        "--force",
        target,
        cpus=JOB_CPUS,
    )
    log = workdir / "resume.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=PROJECT, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(checkpoint.exists, 900, proc, "checkpoint after the first epoch")
            first = submissions(log.read_text())
            assert [rule for _, rule in first] == [f"train_{backend}"]
            subprocess.run(["scancel", first[0][0]], check=True)
            proc.wait(timeout=900)
        except BaseException:
            proc.kill()
            cancel_jobs_of(workdir)
            raise
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]

    jobs = submissions(text)
    assert [rule for _, rule in jobs] == [f"train_{backend}"] * 2, "cancelled, then resubmitted"
    states = sacct_states([job for job, _ in jobs])
    assert states[jobs[0][0]] == "CANCELLED"
    assert states[jobs[1][0]] == "COMPLETED"

    resumed = json.loads((run / "metrics.json").read_text())
    reference = json.loads((unbroken / "metrics.json").read_text())
    assert resumed["resumes"] == 1 and reference["resumes"] == 0
    for key in SAME_AFTER_RESUME:
        assert resumed[key] == pytest.approx(reference[key], rel=1e-6), key
    with np.load(run / "weights.npz") as a, np.load(unbroken / "weights.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == list(range(1, int(cfg["training"]["epochs"]) + 1))
    assert not checkpoint.exists(), "the checkpoint is removed once the run is complete"
