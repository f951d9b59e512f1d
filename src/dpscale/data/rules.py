"""What the data rules (workflow/rules/data.smk) pass to their steps: config -> inputs/kwargs.

Kept here, not in the .smk file, so the rule file holds only rules (Snakemake's linter) and
this mapping is importable and testable without Snakemake.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dpscale.data.fetch import EXTRACTED
from dpscale.data.sources import (
    ILSVRC_DEVKIT,
    ILSVRC_LOC_CSV,
    ILSVRC_TRAIN_TAR,
    ILSVRC_VAL_TAR,
    walk,
)


def prepare_inputs(dataset: dict, raw_dir: str) -> dict[str, str]:
    """What prepare reads, so Snakemake orders fetch first and reruns when the data changes."""
    source, path = dataset["source"], dataset.get("path")
    if source == "url":
        return {"raw": raw_dir}
    if source == "ilsvrc2012" and path and Path(path).is_dir():
        inputs = {"raw": str(Path(path) / ILSVRC_TRAIN_TAR)}
        if dataset.get("val"):
            inputs["val"] = str(Path(path) / ILSVRC_VAL_TAR)
            labels = [Path(path) / n for n in (ILSVRC_DEVKIT, ILSVRC_LOC_CSV)]
            inputs["val_labels"] = str(next((p for p in labels if p.is_file()), labels[0]))
        return inputs
    return {"raw": str(path)} if path else {}


def prepare_params(dataset: dict) -> dict:
    """The prepare rule's params (Snakemake reruns prepare when they change): the dataset
    settings, val only when set and an image folder's listing fingerprint, so that data
    prepared before those keys existed is not redone for nothing."""
    params = {k: v for k, v in dataset.items() if k != "name" and not (k == "val" and not v)}
    listing = listing_fingerprint(dataset)
    return params if listing is None else {**params, "listing": listing}


def listing_fingerprint(dataset: dict) -> str | None:
    """For an image folder: a sha256 of every file's path, size and mtime under it (links
    followed, hidden folders by name), so prepare reruns when any file in any sub-folder
    changes (a params rerun trigger), not only when the top folder does. None for other
    sources (their inputs are files, or fetch's output)."""
    path = dataset.get("path")
    if dataset["source"] != "imagefolder" or not path or not Path(path).is_dir():
        return None
    digest = hashlib.sha256()
    for dirpath, files, hidden in walk(Path(path)):  # hidden folders: their names only
        for full in [os.path.join(dirpath, f) for f in files] + [d for d, _ in hidden]:
            try:
                st = os.stat(full)
            except OSError:  # a broken link: its own stat
                st = os.lstat(full)
            rel = os.path.relpath(full, path)
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


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
        val=bool(dataset.get("val")),
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
        test=splits.get("test", "from_train"),
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
        test=splits.get("test", "from_train"),
        out=out,
    )
