"""The local cluster and the project's SLURM profile, on a toy workflow with the pipeline's rule
names: resources reach sbatch (one GPU for training, CPUs, memory, account), jobs are accounted
in sacct, and a failing job fails the run with its log paths shown."""

from __future__ import annotations

import subprocess

import pytest

from tests.slurm.conftest import PROJECT, run_snakemake, sacct_states, submitted_jobs

pytestmark = pytest.mark.slurm
TOY = PROJECT / "tests" / "slurm" / "toy" / "Snakefile"


def test_start_is_idempotent(slurm_cluster):
    again = subprocess.run(
        ["bash", PROJECT / "scripts/slurm/start.sh"], capture_output=True, text=True, check=True
    )
    assert "already running" in again.stderr
    node = subprocess.check_output(["scontrol", "show", "node"], text=True)
    assert "Gres=gpu:fake:2" in node
    assert subprocess.check_output(["sinfo", "-h", "-o", "%T"], text=True).split() == ["idle"]


def test_profile_requests_gpu_for_training_and_cpus_for_data(slurm_cluster, tmp_path):
    done = run_snakemake(tmp_path, cpus=slurm_cluster, snakefile=TOY)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = submitted_jobs(done.stdout + done.stderr)
    assert len(jobs) == 2, "prepare and train_reference run on SLURM; `all` is local"
    assert set(sacct_states(jobs).values()) == {"COMPLETED"}

    tres = dict(
        line.split("|")
        for line in subprocess.check_output(
            ["sacct", "-n", "-X", "-P", "-o", "JobID,AllocTRES,Account", "-j", ",".join(jobs)],
            text=True,
        ).split()
        for line in [line.rsplit("|", 1)[0]]
    )
    prepare, train = (tres[j] for j in jobs)
    assert "gres/gpu" not in prepare
    assert f"cpu={slurm_cluster}" in prepare
    assert "gres/gpu=1" in train
    assert f"mem={4000 * slurm_cluster}M" in train  # mem_mb_per_cpu 4000 for training
    # The job saw the GPU SLURM gave it.
    assert (tmp_path / "out/train.txt").read_text().startswith("gpus=0 ")


def test_failing_job_fails_the_run_and_shows_its_logs(slurm_cluster, tmp_path):
    # --retries 0: the profile's retries would only repeat the same failure (slower).
    done = run_snakemake(
        tmp_path, "--config", "fail=True", "--retries", "0", cpus=slurm_cluster, snakefile=TOY
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
