"""The figure files of an experiment and the run files each figure reads (for figures.smk).

Kept out of the .smk file so that it holds only rules (Snakemake's linter asks for that).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: Figure families (the `figures:` config key and `python -m dpscale.plots --figure`).
FAMILIES = (
    "accuracy",
    "balanced_accuracy",
    "audit",
    "seconds",
    "step_ratio",
    "training",
    "disparate",
    "mia_hist",
    "mia_roc",
    "confusion",
)


@dataclass(frozen=True)
class FigureGrid:
    run: str  # run directory pattern with {split}, {backend}, {level}, {variant}, {seed}
    figures: Path  # results/<exp>/figures
    splits: Sequence[str]
    backends: Sequence[str]
    levels: Sequence[str]
    seeds: Sequence[int]
    variants: Sequence[str] = ("default",)
    families: Sequence[str] = FAMILIES  # the figures an experiment asks for

    @property
    def private(self) -> bool:
        return any(lv != "none" for lv in self.levels)

    @property
    def compares(self) -> bool:
        """DP-vs-non-private figures (step-time ratio, accuracy drop) need both kinds of run."""
        return "none" in self.levels and self.private

    def path(self, name: str, ext: str = "svg") -> str:
        return str(Path(self.figures) / f"{name}.{ext}")

    def runs(self, split=None, backend=None, level=None, variant=None) -> list[str]:
        """Run directories of the grid, narrowed to one split / backend / level / variant."""
        return [
            self.run.format(split=s, backend=b, level=lv, variant=v, seed=k)
            for s in self.splits
            if split in (None, s)
            for b in self.backends
            if backend in (None, b)
            for lv in self.levels
            if level in (None, lv)
            for v in self.variants
            if variant in (None, v)
            for k in self.seeds
        ]

    def run_files(self, name: str, **narrow) -> list[str]:
        return [f"{run}/{name}" for run in self.runs(**narrow)]

    def names(self) -> list[str]:
        s, b, lv, v = self.splits, self.backends, self.levels, self.variants
        names = {
            "accuracy": ["accuracy_vs_epsilon"],
            "balanced_accuracy": ["balanced_accuracy_vs_epsilon"],
            "seconds": ["runtime/seconds_per_epoch"],
            "training": [f"training/{x}" for x in s],
            "mia_roc": [f"membership/roc/{x}" for x in s],
            "mia_hist": [f"membership/histograms/{x}/{y}" for x in s for y in b],
            "confusion": [
                f"confusion/{x}/{y}/{z}/{w}" for x in s for y in b for z in lv for w in v
            ],
            "audit": ["membership/epsilon_audit"] if self.private else [],
            "step_ratio": ["runtime/step_time_ratio"] if self.compares else [],
            "disparate": [f"disparate_impact/{x}" for x in s] if self.compares else [],
        }
        return [name for family in FAMILIES if family in self.families for name in names[family]]

    def targets(self) -> list[str]:
        """Every figure, SVG and PNG: the report's items (summary.csv is an input of them)."""
        return [self.path(n, ext) for n in self.names() for ext in ("svg", "png")]


def run_dirs(paths) -> list[str]:
    """The run directories of a rule's input files (one file per run)."""
    return [str(Path(p).parent) for p in paths]
