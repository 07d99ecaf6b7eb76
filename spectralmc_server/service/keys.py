"""Typed application keys: every object the app shares, in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from spectralmc_server.engine.device import Budgets
from spectralmc_server.service.batcher import Batcher
from spectralmc_server.service.jobs import Schedule
from spectralmc_server.service.marketdata import MarketData
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.service.models import ModelHost
from spectralmc_server.service.stream import StreamHub
from spectralmc_server.service.worker import ComputeWorker, OnlineTraining
from spectralmc_server.settings import Settings
from spectralmc_server.store.objects import ObjectStore


@dataclass
class Lifecycle:
    """What /readyz reports besides the models."""

    started: bool = False
    shutting_down: bool = False
    training_note: str | None = None  # why online training is off, when it is
    background: set[object] = field(default_factory=set)  # commit tasks kept alive


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
BUDGETS = web.AppKey("budgets", Budgets)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
OBJECTS: web.AppKey[ObjectStore] = web.AppKey("objects")
HOST = web.AppKey("host", ModelHost)
WORKER = web.AppKey("worker", ComputeWorker)
TRAINING = web.AppKey("training", OnlineTraining)
BATCHER = web.AppKey("batcher", Batcher)
OPENAPI = web.AppKey("openapi", bytes)
MARKETDATA = web.AppKey("marketdata", MarketData)
STREAMS = web.AppKey("streams", StreamHub)
JOBS: web.AppKey[dict[str, Schedule]] = web.AppKey("jobs")
