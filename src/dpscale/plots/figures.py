"""One small function per figure: tidy table in, matplotlib Figure out (seaborn, Agg backend).

The tables come from `dpscale.plots.data` (or summary.csv); `save` writes SVG for the report
and PNG for the README. Every epsilon on a figure names its accountant, delta and sampling.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on cluster nodes or in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

from dpscale import atomic, levels  # noqa: E402
from dpscale.plots import style  # noqa: E402
from dpscale.plots.data import (  # noqa: E402
    MEMBER,
    NON_MEMBER,
    PlotDataError,
    accounting_text,
    with_variant,
)

# Fixed ids in the SVG and no dates in either file: the same data gives the same bytes.
matplotlib.rcParams["svg.hashsalt"] = "dpscale"
sns.set_theme(style="whitegrid", context="paper")

PNG_DPI = 150


def save(fig: plt.Figure, svg: str | Path | None = None, png: str | Path | None = None) -> None:
    """Write the figure (atomically, see dpscale.atomic) and close it."""
    for path, fmt, metadata in (
        (svg, "svg", {"Date": None}),
        (png, "png", {"Software": None}),
    ):
        if path is None:
            continue
        with atomic.replacing(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=PNG_DPI, bbox_inches="tight", metadata=metadata)
    plt.close(fig)


def _require(table: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise PlotDataError(f"{what}: missing columns {missing}; have {list(table.columns)}")
    if table.empty:
        raise PlotDataError(f"{what}: no rows")


def _backend_label(table: pd.DataFrame) -> pd.Series:
    """'opacus (hooks)': the mode tells apart runs of one backend with different mechanisms."""
    backend = table["backend"].astype(str)
    if "mode" not in table:
        return backend
    labels = []
    for b, mode in zip(backend, table["mode"].fillna("").astype(str), strict=True):
        mode = mode.removeprefix(b + "-")  # 'reference-torch.func' -> 'torch.func'
        labels.append(b if mode in ("", b) else f"{b} ({mode})")
    return pd.Series(labels, index=table.index)


def _with_backend_labels(table: pd.DataFrame) -> pd.DataFrame:
    """The table with `backend` replaced by its label, so legends read 'backend'."""
    return table.assign(backend=_backend_label(table))


def _privacy_order(table: pd.DataFrame) -> list[str]:
    """Legend order of the `privacy` labels: non-private first, then by level."""
    pairs = table[["level", "privacy"]].drop_duplicates()
    pairs = pairs.sort_values("level", key=lambda s: s.map(levels.order_key))
    return list(pairs["privacy"].unique())


def _natural(name) -> list:
    """k4 before k16: digit runs compare as numbers."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(name))]


def _wrap(table: pd.DataFrame, width: int = 4) -> int | None:
    """Panels per row when there are more privacy labels (levels x variants) than fit in one."""
    return width if table["privacy"].nunique() > width else None


def _level_labels(table: pd.DataFrame) -> tuple[pd.Series, list[str]]:
    """A level's bar label ('non-private', 'eps8', after the variant if several) and order."""
    variant = table["variant"] if "variant" in table else pd.Series(None, index=table.index)
    pairs = sorted(
        {(str(v), lv) for v, lv in zip(variant, table["level"], strict=True)},
        key=lambda p: (levels.order_key(p[1]), _natural(p[0])),
    )

    def label(v, lv):
        return with_variant(
            "non-private" if lv == "none" else lv, None if v in ("None", "nan") else v
        )

    labels = [label(str(v), lv) for v, lv in zip(variant, table["level"], strict=True)]
    return pd.Series(labels, index=table.index), list(dict.fromkeys(label(*p) for p in pairs))


def _split_title(split: str, table: pd.DataFrame) -> str:
    """'longtail (exp, ρ=10)' from the summary's split_kind / split_rho columns."""
    rows = table[table["split"] == split]
    kind = rows["split_kind"].dropna().iloc[0] if "split_kind" in rows and len(rows) else None
    rho = rows["split_rho"].dropna().iloc[0] if "split_rho" in rows and len(rows) else None
    if kind is None:
        return split
    desc = str(kind) if kind == "balanced" or rho is None else f"{kind}, ρ={float(rho):g}"
    return split if split == desc else f"{split} ({desc})"


#: Accuracy columns of summary.csv the accuracy figure can show, with their axis labels.
ACCURACY_METRICS = {
    "test_accuracy": "test accuracy",
    "test_balanced_accuracy": "test balanced accuracy (mean per-class recall)",
}


def accuracy_vs_epsilon(summary: pd.DataFrame, metric: str = "test_accuracy") -> plt.Figure:
    """Accuracy against epsilon per backend, one facet per split; non-private dashed."""
    if metric not in ACCURACY_METRICS:
        raise PlotDataError(f"accuracy metric {metric!r}; expected one of {list(ACCURACY_METRICS)}")
    _require(summary, ["split", "backend", "level", "epsilon", metric], "summary")
    table = _with_backend_labels(summary)
    splits = sorted(table["split"].unique(), key=lambda s: (s != "balanced", s))
    backends = style.backend_order(table["backend"])
    colors = style.palette(backends)
    fig, axes = plt.subplots(
        1, len(splits), figsize=(4.2 * len(splits), 3.4), sharey=True, squeeze=False
    )
    private = table[table["level"] != "none"].dropna(subset=["epsilon"])
    # Several variants (batch sizes, simulations): one line per backend and variant, told
    # apart by marker and dash, so different settings are never averaged into one point.
    variants = (
        sorted(table["variant"].dropna().unique(), key=_natural) if "variant" in table else []
    )
    by_variant = len(variants) > 1
    markers = dict(zip(variants, "osD^v<>pPX*h", strict=False))
    for ax, split in zip(axes[0], splits, strict=True):
        rows = private[private["split"] == split]
        if len(rows):
            sns.lineplot(
                data=rows,
                x="epsilon",
                y=metric,
                hue="backend",
                hue_order=backends,
                palette=colors,
                # One marker per backend (its fixed one), or per variant when there are several.
                style="variant" if by_variant else "backend",
                style_order=variants if by_variant else backends,
                markers=markers if by_variant else {b: style.marker(b) for b in backends},
                dashes=by_variant,
                errorbar="sd",
                ax=ax,
                legend=False,
            )
            ax.set_xscale("log")
            # The levels' epsilons as plain numbers, not 2×10⁰ at every minor tick.
            ax.set_xticks(sorted({float(f"{e:.2g}") for e in private["epsilon"]}))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        nonprivate = table[(table["level"] == "none") & (table["split"] == split)]
        for backend, acc in nonprivate.groupby("backend")[metric].mean().items():
            ax.axhline(acc, color=colors[backend], linestyle="--", linewidth=1)
        ax.set_title(_split_title(split, table))
        ax.set_xlabel("ε (" + accounting_text(table) + ")" if len(private) else "ε")
        ax.set_ylabel(ACCURACY_METRICS[metric])
    handles = [
        plt.Line2D([], [], color=colors[b], marker=style.marker(b), label=b) for b in backends
    ]
    if by_variant:
        handles += [
            plt.Line2D(
                [],
                [],
                color=style.NONPRIVATE,
                marker=markers[v],
                linestyle="",
                label=f"variant {v}",
            )
            for v in variants
        ]
    if (table["level"] == "none").any():
        handles.append(
            plt.Line2D([], [], color=style.NONPRIVATE, linestyle="--", label="non-private (ε = ∞)")
        )
    fig.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
        fontsize="small",
    )
    fig.tight_layout()
    return fig


def training_curves(history: pd.DataFrame) -> plt.Figure:
    """Train loss (solid) and test loss (dashed) per epoch, one panel per privacy level."""
    _require(history, ["epoch", "train_loss", "backend", "level", "privacy"], "history")
    table = _with_backend_labels(history)
    curves = table.melt(
        id_vars=["epoch", "backend", "privacy", "seed"],
        value_vars=[c for c in ("train_loss", "test_loss") if c in table],
        var_name="curve",
        value_name="loss",
    ).dropna(subset=["loss"])
    curves["curve"] = curves["curve"].str.replace("_loss", "")
    grid = sns.relplot(
        data=curves,
        x="epoch",
        y="loss",
        hue="backend",
        hue_order=style.backend_order(curves["backend"]),
        palette=style.palette(curves["backend"]),
        style="curve",
        style_order=["train", "test"],
        col="privacy",
        col_order=_privacy_order(table),
        col_wrap=_wrap(table),
        kind="line",
        marker="o",
        errorbar="sd",
        height=3.0,
        aspect=1.1,
        facet_kws={"sharey": True},
    )
    grid.set_titles("{col_name}")
    grid.set_axis_labels("epoch", "cross-entropy loss")
    for ax in grid.axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    grid.legend.set_title("")
    grid.figure.suptitle(accounting_text(table), y=1.02, fontsize="small")
    return grid.figure


def _by_device(table: pd.DataFrame) -> tuple[pd.DataFrame, dict, str]:
    """Runtimes are only comparable on one device: a row of panels per device when runs used
    several, and a title naming the device(s) in any case."""
    device = table["device"].fillna("unknown device") if "device" in table else None
    if device is None:
        return table, {}, "device not recorded"
    table = table.assign(device=device)
    names = sorted(table["device"].unique())
    if len(names) == 1:
        return table, {}, f"device: {names[0]}"
    return (
        table,
        {"row": "device", "row_order": names},
        ("devices: " + ", ".join(names) + " (one row each: never compared across devices)"),
    )


def _runtime_titles(grid, title: str, facets: dict) -> None:
    grid.set_titles("{row_name} | {col_name}" if facets else "{col_name}")
    grid.figure.suptitle(title, y=1.0, va="bottom", fontsize="small")


def _modes_text(table: pd.DataFrame) -> str:
    """'modes: reference torch.func, opacus hooks, ...': what the short tick names leave out."""
    if "mode" not in table:
        return ""
    pairs = dict(table[["backend", "mode"]].dropna().drop_duplicates().itertuples(index=False))
    modes = [
        f"{b} {pairs[b].removeprefix(b + '-')}"
        for b in style.backend_order(pairs)
        if pairs[b] not in ("", b)
    ]
    return "\nmodes: " + ", ".join(modes) if modes else ""


def _level_bars(table: pd.DataFrame, y: str, ylabel: str) -> sns.FacetGrid:
    """Bars per backend (fixed order, short names), one colour per privacy level."""
    modes = _modes_text(table)
    table = _with_backend_labels(table).copy()  # one block: the columns below are added
    # A level, not a realised epsilon: splits differ in epsilon for one target.
    table["privacy"], order = _level_labels(table)
    colors = style.level_colors(zip(table["level"], table["privacy"], strict=True))
    ticks = style.axis_labels(table["backend"])
    backends = [ticks[b] for b in style.backend_order(table["backend"])]
    table["backend"] = table["backend"].map(ticks)
    table, facets, title = _by_device(table)
    grid = sns.catplot(
        data=table,
        x="backend",
        y=y,
        order=backends,
        hue="privacy",
        hue_order=order,
        palette=colors,
        col="split",
        **facets,
        kind="bar",
        errorbar="sd",
        height=3.0,
        aspect=1.3,
    )
    _runtime_titles(grid, title + modes, facets)
    grid.set_axis_labels("", ylabel)
    # Right of the panels, never over the last one's bars.
    sns.move_legend(grid, "center left", bbox_to_anchor=(1.0, 0.5), title="privacy level")
    return grid


def _label_bars(ax, fmt: str) -> None:
    """Each bar's value: inside a tall bar (clear of the error bar at its top), in black or
    white as the bar's colour needs; above a short one. Upright when several levels share a
    backend's slot (their bars are narrow then)."""
    top = ax.get_ylim()[1]
    rotation = 90 if len(ax.containers) > 1 else 0
    for container in ax.containers:
        values = [bar.get_height() for bar in container]
        tall = [v >= 0.3 * top for v in values]
        face = container.patches[0].get_facecolor() if container.patches else (0, 0, 0, 1)
        ink = "black" if np.dot(face[:3], [0.299, 0.587, 0.114]) > 0.55 else "white"
        for inside, kind, color in ((True, "center", ink), (False, "edge", "black")):
            labels = [
                fmt.format(v) if t == inside else "" for v, t in zip(values, tall, strict=True)
            ]
            ax.bar_label(
                container,
                labels=labels,
                label_type=kind,
                padding=0 if inside else 2,
                color=color,
                fontsize="xx-small",
                rotation=rotation,
            )


def seconds_per_epoch(summary: pd.DataFrame) -> plt.Figure:
    """Training wall time per epoch (steady state) per backend, bars by privacy level."""
    _require(summary, ["split", "backend", "level", "seconds_per_epoch"], "summary")
    grid = _level_bars(summary, "seconds_per_epoch", "seconds per epoch")
    style.unclutter(grid.figure)
    return grid.figure


def step_time_ratio(ratios: pd.DataFrame) -> plt.Figure:
    """Steady DP step time / non-private step time per backend (1 = DP is free)."""
    _require(ratios, ["split", "backend", "level", "ratio"], "step-time ratios")
    grid = _level_bars(ratios, "ratio", "DP / non-private step time")
    for ax in grid.axes.flat:
        ax.axhline(1.0, color="black", linewidth=0.8)
        _label_bars(ax, "{:.2f}×")
    style.unclutter(grid.figure)
    return grid.figure


def disparate_impact(drop: pd.DataFrame) -> plt.Figure:
    """Per-class accuracy drop (non-private minus DP) against the class's training count."""
    _require(drop, ["train_count", "drop", "backend", "privacy"], "accuracy drop")
    table = _with_backend_labels(drop).assign(drop_pp=100 * drop["drop"])
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    sns.scatterplot(
        data=table,
        x="train_count",
        y="drop_pp",
        hue="backend",
        hue_order=style.backend_order(table["backend"]),
        palette=style.palette(table["backend"]),
        style="privacy",
        style_order=_privacy_order(table),
        s=40,
        alpha=0.8,
        ax=ax,
    )
    # Per backend and level, a least-squares line in log(count): the trend the eye looks for.
    counts = table["train_count"].astype(float)
    if counts.nunique() > 1:
        ax.set_xscale("log")
        for (backend, _), rows in table.groupby(["backend", "privacy"]):
            x = np.log(rows["train_count"].astype(float))
            if x.nunique() > 1:
                slope, icpt = np.polyfit(x, rows["drop_pp"], 1)
                xs = np.linspace(x.min(), x.max(), 20)
                ax.plot(np.exp(xs), slope * xs + icpt, color=style.color(backend), linewidth=1)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("training examples of the class")
    ax.set_ylabel("test recall drop, non-private − DP (pp)")
    ax.set_title(accounting_text(table), fontsize="small")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize="small")
    fig.tight_layout()
    return fig


def membership_histograms(scores: pd.DataFrame) -> plt.Figure:
    """Per-example loss of members (train) and non-members (holdout), one panel per level."""
    _require(scores, ["member", "loss", "privacy", "level"], "membership scores")
    grid = sns.displot(
        data=scores,
        x="loss",
        hue="member",
        hue_order=[MEMBER, NON_MEMBER],
        palette={MEMBER: "black", NON_MEMBER: "#9a9a9a"},  # neutral: no backend's colour
        col="privacy",
        col_order=_privacy_order(scores),
        col_wrap=_wrap(scores),
        stat="density",
        common_norm=False,
        element="step",
        bins=30,
        height=2.8,
        aspect=1.15,
        facet_kws={"sharey": False, "sharex": False},
    )
    grid.set_titles("{col_name}")
    grid.set_axis_labels("cross-entropy loss of the final model", "density")
    grid.legend.set_title("")
    grid.figure.suptitle(accounting_text(scores), y=1.03, fontsize="small")
    return grid.figure


def membership_roc(roc: pd.DataFrame) -> plt.Figure:
    """ROC of the loss-threshold membership attack, one panel per backend, a curve per run
    (level, and seed when there are several)."""
    _require(roc, ["fpr", "tpr", "backend", "privacy", "seed", "auc", "tpr_at_fpr"], "ROC table")
    table = _with_backend_labels(roc)
    seeds = table["seed"].nunique() > 1
    table["curve"] = [
        f"{p}{f' (seed {k})' if seeds else ''}: AUC {a:.3f}, TPR {t:.3f} @1% FPR"
        for p, k, a, t in zip(
            table["privacy"], table["seed"], table["auc"], table["tpr_at_fpr"], strict=True
        )
    ]
    backends = style.backend_order(table["backend"])
    fig, axes = plt.subplots(
        1, len(backends), figsize=(3.8 * len(backends), 3.8), squeeze=False, sharey=True
    )
    order = _privacy_order(table)
    shades = style.level_colors(zip(table["level"], table["privacy"], strict=True))
    for ax, backend in zip(axes[0], backends, strict=True):
        rows = table[table["backend"] == backend].copy()
        rows["rank"] = rows["privacy"].map(order.index)
        rows = rows.sort_values(["rank", "seed", "fpr", "tpr"], kind="stable")
        for (curve, privacy), points in rows.groupby(["curve", "privacy"], sort=False):
            ax.plot(
                points["fpr"],
                points["tpr"],
                drawstyle="steps-post",
                color=shades[privacy],
                label=curve,
            )
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_title(backend, color=style.color(backend))
        ax.set_xlabel("false-positive rate (holdout flagged as member)")
        ax.legend(loc="lower right", fontsize="x-small")
    axes[0][0].set_ylabel("true-positive rate (train flagged as member)")
    fig.suptitle(accounting_text(table), fontsize="small", y=1.0, va="bottom")
    fig.tight_layout()
    return fig


def epsilon_audit(summary: pd.DataFrame) -> plt.Figure:
    """Empirical epsilon lower bound of the membership attack against the accounted epsilon.

    A point above the diagonal would contradict the accountant (the evaluate step fails then);
    dotted lines mark what the same attack shows on the non-private runs.
    """
    _require(summary, ["backend", "level", "epsilon", "membership_eps_lower_bound"], "summary")
    table = _with_backend_labels(summary)
    backends = style.backend_order(table["backend"])
    colors = style.palette(backends)
    private = table[table["level"] != "none"].dropna(subset=["epsilon"])
    fig, ax = plt.subplots(figsize=(5.0, 3.8))
    sns.scatterplot(
        data=private,
        x="epsilon",
        y="membership_eps_lower_bound",
        hue="backend",
        hue_order=backends,
        palette=colors,
        style="split",
        s=50,
        ax=ax,
    )
    top = float(np.nanmax(private["epsilon"])) if len(private) else 1.0
    ax.plot([0, top * 1.1], [0, top * 1.1], color="black", linewidth=0.8, label="bound = ε")
    nonprivate = table[table["level"] == "none"]
    for backend, bound in nonprivate.groupby("backend")["membership_eps_lower_bound"].max().items():
        if np.isfinite(bound):
            ax.axhline(bound, color=colors[backend], linestyle=":", linewidth=1)
    ax.set_xlabel("accounted ε (" + accounting_text(table) + ")")
    ax.set_ylabel("empirical ε lower bound (threshold attacks)")
    unbounded = int(private["membership_eps_lower_bound"].isna().sum())
    if unbounded:  # too few members/non-members for an interval: said, not silently dropped
        ax.text(
            0.02,
            0.98,
            f"{unbounded} private run(s) without a bound (too few examples)",
            transform=ax.transAxes,
            va="top",
            fontsize="x-small",
        )
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize="small")
    fig.tight_layout()
    return fig


def confusion_matrix(counts: pd.DataFrame, title: str = "") -> plt.Figure:
    """Test-set confusion: colour = share of the true class, numbers = counts."""
    if counts.empty:
        raise PlotDataError("confusion matrix: no classes")
    share = counts.div(counts.sum(axis=1).replace(0, np.nan), axis=0)
    n = len(counts)
    fig, ax = plt.subplots(figsize=(1.2 + 0.42 * n, 0.9 + 0.4 * n))
    sns.heatmap(
        share,
        annot=counts.to_numpy(),
        fmt="d",
        cmap="Blues",
        vmin=0,
        vmax=1,
        square=True,
        cbar_kws={"label": "share of the true class"},
        annot_kws={"fontsize": "x-small"},
        ax=ax,
    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize="small")
    fig.tight_layout()
    return fig
