"""Typed application keys: every object the app shares, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from spectralmc_server.engine.device import Budgets
from spectralmc_server.engine_service.views import ModelDirectory
from spectralmc_server.service.batcher import Batcher
from spectralmc_server.service.engine import EngineClient
from spectralmc_server.service.jobs import Schedule
from spectralmc_server.service.marketdata import MarketData
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.service.stream import StreamHub
from spectralmc_server.settings import Settings
from spectralmc_server.store.objects import ObjectStore
from spectralmc_server.store.versions import VersionStore

if TYPE_CHECKING:  # the engine's own objects (thread mode): their modules import torch (lazy_torch.py)
    from spectralmc_server.engine_service.models import ModelHost
    from spectralmc_server.engine_service.worker import ComputeWorker, OnlineTraining


@dataclass
class Lifecycle:
    """What /readyz reports besides the models."""

    started: bool = False
    shutting_down: bool = False
    exit_code: int = 0  # what ``spectralmc serve`` exits with once the server has stopped


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
BUDGETS = web.AppKey("budgets", Budgets)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
OBJECTS: web.AppKey[ObjectStore] = web.AppKey("objects")
ENGINE = web.AppKey("engine", EngineClient)  # the engine, as the HTTP side reaches it
MODELS = web.AppKey("models", ModelDirectory)  # the served models as plain data, pushed by the engine
STORES: web.AppKey[dict[str, VersionStore]] = web.AppKey("stores")  # each served model's store (admin, /v1/models)
# The engine's own objects, set only when it runs on a thread of this process (engine.mode
# "thread"): for tests that look inside it. The HTTP side's code never reads them.
HOST: web.AppKey[ModelHost] = web.AppKey("host")
WORKER: web.AppKey[ComputeWorker] = web.AppKey("worker")
TRAINING: web.AppKey[OnlineTraining] = web.AppKey("training")
BATCHER = web.AppKey("batcher", Batcher)
OPENAPI = web.AppKey("openapi", bytes)
MARKETDATA = web.AppKey("marketdata", MarketData)
STREAMS = web.AppKey("streams", StreamHub)
JOBS: web.AppKey[dict[str, Schedule]] = web.AppKey("jobs")
