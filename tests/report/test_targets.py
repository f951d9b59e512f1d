"""Which figure files an experiment gets, and which run files each figure reads."""

from __future__ import annotations

import yaml

from dpscale.plots.__main__ import RUN_FIGURES, SUMMARY_FIGURES
from dpscale.plots.targets import FAMILIES, FigureGrid, run_dirs
from tests.conftest import PROJECT

RUN = "results/x/runs/{split}/{backend}/{level}/{variant}/seed{seed}"


def grid(levels, seeds=(0,)):
    return FigureGrid(
        RUN, "results/x/figures", ["bal", "lt"], ["opacus", "reference"], levels, seeds
    )


def test_the_default_grid_gets_every_family():
    names = grid(["none", "eps8", "eps2"]).names()
    assert "accuracy_vs_epsilon" in names and "balanced_accuracy_vs_epsilon" in names
    assert {"runtime/seconds_per_epoch", "runtime/step_time_ratio"} <= set(names)
    assert {"training/bal", "training/lt", "disparate_impact/lt", "membership/roc/bal"} <= set(
        names
    )
    assert "membership/histograms/lt/opacus" in names and "membership/epsilon_audit" in names
    assert sum(n.startswith("confusion/") for n in names) == 2 * 2 * 3
    assert len(names) == len(set(names))
    targets = grid(["none", "eps8"]).targets()
    assert "results/x/figures/training/lt.svg" in targets
    assert "results/x/figures/training/lt.png" in targets


def test_comparisons_need_private_and_non_private_runs():
    only_private = grid(["eps8"]).names()
    assert "runtime/step_time_ratio" not in only_private
    assert not any(n.startswith("disparate_impact/") for n in only_private)
    assert "membership/epsilon_audit" in only_private
    only_none = grid(["none"]).names()
    assert "membership/epsilon_audit" not in only_none
    assert "runtime/step_time_ratio" not in only_none


def test_runs_narrow_by_split_backend_level():
    g = grid(["none", "eps8"], seeds=(0, 1))
    assert len(g.runs()) == 2 * 2 * 2 * 2
    assert g.runs(split="lt", backend="opacus", level="eps8") == [
        "results/x/runs/lt/opacus/eps8/default/seed0",
        "results/x/runs/lt/opacus/eps8/default/seed1",
    ]
    files = g.run_files("history.csv", split="bal")
    assert len(files) == 8 and all(f.endswith("/history.csv") for f in files)
    assert run_dirs(files) == g.runs(split="bal")


def test_variants_multiply_runs_and_confusion_figures_only():
    g = FigureGrid(RUN, "results/x/figures", ["bal"], ["reference"], ["eps8"], (0,), ["k1", "k4"])
    assert g.runs() == [
        "results/x/runs/bal/reference/eps8/k1/seed0",
        "results/x/runs/bal/reference/eps8/k4/seed0",
    ]
    assert g.runs(variant="k4") == ["results/x/runs/bal/reference/eps8/k4/seed0"]
    names = g.names()
    assert {"confusion/bal/reference/eps8/k1", "confusion/bal/reference/eps8/k4"} <= set(names)
    assert names.count("training/bal") == 1  # one figure, the variants inside it


def test_families_narrow_the_figures():
    g = FigureGrid(
        RUN,
        "results/x/figures",
        ["bal"],
        ["reference"],
        ["none", "eps8"],
        (0,),
        families=["accuracy", "disparate"],
    )
    assert g.names() == ["accuracy_vs_epsilon", "disparate_impact/bal"]


def test_the_schema_offers_exactly_the_figure_families():
    schema = yaml.safe_load((PROJECT / "workflow/schemas/config.schema.yaml").read_text())
    figures = schema["properties"]["figures"]
    assert figures["items"]["enum"] == list(FAMILIES) == figures["default"]
    assert set(FAMILIES) == set(SUMMARY_FIGURES + RUN_FIGURES)
