"""prepare end to end on generated data: arrays, manifest, skipped images, threads, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dpscale.data import prepare as prep
from dpscale.data.images import load
from dpscale.data.rules import prepare_args, prepare_inputs
from tests import datagen

COUNTS = {"cat": 5, "ant": 4, "bee": 3}


def _run(tmp_path, *args, out="out"):
    prep.main([*map(str, args), "--out-dir", str(tmp_path / out)])
    out_dir = tmp_path / out
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return np.load(out_dir / "images.npy"), np.load(out_dir / "labels.npy"), manifest, out_dir


@pytest.fixture
def folder(tmp_path):
    """A class-per-folder tree with JPEGs and PNGs of different sizes, one garbage, one cut."""
    root = datagen.make_imagefolder(tmp_path / "imgs", COUNTS, size=(60, 45))
    datagen.write_image(root / "ant" / "portrait.png", seed=7, size=(30, 50))
    datagen.garbage(root / "bee" / "junk.jpg")
    datagen.truncate(datagen.write_image(root / "cat" / "cut.jpg", seed=9, size=(300, 200)))
    return root


def test_imagefolder_arrays_manifest_and_skips(tmp_path, folder, umask022):
    imgs, labels, manifest, out_dir = _run(
        tmp_path, "--source", "imagefolder", "--path", folder, "--resolution", 16
    )
    assert imgs.dtype == np.uint8 and imgs.shape == (13, 16, 16, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [0] * 5 + [1] * 3 + [2] * 5
    assert manifest["classes"] == ["ant", "bee", "cat"] and manifest["counts"] == [5, 3, 5]
    assert manifest["resolution"] == 16 and manifest["source"] == "imagefolder"
    assert manifest["n_skipped"] == 2
    skipped = {s["item"]: s for s in manifest["skipped"]}
    assert set(skipped) == {"bee/junk.jpg", "cat/cut.jpg"}
    assert skipped["bee/junk.jpg"]["class"] == "bee" and "UnidentifiedImageError" in str(skipped)
    assert "truncated" in skipped["cat/cut.jpg"]["reason"]
    for name in ("images.npy", "labels.npy"):
        assert manifest["sha256"][name] == datagen.sha256_file(out_dir / name)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "images.npy",
        "labels.npy",
        "manifest.json",
    ]
    assert {p.stat().st_mode & 0o777 for p in out_dir.iterdir()} == {0o644}  # as open() gives
    # Row order = class, then file name: ant_0.JPEG is the first image.
    assert (imgs[0] == load(str(folder / "ant" / "ant_0.JPEG"), 16)).all()


def test_worker_processes_give_identical_arrays(tmp_path, folder):
    one = _run(tmp_path, "--source", "imagefolder", "--path", folder, "--resolution", 8, out="a")
    two = _run(
        tmp_path,
        *("--source", "imagefolder", "--path", folder, "--resolution", 8, "--threads", 2),
        out="b",
    )
    assert one[2]["sha256"] == two[2]["sha256"] and two[2]["threads"] == 2
    assert [s["item"] for s in one[2]["skipped"]] == [s["item"] for s in two[2]["skipped"]]


def test_digits_default_source(tmp_path):
    imgs, labels, manifest, _ = _run(
        tmp_path, "--source", "digits", "--resolution", 16, "--classes", "3"
    )
    assert manifest["classes"] == ["0", "1", "2"] and manifest["counts"] == [178, 182, 177]
    assert imgs.shape == (537, 16, 16, 3) and np.bincount(labels).tolist() == [178, 182, 177]
    assert (imgs[..., 0] == imgs[..., 2]).all()  # grey -> three equal channels


def test_ilsvrc_tar_prepares_the_same_images_as_the_folder(tmp_path):
    counts = {"n003": 3, "n001": 4, "n002": 2}
    folder = datagen.make_imagefolder(tmp_path / "folder", counts, size=(60, 45))
    datagen.make_ilsvrc_train_tar(tmp_path / "ilsvrc", counts, size=(60, 45))
    common = ("--resolution", 16, "--classes", '["n001", "n003"]', "--max-per-class", 3)
    a = _run(tmp_path, "--source", "imagefolder", "--path", folder, *common, out="a")
    b = _run(tmp_path, "--source", "ilsvrc2012", "--path", tmp_path / "ilsvrc", *common, out="b")
    assert b[2]["classes"] == ["n001", "n003"] and b[2]["counts"] == [3, 3]
    assert b[2]["sha256"] == a[2]["sha256"]  # same picks, same pixels
    assert sorted(p.name for p in (tmp_path / "ilsvrc").iterdir()) == ["ILSVRC2012_img_train.tar"]


def test_medmnist_part(tmp_path):
    path = datagen.make_medmnist_npz(tmp_path / "p.npz", n=(10, 4, 6), classes=2, rgb=True)
    imgs, labels, manifest, _ = _run(
        tmp_path, "--source", "medmnist", "--path", path, "--resolution", 28,
        "--medmnist-split", "train",
    )  # fmt: skip
    with np.load(path) as z:
        want = z["train_images"][np.argsort(z["train_labels"][:, 0], kind="stable")]
    assert manifest["counts"] == [5, 5] and (imgs == want).all()  # 28 -> 28 is lossless


def test_class_with_no_readable_image_is_an_error(tmp_path):
    root = datagen.make_imagefolder(tmp_path / "imgs", {"a": 2, "b": 1})
    datagen.garbage(root / "b" / "b_0.JPEG")
    with pytest.raises(SystemExit, match=r"class 'b': none of its 1 images could be read"):
        _run(tmp_path, "--source", "imagefolder", "--path", root, "--resolution", 8)
    assert not list((tmp_path / "out").iterdir())  # no partial output, no temp files


def test_cli_error_is_one_line_with_nonzero_exit(tmp_path):
    cmd = [sys.executable, "-m", "dpscale.data.prepare", "--source", "imagefolder"]
    cmd += ["--path", str(tmp_path / "missing"), "--resolution", "8", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"prepare: error: dataset.path: '{tmp_path / 'missing'}' does not exist; "
        "expected imagefolder data"
    ]


def test_rule_arguments_follow_the_source(tmp_path):
    tar = datagen.make_ilsvrc_train_tar(tmp_path / "il", {"n1": 1})
    ds = {"source": "ilsvrc2012", "path": str(tar.parent), "resolution": 32}
    assert prepare_inputs(ds, "raw") == {"raw": str(tar)}
    url = {"source": "url", "path": None, "resolution": 32, "url": "http://x/y.tgz"}
    assert prepare_inputs(url, "resources/datasets/x/raw") == {"raw": "resources/datasets/x/raw"}

    class Input:
        raw = "resources/datasets/x/raw"

    args = prepare_args(url, Input, "out")
    assert args["path"] == "resources/datasets/x/raw/extracted" and args["source"] == "url"
    assert prepare_inputs({"source": "digits", "path": None}, "raw") == {}
