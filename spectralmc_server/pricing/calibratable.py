"""The processes calibration fits (pricing/calibration.py), named without importing
torch: the settings (the ``calibrate`` job's ``process``), the ``POST /v1/calibrate``
body and ``spectralmc calibrate --process`` all take their choices from here, so a
process added to calibration is accepted everywhere at once."""

from __future__ import annotations

from typing import Literal, get_args

# Each needs a start heuristic (engine/fit.py, pricing/calibration.py STARTS).
CalibratableProcess = Literal["heston", "rbergomi"]
CALIBRATABLE: tuple[str, ...] = get_args(CalibratableProcess)

__all__ = ["CALIBRATABLE", "CalibratableProcess"]
