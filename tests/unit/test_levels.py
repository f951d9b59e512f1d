"""The one privacy-level grammar (dpscale.levels): parse, canonical names, the one order, and
the places that use it (config check, Snakemake wildcard, summary rows, figure legends)."""

from __future__ import annotations

import copy
import re

import pandas as pd
import pytest
import yaml

from dpscale import config as dp_config
from dpscale import levels
from dpscale.plots import figures
from dpscale.report import aggregate
from tests.conftest import PROJECT

SCHEMA = PROJECT / "workflow/schemas/config.schema.yaml"


@pytest.mark.parametrize(
    ("text", "kind", "value", "private", "target", "sigma"),
    [
        ("none", "none", None, False, None, None),
        ("eps8", "eps", 8.0, True, 8.0, None),
        ("eps0.5", "eps", 0.5, True, 0.5, None),
        ("sigma1.1", "sigma", 1.1, True, None, 1.1),
    ],
)
def test_parse(text, kind, value, private, target, sigma):
    level = levels.parse(text)
    assert (level.kind, level.value) == (kind, value)
    assert (level.private, level.target_epsilon, level.noise_multiplier) == (private, target, sigma)
    assert levels.parse(level) is level


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("eps", "'eps' is not a privacy level; expected none, eps<number> (e.g. eps8)"),
        ("EPS8", "'EPS8' is not a privacy level"),
        ("eps-1", "'eps-1' is not a privacy level"),
        ("eps1e3", "'eps1e3' is not a privacy level"),
        ("eps.5", "'eps.5' is not a privacy level"),
        (" eps8", "' eps8' is not a privacy level"),
        (None, "None is not a privacy level"),
        ("sigma0", "'sigma0' adds no noise; expected sigma > 0"),
        ("eps0.0", "'eps0.0' is unreachable"),
    ],
)
def test_bad_levels_are_one_line_errors(text, message):
    with pytest.raises(levels.LevelError) as err:
        levels.parse(text)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("none", "none"),
        ("eps8", "eps8"),
        ("eps8.0", "eps8"),
        ("eps08", "eps8"),
        ("eps008.000", "eps8"),
        ("sigma1.10", "sigma1.1"),
        ("eps0.5", "eps0.5"),
        ("eps00.50", "eps0.5"),
        ("eps67000", "eps67000"),
        ("eps0.00001", "eps0.00001"),  # no exponent: it must stay a level and a file name
        ("eps10000000000000000", "eps10000000000000000"),
    ],
)
def test_canonical_name(spelling, name):
    assert levels.canonical(spelling) == name
    assert levels.parse(name) == levels.parse(spelling)
    assert re.fullmatch(levels.WILDCARD, name)


def test_wildcard_matches_canonical_names_only():
    for name in ("none", "eps8", "eps4.6", "sigma1.1", "eps0.5", "eps67000"):
        assert re.fullmatch(levels.WILDCARD, name), name
    for other in ("eps8.0", "eps08", "sigma1.10", "eps4x6", "eps", "nonex"):
        assert not re.fullmatch(levels.WILDCARD, other), other


def test_one_order_none_then_eps_then_sigma_by_value():
    given = ["sigma0.5", "eps10", "none", "sigma2", "eps2", "eps4.6", "eps8.0"]
    assert levels.ordered(given) == [
        "none",
        "eps2",
        "eps4.6",
        "eps8",
        "eps10",
        "sigma0.5",
        "sigma2",
    ]
    assert levels.ordered(["eps8", "eps8.0"]) == ["eps8"]
    # A stray value (a missing cell) sorts after every level instead of failing.
    assert sorted(["nan", "eps2", "none"], key=levels.order_key) == ["none", "eps2", "nan"]


def test_text_is_the_report_label():
    assert levels.text("none") == "∞ (non-private)"
    assert levels.text("eps8.0") == "≤ 8 (target)"
    assert levels.text("sigma1.10") == "sigma 1.1 (calibrated: see summary)"


def test_distinct_names_both_spellings_of_a_repeated_level():
    assert levels.distinct(["none", "eps8.0", "sigma1.10"]) == ["none", "eps8", "sigma1.1"]
    with pytest.raises(levels.LevelError, match="'eps8' and 'eps8.0' are the same level"):
        levels.distinct(["none", "eps8", "eps2", "eps8.0"])
    with pytest.raises(levels.LevelError, match="'eps2' is listed twice"):
        levels.distinct(["eps2", "eps2"])


@pytest.fixture
def default_config():
    return yaml.safe_load((PROJECT / "config/config.yaml").read_text())


def _validate(cfg):
    return dp_config.validate(cfg, SCHEMA)


def test_config_with_a_repeated_level_is_an_error_naming_both(default_config):
    default_config["privacy"]["levels"] = ["none", "eps8", "eps8.0"]
    with pytest.raises(dp_config.ConfigError) as err:
        _validate(default_config)
    assert str(err.value) == (
        "config error: privacy.levels: 'eps8' and 'eps8.0' are the same level; "
        "expected each level once"
    )


def test_config_levels_are_stored_canonical(default_config):
    default_config["privacy"]["levels"] = ["none", "eps08.0", "sigma1.10"]
    default_config["paper"] = [
        {"source": "s", "setting": "x", "metric": "test_accuracy", "value": 0.5,
         "match": {"level": "eps8.0"}}
    ]  # fmt: skip
    cfg = _validate(default_config)
    assert cfg["privacy"]["levels"] == ["none", "eps8", "sigma1.1"]
    assert cfg["paper"][0]["match"] == {"level": "eps8"}
    bad = copy.deepcopy(default_config)
    bad["paper"][0]["match"]["level"] = "eps"
    with pytest.raises(dp_config.ConfigError, match="paper.0.match.level: 'eps' is not a"):
        _validate(bad)


def test_every_shipped_config_keeps_its_level_names(tmp_path):
    """Output paths stay where they were: every config in config/, at every scale, passes the
    config loader with its levels unchanged (all are written canonically)."""
    files = [
        PROJECT / "config/config.yaml",
        *sorted((PROJECT / "config/experiments").glob("*.yaml")),
    ]
    # Paper scale: the data is not here; a stand-in for the folder of the ImageNet tars.
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "LOC_val_solution.csv"):
        (tmp_path / name).write_bytes(b"")
    checked = 0
    for path in files:
        raw = yaml.safe_load(path.read_text())
        for scale in (None, *(raw.get("scales") or {})):
            cfg = dp_config.apply_scale({**raw, "scale": scale})
            cfg.pop("scale", None), cfg.pop("scales", None)
            if cfg["dataset"].get("source") in dp_config.PATH_SOURCES:
                cfg["dataset"]["path"] = str(tmp_path)
            written = list(cfg["privacy"]["levels"])
            assert _validate(cfg)["privacy"]["levels"] == written, (path.name, scale)
            checked += 1
    assert checked > len(files)


def test_aggregate_and_figures_order_levels_alike():
    names = ["sigma1.5", "eps10", "none", "eps2", "sigma0.5"]
    rows = [
        {"split": "b", "backend": "r", "mode": "m", "level": lv, "variant": "default", "seed": 0}
        for lv in names
    ]
    _, ordered_rows = aggregate.summary_rows(rows, {})
    summary_order = [r["level"] for r in ordered_rows]
    table = pd.DataFrame({"level": names, "variant": "default"})
    _, legend_order = figures._level_labels(table)
    privacy = pd.DataFrame({"level": names, "privacy": [f"p-{lv}" for lv in names]})
    assert summary_order == levels.ordered(names)
    assert legend_order == ["non-private", *levels.ordered(names)[1:]]
    assert figures._privacy_order(privacy) == [f"p-{lv}" for lv in levels.ordered(names)]
