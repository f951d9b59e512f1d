"""The local SLURM cluster for the `slurm` tests, and how they drive snakemake through it.

The session fixture starts a single-node cluster with the project's own script
(scripts/slurm/start.sh: munge, MariaDB + slurmdbd so that `sacct` answers, slurmctld, slurmd,
two fake GPUs) and stops it afterwards if it was not already running. Snakemake is run the way
docs/cluster.md tells a user to: from the project root with `--profile slurm`; the only
additions are `-d <tmp>` (each test's own working directory) and `--max-threads` (the test
node has 2 CPUs, fewer than the profile asks for).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from dpscale import envs
from tests import jobs
from tests.conftest import require

PROJECT = envs.PROJECT
SCRIPTS = PROJECT / "scripts" / "slurm"
SNAKEMAKE = PROJECT / ".venv" / "bin" / "snakemake"
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+)")


def _status() -> bool:
    return subprocess.run(["bash", SCRIPTS / "status.sh"], capture_output=True).returncode == 0


def cluster_job() -> jobs.Job:
    """Start the cluster (a no-op if it runs); (the node's CPU count, whether it already ran)."""

    def run() -> tuple[int, bool]:
        was_running = _status()
        started = jobs.run(["bash", str(SCRIPTS / "start.sh")], threads=1, timeout=900)
        if started.returncode != 0:
            pytest.fail(f"scripts/slurm/start.sh failed:\n{started.stdout}{started.stderr}")
        cpus = int(subprocess.check_output(["sinfo", "-h", "-o", "%c"], text=True).split()[0])
        return cpus, was_running

    return jobs.Job("slurm cluster", run)


def can_start() -> bool:
    return os.geteuid() == 0 and bool(shutil.which("apt-get") or shutil.which("slurmctld"))


@jobs.source
def _cluster_job(item):
    if "slurm_cluster" in item.fixturenames and can_start():
        yield cluster_job()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node SLURM cluster; yields the node's CPU count."""
    require(os.geteuid() == 0, "the local SLURM cluster needs root (scripts/slurm/start.sh)")
    require(can_start(), "no SLURM and no apt-get to install it (Debian-based machine expected)")
    cpus, was_running = jobs.result(cluster_job())
    yield cpus
    if not was_running:
        subprocess.run(["bash", SCRIPTS / "stop.sh"], check=True, timeout=300)


def snakemake_cmd(workdir: Path, *args: str, cpus: int, snakefile: Path | None = None) -> list[str]:
    """The user's command (docs/cluster.md) plus this test's working directory and CPU cap."""
    cmd = [str(SNAKEMAKE), "--profile", "slurm"]
    if snakefile is not None:
        cmd += ["-s", str(snakefile)]
    return [*cmd, "-d", str(workdir), "--max-threads", str(cpus), *args]


def cancel_jobs_of(workdir: Path) -> None:
    """scancel every job still queued or running in `workdir` (after a test timed out)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %Z"], capture_output=True, text=True).stdout
    ids = [
        i for i, wd in (line.split(maxsplit=1) for line in out.splitlines()) if wd == str(workdir)
    ]
    if ids:
        subprocess.run(["scancel", *ids], check=False)


def run_snakemake(
    workdir: Path, *args: str, cpus: int, snakefile: Path | None = None, timeout=1800
):
    """Run it to the end from the project root (where `--profile slurm` finds ./slurm).

    Its output is also kept in <workdir>/snakemake.out; a run past `timeout` is stopped and its
    SLURM jobs cancelled, so a hang fails the test instead of the CI job.
    """
    cmd = snakemake_cmd(workdir, *args, cpus=cpus, snakefile=snakefile)
    try:
        done = subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        cancel_jobs_of(workdir)
        pytest.fail(f"snakemake ran past {timeout} s: {' '.join(cmd)}\n{err.stderr!s}"[-4000:])
    (workdir / "snakemake.out").write_text(done.stdout + done.stderr)
    return done


def wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str) -> None:
    """Poll `predicate` while the background snakemake `proc` runs; fail on its end or timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"snakemake ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.2)


def submitted_jobs(output: str) -> list[str]:
    """SLURM job ids, in submission order, from snakemake's output."""
    return SUBMITTED.findall(output)


def sacct_field(job_ids: list[str], field: str) -> dict[str, str]:
    """One accounting field (e.g. AllocTRES, Account) of each job's allocation."""
    out = subprocess.check_output(
        ["sacct", "-n", "-X", "-P", "-o", f"JobID,{field}", "-j", ",".join(job_ids)], text=True
    )
    return dict(line.split("|", 1) for line in out.splitlines() if line)


def sacct_states(job_ids: list[str], wait_s: float = 30) -> dict[str, str]:
    """Each job's final state as the accounting database has it (allocations only).

    slurmctld hands a job's end to slurmdbd asynchronously, so wait a little for stragglers.
    """
    deadline = time.monotonic() + wait_s
    while True:
        out = subprocess.check_output(
            ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)], text=True
        )
        # A state may carry words ("CANCELLED by 0"): keep its first.
        states = {
            job: state.split()[0]
            for job, state in (line.split("|", 1) for line in out.splitlines() if line)
        }
        pending = [j for j in job_ids if states.get(j, "PENDING") in ("PENDING", "RUNNING")]
        if not pending or time.monotonic() > deadline:
            return states
        time.sleep(1)
