"""The aiohttp application: ``create_app(settings)`` builds it, nothing happens at import.

Resources start in order and stop in reverse, each a ``cleanup_ctx``: object store ->
market data -> the engine (models, compute worker, online training: on a thread here or
in its own process, engine_service/) -> valuation queue -> stream hub -> declared jobs
-> GC tuning -> store GC (gc_schedule.py) -> memory (memory.py).
Graceful shutdown (SIGTERM/SIGINT): readiness fails at once, new work gets 503,
queued and in-flight requests are answered, the worker finishes its jobs, and the
steps trained since the last commit are committed when they beat the served version
(``train.commit_on_shutdown``; engine_service/online.py), or logged as discarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from spectralmc_server.engine.device import BudgetReport, Budgets
from spectralmc_server.engine_service.messages import EngineDeadError
from spectralmc_server.engine_service.metrics import ModelState, TrainingState, process_stats
from spectralmc_server.engine_service.rss import freeze_loaded
from spectralmc_server.engine_service.views import ModelDirectory
from spectralmc_server.marketdata.store import SnapshotStore, iso
from spectralmc_server.pricing.schemas import PriceRequest
from spectralmc_server.service import (
    admin,
    calibrate_routes,
    edge,
    http_workers,
    keys,
    pages,
    routes,
    snapshot_routes,
    validation_routes,
)
from spectralmc_server.service.batcher import Batcher
from spectralmc_server.service.calibrate_routes import calibrate_action
from spectralmc_server.service.engine import EngineClient, LocalEngine
from spectralmc_server.service.engine_pool import EnginePool
from spectralmc_server.service.engine_process import ProcessEngine
from spectralmc_server.service.errors import (
    APIError,
    MethodNotAllowed,
    NotFound,
    TooLarge,
    Unavailable,
    UnsupportedMediaType,
    store_unavailable,
)
from spectralmc_server.service.gc_schedule import store_gc_ctx
from spectralmc_server.service.jobs import Schedule, derive_action, price_action
from spectralmc_server.service.marketdata import MarketData
from spectralmc_server.service.memory import bounded_send, memory_ctx
from spectralmc_server.service.metrics import Metrics, StateSource
from spectralmc_server.service.openapi import openapi_bytes
from spectralmc_server.service.stream import StreamHub
from spectralmc_server.settings import PriceJob, Settings
from spectralmc_server.store.objects import ORPHAN_TEMP_SECONDS, LocalObjectStore, StoreUnavailableError
from spectralmc_server.store.uri import open_store
from spectralmc_server.store.versions import VersionStore

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(exc: APIError) -> web.Response:
    return web.Response(
        body=orjson.dumps(exc.body()), status=exc.status, content_type="application/json", headers=exc.headers
    )


def _from_http(exc: web.HTTPException, request: web.Request) -> APIError:
    if exc.status == 404:
        return NotFound(f"no route {request.method} {request.path}")
    if exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        err: APIError = MethodNotAllowed(f"{request.method} is not allowed on {request.path}; allowed: {allowed}")
        err.headers["Allow"] = allowed
        return err
    if exc.status == 413:
        limit = request.app[keys.SETTINGS].max_body_bytes
        return TooLarge(f"the body is over the {limit} byte limit")
    if exc.status == 415:
        return UnsupportedMediaType(exc.reason)
    generic = APIError(exc.reason or "error")
    generic.status, generic.code = exc.status, "http_error"
    return generic


@web.middleware
async def errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Typed errors -> JSON answers; every request counted and timed by route."""
    t0 = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        response = await handler(request)
    except APIError as exc:
        response = _error_response(exc)
    except web.HTTPException as exc:
        response = _error_response(_from_http(exc, request))
    except StoreUnavailableError as exc:  # the object store is down: the client may retry, nothing is wrong with it
        log.warning("store unavailable on %s %s: %s", request.method, request.path, exc)
        response = _error_response(store_unavailable(exc, retry_after=5, message=f"the store is unavailable: {exc}"))
    except EngineDeadError as exc:  # the engine is down (restarting): the client may retry
        response = _error_response(Unavailable(f"the compute engine is down: {exc}", 5, code="engine_unavailable"))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        generic = APIError("internal error (logged on the server)")
        response = _error_response(generic)
    request.app[keys.METRICS].observe_request(route, request.method, response.status, time.perf_counter() - t0)
    return response


# -- resources ---------------------------------------------------------------------------


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[keys.SETTINGS]
    s3 = s.s3.client_settings()
    if s.store is None:
        (s.data_dir / "store").mkdir(parents=True, exist_ok=True)
    objects = await open_store(s.store_uri, s3)
    app[keys.OBJECTS] = objects
    if isinstance(objects, LocalObjectStore):  # writers killed midway leave temporary files
        removed = await asyncio.to_thread(objects.collect_temporaries, ORPHAN_TEMP_SECONDS)
        log.info(
            "store %s: removed %d orphaned temporary file(s) older than %g s",
            objects.description,
            removed,
            ORPHAN_TEMP_SECONDS,
        )
    yield
    await objects.close()


async def marketdata_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[keys.SETTINGS]
    store = SnapshotStore(app[keys.OBJECTS], s.marketdata.cache_entries)
    app[keys.MARKETDATA] = MarketData(store, app[keys.METRICS])
    await _repair_latest_refs(store)
    yield


async def _repair_latest_refs(store: SnapshotStore) -> None:
    """Move every namespace's latest ref forward over snapshots whose writer died before
    moving it. Best effort: a store that cannot be read now is logged, not fatal (a
    repeated PUT, or the next start, repairs it)."""
    try:
        report = await store.repair()
    except Exception as exc:  # one line, not a traceback: the store being down is no bug
        log.warning(
            "market data: the latest refs were not checked (the store could not be read: %s: %s)",
            type(exc).__name__,
            exc,
        )
        return
    for ns, record in report.moved.items():
        log.warning(
            "market data %s: refs/latest was behind a stored snapshot (a writer stopped before moving it); "
            "moved forward to %s as of %s",
            ns,
            iso(record.val_datetime),
            iso(record.data_asof),
        )
    for ns, problem in report.problems.items():
        log.error("market data %s: refs/latest not checked: %s", ns, problem)
    log.info("market data: checked the latest ref of %d namespace(s), moved %d", report.checked, len(report.moved))


def _give_up(app: web.Application) -> None:
    """The engine keeps dying: drain and exit with status 1 (the orchestrator restarts us)."""
    app[keys.LIFECYCLE].exit_code = 1
    signal.raise_signal(signal.SIGTERM)  # the runner's graceful shutdown (service/edge.py)


async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
    """The engine (engine_service/core.py): on a thread of this process (``engine.mode =
    "thread"``; the engine's objects are then also under keys.HOST, keys.WORKER and
    keys.TRAINING, for tests) or in a process of its own (``"process"``)."""
    s = app[keys.SETTINGS]
    app[keys.STORES] = {n: VersionStore(app[keys.OBJECTS], n) for n in s.models}
    engine: EngineClient
    if s.engine.mode == "process" and s.engine.processes > 1:
        pool = EnginePool(s, app[keys.MODELS], app[keys.METRICS])
        for member in pool.engines:
            member.on_give_up = lambda: _give_up(app)
        engine = pool
    elif s.engine.mode == "process":
        engine = ProcessEngine(s, app[keys.MODELS], app[keys.METRICS])
        engine.on_give_up = lambda: _give_up(app)
    else:  # the engine's modules (and torch) only where it runs: not in process mode
        from spectralmc_server.engine_service.core import EngineCore

        core = EngineCore(s, app[keys.OBJECTS], app[keys.METRICS], app[keys.BUDGETS])
        engine = LocalEngine(core, app[keys.MODELS])
        app[keys.HOST] = core.host
    try:
        await engine.start()
    except BaseException:  # aiohttp cleans up no context when start-up fails: close the store here
        await app[keys.OBJECTS].close()
        raise
    if isinstance(engine, LocalEngine) and engine.core.worker is not None:
        app[keys.WORKER] = engine.core.worker
        if engine.core.training is not None:
            app[keys.TRAINING] = engine.core.training
    app[keys.ENGINE] = engine
    yield
    await engine.stop()


async def queue_ctx(app: web.Application) -> AsyncIterator[None]:
    queue = Batcher(app[keys.SETTINGS].queue, app[keys.ENGINE], app[keys.METRICS], app[keys.MARKETDATA])
    app[keys.BATCHER] = queue
    task = asyncio.create_task(queue.run(), name="valuation-queue")
    app[keys.LIFECYCLE].started = True
    yield
    await queue.drain(app[keys.SETTINGS].shutdown_timeout_seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await queue.stop()


def _pricer(app: web.Application) -> Callable[[PriceRequest], Awaitable[dict[str, Any]]]:
    """Pricing for streams and jobs: through the batcher's one entry, like /v1/price."""
    timeout = app[keys.SETTINGS].request_timeout_seconds

    async def price(request: PriceRequest) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        checked = routes.admitted(app, request)  # the same front door as /v1/price
        return await app[keys.BATCHER].price(checked, deadline, lambda: True)

    return price


async def stream_ctx(app: web.Application) -> AsyncIterator[None]:
    """The stream hub: requotes on new snapshots (here or via other replicas), model
    swaps and intervals."""
    s = app[keys.SETTINGS]
    market = app[keys.MARKETDATA]
    hub = StreamHub(s.stream, app[keys.METRICS], _pricer(app), market, s.marketdata.poll_seconds)
    app[keys.STREAMS] = hub
    market.listeners.append(hub.snapshot_stored)
    app[keys.MODELS].swap_listeners.append(hub.models_changed)
    tasks = [asyncio.create_task(hub.run(), name="stream-hub"), asyncio.create_task(hub.watch(), name="stream-watch")]
    yield
    await hub.close_all()
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    market.listeners.remove(hub.snapshot_stored)
    app[keys.MODELS].swap_listeners.remove(hub.models_changed)


async def jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    """The declared jobs, each on its own drift-free schedule."""
    s = app[keys.SETTINGS]
    market, hub, metrics = app[keys.MARKETDATA], app[keys.STREAMS], app[keys.METRICS]
    schedules: dict[str, Schedule] = {}
    for job in s.jobs:
        if isinstance(job, PriceJob):
            if not s.serves:
                log.warning("job %s prices, and role %r does not: not scheduled", job.name, s.role)
                continue
            action = price_action(job, s.portfolios[job.portfolio], market, _pricer(app), hub.publish)
            hub.declare_topic(job.topic or job.name)  # subscriptions to other topics are refused
        else:
            action = calibrate_action(job, app) if job.derive == "calibrate" else derive_action(job, market)
        schedules[job.name] = Schedule(job.name, job.every_seconds, action, metrics)
    app[keys.JOBS] = schedules
    tasks = [asyncio.create_task(sch.run(), name=f"schedule:{name}") for name, sch in schedules.items()]
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def gc_ctx(app: web.Application) -> AsyncIterator[None]:
    """Once everything is loaded: freeze it out of the cyclic GC's reach, and make young
    collections rarer. Full collections over torch and pydantic objects otherwise stall
    the event loop for 100+ ms every few seconds under load."""
    s = app[keys.SETTINGS]
    previous = freeze_loaded(s.gc_freeze, s.gc_gen0_threshold)
    yield
    gc.set_threshold(*previous)
    if s.gc_freeze:
        gc.unfreeze()


async def on_shutdown(app: web.Application) -> None:
    """Readiness fails at once; queued work is answered before resources stop."""
    app[keys.LIFECYCLE].shutting_down = True
    if keys.STREAMS in app:
        await app[keys.STREAMS].close_all()
    if keys.BATCHER in app:
        await app[keys.BATCHER].drain(app[keys.SETTINGS].shutdown_timeout_seconds)


def _state_source(app: web.Application) -> StateSource:
    def training_state() -> TrainingState | None:
        engine = app.get(keys.ENGINE)
        return None if engine is None else engine.status.training

    def budgets() -> list[BudgetReport]:
        engine = app.get(keys.ENGINE)
        return [] if engine is None else list(engine.status.budgets)

    def queue_state() -> tuple[int, int, int, int]:
        q = app.get(keys.BATCHER)
        qs = app[keys.SETTINGS].queue
        n, c = q.depth if q is not None else (0, 0)
        return n, c, qs.max_pending_requests, qs.max_pending_contracts

    def model_states() -> list[ModelState]:  # the latest picture, not the first one
        return app[keys.MODELS].current.states()

    return StateSource(
        models=model_states,
        budgets=budgets,
        training=training_state,
        queue=queue_state,
        ready=lambda: routes.not_ready_reason(app) is None,
        streams=lambda: (
            (len(app[keys.STREAMS].connections), app[keys.STREAMS].subscriptions) if keys.STREAMS in app else (0, 0)
        ),
        jobs=lambda: [(name, sch.last_success) for name, sch in app.get(keys.JOBS, {}).items()],
        device=app[keys.SETTINGS].engine.mode == "thread",
        processes=lambda: [
            ("http", process_stats()),
            *(engine.processes_stats() if (engine := app.get(keys.ENGINE)) is not None else []),
        ],
    )


def create_app(
    settings: Settings, metrics: Metrics | None = None, *, worker: http_workers.HTTPWorker | None = None
) -> web.Application:
    """The application for ``settings`` (resources start when it is run); ``worker``:
    its place among several HTTP workers (service/http_workers.py)."""
    app = web.Application(
        middlewares=[bounded_send, errors_and_metrics],  # bounded_send: answers over 64 KiB (memory.py)
        client_max_size=settings.max_body_bytes,
        handler_args=edge.handler_args(settings),  # no inflation on the loop, keep-alive, line limits
    )
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = metrics or Metrics(engine_families=settings.engine.mode == "thread")
    app[keys.BUDGETS] = Budgets(settings.budgets)
    app[keys.LIFECYCLE] = keys.Lifecycle()
    app[keys.MODELS] = ModelDirectory()
    app[keys.OPENAPI] = openapi_bytes()
    app[keys.METRICS].add_state(_state_source(app))
    app.add_routes(routes.routes)
    app.add_routes(admin.routes)
    app.add_routes(snapshot_routes.routes)
    app.add_routes(calibrate_routes.routes)
    app.add_routes(pages.routes)  # / and /docs (service/pages.py)
    app.add_routes(validation_routes.routes)  # GET /v1/models/{name}/validation (the /ui plots it)
    app.cleanup_ctx.extend([store_ctx, marketdata_ctx, engine_ctx, queue_ctx, stream_ctx, jobs_ctx, gc_ctx])
    app.cleanup_ctx.append(store_gc_ctx)  # store GC under its lease, on a schedule (gc_schedule.py)
    app.cleanup_ctx.append(memory_ctx)  # send tracking and the reclaimer (memory.py)
    app.on_shutdown.append(on_shutdown)
    if worker is not None:
        http_workers.install(app, worker)
    return app
