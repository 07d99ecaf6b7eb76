"""The processes calibration fits (pricing/calibration.py), named without importing
torch: the settings (the ``calibrate`` job's ``process``), the ``POST /v1/calibrate``
body and ``spectralmc calibrate --process`` all take their choices from here, so a
process added to calibration is accepted everywhere at once."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import ValidationInfo

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


def paths_need_corrections(paths: int, info: ValidationInfo) -> int:
    """A ``correction_paths`` field validator (the calibrate body, the calibrate job):
    given without ``corrections`` it would be silently unused, so it is refused."""
    if info.data.get("corrections", 1) == 0:  # (an invalid corrections is named on its own)
        raise ValueError("correction_paths is only used with corrections (1 to 3): give both, or neither")
    return paths


__all__ = [
    "CALIBRATABLE",
    "CORRECTION_PATHS",
    "MAX_CORRECTIONS",
    "MAX_CORRECTION_PATHS",
    "MIN_CORRECTION_PATHS",
    "CalibratableProcess",
    "paths_need_corrections",
]
