"""benchmarks/steps.py without workers: the repetition order, median and spread, the tables,
and a contended run that must leave docs/benchmarks.md alone. Numbers are a saved real run's."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import _reps  # noqa: E402
import steps  # noqa: E402

SAVED = BENCH / "results" / "steps-cpu-refactor.json"  # 1 thread, with a --baseline


@pytest.fixture(scope="module")
def saved():
    return json.loads(SAVED.read_text())


def _repeated(saved: dict, scale: list[float]) -> dict:
    """The saved run as len(scale) repetitions: repetition i's DP steps scaled by scale[i], its
    Poisson phase kept in the first only (as steps.py measures it)."""
    meta = copy.deepcopy(saved["meta"])
    meta["args"].update(threads=[1], reps=len(scale))
    runs = []
    for rep, f in enumerate(scale):
        for r in copy.deepcopy(saved["runs"]):
            r["steady"]["dp"]["median_s"] *= f
            r.update(ratio=r["ratio"] * f, rep=rep, poisson=r["poisson"] if rep == 0 else {})
            runs.append(r)
    return {"meta": meta, "runs": runs}


def test_schedule_rotates_rows_and_alternates_codes():
    order = _reps.schedule(["a", "b", "c"], reps=3, threads=[1, 2], codes=["old", "new"])
    assert len(order) == 3 * 2 * 3 * 2
    first_rows = [rows[2] for rows in order if rows[1] == 1 and rows[3] == "old"]
    assert first_rows == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    rep0 = [(row, code) for rep, t, row, code in order if rep == 0 and t == 1]
    assert rep0 == [("a", "old"), ("a", "new"), ("b", "new"), ("b", "old"), ("c", "old")] + [
        ("c", "new")
    ]
    with pytest.raises(ValueError, match="reps 0"):
        _reps.schedule(["a"], reps=0, threads=[1], codes=["new"])


def test_aggregate_takes_the_median_and_the_spread(saved):
    runs = _repeated(saved, [1.0, 1.3, 0.9])["runs"]
    rows = _reps.aggregate(runs)
    assert len(rows) == len(saved["runs"])  # one row per (mode, code)
    for row, orig in zip(rows, saved["runs"], strict=True):
        s = row["ratio_spread"]
        assert (s["n"], row["reps"], row["failed"]) == (3, 3, 0)
        assert row["ratio"] == pytest.approx(orig["ratio"])
        assert (s["min"], s["max"]) == pytest.approx((orig["ratio"] * 0.9, orig["ratio"] * 1.3))
        dp = orig["steady"]["dp"]["median_s"]
        assert row["steady"]["dp"]["median_s"] == pytest.approx(dp)
        assert row["poisson"] == orig["poisson"]  # from the first repetition


def test_aggregate_keeps_failures_apart(saved):
    ok = copy.deepcopy(saved["runs"][0])
    failed = {k: ok[k] for k in ("backend", "options", "batch_size", "code")}
    failed.update(error="RuntimeError: out of memory", rep=1, threads=ok["threads"])
    (row,) = _reps.aggregate([ok, failed])
    assert (row["reps"], row["failed"], row["ratio"]) == (1, 1, ok["ratio"])
    (only,) = _reps.aggregate([failed])
    assert only["error"].startswith("RuntimeError")


def test_ratio_cell():
    assert _reps.ratio_cell({"ratio": 1.5}) == "**1.50x**"
    row = {"ratio": 1.97, "ratio_spread": _reps.spread([1.9, 1.97, 2.05])}
    assert _reps.ratio_cell(row) == "**1.97x** (1.90-2.05)"


def test_render_a_saved_run_without_repetitions(saved):
    text = "\n".join(steps.run_lines(saved["meta"], saved["runs"], SAVED))
    assert "Batch 64, 1 thread(s), device cpu:" in text
    for r in saved["runs"]:
        if r["code"] == "current":
            assert f"| {r['backend']} | {r['mode']} (" in text
            assert f"**{r['ratio']:.2f}x** |" in text
    assert "Before / after" in text
    assert "other processes shared these cores" in text  # its load says so


def test_render_repetitions_and_contention(saved):
    run = _repeated(saved, [1.0, 1.3, 0.9])
    run["meta"]["contention"] = {
        "max_others": 0.42,
        "max_steal": 0.0,
        "reasons": ["other processes took up to 42.0% of the CPUs' time in a window"],
    }
    text = "\n".join(steps.run_lines(run["meta"], run["runs"], SAVED))
    r = saved["runs"][1]
    lo, hi = r["ratio"] * 0.9, r["ratio"] * 1.3
    assert f"**{r['ratio']:.2f}x** ({lo:.2f}-{hi:.2f})" in text
    assert "3 repetitions" in text and "(first repetition only)" in text
    assert "contended (other processes took up to 42.0%" in text


def test_a_contended_run_leaves_the_doc_alone(saved, tmp_path, capsys):
    run = _repeated(saved, [1.0, 1.1])
    run["meta"]["contention"] = steps.run_verdict(run["meta"], run["runs"])
    assert run["meta"]["contention"]["reasons"]  # load 3.1 at its start, no windows
    path = tmp_path / "steps-cpu.json"
    path.write_text(json.dumps(run))
    doc = steps.DOC.read_text()
    with pytest.raises(SystemExit, match="a contended run .*load average 3.11"):
        steps.main(["--render", str(path)])
    assert steps.DOC.read_text() == doc
    steps.main(["--render", str(path), "--no-write"])  # printing it is fine
    assert "contended" in capsys.readouterr().out


def test_timing_summary_counts_walls_by_repetition_and_own_cpu(saved):
    runs = _repeated(saved, [1.0, 1.0])["runs"]
    window = {"own": 0.25, "cpus": 2, "seconds": 60.0}  # 30 CPU seconds
    for r in runs:
        r["contention"] = window
    first = sum(r["worker_wall_s"] for r in runs if r["rep"] == 0)
    text = steps.timing_summary(runs)
    assert f"repetition 1 {first / 60:.1f} min" in text
    assert f"used {len(runs) * 30 / 60:.1f} min of CPU" in text
    assert steps.own_cpu_s(None) is None


def _finish(saved, tmp_path, monkeypatch, quick: bool, load: float, no_write: bool) -> Path:
    """steps.finish on the saved run as 2 repetitions with quiet windows, in tmp_path; the doc."""
    run = _repeated(saved, [1.0, 1.2])
    run["meta"]["loadavg_start"][0] = load
    quiet = {"others": 0.01, "steal": 0.0, "own": 0.5, "cpus": 2, "seconds": 30.0}
    for r in run["runs"]:
        r["contention"] = r["steady_contention"] = quiet
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    monkeypatch.setattr(steps, "RESULTS", tmp_path)
    monkeypatch.setattr(steps, "DOC", doc)
    partial = tmp_path / "partial-steps-20261203-120000.json"
    partial.write_text("{}")
    args = argparse.Namespace(
        out=None, append=None, quick=quick, no_write=no_write, allow_contended=False
    )
    with pytest.raises(SystemExit) as exit_:
        steps.finish(run["meta"], run["runs"], 0, args, partial)
    assert exit_.value.code == 0
    assert not partial.exists()
    return doc


@pytest.mark.parametrize(
    ("quick", "load", "kind"), [(False, 3.1, "contended"), (True, 0.0, "quick")]
)
def test_finish_keeps_contended_and_quick_runs_away_from_the_doc(
    saved, tmp_path, monkeypatch, quick, load, kind
):
    doc = _finish(saved, tmp_path, monkeypatch, quick, load, no_write=quick)
    assert not (tmp_path / "steps-cpu.json").exists()
    (kept,) = tmp_path.glob(f"{kind}-steps-cpu-20261203-120000.json")
    reasons = json.loads(kept.read_text())["meta"]["contention"]["reasons"]
    if quick:
        assert reasons == []
    else:
        assert len(reasons) == 1 and "load average 3.10" in reasons[0]
    assert doc.read_text() == "# Benchmarks\n"


def test_finish_writes_a_clean_run_and_the_doc(saved, tmp_path, monkeypatch):
    doc = _finish(saved, tmp_path, monkeypatch, quick=False, load=0.1, no_write=False)
    meta = json.loads((tmp_path / "steps-cpu.json").read_text())["meta"]
    assert meta["contention"]["reasons"] == []
    text = doc.read_text()
    assert "## DP-SGD steps" in text and "the machine was ours" in text
