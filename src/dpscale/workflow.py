"""Glue between Snakemake rules and dpscale steps: every rule runs `python -m dpscale.<step>`.

The interpreter is the base env's for data/privacy/report steps and the backend's venv for
training; arguments are passed as `--key value` (lists and dicts as JSON) and all output goes
to the rule's log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


class StepFailed(RuntimeError):
    pass


def _arg(value) -> str:
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value if not isinstance(value, tuple) else list(value))
    return str(value)


def step_command(module: str, python: str | os.PathLike = sys.executable, **kwargs) -> list[str]:
    cmd = [str(python), "-m", module]
    for key, value in kwargs.items():
        if value is None or value is False:
            continue
        cmd.append("--" + key.replace("_", "-"))
        if value is not True:
            cmd.append(_arg(value))
    return cmd


def thread_env(threads: int) -> dict[str, str]:
    """Environment that makes every numeric library use exactly `threads` threads."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", DPSCALE_THREADS=str(threads))
    for var in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "TF_NUM_INTRAOP_THREADS",
    ):
        env[var] = str(threads)
    env.setdefault("TF_NUM_INTEROP_THREADS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    return env


def run_step(module: str, log, python=sys.executable, threads: int = 1, **kwargs) -> None:
    """Run a dpscale step with its output in `log`; on failure say which log to read."""
    log_path = Path(log if isinstance(log, str | os.PathLike) else log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = step_command(module, python, threads=threads, **kwargs)
    with open(log_path, "w") as out:
        out.write("+ " + " ".join(cmd) + "\n")
        out.flush()
        rc = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=thread_env(threads)
        ).returncode
    if rc != 0:
        tail = log_path.read_text().strip().splitlines()[-5:]
        raise StepFailed(
            f"{module} failed (exit {rc}); log: {log_path}\n" + "\n".join("    " + t for t in tail)
        )
