"""Split profiles: exact class counts, disjoint and deterministic draws, a shared test set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dpscale.data import DataError
from dpscale.data.rules import public_split_args, split_args
from dpscale.data.split import build, holdout_counts, main, make_split, train_counts

# Hand-computed: floor(100 * rho^(-r/9)) for r = 0..9.
EXP_100 = {
    1: [100] * 10,
    10: [100, 77, 59, 46, 35, 27, 21, 16, 12, 10],
    100: [100, 59, 35, 21, 12, 7, 4, 2, 1, 1],
}
STEP_100 = {1: [100] * 10, 10: [100] * 5 + [10] * 5, 100: [100] * 5 + [1] * 5}


@pytest.mark.parametrize("rho", [1, 10, 100])
def test_exact_train_counts(rho):
    assert train_counts("exp", 100, 10, rho) == EXP_100[rho]
    assert train_counts("step", 100, 10, rho) == STEP_100[rho]
    assert train_counts("balanced", 100, 10, rho) == [100] * 10


def test_edge_counts():
    assert train_counts("step", 100, 5, 10) == [100, 100, 100, 10, 10]  # ceil(5/2) head classes
    assert train_counts("exp", 10, 3, 100) == [10, 1, 1]  # never below one
    assert train_counts("exp", 110, 10, 10) == [110, 85, 65, 51, 39, 30, 23, 18, 14, 11]
    with pytest.raises(DataError, match="kind: 'zipf'; expected one of balanced, exp, step"):
        train_counts("zipf", 10, 3, 2)
    with pytest.raises(DataError, match=r"rho: 0.5; expected rho >= 1"):
        train_counts("exp", 10, 3, 0.5)


def test_holdout_scales_with_train_and_rounds_half_up():
    assert holdout_counts([100, 50, 15, 5, 1], 30, 100) == [30, 15, 5, 2, 0]
    assert holdout_counts([110, 11], 30, 110) == [30, 3]
    assert holdout_counts([100, 10], 0, 100) == [0, 0]


def _labels(per_class=(80, 70, 90, 75), seed=1):
    """Shuffled dataset labels with the given class sizes."""
    labels = np.repeat(np.arange(len(per_class)), per_class)
    return np.random.default_rng(seed).permutation(labels)


def _build(labels, kind="balanced", rho=1, seed=0, classes=4, n_max=40, hold=10, test=12):
    manifest = {"classes": ["a", "b", "c", "d"], "source": "t", "resolution": 8, "sha256": {}}
    return build(labels, manifest, kind, kind, rho, seed, classes, n_max, hold, test)


@pytest.mark.parametrize("kind,rho", [("balanced", 1), ("exp", 10), ("step", 100)])
def test_counts_disjoint_and_deterministic(kind, rho):
    labels = _labels()
    s = _build(labels, kind, rho)
    train, hold = (
        train_counts(kind, 40, 4, rho),
        holdout_counts(train_counts(kind, 40, 4, rho), 10, 40),
    )
    assert s["train_counts"].tolist() == train and s["holdout_counts"].tolist() == hold
    assert s["test_counts"].tolist() == [12] * 4
    for part, want in (("train", train), ("holdout", hold), ("test", [12] * 4)):
        assert s[part].dtype == np.int64
        assert np.bincount(labels[s[part]], minlength=4).tolist() == want
        assert len(np.unique(s[part])) == len(s[part])
    everything = np.concatenate([s["train"], s["holdout"], s["test"]])
    assert len(np.unique(everything)) == len(everything)  # disjoint
    again = _build(labels, kind, rho)
    for k in ("train", "holdout", "test"):
        assert (again[k] == s[k]).all()
    other = _build(labels, kind, rho, seed=1)
    assert not np.array_equal(other["train"], s["train"])


def test_test_set_is_shared_and_longtail_train_is_a_subset():
    labels = _labels()
    balanced, exp, step = (
        _build(labels, k, r) for k, r in [("balanced", 1), ("exp", 10), ("step", 4)]
    )
    assert np.array_equal(balanced["test"], exp["test"]) and np.array_equal(
        exp["test"], step["test"]
    )
    assert set(exp["train"]) <= set(balanced["train"]) and set(step["train"]) <= set(
        balanced["train"]
    )
    # Choosing other classes does not move a class's draws.
    only_c = _build(labels, classes=["c", "a"])
    in_c = labels[balanced["test"]] == 2
    assert set(balanced["test"][in_c]) <= set(only_c["test"])


def test_class_list_sets_rank_order():
    labels = _labels()
    s = _build(labels, "exp", 10, classes=["c", "a"])
    assert s["classes"].tolist() == [2, 0]
    assert s["train_counts"].tolist() == [40, 4]  # c is the head class
    assert np.bincount(labels[s["train"]], minlength=4).tolist() == [4, 0, 40, 0]
    meta = json.loads(str(s["meta"]))
    assert meta["class_names"] == ["c", "a"] and meta["kind"] == "exp" and meta["rho"] == 10


def test_errors_name_the_class_and_the_counts():
    labels = _labels((80, 30, 90, 75))
    with pytest.raises(DataError, match=r"class 'b' has 30 images; the split needs 62 "
                       r"\(40 train \+ 10 holdout \+ 12 test\)"):  # fmt: skip
        _build(labels)
    with pytest.raises(DataError, match=r"splits.classes: unknown class 'zebra'"):
        _build(labels, classes=["a", "zebra"])
    with pytest.raises(DataError, match=r"splits.classes: 7; expected at most the 4 classes"):
        _build(labels, classes=7)
    assert len(make_split(labels, [0], [40], [10], 12, 0)["train"]) == 40


def test_public_split_takes_the_classes_the_private_ones_leave(tmp_path):
    labels = _labels()
    manifest = {"classes": ["a", "b", "c", "d"], "source": "t", "resolution": 8, "sha256": {}}
    splits = {"seed": 0, "classes": ["c", "a"], "test_per_class": 12}
    args = public_split_args(splits, {"public_classes": 2, "public_per_class": 30}, None, None, "o")
    kwargs = {k: v for k, v in args.items() if k not in ("labels", "manifest", "out")}
    public = build(labels, manifest, **kwargs)
    private = _build(labels, classes=["c", "a"])
    assert public["classes"].tolist() == [1, 3]  # b and d, in dataset order
    assert not set(labels[public["train"]]) & set(labels[private["train"]])
    assert public["train_counts"].tolist() == [30, 30] and len(public["holdout"]) == 0
    with pytest.raises(DataError, match=r"transfer.public_classes: 3; expected at most the 2"):
        build(labels, manifest, **{**kwargs, "public": 3})


def test_cli_writes_the_documented_npz(tmp_path, umask022):
    labels = _labels()
    np.save(tmp_path / "labels.npy", labels)
    manifest = {"classes": ["a", "b", "c", "d"], "counts": [80, 70, 90, 75], "source": "t"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    splits = {
        "seed": 3, "classes": 3, "train_per_class": 30, "holdout_per_class": 6,
        "test_per_class": 10, "profiles": {"lt": {"kind": "exp", "rho": 10}},
    }  # fmt: skip
    args = split_args(splits, "lt", tmp_path / "labels.npy", tmp_path / "manifest.json", "x")
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in args.items() if k != "out"]
    main([*argv, "--out", str(tmp_path / "splits" / "lt.npz")])
    assert (tmp_path / "splits" / "lt.npz").stat().st_mode & 0o777 == 0o644
    with np.load(tmp_path / "splits" / "lt.npz") as z:
        assert sorted(z.files) == sorted(
            ["train", "holdout", "test", "classes", "train_counts", "holdout_counts",
             "test_counts", "meta"]
        )  # fmt: skip
        assert z["classes"].tolist() == [0, 1, 2]
        assert z["train_counts"].tolist() == [30, 9, 3]
        assert z["holdout_counts"].tolist() == [6, 2, 1]
        meta = json.loads(str(z["meta"]))
        assert (
            meta["seed"] == 3 and meta["profile"] == "lt" and meta["class_names"] == ["a", "b", "c"]
        )
    assert [p.name for p in (tmp_path / "splits").iterdir()] == ["lt.npz"]  # no temp file left
