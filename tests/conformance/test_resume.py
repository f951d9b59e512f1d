"""Resume after a kill: SIGKILL a run once its first epoch's checkpoint exists, rerun, and get
exactly the unbroken run's result. Parametrized over every backend with an adapter and a venv.

Exactness holds because everything random restarts at epoch boundaries: the batch plan and the
augmentation come from (seed, epoch) and the runner reseeds the adapter's noise each epoch.

The runs have the conformance suite's cifar16 shapes (10 classes, 16 px, width 4, 2 groups,
chunks of 8 rows), so the XLA programs the conformance driver compiled are found in the jax,
objax and tfprivacy venvs' persistent caches instead of compiled again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from dpscale import backends, envs
from dpscale.runner.outputs import read_history
from dpscale.runner.synthetic import write_inputs
from dpscale.workflow import step_command, thread_env
from tests import jobs
from tests.conftest import venv_python

BACKENDS = sorted(set(backends.available()) | set(envs.names()))
EPOCHS = 6  # the kill lands after epoch 1's checkpoint: 5 epochs of margin before the end
TIMEOUT_S = 1200


def kill_at_first_checkpoint(cmd: list[str], ck: Path, killed_log: Path) -> None:
    """Start `cmd` (a runner) and SIGKILL it as soon as its first checkpoint's state.json exists."""
    with open(killed_log, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=thread_env(1), start_new_session=True
        )
        jobs.pool().track(proc, True)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while not (ck / "state.json").exists():
                assert proc.poll() is None, killed_log.read_text()[-2000:]
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            jobs.pool().track(proc, False)


def args(inputs, backend, out, ck, devices: int = 1):
    return dict(
        backend=backend,
        data_dir=inputs["data_dir"],
        split=inputs["split"],
        privacy=inputs["privacy"],
        model={"width": 4, "groups": 2},
        # augmentation on: its generator must also restart where the unbroken run was
        training={
            "lr": 0.5,
            "augment": True,
            "warmup_epochs": 1,
            "physical_batch_size": 8,
            **({"devices": devices} if devices > 1 else {}),  # tests/conformance/test_devices.py
        },
        options={},
        seed=3,
        out_dir=out,
        checkpoint_dir=ck,
    )


def runner(backend: str, root, devices: int = 1) -> list[str]:
    """The runner on `root`'s own copy of the inputs (deterministic: the same in every copy)."""
    inputs = write_inputs(
        root / "in", num_classes=10, image_size=16, epochs=EPOCHS, private=True, seed=1
    )
    spec = args(inputs, backend, root / "out", root / "ck", devices)
    return step_command("dpscale.runner", venv_python(backend), threads=1, **spec)


def label(backend: str, devices: int) -> str:
    return backend if devices == 1 else f"{backend} devices{devices}"


def unbroken_job(backend: str, devices: int = 1) -> jobs.Job:
    def run():
        root = jobs.workdir(f"resume-{label(backend, devices)}") / "whole"
        jobs.check_run(runner(backend, root, devices), threads=1, timeout=TIMEOUT_S)
        return root / "out"

    return jobs.Job(f"resume {label(backend, devices)} unbroken", run, cores=devices)


def broken_job(backend: str, devices: int = 1) -> jobs.Job:
    """The same run, killed with SIGKILL (no cleanup possible) once a checkpoint exists, then
    run again: (its output folder, the epoch of the kill, the second run's log)."""

    def run():
        root = jobs.workdir(f"resume-{label(backend, devices)}") / "broken"
        out, ck = root / "out", root / "ck"
        killed_log = root.parent / "killed.log"
        cmd = runner(backend, root, devices)
        kill_at_first_checkpoint(cmd, ck, killed_log)
        assert not (out / "metrics.json").exists(), "the kill landed after the run finished"
        killed_at = json.loads((ck / "state.json").read_text())["epoch"]
        resumed = jobs.check_run(cmd, threads=1, timeout=TIMEOUT_S)
        return out, ck, killed_at, resumed.stdout + resumed.stderr

    return jobs.Job(f"resume {label(backend, devices)} killed", run, cores=devices)


@jobs.source
def _resume_jobs(item):
    if item.module.__name__ == __name__:
        backend = item.callspec.params["backend"]
        yield unbroken_job(backend)
        yield broken_job(backend)


def results(out):
    metrics = json.loads((out / "metrics.json").read_text())
    with np.load(out / "weights.npz") as z:
        weights = {k: z[k] for k in z.files}
    return metrics, read_history(out / "history.csv"), weights


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_then_resume_equals_unbroken_run(backend):
    check_resume(backend)


def check_resume(backend: str, devices: int = 1) -> None:
    whole = jobs.result(unbroken_job(backend, devices))
    out, ck, killed_at, log = jobs.result(broken_job(backend, devices))
    assert 1 <= killed_at < EPOCHS
    assert f"resumed from checkpoint {ck / 'state.json'} after epoch {killed_at}/{EPOCHS}" in log
    assert not ck.exists()

    (m1, h1, w1), (m2, h2, w2) = results(whole), results(out)
    assert m2["resumes"] == 1 and m1["resumes"] == 0
    assert m2["test_accuracy"] == m1["test_accuracy"]
    assert m2["train_accuracy"] == m1["train_accuracy"]
    assert m2["test_loss"] == pytest.approx(m1["test_loss"], rel=1e-6)
    assert len(h1) == len(h2) == EPOCHS
    for a, b in zip(h1, h2, strict=True):
        assert (a["epoch"], a["step"], a["lr"]) == (b["epoch"], b["step"], b["lr"])
        for key in ("train_loss", "test_loss", "test_accuracy", "epsilon"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (key, a["epoch"])
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], rtol=1e-5, atol=1e-7, err_msg=name)
