"""The market-data routes (docs/api.md).

- ``PUT /v1/marketdata/{namespace}/{val_datetime}/{data_asof}``: store one snapshot;
  201 created, 200 when the same content is already there, 409 for other content.
  Open, or behind a bearer token when ``marketdata.write_token`` is set.
- ``GET /v1/marketdata/{namespace}/{val_datetime}?asof=T``: the snapshot with the
  latest data_asof <= T (no ``asof``: the latest); 404 when there is none.
- ``GET /v1/marketdata/{namespace}/latest``: the greatest (val_datetime, data_asof).
- ``GET /v1/marketdata/{namespace}?val_datetime=&after=&limit=``: the stored keys.
"""

from __future__ import annotations

import re
from datetime import datetime

from aiohttp import web

from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.marketdata.store import SnapshotConflictError, SnapshotRecord, iso, utc
from spectralmc_server.pricing.schemas import NAMESPACE_PATTERN
from spectralmc_server.rfc3339 import DATETIME_FORMAT, parse_datetime
from spectralmc_server.service import keys
from spectralmc_server.service.auth import MARKETDATA_REALM, accepted_tokens, require_token
from spectralmc_server.service.errors import Conflict, Invalid, NotFound
from spectralmc_server.service.routes import json_response, read_json, validate

routes = web.RouteTableDef()
MAX_LIST = 1000


def _namespace(request: web.Request) -> str:
    ns = request.match_info["namespace"]
    if not re.fullmatch(NAMESPACE_PATTERN, ns):
        raise Invalid(
            "invalid namespace",
            details=[{"field": "path.namespace", "reason": f"letters, digits, '_', '.', '-' (got {ns!r})"}],
        )
    return ns


def _when(raw: str, field: str) -> datetime:
    """A time in a path segment or query parameter: RFC 3339 only (no Unix seconds)."""
    try:
        return utc(parse_datetime(raw))
    except OverflowError:
        reason = f"out of range once converted to UTC (got {raw!r})"
    except ValueError as exc:
        reason = f"{exc} (got {raw!r})"
    raise Invalid(f"{field} must be {DATETIME_FORMAT}", details=[{"field": field, "reason": reason}])


def authorize_write(request: web.Request) -> None:
    """Market-data writes (this PUT, ``POST /v1/calibrate`` with ``store``): open, or
    the ``marketdata.write_token`` bearer token when one is set."""
    md = request.app[keys.SETTINGS].marketdata
    if md.write_token is None:
        return
    tokens = accepted_tokens(md.write_token, md.write_token_previous)
    require_token(request, tokens, realm=MARKETDATA_REALM, what="market-data writes")


@routes.put("/v1/marketdata/{namespace}/{val_datetime}/{data_asof}")
async def put_snapshot(request: web.Request) -> web.Response:
    """Store one immutable snapshot (201, or 200 when the same content is already there)."""
    authorize_write(request)
    ns = _namespace(request)
    vdt = _when(request.match_info["val_datetime"], "path.val_datetime")
    asof = _when(request.match_info["data_asof"], "path.data_asof")
    snapshot: MarketSnapshot = validate(MarketSnapshot, await read_json(request))
    try:
        record, created = await request.app[keys.MARKETDATA].put(ns, vdt, asof, snapshot)
    except SnapshotConflictError as exc:
        raise Conflict(str(exc)) from None
    body = {**record.describe(), "created": created, "arbitrage": snapshot.arbitrage()}
    return json_response(body, status=201 if created else 200)


@routes.get("/v1/marketdata/{namespace}")
async def list_snapshots(request: web.Request) -> web.Response:
    """Stored keys in time order, a page at a time (``after`` is the returned cursor)."""
    ns = _namespace(request)
    q = request.query
    vdt = _when(q["val_datetime"], "query.val_datetime") if "val_datetime" in q else None
    try:
        limit = int(q.get("limit", "100"))
    except ValueError:
        limit = -1
    if not 1 <= limit <= MAX_LIST:
        raise Invalid("bad limit", details=[{"field": "query.limit", "reason": f"an integer in [1, {MAX_LIST}]"}])
    after = q.get("after")
    try:
        keys_, cursor = await request.app[keys.MARKETDATA].store.list_keys(ns, vdt, after, limit)
    except ValueError as exc:  # a cursor that is not a key
        raise Invalid("bad cursor", details=[{"field": "query.after", "reason": str(exc)}]) from None
    return json_response(
        {
            "namespace": ns,
            "snapshots": [{"val_datetime": iso(v), "data_asof": iso(a)} for v, a in keys_],
            "next": cursor,
        }
    )


async def _answer(request: web.Request, record: SnapshotRecord | None, what: str) -> web.Response:
    if record is None:
        raise NotFound(f"no snapshot for {what}")
    snapshot = await request.app[keys.MARKETDATA].load(record)
    return json_response(
        {**record.describe(), "data": snapshot.model_dump(mode="json"), "arbitrage": snapshot.arbitrage()}
    )


@routes.get("/v1/marketdata/{namespace}/latest")
async def latest_snapshot(request: web.Request) -> web.Response:
    """The namespace's greatest (val_datetime, data_asof)."""
    ns = _namespace(request)
    return await _answer(request, await request.app[keys.MARKETDATA].store.latest(ns), f"{ns} (it has none)")


@routes.get("/v1/marketdata/{namespace}/{val_datetime}")
async def get_snapshot(request: web.Request) -> web.Response:
    """The snapshot with the latest data_asof <= ``asof`` (default: the latest)."""
    ns = _namespace(request)
    vdt = _when(request.match_info["val_datetime"], "path.val_datetime")
    asof = _when(request.query["asof"], "query.asof") if "asof" in request.query else None
    record = await request.app[keys.MARKETDATA].store.resolve(ns, vdt, asof)
    when = "latest" if asof is None else iso(asof)
    return await _answer(request, record, f"{ns}/{iso(vdt)} as of {when}")
