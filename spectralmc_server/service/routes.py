"""Public routes: pricing, models, health, readiness, metrics, the API description.

Handlers only parse, submit to the queue and await; errors are raised as typed
:mod:`~spectralmc_server.service.errors` and answered by the middleware.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from spectralmc_server.engine.certificate import summary as certificate_summary
from spectralmc_server.engine.view import ModelView
from spectralmc_server.pricing.arrow import ARROW_STREAM, BookFormatError, answer_ipc, read_book
from spectralmc_server.pricing.columns import columns_of_body, request_from_columns, too_many
from spectralmc_server.pricing.door import admit
from spectralmc_server.pricing.errors import RequestRefusedError
from spectralmc_server.pricing.schemas import MAX_CONTRACTS, PriceRequest, format_validation_error
from spectralmc_server.pricing.valuation import dumps
from spectralmc_server.service import http_workers, keys
from spectralmc_server.service.body import BodyKind, read_body, read_price_body
from spectralmc_server.service.errors import (
    APIError,
    Invalid,
    MalformedRequest,
    TooLarge,
    Unavailable,
    UnsupportedMediaType,
)
from spectralmc_server.service.stream import serve_connection
from spectralmc_server.settings import Settings
from spectralmc_server.store.versions import VersionStore

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
UI_PAGE = (Path(__file__).parent / "static" / "ui.html").read_text()
TIMEOUT_HEADER = "X-Request-Timeout"  # seconds; the client's own deadline for this request


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


async def read_json(request: web.Request) -> Any:
    """The body as JSON: 415 unless its Content-Type is JSON and its Content-Encoding
    one the server inflates, 413 past the size limit (as sent or inflated), 400 when it
    is not JSON (service/body.py)."""
    return _json_of(await read_body(request))


def _json_of(raw: bytes) -> Any:
    if not raw:
        raise MalformedRequest("the request body is empty; send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"the body is not valid JSON: {exc}") from None


def validate(model: type[Any], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        details = format_validation_error(exc)
        raise Invalid(f"{len(details)} invalid field(s)", details=details) from None


def _timeout(request: web.Request) -> float:
    s = request.app[keys.SETTINGS]
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return s.request_timeout_seconds
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= s.max_request_timeout_seconds):
        raise Invalid(
            f"header {TIMEOUT_HEADER} must be seconds in (0, {s.max_request_timeout_seconds}]",
            details=[{"field": f"header:{TIMEOUT_HEADER}", "reason": f"got {raw!r}"}],
        )
    return value


def require_serving(settings: Settings) -> None:
    if not settings.serves:
        raise Unavailable(f"this server's role is {settings.role!r}: it does not price", 60, code="not_serving")


BookForm = Literal["rows", "columns", "arrow"]


def _too_many(count: int) -> TooLarge:
    return TooLarge(
        f"{count} contracts in one request; at most {MAX_CONTRACTS} (split the book)",
        details=[{"field": "contracts", "reason": f"at most {MAX_CONTRACTS} contracts"}],
    )


def _book_format_error(exc: BookFormatError) -> APIError:
    kinds: dict[str, type[APIError]] = {
        "malformed": MalformedRequest,
        "too_large": TooLarge,
        "unsupported": UnsupportedMediaType,
    }
    return kinds[exc.kind](exc.message, details=exc.details)


def _price_body(kind: BodyKind, raw: bytes) -> tuple[BookForm, Any, dict[str, Any], dict[str, Any]]:
    """The form a /v1/price body comes in (rows, columns or arrow), with the decoded row
    body (rows) or the request-level fields and columns (columns, arrow). 413 for more
    than MAX_CONTRACTS contracts before anything is validated."""
    if kind == "arrow":
        try:
            head, columns = read_book(raw)
        except BookFormatError as exc:
            raise _book_format_error(exc) from None
        except RequestRefusedError as exc:
            raise Invalid(exc.message, details=exc.details) from None
        return "arrow", None, head, dict(columns)
    body = _json_of(raw)
    if isinstance(body, dict) and "columns" in body:
        if isinstance(body["columns"], dict):
            longest = too_many(body["columns"])
            if longest is not None:
                raise _too_many(longest)
        try:
            head, cols = columns_of_body(body)
        except RequestRefusedError as exc:
            raise Invalid(exc.message, details=exc.details) from None
        return "columns", None, head, dict(cols)
    if isinstance(body, dict) and isinstance(body.get("contracts"), list) and len(body["contracts"]) > MAX_CONTRACTS:
        raise _too_many(len(body["contracts"]))
    return "rows", body, {}, {}


def admitted(app: web.Application, body: Any) -> PriceRequest:
    """``body`` (decoded rows, or a request) through the pricing front door
    (pricing/door.py ``admit``) against the served models: the checked request, or 422
    naming what is wrong (503 ``not_ready`` while no model is). The whole request is
    checked here; the batcher may split it into jobs (and the engine checks each again).
    REST, streams and jobs all come this way."""

    def models() -> Mapping[str, ModelView]:
        served = app[keys.MODELS].current
        reason = served.not_ready()
        if reason is not None:
            raise Unavailable(f"not ready: {reason}", 5, code="not_ready")
        return served.snapshot()

    try:
        return admit(body, models)
    except RequestRefusedError as exc:
        raise Invalid(exc.message, details=exc.details) from None


@routes.post("/v1/price")
async def price(request: web.Request) -> web.Response:
    """Price contracts (explicit or by reference) through the batching queue. The book
    comes as rows (``contracts``), as columns (``columns``) or as an Arrow IPC stream,
    and is answered in the same form (docs/api.md)."""
    app = request.app
    require_serving(app[keys.SETTINGS])
    timeout = _timeout(request)
    kind, raw = await read_price_body(request)
    form, body, head, columns = _price_body(kind, raw)
    if form != "rows":  # a columnar book is validated here; admit takes the PriceRequest as it is
        try:
            body = request_from_columns(head, columns)
        except RequestRefusedError as exc:
            raise Invalid(exc.message, details=exc.details) from None
    req = admitted(app, body)
    transport = request.transport

    def connected() -> bool:
        return transport is not None and not transport.is_closing()

    deadline = asyncio.get_running_loop().time() + timeout
    answer = await app[keys.BATCHER].price(req, deadline, connected, columnar=form != "rows")
    if form == "arrow":
        return web.Response(body=answer_ipc(answer, req), content_type=ARROW_STREAM)
    return web.Response(body=dumps(answer), content_type="application/json")


@routes.get("/v1/stream")
async def stream(request: web.Request) -> web.StreamResponse:
    """Streaming quotes over a WebSocket (protocol: service/stream/, docs/api.md)."""
    app = request.app
    settings = app[keys.SETTINGS]
    require_serving(settings)
    if app[keys.LIFECYCLE].shutting_down:
        raise Unavailable("the server is shutting down", 1, code="shutting_down")
    hub = app[keys.STREAMS]
    if len(hub.connections) >= settings.stream.max_connections:
        raise Unavailable(f"at the limit of {settings.stream.max_connections} stream connections", 5, code="overloaded")
    if not web.WebSocketResponse().can_prepare(request).ok:
        raise MalformedRequest("GET /v1/stream takes a WebSocket upgrade (Upgrade: websocket)")
    return await serve_connection(request, hub)


@routes.get("/ui")
async def ui(request: web.Request) -> web.Response:
    """The live page: served models and a quote table for the demo portfolio."""
    s = request.app[keys.SETTINGS]
    config = {
        "namespace": s.ui.namespace,
        "portfolio": s.ui.portfolio,
        "measures": s.ui.measures,
        "contracts": [c.model_dump(mode="json", exclude_none=True) for c in s.portfolios[s.ui.portfolio]],
    }
    # "</" cannot close the script element when escaped; the JSON stays equal
    embedded = orjson.dumps(config).decode().replace("</", "<\\/")
    return web.Response(text=UI_PAGE.replace("__CONFIG__", embedded), content_type="text/html")


@routes.get("/v1/jobs")
async def jobs(request: web.Request) -> web.Response:
    """The declared jobs: schedule, run counts, skips and recent runs (HTTP worker 0's,
    which runs every declared job)."""
    worker = request.app.get(http_workers.WORKER_KEY)
    if worker is not None and not worker.primary:
        return await http_workers.forward_to_primary(request)
    return json_response({"jobs": [s.describe() for s in request.app[keys.JOBS].values()]})


# How long /v1/models waits for the store to give the previous version's certificate:
# past it the row says why (the page must not hang on a slow store).
PREVIOUS_CERTIFICATE_TIMEOUT = 5.0


def certificate_view(cert: Mapping[str, Any] | None) -> dict[str, Any]:
    """A version's certificate as /v1/models shows it: the summary per measure
    (engine/certificate.py ``summary``) and the price-error heat map over the model's two
    main dimensions, with the cells' dims and edges (null without a certificate)."""
    if cert is None:
        return {"certificate": None, "heatmap": None}
    heat = cert.get("heatmap")
    cells = cert.get("cells") or {}
    heatmap = None
    if isinstance(heat, dict):
        heatmap = {
            "measure": heat.get("measure", "price"),
            "unit": "normalised error (x 1e4: bp of D F, spot for a European without rates)",
            "dims": cells.get("dims"),
            "edges": cells.get("edges"),
            "p95": heat.get("p95"),
            "max": heat.get("max"),
        }
    return {"certificate": certificate_summary(cert), "heatmap": heatmap}


async def previous_certificate(store: VersionStore, version: int | None) -> dict[str, Any] | None:
    """The version before the served one and its certificate (null: nothing before it).
    A certificate that cannot be read gives nulls and ``reason``, never an error: the
    served version's figures must show whatever the store does."""
    if version is None or version <= 1:
        return None
    prev = version - 1
    row: dict[str, Any] = {"version": prev, "reason": None}
    cert: dict[str, Any] | None = None
    try:
        async with asyncio.timeout(PREVIOUS_CERTIFICATE_TIMEOUT):
            cert = await store.certificate(prev)
    except TimeoutError:
        row["reason"] = f"the store did not answer within {PREVIOUS_CERTIFICATE_TIMEOUT:g} s"
    except Exception as exc:  # any store or parse failure: shown, not raised
        log.warning("model %s: version %d's certificate could not be read: %s", store.name, prev, exc)
        row["reason"] = f"{type(exc).__name__}: {exc}"
    else:
        if cert is None:
            row["reason"] = f"version {prev} has no certificate"
    return {**row, **certificate_view(cert)}


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    """Served models: name, version, content hash, mode, domain, and each served
    version's certificate (summary and heat map) beside the previous version's."""
    directory = request.app[keys.MODELS].current  # one picture, read before any await
    rows = directory.describe()
    stores = request.app[keys.STORES]
    previous = await asyncio.gather(*(previous_certificate(stores[r["name"]], r["version"]) for r in rows))
    for row, model, prev in zip(rows, directory.models, previous, strict=True):
        row.update(certificate_view(None if model.served is None else model.served.certificate))
        row["previous"] = prev
    return json_response({"models": rows})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Alive: the engine runs and has not failed."""
    engine = request.app[keys.ENGINE]
    if not engine.alive:
        raise Unavailable(f"compute engine down: {engine.status.failure or 'not running'}", 5, code="unhealthy")
    return json_response({"status": "ok"})


def not_ready_reason(app: web.Application) -> str | None:
    life = app[keys.LIFECYCLE]
    if life.shutting_down:
        return "shutting down"
    if not life.started:
        return "starting"
    engine = app[keys.ENGINE]
    if not engine.alive:
        return f"compute engine down: {engine.status.failure or 'not running'}"
    if app[keys.SETTINGS].serves:
        return app[keys.MODELS].current.not_ready()
    return None


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready: models loaded and work accepted; else 503 with the reason. A replica whose
    store polls fail still answers from its loaded versions: 200, status ``degraded``; so
    does one started while the store was down, from a cached or the bundled version."""
    app = request.app
    reason = not_ready_reason(app)
    if reason is not None:
        raise Unavailable(f"not ready: {reason}", 5, code="not_ready")
    s = app[keys.SETTINGS]
    status = app[keys.ENGINE].status
    directory = app[keys.MODELS].current
    degraded = directory.degraded()
    return json_response(
        {
            "status": "degraded" if degraded else "ready",
            "degraded": degraded,
            "role": s.role,
            "models": {m.name: None if m.served is None else m.served.version for m in directory.models},
            # served versions an admin pinned with force past their quality gate, and why they fail
            "forced": directory.forced(),
            # versions wanted (head or pin) and refused by the gate while another is served
            "rejected": directory.rejected(),
            # models served from the version cache or bundled because the store was down at start
            "fallback": directory.fallbacks(),
            "training": status.training_model,
            "training_note": status.training_note,
        }
    )


async def local_metrics(app: web.Application) -> bytes:
    """This process's registry and its engines' own families, where they have them."""
    body = generate_latest(app[keys.METRICS].registry)
    return body + await app[keys.ENGINE].metrics_text()


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this app's registry (every HTTP worker's, each
    sample labelled ``worker``, when there are several)."""
    body = await local_metrics(request.app)
    worker = request.app.get(http_workers.WORKER_KEY)
    if worker is not None and worker.count > 1:
        body = await http_workers.gather_metrics(request.app, body)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """This API's OpenAPI 3 description."""
    return web.Response(body=request.app[keys.OPENAPI], content_type="application/json")
