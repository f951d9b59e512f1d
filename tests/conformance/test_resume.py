"""Resume after a kill: SIGKILL a run once its first epoch's checkpoint exists, rerun, and get
exactly the unbroken run's result. Parametrized over every backend with an adapter and a venv.

Exactness holds because everything random restarts at epoch boundaries: the batch plan and the
augmentation come from (seed, epoch) and the runner reseeds the adapter's noise each epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from dpscale import backends, envs
from dpscale.runner.outputs import read_history
from dpscale.runner.synthetic import write_inputs
from dpscale.workflow import run_step, step_command, thread_env
from tests.conftest import venv_python

BACKENDS = sorted(set(backends.available()) & set(envs.names()))
EPOCHS = 6  # the kill lands after epoch 1's checkpoint: 5 epochs of margin before the end
TIMEOUT_S = 1200


def args(inputs, backend, out, ck):
    return dict(
        backend=backend,
        data_dir=inputs["data_dir"],
        split=inputs["split"],
        privacy=inputs["privacy"],
        model={"width": 4, "groups": 2},
        # augmentation on: its generator must also restart where the unbroken run was
        training={"lr": 0.5, "augment": True, "warmup_epochs": 1},
        options={},
        seed=3,
        out_dir=out,
        checkpoint_dir=ck,
    )


def results(out):
    metrics = json.loads((out / "metrics.json").read_text())
    with np.load(out / "weights.npz") as z:
        weights = {k: z[k] for k in z.files}
    return metrics, read_history(out / "history.csv"), weights


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_then_resume_equals_unbroken_run(tmp_path, backend):
    python = venv_python(backend)
    inputs = write_inputs(tmp_path / "in", epochs=EPOCHS, private=True, seed=1)

    whole = tmp_path / "whole"
    run_step(
        "dpscale.runner",
        tmp_path / "whole.log",
        python,
        1,
        **args(inputs, backend, whole / "out", whole / "ck"),
    )

    # The same run, killed with SIGKILL (no cleanup possible) once a checkpoint exists.
    broken = tmp_path / "broken"
    out, ck = broken / "out", broken / "ck"
    cmd = step_command("dpscale.runner", python, threads=1, **args(inputs, backend, out, ck))
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=thread_env(1))
        deadline = time.monotonic() + TIMEOUT_S
        while not (ck / "state.json").exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "metrics.json").exists(), "the kill landed after the run finished"
    killed_at = json.loads((ck / "state.json").read_text())["epoch"]
    assert 1 <= killed_at < EPOCHS

    run_step(
        "dpscale.runner", tmp_path / "resumed.log", python, 1, **args(inputs, backend, out, ck)
    )
    log = (tmp_path / "resumed.log").read_text()
    assert f"resumed from checkpoint {ck / 'state.json'} after epoch {killed_at}/{EPOCHS}" in log
    assert not ck.exists()

    (m1, h1, w1), (m2, h2, w2) = results(whole / "out"), results(out)
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
