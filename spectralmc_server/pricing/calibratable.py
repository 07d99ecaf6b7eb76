"""The processes calibration fits (pricing/calibration.py), named without importing
torch: the settings (the ``calibrate`` job's ``process``), the ``POST /v1/calibrate``
body and ``spectralmc calibrate --process`` all take their choices from here, so a
process added to calibration is accepted everywhere at once."""

from __future__ import annotations

from typing import Literal, get_args

# Each needs a start heuristic (engine/fit.py, pricing/calibration.py STARTS).
CalibratableProcess = Literal["heston", "rbergomi"]
CALIBRATABLE: tuple[str, ...] = get_args(CalibratableProcess)

# Reference corrections of a learned fit (pricing/calibration.py calibrate_snapshot
# ``corrections``): at most MAX_CORRECTIONS; a Monte-Carlo reference (rough Bergomi) takes
# CORRECTION_PATHS paths per expiry by default, at least MIN_CORRECTION_PATHS (its
# standard error needs two antithetic pairs) and at most MAX_CORRECTION_PATHS.
MAX_CORRECTIONS = 3
CORRECTION_PATHS = 1 << 17
MIN_CORRECTION_PATHS = 4
MAX_CORRECTION_PATHS = 1 << 20

__all__ = [
    "CALIBRATABLE",
    "CORRECTION_PATHS",
    "MAX_CORRECTIONS",
    "MAX_CORRECTION_PATHS",
    "MIN_CORRECTION_PATHS",
    "CalibratableProcess",
]
