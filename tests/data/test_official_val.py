"""The official ILSVRC2012 validation set as the test set (issue 17, item 1): generated train and
val tars, labels in both layouts (devkit ground truth + meta.mat, LOC_val_solution.csv)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import yaml

from dpscale import config as dp_config
from dpscale.data import DataError, images
from dpscale.data import prepare as prep
from dpscale.data import split as dp_split
from dpscale.data.rules import prepare_inputs, split_args
from tests import datagen
from tests.conftest import PROJECT

SCHEMA = PROJECT / "workflow/schemas/config.schema.yaml"
TRAIN = {"n01": 6, "n02": 5, "n03": 6}
VAL = ["n02", "n01", "n03", "n01", "n02", "n03", "n01", "n02"]  # image n has class VAL[n-1]


@pytest.fixture(params=["devkit", "csv"])
def ilsvrc(request, tmp_path):
    folder = tmp_path / "ilsvrc"
    datagen.make_ilsvrc_train_tar(folder, TRAIN)
    datagen.make_ilsvrc_val(folder, VAL, layout=request.param)
    return folder


def _prepare(folder, out, *extra):
    prep.main(["--source", "ilsvrc2012", "--path", str(folder), "--resolution", "16",
               "--out-dir", str(out), *extra])  # fmt: skip
    return json.loads((out / "manifest.json").read_text()), np.load(out / "labels.npy")


def test_val_rows_follow_the_train_rows_with_the_right_labels(ilsvrc, tmp_path):
    manifest, labels = _prepare(ilsvrc, tmp_path / "out", "--classes", '["n01", "n02"]', "--val")
    assert manifest["classes"] == ["n01", "n02"] and manifest["counts"] == [6, 5]
    assert manifest["val_counts"] == [3, 3] and manifest["parts"] == {
        "train": [0, 11],
        "val": [11, 17],
    }
    assert manifest["settings"]["val"] is True and manifest["index"]["val_members"] == len(VAL)
    assert labels[11:].tolist() == [0, 0, 0, 1, 1, 1]
    # Row 11 is the first n01 validation image by name: ILSVRC2012_val_00000002.
    pixels = np.load(tmp_path / "out" / "images.npy", mmap_mode="r")
    want = images.square(images.open_bytes(datagen.jpeg_bytes(50_002, (40, 30), 0)), 16)
    assert np.array_equal(pixels[11], want)


def test_official_test_split_uses_the_val_rows_and_train_only_for_train(ilsvrc, tmp_path):
    manifest, labels = _prepare(ilsvrc, tmp_path / "out", "--val")
    start, end = manifest["parts"]["val"]
    official = dp_split.build(labels, manifest, "b", "balanced", 1, 0, ["n01", "n03"], 3, 2, 2,
                              test="official")  # fmt: skip
    assert official["test"].tolist() == [i for i in range(start, end) if labels[i] in (0, 2)]
    assert official["test_counts"].tolist() == [3, 2]
    assert max(official["train"].max(), official["holdout"].max()) < start
    assert json.loads(str(official["meta"]))["test"] == "official"
    cut = dp_split.build(labels, manifest, "b", "balanced", 1, 0, ["n01", "n03"], 3, 1, 2)
    assert cut["test"].max() < start and cut["test_counts"].tolist() == [2, 2]  # no val rows


def test_official_test_needs_val_rows(tmp_path):
    folder = tmp_path / "il"
    datagen.make_ilsvrc_train_tar(folder, TRAIN)
    manifest, labels = _prepare(folder, tmp_path / "out")
    assert manifest["parts"] == {"train": [0, 17]} and "val_counts" not in manifest
    with pytest.raises(DataError, match="splits.test: official, but the prepared data has no"):
        dp_split.build(labels, manifest, "b", "balanced", 1, 0, 2, 2, 1, 1, test="official")
    with pytest.raises(SystemExit, match="no ILSVRC2012_img_val.tar in"):
        _prepare(folder, tmp_path / "again", "--val")


def test_val_label_errors_name_the_file(tmp_path):
    folder = tmp_path / "il"
    datagen.make_ilsvrc_train_tar(folder, TRAIN)
    datagen.make_ilsvrc_val(folder, ["n01", "n02"], layout="csv")
    (folder / "LOC_val_solution.csv").write_text("id,label\n")
    with pytest.raises(SystemExit, match=r"LOC_val_solution.csv: header \['id', 'label'\]"):
        _prepare(folder, tmp_path / "out", "--val")
    datagen.make_ilsvrc_val(folder, ["n01", "n01"], layout="csv")  # no n02 in val
    with pytest.raises(SystemExit, match="no validation image of class 'n02'"):
        _prepare(folder, tmp_path / "out", "--val", "--classes", '["n01", "n02"]')


def test_config_and_rule_arguments(ilsvrc):
    cfg = yaml.safe_load((PROJECT / "config/config.yaml").read_text())
    cfg["dataset"].update(source="ilsvrc2012", path=str(ilsvrc), val=True, classes=3)
    cfg["splits"].update(classes=2, test="official", train_per_class=3, holdout_per_class=1)
    valid = dp_config.validate(copy.deepcopy(cfg), SCHEMA)
    inputs = prepare_inputs(valid["dataset"], "raw")
    assert inputs["val"] == str(ilsvrc / "ILSVRC2012_img_val.tar")
    assert inputs["val_labels"].endswith(("ILSVRC2012_devkit_t12.tar.gz", "LOC_val_solution.csv"))
    assert split_args(valid["splits"], "balanced", "l", "m", "o")["test"] == "official"
    bad = copy.deepcopy(cfg)
    bad["dataset"]["val"] = False
    with pytest.raises(dp_config.ConfigError, match="splits.test: official needs"):
        dp_config.validate(bad, SCHEMA)
    digits = yaml.safe_load((PROJECT / "config/config.yaml").read_text())
    digits["dataset"]["val"] = True
    with pytest.raises(dp_config.ConfigError, match="dataset.val: true for source 'digits'"):
        dp_config.validate(digits, SCHEMA)
    for name in ("ILSVRC2012_devkit_t12.tar.gz", "LOC_val_solution.csv"):
        (ilsvrc / name).unlink(missing_ok=True)
    with pytest.raises(dp_config.ConfigError, match="dataset.val: no ILSVRC2012_devkit_t12"):
        dp_config.validate(copy.deepcopy(cfg), SCHEMA)
