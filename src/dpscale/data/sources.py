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
from dpscale.data.images import TarMember, is_image_file, sniff

SOURCES = ("digits", "imagefolder", "ilsvrc2012", "url", "medmnist")
SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test"})
ILSVRC_TRAIN_TAR = "ILSVRC2012_img_train.tar"
ILSVRC_VAL_TAR = "ILSVRC2012_img_val.tar"
ILSVRC_DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
ILSVRC_LOC_CSV = "LOC_val_solution.csv"
MEDMNIST_PARTS = ("train", "val", "test")
SUBSAMPLE_SEED = 0  # max_per_class picks are fixed, independent of the split seed


@dataclass
class Index:
    source: str
    classes: list[str]
    items: list[list] = field(default_factory=list)  # items[c]: what images.load decodes
    keys: list[list[str]] = field(default_factory=list)  # keys[c]: names for logs/manifest
    root: str | None = None  # where the images were found
    # Files met while listing the chosen classes that are not images: {"item", "reason"}.
    unused: list[dict] = field(default_factory=list)
    notes: dict = field(default_factory=dict)  # what the listing saw (e.g. synsets found)

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
    return Index(index.source, index.classes, items, keys, index.root, index.unused, index.notes)


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
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(
            f"dataset.path: {path} holds one array (.npy); expected a MedMNIST .npz with "
            "<part>_images and <part>_labels"
        )
    with npz:
        images, labels, keys = [], [], []
        for p in parts:
            for k in (f"{p}_images", f"{p}_labels"):
                if k not in npz.files:
                    raise DataError(
                        f"dataset.path: {path.name} has no array {k!r} (has "
                        f"{', '.join(sorted(npz.files))}); expected <part>_images and _labels"
                    )
            try:
                x, y = npz[f"{p}_images"], npz[f"{p}_labels"]
            except ValueError as err:  # object arrays need pickle, which is never allowed
                raise DataError(
                    f"dataset.path: {path}: {p}_images or {p}_labels cannot be read without "
                    f"pickle ({str(err).splitlines()[0]}); expected plain uint8 images and "
                    "integer labels"
                ) from None
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
            if y.dtype.kind not in "iub":
                raise DataError(
                    f"dataset.path: {path}: {p}_labels is {y.dtype}; expected integer class "
                    "labels (a float label would be truncated)"
                )
            y = y.reshape(-1).astype(np.int64)
            if len(y) != len(x):
                raise DataError(f"dataset.path: {p}: {len(x)} images but {len(y)} labels")
            images.append(x)
            labels.append(y)
            keys += [f"{p}[{i}]" for i in range(len(y))]
    images, labels = np.concatenate(images), np.concatenate(labels)
    if len(images) == 0:
        raise DataError(
            f"dataset.path: {path} has no images in part(s) {', '.join(parts)}; expected at "
            "least one image"
        )
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


def _head(path: str, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _why_not_image(path: str, name: str) -> str | None:
    """None for an image file (by its extension, else by its first bytes), else why not."""
    if name.startswith("."):
        return "hidden file"
    if is_image_file(name):
        return None  # decoded, and skipped with its reason if it is not a readable image
    if not os.path.exists(path):
        return "broken symbolic link"
    if os.path.getsize(path) == 0:
        return "empty file"
    if sniff(_head(path)) is not None:
        return None
    return "not an image (neither its extension nor its first bytes are an image format)"


def walk(top: Path):
    """os.walk following symbolic links to folders, each real folder once (no link loops);
    yields (dirpath, files, [(skipped folder, reason)])."""
    seen = set()
    for dirpath, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        skipped = [(os.path.join(dirpath, d), "hidden folder") for d in dirs if d.startswith(".")]
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield dirpath, sorted(files), skipped


def _direct_image(path: Path) -> bool:
    with os.scandir(path) as it:
        return any(e.is_file() and _why_not_image(e.path, e.name) is None for e in it)


def _has_image(path: Path) -> bool:
    for dirpath, files, _ in walk(path):
        if any(_why_not_image(os.path.join(dirpath, f), f) is None for f in files):
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
            if len(with_images) == 1 and _direct_image(with_images[0]):
                # One folder of images is one class: its sub-folders are not classes.
                raise DataError(
                    f"dataset.path: {folder} holds one class folder ({with_images[0].name}); "
                    "expected >= 2 class folders"
                )
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
    with os.scandir(root) as it:  # files beside the class folders belong to no class
        for e in sorted(it, key=lambda e: e.name):
            if not e.is_dir():
                index.unused.append({"item": e.name, "reason": "not in a class folder"})
    progress = _Progress(len(index.classes), log)
    for name in index.classes:
        progress.step()
        files = []
        for dirpath, fnames, skipped in walk(root / name):
            for folder, why in skipped:
                index.unused.append({"item": os.path.relpath(folder, root), "reason": why})
            for f in fnames:
                full = os.path.join(dirpath, f)
                why = _why_not_image(full, f)
                if why is None:
                    files.append(full)
                else:
                    index.unused.append({"item": os.path.relpath(full, root), "reason": why})
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


def _member_kind(m: tarfile.TarInfo) -> str:
    if m.islnk():
        return "hard link member (not followed)"
    if m.issym():
        return "symbolic link member (not followed)"
    if m.isdir():
        return "folder member"
    return "not a regular file member"


def _synset_members(f, tar: Path, name: str, m: tarfile.TarInfo, index: Index) -> list:
    """The image members of one inner synset tar (sorted by name); the rest go to unused."""
    window = _Window(f, m.offset_data, m.size)
    try:
        inner = tarfile.open(fileobj=window, mode="r:")  # noqa: SIM115 - closed with f
        members = list(inner)
    except tarfile.TarError as err:
        raise DataError(
            f"{tar}: {m.name}: synset {name} is not a readable tar ({err}); expected a tar of "
            "its JPEGs (a damaged or partial download?)"
        ) from None
    images = []
    for im in sorted(members, key=lambda im: im.name):
        key = f"{name}.tar/{im.name}"
        if not im.isfile():
            index.unused.append({"item": key, "reason": _member_kind(im)})
            continue
        why = None
        base = Path(im.name).name
        if base.startswith("."):
            why = "hidden file"
        elif not is_image_file(base):
            if im.size == 0:
                why = "empty file"
            else:
                window.seek(im.offset_data)
                if sniff(window.read(16)) is None:
                    why = "not an image (neither its extension nor its first bytes are an image)"
        if why is None:
            images.append(im)
        else:
            index.unused.append({"item": key, "reason": why})
    return images


def index_ilsvrc(path, classes=None, log=None) -> Index:
    """Index ILSVRC2012_img_train.tar (a tar of per-synset tars) by member offsets.

    Only tar headers are read: the outer tar's, then the inner headers of the selected
    synsets. Each image becomes a TarMember pointing at its bytes in the big tar. A tar cut
    short (a partial download) is an error when a chosen synset is missing or cut; how many
    synsets were found is logged and recorded (Index.notes).
    """
    tar = ilsvrc_train_tar(path)
    size = tar.stat().st_size
    try:
        with open(tar, "rb") as f:
            outer = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - closed with f
            synsets, others, seen = {}, [], []
            try:
                for m in outer:
                    seen.append(m)
            except tarfile.ReadError:
                if not seen:
                    raise
                # Ends inside a member (a partial download): its synset is cut short (an
                # error if chosen, below); the synsets before it are complete.
            for m in seen:
                if m.isfile() and m.name.endswith(".tar"):
                    synsets[Path(m.name).name[: -len(".tar")]] = m
                else:
                    why = "not a synset tar" if m.isfile() else _member_kind(m)
                    others.append({"item": m.name, "reason": why})
            if not synsets:
                raise DataError(
                    f"{tar}: no per-synset tars inside; expected members like n01440764.tar"
                )
            names = sorted(synsets)
            if log:
                log(f"index: {tar}: {len(names)} synsets found ({len(others)} other members)")
            wanted = [classes] if isinstance(classes, str) else classes
            if isinstance(wanted, list):
                missing = [str(w) for w in wanted if str(w) not in synsets]
                if missing:
                    raise DataError(
                        f"dataset.classes: synset {missing[0]!r} is not in {tar} ({len(names)} "
                        "synsets found: a partial download?); expected the complete training tar"
                    )
            selected = select_classes(names, classes)
            index = Index("ilsvrc2012", selected, root=str(tar), unused=others)
            index.notes = {"outer_members": len(seen), "synsets_found": len(names)}
            progress = _Progress(len(index.classes), log)
            for name in index.classes:
                progress.step()
                m = synsets[name]
                if m.offset_data + m.size > size:
                    have = max(0, size - m.offset_data)
                    raise DataError(
                        f"{tar}: {m.name} is cut short ({have} of {m.size} bytes); expected "
                        "the complete training tar (a partial download?)"
                    )
                members = _synset_members(f, tar, name, m, index)
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


def _labels_from_devkit(devkit: Path) -> dict[str, str]:
    """ILSVRC2012_val_NNNNNNNN -> synset from the devkit's ground truth (1-based ILSVRC2012
    ids, line N = image N) and data/meta.mat (id -> WNID)."""
    import io

    from scipy.io import loadmat

    try:
        with tarfile.open(devkit, "r:*") as tf:
            files = {Path(m.name).as_posix().split("/", 1)[-1]: m for m in tf if m.isfile()}
            truth_m = files.get("data/ILSVRC2012_validation_ground_truth.txt")
            meta_m = files.get("data/meta.mat")
            if truth_m is None or meta_m is None:
                raise DataError(
                    f"{devkit}: no data/ILSVRC2012_validation_ground_truth.txt or data/meta.mat "
                    "inside; expected the ILSVRC2012 devkit (t12)"
                )
            truth = tf.extractfile(truth_m).read().decode().split()
            meta = loadmat(io.BytesIO(tf.extractfile(meta_m).read()), squeeze_me=True)
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"{devkit}: not a readable tar.gz ({err}); expected the devkit") from None
    try:
        synsets = meta["synsets"]
        ids_, wnids = synsets["ILSVRC2012_ID"], synsets["WNID"]
        wnid = {int(i): str(w) for i, w in zip(ids_, wnids, strict=True)}
        ids = [int(t) for t in truth]
    except (KeyError, ValueError, TypeError) as err:
        raise DataError(
            f"{devkit}: data/meta.mat or the ground truth is not as expected ({err}); expected "
            "synsets with ILSVRC2012_ID and WNID, and one integer id per line"
        ) from None
    unknown = [i for i in ids if i not in wnid]
    if unknown:
        raise DataError(
            f"{devkit}: ground truth id {unknown[0]} is not in data/meta.mat; expected ids of "
            "its synsets"
        )
    return {f"ILSVRC2012_val_{n:08d}": wnid[i] for n, i in enumerate(ids, start=1)}


def _labels_from_csv(csv: Path) -> dict[str, str]:
    """ImageId -> synset from LOC_val_solution.csv (the first word of PredictionString)."""
    import csv as csvlib

    labels = {}
    with open(csv, newline="") as f:
        rows = csvlib.reader(f)
        header = next(rows, None)
        if header is None or header[:2] != ["ImageId", "PredictionString"]:
            raise DataError(
                f"{csv}: header {header}; expected ImageId,PredictionString ({ILSVRC_LOC_CSV})"
            )
        for line, row in enumerate(rows, start=2):
            words = row[1].split() if len(row) >= 2 else []
            if not words:
                raise DataError(f"{csv}: line {line} has no synset; expected ImageId,<synset> ...")
            labels[row[0]] = words[0]
    return labels


def ilsvrc_val_labels(folder) -> tuple[dict[str, str], Path]:
    """The official validation labels found beside the tars: the devkit, else the csv."""
    folder = Path(folder)
    for name, read in ((ILSVRC_DEVKIT, _labels_from_devkit), (ILSVRC_LOC_CSV, _labels_from_csv)):
        if (folder / name).is_file():
            return read(folder / name), folder / name
    raise DataError(
        f"dataset.path: no {ILSVRC_DEVKIT} or {ILSVRC_LOC_CSV} in {str(folder)!r}; expected the "
        "official validation labels beside ILSVRC2012_img_val.tar"
    )


def index_ilsvrc_val(path, classes: list[str], log=None) -> Index:
    """The official validation images (ILSVRC2012_img_val.tar, flat) of `classes`, in that
    class order, sorted by name within a class; labels from the devkit or the csv."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    tar = folder / ILSVRC_VAL_TAR
    if not tar.is_file():
        raise DataError(
            f"dataset.path: no {ILSVRC_VAL_TAR} in {str(folder)!r}; expected the official "
            "validation tar (dataset.val)"
        )
    labels, origin = ilsvrc_val_labels(folder)
    chosen = {name: c for c, name in enumerate(classes)}
    index = Index("ilsvrc2012-val", list(classes), root=str(tar))
    index.items = [[] for _ in classes]
    index.keys = [[] for _ in classes]
    size, seen, unlabelled = tar.stat().st_size, 0, 0
    try:
        with tarfile.open(tar, "r:") as tf:
            for m in tf:
                seen += 1
                if not m.isfile():
                    index.unused.append({"item": m.name, "reason": _member_kind(m)})
                    continue
                stem = Path(m.name).stem
                synset = labels.get(stem)
                if synset is None:
                    unlabelled += 1
                    index.unused.append({"item": m.name, "reason": f"no label in {origin.name}"})
                    continue
                if synset not in chosen:
                    continue
                if m.offset_data + m.size > size:
                    raise DataError(
                        f"{tar}: {m.name} is cut short; expected the complete validation tar "
                        "(a partial download?)"
                    )
                c = chosen[synset]
                index.items[c].append(TarMember(str(tar), m.offset_data, m.size, m.name))
                index.keys[c].append(f"val/{m.name}")
    except tarfile.TarError as err:
        raise DataError(f"{tar}: not a readable tar ({err}); expected {ILSVRC_VAL_TAR}") from None
    for c in range(len(classes)):
        order = sorted(range(len(index.keys[c])), key=index.keys[c].__getitem__)
        index.items[c] = [index.items[c][i] for i in order]
        index.keys[c] = [index.keys[c][i] for i in order]
    index.notes = {"val_members": seen, "val_labels": origin.name, "val_unlabelled": unlabelled}
    if log:
        log(f"index: {tar}: {seen} members, labels from {origin.name}")
    for name, its in zip(index.classes, index.items, strict=True):
        if not its:
            raise DataError(
                f"{tar}: no validation image of class {name!r} (labels from {origin.name}); "
                "expected the official validation images of every chosen class"
            )
    return index


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
