"""One visual language across the figure families: a backend has one colour in every figure,
privacy levels one palette, and no two tick labels of a panel overlap. Checked on a synthetic
summary with every backend and three private levels (this process, seconds) and on the figures
of the session's shared default run."""

from __future__ import annotations

import glob
from collections import defaultdict

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex, to_rgb

from dpscale.plots import data, figures, style

MODES = {
    "reference": "reference-bk",
    "opacus": "opacus-bk",
    "tfprivacy": "bk-xla",
    "objax": "objax-pgv",
    "jax": "jax-bk",
    "jaxprivacy": "jaxprivacy-vmap",
}


def synthetic_summary() -> pd.DataFrame:
    """summary.csv's columns the summary figures read: 6 backends x 2 splits x 4 levels x 2
    seeds, accuracy rising with epsilon."""
    rng = np.random.default_rng(0)
    rows = []
    for split, kind, rho in (("balanced", "balanced", 1.0), ("longtail", "exp", 10.0)):
        for backend, mode in MODES.items():
            for level, eps in (("none", np.nan), ("eps1", 1.0), ("eps2", 2.0), ("eps8", 8.0)):
                for seed in (0, 1):
                    acc = 0.9 if level == "none" else 0.9 - 0.5 / eps
                    step = 0.05 * (1 if level == "none" else 3) * (1 + rng.random())
                    rows.append(
                        dict(
                            split=split,
                            split_kind=kind,
                            split_rho=rho,
                            backend=backend,
                            mode=mode,
                            level=level,
                            seed=seed,
                            epsilon=eps * (1 - 0.001 * rng.random()),
                            accountant="rdp",
                            delta=1e-5,
                            sampling="poisson",
                            test_accuracy=acc - 0.02 * rng.random(),
                            test_balanced_accuracy=acc - 0.05 * rng.random(),
                            membership_eps_lower_bound=0.1 * rng.random(),
                            seconds_per_epoch=20 * step,
                            step_time_steady_s=step,
                            device="cpu",
                        )
                    )
    return pd.DataFrame(rows)


def summary_figures(summary: pd.DataFrame) -> dict[str, plt.Figure]:
    return {
        "accuracy": figures.accuracy_vs_epsilon(summary),
        "balanced accuracy": figures.accuracy_vs_epsilon(summary, "test_balanced_accuracy"),
        "audit": figures.epsilon_audit(summary),
        "seconds": figures.seconds_per_epoch(summary),
        "step ratio": figures.step_time_ratio(data.step_time_ratios(summary)),
    }


def overlapping_ticks(fig: plt.Figure) -> list[tuple[str, str]]:
    """Pairs of tick labels (x with x, y with y, per panel) whose drawn boxes intersect."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    clashes = []
    for ax in fig.axes:
        for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            shown = [t for t in labels if t.get_visible() and t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in shown]
            for i in range(len(shown)):
                for j in range(i + 1, len(shown)):
                    if boxes[i].overlaps(boxes[j]):
                        clashes.append((shown[i].get_text(), shown[j].get_text()))
    return clashes


def _handle_color(handle) -> str | None:
    """A legend handle's colour: a line's, a patch's or a collection's first face colour."""
    getter = getattr(handle, "get_color", None) or getattr(handle, "get_facecolor", None)
    if getter is None:
        return None
    value = getter()
    if not isinstance(value, str):
        value = np.asarray(value, dtype=float)
        if value.ndim == 2:  # a collection: one row per point
            if not len(value):
                return None
            value = value[0]
        value = tuple(value)
    return to_hex(value, keep_alpha=False)


def legend_colors(fig: plt.Figure) -> dict[str, set[str]]:
    """Legend entry text -> the colours its handles have, over every legend of the figure."""
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes)]
    seen = defaultdict(set)
    for legend in filter(None, legends):
        for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
            color = _handle_color(handle)
            if color is not None:
                seen[text.get_text()].add(color)
    return seen


def backend_colors(figs: dict[str, plt.Figure]) -> dict[str, dict[str, str]]:
    """backend -> {figure name: colour}, from the legend entries that name a backend."""
    names = set(style._registry())
    found = defaultdict(dict)
    for name, fig in figs.items():
        for label, colors in legend_colors(fig).items():
            if style.base(label) in names:
                assert len(colors) == 1, f"{name}: {label!r} has colours {colors}"
                found[style.base(label)][name] = colors.pop()
    return found


def test_a_backend_has_one_colour_and_marker_everywhere():
    order = list(style.BACKENDS)
    assert [style.color(b) for b in order] == list(style.PALETTE[: len(order)])
    assert len({style.marker(b) for b in order}) == len(order)
    # The mode never changes the colour; the order is the fixed one whatever the input order.
    assert style.color("opacus (hooks)") == style.color("opacus")
    assert style.backend_order(["jax", "opacus (hooks)", "reference"]) == [
        "reference",
        "opacus (hooks)",
        "jax",
    ]
    # A name that is no backend of this project: a colour from its name, not from its company.
    outside = style.color("someone-elses-backend")
    assert outside not in [style.color(b) for b in order]
    assert style.backend_order(["someone-elses-backend", "jax"])[0] == "jax"
    assert style.color("someone-elses-backend") == outside


def test_levels_have_one_order_and_one_sequential_palette():
    pairs = [("eps8", "eps8"), ("none", "non-private"), ("eps1", "eps1"), ("eps2", "eps2")]
    colors = style.level_colors(pairs)
    assert colors["non-private"] == style.NONPRIVATE
    # Darker (lower luminance) as privacy weakens: eps1, eps2, eps8 along one colormap.
    weights = [0.3, 0.59, 0.11]
    lum = [np.dot(to_rgb(colors[k]), weights) for k in ("eps1", "eps2", "eps8")]
    assert lum == sorted(lum, reverse=True) and len(set(lum)) == 3


def test_summary_figures_share_colours_and_never_overlap_ticks(tmp_path):
    figs = summary_figures(synthetic_summary())
    for name, fig in figs.items():
        assert overlapping_ticks(fig) == [], name
    found = backend_colors(figs)
    assert set(found) == set(MODES)
    for backend, by_figure in found.items():
        assert set(by_figure.values()) == {style.color(backend)}, (backend, by_figure)
    # The bars' privacy levels: one colour per level in both runtime figures.
    seconds, ratio = legend_colors(figs["seconds"]), legend_colors(figs["step ratio"])
    for level in ("eps1", "eps2", "eps8"):
        assert seconds[level] == ratio[level] and len(seconds[level]) == 1
    assert seconds["non-private"] == {style.NONPRIVATE}
    # Short backend names on the runtime axes, the modes named once above the panels.
    ticks = {t.get_text() for t in figs["seconds"].axes[0].get_xticklabels()}
    assert ticks == set(MODES)
    assert "tfprivacy bk-xla" in figs["seconds"]._suptitle.get_text()
    for fig in figs.values():
        plt.close(fig)


def test_the_same_table_draws_the_same_bytes(tmp_path):
    summary = synthetic_summary()
    for k in range(2):
        figures.save(figures.seconds_per_epoch(summary), tmp_path / f"s{k}.svg")
    assert (tmp_path / "s0.svg").read_bytes() == (tmp_path / "s1.svg").read_bytes()


@pytest.mark.slow
def test_every_family_of_the_demo_speaks_one_language(demo):
    summary = pd.read_csv(demo.results / "summary.csv")

    def runs(split, backend="*"):
        return sorted(glob.glob(str(demo.results / f"runs/{split}/{backend}/*/*/seed*")))

    figs = summary_figures(summary)
    figs["training"] = figures.training_curves(data.history_table(runs("longtail")))
    figs["disparate"] = figures.disparate_impact(
        data.accuracy_drop(data.per_class_table(runs("longtail")))
    )
    figs["roc"] = figures.membership_roc(data.roc_table(runs("balanced")))
    figs["histograms"] = figures.membership_histograms(
        data.membership_scores(runs("longtail", "opacus"))
    )
    one = runs("longtail", "reference")[-1:]
    figs["confusion"] = figures.confusion_matrix(data.confusion_table(one), "reference")
    for name, fig in figs.items():
        assert overlapping_ticks(fig) == [], name
    found = backend_colors(figs)
    assert set(found) == set(demo.cfg["backends"])
    for backend, by_figure in found.items():
        assert len(by_figure) >= 4 and set(by_figure.values()) == {style.color(backend)}
    for fig in figs.values():
        plt.close(fig)
