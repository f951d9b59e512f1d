"""`python -m dpscale.data.fetch`: download a pinned archive and extract it safely.

The file at `--url` (http, https or file) is streamed to <out-dir>/<its name>, its sha256 must
equal `--sha256` (else the file is removed and the step fails), then it is extracted to
<out-dir>/extracted/. Only regular files and folders are extracted; an absolute path or `..`
in any member name fails the step before anything is written. The whole out-dir is built
under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from dpscale import atomic
from dpscale.data import DataError

EXTRACTED = "extracted"
LOG_EVERY_S = 5.0


def download(url: str, dest_dir, sha256: str, log=print) -> Path:
    """Stream `url` into dest_dir, check its sha256; return the file's path."""
    scheme = urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise DataError(f"dataset.url: {url!r}; expected an http://, https:// or file:// URL")
    dest = Path(dest_dir) / (Path(unquote(urlparse(url).path)).name or "download")
    start = time.perf_counter()
    try:
        with atomic.replacing(dest) as part:
            done, digest = _stream(url, part, log)
            if digest != sha256.lower():  # raised inside: the file is never renamed into place
                raise DataError(
                    f"dataset.sha256: {url} has sha256 {digest}; expected {sha256} "
                    "(the downloaded file was removed)"
                )
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DataError(
            f"dataset.url: cannot download {url} ({reason}); expected a reachable URL"
        ) from None
    log(f"fetch: {url} -> {dest} ({done} bytes, sha256 ok) in {time.perf_counter() - start:.1f} s")
    return dest


def _stream(url: str, path: Path, log) -> tuple[int, str]:
    """Copy `url` into `path`, logging progress; return the byte count and the sha256."""
    h, done, start, last = hashlib.sha256(), 0, time.perf_counter(), time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as resp, open(path, "wb") as f:
        length = resp.headers.get("Content-Length")
        total = f" of {int(length) / 1e6:.1f}" if length else ""
        while block := resp.read(1 << 20):
            f.write(block)
            h.update(block)
            done += len(block)
            if time.perf_counter() - last >= LOG_EVERY_S:
                last = time.perf_counter()
                mb_s = done / 1e6 / (last - start)
                log(f"fetch: {done / 1e6:.1f}{total} MB, {mb_s:.1f} MB/s")
    return done, h.hexdigest()


def _check_member(archive: Path, name: str) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":"):
        raise DataError(
            f"{archive.name}: unsafe member path {name!r}; expected relative paths that stay "
            "inside the extraction folder"
        )


def extract(archive, dest, log=print) -> Path:
    """Extract a tar (any compression) or zip to `dest`; refuse path traversal."""
    archive, dest = Path(archive), Path(dest)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tf:
            members = tf.getmembers()
            for m in members:
                _check_member(archive, m.name)
            # Links and devices are not images: only files and folders come out.
            kept = [m for m in members if m.isfile() or m.isdir()]
            tf.extractall(dest, members=kept, filter="data")
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            kept = zf.namelist()
            for name in kept:
                _check_member(archive, name)
            zf.extractall(dest)
    else:
        raise DataError(f"{archive.name}: not a tar or zip archive; expected an image archive")
    log(f"fetch: extracted {len(kept)} entries of {archive.name} to {dest}")
    return dest


def fetch(url: str, sha256: str, out_dir, log=print) -> Path:
    """Download + verify + extract into out_dir (atomically); return the extracted folder."""
    with atomic.replacing_dir(out_dir) as tmp:
        archive = download(url, tmp, sha256, log)
        extract(archive, tmp / EXTRACTED, log)
    return Path(out_dir) / EXTRACTED


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dpscale.data.fetch", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--url", required=True, help="http(s):// or file:// address")
    parser.add_argument("--sha256", required=True, help="the archive's expected sha256 (hex)")
    parser.add_argument("--out-dir", required=True, help="resources/datasets/<name>/raw")
    parser.add_argument("--threads", type=int, default=1, help="unused")
    args = parser.parse_args(argv)
    try:
        fetch(args.url, args.sha256, args.out_dir, log=lambda m: print(m, flush=True))
    except DataError as err:
        sys.exit(f"fetch: error: {err}")


if __name__ == "__main__":
    main()
