"""The pipeline's one privacy accountant: DP-SGD with Poisson sampling, on dp-accounting 0.6.0.

A DP-SGD run is `steps` compositions of the Poisson-subsampled Gaussian mechanism with sampling
rate q and noise multiplier sigma, under the add-or-remove-one neighbouring relation (what
Opacus, TF Privacy and Objax assume). Two accountants, always both recorded:

- "rdp": Renyi DP over ONE fixed order list, `RDP_ORDERS` (Opacus' default), converted to
  (eps, delta) by dp-accounting's `compute_epsilon`. With the same order list Opacus, dp-accounting
  and objax agree exactly (1.48631 for q=256/50000, sigma=1, 2000 steps, delta=1e-5) when the
  best order is an integer. Where it is fractional (sigma < 1) dp-accounting 0.6.0's RDP is a
  little above the exact integral, which Opacus 1.6.0 matches: 7.99894 vs 7.99864 for the
  embedded default's eps8 (q=64/1100, sigma=0.78429, 102 steps), 16.132 vs 16.081 at q=0.05,
  sigma=0.7, 300 steps, delta=1e-6. Conservative, so still a valid bound.
- "pld": privacy loss distributions with the pessimistic (upper-bound) discretization of
  `PLD_VALUE_DISCRETIZATION_INTERVAL`, widened in proportion to epsilon beyond an RDP epsilon
  of `PLD_GRID_SCALE_ABOVE`; tighter than RDP (1.23976 in the same case).

At small sigma (below ~0.5) dp-accounting drops fractional RDP orders whose series do not
converge (it logs a warning per order). The remaining orders still give a valid bound, but
RDP epsilon is then not strictly monotone in sigma (q=64/1100, 102 steps, delta=1e-5: 99.94 at
sigma 0.303, 121.7 at 0.31); calibration still guarantees eps(sigma) <= target.

Every function here is pure (numbers in, numbers out) and validates its input with a one-line
error. dp-accounting lives in the base env only: backends read epsilon from the privacy file.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

#: RDP orders, fixed for the whole pipeline (Opacus' default list: 151 orders, 1.1 .. 63).
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

#: PLD grid step for privacy losses (dp-accounting's default). The estimate is pessimistic, so
#: a coarser grid only overstates epsilon. Against 3e-5 (measured 2026-11-23, one CPU core):
#: 1e-4 overstates by 1.8e-5 (q=256/50000, sigma=1, 2000 steps, delta=1e-5: eps 1.23974) and
#: by 1.7e-4 at q=1024/1.28M, sigma=0.8, 12500 steps, delta=1e-6 (eps 0.8242), taking 2-4 s;
#: 3e-4 is 2-3x faster but overstates those by 1.7e-4 and 1.7e-3, 1e-3 by 1.7e-3 and 2.2e-2.
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-4
#: PLD's time grows with epsilon / grid step (sigma=0.3, q=0.058, 102 steps: eps 74 took 35 s;
#: sigma=0.15 did not finish in 2 min), so above an RDP epsilon of PLD_GRID_SCALE_ABOVE the grid
#: step grows in proportion to it: the relative error stays ~1e-5 to 1e-7 and the time 1-3 s
#: (eps 74 / 370 / 876 at sigma 0.3 / 0.15 / 0.1 in the case above).
PLD_GRID_SCALE_ABOVE = 10.0

ACCOUNTANTS = ("rdp", "pld")
SAMPLING = "poisson"
NEIGHBORING = "add_or_remove_one"

#: Calibration searches sigma in this range; targets outside it are a clear error.
SIGMA_MIN, SIGMA_MAX = 0.1, 1000.0
#: Calibration stops when target * (1 - CALIBRATION_RTOL) <= eps(sigma) <= target.
CALIBRATION_RTOL = 1e-3


class CalibrationError(ValueError):
    """The target epsilon cannot be met with a noise multiplier in [SIGMA_MIN, SIGMA_MAX]."""


def _check(q: float, sigma: float, steps: int, delta: float) -> None:
    if not 0 < q <= 1:
        raise ValueError(f"sample rate q={q!r} is out of range; expected 0 < q <= 1")
    if not sigma >= 0:
        raise ValueError(f"noise multiplier sigma={sigma!r} is negative; expected sigma >= 0")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps={steps!r} is not a positive integer; expected steps >= 1")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r} is out of range; expected 0 < delta < 1")


def _event(q: float, sigma: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), int(steps)
    )


def epsilon_rdp(q: float, sigma: float, steps: int, delta: float) -> float:
    """RDP epsilon over RDP_ORDERS; inf when sigma is 0 (no noise, no privacy)."""
    _check(q, sigma, steps, delta)
    if sigma == 0:
        return math.inf
    accountant = RdpAccountant(list(RDP_ORDERS))
    accountant.compose(_event(q, sigma, steps))
    return float(accountant.get_epsilon(delta))


def pld_discretization_interval(q: float, sigma: float, steps: int, delta: float) -> float:
    """The PLD grid step used for these parameters (see PLD_GRID_SCALE_ABOVE)."""
    eps_rdp = epsilon_rdp(q, sigma, steps, delta)
    scale = min(max(1.0, eps_rdp / PLD_GRID_SCALE_ABOVE), 1e4)  # 1e4 also catches inf
    return PLD_VALUE_DISCRETIZATION_INTERVAL * scale


def epsilon_pld(q: float, sigma: float, steps: int, delta: float) -> float:
    """PLD epsilon (pessimistic, grid `pld_discretization_interval`); inf when sigma is 0."""
    _check(q, sigma, steps, delta)
    if sigma == 0:
        return math.inf
    interval = pld_discretization_interval(q, sigma, steps, delta)
    accountant = PLDAccountant(value_discretization_interval=interval)
    accountant.compose(_event(q, sigma, steps))
    return float(accountant.get_epsilon(delta))


_EPSILON: dict[str, Callable[[float, float, int, float], float]] = {
    "rdp": epsilon_rdp,
    "pld": epsilon_pld,
}


def epsilon(q: float, sigma: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps with the named accountant."""
    if accountant not in _EPSILON:
        raise ValueError(f"unknown accountant {accountant!r}; expected one of rdp, pld")
    return _EPSILON[accountant](q, sigma, steps, delta)


def epoch_steps(steps: int, steps_per_epoch: int) -> list[int]:
    """Cumulative step count at the end of each epoch (the last, possibly partial, included)."""
    if steps_per_epoch < 1 or steps < 1:
        raise ValueError(f"steps={steps} and steps_per_epoch={steps_per_epoch}; expected >= 1")
    n_epochs = -(-steps // steps_per_epoch)
    return [min(steps, k * steps_per_epoch) for k in range(1, n_epochs + 1)]


def epsilon_by_epoch(
    q: float, sigma: float, steps: int, steps_per_epoch: int, delta: float, accountant: str = "rdp"
) -> list[float]:
    """Epsilon after each epoch (see `epoch_steps`); the last entry is `epsilon(...)` itself."""
    return [epsilon(q, sigma, k, delta, accountant) for k in epoch_steps(steps, steps_per_epoch)]


def calibrate_sigma(
    target_epsilon: float,
    q: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    rtol: float = CALIBRATION_RTOL,
) -> float:
    """The smallest sigma (to `rtol` in epsilon) with epsilon(q, sigma, steps, delta) <= target.

    A bracketing search on the named accountant: the answer is the smallest sigma seen with
    eps <= target, returned once target * (1 - rtol) <= eps(sigma) <= target. Epsilon is
    smooth and nearly a power law in sigma, so each trial sigma comes from a secant step in
    log-log aimed inside that window, kept inside the bracket (lo, hi) once there is one, and
    replaced by bisection of the bracket whenever the secant stalls (the same end moved twice
    in a row). That takes 3-5 epsilons instead of bisection's ~15, which matters for PLD at
    seconds each. Raises CalibrationError when the target needs a sigma outside
    [SIGMA_MIN, SIGMA_MAX].
    """
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target epsilon {target_epsilon!r}; expected a positive finite number")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol={rtol!r}; expected 0 < rtol < 1")
    _check(q, 1.0, steps, delta)

    def eps(sigma: float) -> float:
        return epsilon(q, sigma, steps, delta, accountant)

    # Start at sigma 1 with eps ~ 1/sigma^1.5. For PLD, start at the RDP answer (cheap) with
    # RDP's local slope: PLD is tighter, so its sigma is a little lower, and starting there
    # keeps PLD away from tiny sigmas, where its grid, and so its time, grows with epsilon.
    guess, slope = 1.0, -1.5
    if accountant == "pld":
        with contextlib.suppress(CalibrationError):
            guess = calibrate_sigma(target_epsilon, q, steps, delta, "rdp", rtol)
            near = epsilon_rdp(q, guess * 0.95, steps, delta)
            slope = math.log(near / epsilon_rdp(q, guess, steps, delta)) / math.log(0.95)
    return _search(eps, target_epsilon, guess, slope, rtol, accountant)


def _search(
    eps: Callable[[float], float],
    target: float,
    guess: float,
    slope: float,
    rtol: float,
    accountant: str,
) -> float:
    aim = math.log(target * (1 - rtol / 2))
    x_min, x_max = math.log(SIGMA_MIN), math.log(SIGMA_MAX)
    lo = hi = None  # (log sigma, eps): largest sigma over target, smallest within it
    prev = None
    moved: list[str] = []
    x = min(max(math.log(guess), x_min), x_max)
    for _ in range(100):
        e = eps(math.exp(x))
        if e <= target:
            if hi is None or x < hi[0]:
                hi = (x, e)
            moved.append("hi")
            if e >= target * (1 - rtol):
                return math.exp(x)
            if x <= x_min:
                raise CalibrationError(
                    f"target epsilon {target} is reached ({accountant}) even at sigma={SIGMA_MIN}, "
                    "the bottom of the search range; expected a smaller target (or give the "
                    "noise directly with a sigma<value> level)"
                )
        else:
            if lo is None or x > lo[0]:
                lo = (x, e)
            moved.append("lo")
            if x >= x_max:
                raise CalibrationError(
                    f"target epsilon {target} is unreachable ({accountant}): even "
                    f"sigma={SIGMA_MAX}, the top of the search range, gives eps {e:.4g}; "
                    "expected a larger "
                    "target epsilon or delta, or fewer epochs"
                )
        # Secant slope from the last two trials when they are usable, else the prior.
        if prev is not None and math.isfinite(e) and math.isfinite(prev[1]) and prev[0] != x:
            secant = (math.log(e) - math.log(prev[1])) / (x - prev[0])
            if secant < 0:
                slope = secant
        prev = (x, e)
        step = (aim - math.log(e)) / slope if math.isfinite(e) else math.log(2.0)
        if lo is not None and hi is not None:
            width = hi[0] - lo[0]
            stalled = len(moved) >= 2 and moved[-1] == moved[-2]
            if stalled or not math.isfinite(e):
                x_next = lo[0] + width / 2
                moved.append("bisect")
            else:
                x_next = min(max(x + step, lo[0] + 0.02 * width), hi[0] - 0.02 * width)
            if not lo[0] < x_next < hi[0]:
                break
        else:
            # No bracket yet: walk at most a factor 4 in sigma per trial.
            x_next = min(max(x + max(min(step, math.log(4.0)), -math.log(4.0)), x_min), x_max)
        x = x_next
    raise CalibrationError(
        f"{accountant} calibration for epsilon {target} did not reach rtol {rtol} "
        f"(bracket {lo}, {hi}); expected epsilon to be continuous in sigma"
    )
