"""Glue between Snakemake rules and dpscale steps: every rule runs `python -m dpscale.<step>`.

The interpreter is the base env's for data/privacy/report steps and the backend's venv for
training; arguments are passed as `--key value` (lists and dicts as JSON) and all output goes
to the rule's log.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
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


class GpuSlots:
    """The GPUs of a local workstation, handed to running training jobs (training.devices each).

    Snakemake's `gpu` resource (`--resources gpu=N`) bounds how many GPUs the running jobs hold
    together; this pool says which: local jobs run as threads of one Snakemake process, so a
    lock and a free list suffice. The GPUs are those in CUDA_VISIBLE_DEVICES when Snakemake
    started, else 0..N-1. Inside a SLURM job the scheduler has already chosen (and set the
    variable).
    """

    def __init__(self, visible: str | None = None) -> None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
        self._given = [g.strip() for g in visible.split(",") if g.strip()] if visible else None
        self._free: list[str] | None = None
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, total: int, count: int = 1):
        """`count` GPU ids (a list) for the block, out of `total` (the gpu resource's amount)."""
        with self._cond:
            if self._free is None:
                ids = self._given if self._given is not None else [str(i) for i in range(total)]
                if len(ids) < total:
                    raise StepFailed(
                        f"--resources gpu={total} but CUDA_VISIBLE_DEVICES lists {len(ids)} "
                        f"GPU(s) ({','.join(ids)}); expected at most {len(ids)}"
                    )
                self._free = ids[:total]
            if count > total:
                raise StepFailed(
                    f"a step asks for {count} GPUs, --resources gpu={total} declares {total}; "
                    f"expected training.devices <= {total}"
                )
            while len(self._free) < count:  # Snakemake's resource count makes this short
                self._cond.wait()
            gpus, self._free = self._free[:count], self._free[count:]
        try:
            yield gpus
        finally:
            with self._cond:
                self._free.extend(gpus)
                self._cond.notify_all()


GPUS = GpuSlots()

# training.devices of each training job, by (backend, variant) ("pretrain", "" for the
# pre-training), filled by workflow/rules/common.smk: the slurm profile's resource expressions
# (gpu, threads) read it through job_devices, as they cannot see the config.
RUN_DEVICES: dict[tuple[str, str], int] = {}


def job_devices(wildcards) -> int:
    """The devices (GPUs) of the training job `wildcards` name; 1 for any other job."""
    key = (getattr(wildcards, "backend", "pretrain"), getattr(wildcards, "variant", ""))
    return RUN_DEVICES.get(key, 1)


def gpu_env(gpus: int, total: int):
    """A context giving the step's environment its GPUs: {} when it asks for none, no GPUs are
    declared (`--resources gpu=N`) or SLURM chose; else CUDA_VISIBLE_DEVICES of `gpus` free
    GPUs."""
    if gpus < 1 or total < 1 or os.environ.get("SLURM_JOB_ID"):
        return contextlib.nullcontext({})

    @contextlib.contextmanager
    def held():
        with GPUS.hold(total, gpus) as ids:
            yield {"CUDA_VISIBLE_DEVICES": ",".join(ids)}

    return held()


def run_step(
    module: str,
    log,
    python=sys.executable,
    threads: int = 1,
    gpus: int = 0,
    gpu_total: int | None = None,
    **kwargs,
) -> None:
    """Run a dpscale step with its output in `log`; on failure say which log to read.

    gpus: GPUs the step holds (a rule's `gpu` resource); on a workstation one of `gpu_total`
    (`--resources gpu=N`) is chosen for it (gpu_env)."""
    log_path = Path(log if isinstance(log, str | os.PathLike) else log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = step_command(module, python, threads=threads, **kwargs)
    with gpu_env(int(gpus or 0), int(gpu_total or 0)) as extra, open(log_path, "w") as out:
        out.write("+ " + " ".join(cmd) + "\n")
        for key, value in extra.items():
            out.write(f"+ {key}={value}\n")
        out.flush()
        env = {**thread_env(threads), **extra}
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = log_path.read_text().strip().splitlines()[-5:]
        raise StepFailed(
            f"{module} failed (exit {rc}); log: {log_path}\n" + "\n".join("    " + t for t in tail)
        )
