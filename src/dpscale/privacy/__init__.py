"""Privacy accounting for the whole pipeline: one accountant, used only in the base env.

`dpscale.privacy.accountant` holds the pure functions (epsilon under RDP with one fixed order
list and under PLD, sigma calibration); `python -m dpscale.privacy.calibrate` writes a level's
privacy file. Backends never import this package: they read sigma, q, steps and epsilon so far
from the privacy file (dp-accounting is not in their venvs).
"""

from dpscale.privacy.accountant import (
    ACCOUNTANTS,
    CALIBRATION_RTOL,
    PLD_GRID_SCALE_ABOVE,
    PLD_VALUE_DISCRETIZATION_INTERVAL,
    RDP_ORDERS,
    SAMPLING,
    SIGMA_MAX,
    SIGMA_MIN,
    CalibrationError,
    calibrate_sigma,
    epoch_steps,
    epsilon,
    epsilon_by_epoch,
    epsilon_pld,
    epsilon_rdp,
    pld_discretization_interval,
)

__all__ = [
    "ACCOUNTANTS",
    "CALIBRATION_RTOL",
    "PLD_GRID_SCALE_ABOVE",
    "PLD_VALUE_DISCRETIZATION_INTERVAL",
    "RDP_ORDERS",
    "SAMPLING",
    "SIGMA_MAX",
    "SIGMA_MIN",
    "CalibrationError",
    "calibrate_sigma",
    "epoch_steps",
    "epsilon",
    "epsilon_by_epoch",
    "epsilon_pld",
    "epsilon_rdp",
    "pld_discretization_interval",
]
