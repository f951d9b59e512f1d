"""Data settings the config alone can judge stop before any job, with one line (issue 17, 5)."""

from __future__ import annotations

import copy

import pytest
import yaml

from dpscale import config as dp_config
from tests import datagen
from tests.conftest import PROJECT

SCHEMA = PROJECT / "workflow/schemas/config.schema.yaml"


@pytest.fixture
def default_config():
    return yaml.safe_load((PROJECT / "config/config.yaml").read_text())


def _error(cfg) -> str:
    with pytest.raises(dp_config.ConfigError) as err:
        dp_config.validate(cfg, SCHEMA)
    message = str(err.value)
    assert "\n" not in message and message.startswith("config error: ")
    return message


def test_a_decimal_resolution_is_refused(default_config):
    cfg = copy.deepcopy(default_config)
    cfg["dataset"]["resolution"] = 32.0
    assert _error(cfg) == (
        "config error: dataset.resolution: 32.0 is a decimal number; expected a whole number (32)"
    )
    cfg["dataset"]["resolution"] = 32
    assert dp_config.validate(cfg, SCHEMA)["dataset"]["resolution"] == 32


def test_more_split_classes_than_decoded_is_refused(default_config):
    cfg = copy.deepcopy(default_config)
    cfg["dataset"]["classes"] = 4
    cfg["splits"]["classes"] = 5
    assert "splits.classes: 5 classes; expected at most the 4 that dataset.classes gives" in (
        _error(cfg)
    )
    cfg["dataset"]["classes"] = ["1", "2", "3"]
    cfg["splits"]["classes"] = ["1", "4"]
    assert "splits.classes: '4' is not in dataset.classes" in _error(cfg)
    cfg["dataset"]["classes"] = None
    cfg["splits"]["classes"] = 11  # digits has 10 classes
    assert "expected at most the 10 that source 'digits' gives" in _error(cfg)
    cfg["splits"]["classes"] = 6
    cfg["transfer"] = {"public_classes": 5}
    assert "splits.classes: 6 + transfer.public_classes 5 classes; expected at most" in (
        _error(cfg)
    )


def test_max_per_class_below_what_the_split_needs_is_refused(default_config):
    cfg = copy.deepcopy(default_config)
    s = cfg["splits"]
    need = s["train_per_class"] + s["holdout_per_class"] + s["test_per_class"]
    cfg["dataset"]["max_per_class"] = need - 1
    assert f"dataset.max_per_class: {need - 1} images per class; the split needs {need}" in (
        _error(cfg)
    )
    cfg["dataset"]["max_per_class"] = need
    assert dp_config.validate(cfg, SCHEMA)["dataset"]["max_per_class"] == need


def test_rho_for_a_balanced_profile_is_refused(default_config):
    cfg = copy.deepcopy(default_config)
    cfg["splits"]["profiles"]["balanced"]["rho"] = 10
    assert "splits.profiles.balanced.rho: given for a balanced profile" in _error(cfg)
    # Without rho it validates, and gets rho 1 filled in.
    del cfg["splits"]["profiles"]["balanced"]["rho"]
    assert dp_config.validate(cfg, SCHEMA)["splits"]["profiles"]["balanced"]["rho"] == 1


def test_an_ilsvrc_folder_without_the_train_tar_is_refused(tmp_path, default_config):
    cfg = copy.deepcopy(default_config)
    cfg["dataset"].update(source="ilsvrc2012", path=str(tmp_path))
    assert _error(cfg) == (
        f"config error: dataset.path: no ILSVRC2012_img_train.tar in '{tmp_path}'; expected the "
        "folder holding the official ILSVRC2012 training tar"
    )
    datagen.make_ilsvrc_train_tar(tmp_path, {"n01": 1, "n02": 1})
    assert dp_config.validate(cfg, SCHEMA)["dataset"]["path"] == str(tmp_path)


def test_an_image_folder_listing_changes_with_any_file_under_it(tmp_path):
    from dpscale.data.rules import listing_fingerprint

    root = datagen.make_imagefolder(tmp_path / "imgs", {"a": 2, "b": 2}, subdir="deep")
    ds = {"source": "imagefolder", "path": str(root)}
    first = listing_fingerprint(ds)
    assert first == listing_fingerprint(ds) and len(first) == 64
    top_mtime = root.stat().st_mtime_ns
    datagen.write_image(root / "a" / "deep" / "a_0.JPEG", seed=99, size=(41, 30))  # rewritten
    assert root.stat().st_mtime_ns == top_mtime  # the top folder did not change ...
    second = listing_fingerprint(ds)
    assert second != first  # ... the listing did
    (root / "b" / "deep" / "new.png").write_bytes(b"")
    assert listing_fingerprint(ds) not in (first, second)
    assert listing_fingerprint({"source": "digits", "path": None}) is None
