"""Every figure function on the outputs of the session's shared run of the embedded default
(every backend on digits), and the figure files the workflow's rules wrote."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dpscale import levels
from dpscale.plots import data, figures, style

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def summary(demo):
    return pd.read_csv(demo.results / "summary.csv")


def _texts(fig) -> str:
    """Every title, axis label, tick and legend text of a figure, one string."""
    return "\n".join(t.get_text() for t in fig.findobj(plt.Text))


def _runs(demo, **match) -> list[str]:
    out = []
    for run in demo.runs():
        split, backend, level = run.parts[-5:-2]  # .../<split>/<backend>/<level>/<variant>/seed<k>
        keys = {"split": split, "backend": backend, "level": level}
        if all(keys[k] == v for k, v in match.items()):
            out.append(str(run))
    return out


def _assert_image(svg, png):
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    pixels = np.asarray(Image.open(png).convert("L"), float)
    assert pixels.std() > 5, f"{png} looks blank"


def test_accuracy_vs_epsilon(demo, summary, tmp_path):
    fig = figures.accuracy_vs_epsilon(summary)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["balanced", "longtail (exp, ρ=10)"]
    for ax in axes:
        assert "RDP accountant" in ax.get_xlabel() and "δ=1e-05" in ax.get_xlabel()
        assert "Poisson sampling" in ax.get_xlabel()
        # One dashed non-private reference per backend, at its mean accuracy.
        dashed = [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert len(dashed) == len(demo.cfg["backends"])
    nonprivate = summary[(summary["level"] == "none") & (summary["split"] == "balanced")]
    dashed = sorted(ln.get_ydata()[0] for ln in axes[0].get_lines() if ln.get_linestyle() == "--")
    np.testing.assert_allclose(dashed, sorted(nonprivate["test_accuracy"]))
    text = _texts(fig)
    assert "non-private (ε = ∞)" in text
    for backend in demo.cfg["backends"]:
        assert backend in text
    figures.save(fig, tmp_path / "a.svg", tmp_path / "a.png")
    _assert_image(tmp_path / "a.svg", tmp_path / "a.png")


def test_balanced_accuracy_and_epsilon_audit(demo, summary):
    fig = figures.accuracy_vs_epsilon(summary, "test_balanced_accuracy")
    assert fig.axes[0].get_ylabel().startswith("test balanced accuracy")
    plt.close(fig)
    with pytest.raises(data.PlotDataError, match="accuracy metric 'f1'"):
        figures.accuracy_vs_epsilon(summary, "f1")
    fig = figures.epsilon_audit(summary)
    ax = fig.axes[0]
    private = summary[summary["level"] != "none"].dropna(subset=["membership_eps_lower_bound"])
    points = ax.collections[0].get_offsets()
    np.testing.assert_allclose(sorted(points[:, 0]), sorted(private["epsilon"]))
    # Every bound lies below the accounted epsilon (evaluate fails the run otherwise).
    assert (points[:, 1] <= points[:, 0]).all()
    assert "RDP accountant" in ax.get_xlabel()
    plt.close(fig)


def test_training_curves(demo):
    history = data.history_table(_runs(demo, split="longtail"))
    assert set(history["epoch"]) == set(range(1, int(demo.cfg["training"]["epochs"]) + 1))
    fig = figures.training_curves(history)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    private_levels = [lv for lv in levels.ordered(demo.cfg["privacy"]["levels"]) if lv != "none"]
    assert titles[0] == "non-private" and len(titles) == 1 + len(private_levels)
    # Panels name the final epsilon (the last epoch's in history.csv), in the level order.
    for title, level in zip(titles[1:], private_levels, strict=True):
        private = history[history["level"] == level].sort_values("epoch")
        for _, eps in private.groupby("backend")["epsilon"]:
            assert eps.is_monotonic_increasing and title == f"ε={eps.iloc[-1]:.3g}"
    texts = _texts(fig).split("\n")
    assert {"train", "test"} <= set(texts)
    assert any(t.startswith("reference") for t in texts)
    plt.close(fig)


def test_runtime_bars_are_the_summary_numbers(demo, summary):
    fig = figures.seconds_per_epoch(summary)
    heights = sorted(
        round(p.get_height(), 9) for ax in fig.axes for p in ax.patches if p.get_height() > 0
    )
    assert heights == sorted(round(v, 9) for v in summary["seconds_per_epoch"])
    plt.close(fig)
    ratios = data.step_time_ratios(summary)
    assert len(ratios) == (summary["level"] != "none").sum()  # one per private run
    fig = figures.step_time_ratio(ratios)
    heights = sorted(
        round(p.get_height(), 9) for ax in fig.axes for p in ax.patches if p.get_height() > 0
    )
    assert heights == sorted(round(v, 9) for v in ratios["ratio"])
    assert "DP / non-private step time" in _texts(fig)
    assert "device: cpu" in _texts(fig)  # every run of the demo trained on this CPU
    plt.close(fig)


def test_runtimes_of_two_devices_are_never_in_one_panel(summary):
    gpu = summary.assign(
        device="cuda:NVIDIA H200",
        seconds_per_epoch=summary["seconds_per_epoch"] / 10,
        step_time_steady_s=summary["step_time_steady_s"] / 10,
    )
    both = pd.concat([summary, gpu], ignore_index=True)
    splits = summary["split"].nunique()
    fig = figures.seconds_per_epoch(both)
    assert len(fig.axes) == 2 * splits  # a row of panels per device
    texts = _texts(fig)
    assert "devices: cpu, cuda:NVIDIA H200" in texts and "cuda:NVIDIA H200 | " in texts
    plt.close(fig)
    # A ratio pairs the private and non-private runs of one device only.
    ratios = data.step_time_ratios(both)
    single = len(data.step_time_ratios(summary))
    assert ratios.groupby("device").size().to_dict() == {"cpu": single, "cuda:NVIDIA H200": single}
    np.testing.assert_allclose(
        sorted(ratios["ratio"]), sorted([*data.step_time_ratios(summary)["ratio"]] * 2)
    )
    fig = figures.step_time_ratio(ratios)
    assert len(fig.axes) == 2 * splits
    plt.close(fig)


def test_disparate_impact(demo):
    with np.load(demo.results / "splits/longtail.npz") as split:
        counts = split["train_counts"]
    assert counts[0] > counts[-1]  # exp profile, rho 10
    per_class = data.per_class_table(_runs(demo, split="longtail"))
    # evaluate's class counts (from the run's training labels) are the split's.
    for _, run in per_class.groupby(["backend", "level"]):
        assert list(run["train_count"]) == counts.tolist()
    drop = data.accuracy_drop(per_class)
    private = [lv for lv in demo.cfg["privacy"]["levels"] if lv != "none"]
    assert len(drop) == len(counts) * len(demo.cfg["backends"]) * len(private)
    assert drop["drop"].between(-1, 1).all()
    fig = figures.disparate_impact(drop)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(points) == len(drop)
    np.testing.assert_allclose(sorted(points[:, 1]), sorted(100 * drop["drop"]))
    plt.close(fig)


def test_membership_histograms_and_roc(demo):
    runs = _runs(demo, split="balanced", backend="reference")
    scores = data.membership_scores(runs)
    n_train = demo.cfg["splits"]["train_per_class"] * demo.cfg["splits"]["classes"]
    assert (scores["member"] == data.MEMBER).sum() == n_train * len(demo.cfg["privacy"]["levels"])
    fig = figures.membership_histograms(scores)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "non-private" and all(t.startswith("ε=") for t in titles[1:])
    assert data.MEMBER in _texts(fig) and data.NON_MEMBER in _texts(fig)
    plt.close(fig)

    roc = data.roc_table(_runs(demo, split="balanced"))
    fig = figures.membership_roc(roc)
    titles = [ax.get_title() for ax in fig.axes]
    assert [t.split(" ")[0] for t in titles] == style.backend_order(demo.cfg["backends"])
    legend = _texts(fig)
    for (_backend, _level), rows in roc.groupby(["backend", "level"]):
        assert f"AUC {rows['auc'].iloc[0]:.3f}" in legend
    assert roc["auc"].between(0, 1).all()
    # The legend's numbers are the summary's: one metrics engine (evaluate).
    summary = pd.read_csv(demo.results / "summary.csv").set_index(["backend", "split", "level"])
    for (backend, level), rows in roc.groupby(["backend", "level"]):
        expected = summary.loc[(backend, "balanced", level), "membership_loss_auc"]
        assert rows["auc"].iloc[0] == pytest.approx(expected, abs=1e-12)
    plt.close(fig)


def test_confusion_matrix_counts_the_test_set(demo):
    runs = _runs(demo, split="longtail", backend="opacus", level="eps8")
    counts = data.confusion_table(runs)
    n_test = demo.cfg["splits"]["test_per_class"]
    assert (counts.sum(axis=1) == n_test).all()
    fig = figures.confusion_matrix(counts, "title")
    annotations = [int(t.get_text()) for t in fig.axes[0].texts]
    assert sum(annotations) == n_test * len(counts)
    plt.close(fig)


def test_workflow_wrote_every_figure(demo):
    files = sorted((demo.results / "figures").rglob("*.svg"))
    cfg = demo.cfg
    splits, backends = len(cfg["splits"]["profiles"]), len(cfg["backends"])
    levels = len(cfg["privacy"]["levels"])
    # 2 accuracy, 2 runtime, audit; per split: training, roc, disparate; per split and backend:
    # histograms; per split, backend and level: confusion.
    assert len(files) == 5 + splits * (3 + backends + backends * levels)
    for svg in files:
        _assert_image(svg, svg.with_suffix(".png"))
    log = (demo.results / "logs/figures/accuracy_vs_epsilon.log").read_text()
    assert "wrote" in log


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dpscale.plots", "--figure", "training", "--svg", "x.svg"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "needs --runs" in proc.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpscale.plots",
            "--figure",
            "mia_hist",
            "--runs",
            f'["{tmp_path}"]',
            "--svg",
            str(tmp_path / "x.svg"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip() == f"dpscale.plots mia_hist: {tmp_path}/metrics.json: not found; "
        "expected a run's metrics.json"
    )
