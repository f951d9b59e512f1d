"""A tiny real run of the pipeline with its figures, shared by the report tests.

The run trains the default backends on digits at 16 px with width 4 for two epochs of a few
steps each: minutes on two CPU cores. Its figures and `snakemake --report` output are what the
tests look at.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT, SNAKEFILE


def tiny_config() -> dict:
    cfg = yaml.safe_load((PROJECT / "config/config.yaml").read_text())
    cfg["experiment"] = "tiny"
    cfg["splits"].update(train_per_class=16, holdout_per_class=8, test_per_class=10)
    cfg["model"] = {"width": 4, "groups": 2}
    cfg["training"].update(epochs=2, batch_size=32, physical_batch_size=48, lr=0.5)
    cfg["privacy"]["levels"] = ["none", "eps8"]
    return cfg


def snakemake(snakefile: Path, workdir: Path, *args: str, timeout: int = 3600):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


class Pipeline:
    def __init__(self, workdir: Path, snakefile: Path, cfg: dict):
        self.workdir, self.snakefile, self.cfg = workdir, snakefile, cfg
        self.results = workdir / "results" / cfg["experiment"]
        self.configfile = workdir / "config.yaml"

    def run(self, *args: str, timeout: int = 3600):
        return snakemake(
            self.snakefile,
            self.workdir,
            "--configfile",
            str(self.configfile),
            *args,
            timeout=timeout,
        )

    def runs(self) -> list[Path]:
        return sorted(self.results.glob("runs/*/*/*/*/seed*"))


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
    """The tiny config run through every figure rule (targets `all` and `figures`).

    DPSCALE_REPORT_WORKDIR names a directory to run in instead of a fresh temporary one: a
    rerun there only redoes what changed (e.g. figures after editing dpscale.plots).
    """
    reuse = os.environ.get("DPSCALE_REPORT_WORKDIR")
    workdir = Path(reuse) if reuse else tmp_path_factory.mktemp("report-wf")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config()
    pipe = Pipeline(workdir, SNAKEFILE, cfg)
    pipe.configfile.write_text(yaml.safe_dump(cfg))
    proc = pipe.run("--cores", "2", "all", "figures")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return pipe


@pytest.fixture(scope="session")
def report_html(pipeline) -> Path:
    """`snakemake --report` on the tiny run."""
    out = pipeline.results / "report.html"
    proc = pipeline.run("--report", str(out), "all", "figures", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out
