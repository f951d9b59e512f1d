"""The SLURM profile: every registered backend's training rule gets a GPU, with no list to edit,
and the account, partitions and GPU model all come from the site block at its top."""

from __future__ import annotations

import types

import yaml
import yte

from dpscale import backends, envs, workflow

PROFILE = envs.PROJECT / "profiles/slurm/config.yaml"


def site_settings(profile=PROFILE) -> dict:
    """The profile's site block (`__variables__`): account, CPU and GPU partitions, GPU model."""
    return yaml.safe_load(profile.read_text())["__variables__"]


def rendered(site: dict | None = None) -> dict:
    """The profile as snakemake reads it (yte), optionally with another site block."""
    text = PROFILE.read_text()
    if site is not None:
        raw = yaml.safe_load(text)
        raw["__variables__"] = site
        text = yaml.safe_dump(raw, sort_keys=False)
    return yte.process_yaml(text, require_use_yte=True)


def train_rules() -> list[str]:
    return [f"train_{name}" for name in backends.available()] + ["pretrain"]


def check_site(profile: dict, site: dict) -> None:
    """Every job is charged to the site account; training on the GPU partition (and model),
    everything else on the CPU partition."""
    assert profile["default-resources"]["slurm_account"] == site["account"]
    assert profile["default-resources"]["slurm_partition"] == site["cpu_partition"]
    resources = profile["set-resources"]
    for rule in train_rules():
        assert resources[rule]["slurm_partition"] == site["gpu_partition"], rule
        assert resources[rule].get("gpu_model") == site["gpu_model"], rule
    # No rule overrides the account; only training rules leave the CPU partition.
    assert all("slurm_account" not in r for r in resources.values())
    assert {rule for rule, r in resources.items() if "slurm_partition" in r} == set(train_rules())


def job_amount(expression: str, backend: str, devices: int) -> int:
    """A profile resource expression evaluated as Snakemake does, for a job of `backend` whose
    training.devices is `devices` (as workflow/rules/common.smk records it)."""
    wildcards = types.SimpleNamespace(backend=backend, variant="default")
    workflow.RUN_DEVICES[(backend, "default")] = devices
    try:
        return eval(expression, {"wildcards": wildcards})
    finally:
        del workflow.RUN_DEVICES[(backend, "default")]


def test_every_backend_trains_on_a_gpu_node_with_its_devices():
    profile = rendered()
    resources = profile["set-resources"]
    for rule in train_rules():
        assert resources[rule]["nodes"] == 1, rule  # a data-parallel run's GPUs on one node
        for devices in (1, 4):
            assert job_amount(resources[rule]["gpu"], "jax", devices) == devices, rule
            # data loading and host-side work beside each GPU
            assert job_amount(profile["set-threads"][rule], "jax", devices) == 8 * devices
    assert profile["set-threads"]["prepare"] > 1 and "gpu" not in resources["prepare"]


def test_the_shipped_profile_uses_its_own_site_block():
    check_site(rendered(), site_settings())


def test_edited_site_settings_reach_every_rule():
    # Values no rule could contain by accident: a hard-coded account or partition would show.
    site = {
        "account": "acct-under-test",
        "cpu_partition": "cpu-under-test",
        "gpu_partition": "gpu-under-test",
        "gpu_model": "h100",
    }
    check_site(rendered(site), site)


def test_gpu_model_null_asks_for_any_gpu_type():
    site = {**site_settings(), "gpu_model": None}
    profile = rendered(site)
    check_site(profile, site)
    for rule in train_rules():
        assert "gpu_model" not in profile["set-resources"][rule]
        assert job_amount(profile["set-resources"][rule]["gpu"], "jax", 1) == 1
