"""Bad configs stop before any job, with one line naming the key and what was expected."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from dpscale import config as dp_config
from tests.conftest import PROJECT, SNAKEFILE

SCHEMA = PROJECT / "workflow/schemas/config.schema.yaml"


@pytest.fixture
def default_config():
    return yaml.safe_load((PROJECT / "config/config.yaml").read_text())


def test_embedded_default_is_valid_and_gets_defaults(default_config):
    cfg = dp_config.validate(default_config, SCHEMA)
    assert cfg["training"]["schedule"] == "cosine"  # filled from the schema
    assert cfg["splits"]["profiles"]["balanced"]["rho"] == 1  # default inside a free-form map
    assert cfg["privacy"]["accountant"] == "rdp"
    assert default_config.get("backend_options") is None  # the input is not mutated


def _set(path, value):
    def mutate(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        if value is KeyError:
            node.pop(last)
        else:
            node[last] = value

    return mutate


BAD = {
    "unknown top-level key": (_set("colour", "red"), "colour: unknown key"),
    "unknown nested key": (_set("training.batchsize", 3), "training.batchsize: unknown key"),
    "wrong type": (_set("splits.train_per_class", "many"), "splits.train_per_class:"),
    "rho below 1": (_set("splits.profiles.longtail.rho", 0.5), "splits.profiles.longtail.rho:"),
    "long tail without rho": (
        _set("splits.profiles.tail", {"kind": "step"}),
        "splits.profiles.tail.rho: profile kind 'step' needs rho > 1",
    ),
    "missing dataset path": (_set("dataset.source", "imagefolder"), "dataset.path: missing"),
    "dataset path absent": (
        lambda c: c["dataset"].update(source="medmnist", path="/no/such/file.npz"),
        "dataset.path: '/no/such/file.npz' does not exist",
    ),
    "url without sha256": (
        lambda c: c["dataset"].update(source="url", url="https://example.org/a.tar"),
        "dataset.sha256: missing",
    ),
    "unknown source": (_set("dataset.source", "cifar"), "dataset.source: 'cifar' is not allowed"),
    "unknown backend": (_set("backends", ["pytorch"]), "backends.0: unknown backend 'pytorch'"),
    "bad privacy level": (_set("privacy.levels", ["eps"]), "privacy.levels.0: 'eps' is not a"),
    "delta out of range": (_set("privacy.delta", 1.5), "privacy.delta:"),
    "groups do not divide width": (_set("model.groups", 5), "model.groups: 5 groups do not"),
    "non-positive lr": (_set("training.lr", 0), "training.lr:"),
    "missing dataset name": (_set("dataset.name", KeyError), "dataset.name: missing"),
    "classes of the wrong form": (_set("splits.classes", "ten"), "splits.classes: 'ten'"),
    "empty backends": (_set("backends", []), "backends:"),
    "devices in a one-device backend": (
        lambda c: c.update(training={"devices": 2}, backends=["jax", "objax", "tfprivacy"]),
        "training.devices: backend(s) objax, tfprivacy train on one device; expected devices 1 "
        "for them (a map such as {jax: 2} sets it per backend), or backends among jax, "
        "jaxprivacy, opacus, reference",
    ),
    "devices of an unknown backend": (
        _set("training.devices", {"torch": 2}),
        "training.devices.torch: unknown backend 'torch'",
    ),
    "devices zero": (_set("training.devices", 0), "training.devices: 0 has the wrong form"),
    "frozen groups without transfer": (
        _set("training.frozen_groups", 3),
        "training.frozen_groups: 3 without a transfer block",
    ),
    "frozen groups in a backend that cannot freeze": (
        lambda c: c.update(
            transfer={"public_classes": 2}, training={"frozen_groups": 3}, backends=["jax"]
        ),
        "training.frozen_groups: backend(s) jax cannot freeze block groups; expected backends "
        "among opacus, reference",
    ),
    "a variant freezes in a backend that cannot": (
        lambda c: c.update(
            transfer={"public_classes": 2},
            backends=["opacus", "objax"],
            variants={"f4": {"training": {"frozen_groups": 4}}},
        ),
        "variants.f4.training.frozen_groups: backend(s) objax cannot freeze",
    ),
    "too many frozen groups": (_set("training.frozen_groups", 5), "training.frozen_groups:"),
    "transfer's pre-training checked as training": (
        _set("transfer", {"public_classes": 2, "training": {"lr": -1}}),
        "transfer.training.lr:",
    ),
    "public split name taken": (
        lambda c: (
            c.update(transfer={"public_classes": 2})
            or c["splits"]["profiles"].update(public={"kind": "balanced"})
        ),
        "splits.profiles.public: the name is taken",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_one_line_naming_the_key(default_config, case):
    mutate, expected = BAD[case]
    cfg = copy.deepcopy(default_config)
    mutate(cfg)
    with pytest.raises(dp_config.ConfigError) as err:
        dp_config.validate(cfg, SCHEMA)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("config error: ")
    assert expected in message


def test_snakemake_stops_before_any_job_with_the_message(tmp_path, default_config):
    default_config["splits"]["profiles"]["longtail"]["rho"] = 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(default_config))
    snakemake = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(tmp_path)]
    proc = subprocess.run(
        [*snakemake, "-n", "--configfile", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "config error: splits.profiles.longtail.rho: 0.5 is less than the minimum of 1" in (
        proc.stderr + proc.stdout
    )
    assert "Job stats" not in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def _with_scales(cfg):
    cfg = copy.deepcopy(cfg)
    cfg["scales"] = {"smoke": {"training": {"epochs": 1}, "privacy": {"levels": ["eps2"]}}}
    return cfg


def test_a_scale_deep_merges_its_overrides_before_validation(default_config):
    cfg = _with_scales(default_config)
    as_written = dp_config.validate(cfg, SCHEMA)
    assert as_written["training"]["epochs"] == default_config["training"]["epochs"]
    smoke = dp_config.validate({**cfg, "scale": "smoke"}, SCHEMA)
    assert smoke["training"]["epochs"] == 1 and smoke["privacy"]["levels"] == ["eps2"]
    # Only the overridden keys change: the rest of training is the file's.
    assert smoke["training"]["batch_size"] == default_config["training"]["batch_size"]


def test_an_unknown_scale_is_one_line_naming_the_known_ones(default_config):
    with pytest.raises(dp_config.ConfigError) as err:
        dp_config.validate({**_with_scales(default_config), "scale": "huge"}, SCHEMA)
    assert str(err.value) == (
        "config error: scale: 'huge' is not defined in scales; expected one of: smoke"
    )


def test_variants_resolve_over_the_config_and_are_checked_as_it(default_config):
    cfg = copy.deepcopy(default_config)
    cfg["variants"] = {
        "small": {},
        "big": {"training": {"batch_size": 512, "epochs": 24}, "model": {"width": 32}},
    }
    resolved = dp_config.variant_configs(dp_config.validate(cfg, SCHEMA))
    assert resolved["small"]["training"]["batch_size"] == default_config["training"]["batch_size"]
    assert resolved["big"]["training"]["batch_size"] == 512
    assert resolved["big"]["training"]["lr"] == default_config["training"]["lr"]
    assert resolved["big"]["model"] == {**resolved["small"]["model"], "width": 32}

    cfg["variants"]["big"]["training"]["batch_size"] = 0
    with pytest.raises(dp_config.ConfigError, match=r"^config error: variants\.big\.training\."):
        dp_config.validate(cfg, SCHEMA)
    cfg["variants"]["big"] = {"model": {"groups": 7}}
    with pytest.raises(dp_config.ConfigError, match=r"^config error: variants\.big\.model\.groups"):
        dp_config.validate(cfg, SCHEMA)
    cfg["variants"]["big"] = {"simulate_batch_size": 8}
    with pytest.raises(
        dp_config.ConfigError, match=r"variants\.big\.simulate_batch_size: 8 is not"
    ):
        dp_config.validate(cfg, SCHEMA)


def test_a_job_given_a_gpu_must_use_it_unless_the_config_says_otherwise():
    # The slurm profile gives each training job a GPU: with training.device unset the run
    # requires it (a backend that sees none stops), never trains on the CPU unnoticed.
    base = {"epochs": 2, "device": None}
    assert dp_config.run_training(base, gpus=1) == {"epochs": 2, "device": "gpu"}
    assert dp_config.run_training(base, gpus=0)["device"] == "auto"
    for device in ("auto", "cpu", "gpu"):
        assert dp_config.run_training({**base, "device": device}, gpus=1)["device"] == device
    assert base["device"] is None  # the variant's own settings are not changed


def test_a_run_gets_its_backends_number_of_devices(default_config):
    # training.devices is a number for every backend or a map backend -> number (others 1);
    # the runner always gets a number.
    for devices, backend, expected in (
        (4, "jax", 4),
        ({"jax": 2}, "jax", 2),
        ({"jax": 2}, "opacus", 1),
    ):
        training = {"device": "gpu", "devices": devices}
        assert dp_config.run_training(training, 1, backend)["devices"] == expected
    assert dp_config.validate(default_config, SCHEMA)["training"]["devices"] == 1
    default_config["training"] = {**default_config.get("training", {}), "devices": {"opacus": 2}}
    assert dp_config.validate(default_config, SCHEMA)["training"]["devices"] == {"opacus": 2}
