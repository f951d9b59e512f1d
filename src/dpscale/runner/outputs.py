"""history.csv and metrics.json helpers of the runner (no pandas in backend venvs).

The files themselves are written with dpscale.atomic, as every other output.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from dpscale import atomic

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


def write_history(path: Path, rows: list[dict]) -> None:
    """history.csv with HISTORY_COLUMNS; missing or non-finite values are empty cells."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k)) for k in HISTORY_COLUMNS})
    atomic.write_text(path, buf.getvalue())


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


def flat_scalars(d: dict, prefix: str = "") -> dict:
    """The scalar entries of `d` (str, number, bool, None), keys prefixed; lists/dicts dropped."""
    out = {}
    for k, v in d.items():
        if isinstance(v, np.generic):
            v = v.item()
        if v is None or isinstance(v, str | int | float | bool):
            out[prefix + k] = v
    return out
