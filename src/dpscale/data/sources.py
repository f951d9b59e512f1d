"""Index a dataset source: its class names and one decodable item per image, nothing decoded.

Every source gives classes in a canonical order (sorted folder names / synsets; label order for
array sources) and, per class, items in a fixed order, so the same config always selects the
same images. Items are file paths, `TarMember`s (random access into a tar) or uint8 arrays.
"""

from __future__ import annotations

import os
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpscale.data import DataError
from dpscale.data.images import TarMember, is_image_file

SOURCES = ("digits", "imagefolder", "ilsvrc2012", "url", "medmnist")
SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test"})
ILSVRC_TRAIN_TAR = "ILSVRC2012_img_train.tar"
MEDMNIST_PARTS = ("train", "val", "test")
SUBSAMPLE_SEED = 0  # max_per_class picks are fixed, independent of the split seed


@dataclass
class Index:
    source: str
    classes: list[str]
    items: list[list] = field(default_factory=list)  # items[c]: what images.load decodes
    keys: list[list[str]] = field(default_factory=list)  # keys[c]: names for logs/manifest
    root: str | None = None  # where the images were found

    @property
    def counts(self) -> list[int]:
        return [len(x) for x in self.items]


class _Progress:
    """Logs 'indexed k/n classes' every few seconds (listing ImageNet takes a while)."""

    def __init__(self, n: int, log, every_s: float = 5.0):
        self.n, self.log, self.every_s, self.done = n, log, every_s, 0
        self.last = time.perf_counter()

    def step(self) -> None:
        self.done += 1
        if self.log and time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            self.log(f"index: {self.done}/{self.n} classes listed")


# -- class selection ------------------------------------------------------------------------
def select_classes(names: list[str], spec, key: str = "dataset.classes") -> list[str]:
    """None = all; N = the first N in canonical order; a list = those names (canonical order)."""
    if spec is None:
        return list(names)
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 1 <= spec <= len(names):
            raise DataError(
                f"{key}: {spec} classes asked for; expected at most the {len(names)} the source "
                f"has ({shown})"
            )
        return list(names[:spec])
    wanted = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    unknown = [w for w in wanted if w not in set(names)]
    if unknown:
        raise DataError(
            f"{key}: unknown class {unknown[0]!r}; expected names of the source's classes ({shown})"
        )
    chosen = set(wanted)
    return [n for n in names if n in chosen]


def subsample(index: Index, max_per_class: int | None) -> Index:
    """Keep at most `max_per_class` items per class, chosen by seed 0 and the class name."""
    if max_per_class is None:
        return index
    items, keys = [], []
    for name, its, ks in zip(index.classes, index.items, index.keys, strict=True):
        if len(its) > max_per_class:
            # Seeded by the class name, so a class's picks don't depend on the other classes.
            rng = np.random.default_rng([SUBSAMPLE_SEED, zlib.crc32(name.encode())])
            pick = np.sort(rng.choice(len(its), size=max_per_class, replace=False))
            its, ks = [its[i] for i in pick], [ks[i] for i in pick]
        items.append(its)
        keys.append(ks)
    return Index(index.source, index.classes, items, keys, index.root)


def _check_not_empty(index: Index) -> Index:
    for name, its in zip(index.classes, index.items, strict=True):
        if not its:
            where = f" in {index.root}" if index.root else ""
            raise DataError(f"class {name!r}{where} has no images; expected at least one image")
    return index


# -- digits ---------------------------------------------------------------------------------
def index_digits(classes=None) -> Index:
    """scikit-learn's bundled 8x8 digits (offline): grey 0..16 -> uint8 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    return _index_arrays("digits", images, labels, [str(d) for d in range(10)], classes, "digits")


def _index_arrays(source, images, labels, names, classes, prefix, keys=None) -> Index:
    selected = select_classes(names, classes)
    index = Index(source, selected, root=prefix)
    for name in selected:
        where = np.flatnonzero(labels == names.index(name))
        index.items.append([images[i] for i in where])
        index.keys.append([keys[i] if keys is not None else f"{prefix}[{i}]" for i in where])
    return _check_not_empty(index)


# -- MedMNIST -------------------------------------------------------------------------------
def index_medmnist(path, part: str = "all", classes=None) -> Index:
    """A MedMNIST .npz: `<part>_images` (N,28,28) or (N,28,28,3) uint8, `<part>_labels` (N,1)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset.path: {str(path)!r} is not a file; expected a MedMNIST .npz")
    parts = MEDMNIST_PARTS if part == "all" else (part,)
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as err:
        raise DataError(
            f"dataset.path: cannot read {path} as .npz ({err}); expected MedMNIST"
        ) from None
    with npz:
        images, labels, keys = [], [], []
        for p in parts:
            for k in (f"{p}_images", f"{p}_labels"):
                if k not in npz.files:
                    raise DataError(
                        f"dataset.path: {path.name} has no array {k!r} (has "
                        f"{', '.join(sorted(npz.files))}); expected <part>_images and _labels"
                    )
            x, y = npz[f"{p}_images"], npz[f"{p}_labels"]
            if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] != 3):
                raise DataError(
                    f"dataset.path: {p}_images is {x.dtype} {x.shape}; "
                    "expected uint8 (N, H, W) or (N, H, W, 3)"
                )
            if y.ndim == 2 and y.shape[1] != 1:
                raise DataError(
                    f"dataset.path: {p}_labels has shape {y.shape} (multi-label); "
                    "expected one label per image, (N,) or (N, 1)"
                )
            y = y.reshape(-1).astype(np.int64)
            if len(y) != len(x):
                raise DataError(f"dataset.path: {p}: {len(x)} images but {len(y)} labels")
            images.append(x)
            labels.append(y)
            keys += [f"{p}[{i}]" for i in range(len(y))]
    images, labels = np.concatenate(images), np.concatenate(labels)
    values = sorted(int(v) for v in np.unique(labels))
    names = [str(v) for v in values]
    remap = np.searchsorted(np.asarray(values), labels)
    return _index_arrays("medmnist", images, remap, names, classes, str(path), keys)


# -- class-per-folder trees -----------------------------------------------------------------
def _subdirs(path: Path) -> list[Path]:
    with os.scandir(path) as it:
        return sorted(
            (Path(e.path) for e in it if e.is_dir() and not e.name.startswith(".")),
            key=lambda p: p.name,
        )


def _has_image(path: Path) -> bool:
    for _, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(is_image_file(f) and not f.startswith(".") for f in files):
            return True
    return False


def find_class_root(top) -> Path:
    """The first level (breadth first) with >= 2 subfolders containing images.

    If those subfolders are split names (train/val/test, as in Imagenette and Tiny ImageNet),
    the class root is searched inside `train` instead.
    """
    top = Path(top)
    if not top.is_dir():
        raise DataError(f"dataset.path: {str(top)!r} is not a folder; expected class folders")
    level = [top]
    while level:
        for folder in level:
            with_images = [d for d in _subdirs(folder) if _has_image(d)]
            if len(with_images) < 2:
                continue
            train = [d for d in with_images if d.name.lower() == "train"]
            if train and {d.name.lower() for d in with_images} <= SPLIT_NAMES:
                return find_class_root(train[0])
            return folder
        level = [d for folder in level for d in _subdirs(folder)]
    raise DataError(
        f"no class folders under {top}; expected a level with >= 2 subfolders holding images"
    )


def index_folder(path, classes=None, source: str = "imagefolder", log=None) -> Index:
    """Class = subfolder of the class root (sorted names); its images are found recursively."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset.path: {str(path)!r} does not exist; expected an image folder")
    root = find_class_root(path)
    names = [d.name for d in _subdirs(root)]
    index = Index(source, select_classes(names, classes), root=str(root))
    progress = _Progress(len(index.classes), log)
    for name in index.classes:
        progress.step()
        files = []
        for dirpath, dirs, fnames in os.walk(root / name):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += [
                os.path.join(dirpath, f)
                for f in fnames
                if is_image_file(f) and not f.startswith(".")
            ]
        files.sort()
        index.items.append(files)
        index.keys.append([os.path.relpath(f, root) for f in files])
    return _check_not_empty(index)


# -- ILSVRC2012 -----------------------------------------------------------------------------
class _Window:
    """A read-only view of bytes [start, start+size) of a file, so tarfile stays inside it."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos


def ilsvrc_train_tar(path) -> Path:
    path = Path(path)
    tar = path / ILSVRC_TRAIN_TAR if path.is_dir() else path
    if not tar.is_file():
        raise DataError(
            f"dataset.path: no {ILSVRC_TRAIN_TAR} in {str(path)!r}; expected the folder holding "
            "the official ILSVRC2012 training tar"
        )
    return tar


def index_ilsvrc(path, classes=None, log=None) -> Index:
    """Index ILSVRC2012_img_train.tar (a tar of per-synset tars) by member offsets.

    Only tar headers are read: the outer tar's, then the inner headers of the selected
    synsets. Each image becomes a TarMember pointing at its bytes in the big tar.
    """
    tar = ilsvrc_train_tar(path)
    try:
        with open(tar, "rb") as f:
            outer = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - closed with f
            synsets = {
                Path(m.name).name[: -len(".tar")]: m
                for m in outer
                if m.isfile() and m.name.endswith(".tar")
            }
            if not synsets:
                raise DataError(
                    f"{tar}: no per-synset tars inside; expected members like n01440764.tar"
                )
            names = sorted(synsets)
            index = Index("ilsvrc2012", select_classes(names, classes), root=str(tar))
            progress = _Progress(len(index.classes), log)
            for name in index.classes:
                progress.step()
                m = synsets[name]
                window = _Window(f, m.offset_data, m.size)
                inner = tarfile.open(fileobj=window, mode="r:")  # noqa: SIM115 - closed with f
                members = sorted(
                    (im for im in inner if im.isfile() and is_image_file(im.name)),
                    key=lambda im: im.name,
                )
                index.items.append(
                    [
                        TarMember(str(tar), m.offset_data + im.offset_data, im.size, im.name)
                        for im in members
                    ]
                )
                index.keys.append([f"{name}.tar/{im.name}" for im in members])
    except tarfile.TarError as err:
        raise DataError(f"{tar}: not a readable tar ({err}); expected {ILSVRC_TRAIN_TAR}") from None
    return _check_not_empty(index)


# -- dispatch -------------------------------------------------------------------------------
def index_source(
    source: str,
    path=None,
    classes=None,
    max_per_class: int | None = None,
    medmnist_split: str = "all",
    log=None,
) -> Index:
    """Index `source` (see SOURCES), select classes, then at most max_per_class per class."""
    if source not in SOURCES:
        raise DataError(f"dataset.source: {source!r} is unknown; expected one of {SOURCES}")
    if source != "digits":
        if path is None:
            raise DataError(f"dataset.path: missing; source {source!r} needs the data's path")
        if not Path(path).exists():
            raise DataError(f"dataset.path: {str(path)!r} does not exist; expected {source} data")
    if source == "digits":
        index = index_digits(classes)
    elif source == "medmnist":
        index = index_medmnist(path, medmnist_split, classes)
    elif source == "ilsvrc2012":
        index = index_ilsvrc(path, classes, log)
    else:  # imagefolder, or url once fetched and extracted
        index = index_folder(path, classes, source, log)
    return subsample(index, max_per_class)
