"""The OpenAPI 3.1 description, generated from the pydantic schemas, and a docs page."""

from __future__ import annotations

import functools
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from spectralmc_server import __version__
from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.pricing.arrow import ARROW_STREAM, REQUEST_METADATA, RESPONSE_METADATA
from spectralmc_server.pricing.cells import BARRIER_COLUMNS, BARRIER_KINDS, BARRIER_PREFIX, CONTRACT_COLUMNS
from spectralmc_server.pricing.schemas import NAMESPACE_PATTERN, PriceRequest, PriceResponse
from spectralmc_server.service.schemas import (
    CalibrateRequest,
    CommitBody,
    ErrorResponse,
    GCBody,
    ModelsResponse,
    PinBody,
    UnpinBody,
)
from spectralmc_server.service.validation_routes import ValidationResponse

REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _rows_columns_or_arrow(model: type[BaseModel], columnar: dict[str, Any]) -> dict[str, Any]:
    """The content of a pricing body: JSON rows (``model``) or columns, or an Arrow IPC stream."""
    return {"application/json": {"schema": {"oneOf": [_ref(model), columnar]}}, ARROW_STREAM: {"schema": BINARY}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Malformed JSON, or a compressed body that does not inflate",
        401: "Missing bearer token (WWW-Authenticate names the realm)",
        403: "Wrong token, or no admin token configured",
        404: "Not found (model, version or snapshot)",
        409: "Conflict",
        413: "Body (as sent or inflated) or contract count over the limit",
        415: "Content-Type not JSON (application/json), or a Content-Encoding other than gzip or deflate",
        422: "Invalid fields (each named in details)",
        503: "Overloaded, shutting down or not ready (Retry-After)",
        504: "Deadline passed",
    }
    return {str(c): _json(_ref(ErrorResponse), text[c]) for c in codes}


ANY_OBJECT: dict[str, Any] = {"type": "object"}
TEXT = {"type": "string"}
NAME = [
    {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}}
]
ADMIN: list[dict[str, list[str]]] = [{"bearer": []}]


def _admin(
    summary: str, method: str, body: type[BaseModel] | None, ok: int = 200, *, optional: bool = False
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "tags": ["admin"],
        "security": ADMIN,
        "parameters": NAME,
        "responses": {str(ok): _json(ANY_OBJECT, "Done"), **_errors(401, 403, 404, 409, 422)},
    }
    if body is not None:
        op["requestBody"] = {"required": not optional, "content": {"application/json": {"schema": _ref(body)}}}
        op["responses"].update(_errors(400, 413, 415))
    return {method: op}


def _param(name: str, where: str, schema: dict[str, Any], description: str, required: bool = True) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "description": description, "schema": schema}


TIME = {"type": "string", "format": "date-time"}


def _marketdata_paths(plain: dict[str, Any]) -> dict[str, Any]:
    ns = _param("namespace", "path", {"type": "string", "pattern": NAMESPACE_PATTERN}, "Market-data namespace")
    vdt = _param("val_datetime", "path", TIME, "Valuation time, with a zone (2026-11-26T16:00:00Z)")
    asof = _param("data_asof", "path", TIME, "When the data was known, with a zone")
    return {
        "/v1/marketdata/{namespace}/{val_datetime}/{data_asof}": {
            "put": {
                "summary": "Store one immutable snapshot (201; 200 when the same content is there; 409 otherwise)",
                "tags": ["marketdata"],
                "security": [{}, {"bearer": []}],  # the write token, when marketdata.write_token is set
                "parameters": [ns, vdt, asof],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(MarketSnapshot)}}},
                "responses": {
                    "201": _json(ANY_OBJECT, "Stored: key, hash, lineage, arbitrage report"),
                    "200": _json(ANY_OBJECT, "Already stored with the same content"),
                    **_errors(400, 401, 403, 409, 413, 415, 422),
                },
            }
        },
        "/v1/marketdata/{namespace}/{val_datetime}": {
            "get": {
                "summary": "The snapshot with the latest data_asof <= asof (default: the latest)",
                "tags": ["marketdata"],
                "parameters": [ns, vdt, _param("asof", "query", TIME, "Resolve as of this time", required=False)],
                "responses": {**plain, **_errors(404, 422)},
            }
        },
        "/v1/marketdata/{namespace}/latest": {
            "get": {
                "summary": "The namespace's greatest (val_datetime, data_asof)",
                "tags": ["marketdata"],
                "parameters": [ns],
                "responses": {**plain, **_errors(404, 422)},
            }
        },
        "/v1/marketdata/{namespace}": {
            "get": {
                "summary": "Stored snapshot keys in time order, one page",
                "tags": ["marketdata"],
                "parameters": [
                    ns,
                    _param("val_datetime", "query", TIME, "Only this valuation time", required=False),
                    _param("after", "query", {"type": "string"}, "The cursor from the previous page", required=False),
                    _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}, "Page size", False),
                ],
                "responses": {**plain, **_errors(422)},
            }
        },
        "/v1/stream": {
            "get": {
                "summary": "Streaming quotes over a WebSocket (protocol in docs/api.md)",
                "description": (
                    "Each quote message carries results as /v1/price does: ContractResult objects, each with "
                    "its error_bound per measure (and warnings where a learned measure is withheld)."
                ),
                "tags": ["pricing"],
                "responses": {
                    "101": {"description": "Switching to the WebSocket protocol"},
                    **_errors(400, 503),
                },
            }
        },
        "/v1/jobs": {"get": {"summary": "Declared jobs and their recent runs", "tags": ["ops"], "responses": plain}},
        "/ui": {
            "get": {
                "summary": "Live page: streaming quotes, the smile against the snapshot, models' validation and error",
                "tags": ["ops"],
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": TEXT}}}},
            }
        },
    }


BINARY = {"type": "string", "format": "binary"}
COLUMNAR_REQUEST = {"$ref": REF.format(model="ColumnarPriceRequest")}
COLUMNAR_RESPONSE = {"$ref": REF.format(model="ColumnarPriceResponse")}
PRICE_BODY_DESCRIPTION = (
    "A book of contracts in one of three forms, answered in the same form (docs/api.md, 'Columnar books and "
    "Arrow'): JSON rows (PriceRequest, contracts: a list of Contract objects); JSON columns "
    "(ColumnarPriceRequest: columns, an object column name -> list of values, one per contract; the columns are "
    "the Contract fields, process parameters as params.<name>, a barrier as barrier.type, barrier.level, "
    "barrier.monitoring and barrier.rebate, a null cell is an absent field); or an Apache Arrow IPC stream "
    f"({ARROW_STREAM}) with the same columns (numbers float64 or int64, fixings int64, strings utf8, expiry "
    "utf8 or date32, barrier.monitoring utf8 or int64) and the request-level fields as a JSON object in the "
    f"schema metadata under '{REQUEST_METADATA}'. The Arrow answer has the columnar answer's columns (numbers "
    f"float64, id, model and method utf8, warnings list<utf8>) and '{RESPONSE_METADATA}' in its schema metadata: "
    "the JSON of namespace, val_datetime, data_asof, models and market_data. Errors are JSON in every form."
)


def _cell(spec: dict[str, Any]) -> dict[str, Any]:
    """A Contract property's schema as one cell of its column: the value or null."""
    spec = {k: v for k, v in spec.items() if k not in ("title", "default", "description")}
    options = spec.pop("anyOf", None) or [spec]
    return {"anyOf": [*[o for o in options if o.get("type") != "null"], {"type": "null"}]}


def _barrier_columns(barrier: dict[str, Any]) -> dict[str, Any]:
    """The barrier.<key> columns, each cell the Barrier property or null (monitoring:
    "continuous" or an integer, as in a row)."""
    out: dict[str, Any] = {}
    for name in BARRIER_COLUMNS:
        key = name.removeprefix(BARRIER_PREFIX)
        cell = _cell(barrier[key])
        types = {str(o["type"]) for o in cell["anyOf"] if o.get("type") != "null"}
        if types != BARRIER_KINDS[name]:  # pragma: no cover - a schema change
            raise RuntimeError(f"openapi: {name} is {sorted(types)}, the columnar checks read {BARRIER_KINDS[name]}")
        more = " (null: no barrier; then the contract's other barrier cells are null)" if key == "type" else ""
        out[name] = {"type": "array", "items": cell, "description": f"Barrier.{key}, one per contract{more}"}
    return out


def _columnar(
    schema: dict[str, Any], rows: str, columns: dict[str, Any], title: str, description: str, *, required: list[str]
) -> dict[str, Any]:
    """``schema`` with ``columns`` in place of its ``rows`` property."""
    props = {k: v for k, v in schema["properties"].items() if k != rows}
    return {
        **schema,
        "title": title,
        "description": description,
        "properties": {**props, "columns": columns},
        "required": required,
    }


def columnar_schemas(schemas: dict[str, Any]) -> dict[str, Any]:
    """ColumnarPriceRequest and ColumnarPriceResponse: the columnar forms of /v1/price's
    body and answer, built from the row schemas (pricing/columns.py reads them)."""
    contract = schemas["Contract"]["properties"]
    column = {
        name: {"type": "array", "items": _cell(contract[name]), "description": f"Contract.{name}, one per contract"}
        for name in CONTRACT_COLUMNS
    }
    column.update(_barrier_columns(schemas["Barrier"]["properties"]))
    columns = {
        "type": "object",
        "description": (
            "The book as columns, all of one length (one value per contract): the Contract fields, process "
            "parameters as params.<name> (params.kappa, ...), the barrier as barrier.<key> (barrier.type null: "
            "no barrier). A null is an absent field; unused columns may be left out. Validated as the rows they "
            "stand for; errors name contracts[i].<field>."
        ),
        "properties": column,
        "patternProperties": {
            r"^params\..+$": {"type": "array", "items": {"anyOf": [{"type": "number"}, {"type": "null"}]}}
        },
        "additionalProperties": False,
    }
    request = _columnar(
        schemas["PriceRequest"],
        "contracts",
        columns,
        "ColumnarPriceRequest",
        "PriceRequest with the book as columns in place of contracts.",
        required=["columns"],
    )
    answer_columns = {
        "type": "object",
        "description": (
            "id, model, method; one column per scalar measure asked for (price, delta, ...); quantiles.<level> per "
            "quantile level (the level as the row answer's key); error_bound.<measure> and "
            "error_bound.quantiles.<level>; warnings (a list of strings or null per contract). The values are the "
            "row answer's, null where it has null."
        ),
        "additionalProperties": {"type": "array"},
    }
    rows_schema = schemas["PriceResponse"]
    response = _columnar(
        rows_schema,
        "results",
        answer_columns,
        "ColumnarPriceResponse",
        "PriceResponse with the results as columns.",
        required=[*(k for k in rows_schema.get("required", []) if k != "results"), "columns"],
    )
    return {"ColumnarPriceRequest": request, "ColumnarPriceResponse": response}


@functools.cache
def openapi_bytes() -> bytes:
    """The OpenAPI document as served: built once a process (it depends on the code alone)."""
    return orjson.dumps(build_openapi())


def build_openapi() -> dict[str, Any]:
    _, defs = models_json_schema(
        [
            (PriceRequest, "validation"),
            (PriceResponse, "serialization"),
            (ModelsResponse, "serialization"),
            (ValidationResponse, "serialization"),
            (ErrorResponse, "serialization"),
            (CommitBody, "validation"),
            (PinBody, "validation"),
            (UnpinBody, "validation"),
            (GCBody, "validation"),
            (MarketSnapshot, "validation"),
            (CalibrateRequest, "validation"),
        ],
        ref_template=REF,
    )
    schemas = defs.get("$defs", {})
    schemas.update(columnar_schemas(schemas))
    plain = {"200": _json(ANY_OBJECT, "OK")}
    html_page = {"200": {"description": "HTML", "content": {"text/html": {"schema": TEXT}}}}
    paths: dict[str, Any] = {
        "/v1/price": {
            "post": {
                "summary": "Price contracts (measures, Greeks, distribution of S_T)",
                "tags": ["pricing"],
                "parameters": [
                    {
                        "name": "X-Request-Timeout",
                        "in": "header",
                        "required": False,
                        "description": "This request's deadline in seconds",
                        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 60},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "description": PRICE_BODY_DESCRIPTION,
                    "content": _rows_columns_or_arrow(PriceRequest, COLUMNAR_REQUEST),
                },
                "responses": {
                    "200": {
                        "description": "Priced, in the form of the request: rows, columns or an Arrow IPC stream",
                        "content": _rows_columns_or_arrow(PriceResponse, COLUMNAR_RESPONSE),
                    },
                    **_errors(400, 413, 415, 422, 503, 504),
                },
            }
        },
        "/v1/calibrate": {
            "post": {
                "summary": "Fit Heston or rough Bergomi to an underlying's vol surface in a snapshot",
                "description": (
                    "Open with store false (it writes nothing). With store true it writes a snapshot: like "
                    "PUT /v1/marketdata it then needs the market-data write token (marketdata.write_token) "
                    "when one is configured."
                ),
                "tags": ["calibration"],
                "security": [{}, {"bearer": []}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(CalibrateRequest)}}},
                "responses": {**plain, **_errors(400, 401, 403, 413, 415, 422, 503)},
            }
        },
        "/v1/models": {
            "get": {
                "summary": "Served models, each version's certificate summary and price-error heat map",
                "description": (
                    "Per served model: the served version's certificate (per measure, the p50, p95 and max of "
                    "the normalised error over the held-out sample) and its price-error heat map over the "
                    "model's two main dimensions, and the same for the version before it (previous; null "
                    "figures with a reason when it has no certificate or the store cannot give it)."
                ),
                "tags": ["models"],
                "responses": {"200": _json(_ref(ModelsResponse), "Served models")},
            }
        },
        "/v1/models/{name}/validation": {
            "get": {
                "summary": "A served model's validation history (the held-out price error over training)",
                "description": (
                    "versions: every committed version, oldest first, with its commit time, training step and "
                    "the p50, p95 and max price error (bp of D F) its last validation measured; history: every "
                    "validation of the served version's training (empty, with reason, when its manifest cannot "
                    "be read). 503 store_unavailable when the store does not list the versions."
                ),
                "tags": ["models"],
                "parameters": NAME,
                "responses": {
                    "200": _json(_ref(ValidationResponse), "Validation history"),
                    **_errors(404, 503),
                },
            }
        },
        "/healthz": {"get": {"summary": "Process alive", "tags": ["ops"], "responses": {**plain, **_errors(503)}}},
        "/readyz": {"get": {"summary": "Ready to price", "tags": ["ops"], "responses": {**plain, **_errors(503)}}},
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "tags": ["ops"],
                "responses": {
                    "200": {"description": "Text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
                },
            }
        },
        "/v1/openapi.json": {"get": {"summary": "This description", "tags": ["ops"], "responses": plain}},
        "/": {"get": {"summary": "Start page: links to /ui, /docs, /metrics", "tags": ["ops"], "responses": html_page}},
        "/docs": {
            "get": {
                "summary": "Every route with a request and its answer, the WebSocket protocol",
                "tags": ["ops"],
                "responses": html_page,
            }
        },
        "/v1/admin/models/{name}/commit": _admin("Commit the trainer's state", "post", CommitBody, 201, optional=True),
        "/v1/admin/models/{name}/versions": _admin("Version history", "get", None),
        "/v1/admin/models/{name}/pin": _admin("Serve version n (rollback)", "post", PinBody),
        "/v1/admin/models/{name}/unpin": _admin("Track the head again", "post", UnpinBody, optional=True),
        "/v1/admin/models/{name}/pins": _admin("The pin log, oldest first", "get", None),
        "/v1/admin/models/{name}/verify": _admin("Verify the hash chain", "get", None),
        "/v1/admin/models/{name}/gc": _admin("Collect old versions' content", "post", GCBody),
    }
    paths.update(_marketdata_paths(plain))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "SpectralMC server",
            "version": __version__,
            "description": "Prices from learned characteristic functions; see docs/api.md.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
