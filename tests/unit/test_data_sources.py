"""Indexing each source on generated data: class names, item order, selection, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dpscale.data import DataError, images
from dpscale.data.images import TarMember
from dpscale.data.sources import find_class_root, index_source, select_classes
from tests import datagen

COUNTS = {"n002": 4, "n001": 6, "n003": 5}


def test_digits_is_offline_grey_uint8_with_names_0_to_9():
    index = index_source("digits")
    assert index.classes == [str(d) for d in range(10)]
    assert sum(index.counts) == 1797 and min(index.counts) == 174
    item = index.items[3][0]
    assert item.dtype == np.uint8 and item.shape == (8, 8)
    assert max(int(x.max()) for x in index.items[3]) == 255  # 0..16 scaled to 0..255
    small = index_source("digits", classes=["7", "2"], max_per_class=5)
    assert small.classes == ["2", "7"] and small.counts == [5, 5]  # canonical order kept


def test_imagefolder_sorted_classes_recursive_images_ignores_other_files(tmp_path):
    root = datagen.make_imagefolder(tmp_path / "imgs", COUNTS)
    datagen.write_image(root / "n001" / "deeper" / "extra.png")
    (root / "n001" / "notes.txt").write_text("not an image")
    datagen.write_image(root / "n001" / ".hidden.jpg")
    index = index_source("imagefolder", root)
    assert index.classes == ["n001", "n002", "n003"]
    assert index.counts == [7, 4, 5]
    assert "deeper/extra.png" in "|".join(index.keys[0])
    assert all(isinstance(p, str) and os.path.isfile(p) for p in index.items[0])


def test_max_per_class_is_deterministic_and_per_class(tmp_path):
    root = datagen.make_imagefolder(tmp_path / "imgs", COUNTS)
    a = index_source("imagefolder", root, max_per_class=3)
    b = index_source("imagefolder", root, max_per_class=3)
    only = index_source("imagefolder", root, classes=["n003"], max_per_class=3)
    assert a.counts == [3, 3, 3] and a.keys == b.keys
    assert only.keys[0] == a.keys[2]  # a class's picks don't depend on the other classes
    full = index_source("imagefolder", root)
    assert set(a.keys[0]) < set(full.keys[0])
    assert index_source("imagefolder", root, max_per_class=5).counts == [5, 4, 5]


def test_class_selection_count_list_and_errors():
    names = ["a", "b", "c", "d"]
    assert select_classes(names, None) == names
    assert select_classes(names, 2) == ["a", "b"]
    assert select_classes(names, ["d", "b"]) == ["b", "d"]
    assert select_classes(names, "c") == ["c"]  # one name from the command line
    with pytest.raises(DataError, match=r"dataset.classes: 5 classes asked for; expected at most"):
        select_classes(names, 5)
    with pytest.raises(DataError, match=r"dataset.classes: unknown class 'z'"):
        select_classes(names, ["a", "z"])


def test_empty_class_and_missing_path_are_one_line_errors(tmp_path):
    root = datagen.make_imagefolder(tmp_path / "imgs", {"a": 2, "b": 2})
    (root / "c").mkdir()
    (root / "c" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class 'c' in .* has no images") as err:
        index_source("imagefolder", root)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"dataset.path: '.*nowhere' does not exist"):
        index_source("imagefolder", tmp_path / "nowhere")
    with pytest.raises(DataError, match="dataset.path: missing"):
        index_source("medmnist", None)


def test_class_root_is_found_in_imagenette_and_tiny_imagenet_layouts(tmp_path):
    nette = tmp_path / "imagenette2-160"
    datagen.make_imagefolder(nette / "train", {"n01": 2, "n02": 2})
    datagen.make_imagefolder(nette / "val", {"n01": 1, "n02": 1})
    assert find_class_root(tmp_path) == nette / "train"
    tiny = tmp_path / "tiny" / "tiny-imagenet-200"
    datagen.make_imagefolder(tiny / "train", {"n01": 2, "n02": 2}, subdir="images")
    datagen.make_imagefolder(tiny / "val", {"images": 3})  # flat val folder
    assert find_class_root(tmp_path / "tiny") == tiny / "train"
    index = index_source("imagefolder", tmp_path / "tiny")
    assert index.classes == ["n01", "n02"] and index.counts == [2, 2]
    (tmp_path / "flat").mkdir()
    datagen.write_image(tmp_path / "flat" / "one.jpg")
    with pytest.raises(DataError, match="no class folders under"):
        find_class_root(tmp_path / "flat")


def test_ilsvrc_indexes_by_offset_without_extracting(tmp_path):
    folder = tmp_path / "ilsvrc"
    tar = datagen.make_ilsvrc_train_tar(folder, COUNTS)
    before = sorted(os.listdir(folder))
    index = index_source("ilsvrc2012", folder, classes=2)
    assert sorted(os.listdir(folder)) == before == ["ILSVRC2012_img_train.tar"]
    assert index.classes == ["n001", "n002"] and index.counts == [6, 4]
    assert index.keys[0][:2] == ["n001.tar/n001_0.JPEG", "n001.tar/n001_1.JPEG"]
    member = index.items[1][3]
    assert isinstance(member, TarMember) and member.tar == str(tar)
    # The bytes at the recorded offset are the JPEG that was packed (same seed as the folder).
    assert images.read_member(member) == datagen.jpeg_bytes(1000 * 1 + 3, (40, 30), 1)
    picked = index_source("ilsvrc2012", tar, classes=["n003"], max_per_class=2)
    assert picked.classes == ["n003"] and picked.counts == [2]


def test_ilsvrc_errors(tmp_path):
    with pytest.raises(DataError, match="no ILSVRC2012_img_train.tar in"):
        index_source("ilsvrc2012", tmp_path)
    folder = datagen.make_ilsvrc_train_tar(tmp_path / "a", {"n001": 1, "n002": 1}).parent
    with pytest.raises(DataError, match="synset 'n999' is not in .* synsets found"):
        index_source("ilsvrc2012", folder, classes=["n001", "n999"])
    plain = tmp_path / "b" / "ILSVRC2012_img_train.tar"
    plain.parent.mkdir()
    datagen.make_archive(datagen.make_imagefolder(tmp_path / "c", {"x": 1}), plain, "tar")
    with pytest.raises(DataError, match="no per-synset tars inside"):
        index_source("ilsvrc2012", plain.parent)
    datagen.garbage(tmp_path / "d" / "ILSVRC2012_img_train.tar", n=2000)
    with pytest.raises(DataError, match="not a readable tar"):
        index_source("ilsvrc2012", tmp_path / "d")


@pytest.mark.parametrize("rgb", [False, True])
def test_medmnist_parts_and_channels(tmp_path, rgb):
    path = datagen.make_medmnist_npz(tmp_path / "m.npz", n=(12, 4, 6), classes=3, rgb=rgb)
    everything = index_source("medmnist", path)
    assert everything.classes == ["0", "1", "2"] and sum(everything.counts) == 22
    test = index_source("medmnist", path, medmnist_split="test")
    assert test.counts == [2, 2, 2] and test.keys[0][0].startswith("test[")
    item = test.items[0][0]
    assert item.shape == ((28, 28, 3) if rgb else (28, 28))
    with np.load(path) as z:
        first = int(np.flatnonzero(z["test_labels"][:, 0] == 0)[0])
        assert (item == z["test_images"][first]).all()


def test_medmnist_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="has no array 'train_labels'"):
        index_source("medmnist", bad, medmnist_split="train")
    multi = tmp_path / "multi.npz"
    np.savez(multi, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 14)))
    with pytest.raises(DataError, match="multi-label"):
        index_source("medmnist", multi, medmnist_split="train")
    with pytest.raises(DataError, match="cannot read"):
        index_source("medmnist", datagen.garbage(tmp_path / "x.npz"))
