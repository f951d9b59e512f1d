"""Atomic writes: a reader (or a killed job's rerun) sees the old file or the whole new one.

Every output is written under a hidden temporary name in its final directory (".<name>.<hex>.tmp":
glob and shell patterns skip dot names, no rule's output ends in ".tmp") and renamed over the
target with os.replace.

Temporary files are created with mode 0o666 and folders with 0o777, as open() and mkdir() do,
so the kernel applies the umask (and a folder's default ACL) at creation: outputs are as
readable to colleagues as any file the user writes, never mkstemp's 0600, and no thread has
to change the process-wide umask to learn what it is.

Stdlib and numpy only: the backends import this inside their own venvs.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

_ATTEMPTS = 100  # fresh random names to try before giving up on a crowded directory


def _create_beside(target: Path, create: Callable[[Path], None]) -> Path:
    """A new hidden name next to `target`, made by `create` (which fails if the name exists)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(_ATTEMPTS):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            create(tmp)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{target}: no free temporary name beside it; expected a writable folder")


def _new_file(path: Path) -> None:
    # O_EXCL: never reuse (or follow a link at) a name someone else made; 0o666 & ~umask, as open().
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))


def _fsync(path: Path) -> None:
    # Data on disk before the rename: after a crash the target is never a renamed empty file.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, else it is removed.

    Write *into* the yielded file (open it, np.save, savefig, ...); do not delete and recreate
    it by other means, or its mode is whatever those means give. The folder is created if
    missing; on any exception the old `path` is left untouched.
    """
    path = Path(path)
    tmp = _create_beside(path, _new_file)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def replacing_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new empty folder beside `path`; on success it takes the place of `path`.

    On any exception the new folder is deleted and the old `path` kept.
    """
    path = Path(path)
    tmp = _create_beside(path, lambda p: p.mkdir(0o777))  # 0o777 & ~umask, as mkdir()
    try:
        yield tmp
        old = _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)


def _swap_in(tmp: Path, path: Path) -> Path | None:
    """Rename folder `tmp` to `path`; return where the old `path` went (None if there was none).

    A folder cannot be renamed over a non-empty one, so the old one first moves aside: a reader
    sees the old folder, for a moment none, then the new one, never a half-filled one.
    """
    if not path.exists():
        os.replace(tmp, path)
        return None
    old = _create_beside(path, lambda p: p.mkdir(0o700))
    os.replace(path, old)  # onto the empty placeholder: a rename, no copy
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    return old


def write_text(path: str | Path, text: str) -> None:
    """`text` as UTF-8, newlines as given (no platform translation)."""
    with replacing(path) as tmp:
        tmp.write_bytes(text.encode())


def json_safe(value):
    """NaN/inf are not JSON: write them as null (json.dumps would emit invalid NaN tokens)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def write_json(path: str | Path, obj, *, strict: bool = False) -> None:
    """`obj` as indented JSON (keys in insertion order) and a final newline.

    NaN/inf and numpy scalars become null and plain numbers; with strict=True a non-finite
    number raises ValueError instead, for records where one can only be a bug.
    """
    text = json.dumps(obj if strict else json_safe(obj), indent=2, allow_nan=False) + "\n"
    write_text(path, text)


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez of `arrays` (uncompressed); through a file object, so no ".npz" is appended."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
