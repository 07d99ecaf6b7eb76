"""Calibration as a service: ``POST /v1/calibrate`` and the ``calibrate`` derive job.

Both resolve a snapshot, fit the process to the underlying's surface on the compute
worker (torch never runs on the event loop) through the served learned model, and may
store the fitted parameter set as a derived snapshot: the input with
``model_params[underlying][process]`` replaced, under the same val_datetime with a
later data_asof, with its lineage (the input's key and hash, the model version used).

A fit goes through the valuation queue like pricing: admitted by its estimated cost,
at most ``queue.max_calibrations`` at once, run in slices of about
``queue.max_job_seconds`` between which pricing jobs run, and stopped between
iterations once its deadline (``X-Request-Timeout`` or the default) has passed. A
surface of more than ``queue.max_calibration_quotes`` nodes is refused (422).

A fit through a learned model may be corrected by the process's reference
(``corrections``: pricing/calibration.py ``corrected_fit``). Rough Bergomi's reference is
a Monte Carlo of seconds (``correction_paths`` per expiry): admission counts its paths
at their learned cost, and it runs in the same slices, paused between its chunks, so
pricing goes on meanwhile and the deadline stops it there too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from aiohttp import web

from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine_service.messages import FitReport, FitSpec
from spectralmc_server.marketdata.objects import MarketSnapshot, ModelParams
from spectralmc_server.marketdata.store import SnapshotRecord, iso
from spectralmc_server.pricing.calibratable import CORRECTION_PATHS
from spectralmc_server.pricing.calibration import SurfaceError, correction_paths_total, no_reference_fit
from spectralmc_server.service import keys
from spectralmc_server.service.errors import Invalid
from spectralmc_server.service.jobs import Put, UnchangedError, derive_input, store_derived
from spectralmc_server.service.routes import _timeout as request_timeout
from spectralmc_server.service.routes import json_response, read_json, require_serving, validate
from spectralmc_server.service.schemas import CalibrateRequest
from spectralmc_server.service.snapshot_routes import authorize_write
from spectralmc_server.settings import DeriveJob

routes = web.RouteTableDef()


async def fit(
    app: web.Application,
    snapshot: MarketSnapshot,
    underlying: str,
    process: str,
    *,
    allow_arbitrage: bool = False,
    max_iterations: int = 100,
    timeout: float | None = None,
    connected: Callable[[], bool] = lambda: True,
    corrections: int = 0,
    correction_paths: int = CORRECTION_PATHS,
) -> FitReport:
    """Calibrate in the engine through the queue (see the module docstring); a bad or too
    large surface is a 422 naming the reason (a process with no analytic CF and no served
    model: naming ``process``; corrections with no served model: naming ``corrections``),
    a fit past its deadline (default ``request_timeout_seconds``) a 504."""
    settings = app[keys.SETTINGS]
    metrics = app[keys.METRICS]
    served = app[keys.MODELS].current.snapshot().get(process)
    if served is None and not get_process(process).has_analytic_cf:
        metrics.calibrations.labels(process, "rejected").inc()
        reason = no_reference_fit(process)
        raise Invalid(reason, details=[{"field": "process", "reason": reason}])
    if corrections and served is None:
        metrics.calibrations.labels(process, "rejected").inc()
        reason = f"corrections correct a fit through a learned model, and no {process} model is served"
        raise Invalid(reason, details=[{"field": "corrections", "reason": reason}])
    surface = snapshot.vol_surfaces.get(underlying)
    limit = settings.queue.max_calibration_quotes
    quotes = 0 if surface is None else len(surface.expiries_years) * len(surface.strikes)
    if quotes > limit:
        metrics.calibrations.labels(process, "rejected").inc()
        reason = (
            f"the {underlying} surface has {quotes} nodes; a fit takes at most {limit} (queue.max_calibration_quotes)"
        )
        raise Invalid(reason, details=[{"field": "underlying", "reason": reason}])

    spec = FitSpec(
        snapshot,
        underlying,
        process,
        allow_arbitrage,
        max_iterations,
        deadline=0.0,  # set when queued
        corrections=corrections,
        correction_paths=correction_paths,
    )
    expiries = 0 if surface is None else len(surface.expiries_years)
    future = app[keys.BATCHER].submit_fit(
        spec,
        method="reference" if served is None else "cvnn",
        quotes=max(quotes, 1),
        timeout=settings.request_timeout_seconds if timeout is None else timeout,
        connected=connected,
        reference_paths=corrections * correction_paths_total(process, expiries, correction_paths),
    )
    try:
        report = await future
    except SurfaceError as exc:
        metrics.calibrations.labels(process, "rejected").inc()
        raise Invalid(str(exc), details=[{"field": "underlying", "reason": str(exc)}]) from None
    metrics.calibrations.labels(process, "ok").inc()
    metrics.calibration_seconds.labels(process).observe(report.seconds)
    return report


class Fitted(Protocol):
    """A finished fit: the engine's FitReport, or the CLI's CalibrationReport."""

    @property
    def underlying(self) -> str: ...

    @property
    def process(self) -> str: ...

    @property
    def model(self) -> dict[str, Any] | None: ...

    def model_params(self) -> ModelParams: ...


def derived_snapshot(snapshot: MarketSnapshot, report: Fitted) -> MarketSnapshot:
    """``snapshot`` with the fitted set in ``model_params[underlying][process]``."""
    params = {**snapshot.model_params}
    params[report.underlying] = {**params.get(report.underlying, {}), report.process: report.model_params()}
    derived = snapshot.model_copy(update={"model_params": params})
    return MarketSnapshot.model_validate(derived.model_dump())  # re-checked like a PUT


async def store_fit(
    put: Put,
    record: SnapshotRecord,
    snapshot: MarketSnapshot,
    reports: Sequence[Fitted],
    job: str | None,
) -> tuple[SnapshotRecord, bool] | None:
    """Store the snapshot with every report's fitted set; None when ``snapshot``
    already holds exactly these fits (nothing new to store)."""
    derived = snapshot
    for report in reports:
        derived = derived_snapshot(derived, report)
    lineage: dict[str, Any] = {
        "job": job,
        "kind": "calibrate",
        "process": reports[0].process,
        "underlyings": [r.underlying for r in reports],
        "models": [r.model for r in reports],
    }
    return await store_derived(put, record, snapshot, derived, lineage)


def calibrate_action(job: DeriveJob, app: web.Application) -> Callable[[], Awaitable[str | None]]:
    """The ``calibrate`` derive job: fit every underlying of the namespace's latest
    snapshot and store the result (unchanged when the latest is this job's own output
    or already holds the same fits)."""

    async def action() -> str | None:
        market = app[keys.MARKETDATA]
        latest, snapshot = await derive_input(job, market)
        reports = [
            await fit(
                app,
                snapshot,
                u,
                job.process,
                timeout=job.timeout_seconds,
                corrections=job.corrections,
                correction_paths=job.correction_paths,
            )
            for u in job.underlyings
        ]
        stored = await store_fit(market.put, latest, snapshot, reports, job.name)
        if stored is None:
            raise UnchangedError(f"the latest snapshot ({iso(latest.data_asof)}) already holds these fits")
        fits = ", ".join(f"{r.underlying} rmse {r.rmse_vol * 1e4:.1f} bp vol" for r in reports)
        return f"stored {iso(stored[0].data_asof)} ({stored[0].hash}): {fits}"

    return action


@routes.post("/v1/calibrate")
async def calibrate_route(request: web.Request) -> web.Response:
    """Fit a process to an underlying's surface; ``store`` keeps the result as a snapshot."""
    app = request.app
    require_serving(app[keys.SETTINGS])
    req: CalibrateRequest = validate(CalibrateRequest, await read_json(request))
    if req.store:
        authorize_write(request)
    timeout = request_timeout(request)
    record, snapshot = await app[keys.MARKETDATA].resolve(req.namespace, req.val_datetime, req.data_asof)
    transport = request.transport
    report = await fit(
        app,
        snapshot,
        req.underlying,
        req.process,
        allow_arbitrage=req.allow_arbitrage,
        max_iterations=req.max_iterations,
        timeout=timeout,
        connected=lambda: transport is not None and not transport.is_closing(),
        corrections=req.corrections,
        correction_paths=req.correction_paths,
    )
    body: dict[str, Any] = {"market_data": record.describe(), **report.describe(), "stored": None}
    if req.store:
        stored = await store_fit(app[keys.MARKETDATA].put, record, snapshot, [report], None)
        body["stored"] = None if stored is None else {**stored[0].describe(), "created": stored[1]}
    return json_response(body)
