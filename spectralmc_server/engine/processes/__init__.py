"""Stochastic processes the engine can simulate and learn."""

from __future__ import annotations

from spectralmc_server.engine.processes.asian import AsianProcess
from spectralmc_server.engine.processes.base import (
    EXPIRY,
    ModelDomain,
    ParameterRange,
    Process,
)
from spectralmc_server.engine.processes.gbm import GBMProcess
from spectralmc_server.engine.processes.heston import HestonProcess
from spectralmc_server.engine.processes.merton import MertonProcess

PROCESSES: dict[str, Process] = {
    "gbm": GBMProcess(),
    "heston": HestonProcess(),
    "merton": MertonProcess(),
    "asian": AsianProcess(),
}


def get_process(name: str) -> Process:
    """The process called ``name``; a clear error listing the known ones otherwise."""
    try:
        return PROCESSES[name]
    except KeyError:
        known = ", ".join(sorted(PROCESSES))
        raise ValueError(f"unknown process {name!r}: known processes are {known}") from None


__all__ = [
    "EXPIRY",
    "PROCESSES",
    "AsianProcess",
    "GBMProcess",
    "HestonProcess",
    "MertonProcess",
    "ModelDomain",
    "ParameterRange",
    "Process",
    "get_process",
]
