"""`python -m dpscale.data.prepare`: decode a source once into uint8 arrays every backend maps.

Outputs in --out-dir: images.npy uint8 (N, R, R, 3), labels.npy int64 (N,) and manifest.json
(source, resolution, classes, per-class counts, sha256 of both .npy files, skipped images and
why, files that are no images and why). Images are decoded by --threads worker processes;
corrupt ones are skipped and counted.
Every file is written under a temporary name and renamed into place, so a killed job leaves
no half-written output.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from dpscale import atomic
from dpscale.data import DataError, images
from dpscale.data.sources import (
    MEDMNIST_PARTS,
    SOURCES,
    SUBSAMPLE_SEED,
    Index,
    index_ilsvrc_val,
    index_source,
)

OUTPUTS = ("images.npy", "labels.npy", "manifest.json")
LOG_EVERY_S = 5.0
_HANDLES: dict = {}  # per worker process: open tar files, reused across chunks


def _decode_chunk(task):
    """Worker: decode a list of items; failures become (position, reason), never exceptions."""
    items, size, draft = task
    out = np.zeros((len(items), size, size, 3), np.uint8)
    failed = []
    for i, item in enumerate(items):
        try:
            out[i] = images.load(item, size, draft, _HANDLES)
        except Exception as err:  # noqa: BLE001 - any decoder error means "skip this image"
            failed.append((i, f"{type(err).__name__}: {err}".splitlines()[0][:200]))
    return out, failed


def _close_handles() -> None:
    """Close this process's cached tar files (a forked worker keys its own by its pid)."""
    for key in [k for k in _HANDLES if k[0] == os.getpid()]:
        _HANDLES.pop(key).close()


def _chunks(n: int, threads: int) -> list[tuple[int, int]]:
    # Small enough to balance the workers and log often, large enough to amortize pickling.
    size = max(1, min(64, math.ceil(n / (4 * threads))))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _decode_all(items, size, draft, threads, out, log):
    """Fill `out` (N, size, size, 3) in order; return [(global position, reason)] of failures."""
    n = len(items)
    spans = _chunks(n, threads)
    tasks = ((items[a:b], size, draft) for a, b in spans)
    failed, done, start, last_log = [], 0, time.perf_counter(), time.perf_counter()

    def take(span, result):
        nonlocal done, last_log
        arr, fails = result
        out[span[0] : span[1]] = arr
        failed.extend((span[0] + i, why) for i, why in fails)
        done += span[1] - span[0]
        now = time.perf_counter()
        if now - last_log >= LOG_EVERY_S or done == n:
            rate = done / max(now - start, 1e-9)
            log(
                f"prepare: {done}/{n} images ({100 * done / n:.1f}%), {rate:.0f} images/s "
                f"({rate / threads:.0f}/s per thread), {len(failed)} skipped"
            )
            last_log = now

    if threads == 1:
        try:
            for span, task in zip(spans, tasks, strict=True):
                take(span, _decode_chunk(task))
        finally:
            _close_handles()
        return failed
    # fork: workers inherit the imported modules; a bounded window of chunks keeps memory flat.
    with ProcessPoolExecutor(threads, mp_context=get_context("fork")) as pool:
        pending = deque()
        for span, task in zip(spans, tasks, strict=True):
            pending.append((span, pool.submit(_decode_chunk, task)))
            if len(pending) >= 2 * threads:
                span0, fut = pending.popleft()
                take(span0, fut.result())
        while pending:
            span0, fut = pending.popleft()
            take(span0, fut.result())
    return failed


def _ranges(sizes: list[int], names: list[str]) -> dict[str, list[int]]:
    ends = np.cumsum([0, *sizes]).tolist()
    return {name: [ends[i], ends[i + 1]] for i, name in enumerate(names)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _compact(raw: np.ndarray, keep: np.ndarray, path: Path) -> None:
    """The rows of `raw` where `keep` is set, as a new .npy at `path`, a block at a time."""
    good = np.flatnonzero(keep)
    final = np.lib.format.open_memmap(
        path, mode="w+", dtype=raw.dtype, shape=(len(good), *raw.shape[1:])
    )
    for a in range(0, len(good), 4096):
        final[a : a + 4096] = raw[good[a : a + 4096]]
    final.flush()


def _versions() -> dict:
    import PIL

    import dpscale

    return {"dpscale": dpscale.__version__, "pillow": PIL.__version__, "numpy": np.__version__}


def prepare(
    index: Index,
    resolution: int,
    out_dir,
    threads: int = 1,
    draft: bool = True,
    settings: dict | None = None,
    log=print,
    val: Index | None = None,
) -> dict:
    """Decode every item of `index` to (resolution, resolution, 3) and write the three outputs.

    With `val` (the official validation images of the same classes), its rows follow the
    training rows: manifest `parts` gives both row ranges, `val_counts` the per-class counts.
    Returns the manifest. Raises DataError if a class ends up with no readable image.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, int(threads))
    parts = [("train", index)] + ([("val", val)] if val is not None else [])
    items = [it for _, ix in parts for its in ix.items for it in its]
    keys = [k for _, ix in parts for ks in ix.keys for k in ks]
    k = len(index.classes)
    labels = np.concatenate([np.repeat(np.arange(k, dtype=np.int64), ix.counts) for _, ix in parts])
    part_of = np.repeat(np.arange(len(parts)), [sum(ix.counts) for _, ix in parts])
    n, shape = len(items), (resolution, resolution, 3)
    n_unused = sum(len(ix.unused) for _, ix in parts)
    if n_unused:
        log(f"prepare: {n_unused} files are not images, listed in manifest.json unused")
    log(
        f"prepare: {n} images in {len(index.classes)} classes from {index.source} "
        f"({index.root}) -> {resolution}px, {threads} threads, draft {'on' if draft else 'off'}"
    )
    start = time.perf_counter()

    paths = {name: out_dir / name for name in OUTPUTS}
    # The arrays are committed together when the block ends, the manifest after them: whoever
    # sees a manifest sees complete arrays beside it.
    with (
        atomic.replacing(paths["images.npy"]) as tmp_images,
        atomic.replacing(paths["labels.npy"]) as tmp_labels,
    ):
        raw = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=(n, *shape))
        failed = _decode_all(items, resolution, draft, threads, raw, log)
        keep = np.ones(n, bool)
        keep[[i for i, _ in failed]] = False
        kept = {}
        for p, (part, ix) in enumerate(parts):
            rows = keep & (part_of == p)
            kept[part] = np.bincount(labels[rows], minlength=k)
            for name, count, total in zip(ix.classes, kept[part], ix.counts, strict=True):
                if count == 0:
                    what = "images" if part == "train" else "official validation images"
                    raise DataError(
                        f"class {name!r}: none of its {total} {what} could be read; "
                        "expected at least one readable image"
                    )
        counts = kept["train"]
        if failed:
            # Rare: compact the good rows into a second file rather than hold N images in RAM;
            # it replaces the decoded one only once complete.
            with atomic.replacing(tmp_images) as compact:
                _compact(raw, keep, compact)
        else:
            raw.flush()
        del raw
        all_labels, labels = labels, labels[keep]
        with open(tmp_labels, "wb") as f:
            np.save(f, labels)
        seconds = time.perf_counter() - start
        manifest = {
            "source": index.source,
            "root": index.root,
            "resolution": resolution,
            "resize": "shorter side to resolution, center crop; Pillow bilinear, antialiased",
            "jpeg_draft": draft,
            "classes": list(index.classes),
            "counts": [int(c) for c in counts],
            # Row ranges [start, end) of each part in images.npy / labels.npy.
            "parts": _ranges([int(kept[part].sum()) for part, _ in parts], [p for p, _ in parts]),
            **({"val_counts": [int(c) for c in kept["val"]]} if val is not None else {}),
            "n_images": int(keep.sum()),
            "sha256": {"images.npy": _sha256(tmp_images), "labels.npy": _sha256(tmp_labels)},
            "n_skipped": len(failed),
            "skipped": [
                {"item": keys[i], "class": index.classes[all_labels[i]], "reason": why}
                for i, why in failed
            ],
            # Files met in the chosen classes that are no images (never decoded), with why.
            "n_unused": sum(len(ix.unused) for _, ix in parts),
            "unused": [u for _, ix in parts for u in ix.unused],
            "index": {key: v for _, ix in parts for key, v in ix.notes.items()},
            "conversions": images.CONVERSIONS,
            "settings": {**(settings or {}), "subsample_seed": SUBSAMPLE_SEED},
            "threads": threads,
            "seconds": round(seconds, 3),
            "images_per_s": round(n / max(seconds, 1e-9), 1),
            "versions": _versions(),
        }
    atomic.write_json(paths["manifest.json"], manifest)
    log(
        f"prepare: wrote {manifest['n_images']} images ({len(failed)} skipped) to {out_dir} "
        f"in {seconds:.1f} s, {manifest['images_per_s']:.0f} images/s"
    )
    return manifest


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dpscale.data.prepare", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--path", help="the data (folder, tar folder, .npz, fetched raw folder)")
    parser.add_argument("--resolution", type=int, required=True, help="square side in pixels")
    parser.add_argument(
        "--classes", type=_json_arg, help="a count (first N classes) or a JSON list of names"
    )
    parser.add_argument("--max-per-class", type=int, help="decode at most this many per class")
    parser.add_argument(
        "--medmnist-split", default="all", choices=[*MEDMNIST_PARTS, "all"], help="medmnist part"
    )
    parser.add_argument("--out-dir", required=True, help="where the three outputs go")
    parser.add_argument("--threads", type=int, default=1, help="decoding worker processes")
    parser.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size")
    parser.add_argument(
        "--val",
        action="store_true",
        help="ilsvrc2012: append the official validation images of the chosen classes",
    )
    args = parser.parse_args(argv)
    if args.resolution < 1:
        parser.error(f"--resolution: {args.resolution}; expected a positive number of pixels")
    settings = {
        "path": args.path,
        "classes": args.classes,
        "max_per_class": args.max_per_class,
        "medmnist_split": args.medmnist_split,
        "val": args.val,
    }
    try:
        log = functools.partial(print, flush=True)
        index = index_source(
            args.source, args.path, args.classes, args.max_per_class, args.medmnist_split, log
        )
        val = None
        if args.val:
            if args.source != "ilsvrc2012":
                raise DataError(
                    f"dataset.val: true for source {args.source!r}; expected ilsvrc2012"
                )
            val = index_ilsvrc_val(args.path, index.classes, log)
        prepare(
            index,
            args.resolution,
            args.out_dir,
            args.threads,
            draft=not args.no_draft,
            settings=settings,
            log=log,
            val=val,
        )
    except DataError as err:
        sys.exit(f"prepare: error: {err}")


if __name__ == "__main__":
    main()
