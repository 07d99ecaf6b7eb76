"""``GET /v1/models/{name}/validation``: a served model's validation history.

Open and read-only, like ``GET /v1/models`` (the live page at /ui plots it). Two views
of the same held-out measurement (the p50, p95 and max of the price error in bp of the
discounted forward, docs/method.md):

- ``versions``: every committed version of the model, oldest first, with its commit
  time and the training step and figures its record holds (what the last validation
  before the commit measured): the model's progress from version to version.
- ``history``: every validation the served version's training ran (its manifest's
  ``metrics.history``, with each one's wall-clock seconds since training started): the
  curve inside one version. A version trained on from an earlier one carries the earlier
  steps too.

A store that does not list the versions within ``STORE_TIMEOUT`` seconds, or fails, is
a 503 ``store_unavailable``; a served version whose manifest cannot be read (collected
by GC, damaged, or nothing served from the store) still answers 200, with ``history``
empty and ``reason`` saying why.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from spectralmc_server.engine.checkpoint import timed_history
from spectralmc_server.service import keys
from spectralmc_server.service.errors import NotFound, store_unavailable
from spectralmc_server.service.routes import json_response
from spectralmc_server.store.versions import StoredVersion, VersionStore

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
STORE_TIMEOUT = 5.0  # seconds: past it the answer is a 503 (the page must not hang on a slow store)
FIGURES = ("p50_bp", "p95_bp", "max_bp")
POINT_KEYS = ("step", *FIGURES, "cf_rmse", "loss", "paths", "elapsed_seconds")


class ValidationPoint(BaseModel):
    """One validation during training: the held-out price error's p50, p95 and max in bp
    of D F, the characteristic function's RMSE, the training loss, the paths simulated
    so far and the wall-clock seconds since training started (null where not recorded)."""

    step: int
    p50_bp: float | None = None
    p95_bp: float | None = None
    max_bp: float | None = None
    cf_rmse: float | None = None
    loss: float | None = None
    paths: int | None = None
    elapsed_seconds: float | None = None


class VersionPoint(BaseModel):
    """One committed version: its commit time, step and last validation's figures."""

    version: int
    time: str | None
    step: int | None
    p50_bp: float | None
    p95_bp: float | None
    max_bp: float | None
    served: bool
    unqualified: bool = Field(description="Committed past a failing quality gate")


class ValidationResponse(BaseModel):
    """GET /v1/models/{name}/validation."""

    model: str
    served: int | None = Field(description="The served version (null: none, or not from the store)")
    versions: list[VersionPoint] = Field(description="Every committed version, oldest first")
    history: list[ValidationPoint] = Field(description="The served version's validations, in training order")
    reason: str | None = Field(description="Why history is empty (null when it is not)")


def _number(value: Any) -> float | int | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def version_point(v: StoredVersion, served: int | None) -> dict[str, Any]:
    metrics = v.record.get("metrics")
    metrics = metrics if isinstance(metrics, dict) else {}
    time = v.record.get("time")
    return {
        "version": v.version,
        "time": time if isinstance(time, str) else None,
        "step": _number(metrics.get("step")),
        **{k: _number(metrics.get(k)) for k in FIGURES},
        "served": v.version == served,
        "unqualified": bool(v.record.get("unqualified", False)),
    }


def history_points(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's validations, each with the figures above (entries without a step
    are left out: nothing to plot them against)."""
    points = []
    for entry in timed_history(manifest):
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            points.append({k: _number(entry.get(k)) for k in POINT_KEYS})
    return points


async def served_history(store: VersionStore, served: int | None) -> tuple[list[dict[str, Any]], str | None]:
    """The served version's validations, or none and why."""
    if served is None:
        return [], "no version of this model is served from the store"
    try:
        async with asyncio.timeout(STORE_TIMEOUT):
            manifest = await store.manifest(served)
    except TimeoutError:
        return [], f"the store did not give version {served}'s manifest within {STORE_TIMEOUT:g} s"
    except Exception as exc:  # any store or parse failure: said, not raised (the versions still show)
        log.warning("model %s: version %d's manifest could not be read: %s", store.name, served, exc)
        return [], f"version {served}'s manifest could not be read: {type(exc).__name__}: {exc}"
    if manifest is None:
        return [], f"version {served}'s content was collected (store gc)"
    points = history_points(manifest)
    return points, None if points else f"version {served}'s manifest records no validation"


@routes.get("/v1/models/{name}/validation")
async def validation(request: web.Request) -> web.Response:
    """A served model's validations: per committed version, and during the served
    version's training (module docstring)."""
    name = request.match_info["name"]
    stores = request.app[keys.STORES]
    if name not in stores:
        raise NotFound(f"no served model {name!r}; served: {', '.join(stores)}")
    row = next((m for m in request.app[keys.MODELS].current.describe() if m["name"] == name), None)
    served = None if row is None else row.get("version")
    store = stores[name]
    try:
        async with asyncio.timeout(STORE_TIMEOUT):
            versions = await store.versions()
    except TimeoutError as exc:
        raise store_unavailable(
            exc, retry_after=5, message=f"model store unavailable: no answer within {STORE_TIMEOUT:g} s"
        ) from None
    except Exception as exc:  # the listing failed: nothing to show
        raise store_unavailable(
            exc, retry_after=5, message=f"model store unavailable: {type(exc).__name__}: {exc}"
        ) from exc
    history, reason = await served_history(store, served)
    body = {
        "model": name,
        "served": served,
        "versions": [version_point(v, served) for v in versions],
        "history": history,
        "reason": reason,
    }
    return json_response(body)
