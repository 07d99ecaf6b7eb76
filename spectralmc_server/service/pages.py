"""The start page (``GET /``) and the API page (``GET /docs``): self-contained HTML (no
external assets, no token needed).

``/docs`` lists every route of the OpenAPI description with a request and the answer a
server gave to it (static/docs_examples.json), and the WebSocket protocol of
``/v1/stream`` with an example session and the client messages' JSON schemas (from
service/stream/messages.py). tests/service/test_pages.py sends every example shown on
the page to a real server and checks each answer's status, headers and fields.
"""

from __future__ import annotations

import functools
import html
import json
import re
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from spectralmc_server import __version__
from spectralmc_server.service import keys
from spectralmc_server.service.stream.messages import Subscribe, Unsubscribe

routes = web.RouteTableDef()
STATIC = Path(__file__).parent / "static"
INDEX_PAGE = (STATIC / "index.html").read_text().replace("__VERSION__", html.escape(__version__))
EXAMPLES: dict[str, Any] = orjson.loads((STATIC / "docs_examples.json").read_bytes())
WIDTH = 96  # a JSON value longer than this is spread over lines
ELIDED = "…"  # a value left out of an example for brevity

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; margin: 1.6em 0 0.4em; }
nav a { margin-right: 1em; } a { color: #1a4f9c; }
table { border-collapse: collapse; } td, th { padding: 0.2em 0.8em; text-align: left; vertical-align: top; }
tr:nth-child(even) td { background: #f7f7f7; }
pre { background: #f4f4f4; padding: 0.6em; overflow: auto; margin: 0.3em 0; }
.label { font-size: 0.85em; color: #555; margin-top: 0.5em; }
pre.send { border-left: 4px solid #3a6ea5; } pre.receive { border-left: 4px solid #4a9a4a; }
.note { color: #444; max-width: 60em; }
"""


def pretty(value: Any, indent: int = 0, lead: int = 0) -> str:
    """``value`` as JSON, on one line when it fits in ``WIDTH`` after ``indent`` spaces and a
    ``lead`` of characters before it, spread over lines otherwise."""
    flat = json.dumps(value, ensure_ascii=False)
    if not isinstance(value, dict | list) or not value or indent + lead + len(flat) <= WIDTH:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            key = json.dumps(k, ensure_ascii=False) + ": "
            items.append(pad + key + pretty(v, indent + 2, len(key)))
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return "[\n" + ",\n".join(pad + pretty(v, indent + 2) for v in value) + "\n" + " " * indent + "]"


def prose(text: str) -> str:
    """Plain text as HTML, with `backticks` as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def request_text(req: dict[str, Any]) -> str:
    lines = [f"{req['method']} {req['path']} HTTP/1.1", *(f"{k}: {v}" for k, v in req.get("headers", {}).items())]
    if "body" in req:
        lines += ["", pretty(req["body"])]
    return "\n".join(lines)


def response_text(resp: dict[str, Any]) -> str:
    status = int(resp["status"])
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", *(f"{k}: {v}" for k, v in resp["headers"].items())]
    if "body" in resp:
        lines += ["", pretty(resp["body"])]
    elif "text" in resp:
        lines += ["", resp["text"]]
    return "\n".join(lines)


def _example(ex: dict[str, Any]) -> str:
    return (
        f"<section class='example' id='{html.escape(ex['id'])}' data-route='{html.escape(ex['route'])}'>"
        f"<h3>{html.escape(ex['title'])} <small><code>{html.escape(ex['route'])}</code></small></h3>"
        + "".join(f"<p class='note'>{prose(t)}</p>" for t in ex.get("notes", []))
        + f"<div class='label'>request</div><pre class='request'>{html.escape(request_text(ex['request']))}</pre>"
        f"<div class='label'>answer</div><pre class='response'>{html.escape(response_text(ex['response']))}</pre>"
        "</section>"
    )


def _route_table(spec: dict[str, Any], anchors: dict[str, str]) -> str:
    rows = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            route = f"{method.upper()} {path}"
            shown = html.escape(path)
            if route in anchors:
                shown = f"<a href='#{html.escape(anchors[route])}'>{shown}</a>"
            codes = ", ".join(sorted(op.get("responses", {})))
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{shown}</code></td>"
                f"<td>{html.escape(op.get('summary', ''))}</td><td>{codes}</td></tr>"
            )
    return "<table><tr><th>method</th><th>path</th><th>what</th><th>statuses</th></tr>" + "".join(rows) + "</table>"


def _stream(stream: dict[str, Any]) -> str:
    messages = "".join(
        f"<tr><td><code>{html.escape(m)}</code></td><td>{prose(when)}</td></tr>"
        for m, when in stream["server_messages"]
    )
    session = "".join(
        f"<div class='label'>{'client sends' if kind == 'send' else 'server sends'}</div>"
        f"<pre class='{kind}'>{html.escape(pretty(message))}</pre>"
        for m in stream["session"]
        for kind, message in m.items()
    )
    schemas = "".join(
        f"<details><summary>{name} (JSON schema)</summary><pre>{html.escape(pretty(model.model_json_schema()))}</pre>"
        "</details>"
        for name, model in (("subscribe", Subscribe), ("unsubscribe", Unsubscribe))
    )
    return (
        "<h2 id='stream'>WebSocket <code>/v1/stream</code></h2>"
        + "".join(f"<p class='note'>{prose(t)}</p>" for t in stream["notes"])
        + schemas
        + "<table><tr><th>server message</th><th>when</th></tr>"
        + messages
        + "</table>"
        + "<h3>An example session</h3>"
        + "".join(f"<p class='note'>{prose(t)}</p>" for t in stream["session_notes"])
        + f"<section class='example stream' id='stream-session' data-route='GET /v1/stream'>{session}</section>"
    )


def docs_page(spec: dict[str, Any], examples: dict[str, Any]) -> str:
    """Every route with its examples, the stream protocol and the schemas, as one page."""
    anchors: dict[str, str] = {"GET /v1/stream": "stream"}
    for section in examples["sections"]:
        for ex in section["examples"]:
            anchors.setdefault(ex["route"], ex["id"])
    sections = "".join(
        f"<h2 id='{html.escape(s['id'])}'>{html.escape(s['title'])}</h2>"
        + "".join(f"<p class='note'>{prose(t)}</p>" for t in s.get("notes", []))
        + "".join(_example(ex) for ex in s["examples"])
        for s in examples["sections"]
    )
    schemas = "".join(
        f"<h3 id='schema-{html.escape(name)}'>{html.escape(name)}</h3><pre>{html.escape(pretty(s))}</pre>"
        for name, s in spec["components"]["schemas"].items()
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>SpectralMC API</title>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'><link rel='icon' href='data:,'>"
        f"<style>{STYLE}</style></head><body>"
        "<nav><a href='/'>start page</a><a href='/ui'>/ui</a><a href='/metrics'>/metrics</a>"
        "<a href='/v1/openapi.json'>/v1/openapi.json</a></nav>"
        f"<h1>SpectralMC server API {html.escape(spec['info']['version'])}</h1>"
        + "".join(f"<p class='note'>{prose(t)}</p>" for t in examples["notes"])
        + "<h2 id='routes'>Routes</h2>"
        + _route_table(spec, anchors)
        + sections
        + _stream(examples["stream"])
        + "<h2 id='schemas'>Schemas</h2>"
        + schemas
        + "</body></html>"
    )


@functools.cache
def _docs_html(spec: bytes) -> str:
    return docs_page(orjson.loads(spec), EXAMPLES)


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    """The start page: links to the live page, the API page, the metrics and the description."""
    return web.Response(text=INDEX_PAGE, content_type="text/html")


@routes.get("/docs")
async def docs(request: web.Request) -> web.Response:
    """Every route with a request and its answer, and the WebSocket protocol."""
    return web.Response(text=_docs_html(request.app[keys.OPENAPI]), content_type="text/html")
