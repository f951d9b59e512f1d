"""Fixtures shared by every test directory: the job pool, the backends' venvs, probes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpscale import envs
from tests import jobs

PROJECT = envs.PROJECT
SNAKEFILE = PROJECT / "workflow" / "Snakefile"
#: CI (the `CI` environment variable set): a missing prerequisite fails instead of skipping
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require(condition: bool, reason: str) -> None:
    """Skip the test when `condition` is false, unless under CI, where it is a failure: CI must
    run everything, and a skip there would pass a suite that tested nothing."""
    if not condition:
        if IN_CI:
            pytest.fail(f"missing prerequisite under CI: {reason}")
        pytest.skip(reason)


@pytest.fixture
def umask022():
    """The usual umask of a shared filesystem for one test (the old one back after): outputs
    must then be readable by group and others, as files made by open() are."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def venv_python(name: str) -> Path:
    """The interpreter of a backend's venv; the README's test command builds them first."""
    python = envs.python(name)
    if not (envs.env_prefix(name) / envs.READY).exists():
        pytest.fail(f"venv for {name!r} is not built: run `make envs` (or `make test`)")
    return python


def probe_job(backend: str, code: str, *args: str, timeout: int = 600) -> jobs.Job:
    """Run `code` in the backend's venv on one thread; its last stdout line is JSON."""

    def run() -> dict:
        cmd = [str(venv_python(backend)), "-c", code, *args]
        done = jobs.check_run(cmd, threads=1, timeout=timeout)
        return json.loads(done.stdout.strip().splitlines()[-1])

    digest = hashlib.sha1(code.encode()).hexdigest()[:12]
    return jobs.Job(f"probe {backend} {args} {digest}", run)


def run_probe(backend: str, code: str, *args: str, timeout: int = 600) -> dict:
    return jobs.result(probe_job(backend, code, *args, timeout=timeout))


def pytest_collection_modifyitems(items):
    """Modules in the order that keeps the job pool's tail short: first those whose tests need no
    job (they run in this process while the pool starts), then those with a Snakemake run of
    all cores (the largest jobs, whose quieter stretches one-core jobs fill), then the rest.
    Stable: the order within a group is kept."""
    wanted: dict = {}
    for item in items:
        wanted.setdefault(item.module, []).extend(job for src in jobs.SOURCES for job in src(item))
    rank = {
        module: 0 if not found else 1 if any(job.cores is None for job in found) else 2
        for module, found in wanted.items()
    }
    items.sort(key=lambda item: rank[item.module])


@pytest.fixture(scope="session", autouse=True)
def job_pool(request, tmp_path_factory):
    """Every selected test's jobs (tests/jobs.py), queued in test order at session start."""
    pool = jobs.start(tmp_path_factory.mktemp("jobs"))
    for item in request.session.items:
        for source in jobs.SOURCES:
            for job in source(item):
                pool.submit(job)
    yield pool
    pool.close()


def pytest_terminal_summary(terminalreporter):
    """The pool's slowest jobs: a test's own duration only shows the wait for its job."""
    if jobs.started():
        terminalreporter.write_sep("=", "slowest jobs of the pool (tests/jobs.py)")
        for line in jobs.pool().report():
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def project() -> Path:
    return PROJECT


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    """The base env's Snakemake on the project's workflow, in `workdir`."""
    return [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), *args]


class Pipeline:
    """A finished run of the workflow: its working directory, config and output."""

    def __init__(self, workdir: Path, cfg: dict, output: str):
        self.workdir, self.cfg, self.output = workdir, cfg, output
        self.results = workdir / "results" / cfg["experiment"]

    def runs(self) -> list[Path]:
        return sorted(self.results.glob("runs/*/*/*/*/seed*"))

    def snakemake(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """A further command in the same working directory (in this thread)."""
        cmd = snakemake_cmd(self.workdir, *args)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def demo_job() -> jobs.Job:
    """`make run`: the embedded default (no --configfile) on every core, then its report.

    DPSCALE_DEMO_WORKDIR names a directory to run in instead of a fresh one: a rerun there
    redoes only what is missing or changed (e.g. after deleting one backend's runs).
    """

    def run() -> Pipeline:
        reuse = os.environ.get("DPSCALE_DEMO_WORKDIR")
        workdir = Path(reuse) if reuse else jobs.workdir("demo")
        cfg = yaml.safe_load((PROJECT / "config/config.yaml").read_text())
        cores = str(jobs.pool().cores)
        done = jobs.check_run(snakemake_cmd(workdir, "--cores", cores), threads=1, timeout=3600)
        report = f"results/{cfg['experiment']}/report.html"
        jobs.check_run(
            snakemake_cmd(workdir, "--cores", cores, "--report", report), threads=1, timeout=600
        )
        return Pipeline(workdir, cfg, done.stdout + done.stderr)

    return jobs.Job("the embedded default pipeline", run, cores=None)


@jobs.source
def _demo_job(item):
    if "demo" in item.fixturenames:
        yield demo_job()


@pytest.fixture(scope="session")
def demo() -> Pipeline:
    """The embedded default run once per session, as `make run` runs it; every test that only
    needs "a finished run" (workflow, report, figures, browser) reads it. Read-only."""
    return jobs.result(demo_job())
