"""Fixtures shared by every test directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpscale import envs

PROJECT = envs.PROJECT
SNAKEFILE = PROJECT / "workflow" / "Snakefile"


def venv_python(name: str) -> Path:
    """The interpreter of a backend's venv; the README's test command builds them first."""
    python = envs.python(name)
    if not (envs.env_prefix(name) / envs.READY).exists():
        pytest.fail(f"venv for {name!r} is not built: run `make envs` (or `make test`)")
    return python


@pytest.fixture(scope="session")
def project() -> Path:
    return PROJECT
