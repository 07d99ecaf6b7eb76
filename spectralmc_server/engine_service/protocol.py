"""The frames the HTTP process and its engine process exchange (over ipc/framing.py).

HTTP -> engine: :class:`Start` first (the settings: never through the environment, so
secrets stay out of ``/proc/*/environ``), then :class:`Call` (answered by a
:class:`Reply` with the same ``corr``), :class:`Tell` (no answer) and :class:`Shutdown`.
Engine -> HTTP: :class:`Ready` once the models are loaded, then replies and, whenever
they change, the served models (``Directory``) and the :class:`EngineStatus`
(every ``engine.status_seconds`` too: its absence for ``heartbeat_timeout_seconds``
means a hung engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spectralmc_server.engine_service.messages import EngineStatus
from spectralmc_server.engine_service.views import Directory
from spectralmc_server.ipc.unpickling import http_side_allow
from spectralmc_server.settings import Settings

PROTOCOL = 1


@dataclass(frozen=True, slots=True)
class Start:
    settings: Settings
    protocol: int = PROTOCOL
    index: int | None = None  # this engine's place among several (engine.processes > 1): its metrics' label


@dataclass(frozen=True, slots=True)
class Ready:
    directory: Directory
    status: EngineStatus
    protocol: int = PROTOCOL


@dataclass(frozen=True, slots=True)
class StartFailed:
    """The engine could not start; ``store``: because the model store failed."""

    message: str
    store: bool = False


@dataclass(frozen=True, slots=True)
class Call:
    corr: int
    op: str  # an EngineCore method: price, fit_slice, commit, poll, hold; or metrics
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Tell:
    op: str  # forget, fit_start, fit_cancel
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    corr: int
    value: Any = None
    error: str | None = None  # the exception's kind: dead, job_failed, store_unavailable, internal
    message: str = ""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Stop: commit on shutdown if configured, finish the worker's jobs, exit 0."""


CALLS = frozenset({"price", "fit_slice", "commit", "poll", "hold", "metrics"})
TELLS = frozenset({"forget", "fit_start", "fit_cancel"})

# What the HTTP side may unpickle from its engine: plain data and these modules' classes
# (never torch: a tensor leaking into a reply fails loudly).
_HTTP_SIDE_MODULES = frozenset(
    {
        "spectralmc_server.engine_service.protocol",
        "spectralmc_server.engine_service.messages",
        "spectralmc_server.engine.view",
        "spectralmc_server.engine_service.metrics",  # TrainingState
        "spectralmc_server.engine_service.views",
        "spectralmc_server.engine.device",  # BudgetReport (plain dataclasses)
        "spectralmc_server.marketdata.objects",  # ModelParams in a fit's report
        "spectralmc_server.pricing.errors",
    }
)


def http_allow(module: str, name: str) -> bool:
    return http_side_allow(module, name) or (module in _HTTP_SIDE_MODULES and not name.startswith("_"))
