"""Through Snakemake: an image folder re-prepares when a file deep inside it changes (issue 17,
item 4), and the official validation set becomes the test split (item 1)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests import datagen
from tests.conftest import PROJECT, SNAKEFILE

pytestmark = pytest.mark.slow


def _snakemake(workdir, *args):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _config(work, dataset, **splits):
    cfg = yaml.safe_load((PROJECT / "config/config.yaml").read_text())
    cfg["backends"] = ["reference"]
    cfg["dataset"] = {"name": "mini", "resolution": 8, **dataset}
    profiles = {"flat": {"kind": "balanced"}}
    cfg["splits"] = {"classes": 2, "train_per_class": 3, "holdout_per_class": 1,
                     "test_per_class": 1, "profiles": profiles, **splits}  # fmt: skip
    path = work / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_a_deep_file_change_re_prepares_an_image_folder(tmp_path):
    root = datagen.make_imagefolder(tmp_path / "imgs", {"a": 5, "b": 5}, subdir="deep/er")
    work = tmp_path / "work"
    work.mkdir()
    cfg = _config(work, {"source": "imagefolder", "path": str(root)})
    assert _snakemake(work, "splits", "-c1", "--configfile", cfg).returncode == 0
    again = _snakemake(work, "splits", "-n", "-c1", "--configfile", cfg)
    assert "Nothing to be done" in again.stdout + again.stderr
    datagen.write_image(root / "b" / "deep" / "er" / "b_9.JPEG", seed=5)  # a new image, deep
    changed = _snakemake(work, "splits", "-n", "-c1", "--configfile", cfg)
    assert changed.returncode == 0 and "rule prepare:" in changed.stdout + changed.stderr
    assert _snakemake(work, "splits", "-c1", "--configfile", cfg).returncode == 0
    manifest = json.loads((work / "resources/datasets/mini/8px/manifest.json").read_text())
    assert manifest["counts"] == [5, 6]


def test_the_official_validation_set_is_the_test_split(tmp_path):
    folder = tmp_path / "ilsvrc"
    datagen.make_ilsvrc_train_tar(folder, {"n01": 5, "n02": 5, "n03": 5})
    datagen.make_ilsvrc_val(folder, ["n02", "n01", "n03", "n01", "n02", "n02"])
    work = tmp_path / "work"
    work.mkdir()
    dataset = {"source": "ilsvrc2012", "path": str(folder), "val": True}
    cfg = _config(work, dataset, test="official")
    proc = _snakemake(work, "splits", "-c1", "--configfile", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((work / "resources/datasets/mini/8px/manifest.json").read_text())
    assert manifest["parts"] == {"train": [0, 15], "val": [15, 21]}
    with np.load(work / "results/demo/splits/flat.npz") as split:
        assert split["test"].tolist() == [15, 16, 17, 18, 19]  # n01's 2 and n02's 3 val rows
        assert split["train"].max() < 15 and split["test_counts"].tolist() == [2, 3]
