"""The equivalence check of the default run (rules/equivalence.smk, dpscale.equivalence): its
numbers, its place on the report's first page, and that a perturbed backend is flagged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from dpscale import equivalence
from dpscale.runner import plan
from tests import jobs
from tests.conftest import PROJECT, snakemake_cmd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(demo) -> dict:
    return json.loads((demo.results / "equivalence/equivalence.json").read_text())


def test_every_backend_took_the_experiments_first_steps(demo, result):
    cfg = demo.cfg
    assert [r["backend"] for r in result["backends"]] == cfg["backends"]
    assert result["reference"] == "reference" and result["noise_multiplier"] == 0.0
    assert result["tolerances"] == equivalence.TOLERANCES
    # The plan of the first split's first private level, epoch 1, seed as configured.
    split = next(iter(cfg["splits"]["profiles"]))
    privacy = json.loads((demo.results / f"privacy/{split}/default/eps8.json").read_text())
    batches = plan.epoch_plan(
        privacy["n_train"], privacy["sample_rate"], equivalence.STEPS, cfg["seeds"][0], 1
    )
    assert result["steps"] == equivalence.STEPS
    assert result["batch_sizes"] == [len(b) for b in batches]
    assert result["clip_norm"] == cfg["training"]["clip_norm"]
    assert result["momentum"] == cfg["training"]["momentum"]
    rows = {r["backend"]: r for r in result["backends"]}
    assert all(rows["reference"][equivalence.column(m)] == 0.0 for m in equivalence.MEASURES)
    for r in rows.values():
        assert all(np.isfinite(r[equivalence.column(m)]) for m in equivalence.MEASURES), r
        within = all(r[equivalence.column(m)] <= t for m, t in result["tolerances"].items())
        assert r["equivalent"] == within, r
    assert result["equivalent"] == all(r["equivalent"] for r in rows.values())
    # Noise-free weights of the private data are deleted once compared.
    assert not list((demo.results / "equivalence").glob("*.npz"))


def test_report_first_page_states_the_verdict(demo, result):
    page = (demo.results / "equivalence/verdict.rst").read_text()
    failed = [r["backend"] for r in result["backends"] if not r["equivalent"]]
    want = "**NOT equivalent**: " + ", ".join(failed) if failed else "**equivalent** on"
    assert want in page
    assert ", ".join(result["devices"]) in page
    html = (demo.results / "report.html").read_text()
    assert "Equivalence on this machine." in html
    assert "backends vs reference" in html  # the table's entry
    assert "derive from" in html and "secure_randomness" in html  # the randomness paragraph


def real_output(demo, result, weights_run: str, scale_update: float = 1.0) -> dict[str, np.ndarray]:
    """A run output built from a real run of the demo (its weights, a change of them and its test
    logits), optionally with the change scaled by `scale_update` (as a wrong divisor would)."""
    run = demo.results / weights_run
    with np.load(run / "weights.npz") as w, np.load(run / "predictions.npz") as p:
        weights = {k: w[k].astype(np.float32) for k in w.files}
        logits = p["test_logits"][:96].astype(np.float32)
    meta = {
        "mode": "demo",
        "device": "cpu",
        "batch_sizes": result["batch_sizes"],
        "lrs": result["lrs"],
        "clip_norm": result["clip_norm"],
        "momentum": result["momentum"],
        "steps": result["steps"],
        "seconds": 0.0,
    }
    out = {"logits": logits, "meta": np.array(json.dumps(meta))}
    change = {k: (v - v.mean()) * np.float32(scale_update) for k, v in weights.items()}
    out.update({f"w/{k}": v + change[k] - (v - v.mean()) for k, v in weights.items()})
    out.update({f"u/{k}": u for k, u in change.items()})  # any real-valued change
    return out


def test_a_perturbed_backend_is_flagged_with_its_numbers(demo, result):
    run = "runs/balanced/reference/eps8/default/seed0"
    outputs = {
        "reference": real_output(demo, result, run),
        "same": real_output(demo, result, run),
        "off": real_output(demo, result, run, scale_update=1.3),  # B/1.3: a wrong divisor
    }
    got = equivalence.compare(outputs, "reference")
    rows = {r["backend"]: r for r in got["backends"]}
    assert rows["same"]["equivalent"] and rows["same"]["max_rel_weights"] == 0.0
    assert not rows["off"]["equivalent"] and not got["equivalent"]
    assert rows["off"]["update_l2"] == pytest.approx(0.3, rel=1e-5)
    assert rows["off"]["max_rel_weights"] > 0
    assert "**NOT equivalent**: off" in equivalence.page(got)
    assert "off,demo,cpu" in equivalence.table(got)
    # Different plans are not compared at all.
    other = real_output(demo, result, run)
    meta = json.loads(str(other["meta"]))
    other["meta"] = np.array(json.dumps({**meta, "batch_sizes": [1, 2, 3]}))
    with pytest.raises(ValueError, match="expected one plan"):
        equivalence.compare({"reference": outputs["reference"], "x": other}, "reference")


def multi_device_job() -> jobs.Job:
    """The reference backend's equivalence steps of the default with training.devices 2."""

    def run():
        workdir = jobs.workdir("equivalence-devices")
        cfg = yaml.safe_load((PROJECT / "config/config.yaml").read_text())
        cfg["training"]["devices"] = 2
        cfg["backends"] = ["reference", "jax"]
        (workdir / "devices.yaml").write_text(yaml.safe_dump(cfg))
        target = f"results/{cfg['experiment']}/equivalence/reference.npz"
        cmd = snakemake_cmd(
            workdir, "--cores", "1", "--configfile", str(workdir / "devices.yaml"), "--notemp"
        )
        jobs.check_run([*cmd, target], threads=1, timeout=600)
        return equivalence.read_output(workdir / target)

    return jobs.Job("equivalence devices 2", run, cores=1)


@jobs.source
def _equivalence_jobs(item):
    if (
        item.module.__name__ == __name__
        and item.originalname == "test_equivalence_steps_run_on_one_device"
    ):
        yield multi_device_job()


def test_equivalence_steps_run_on_one_device():
    # The check is of each framework's step (several devices' sameness with one is
    # tests/conformance/test_devices.py's); given devices 2 it once waited for ranks nobody starts.
    out = jobs.result(multi_device_job())
    meta = json.loads(str(out["meta"]))
    assert meta["backend"] == "reference" and meta["steps"] == equivalence.STEPS
    assert any(k.startswith("w/") for k in out)
