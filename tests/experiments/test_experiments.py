"""The paper experiments (config/experiments/*.yaml): planned at both scales, run at smoke scale.

Each smoke run is real Snakemake with real backends on the bundled digits, once per module
(fixtures), and its outputs are checked for content. Paper scale is only planned (`-n`): the
ImageNet-sized data it needs is given here as a tiny generated image folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dpscale import backends
from tests import jobs
from tests.conftest import PROJECT, snakemake_cmd
from tests.datagen import make_ilsvrc_train_tar, make_ilsvrc_val, make_imagefolder

pytestmark = pytest.mark.slow

EXPERIMENTS = sorted((PROJECT / "config/experiments").glob("*.yaml"))


def config_of(name: str) -> Path:
    return PROJECT / f"config/experiments/{name}.yaml"


def snakemake(workdir: Path, *args: str, cores: int = 1, timeout: int = 1800):
    return jobs.run(snakemake_cmd(workdir, *args), threads=cores, timeout=timeout)


def data_overlay() -> Path:
    """A second config file pointing dataset.path at a tiny class-per-folder tree that also
    holds the ILSVRC2012 tars (train, val and its labels), for either source."""
    root = jobs.workdir("imagefolder")
    overlay = root / "data.yaml"
    if not overlay.exists():
        folder = make_imagefolder(root / "train", {"n01": 2, "n02": 2}, size=(10, 8))
        make_ilsvrc_train_tar(folder, {"n01": 2, "n02": 2}, size=(10, 8))
        make_ilsvrc_val(folder, ["n01", "n02"], layout="csv", size=(10, 8))
        jobs.write_once(
            overlay, lambda f: f.write(yaml.safe_dump({"dataset": {"path": str(folder)}}).encode())
        )
    return overlay


def plan_job(configfile: Path, scale: str) -> jobs.Job:
    """`snakemake -n` of an experiment at a scale (a dry run: one core, seconds)."""

    def run():
        files = [str(configfile)]
        if scale == "paper" and "path" in yaml.safe_load(configfile.read_text())["dataset"]:
            files.append(str(data_overlay()))
        workdir = jobs.workdir(f"plan-{configfile.stem}-{scale}")
        return snakemake(workdir, "-n", "--configfile", *files, "--config", f"scale={scale}")

    return jobs.Job(f"plan {configfile.stem} {scale}", run)


class Smoke:
    """One experiment run at smoke scale in its own working directory, on every core."""

    def __init__(self, name: str):
        self.name, self.workdir = name, jobs.workdir(f"smoke-{name}")
        self.results = self.workdir / "results" / name
        cores = jobs.pool().cores
        args = ("--configfile", str(config_of(name)), "--config", "scale=smoke")
        self.proc = snakemake(self.workdir, *args, "--cores", str(cores), cores=1)
        assert self.proc.returncode == 0, (self.proc.stdout + self.proc.stderr)[-4000:]
        self.summary = pd.read_csv(self.results / "summary.csv")

    def csv(self, name: str) -> pd.DataFrame:
        return pd.read_csv(self.results / name)


def smoke_job(name: str) -> jobs.Job:
    return jobs.Job(f"smoke {name}", lambda: Smoke(name), cores=None)


# fixture -> experiment
SMOKE_RUNS = {
    "virtual_batch": "kurakin-virtual-batch",
    "naive_eps": "kurakin-naive-eps",
    "frameworks": "frameworks-resnet18",
    "imbalance": "imbalance",
    "membership": "membership",
    "transfer": "kurakin-transfer",
}


@jobs.source
def _experiment_jobs(item):
    if item.module.__name__ != __name__:
        return
    params = getattr(item, "callspec", None)
    if params is not None and {"configfile", "scale"} <= set(params.params):
        yield plan_job(params.params["configfile"], params.params["scale"])
    for fixture, name in SMOKE_RUNS.items():
        if fixture in item.fixturenames:
            yield smoke_job(name)


@pytest.mark.parametrize("scale", ["paper", "smoke"])
@pytest.mark.parametrize("configfile", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_plans_its_jobs_at_both_scales(configfile, scale):
    proc = jobs.result(plan_job(configfile, scale))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train_" in proc.stdout
    if yaml.safe_load(configfile.read_text()).get("paper"):
        assert "paper_comparison" in proc.stdout


def test_paper_scale_without_the_data_path_names_the_key(tmp_path):
    proc = snakemake(tmp_path, "-n", "--configfile", str(config_of("kurakin-naive-eps")))
    assert proc.returncode != 0
    assert "config error: dataset.path: missing" in proc.stdout + proc.stderr


def test_an_unknown_scale_is_a_clear_error(tmp_path):
    args = ("-n", "--configfile", str(config_of("membership")), "--config", "scale=huge")
    proc = snakemake(tmp_path, *args)
    assert proc.returncode != 0
    assert "config error: scale: 'huge' is not defined in scales" in proc.stdout + proc.stderr


def smoke(name: str):
    @pytest.fixture(scope="module")
    def run() -> Smoke:
        return jobs.result(smoke_job(name))

    return run


for _fixture, _name in SMOKE_RUNS.items():
    globals()[_fixture] = smoke(_name)


def _paper_table_has_both_columns(run: Smoke) -> pd.DataFrame:
    table = run.csv("paper_comparison.csv")
    cfg = yaml.safe_load(config_of(run.name).read_text())
    assert len(table) == len(cfg["paper"])
    assert {"paper_value", "ours_value", "ours_runs", "scale"} <= set(table.columns)
    assert (table["scale"] == "smoke").all()
    assert list(table["paper_value"]) == [float(row["value"]) for row in cfg["paper"]]
    assert (table["ours_runs"] >= 1).all() and table["ours_value"].notna().all()
    return table


def test_virtual_batch_epsilon_falls_as_the_batch_grows(virtual_batch):
    s = virtual_batch.summary.set_index("variant")
    assert set(s.index) == {"k1", "k4", "k16", "k64"}
    order = ["k1", "k4", "k16", "k64"]
    assert list(s.loc[order, "batch_size"]) == [8, 32, 128, 512]
    # Same steps, same sigma / B: the bigger batch (more epochs) is the more private run.
    assert s.loc[order, "steps"].nunique() == 1
    sigma_over_b = s.loc[order, "noise_multiplier"] / s.loc[order, "batch_size"]
    assert sigma_over_b.to_numpy() == pytest.approx(sigma_over_b.iloc[0])
    eps = s.loc[order, "epsilon"].to_numpy()
    assert all(a > b for a, b in zip(eps, eps[1:], strict=False)), eps
    assert (s["accountant"] == "rdp").all() and (s["sampling"] == "poisson").all()


def test_simulated_runs_state_the_predicted_large_batch_epsilon(virtual_batch):
    s = virtual_batch.summary.set_index("variant")
    large_eps = s.loc["k64", "epsilon"]
    assert pd.isna(s.loc["k64", "simulated_epsilon"])
    for v in ("k1", "k4", "k16"):
        assert s.loc[v, "simulated_batch_size"] == 512
        assert s.loc[v, "simulated_epsilon"] == pytest.approx(large_eps)
        assert s.loc[v, "epsilon"] > large_eps  # its own guarantee, not the predicted one
    privacy = virtual_batch.results / "privacy/balanced/k1/eps8.json"
    assert "not private at simulated_epsilon" in json.loads(privacy.read_text())["epsilon_note"]
    check = virtual_batch.csv("simulation_check.csv")
    assert set(check["simulating_variant"]) == {"k1", "k4", "k16"}
    assert (check["real_variant"] == "k64").all()
    assert check["predicted_test_accuracy"].between(0, 1).all()
    assert check["real_test_accuracy"].between(0, 1).all()
    assert check["predicted_epsilon"].to_numpy() == pytest.approx(check["real_epsilon"])
    _paper_table_has_both_columns(virtual_batch)


def test_naive_eps_reaches_each_target(naive_eps):
    s = naive_eps.summary
    private = s[s["private"]]
    assert set(private["level"]) == {"eps4.6", "eps13.2", "eps71"}
    assert (private["epsilon"] <= private["target_epsilon"] * (1 + 1e-9)).all()
    assert (private["epsilon"] >= private["target_epsilon"] * 0.99).all()
    table = _paper_table_has_both_columns(naive_eps)
    assert (table["ours_epsilon"] <= 71 + 1e-6).all()


def test_frameworks_train_the_same_plan_in_every_backend(frameworks):
    s = frameworks.summary
    cfg = yaml.safe_load(config_of(frameworks.name).read_text())
    assert set(s["backend"]) == set(cfg["backends"]) == set(backends.available())
    private = s[s["level"] == "eps10"]
    assert len(private) == len(cfg["backends"]) and private["noise_multiplier"].nunique() == 1
    assert (private["epsilon"] <= 10 + 1e-9).all() and (private["delta"] == 1e-6).all()
    assert s["seconds_per_epoch"].gt(0).all() and s["train_loss"].notna().all()
    # the smoke scale's devices {reference: 2}: the same plan, its step shared by two processes
    assert (s["devices"] == s["backend"].map({"reference": 2}).fillna(1)).all()
    table = _paper_table_has_both_columns(frameworks)
    assert (table["ours_runs"] == 1).all()  # the objax rows only
    assert (frameworks.results / "figures/runtime/step_time_ratio.svg").exists()


def test_imbalance_has_three_profiles_and_their_disparate_impact(imbalance):
    s = imbalance.summary
    assert set(s["split"]) == {"rho1", "rho10", "rho100"}
    n_train = s.groupby("split")["n_train"].first()
    assert n_train["rho1"] > n_train["rho10"] > n_train["rho100"]
    assert s["test_balanced_accuracy"].between(0, 1).all()
    for split in ("rho1", "rho10", "rho100"):
        assert (imbalance.results / f"figures/disparate_impact/{split}.svg").exists()
    assert not (imbalance.results / "paper_comparison.csv").exists()  # no published numbers


def test_membership_attacks_non_private_and_dp_runs(membership):
    s = membership.summary.set_index("level")
    assert {"none", "eps8"} <= set(s.index)
    assert s["membership_loss_auc"].between(0, 1).all()
    assert pd.isna(s.loc["none", "epsilon"]) and s.loc["eps8", "epsilon"] <= 8
    figures = membership.results / "figures/membership"
    assert (figures / "histograms/balanced/reference.svg").exists()
    assert (figures / "roc/balanced.svg").exists()
    table = _paper_table_has_both_columns(membership)
    assert table.loc[0, "metric"] == "membership_loss_auc"


def _block_group(name: str) -> int:
    """1 for the stem and layer1, k for layer<k>, 5 for the head (never frozen)."""
    if name.startswith("layer"):
        return int(name[len("layer")])
    return 5 if name.startswith("fc.") else 1


def test_transfer_fine_tunes_from_public_pre_training_with_frozen_groups(transfer):
    r = transfer.results
    public, private = (np.load(r / f"splits/{s}.npz") for s in ("public", "balanced"))
    assert not set(public["classes"]) & set(private["classes"])  # disjoint classes
    pretrained = np.load(r / "pretrain/weights.npz")
    pre = json.loads((r / "pretrain/metrics.json").read_text())
    assert pre["epsilon"] is None and pre["level"] == "none" and pre["split"] == "public"
    s = transfer.summary.set_index("variant")
    assert set(s["frozen_groups"]) == {3, 4} and (s["epsilon"] <= 10 + 1e-9).all()
    assert (s["trainable_params"] < s["num_params"]).all()
    for variant, row in s.iterrows():
        run = r / f"runs/balanced/opacus/eps10/{variant}/seed0"
        weights = np.load(run / "weights.npz")
        for name in weights.files:
            kept = np.array_equal(weights[name], pretrained[name])
            frozen = _block_group(name) <= row["frozen_groups"]
            assert kept == frozen, f"{variant}: {name} kept={kept}, frozen={frozen}"
    table = _paper_table_has_both_columns(transfer)
    assert table.loc[0, "ours_match"] == '{"variant": "f3-b64k-e70"}'
