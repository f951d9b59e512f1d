"""benchmarks/_contention.py: /proc/stat and /proc/loadavg read for real, windows, the verdict."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _contention as cont  # noqa: E402

needs_proc = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="no /proc (not Linux)")

# Lines of this project's 2-core machine, read 2026-12-03 (cpu0, cpu1 and their sum).
STAT = """cpu  3027284 2623 336111 4664651 13839 0 5548 18309 0 0
cpu0 1419361 1343 154879 2445211 2958 0 635 8644 0 0
cpu1 1607923 1279 181232 2219439 10881 0 4912 9665 0 0
intr 16072344 0 0 0
ctxt 123
"""


def _sample(ticks: dict, own_s: float, t: float, load: float = 0.0) -> dict:
    stat = {**dict.fromkeys(cont.FIELDS, 0), **ticks, "cpus": 2}
    loadavg = {"load": [load, load, load], "running": 1, "tasks": 100}
    return {"time": t, "stat": stat, "loadavg": loadavg, "own_cpu_s": own_s, "ticks_per_s": 100}


def test_parse_proc_stat_sums_the_cpus_asked_for():
    both = cont.parse_proc_stat(STAT)
    assert both["cpus"] == 2
    assert both["user"] == 1419361 + 1607923
    assert both["steal"] == 8644 + 9665
    one = cont.parse_proc_stat(STAT, {1})
    assert (one["cpus"], one["idle"], one["softirq"]) == (1, 2219439, 4912)


@pytest.mark.parametrize(
    ("text", "cpus", "match"),
    [
        ("cpu0 1 2 three 4 5 6 7 8\n", None, "cpu0 1 2 three"),
        ("cpu0 1 2 3\n", None, "expected cpuN and >= 8"),
        ("intr 1 2\n", None, "no cpuN line"),
        (STAT, {7}, r"no cpuN line for CPUs \[7\]"),
    ],
)
def test_parse_proc_stat_says_what_is_wrong(text, cpus, match):
    with pytest.raises(ValueError, match=match):
        cont.parse_proc_stat(text, cpus)


@needs_proc
def test_parse_proc_stat_reads_this_machine():
    cpus = cont.usable_cpus()
    stat = cont.parse_proc_stat(Path("/proc/stat").read_text(), cpus)
    assert stat["cpus"] == len(cpus)
    assert all(stat[f] >= 0 for f in cont.FIELDS)
    assert stat["idle"] + stat["user"] > 0


def test_parse_loadavg():
    got = cont.parse_loadavg("0.17 1.30 2.37 3/98 18779\n")
    assert got == {"load": [0.17, 1.30, 2.37], "running": 3, "tasks": 98}
    with pytest.raises(ValueError, match="expected '1.0 0.5 0.2 2/300 1234'"):
        cont.parse_loadavg("0.17 1.30")


def test_window_splits_the_cpus_time():
    # 10 s on 2 CPUs = 2000 ticks: 1350 idle, 50 iowait, 600 busy (500 user, 50 system and
    # 50 steal), of which 400 are ours (4 CPU seconds): 150 are other processes'.
    before = _sample({"user": 1000, "system": 100, "idle": 5000, "steal": 10}, own_s=3.0, t=0.0)
    after = _sample(
        {"user": 1500, "system": 150, "idle": 6350, "iowait": 50, "steal": 60}, own_s=7.0, t=10.0
    )
    w = cont.window(before, after)
    assert w["seconds"] == 10.0
    assert w["own"] == pytest.approx(400 / 2000)  # 4 CPU seconds
    assert w["steal"] == pytest.approx(50 / 2000)
    assert w["others"] == pytest.approx(150 / 2000)
    assert w["idle"] == pytest.approx(1400 / 2000)
    assert cont.window(None, after) is None


@needs_proc
def test_window_of_real_samples_counts_our_own_work():
    before = cont.sample()
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:  # 0.1 s of CPU in this process
        pass
    w = cont.window(before, cont.sample())
    assert w is not None
    assert w["own"] > 0
    assert w["own"] + w["others"] + w["steal"] + w["idle"] <= 1.0 + 1e-9
    assert w["cpus"] == len(os.sched_getaffinity(0))


def test_verdict_clean_and_contended():
    quiet = {"others": 0.01, "steal": 0.0}
    assert cont.verdict(0.1, [quiet, quiet]) == []
    busy = {"others": 0.40, "steal": 0.03}
    reasons = cont.verdict(2.99, [quiet, busy, None])
    assert any("load average 2.99" in r for r in reasons)
    assert any("other processes took up to 40.0%" in r and "1 of 2 windows" in r for r in reasons)
    assert any(r.startswith("steal") and "3.0%" in r for r in reasons)
    assert any("1 of 3 windows have no /proc/stat sample" in r for r in reasons)
