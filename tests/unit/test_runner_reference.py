"""The runner end to end, in the reference backend's venv (its default mode, bk), on tiny arrays.

Width 4, 8 px, 64 training examples: each run takes seconds. The venv comes from
`python -m dpscale.envs reference` (`make envs`).
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from dpscale import envs
from dpscale.models.resnet import ResNetSpec, num_params, param_shapes
from dpscale.runner.outputs import HISTORY_COLUMNS, read_history
from dpscale.runner.plan import epoch_plan
from dpscale.runner.synthetic import write_inputs
from dpscale.workflow import run_step, step_command, thread_env
from tests.conftest import venv_python

MODEL = {"width": 4, "groups": 2}


def runner_args(inputs, out, ck, **overrides) -> dict:
    """The runner's arguments for a tiny reference run on `inputs` (write_inputs)."""
    args = dict(
        backend="reference",
        data_dir=inputs["data_dir"],
        split=inputs["split"],
        privacy=inputs["privacy"],
        model=MODEL,
        training={"lr": 0.5},
        options={},
        seed=0,
        out_dir=out,
        checkpoint_dir=ck,
    )
    return {**args, **overrides}


def train(tmp_path, inputs, name, **overrides):
    """Run the runner as the train rule does (run_step); return (out_dir, ckpt_dir, log text)."""
    out, ck, log = tmp_path / name / "out", tmp_path / name / "ck", tmp_path / f"{name}.log"
    args = runner_args(inputs, out, ck, **overrides)
    run_step("dpscale.runner", log, venv_python("reference"), 1, **args)
    return out, ck, log.read_text()


def pinned(env: str, package: str) -> SpecifierSet:
    """`package`'s version pin in workflow/envs/<env>.txt, the file its venv is built from."""
    for line in envs.requirement_files(env)[0].read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and Requirement(line).name == package:
            # An empty specifier would accept any version: the check below would say nothing.
            assert Requirement(line).specifier, f"{package} is not pinned in {env}"
            return Requirement(line).specifier
    raise AssertionError(f"{package} is not in the {env} requirements")


def load(out):
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics, read_history(out / "history.csv")


@pytest.fixture(scope="module")
def private_inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("in"), epochs=2, private=True)


def test_private_run_writes_the_contract_outputs(tmp_path, private_inputs):
    # A checkpoint from another configuration must be ignored, not resumed.
    ck = tmp_path / "a" / "ck"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps({"version": 1, "fingerprint": "other"}))
    out, ck, log = train(tmp_path, private_inputs, "a")
    assert "belongs to another configuration; starting from scratch" in log
    assert not ck.exists(), "the checkpoint must be removed once the outputs are written"
    assert sorted(p.name for p in out.iterdir()) == [
        "history.csv",
        "metrics.json",
        "predictions.npz",
        "weights.npz",
    ]

    m, history = load(out)
    spec = ResNetSpec(num_classes=4, image_size=8, **MODEL)
    assert m["backend"] == "reference" and m["mode"] == "reference-bk"
    assert m["split"] == "tiny" and m["level"] == "sigma1" and m["seed"] == 0
    assert m["private"] is True and m["noise_multiplier"] == 1.0 and m["sample_rate"] == 0.25
    assert m["steps"] == m["steps_trained"] == 8 and m["epochs_trained"] == 2
    assert m["accountant"] == "rdp" and m["sampling"] == "poisson" and m["delta"] == 1e-5
    assert m["epsilon"] == 2.0  # the privacy file's, passed through
    assert m["num_params"] == num_params(spec)
    assert m["n_train"] == 64 and m["n_holdout"] == 16 and m["n_test"] == 32
    assert m["physical_batch_size"] == 32  # ceil((16 + 4*4) / 8) * 8
    assert 0.0 <= m["test_accuracy"] <= 1.0 and np.isfinite(m["test_loss"])
    assert m["step_time_first_s"] > 0 and m["step_time_steady_s"] > 0
    assert m["examples_per_s"] > 0 and m["seconds_per_epoch"] > 0 and m["peak_rss_mb"] > 0
    assert m["steady_steps"] == 7  # all steps but the first (warm-up)
    assert m["device"] == "cpu" and m["threads"] == 1
    # The versions the reference venv was built from: its pins (the torch wheel's local
    # label, e.g. +cpu, satisfies `==`), so a pin bump needs no edit here.
    for package in ("torch", "numpy"):
        assert pinned("reference", package).contains(m[f"version_{package}"]), package
    assert m["resumes"] == 0

    assert [r["epoch"] for r in history] == [1, 2] and [r["step"] for r in history] == [4, 8]
    assert list(history[0]) == list(HISTORY_COLUMNS)
    assert [r["epsilon"] for r in history] == [1.0, 2.0]  # from eps_by_epoch
    assert history[-1]["test_loss"] == pytest.approx(m["test_loss"], rel=1e-12)
    assert history[-1]["test_accuracy"] == m["test_accuracy"]
    assert history[0]["seconds"] < history[1]["seconds"]

    with np.load(private_inputs["split"]) as split, np.load(out / "predictions.npz") as pred:
        for part in ("train", "holdout", "test"):
            np.testing.assert_array_equal(pred[f"{part}_indices"], split[part])
            assert pred[f"{part}_logits"].shape == (len(split[part]), 4)
            assert pred[f"{part}_logits"].dtype == np.float32
            ds_labels = np.load(private_inputs["data_dir"] / "labels.npy")[split[part]]
            np.testing.assert_array_equal(split["classes"][pred[f"{part}_labels"]], ds_labels)
        acc = (pred["train_logits"].argmax(1) == pred["train_labels"]).mean()
        assert acc == pytest.approx(m["train_accuracy"])
    with np.load(out / "weights.npz") as w:
        shapes = param_shapes(spec)
        assert sorted(w.files) == sorted(shapes)
        assert all(w[k].shape == shapes[k] for k in shapes)

    progress = [line for line in log.splitlines() if " step " in line and "eps so far" in line]
    assert len(progress) >= 2 and "(rdp, delta=1e-05, poisson sampling)" in progress[0]
    assert "epoch 2/2 done" in log


def test_virtual_batches_equal_one_big_chunk(tmp_path, private_inputs):
    # Physical batch 8 splits each ~16-example Poisson batch into 2-4 chunks; the step (one
    # noise draw per logical batch) must match the single-chunk run up to float summation order.
    one, _, _ = train(tmp_path, private_inputs, "one", training={"lr": 0.5})
    many, _, log = train(
        tmp_path, private_inputs, "many", training={"lr": 0.5, "physical_batch_size": 8}
    )
    (m1, h1), (m2, h2) = load(one), load(many)
    assert m1["physical_batch_size"] == 32 and m2["physical_batch_size"] == 8
    for a, b in zip(h1, h2, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
    with np.load(one / "weights.npz") as w1, np.load(many / "weights.npz") as w2:
        for k in w1.files:
            np.testing.assert_allclose(w1[k], w2[k], rtol=1e-3, atol=1e-5)


def test_non_private_run_learns(tmp_path):
    inputs = write_inputs(tmp_path / "in", epochs=6, private=False)
    out, _, log = train(tmp_path, inputs, "np", training={"lr": 0.1, "schedule": "constant"})
    m, history = load(out)
    assert m["private"] is False and m["backend_epsilon"] is None
    assert all(r["epsilon"] is None for r in history)
    assert "(non-private)" in log
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert m["train_accuracy"] > 0.4  # chance is 0.25


def test_nan_loss_stops_with_the_step(tmp_path):
    inputs = write_inputs(tmp_path / "in", epochs=1, private=False)
    cmd = step_command(
        "dpscale.runner",
        venv_python("reference"),
        backend="reference",
        data_dir=inputs["data_dir"],
        split=inputs["split"],
        privacy=inputs["privacy"],
        model=MODEL,
        training={"lr": 1e30, "schedule": "constant"},
        seed=0,
        out_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "ck",
        threads=1,
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(1), timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "dpscale.runner: error: loss is nan at step 2 (epoch 1, batch of 18, lr 1e+30); "
        "stopping: lower training.lr or check the data"
    ]
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("private", [True, False])
def test_empty_poisson_batches(tmp_path, private):
    # q = 1/16 over 16 examples: about a third of the steps draw nobody. A private step still
    # runs (noise only, as the accountant counts it); a non-private one has nothing to average.
    inputs = write_inputs(tmp_path / "in", n_train=16, batch_size=1, epochs=1, private=private)
    out, _, _ = train(tmp_path, inputs, "e", training={"lr": 0.05})
    m, history = load(out)
    plan_sizes = [len(b) for b in epoch_plan(16, 1 / 16, 16, seed=0, epoch=1)]
    empty = plan_sizes.count(0)
    assert empty >= 2  # this seed's plan really has empty steps
    assert m["skipped_empty_steps"] == (0 if private else empty)
    assert np.isfinite(history[0]["train_loss"]) and np.isfinite(m["test_loss"])
