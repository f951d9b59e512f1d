"""The local cluster and the project's SLURM profile, on a toy workflow with the pipeline's rule
names: resources reach sbatch (one GPU for training, CPUs, memory, account), jobs are accounted
in sacct, and a failing job fails the run with its log paths shown.

The toy runs mostly wait (for SLURM's scheduler and the plugin's status polls), so each test's
body is a pool job that holds no core (tests/jobs.py): they run beside the suite's CPU work.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

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
    submitted_jobs,
    wait_for,
)
from tests.unit.test_slurm_profile import site_settings

pytestmark = pytest.mark.slurm
TOY = PROJECT / "tests" / "slurm" / "toy" / "Snakefile"


def toy_job(body: Callable[[int, Path], None]) -> jobs.Job:
    """`body(node CPUs, its own directory)` once the cluster runs, as a job of no cores."""

    def run() -> None:
        cpus, _ = jobs.pool().submit(cluster_job(), first=True).result()
        body(cpus, jobs.workdir(f"slurm-{body.__name__}"))

    return jobs.Job(f"slurm toy {body.__name__}", run, cores=0)


TOY_TESTS: dict[str, Callable[[int, Path], None]] = {}


def toy_test(body: Callable[[int, Path], None]):
    """Define test_<body's name>, which waits for the body run as a toy job (re-raising its
    failure); the body itself stays a plain function."""
    TOY_TESTS[body.__name__] = body

    def test(slurm_cluster):
        jobs.result(toy_job(body))

    test.__name__ = test.__qualname__ = f"test_{body.__name__}"
    test.__doc__ = body.__doc__
    globals()[test.__name__] = test
    return body


@jobs.source
def _toy_jobs(item):
    if item.module.__name__ == __name__ and item.name[len("test_") :] in TOY_TESTS and can_start():
        yield toy_job(TOY_TESTS[item.name[len("test_") :]])


def test_start_is_idempotent(slurm_cluster):
    again = subprocess.run(
        ["bash", PROJECT / "scripts/slurm/start.sh"], capture_output=True, text=True, check=True
    )
    assert "already running" in again.stderr
    node = subprocess.check_output(["scontrol", "show", "node"], text=True)
    assert "Gres=gpu:fake:2" in node
    state = subprocess.check_output(["sinfo", "-h", "-o", "%T"], text=True).split()
    assert state in (["idle"], ["mixed"], ["allocated"])


@toy_test
def profile_requests_gpu_for_training_and_cpus_for_data(cpus: int, tmp_path: Path):
    done = run_snakemake(tmp_path, cpus=cpus, snakefile=TOY)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = submitted_jobs(done.stdout + done.stderr)
    assert len(jobs) == 2, "prepare and train_reference run on SLURM; `all` is local"
    assert set(sacct_states(jobs).values()) == {"COMPLETED"}

    tres = sacct_field(jobs, "AllocTRES")
    # Every job charged to the account in the profile's site block, whatever a site sets there.
    assert set(sacct_field(jobs, "Account").values()) == {site_settings()["account"]}
    prepare, train = (tres[j] for j in jobs)
    assert "gres/gpu" not in prepare
    assert f"cpu={cpus}" in prepare
    assert "gres/gpu=1" in train
    assert f"mem={4000 * cpus}M" in train  # mem_mb_per_cpu 4000 for training
    # The job saw the GPU SLURM gave it.
    assert (tmp_path / "out/train.txt").read_text().startswith("gpus=0 ")


@toy_test
def failing_job_fails_the_run_and_shows_its_logs(cpus: int, tmp_path: Path):
    # --retries 0: the profile's retries would only repeat the same failure (slower).
    done = run_snakemake(
        tmp_path, "--config", "fail=True", "--retries", "0", cpus=cpus, snakefile=TOY
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0
    jobs = submitted_jobs(out)
    assert sacct_states(jobs)[jobs[-1]] == "FAILED"
    assert f"SLURM-job '{jobs[-1]}' failed" in out
    assert "logs/train_reference.log" in out  # the rule's log, with its content shown
    assert "toy failure on purpose" in out
    assert f".snakemake/slurm_logs/rule_train_reference/{jobs[-1]}.log" in out  # SLURM's own log
    assert "Exiting because a job execution failed" in out


@toy_test
def preempted_job_is_requeued_and_completes(cpus: int, tmp_path: Path):
    """The profile's slurm-requeue: a job that SLURM puts back in the queue (as preemption or a
    node failure does; here `scontrol requeue`) runs again under the same id, and snakemake
    waits for it instead of failing."""
    log = tmp_path / "logs/train_reference.log"
    out_file = tmp_path / "snakemake.out"
    cmd = snakemake_cmd(tmp_path, "--config", "sleep=20", cpus=cpus, snakefile=TOY)
    with open(out_file, "w") as out:
        proc = subprocess.Popen(cmd, cwd=PROJECT, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(log.exists, 600, proc, "training job started")
            train_job = submitted_jobs(out_file.read_text())[-1]
            subprocess.run(["scontrol", "requeue", train_job], check=True)
            proc.wait(timeout=600)
        except BaseException:
            proc.kill()
            cancel_jobs_of(tmp_path)
            raise
    text = out_file.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert submitted_jobs(text)[-1] == train_job, "requeued by SLURM, not resubmitted"
    # Started twice under the same id: first cut short by the requeue, then to the end.
    assert (tmp_path / "logs/starts.txt").read_text().split() == [train_job, train_job]
    assert f"slurm_job={train_job}" in (tmp_path / "out/train.txt").read_text()
    assert sacct_states([train_job])[train_job] == "COMPLETED"
