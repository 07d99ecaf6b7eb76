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
from spectralmc_server.engine.processes.gbm_barrier import GBMBarrierProcess
from spectralmc_server.engine.processes.gbm_barrier_discrete import GBMBarrierDiscreteProcess
from spectralmc_server.engine.processes.heston import HestonProcess
from spectralmc_server.engine.processes.heston_barrier import HestonBarrierProcess
from spectralmc_server.engine.processes.merton import MertonProcess
from spectralmc_server.engine.processes.rbergomi import RoughBergomiProcess

PROCESSES: dict[str, Process] = {
    "gbm": GBMProcess(),
    "heston": HestonProcess(),
    "merton": MertonProcess(),
    "asian": AsianProcess(),
    "rbergomi": RoughBergomiProcess(),
}
# The laws a model can be trained on: the contracts' processes, and the defective laws
# of barrier contracts (a contract names its process and a barrier, never these).
MODEL_PROCESSES: dict[str, Process] = {
    **PROCESSES,
    "gbm_barrier": GBMBarrierProcess(),
    "gbm_barrier_discrete": GBMBarrierDiscreteProcess(),
    "heston_barrier": HestonBarrierProcess(),
}


def get_process(name: str) -> Process:
    """The process (or barrier law) called ``name``; a clear error listing the known ones otherwise."""
    try:
        return MODEL_PROCESSES[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_PROCESSES))
        raise ValueError(f"unknown process {name!r}: known processes are {known}") from None


__all__ = [
    "EXPIRY",
    "MODEL_PROCESSES",
    "PROCESSES",
    "AsianProcess",
    "GBMBarrierDiscreteProcess",
    "GBMBarrierProcess",
    "GBMProcess",
    "HestonBarrierProcess",
    "HestonProcess",
    "MertonProcess",
    "ModelDomain",
    "ParameterRange",
    "Process",
    "RoughBergomiProcess",
    "get_process",
]
