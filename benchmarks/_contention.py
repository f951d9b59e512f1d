"""Was the machine ours while a benchmark measured? /proc/stat and /proc/loadavg around a window.

Imported by benchmarks/steps.py (around each worker process) and benchmarks/_step_worker.py
(around its timed steady steps); pure functions apart from `sample`, and no framework imports,
so it runs in the base venv and in every backend's.

A window's CPU time is counted on the CPUs this process may run on (sched_getaffinity: a
container's or taskset's share of a larger host), from the kernel's per-CPU tick counters:
- own: CPU seconds of the measured process tree (its getrusage, threads and waited children);
- others: busy CPU time minus own and minus steal, as a fraction of the window's CPU capacity
  (wall time x CPUs): other processes on these cores, which slow a step unevenly (a shared core
  inflated the non-private step more than the DP step in issue 20);
- steal: time the hypervisor ran another guest on these CPUs, the same fraction.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

# /proc/stat's per-CPU fields (proc(5)); guest and guest_nice are already inside user and nice.
FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
# The verdict's limits: above any of them a run is contended and may not rewrite the doc.
MAX_OTHERS = 0.05  # other processes' share of the CPUs' time during a window
MAX_STEAL = 0.02  # the hypervisor's share
MAX_START_LOAD = 0.5  # 1-minute load average before the first worker (nothing of ours running)


def parse_proc_stat(text: str, cpus: set[int] | None = None) -> dict[str, int]:
    """Tick counters (FIELDS) summed over the `cpuN` lines of `cpus` (all `cpuN` lines if None).

    Raises ValueError naming the line when the text is not /proc/stat's format.
    """
    total = dict.fromkeys(FIELDS, 0)
    seen = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        values = rest.split()
        if len(values) < len(FIELDS) or not all(v.isdigit() for v in values):
            raise ValueError(f"/proc/stat line {line!r}; expected cpuN and >= 8 tick counts")
        for field, value in zip(FIELDS, values, strict=False):
            total[field] += int(value)
        seen += 1
    if not seen:
        raise ValueError(f"/proc/stat has no cpuN line for CPUs {sorted(cpus or [])}")
    return {**total, "cpus": seen}


def parse_loadavg(text: str) -> dict:
    """/proc/loadavg: the 1, 5 and 15-minute averages and the runnable / total task counts."""
    parts = text.split()
    try:
        running, tasks = parts[3].split("/")
        return {"load": [float(x) for x in parts[:3]], "running": int(running), "tasks": int(tasks)}
    except (IndexError, ValueError):
        raise ValueError(f"/proc/loadavg {text!r}; expected '1.0 0.5 0.2 2/300 1234'") from None


def usable_cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None


def own_cpu_s(children: bool) -> float:
    """User + system CPU seconds of this process (all threads), or of its waited children."""
    u = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def sample(children: bool = False) -> dict | None:
    """The counters now, or None where /proc is missing (then no window, no verdict from it).

    children: count the waited children's CPU time as ours (the parent around a worker) instead
    of this process' (a worker around its own steps).
    """
    try:
        stat = parse_proc_stat(Path("/proc/stat").read_text(), usable_cpus())
        loadavg = parse_loadavg(Path("/proc/loadavg").read_text())
    except (OSError, ValueError):
        return None
    return {
        "time": time.monotonic(),
        "stat": stat,
        "loadavg": loadavg,
        "own_cpu_s": own_cpu_s(children) + (own_cpu_s(False) if children else 0.0),
        "ticks_per_s": os.sysconf("SC_CLK_TCK"),
    }


def window(before: dict | None, after: dict | None) -> dict | None:
    """Shares of the CPUs' time between two samples: others, steal, own, idle (see module doc)."""
    if before is None or after is None:
        return None
    d = {f: after["stat"][f] - before["stat"][f] for f in FIELDS}
    capacity = sum(d.values())  # ticks of all usable CPUs over the window
    if capacity <= 0:
        return None
    own = (after["own_cpu_s"] - before["own_cpu_s"]) * before["ticks_per_s"]
    busy = capacity - d["idle"] - d["iowait"]
    others = max(0.0, busy - d["steal"] - own)
    return {
        "seconds": after["time"] - before["time"],
        "cpus": before["stat"]["cpus"],
        "own": min(1.0, own / capacity),
        "others": others / capacity,
        "steal": d["steal"] / capacity,
        "idle": (d["idle"] + d["iowait"]) / capacity,
        "load_start": before["loadavg"]["load"][0],
        "load_end": after["loadavg"]["load"][0],
    }


def verdict(start_load: float | None, windows: list[dict | None]) -> list[str]:
    """Why a run is contended (empty: it is not). One reason per limit, with the worst window."""
    reasons = []
    if start_load is not None and start_load > MAX_START_LOAD:
        reasons.append(
            f"1-minute load average {start_load:.2f} before the first worker "
            f"(limit {MAX_START_LOAD:g}): something else was running"
        )
    seen = [w for w in windows if w]
    if len(seen) < len(windows):
        reasons.append(
            f"{len(windows) - len(seen)} of {len(windows)} windows have no /proc/stat sample, "
            "so contention there is unknown"
        )
    for key, limit, what in (
        ("others", MAX_OTHERS, "other processes"),
        ("steal", MAX_STEAL, "steal (the hypervisor ran other guests)"),
    ):
        worst = max(seen, key=lambda w: w[key], default=None)
        if worst is not None and worst[key] > limit:
            n = sum(w[key] > limit for w in seen)
            reasons.append(
                f"{what} took up to {worst[key]:.1%} of the CPUs' time in a window "
                f"({n} of {len(seen)} windows above the limit {limit:.0%})"
            )
    return reasons
