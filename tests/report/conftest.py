"""The report tests read the session's shared run of the embedded default (tests/conftest.py
`demo`): its figures and its `snakemake --report` output."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def report_html(demo) -> Path:
    """The report `make run` wrote."""
    return demo.results / "report.html"
