"""Repetitions of benchmarks/steps.py: the order workers run in, and what R of them add up to.

Pure functions (no I/O, no frameworks). A row is one (batch, backend, options) of a run; each row
is measured R times at each thread count, by separate worker processes:
- `schedule` interleaves them: repetition by repetition, each thread count in turn, the rows in
  an order rotated by one each repetition (a slow drift of the machine then touches every row
  alike), and with a baseline both codes of a row back to back, which goes first alternating;
- `aggregate` reduces a row's repetitions to the median DP / non-private ratio with its spread
  (min-max); the step times are the median of the repetitions' medians. Columns measured once
  (first step, memory, the Poisson phase) come from the first repetition that measured them.
"""

from __future__ import annotations

import json
from statistics import median


def schedule(rows: list, reps: int, threads: list[int], codes: list[str]) -> list[tuple]:
    """(rep, threads, row, code) in run order; see the module doc."""
    if reps < 1 or not rows or not threads or not codes:
        raise ValueError(f"reps {reps}, {len(rows)} rows, threads {threads}, codes {codes}")
    out = []
    for rep in range(reps):
        shift = rep % len(rows)
        for t in threads:
            for i, row in enumerate(rows[shift:] + rows[:shift]):
                order = codes[::-1] if (i + rep) % 2 else codes
                out.extend((rep, t, row, code) for code in order)
    return out


def key(run: dict) -> tuple:
    """What makes repetitions the same measurement."""
    opts = json.dumps(run["options"], sort_keys=True)
    return (run["backend"], opts, run["batch_size"], run.get("threads"), run.get("code"))


def spread(values: list[float]) -> dict:
    """Median and range of a row's repetitions."""
    if not values:
        raise ValueError("no values; expected at least one repetition")
    return {"median": median(values), "min": min(values), "max": max(values), "n": len(values)}


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per measurement key, in first-seen order: a representative run with `ratio`,
    `steady` medians, `ratio_spread` and `reps` over its successful repetitions; failed
    repetitions are counted in `failed`, and a row whose every repetition failed stays a failed
    run (its last error)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    out = []
    for group in groups.values():
        ok = [r for r in group if "error" not in r]
        failed = len(group) - len(ok)
        if not ok:
            out.append({**group[-1], "failed": failed})
            continue
        first = next((r for r in ok if r.get("poisson")), ok[0])
        ratios = spread([r["ratio"] for r in ok])
        steady = {
            kind: {"median_s": median(r["steady"][kind]["median_s"] for r in ok)}
            for kind in ("nonprivate", "dp")
        }
        out.append(
            {
                **first,
                "ratio": ratios["median"],
                "ratio_spread": ratios,
                "steady": steady,
                "reps": len(ok),
                "failed": failed,
                "contention": [r.get("contention") for r in ok],
            }
        )
    return out


def ratio_cell(row: dict, bold: bool = True) -> str:
    """'**1.97x** (1.90-2.05)' for R > 1 repetitions, '**1.97x**' for one."""
    s = row.get("ratio_spread")
    text = f"{row['ratio']:.2f}x"
    text = f"**{text}**" if bold else text
    if s and s["n"] > 1:
        text += f" ({s['min']:.2f}-{s['max']:.2f})"
    return text
