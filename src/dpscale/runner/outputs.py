"""Atomic writes of the run outputs and the checkpoint state (no pandas in backend venvs).

Every file is written to a temporary name in its final directory and moved into place with
os.replace, so a reader (or a killed job's rerun) sees either the old file or the whole new one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

HISTORY_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "epsilon",
    "seconds",
)


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def write_json(path: Path, obj) -> None:
    text = json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"
    _atomic_write(path, lambda f: f.write(text.encode()))


def write_history(path: Path, rows: list[dict]) -> None:
    """history.csv with HISTORY_COLUMNS; missing or non-finite values are empty cells."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k)) for k in HISTORY_COLUMNS})
    _atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def _csv_cell(value):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return value


def read_history(path: Path) -> list[dict]:
    """history.csv back as dicts of floats (ints for epoch/step, None for empty cells)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                if v == "":
                    row[k] = None
                elif k in ("epoch", "step"):
                    row[k] = int(v)
                else:
                    row[k] = float(v)
            rows.append(row)
    return rows


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def flat_scalars(d: dict, prefix: str = "") -> dict:
    """The scalar entries of `d` (str, number, bool, None), keys prefixed; lists/dicts dropped."""
    out = {}
    for k, v in d.items():
        if isinstance(v, np.generic):
            v = v.item()
        if v is None or isinstance(v, str | int | float | bool):
            out[prefix + k] = v
    return out
