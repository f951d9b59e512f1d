"""Hostile data (issue 17): every input file is kept, skipped or listed unused, with a reason of
one line; odd layouts are errors naming the path and what was expected. Real generated files."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest

from dpscale.data import DataError
from dpscale.data import prepare as prep
from dpscale.data.sources import find_class_root, index_ilsvrc_val, index_source
from tests import datagen

# name -> (bytes, fate): fate is "kept", "skipped: <reason part>" or "unused: <reason part>".
HOSTILE = {
    "cmyk.JPEG": (lambda: datagen.image_bytes("JPEG", 1, mode="CMYK"), "kept"),
    "grey.JPEG": (lambda: datagen.image_bytes("JPEG", 2, mode="L"), "kept"),
    "png_named.JPEG": (lambda: datagen.image_bytes("PNG", 3), "kept"),
    "tiny.JPEG": (lambda: datagen.image_bytes("JPEG", 4, size=(1, 1)), "kept"),
    "long.JPEG": (lambda: datagen.image_bytes("JPEG", 5, size=(300, 3)), "kept"),
    "photo.jfif": (lambda: datagen.image_bytes("JPEG", 6), "kept"),
    "no_extension": (lambda: datagen.image_bytes("JPEG", 7), "kept"),
    "cut.JPEG": (lambda: datagen.image_bytes("JPEG", 8, size=(300, 200))[:900], "skipped: "),
    "empty.JPEG": (lambda: b"", "skipped: empty file"),
    "empty_no_ext": (lambda: b"", "unused: empty file"),
    "notes.txt": (lambda: b"not a picture", "unused: not an image"),
}


def _expect(kind: str) -> dict[str, str]:
    return {n: f[len(kind) + 2 :] for n, (_, f) in HOSTILE.items() if f.startswith(kind)}


def _prepare(index, out, threads=1):
    return prep.prepare(index, 8, out, threads=threads, log=lambda *_: None)


def _check_accounting(manifest, n_inputs, prefix):
    """input files = kept + skipped + unused, every reason one line."""
    kept = sum(manifest["counts"])
    assert kept + manifest["n_skipped"] + manifest["n_unused"] == n_inputs
    for entry in manifest["skipped"] + manifest["unused"]:
        assert entry["reason"] and "\n" not in entry["reason"]
    skipped = {e["item"].removeprefix(prefix): e["reason"] for e in manifest["skipped"]}
    unused = {e["item"].removeprefix(prefix): e["reason"] for e in manifest["unused"]}
    return skipped, unused


def test_hostile_image_folder(tmp_path):
    root = tmp_path / "imgs"
    datagen.make_imagefolder(root, {"a": 3, "b": 2})
    for name, (make, _) in HOSTILE.items():
        (root / "hostile" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "hostile" / name).write_bytes(make())
    (root / "hostile" / ".DS_Store").write_bytes(b"\0\1")
    (root / "README.md").write_text("beside the classes")
    # A class folder that is a symbolic link, and a linked sub-folder inside a class.
    elsewhere = datagen.make_imagefolder(tmp_path / "elsewhere", {"c": 2, "d": 1})
    (root / "c").symlink_to(elsewhere / "c", target_is_directory=True)
    (root / "a" / "more").symlink_to(elsewhere / "d", target_is_directory=True)
    n_inputs = 3 + 2 + len(HOSTILE) + 1 + 1 + 2 + 1

    index = index_source("imagefolder", root)
    assert index.classes == ["a", "b", "c", "hostile"] and index.counts[:3] == [4, 2, 2]
    manifest = _prepare(index, tmp_path / "out")
    skipped, unused = _check_accounting(manifest, n_inputs, "hostile/")
    kept = set(_expect("kept"))
    assert manifest["counts"] == [4, 2, 2, len(kept)]
    assert set(skipped) == set(_expect("skipped"))
    assert skipped["empty.JPEG"] == "OSError: empty file"
    assert "truncated" in skipped["cut.JPEG"] or "broken" in skipped["cut.JPEG"]
    assert unused["empty_no_ext"] == "empty file" and unused["notes.txt"].startswith("not an im")
    assert unused[".DS_Store"] == "hidden file" and unused["README.md"] == "not in a class folder"
    labels = np.load(tmp_path / "out" / "labels.npy")
    assert np.bincount(labels).tolist() == manifest["counts"]
    assert "more/d_0.JPEG" in index.keys[0][-1]  # the linked sub-folder's image is kept


def _hostile_synset() -> bytes:
    entries = {name: make() for name, (make, _) in HOSTILE.items()}
    entries["link.JPEG"] = ("symlink", "cmyk.JPEG")
    entries["hard.JPEG"] = ("hardlink", "grey.JPEG")
    return datagen.tar_bytes(entries)


def _good_synset(label: int, n: int) -> bytes:
    return datagen.tar_bytes(
        {f"n{label}_{i}.JPEG": datagen.jpeg_bytes(10 * label + i, label=label) for i in range(n)}
    )


def test_hostile_ilsvrc_train_tar(tmp_path):
    synsets = {"n01": _good_synset(1, 3), "n02": _hostile_synset(), "n03": datagen.tar_bytes({})}
    tar = datagen.make_ilsvrc_tar_of(tmp_path / "il", synsets, {"README": b"hello"})
    index = index_source("ilsvrc2012", tar.parent, classes=["n01", "n02"])
    assert index.notes == {"outer_members": 4, "synsets_found": 3}
    manifest = _prepare(index, tmp_path / "out", threads=2)
    n_inputs = 3 + len(HOSTILE) + 2 + 1  # + the two link members + the outer README
    skipped, unused = _check_accounting(manifest, n_inputs, "n02.tar/")
    assert manifest["counts"] == [3, len(_expect("kept"))]
    assert set(skipped) == set(_expect("skipped"))
    assert skipped["empty.JPEG"] == "OSError: empty file"
    assert unused["README"] == "not a synset tar"
    assert unused["link.JPEG"].startswith("symbolic link") and unused["hard.JPEG"].startswith(
        "hard"
    )
    assert unused["empty_no_ext"] == "empty file"
    assert manifest["index"] == {"outer_members": 4, "synsets_found": 3}
    with pytest.raises(DataError, match=r"class 'n03' in .* has no images"):
        index_source("ilsvrc2012", tar.parent, classes=["n01", "n03"])


def _cut(tar, keep: int):
    data = tar.read_bytes()
    tar.write_bytes(data[:keep])


def test_a_partial_download_is_an_error_for_a_listed_synset(tmp_path):
    synsets = {f"n0{i}": _good_synset(i, 2) for i in range(1, 5)}
    tar = datagen.make_ilsvrc_tar_of(tmp_path / "il", synsets)
    with tarfile.open(tar) as tf:
        offsets = {m.name.removesuffix(".tar"): m for m in tf}
    # Cut cleanly before n04's header: the tar still reads, with 3 synsets.
    _cut(tar, offsets["n04"].offset)
    with pytest.raises(DataError) as err:
        index_source("ilsvrc2012", tar.parent, classes=["n01", "n04"])
    assert str(err.value) == (
        f"dataset.classes: synset 'n04' is not in {tar} (3 synsets found: a partial download?); "
        "expected the complete training tar"
    )
    logged = []
    index = index_source("ilsvrc2012", tar.parent, log=logged.append)
    assert index.classes == ["n01", "n02", "n03"] and index.notes["synsets_found"] == 3
    assert logged == [f"index: {tar}: 3 synsets found (0 other members)"]
    # Cut inside n03's data: that synset is cut short.
    _cut(tar, offsets["n03"].offset_data + 700)
    with pytest.raises(DataError, match=r"n03.tar is cut short \(700 of \d+ bytes\)"):
        index_source("ilsvrc2012", tar.parent, classes=["n01", "n03"])
    # The synsets before the cut are complete and usable.
    assert index_source("ilsvrc2012", tar.parent, classes=["n01", "n02"]).counts == [2, 2]


def test_a_corrupt_inner_synset_tar_names_the_synset(tmp_path):
    synsets = {"n01": _good_synset(1, 2), "n02": os.urandom(3000)}
    tar = datagen.make_ilsvrc_tar_of(tmp_path / "il", synsets)
    with pytest.raises(DataError) as err:
        index_source("ilsvrc2012", tar.parent)
    assert str(err.value).startswith(f"{tar}: n02.tar: synset n02 is not a readable tar (")
    assert "\n" not in str(err.value)


def test_a_single_class_folder_is_not_descended_into(tmp_path):
    top = tmp_path / "top"
    datagen.make_imagefolder(top / "only", {"x": 2, "y": 2})  # only/x, only/y
    datagen.write_image(top / "only" / "direct.jpg")  # only/ holds images itself: a class
    with pytest.raises(DataError) as err:
        find_class_root(top)
    assert str(err.value) == (
        f"dataset.path: {top} holds one class folder (only); expected >= 2 class folders"
    )
    wrapper = tmp_path / "wrapper"  # a wrapping folder without images is still descended
    datagen.make_imagefolder(wrapper / "dataset", {"x": 1, "y": 1})
    assert find_class_root(wrapper) == wrapper / "dataset"


@pytest.mark.parametrize(
    "case",
    ["npy", "object", "float labels", "no images"],
)
def test_medmnist_inputs_that_used_to_crash_or_truncate(tmp_path, case):
    images = np.zeros((2, 28, 28), np.uint8)
    path = tmp_path / "m.npz"
    if case == "npy":
        path = tmp_path / "m.npy"
        np.save(path, images)
        expected = "holds one array (.npy); expected a MedMNIST .npz"
    elif case == "object":
        np.savez(path, train_images=np.array([images[0], None], dtype=object),
                 train_labels=np.zeros((2, 1), np.int64))  # fmt: skip
        expected = "cannot be read without pickle"
    elif case == "float labels":
        np.savez(path, train_images=images, train_labels=np.array([[0.0], [1.7]]))
        expected = "train_labels is float64; expected integer class labels"
    else:
        np.savez(path, train_images=images[:0], train_labels=np.zeros((0, 1), np.int64))
        expected = "has no images in part(s) train; expected at least one image"
    with pytest.raises(DataError) as err:
        index_source("medmnist", path, medmnist_split="train")
    assert expected in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_parallel_prepare_after_a_serial_one_in_the_same_process(tmp_path):
    synsets = {f"n0{i}": _good_synset(i, 6) for i in range(1, 4)}
    tar = datagen.make_ilsvrc_tar_of(tmp_path / "il", synsets)
    index = index_source("ilsvrc2012", tar.parent)
    serial = _prepare(index, tmp_path / "one", threads=1)
    parallel = _prepare(index, tmp_path / "two", threads=2)
    assert serial["n_skipped"] == parallel["n_skipped"] == 0
    assert serial["sha256"] == parallel["sha256"]
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["counts"] == [6, 6, 6]


def test_hostile_val_tar(tmp_path):
    folder = tmp_path / "il"
    datagen.make_ilsvrc_tar_of(folder, {"n01": _good_synset(1, 2), "n02": _good_synset(2, 2)})
    val = {
        "ILSVRC2012_val_00000001.JPEG": datagen.image_bytes("JPEG", 1, mode="CMYK"),
        "ILSVRC2012_val_00000002.JPEG": datagen.image_bytes("PNG", 2),  # PNG named JPEG
        "ILSVRC2012_val_00000003.JPEG": datagen.image_bytes("JPEG", 3, size=(300, 200))[:900],
        "ILSVRC2012_val_00000004.JPEG": b"",
        "ILSVRC2012_val_00000005.JPEG": datagen.image_bytes("JPEG", 5, mode="L"),
        "ILSVRC2012_val_00000006.JPEG": datagen.image_bytes("JPEG", 6),  # no label
        "ILSVRC2012_val_00000007.JPEG": ("symlink", "ILSVRC2012_val_00000001.JPEG"),
    }
    (folder / "ILSVRC2012_img_val.tar").write_bytes(datagen.tar_bytes(val))
    labels = ["n01", "n02", "n01", "n02", "n02"]
    rows = [f"ILSVRC2012_val_{n:08d},{s} 0 0 9 9" for n, s in enumerate(labels, start=1)]
    (folder / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows))
    index = index_source("ilsvrc2012", folder)
    manifest = prep.prepare(
        index,
        8,
        tmp_path / "out",
        log=lambda *_: None,
        val=index_ilsvrc_val(folder, ["n01", "n02"]),
    )
    assert manifest["val_counts"] == [1, 2]  # n01: 1 kept, 3 cut; n02: 2 and 5 kept, 4 empty
    val_skipped = {e["item"]: e["reason"] for e in manifest["skipped"]}
    assert val_skipped["val/ILSVRC2012_val_00000004.JPEG"] == "OSError: empty file"
    assert "val/ILSVRC2012_val_00000003.JPEG" in val_skipped
    unused = {e["item"]: e["reason"] for e in manifest["unused"]}
    assert unused["ILSVRC2012_val_00000006.JPEG"] == "no label in LOC_val_solution.csv"
    assert unused["ILSVRC2012_val_00000007.JPEG"].startswith("symbolic link member")
    assert sum(manifest["val_counts"]) + len(val_skipped) + len(unused) == len(val)
    assert all("\n" not in r for r in [*val_skipped.values(), *unused.values()])
    labels_npy = np.load(tmp_path / "out" / "labels.npy")
    assert labels_npy[manifest["parts"]["val"][0] :].tolist() == [0, 1, 1]
