"""What the data rules (workflow/rules/data.smk) pass to their steps: config -> inputs/kwargs.

Kept here, not in the .smk file, so the rule file holds only rules (Snakemake's linter) and
this mapping is importable and testable without Snakemake.
"""

from __future__ import annotations

from pathlib import Path

from dpscale.data.fetch import EXTRACTED
from dpscale.data.sources import ILSVRC_TRAIN_TAR


def prepare_inputs(dataset: dict, raw_dir: str) -> dict[str, str]:
    """What prepare reads, so Snakemake orders fetch first and reruns when the data changes."""
    source, path = dataset["source"], dataset.get("path")
    if source == "url":
        return {"raw": raw_dir}
    if source == "ilsvrc2012" and path and Path(path).is_dir():
        return {"raw": str(Path(path) / ILSVRC_TRAIN_TAR)}
    return {"raw": str(path)} if path else {}


def prepare_args(dataset: dict, input, out_dir) -> dict:
    path = dataset.get("path")
    if dataset["source"] == "url":
        path = f"{input.raw}/{EXTRACTED}"
    return dict(
        source=dataset["source"],
        path=path,
        resolution=dataset["resolution"],
        classes=dataset.get("classes"),
        max_per_class=dataset.get("max_per_class"),
        medmnist_split=dataset.get("medmnist_split", "all"),
        out_dir=out_dir,
    )


def split_args(splits: dict, profile_name: str, labels, manifest, out) -> dict:
    profile = splits["profiles"][profile_name]
    return dict(
        labels=labels,
        manifest=manifest,
        profile=profile_name,
        kind=profile["kind"],
        rho=profile.get("rho", 1),
        seed=splits["seed"],
        classes=splits["classes"],
        train_per_class=splits["train_per_class"],
        holdout_per_class=splits["holdout_per_class"],
        test_per_class=splits["test_per_class"],
        out=out,
    )


def public_split_args(splits: dict, transfer: dict, labels, manifest, out) -> dict:
    """The transfer experiment's public split: classes disjoint from the private ones, balanced,
    no holdout (it is not audited), the private splits' test size."""
    return dict(
        labels=labels,
        manifest=manifest,
        profile="public",
        kind="balanced",
        rho=1,
        seed=splits["seed"],
        classes=splits["classes"],
        public=transfer["public_classes"],
        train_per_class=transfer["public_per_class"],
        holdout_per_class=0,
        test_per_class=splits["test_per_class"],
        out=out,
    )
