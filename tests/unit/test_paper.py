"""paper_comparison.csv and simulation_check.csv (dpscale.report.paper) from small summaries.

Every summary goes through summary.csv's own writer and pandas' reader, as the report rules
read it, so column types (bools, ints, floats with gaps) are the real ones.
"""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest

from dpscale.report import aggregate as agg
from dpscale.report import paper
from dpscale.workflow import step_command

PRIVATE = {"private": True, "accountant": "rdp", "delta": 1e-5, "sampling": "poisson"}


def run(level="eps8", **values) -> dict:
    """One summary.csv row: a private reference run of the balanced split unless `values` say."""
    row = {
        "backend": "reference",
        "split": "balanced",
        "level": level,
        "variant": "default",
        "seed": 0,
        **(PRIVATE if level != "none" else {"private": False}),
        "epsilon": 8.0 if level != "none" else None,
        "batch_size": 64,
        "steps": 100,
        "n_train": 640,
        "test_accuracy": 0.5,
        "dataset_name": "digits",
    }
    return {**row, **values}


def write_summary(tmp_path, rows: list[dict]):
    """summary.csv as aggregate writes it (its columns, then the config's) and pandas reads it."""
    path = tmp_path / "summary.csv"
    path.write_text(agg.to_csv([*agg.COLUMNS, "dataset_name"], rows))
    return path, pd.read_csv(path)


def entry(metric="test_accuracy", value=0.6, **match) -> dict:
    """One `paper:` row of an experiment config."""
    return {"source": "A et al.", "setting": f"{metric} {match}", "metric": metric,
            "value": value, "match": match}  # fmt: skip


def test_the_mean_of_the_matching_runs_stands_beside_the_published_number(tmp_path):
    _, summary = write_summary(
        tmp_path,
        [
            run(seed=0, test_accuracy=0.5, epsilon=7.0),
            run(seed=1, test_accuracy=0.7, epsilon=9.0),
            run("none", test_accuracy=0.9),  # another level
            run(backend="opacus", test_accuracy=0.1),  # another backend
        ],
    )
    [row] = paper.comparison(
        summary, [entry(value=0.56, level="eps8", backend="reference")], "smoke"
    )
    assert tuple(row) == paper.COMPARISON_COLUMNS
    assert row["source"] == "A et al." and row["metric"] == "test_accuracy"
    assert row["paper_value"] == 0.56
    assert row["ours_runs"] == 2
    assert row["ours_value"] == pytest.approx(0.6)
    assert row["ours_sd"] == pytest.approx(0.1)  # population sd: two runs, +-0.1
    # The match as JSON with sorted keys: one spelling per selection.
    assert row["ours_match"] == json.dumps({"backend": "reference", "level": "eps8"})
    assert row["ours_epsilon"] == pytest.approx(8.0)
    assert (row["ours_accountant"], row["ours_delta"], row["ours_sampling"]) == (
        "rdp",
        1e-5,
        "poisson",
    )
    assert row["scale"] == "smoke" and row["dataset"] == "digits" and row["n_train"] == 640


def test_one_row_per_entry_in_order_with_every_kind_of_match(tmp_path):
    rows = [run(seed=s, test_accuracy=a) for s, a in ((0, 0.2), (1, 0.4))]
    _, summary = write_summary(tmp_path, [*rows, run("none", test_accuracy=0.9)])
    entries = [
        entry(),  # empty match: every run (kurakin-virtual-batch's "mean over all variants")
        entry(seed=1),  # an int column
        entry(private=False),  # a bool column, as YAML's `false` arrives
        entry(level="eps8", variant="default"),
    ]
    out = paper.comparison(summary, entries, None)
    assert [r["setting"] for r in out] == [e["setting"] for e in entries]
    assert [r["ours_runs"] for r in out] == [3, 1, 1, 2]
    assert [r["ours_value"] for r in out] == pytest.approx([0.5, 0.4, 0.9, 0.3])
    assert {r["scale"] for r in out} == {"as written"}  # no scale given


def test_epsilon_and_what_qualifies_it_come_from_the_private_runs_only(tmp_path):
    _, summary = write_summary(
        tmp_path,
        [
            run("none"),
            run("eps8", epsilon=8.0, accountant="rdp"),
            run("eps4", epsilon=4.0, accountant="pld"),
        ],
    )
    everything, public = paper.comparison(summary, [entry(), entry(level="none")], None)
    assert everything["ours_runs"] == 3
    assert everything["ours_epsilon"] == pytest.approx(6.0)
    # Two accountants among the matched runs: both named, never one picked silently.
    assert set(everything["ours_accountant"].split(";")) == {"rdp", "pld"}
    assert everything["ours_sampling"] == "poisson"
    assert public["ours_runs"] == 1
    assert public["ours_epsilon"] is None and public["ours_accountant"] is None


def test_no_matching_run_leaves_ours_empty_beside_the_published_number(tmp_path):
    _, summary = write_summary(tmp_path, [run()])
    [row] = paper.comparison(summary, [entry(value=0.113, level="eps71")], "paper")
    assert row["paper_value"] == 0.113 and row["scale"] == "paper"
    assert row["ours_runs"] == 0
    assert all(row[c] is None for c in ("ours_value", "ours_sd", "ours_epsilon", "dataset"))


def test_runs_without_the_metric_are_not_counted(tmp_path):
    # membership_loss_auc is empty for runs that were not evaluated.
    _, summary = write_summary(
        tmp_path, [run(seed=0, membership_loss_auc=0.61), run(seed=1), run(seed=2)]
    )
    [row] = paper.comparison(summary, [entry("membership_loss_auc", 0.59)], None)
    assert row["ours_runs"] == 1
    assert row["ours_value"] == pytest.approx(0.61) and row["ours_sd"] == 0.0


def test_a_number_matches_a_float_column_with_gaps(tmp_path):
    _, summary = write_summary(tmp_path, [run("none"), run("eps8", target_epsilon=8.0)])
    [row] = paper.comparison(summary, [entry(target_epsilon=8)], None)
    assert row["ours_runs"] == 1


def test_a_metric_that_is_not_a_column_is_an_error_naming_it(tmp_path):
    _, summary = write_summary(tmp_path, [run()])
    with pytest.raises(agg.AggregateError, match="'test_acc' is not a summary.csv column"):
        paper.comparison(summary, [entry("test_acc")], None)


def test_a_match_key_that_is_not_a_column_is_an_error_naming_it_and_the_columns(tmp_path):
    _, summary = write_summary(tmp_path, [run()])
    with pytest.raises(agg.AggregateError) as err:
        paper.comparison(summary, [entry(lvl="eps8")], None)
    message = str(err.value)
    assert "'lvl' is not a summary.csv column" in message
    assert ", ".join(summary.columns[:3]) in message  # what it could have been


def test_each_simulation_stands_beside_the_real_large_batch_run_it_predicts(tmp_path):
    real = {"variant": "k64", "batch_size": 512, "steps": 8, "epsilon": 3.0}
    sim = {"variant": "k1", "batch_size": 8, "steps": 8, "simulated_batch_size": 512,
           "simulated_epsilon": 3.0, "epsilon": 900.0}  # fmt: skip
    rows = [
        # Decoys listed first, so a pairing that ignored steps or split would take them.
        run(**{**real, "variant": "k64long", "steps": 16}, test_accuracy=0.9),
        run(**real, split="longtail", test_accuracy=0.8),
        run(**real, test_accuracy=0.6),
        run(**sim, test_accuracy=0.55),
        run(**sim, seed=1, test_accuracy=0.5),  # no real run with seed 1
    ]
    _, summary = write_summary(tmp_path, rows)
    paired, alone = paper.simulation_check(summary)
    assert tuple(paired) == paper.SIMULATION_COLUMNS
    assert (paired["split"], paired["backend"], paired["level"], paired["seed"]) == (
        "balanced",
        "reference",
        "eps8",
        0,
    )
    assert (paired["simulating_variant"], paired["real_variant"]) == ("k1", "k64")
    assert (paired["batch_size"], paired["simulated_batch_size"], paired["steps"]) == (8, 512, 8)
    assert paired["predicted_test_accuracy"] == 0.55 and paired["real_test_accuracy"] == 0.6
    assert paired["accuracy_gap"] == pytest.approx(-0.05)
    assert paired["predicted_epsilon"] == paired["real_epsilon"] == 3.0
    assert paired["simulating_run_own_epsilon"] == 900.0
    assert (paired["accountant"], paired["delta"], paired["sampling"]) == ("rdp", 1e-5, "poisson")
    assert alone["seed"] == 1 and alone["predicted_test_accuracy"] == 0.5
    assert alone["real_variant"] is None and alone["real_test_accuracy"] is None
    assert alone["accuracy_gap"] is None and alone["real_epsilon"] is None


def test_no_simulating_runs_means_no_simulation_rows(tmp_path):
    _, summary = write_summary(tmp_path, [run(), run("none")])
    assert paper.simulation_check(summary) == []
    assert paper.simulation_check(summary.drop(columns="simulated_batch_size")) == []


def main_as_the_rule_calls_it(**kwargs) -> None:
    """main() on the arguments the report rules pass (run_step -> step_command)."""
    paper.main(step_command("dpscale.report.paper", "python", **kwargs)[3:])


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_main_writes_both_tables(tmp_path, capsys):
    sim = {"variant": "k1", "batch_size": 8, "simulated_batch_size": 512, "simulated_epsilon": 2.0}
    path, _ = write_summary(tmp_path, [run(), run(**sim)])
    out, sims = tmp_path / "paper_comparison.csv", tmp_path / "simulation_check.csv"
    # The rule passes the config's scale, "" when it has none.
    main_as_the_rule_calls_it(
        summary=path, paper=[entry(), entry(level="eps71")], scale="", out=out
    )
    main_as_the_rule_calls_it(summary=path, simulation_out=sims)
    assert f"wrote 2 published numbers beside ours to {out}" in capsys.readouterr().out

    with open(out, newline="") as f:
        assert next(csv.reader(f)) == list(paper.COMPARISON_COLUMNS)
    matched, unmatched = read_csv(out)
    assert float(matched["ours_value"]) == 0.5 and matched["ours_runs"] == "2"
    # Plain numbers, not numpy's repr (np.float64(1e-05)).
    assert matched["n_train"] == "640" and float(matched["ours_delta"]) == 1e-5
    assert matched["scale"] == unmatched["scale"] == "as written"
    assert unmatched["ours_runs"] == "0" and unmatched["ours_value"] == ""  # empty, not nan

    [check] = read_csv(sims)
    assert list(check) == list(paper.SIMULATION_COLUMNS)
    assert check["simulating_variant"] == "k1" and check["simulated_batch_size"] == "512"
    assert float(check["predicted_test_accuracy"]) == 0.5 and float(check["delta"]) == 1e-5
    assert check["real_variant"] == "" and check["accuracy_gap"] == ""  # no real 512 batch run


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ("[{", "dpscale.report.paper: Expecting"),  # not JSON
        (json.dumps([entry("test_acc")]), "'test_acc' is not a summary.csv column"),
        (json.dumps([{"source": "s", "setting": "t", "metric": "epsilon"}]), "'value'"),
    ],
    ids=["not-json", "unknown-metric", "no-value"],
)
def test_bad_paper_rows_stop_with_one_line_and_no_table(tmp_path, rows, expected):
    path, _ = write_summary(tmp_path, [run()])
    out = tmp_path / "paper_comparison.csv"
    with pytest.raises(SystemExit) as stop:
        paper.main(["--summary", str(path), "--paper", rows, "--out", str(out)])
    message = str(stop.value.code)
    assert message.startswith("dpscale.report.paper: ") and "\n" not in message
    assert expected in message
    assert not out.exists()
