"""The runner's input checks: bad files and keys fail at once with one clear line.

These fail before any framework is imported, so the base env's interpreter runs them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from dpscale import atomic
from dpscale.runner import loop, outputs
from dpscale.runner.synthetic import write_inputs
from dpscale.workflow import step_command, thread_env
from tests.conftest import require


@pytest.fixture
def inputs(tmp_path):
    return write_inputs(tmp_path / "in")


def run_runner(tmp_path, inputs, **overrides):
    args = dict(
        backend="reference",
        data_dir=inputs["data_dir"],
        split=inputs["split"],
        privacy=inputs["privacy"],
        model={"width": 4, "groups": 2},
        training={},
        options={},
        seed=0,
        out_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "ck",
        threads=1,
    )
    args.update(overrides)
    cmd = step_command("dpscale.runner", sys.executable, **args)
    return subprocess.run(cmd, capture_output=True, text=True, env=thread_env(1), timeout=120)


def one_line_error(proc) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_privacy_field(tmp_path, inputs):
    privacy = json.loads(inputs["privacy"].read_text())
    del privacy["sample_rate"]
    inputs["privacy"].write_text(json.dumps(privacy))
    line = one_line_error(run_runner(tmp_path, inputs))
    assert "privacy.json: missing sample_rate" in line


def test_privacy_for_another_split(tmp_path, inputs):
    privacy = json.loads(inputs["privacy"].read_text())
    privacy["n_train"] = 1000
    inputs["privacy"].write_text(json.dumps(privacy))
    line = one_line_error(run_runner(tmp_path, inputs))
    assert "n_train=1000" in line and "64 training examples" in line


def test_unknown_training_key(tmp_path, inputs):
    line = one_line_error(run_runner(tmp_path, inputs, training={"lrr": 0.1}))
    assert "training.lrr: unknown key" in line


def test_bad_model_groups(tmp_path, inputs):
    line = one_line_error(run_runner(tmp_path, inputs, model={"width": 4, "groups": 3}))
    assert "groups=3" in line


def test_unknown_backend(tmp_path, inputs):
    line = one_line_error(run_runner(tmp_path, inputs, backend="nosuch"))
    assert "unknown backend 'nosuch'" in line


def test_missing_images(tmp_path, inputs):
    (inputs["data_dir"] / "images.npy").unlink()
    line = one_line_error(run_runner(tmp_path, inputs))
    assert "images.npy: not found" in line


def test_split_with_foreign_class(tmp_path, inputs):
    with np.load(inputs["split"]) as z:
        split = dict(z)
    split["classes"] = split["classes"][:-1]  # train now holds a class outside `classes`
    np.savez(inputs["split"], **split)
    line = one_line_error(run_runner(tmp_path, inputs))
    assert "train holds examples of classes not in 'classes'" in line


def test_load_data_maps_dataset_labels_to_positions_in_classes(inputs):
    data = loop.load_data(inputs["data_dir"], inputs["split"])
    ds_labels = np.load(inputs["data_dir"] / "labels.npy")
    assert data.split_name == "tiny"
    assert data.num_classes == 4 and data.image_size == 8
    for part in (data.train, data.holdout, data.test):
        np.testing.assert_array_equal(data.classes[data.labels[part]], ds_labels[part])
    assert (data.labels == -1).sum() == 8  # the unselected class
    assert isinstance(data.images, np.memmap)


def test_epsilon_after_reads_list_or_dict():
    p = {"private": True, "eps_by_epoch": [0.5, 0.9, 1.2]}
    assert [loop.epsilon_after(p, e) for e in range(5)] == [0.0, 0.5, 0.9, 1.2, 1.2]
    assert loop.epsilon_after({"private": True, "eps_by_epoch": {"2": 0.7}}, 2) == 0.7
    assert loop.epsilon_after({"private": False}, 3) is None
    assert loop.epsilon_after({"private": True}, 3) is None


def test_steps_per_epoch_from_file_or_rate():
    assert loop.steps_per_epoch({"sample_rate": 0.01, "steps_per_epoch": 7}) == 7
    assert loop.steps_per_epoch({"sample_rate": 0.01}) == 100


def test_cross_entropy_and_accuracy():
    logits = np.array([[2.0, 0.0], [0.0, 1000.0], [1.0, 1.0]])
    y = np.array([0, 1, 1])
    expected = np.mean([np.log1p(np.exp(-2.0)), 0.0, np.log(2.0)])
    assert loop.cross_entropy(logits, y) == pytest.approx(expected)
    assert loop.accuracy(logits, y) == pytest.approx(2 / 3)  # argmax ties go to the first
    assert math.isnan(loop.cross_entropy(logits[:0], y[:0]))


def test_outputs_are_atomic_and_round_trip(tmp_path, umask022):
    rows = [{"epoch": 1, "step": 4, "lr": 0.1, "train_loss": 1 / 3, "test_loss": math.nan}]
    outputs.write_history(tmp_path / "h.csv", rows)
    back = outputs.read_history(tmp_path / "h.csv")
    assert back[0]["train_loss"] == 1 / 3 and back[0]["test_loss"] is None
    assert back[0]["epoch"] == 1 and back[0]["epsilon"] is None
    atomic.write_json(tmp_path / "m.json", {"a": math.inf, "b": np.float32(0.5)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "b": 0.5}
    atomic.write_npz(tmp_path / "w.npz", {"x": np.arange(3)})
    with np.load(tmp_path / "w.npz") as z:
        np.testing.assert_array_equal(z["x"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.csv", "m.json", "w.npz"]  # no tmp
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o644}  # as open() gives


def test_backend_outside_its_venv(tmp_path, inputs):
    # The base env has no torch: the runner says which interpreter to use instead.
    require(importlib.util.find_spec("torch") is None, "torch is importable in the base env")
    line = one_line_error(run_runner(tmp_path, inputs))
    assert "backend 'reference' cannot be imported here" in line and "venv" in line


def test_eps_so_far_is_the_epsilon_after_the_steps_taken():
    # 3 epochs of 9 steps; inside the first, values at 1, 2, 4, 8 steps (calibrate writes them).
    p = {
        "private": True,
        "eps_by_epoch": [0.5, 0.9, 1.2],
        "eps_first_epoch_steps": {"1": 0.1, "2": 0.15, "4": 0.25, "8": 0.45},
    }
    lengths = [9, 9, 9]
    got = [loop.epsilon_so_far(p, lengths, s) for s in (0, 1, 3, 8, 9, 17, 18, 27)]
    assert got == [
        (0, 0.0),
        (1, 0.1),
        (2, 0.15),
        (8, 0.45),
        (9, 0.5),
        (9, 0.5),
        (18, 0.9),
        (27, 1.2),
    ]
    assert loop.epsilon_so_far({"private": False}, lengths, 5) == (5, None)
