"""The one accountant (dp-accounting 0.6.0), sigma calibration and the calibrate step."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import optimize, stats

from dpscale.config import ConfigError
from dpscale.privacy import accountant as acc
from dpscale.privacy import calibrate

# The cross-check of environments.md: Opacus RDP, objax analyze_dp (both with Opacus' orders)
# and dp-accounting agree on RDP; dp-accounting PLD at its default grid.
CIFAR = dict(q=256 / 50000, sigma=1.0, steps=2000, delta=1e-5)


def test_rdp_orders_are_opacus_default():
    assert len(acc.RDP_ORDERS) == 151
    assert acc.RDP_ORDERS[:3] == (1.1, 1.2, 1.3)
    assert acc.RDP_ORDERS[98:101] == (10.9, 12, 13)
    assert acc.RDP_ORDERS[-1] == 63


def test_rdp_reproduces_opacus_and_objax():
    assert acc.epsilon_rdp(**CIFAR) == pytest.approx(1.48631, abs=5e-6)


def test_pld_reproduces_dp_accounting_default_grid():
    assert acc.epsilon_pld(**CIFAR) == pytest.approx(1.23976, abs=5e-6)


def test_rdp_without_subsampling_matches_closed_form():
    """q = 1: the Gaussian's RDP is T*a/(2 sigma^2), converted by Prop. 12 of 2004.00010."""
    sigma, steps, delta = 3.0, 20, 1e-5
    a = np.array(acc.RDP_ORDERS)
    rdp = steps * a / (2 * sigma**2)
    expected = np.min(rdp + np.log1p(-1 / a) - np.log(delta * a) / (a - 1))
    assert acc.epsilon_rdp(1.0, sigma, steps, delta) == pytest.approx(expected, rel=1e-9)


def _exact_subsampled_gaussian_rdp(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step by numerical integration (Mironov et al.
    2019): log E_{z~N(0,s^2)}[((1-q) + q exp((2z-1)/(2s^2)))^a] / (a-1), in log space."""
    z = np.linspace(-40 * sigma, 40 * sigma + 120, 200001)
    base = -(z**2) / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
    mix = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
    out = []
    for a in orders:
        g = base + a * mix
        top = g.max()
        out.append((top + math.log(np.trapezoid(np.exp(g - top), z))) / (a - 1))
    return np.array(out)


def test_rdp_is_a_tight_upper_bound_on_the_exact_rdp_over_the_same_orders():
    """At sigma < 1 the best order is fractional: dp-accounting 0.6.0's fractional-order RDP
    sits slightly above the exact integral (Opacus 1.6.0 matches the integral: 7.9986365 for
    the embedded default's eps8), so our epsilon is conservative by ~4e-5 relative there."""
    a = np.array(acc.RDP_ORDERS)
    cases = {7.9986365: (64 / 1100, 0.78429, 102, 1e-5), 1.4863103: tuple(CIFAR.values())}
    for opacus, (q, sigma, steps, delta) in cases.items():
        rdp = steps * _exact_subsampled_gaussian_rdp(q, sigma, a)
        exact = np.min(rdp + np.log1p(-1 / a) - np.log(delta * a) / (a - 1))
        assert exact == pytest.approx(opacus, abs=1e-6)
        ours = acc.epsilon_rdp(q, sigma, steps, delta)
        assert exact <= ours <= exact * (1 + 1e-4), (exact, ours)


def _exact_gaussian_epsilon(s: float, delta: float) -> float:
    """Analytic Gaussian mechanism (Balle & Wang 2018), sensitivity 1, noise std s."""

    def excess(eps):
        return (
            stats.norm.cdf(-eps * s + 1 / (2 * s))
            - math.exp(eps) * stats.norm.cdf(-eps * s - 1 / (2 * s))
            - delta
        )

    return optimize.brentq(excess, 0.0, 100.0, xtol=1e-12)


def test_pld_without_subsampling_is_a_tight_upper_bound_on_the_exact_gaussian():
    # T Gaussian steps of std sigma compose to one Gaussian of std sigma / sqrt(T).
    sigma, steps, delta = 3.0, 20, 1e-5
    exact = _exact_gaussian_epsilon(sigma / math.sqrt(steps), delta)
    pld = acc.epsilon_pld(1.0, sigma, steps, delta)
    assert exact <= pld <= exact + 1e-3
    # RDP is a valid but looser bound.
    assert acc.epsilon_rdp(1.0, sigma, steps, delta) > pld


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_is_monotone(accountant):
    # Small epsilons: PLD's cost grows with epsilon over its grid step.
    base = dict(q=0.01, sigma=1.5, steps=50, delta=1e-5)

    def eps(**change):
        return acc.epsilon(**{**base, **change}, accountant=accountant)

    by_sigma = [eps(sigma=s) for s in (1.0, 1.5, 3.0)]
    by_steps = [eps(steps=t) for t in (10, 50, 100)]
    by_q = [eps(q=q) for q in (0.002, 0.01, 0.03)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:], strict=False)), by_sigma
    assert all(a < b for a, b in zip(by_steps, by_steps[1:], strict=False)), by_steps
    assert all(a < b for a, b in zip(by_q, by_q[1:], strict=False)), by_q


def test_pld_grid_is_the_default_for_ordinary_epsilons_and_widens_for_huge_ones():
    assert acc.pld_discretization_interval(**CIFAR) == acc.PLD_VALUE_DISCRETIZATION_INTERVAL
    q, steps, delta = 64 / 1100, 102, 1e-5
    eps_rdp = acc.epsilon_rdp(q, 0.15, steps, delta)  # about 484
    interval = acc.pld_discretization_interval(q, 0.15, steps, delta)
    assert interval == pytest.approx(acc.PLD_VALUE_DISCRETIZATION_INTERVAL * eps_rdp / 10)
    # With dp-accounting's fixed 1e-4 grid this took minutes; now seconds.
    assert 300 < acc.epsilon_pld(q, 0.15, steps, delta) < eps_rdp


def test_pld_is_tighter_than_rdp_under_subsampling():
    assert acc.epsilon_pld(0.05, 1.0, 50, 1e-5) < acc.epsilon_rdp(0.05, 1.0, 50, 1e-5)


def test_no_noise_is_infinite_epsilon():
    assert acc.epsilon(0.1, 0.0, 10, 1e-5, "rdp") == math.inf
    assert acc.epsilon(0.1, 0.0, 10, 1e-5, "pld") == math.inf


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(q=1.5, sigma=1.0, steps=10, delta=1e-5), "sample rate q=1.5"),
        (dict(q=0.0, sigma=1.0, steps=10, delta=1e-5), "sample rate q=0.0"),
        (dict(q=0.1, sigma=-1.0, steps=10, delta=1e-5), "sigma=-1.0 is negative"),
        (dict(q=0.1, sigma=1.0, steps=0, delta=1e-5), "steps=0 is not a positive integer"),
        (dict(q=0.1, sigma=1.0, steps=2.5, delta=1e-5), "steps=2.5"),
        (dict(q=0.1, sigma=1.0, steps=10, delta=1.0), "delta=1.0 is out of range"),
    ],
)
def test_bad_input_is_a_one_line_error(args, message):
    with pytest.raises(ValueError, match=message) as err:
        acc.epsilon_rdp(**args)
    assert "\n" not in str(err.value)


def test_unknown_accountant():
    with pytest.raises(ValueError, match="unknown accountant 'gdp'; expected one of rdp, pld"):
        acc.epsilon(0.1, 1.0, 10, 1e-5, "gdp")


def test_epoch_steps_and_epsilon_by_epoch():
    assert acc.epoch_steps(10, 4) == [4, 8, 10]
    assert acc.epoch_steps(8, 4) == [4, 8]
    assert acc.epoch_steps(3, 4) == [3]
    by_epoch = acc.epsilon_by_epoch(0.05, 1.0, 50, 20, 1e-5, "rdp")
    assert len(by_epoch) == 3
    assert by_epoch == sorted(by_epoch) and by_epoch[0] < by_epoch[-1]
    assert by_epoch[-1] == acc.epsilon_rdp(0.05, 1.0, 50, 1e-5)
    assert by_epoch[0] == acc.epsilon_rdp(0.05, 1.0, 20, 1e-5)


@pytest.mark.parametrize(
    "accountant, target, q, steps",
    [
        ("rdp", 8.0, 64 / 1100, 102),  # the embedded default's eps8
        ("rdp", 2.0, 64 / 1100, 102),
        ("rdp", 1.0, 256 / 50000, 2000),
        ("rdp", 50.0, 0.05, 100),
        ("pld", 2.0, 0.05, 50),
    ],
)
def test_calibration_round_trip(accountant, target, q, steps):
    sigma = acc.calibrate_sigma(target, q, steps, 1e-5, accountant)
    eps = acc.epsilon(q, sigma, steps, 1e-5, accountant)
    assert target * (1 - acc.CALIBRATION_RTOL) <= eps <= target
    # Minimal: a little less noise would overshoot the target.
    assert acc.epsilon(q, sigma * 0.995, steps, 1e-5, accountant) > target


def test_calibration_to_the_cross_check_epsilon_gives_back_its_sigma():
    sigma = acc.calibrate_sigma(1.48631, **{k: CIFAR[k] for k in ("q", "steps", "delta")})
    assert sigma == pytest.approx(1.0, rel=1e-3)


def test_unreachable_target_is_a_clear_error():
    with pytest.raises(acc.CalibrationError, match=r"target epsilon 0.001 is unreachable \(rdp\)"):
        acc.calibrate_sigma(1e-3, 1.0, 100000, 1e-5, "rdp")


def test_target_below_the_search_range_is_a_clear_error():
    with pytest.raises(acc.CalibrationError, match="even at sigma=0.1, the bottom"):
        acc.calibrate_sigma(1e9, 0.01, 10, 1e-5, "rdp")


@pytest.mark.parametrize("target", [0.0, -1.0, math.inf])
def test_calibration_rejects_bad_targets(target):
    with pytest.raises(ValueError, match="expected a positive finite number"):
        acc.calibrate_sigma(target, 0.1, 10, 1e-5)


# -- the privacy file ------------------------------------------------------------------------
def test_schedule_of_the_embedded_default():
    plan = calibrate.schedule(n_train=1100, batch_size=64, epochs=6)
    assert plan["sample_rate"] == pytest.approx(64 / 1100)
    assert plan["steps_per_epoch"] == 17  # round(17.19)
    assert plan["steps"] == 102
    assert plan["expected_batch_size"] == pytest.approx(64.0)


def test_schedule_with_fractional_epochs_and_full_batch():
    assert calibrate.schedule(100, 10, 2.5)["steps"] == 25
    full = calibrate.schedule(100, 100, 3)
    assert (full["sample_rate"], full["steps_per_epoch"], full["steps"]) == (1.0, 1, 3)


def test_batch_larger_than_the_training_set_is_an_error():
    with pytest.raises(ConfigError, match=r"training.batch_size: 200 is larger than the training"):
        calibrate.schedule(100, 200, 1)


def test_plan_for_a_target_epsilon():
    rec = calibrate.privacy_plan("eps8", n_train=1100, batch_size=64, epochs=6, delta=1e-5)
    assert rec["level"] == "eps8" and rec["private"] is True
    assert rec["target_epsilon"] == 8.0
    assert rec["accountant"] == "rdp" and rec["sampling"] == "poisson"
    assert rec["epsilon"] == rec["eps_rdp"] <= 8.0
    assert rec["eps_rdp"] >= 8.0 * (1 - acc.CALIBRATION_RTOL)
    assert rec["eps_pld"] < rec["eps_rdp"]
    assert rec["rdp_orders"] == list(acc.RDP_ORDERS)
    assert rec["pld_value_discretization_interval"] == acc.PLD_VALUE_DISCRETIZATION_INTERVAL
    assert rec["steps"] == 102 and rec["steps_per_epoch"] == 17
    assert len(rec["eps_by_epoch"]) == 6 and rec["eps_by_epoch"][-1] == rec["epsilon"]
    assert rec["eps_by_epoch"] == sorted(rec["eps_by_epoch"])
    # Inside the first epoch (17 steps): 1, 2, 4, 8 and 16 steps, rising to the epoch's value.
    inside = rec["eps_first_epoch_steps"]
    assert list(inside) == ["1", "2", "4", "8", "16"]
    assert (
        list(inside.values()) == sorted(inside.values()) and inside["16"] < rec["eps_by_epoch"][0]
    )
    assert inside["4"] == acc.epsilon_rdp(rec["sample_rate"], rec["noise_multiplier"], 4, 1e-5)
    assert rec["noise_multiplier"] == pytest.approx(0.7843, abs=1e-3)
    assert rec["n_train"] == 1100 and rec["epochs"] == 6 and rec["delta"] == 1e-5


def test_plan_for_a_given_sigma_with_pld_headline():
    rec = calibrate.privacy_plan("sigma2", 200, 20, 2, 1e-4, accountant="pld")
    assert rec["noise_multiplier"] == 2.0 and rec["target_epsilon"] is None
    assert rec["epsilon"] == rec["eps_pld"]
    assert rec["eps_rdp"] == acc.epsilon_rdp(0.1, 2.0, 20, 1e-4)
    assert len(rec["eps_by_epoch"]) == 2
    assert rec["eps_by_epoch"][0] == acc.epsilon_pld(0.1, 2.0, 10, 1e-4)


def test_plan_for_non_private():
    rec = calibrate.privacy_plan("none", 1100, 64, 6, 1e-5)
    assert rec["private"] is False and rec["noise_multiplier"] == 0.0
    assert rec["epsilon"] is None and rec["eps_rdp"] is None and rec["eps_pld"] is None
    assert rec["eps_by_epoch"] == [None] * 6
    assert rec["steps"] == 102


def test_delta_not_below_one_over_n_is_an_error():
    with pytest.raises(ConfigError, match=r"privacy.delta: 0.01 is not below 1/n_train = 0.01"):
        calibrate.privacy_plan("eps8", 100, 10, 1, 0.01)


def test_zero_noise_level_is_an_error():
    with pytest.raises(ConfigError, match="'sigma0' adds no noise"):
        calibrate.privacy_plan("sigma0", 100, 10, 1, 1e-5)


def _split(tmp_path, n_train):
    path = tmp_path / "balanced.npz"
    np.savez(
        path,
        train=np.arange(n_train, dtype=np.int64),
        holdout=np.arange(n_train, n_train + 5, dtype=np.int64),
        test=np.arange(n_train + 5, n_train + 10, dtype=np.int64),
    )
    return path


def test_calibrate_step_writes_the_privacy_file(tmp_path, umask022):
    split = _split(tmp_path, 300)
    out = tmp_path / "privacy/balanced/eps4.json"
    cmd = [sys.executable, "-m", "dpscale.privacy.calibrate", "--split", str(split)]
    cmd += ["--level", "eps4", "--batch-size", "30", "--epochs", "3", "--delta", "1e-4"]
    cmd += ["--accountant", "rdp", "--out", str(out), "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rec = json.loads(out.read_text())
    assert rec["n_train"] == 300 and rec["sample_rate"] == 0.1 and rec["steps"] == 30
    assert rec["epsilon"] <= 4.0 and len(rec["eps_by_epoch"]) == 3
    assert "rdp, delta=0.0001, poisson" in done.stdout
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind
    assert out.stat().st_mode & 0o777 == 0o644  # colleagues can read it, as after open()


def test_calibrate_step_fails_in_one_line(tmp_path):
    split = _split(tmp_path, 50)
    out = tmp_path / "eps4.json"
    cmd = [sys.executable, "-m", "dpscale.privacy.calibrate", "--split", str(split)]
    cmd += ["--level", "eps4", "--batch-size", "10", "--epochs", "1", "--delta", "0.05"]
    cmd += ["--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode != 0 and not out.exists()
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "dpscale.privacy.calibrate: config error: privacy.delta: 0.05 is not below "
        "1/n_train = 0.02 (n_train = 50); expected delta < 1/n_train"
    ]


def test_large_batch_simulation_keeps_sigma_over_batch_and_the_large_runs_steps():
    n, small, large, epochs, delta = 2000, 20, 200, 3, 1e-5
    real = calibrate.privacy_plan("eps4", n, large, epochs, delta)
    sim = calibrate.privacy_plan("eps4", n, small, epochs, delta, simulate_batch_size=large)
    assert sim["steps"] == real["steps"] == 30
    assert sim["sample_rate"] == small / n and sim["steps_per_epoch"] == 100
    assert sim["epochs"] == pytest.approx(0.3)  # the large run's steps at the small q
    assert sim["simulated_noise_multiplier"] == pytest.approx(real["noise_multiplier"])
    assert sim["noise_multiplier"] / small == pytest.approx(real["noise_multiplier"] / large)
    # The predicted run's epsilon is the large run's; this run's own guarantee is far weaker.
    assert sim["simulated_epsilon"] == pytest.approx(real["epsilon"])
    assert sim["epsilon"] == acc.epsilon_rdp(small / n, sim["noise_multiplier"], 30, delta)
    assert sim["epsilon"] > 10 * real["epsilon"]
    assert "not private at simulated_epsilon" in sim["epsilon_note"]
    assert real["simulated_epsilon"] is None and real["epsilon_note"] is None


def test_simulating_a_smaller_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="simulate_batch_size: 10 is not above"):
        calibrate.privacy_plan("eps4", 1000, 20, 1, 1e-5, simulate_batch_size=10)
