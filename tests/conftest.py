"""Fixtures shared by every test directory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dpscale import envs
from dpscale.workflow import thread_env

PROJECT = envs.PROJECT
SNAKEFILE = PROJECT / "workflow" / "Snakefile"


def venv_python(name: str) -> Path:
    """The interpreter of a backend's venv; the README's test command builds them first."""
    python = envs.python(name)
    if not (envs.env_prefix(name) / envs.READY).exists():
        pytest.fail(f"venv for {name!r} is not built: run `make envs` (or `make test`)")
    return python


def run_probe(backend: str, code: str, *args: str, timeout: int = 600) -> dict:
    """Run `code` in the backend's venv on one thread; its last stdout line is JSON."""
    proc = subprocess.run(
        [str(venv_python(backend)), "-c", code, *args],
        capture_output=True,
        text=True,
        env=thread_env(1),
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def project() -> Path:
    return PROJECT
