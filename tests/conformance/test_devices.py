"""training.devices 2 on a CPU: the logical DP step shared by two workers is the one-device step.

Per backend that supports it (reference and opacus: two gloo processes; jax: one process over
two XLA host devices), through the runner:
- the resume test's run (cifar16 shapes, logical batches of ~16 rows in chunks of 8, noise on)
  with devices 2 ends with the weights of devices 1 (float tolerance): the noise is the same
  draw, so what differs is only the order in which the clipped sums were added;
- a run whose every logical batch is empty (q ~ 0) moves the weights by exactly -lr * noise / B
  with noise of std sigma*C: one draw per logical step (two would give sqrt(2) sigma*C), the
  same on both ranks (their weights' digests, logged at the end, agree); the process-per-device
  backends take it under privacy.secure_randomness, whose root all ranks must share;
- killed after a checkpoint and resumed with devices 2, it equals the unbroken devices-2 run.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from dpscale.backends import PROCESS_PER_DEVICE
from dpscale.models.resnet import ResNetSpec, init_weights
from dpscale.runner.synthetic import write_inputs
from dpscale.workflow import step_command
from tests import jobs
from tests.conformance import test_resume as resume
from tests.conftest import venv_python

BACKENDS = ("reference", "opacus", "jax")
DEVICES = 2
SIGMA, CLIP, B, LR = 1.0, 1.0, 16.0, 1.0
SPEC = ResNetSpec(num_classes=10, image_size=16, width=4, groups=2)
SEED = 3


def noise_job(backend: str) -> jobs.Job:
    """One DP step over an empty logical batch with devices 2, momentum 0: (w0, w1, log)."""

    def run():
        root = jobs.workdir(f"devices-noise-{backend}")
        inputs = write_inputs(root / "in", num_classes=10, image_size=16, epochs=1, seed=1)
        privacy = json.loads(inputs["privacy"].read_text())
        privacy.update(
            sample_rate=1e-12,  # Poisson sampling draws nobody: the step is the noise alone
            steps=1,
            steps_per_epoch=1,
            noise_multiplier=SIGMA,
            expected_batch_size=B,
        )
        inputs["privacy"].write_text(json.dumps(privacy))
        training = {"lr": LR, "momentum": 0.0, "schedule": "constant", "clip_norm": CLIP}
        training.update(physical_batch_size=8, devices=DEVICES)
        cmd = step_command(
            "dpscale.runner",
            venv_python(backend),
            threads=1,
            backend=backend,
            data_dir=inputs["data_dir"],
            split=inputs["split"],
            privacy=inputs["privacy"],
            model={"width": SPEC.width, "groups": SPEC.groups},
            training=training,
            seed=SEED,
            out_dir=root / "out",
            checkpoint_dir=root / "ck",
            secure_randomness=backend in PROCESS_PER_DEVICE,
        )
        proc = jobs.check_run(cmd, threads=1, timeout=resume.TIMEOUT_S)
        with np.load(root / "out/weights.npz") as z:
            w1 = {k: z[k] for k in z.files}
        return init_weights(SPEC, SEED), w1, proc.stdout + proc.stderr

    return jobs.Job(f"devices noise {backend}", run, cores=DEVICES)


@jobs.source
def _device_jobs(item):
    if item.module.__name__ != __name__:
        return
    backend = item.callspec.params["backend"]
    name = item.originalname
    if name == "test_two_devices_take_the_one_device_step":
        yield resume.unbroken_job(backend)
        yield resume.unbroken_job(backend, DEVICES)
    elif name == "test_one_noise_draw_per_logical_step_on_two_devices":
        yield noise_job(backend)
    else:
        yield resume.unbroken_job(backend, DEVICES)
        yield resume.broken_job(backend, DEVICES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_devices_take_the_one_device_step(backend):
    (m1, h1, w1) = resume.results(jobs.result(resume.unbroken_job(backend)))
    (m2, h2, w2) = resume.results(jobs.result(resume.unbroken_job(backend, DEVICES)))
    assert (m1["devices"], m2["devices"]) == (1, DEVICES)
    assert m2["steps_trained"] == m1["steps_trained"] and m2["epsilon"] == m1["epsilon"]
    for a, b in zip(h1, h2, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4), a["epoch"]
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_noise_draw_per_logical_step_on_two_devices(backend):
    w0, w1, log = jobs.result(noise_job(backend))
    noise = np.concatenate([((w0[n] - w1[n]) * B / LR).ravel() for n in w0])
    assert abs(noise.mean()) < 5 * SIGMA * CLIP / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(SIGMA * CLIP, rel=0.03), "not one draw of std sigma*C"
    digests = dict(re.findall(r"rank (\d+) weights sha256 (\w+)", log))
    ranks = DEVICES if backend != "jax" else 1  # jax: one process over two devices
    assert sorted(digests) == [str(r) for r in range(ranks)], log[-2000:]
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_devices_resume_after_a_kill(backend):
    resume.check_resume(backend, DEVICES)
