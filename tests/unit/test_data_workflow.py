"""The data rules through Snakemake: fetch (local HTTP) -> prepare -> split, and a clean rerun."""

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


def test_url_source_end_to_end(tmp_path):
    tree = tmp_path / "src" / "mini"
    datagen.make_imagefolder(tree / "train", {"b": 8, "a": 10, "c": 9}, size=(48, 36))
    datagen.make_imagefolder(tree / "val", {"a": 1, "b": 1, "c": 1})
    datagen.garbage(tree / "train" / "b" / "broken.jpg")
    www = tmp_path / "www"
    www.mkdir()
    archive = datagen.make_archive(tree, www / "mini.tgz")
    cfg = yaml.safe_load((PROJECT / "config/config.yaml").read_text())
    cfg["backends"] = ["reference"]
    cfg["dataset"] = {"name": "mini", "source": "url", "sha256": datagen.sha256_file(archive)}
    cfg["dataset"]["resolution"] = 8
    profiles = {"flat": {"kind": "balanced"}, "lt": {"kind": "step", "rho": 4}}
    cfg["splits"] = {
        "seed": 0, "classes": ["c", "a"], "train_per_class": 4, "holdout_per_class": 2,
        "test_per_class": 2, "profiles": profiles,
    }  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    with datagen.http_server(www) as base:
        cfg["dataset"]["url"] = f"{base}/{archive.name}"
        (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        proc = _snakemake(work, "splits", "-c2", "--configfile", str(work / "cfg.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    data = work / "resources/datasets/mini/8px"
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["classes"] == ["a", "b", "c"] and manifest["counts"] == [10, 8, 9]
    assert manifest["n_skipped"] == 1 and manifest["root"].endswith("mini/train")
    assert np.load(data / "images.npy").shape == (27, 8, 8, 3)
    assert "images/s" in (work / "resources/datasets/mini/logs/prepare_8px.log").read_text()
    with (
        np.load(work / "results/demo/splits/lt.npz") as lt,
        np.load(work / "results/demo/splits/flat.npz") as flat,
    ):
        assert lt["classes"].tolist() == [2, 0] and lt["train_counts"].tolist() == [4, 1]
        assert np.array_equal(lt["test"], flat["test"])

    # Nothing is redone, even with the server gone.
    again = _snakemake(work, "splits", "-n", "-c2", "--configfile", str(work / "cfg.yaml"))
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
