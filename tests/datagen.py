"""Generators of small real test data: JPEG/PNG files, class folders, tar/zip archives, the
ILSVRC2012 training-tar layout, MedMNIST .npz files, and a local HTTP server. Usable by any test.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
from PIL import Image


def image_array(seed: int, size: tuple[int, int] = (40, 30), label: int = 0) -> np.ndarray:
    """A smooth, JPEG-friendly uint8 (height, width, 3) picture: a class tint plus blobs."""
    width, height = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.zeros((height, width, 3))
    for c in range(3):
        fx, fy, phase = rng.uniform(1, 6, 2).tolist() + [rng.uniform(0, 6.3)]
        img[..., c] = 0.5 + 0.4 * np.sin(fx * xx * 6.3 + phase) * np.cos(fy * yy * 6.3)
    img[..., label % 3] += 0.3  # classes differ in colour
    return np.clip(img * 200, 0, 255).astype(np.uint8)


def write_image(
    path, seed: int = 0, size=(40, 30), fmt: str | None = None, label: int = 0, mode="RGB"
) -> Path:
    """Write a real image file (format from the suffix unless `fmt`); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image_array(seed, size, label)).convert(mode)
    fmt = fmt or Image.registered_extensions()[path.suffix.lower()]
    img.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


def jpeg_bytes(seed: int = 0, size=(40, 30), label: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_array(seed, size, label)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_imagefolder(
    root, counts: dict[str, int], size=(40, 30), ext: str = ".JPEG", subdir: str = ""
) -> Path:
    """root/<class>/[subdir/]<class>_<i><ext> with counts[class] images each (class-tinted)."""
    root = Path(root)
    for label, (name, n) in enumerate(sorted(counts.items())):
        folder = root / name / subdir
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_image(folder / f"{name}_{i}{ext}", seed=1000 * label + i, size=size, label=label)
    return root


def truncate(path, keep: float = 0.5) -> Path:
    """Cut a file short (a download that stopped half way)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def garbage(path, n: int = 300, seed: int = 0) -> Path:
    """Random bytes under an image name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(n))
    return path


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_ilsvrc_train_tar(folder, counts: dict[str, int], size=(40, 30)) -> Path:
    """folder/ILSVRC2012_img_train.tar: a tar of <synset>.tar, each holding <synset>_<i>.JPEG.

    The images are those make_imagefolder writes for the same counts (same seeds), so the two
    layouts can be compared image for image.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ILSVRC2012_img_train.tar"
    with tarfile.open(path, "w") as outer:
        for label, (synset, n) in enumerate(sorted(counts.items())):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i in range(n):
                    data = jpeg_bytes(1000 * label + i, size, label)
                    _add_bytes(inner, f"{synset}_{i}.JPEG", data)
            _add_bytes(outer, f"{synset}.tar", buf.getvalue())
    return path


def make_archive(src_dir, dest, fmt: str = "gztar") -> Path:
    """An archive of src_dir (its folder name kept as the top level): gztar, tar or zip."""
    src_dir = Path(src_dir)
    base = str(Path(dest)).removesuffix(".tar.gz").removesuffix(".tgz")
    base = base.removesuffix(".tar").removesuffix(".zip")
    out = shutil.make_archive(base, fmt, root_dir=src_dir.parent, base_dir=src_dir.name)
    return Path(out)


def make_traversal_tar(dest, member: str = "../escaped.jpg") -> Path:
    """A tar whose member tries to leave the extraction folder."""
    dest = Path(dest)
    with tarfile.open(dest, "w:gz") as tf:
        _add_bytes(tf, "data/a/ok.jpg", jpeg_bytes(0))
        _add_bytes(tf, member, jpeg_bytes(1))
    return dest


def make_medmnist_npz(
    path, n=(12, 4, 6), classes: int = 2, rgb: bool = False, size: int = 28, seed: int = 0
) -> Path:
    """A MedMNIST-style .npz: {train,val,test}_images uint8 (N,s,s[,3]), _labels (N,1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for part, count in zip(("train", "val", "test"), n, strict=True):
        shape = (count, size, size, 3) if rgb else (count, size, size)
        arrays[f"{part}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        # Every class present in every part, in a shuffled order.
        arrays[f"{part}_labels"] = rng.permutation(np.arange(count) % classes).reshape(-1, 1)
    np.savez(path, **arrays)
    return Path(path)


def sha256_file(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@contextlib.contextmanager
def http_server(directory):
    """Serve `directory` on 127.0.0.1 (a free port) from a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def image_bytes(fmt: str = "JPEG", seed: int = 0, size=(40, 30), mode: str = "RGB") -> bytes:
    """One encoded picture (any Pillow format and mode), e.g. CMYK JPEG, grey PNG."""
    buf = io.BytesIO()
    Image.fromarray(image_array(seed, size)).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def tar_bytes(entries: dict) -> bytes:
    """An uncompressed tar in memory: name -> bytes, or ("symlink" | "hardlink", target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in entries.items():
            if isinstance(data, tuple):
                info = tarfile.TarInfo(name)
                info.type = tarfile.SYMTYPE if data[0] == "symlink" else tarfile.LNKTYPE
                info.linkname = data[1]
                tf.addfile(info)
            else:
                _add_bytes(tf, name, data)
    return buf.getvalue()


def make_ilsvrc_tar_of(folder, synsets: dict[str, bytes], extra: dict | None = None) -> Path:
    """folder/ILSVRC2012_img_train.tar from ready inner tars (synset -> tar bytes), plus any
    `extra` outer members (name -> bytes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ILSVRC2012_img_train.tar"
    path.write_bytes(tar_bytes({**{f"{s}.tar": b for s, b in synsets.items()}, **(extra or {})}))
    return path


def make_ilsvrc_val(folder, synsets: list[str], layout: str = "devkit", size=(40, 30)) -> Path:
    """folder/ILSVRC2012_img_val.tar: flat ILSVRC2012_val_<n>.JPEG, image n of class
    synsets[n-1] (tinted by its sorted position), with its labels as the devkit
    (ILSVRC2012_devkit_t12.tar.gz: ground truth + meta.mat, ids 1-based in sorted synset order,
    as the real one) or as LOC_val_solution.csv (`layout` "devkit" or "csv")."""
    from scipy.io import savemat

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(set(synsets))
    images = {
        f"ILSVRC2012_val_{n:08d}.JPEG": jpeg_bytes(50_000 + n, size, names.index(s))
        for n, s in enumerate(synsets, start=1)
    }
    path = folder / "ILSVRC2012_img_val.tar"
    path.write_bytes(tar_bytes(images))
    if layout == "csv":
        lines = ["ImageId,PredictionString"]
        lines += [f"ILSVRC2012_val_{n:08d},{s} 1 2 30 40" for n, s in enumerate(synsets, 1)]
        (folder / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
        return path
    meta = np.zeros(len(names), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O")])
    for i, name in enumerate(names):
        meta[i] = (i + 1, name, f"words of {name}")
    buf = io.BytesIO()
    savemat(buf, {"synsets": meta})
    truth = "".join(f"{names.index(s) + 1}\n" for s in synsets).encode()
    with tarfile.open(folder / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tf:
        _add_bytes(tf, "ILSVRC2012_devkit_t12/data/meta.mat", buf.getvalue())
        _add_bytes(tf, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)
    return path
