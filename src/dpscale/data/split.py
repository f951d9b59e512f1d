"""`python -m dpscale.data.split`: train / holdout / test indices for one split profile.

Per selected class c with rank r = 0..K-1 (the order of `splits.classes`):
- train n_c: balanced n_max; exp floor(n_max * rho^(-r/(K-1))) (Cui et al. 2019); step n_max
  for the first ceil(K/2) classes and floor(n_max / rho) for the rest; never below 1;
- holdout (non-members for membership inference, same distribution as train):
  round(holdout_per_class * n_c / n_max), halves rounded up;
- test: test_per_class (balanced), or with `--test official` every official validation image
  of the class (ILSVRC2012 prepared with dataset.val; manifest `parts`).
Each class's images are permuted by a generator seeded with (seed, dataset label) and cut as
[test | train | holdout], so the test set is the same in every profile, a class's draws do not
depend on which other classes are selected, and a long-tailed train set is a subset of the
balanced one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from dpscale import atomic
from dpscale.data import DataError

KINDS = ("balanced", "exp", "step")
_EPS = 1e-9  # floor() of a product that is an integer in exact arithmetic must not drop by one


def train_counts(kind: str, n_max: int, k: int, rho: float = 1.0) -> list[int]:
    """Training images per class, in rank order (rank 0 = the head class)."""
    if kind not in KINDS:
        raise DataError(f"splits profile kind: {kind!r}; expected one of {', '.join(KINDS)}")
    if k < 1 or n_max < 1:
        raise DataError(f"splits: {k} classes x {n_max} per class; expected positive numbers")
    if kind != "balanced" and rho < 1:
        raise DataError(f"splits profile rho: {rho}; expected rho >= 1 (n_max / n_min)")
    if kind == "balanced" or k == 1:
        counts = [n_max] * k
    elif kind == "exp":
        counts = [math.floor(n_max * rho ** (-r / (k - 1)) + _EPS) for r in range(k)]
    else:
        head = math.ceil(k / 2)
        counts = [n_max] * head + [math.floor(n_max / rho + _EPS)] * (k - head)
    return [max(1, c) for c in counts]


def holdout_counts(train: list[int], holdout_per_class: int, n_max: int) -> list[int]:
    """Holdout per class, scaled like train: round(holdout_per_class * n_c / n_max)."""
    return [math.floor(holdout_per_class * n / n_max + 0.5) for n in train]


def select_classes(names: list[str], spec) -> list[int]:
    """Dataset labels of the selected classes, in rank order: a count or a list of names."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 1 <= spec <= len(names):
            raise DataError(
                f"splits.classes: {spec}; expected at most the {len(names)} classes of the "
                "prepared data"
            )
        return list(range(spec))
    position = {name: i for i, name in enumerate(names)}
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    labels = []
    for name in spec:
        if str(name) not in position:
            raise DataError(
                f"splits.classes: unknown class {name!r}; expected names of the prepared data's "
                f"classes ({shown})"
            )
        labels.append(position[str(name)])
    if len(set(labels)) != len(labels):
        raise DataError("splits.classes: a class is listed twice; expected distinct names")
    return labels


def public_classes(names: list[str], private: list[int], count: int) -> list[int]:
    """The first `count` classes (dataset order) that are not private: the "public" classes a
    transfer experiment pre-trains on (Places365's role in Kurakin et al. 2022)."""
    rest = [c for c in range(len(names)) if c not in set(private)]
    if count > len(rest):
        raise DataError(
            f"transfer.public_classes: {count}; expected at most the {len(rest)} classes of the "
            f"prepared data that splits.classes leaves ({len(names)} - {len(private)} private)"
        )
    return rest[:count]


def make_split(
    labels: np.ndarray,
    classes: list[int],
    train: list[int],
    holdout: list[int],
    test_per_class: int,
    seed: int,
    class_names: list[str] | None = None,
    rows: dict[str, list[int]] | None = None,
    test: str = "from_train",
) -> dict[str, np.ndarray]:
    """Disjoint sorted index arrays into `labels` for the selected classes (see module doc).

    `rows` (manifest `parts`): row ranges of the training and official validation images; only
    training rows are drawn from. test "official": the test set is every official validation
    row of the selected classes, and each class's training rows are cut as [train | holdout].
    """
    labels = np.asarray(labels)
    names = class_names or [str(c) for c in classes]
    in_train = np.zeros(len(labels), bool)
    a, b = (rows or {}).get("train", [0, len(labels)])
    in_train[a:b] = True
    in_val = np.zeros(len(labels), bool)
    if test == "official":
        if not rows or "val" not in rows:
            raise DataError(
                "splits.test: official, but the prepared data has no official validation "
                "images; expected data prepared with dataset.val: true"
            )
        in_val[rows["val"][0] : rows["val"][1]] = True
    parts = {"train": [], "holdout": [], "test": []}
    for c, name, n_train, n_hold in zip(classes, names, train, holdout, strict=True):
        pool = np.flatnonzero((labels == c) & in_train)
        n_test = 0 if test == "official" else test_per_class
        need = n_test + n_train + n_hold
        if len(pool) < need:
            raise DataError(
                f"splits: class {name!r} has {len(pool)} images; the split needs {need} "
                f"({n_train} train + {n_hold} holdout + {n_test} test)"
            )
        perm = np.random.default_rng([seed, int(c)]).permutation(pool)
        if test == "official":
            parts["test"].append(np.flatnonzero((labels == c) & in_val))
        else:
            parts["test"].append(perm[:n_test])
        parts["train"].append(perm[n_test : n_test + n_train])
        parts["holdout"].append(perm[n_test + n_train : need])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in parts.items()}


def build(
    labels: np.ndarray,
    manifest: dict,
    profile: str,
    kind: str,
    rho: float,
    seed: int,
    classes,
    train_per_class: int,
    holdout_per_class: int,
    test_per_class: int,
    public: int | None = None,
    test: str = "from_train",
) -> dict[str, np.ndarray]:
    """The arrays of one split file (format: docs/architecture.md); with `public`, a split of
    that many classes disjoint from `classes` instead."""
    names = list(manifest["classes"])
    chosen = select_classes(names, classes)
    if public:
        chosen = public_classes(names, chosen, public)
    chosen_names = [names[c] for c in chosen]
    train = train_counts(kind, train_per_class, len(chosen), rho)
    hold = holdout_counts(train, holdout_per_class, train_per_class)
    idx = make_split(
        labels, chosen, train, hold, test_per_class, seed, chosen_names, manifest.get("parts"), test
    )
    test_counts = np.asarray([int(np.sum(labels[idx["test"]] == c)) for c in chosen], np.int64)
    meta = {
        "name": profile,
        "profile": profile,
        "kind": kind,
        "rho": rho if kind != "balanced" else 1,
        "seed": seed,
        "class_names": chosen_names,
        "train_per_class": train_per_class,
        "holdout_per_class": holdout_per_class,
        "test_per_class": test_per_class,
        "test": test,
        "order": (
            "per class: permutation seeded by (seed, label), cut as [test | train | holdout]"
            if test != "official"
            else "per class: permutation of the training rows seeded by (seed, label), cut as "
            "[train | holdout]; test = the official validation rows"
        ),
        "dataset": {
            "source": manifest.get("source"),
            "resolution": manifest.get("resolution"),
            "sha256": manifest.get("sha256"),
        },
    }
    return {
        **idx,
        "classes": np.asarray(chosen, np.int64),
        "train_counts": np.asarray(train, np.int64),
        "holdout_counts": np.asarray(hold, np.int64),
        "test_counts": test_counts,
        "meta": np.asarray(json.dumps(meta)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dpscale.data.split", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--labels", required=True, help="labels.npy of the prepared data")
    parser.add_argument("--manifest", required=True, help="manifest.json of the prepared data")
    parser.add_argument("--profile", required=True, help="the profile's name (recorded in meta)")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--rho", type=float, default=1.0, help="n_max / n_min")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--classes", type=json.loads, default=10, help="a count or a JSON list of class names"
    )
    parser.add_argument(
        "--public", type=int, help="instead: this many classes disjoint from --classes"
    )
    parser.add_argument("--train-per-class", type=int, required=True, help="n_max")
    parser.add_argument("--holdout-per-class", type=int, default=0)
    parser.add_argument("--test-per-class", type=int, required=True)
    parser.add_argument(
        "--test",
        default="from_train",
        choices=["from_train", "official"],
        help="the test set: cut from the training images, or the official validation images",
    )
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--threads", type=int, default=1, help="unused (one thread is enough)")
    args = parser.parse_args(argv)
    try:
        manifest = json.loads(Path(args.manifest).read_text())
        labels = np.load(args.labels)
        arrays = build(
            labels,
            manifest,
            args.profile,
            args.kind,
            args.rho,
            args.seed,
            args.classes,
            args.train_per_class,
            args.holdout_per_class,
            args.test_per_class,
            args.public,
            args.test,
        )
        atomic.write_npz(args.out, arrays)
    except DataError as err:
        sys.exit(f"split: error: {err}")
    meta = json.loads(str(arrays["meta"]))
    print(
        f"split {args.profile}: {len(arrays['train'])} train, {len(arrays['holdout'])} holdout, "
        f"{len(arrays['test'])} test in {len(arrays['classes'])} classes "
        f"({meta['kind']}, rho {meta['rho']}, seed {args.seed}); train per class "
        f"{arrays['train_counts'].tolist()} -> {args.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
