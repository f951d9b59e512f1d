"""The device policy every backend honours (backends.base.Runtime), on this CPU machine.

`device: gpu` must fail before training, in one line naming the backend, what its framework
sees and the fix, and leave no outputs; `cpu` must name the device the same way in every
backend; the runner's step timer must wait for the device (synchronize) before it stops.
Each backend's checks run in its own venv, one process per backend.
"""

from __future__ import annotations

import textwrap

import pytest

from dpscale import backends
from tests import jobs
from tests.conftest import probe_job, run_probe

PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys, tempfile
    from pathlib import Path
    import numpy as np
    from dpscale.backends import load
    from dpscale.backends.base import Batch, DeviceError, Runtime, StepConfig
    from dpscale.models.resnet import ResNetSpec
    from dpscale.runner import __main__ as runner, loop
    from dpscale.runner.synthetic import write_inputs

    name = sys.argv[1]
    Adapter = load(name)
    spec = ResNetSpec(num_classes=3, image_size=8, width=4, groups=2)
    out = {}
    try:
        Adapter(spec, {}, 0, 1, Runtime(device="gpu"))
        out["gpu_error"] = None
    except DeviceError as err:
        out["gpu_error"] = str(err)

    # The runner with device gpu: exit 1 before any output exists.
    tmp = Path(tempfile.mkdtemp())
    inputs = write_inputs(tmp / "in", epochs=1, private=True)
    argv = ["--backend", name, "--data-dir", str(inputs["data_dir"]), "--split",
            str(inputs["split"]), "--privacy", str(inputs["privacy"]), "--model",
            json.dumps({"width": 4, "groups": 2}), "--training", json.dumps({"device": "gpu"}),
            "--out-dir", str(tmp / "out"), "--checkpoint-dir", str(tmp / "ck")]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            runner.main(argv)
            out["runner_exit"] = 0
        except SystemExit as exit:
            out["runner_exit"] = exit.code
    out["runner_stderr"] = stderr.getvalue()
    out["runner_left"] = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")
                                if not p.is_relative_to(tmp / "in"))

    a = Adapter(spec, {}, 0, 1, Runtime(device="cpu"))
    out["device"] = a.device()
    out["visible"] = a._visible_devices()
    a.setup_training(StepConfig(True, 1.0, 1.0, 4.0, 0.9, 4))
    rng = np.random.default_rng(0)
    batch = Batch(rng.normal(size=(4, 8, 8, 3)).astype(np.float32), rng.integers(0, 3, 4),
                  np.ones(4, bool))
    # Who is called, in order, while the runner times a step; the framework's own wait
    # (jax.block_until_ready) where it has one that runs on a CPU.
    calls = []
    step, sync = a.train_step, a.synchronize
    a.train_step = lambda *args: (calls.append("train_step"), step(*args))[1]
    a.synchronize = lambda: (calls.append("synchronize"), sync())[1]
    framework_wait = None
    if name in ("jax", "jaxprivacy", "objax"):
        import jax
        framework_wait, real = [], jax.block_until_ready
        def spy(x):
            framework_wait.append(len(jax.tree.leaves(x)))
            return real(x)
        jax.block_until_ready = spy
    loss, seconds = loop.timed_step(a, [batch], 0.1)
    out["calls"] = calls
    out["framework_wait"] = framework_wait
    out["timed"] = [bool(np.isfinite(loss)), seconds > 0]
    print(json.dumps(out))
    """
)

BACKENDS = sorted(backends.available())


@jobs.source
def _probe_jobs(item):
    if item.module.__name__ == __name__ and "probe" in item.fixturenames:
        name = item.callspec.params["probe"]
        yield probe_job(name, PROBE, name)


@pytest.fixture(scope="module", params=BACKENDS)
def probe(request):
    return request.param, run_probe(request.param, PROBE, request.param)


def test_device_gpu_fails_at_construction_in_one_line_naming_what_is_seen(probe):
    name, out = probe
    message = out["gpu_error"]
    assert message is not None, "device gpu on a CPU-only machine must fail"
    assert "\n" not in message
    assert message.startswith(f"backend {name}: device gpu requested, ")
    assert "sees only [cpu]" in message
    assert "accelerator: cuda" in message  # the fix


def test_the_runner_stops_before_training_and_writes_nothing(probe):
    name, out = probe
    assert out["runner_exit"] == 1
    lines = out["runner_stderr"].strip().splitlines()
    assert lines[-1].startswith(f"dpscale.runner: error: backend {name}: device gpu requested")
    assert out["runner_left"] == [], "no outputs or checkpoints from a run that never started"


def test_every_backend_names_its_cpu_the_same_way(probe):
    _, out = probe
    assert out["device"] == "cpu" and out["visible"] == ["cpu"]


def test_the_step_timer_waits_for_the_device(probe):
    name, out = probe
    assert out["calls"] == ["train_step", "synchronize"]
    assert out["timed"] == [True, True]
    if name in ("jax", "jaxprivacy", "objax"):
        # The updated parameters (and optimizer state): every leaf the update wrote.
        assert out["framework_wait"] and out["framework_wait"][0] > 1
