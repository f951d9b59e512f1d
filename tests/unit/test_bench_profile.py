"""benchmarks/profile_step.py without workers: its doc section from the saved real profile."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import profile_step  # noqa: E402

SAVED = BENCH / "results" / "profile-cpu.json"


@pytest.fixture(scope="module")
def saved():
    return json.loads(SAVED.read_text())


def test_section_has_a_table_per_mode_and_the_load(saved):
    text = profile_step.section(saved["results"], saved["meta"])
    c = saved["meta"]["contention"]
    assert f"steal {c['max_steal']:.1%}" in text
    assert ("**contended**" in text) == bool(c["reasons"])
    for r in saved["results"]:
        assert f"### {r['backend']}: {r['mode']}" in text
        if "ops" in r:
            top = r["ops"]["dp"]["ops"][0]
            share = top["self_ms"] / r["ops"]["dp"]["profiled_step_ms"]
            assert f"| `{top['op']}` | {top['self_ms']:.1f} | {share:.1%} |" in text
        if "pieces_ms" in r:
            for name, ms in r["pieces_ms"].items():
                assert f"| {name} | {ms:.1f} |" in text
        if r["mode"] in profile_step.CHANGES:
            assert profile_step.CHANGES[r["mode"]][0] in text


def test_a_failed_worker_is_named(saved):
    results = copy.deepcopy(saved["results"])
    results.append({"backend": "jax", "options": {}, "error": "RuntimeError: no jaxlib"})
    text = profile_step.section(results, saved["meta"])
    assert "Failed: RuntimeError: no jaxlib" in text


def test_write_section_replaces_its_own_section_only(tmp_path, monkeypatch):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## DP-SGD steps\ntables\n\n## GPU\npending\n")
    monkeypatch.setattr(profile_step.steps, "DOC", doc)
    profile_step.write_section("first")
    profile_step.write_section("second")
    text = doc.read_text()
    assert text.count(f"## {profile_step.SECTION}") == 1
    assert "second" in text and "first" not in text
    assert text.index("## DP-SGD steps") < text.index("second") < text.index("## GPU")
