"""GPU requests of a local run (dry runs of the embedded default: no training happens).

training.device gpu makes every training job ask for training.devices GPUs (1 by default);
`--resources gpu=N` declares the workstation's GPUs, of which each job then gets its own
(tests/unit/test_gpu_slots.py). The SLURM profile's requests are planned here too (a dry run
submits nothing) and checked on a real cluster in tests/slurm.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.conftest import PROJECT, snakemake_cmd

CONFIG = PROJECT / "config/config.yaml"


def planned_gpus(tmp_path, *args: str) -> dict[str, set[int]]:
    """rule -> the gpu amounts its planned jobs ask for."""
    proc = subprocess.run(
        snakemake_cmd(tmp_path, "-n", "--cores", "2", *args),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out: dict[str, set[int]] = {}
    for block in re.split(r"\n(?=rule \w+:)", proc.stdout):
        rule = re.match(r"rule (\w+):", block)
        gpu = re.search(r"resources: .*\bgpu=(\d+)", block)
        if rule and gpu:
            out.setdefault(rule.group(1), set()).add(int(gpu.group(1)))
    return out


@pytest.mark.parametrize(
    ("args", "train_gpus"),
    [
        ((), {0}),  # device auto: no GPU of its own
        (("--config", "training={device: gpu}", "--resources", "gpu=2"), {1}),
    ],
)
def test_training_jobs_ask_for_one_gpu_when_the_device_is_gpu(tmp_path, args, train_gpus):
    plan = planned_gpus(tmp_path, *args)
    # The equivalence check runs each backend's steps on the device its training uses.
    train = {r: g for r, g in plan.items() if r.startswith("train_") or r == "equivalence_backend"}
    assert len(train) == 6, plan  # the default's five backends, and their equivalence steps
    assert all(g == train_gpus for g in train.values()), train
    assert all(g == {0} for rule, g in plan.items() if rule not in train), plan


def devices_config(tmp_path, devices) -> str:
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump({"training": {"devices": devices}}))
    return str(path)


def test_a_multi_device_run_asks_for_its_devices_locally_and_on_slurm(tmp_path):
    extra = devices_config(tmp_path, {"reference": 2})
    local = planned_gpus(
        tmp_path,
        *("--configfile", str(CONFIG), extra, "--config", "training={device: gpu}"),
        *("--resources", "gpu=2"),
    )
    slurm = planned_gpus(
        tmp_path, "--profile", str(PROJECT / "profiles/slurm"), "--configfile", str(CONFIG), extra
    )
    for plan in (local, slurm):
        train = {rule: g for rule, g in plan.items() if rule.startswith("train_")}
        assert train.pop("train_reference") == {2}, plan
        assert all(g == {1} for g in train.values()), plan  # the map leaves them at 1


def test_a_site_interpreter_replaces_the_backend_venv_in_the_plan(tmp_path):
    python = "/opt/site/torch-2.13/bin/python"
    proc = subprocess.run(
        snakemake_cmd(
            tmp_path,
            "-n",
            "--cores",
            "2",
            "-p",
            "--config",
            f"envs={{reference: {{python: {python}}}}}",
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "rule check_site_env:" in proc.stdout  # checked once, before its training jobs
    jobs = re.split(r"\n(?=rule \w+:)", proc.stdout)
    train = [j for j in jobs if j.startswith("rule train_reference:")]
    others = [j for j in jobs if j.startswith("rule train_opacus:")]
    assert train and others
    assert all("/.venvs/site/reference-" in j and "/.venvs/reference-" not in j for j in train)
    assert all("/.venvs/opacus-" in j for j in others)  # the other backends keep their venvs
