"""The figures' one visual language: a fixed colour and marker per backend, one order and one
sequential palette for privacy levels, short axis labels.

A backend's colour depends on its name only, never on which other backends a figure shows, so
reference is the same blue in every figure of every report. Backends added to the project after
the six below (an adapter module in dpscale.backends) take the next colours in name order.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import matplotlib as mpl

from dpscale import backends as _backends
from dpscale import levels

#: The fixed backend order of legends, axes and panels.
BACKENDS = ("reference", "opacus", "tfprivacy", "objax", "jax", "jaxprivacy")
#: tab10 without its grey (grey marks non-private references), then tab20b's dark shades.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
)
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "h", "p", "<", ">", "d", "8")
#: Non-private runs: a neutral dark grey, outside the private levels' sequential palette.
NONPRIVATE = "#3a3a3a"
#: Private levels, weakest privacy (largest epsilon) darkest: a sequential colormap's range.
LEVEL_CMAP = "viridis"
LEVEL_RANGE = (0.85, 0.2)


def _registry() -> tuple[str, ...]:
    extra = [b for b in _backends.available() if b not in BACKENDS]
    return BACKENDS + tuple(sorted(extra))


def base(label: str) -> str:
    """The backend of a label: 'opacus (hooks)' -> 'opacus'."""
    return str(label).split(" (", 1)[0]


def _index(label: str) -> int:
    name, known = base(label), _registry()
    if name in known:
        return known.index(name)
    # Not a backend of this project (an outside table): a slot from its name, so the colour is
    # still the same in every figure.
    free = len(PALETTE) - len(known)
    return len(known) + zlib.crc32(name.encode()) % max(free, 1)


def color(label: str) -> str:
    """The backend's colour (a label's mode does not change it)."""
    return PALETTE[_index(label) % len(PALETTE)]


def marker(label: str) -> str:
    return MARKERS[_index(label) % len(MARKERS)]


def backend_order(labels: Iterable[str]) -> list[str]:
    """The distinct labels in the fixed backend order (modes of one backend by name)."""
    return sorted(set(map(str, labels)), key=lambda b: (_index(b), b))


def palette(labels: Iterable[str]) -> dict[str, str]:
    """label -> colour, for seaborn's `palette=`."""
    return {b: color(b) for b in backend_order(labels)}


def level_colors(pairs: Iterable[tuple[str, str]]) -> dict[str, tuple]:
    """Display label -> colour for (level, label) pairs: non-private grey, the private levels
    along one sequential palette in the one level order (dpscale.levels). Labels of one level
    (variants) share its colour."""
    pairs = list(pairs)
    private = levels.ordered({lv for lv, _ in pairs if lv != "none"}) if pairs else []
    cmap = mpl.colormaps[LEVEL_CMAP]
    lo, hi = LEVEL_RANGE
    shade = {
        lv: cmap(lo + (hi - lo) * (i / max(len(private) - 1, 1) if len(private) > 1 else 0.5))
        for i, lv in enumerate(private)
    }
    return {label: NONPRIVATE if lv == "none" else shade[lv] for lv, label in pairs}


def axis_labels(labels: Iterable[str]) -> dict[str, str]:
    """Tick text per backend label: the bare backend name when that is unambiguous (the mode
    goes in the caption), else the mode on a second line."""
    labels = list(dict.fromkeys(map(str, labels)))
    bases = [base(b) for b in labels]
    return {b: base(b) if bases.count(base(b)) == 1 else b.replace(" (", "\n(", 1) for b in labels}


def _crowded(ax, renderer) -> bool:
    boxes = [
        t.get_window_extent(renderer)
        for t in ax.get_xticklabels()
        if t.get_visible() and t.get_text()
    ]
    return any(a.overlaps(b) for a, b in zip(boxes, boxes[1:], strict=False))


def unclutter(fig) -> None:
    """Turn the x tick labels of a panel whose labels touch: 30°, and upright if that is not
    enough (decided on the drawn figure, so the same data always turns the same way)."""
    for angle, align in ((30, "right"), (90, "center")):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        crowded = [ax for ax in fig.axes if _crowded(ax, renderer)]
        if not crowded:
            return
        for ax in crowded:
            ax.tick_params(axis="x", labelrotation=angle)
            for t in ax.get_xticklabels():
                t.set_horizontalalignment(align)
