"""The start page (GET /) and the API page (GET /docs), service/pages.py.

Both answer self-contained HTML (every link and asset on the server itself) whose links
answer 200, and need no token. Every example /docs shows is parsed from the page as a
reader sees it and sent, in the page's order, to a real server; each answer must be
what the page says: the status, the headers shown, and the fields ("…" stands for a
value left out, a "…" key for keys left out; enum-like strings and booleans must be
equal, numbers numbers). The WebSocket session is replayed on the same server. Every
route of the OpenAPI description has an example. In a real Chromium the start page
leads to /docs and /ui and /ui back to both, without a console error.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

import orjson
import pytest
from playwright.async_api import Page, async_playwright
from server_util import TOKEN, Client, MakeClient

ELIDED = "…"
ENUM_LIKE = re.compile(r"^[a-z_]+$")  # "cvnn", "tracking", "invalid", "quote": compared by value
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
START_LINKS = {"/ui", "/docs", "/metrics", "/v1/openapi.json", "/readyz", "/healthz"}


@dataclass
class Example:
    route: str  # "POST /v1/price", as in the OpenAPI description
    id: str
    blocks: list[tuple[str, str]] = field(default_factory=list)  # (pre class, its text)


class PageParser(HTMLParser):
    """The links and asset references of a page, and its examples: each
    <section class="example"> with the text of its <pre> blocks, in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.references: list[str] = []
        self.examples: list[Example] = []
        self._pre: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.references += [a[k] for k in ("href", "src", "action") if k in a]
        classes = a.get("class", "").split()
        if tag == "section" and "example" in classes:
            self.examples.append(Example(route=a["data-route"], id=a["id"]))
        elif tag == "pre" and self.examples and classes and classes[0] in ("request", "response", "send", "receive"):
            self._pre, self._text = classes[0], []

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre" and self._pre is not None:
            self.examples[-1].blocks.append((self._pre, "".join(self._text)))
            self._pre = None

    def handle_data(self, data: str) -> None:
        if self._pre is not None:
            self._text.append(data)


def parse(text: str) -> PageParser:
    parser = PageParser()
    parser.feed(text)
    parser.close()
    return parser


async def html_page(client: Client, path: str) -> str:
    r = await client.get(path)
    text = await r.text()
    assert r.status == 200, (path, r.status, text[:500])
    assert r.headers["Content-Type"] == "text/html; charset=utf-8", (path, r.headers["Content-Type"])
    return text


def assert_self_contained(path: str, text: str, references: list[str]) -> None:
    """Nothing to fetch from another host: every link and asset is on this server."""
    for ref in references:
        assert ref.startswith(("/", "#", "data:")) and not ref.startswith("//"), (path, ref)
    assert "@import" not in text and "url(http" not in text, path


def http_message(text: str) -> tuple[str, dict[str, str], str]:
    """(first line, headers, body) of a request or answer as the page shows it."""
    head, _, body = text.partition("\n\n")
    first, *lines = head.split("\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return first, headers, body


def route_pattern(template: str) -> re.Pattern[str]:
    """/v1/admin/models/{name}/pin -> a pattern for its concrete paths."""
    return re.compile("^" + re.sub(r"\\\{[a-z_]+\\\}", "[^/?]+", re.escape(template)) + r"(\?.*)?$")


def assert_shape(shown: Any, got: Any, where: str = "answer") -> None:
    """``got`` has what ``shown`` shows (the rules in the module docstring)."""
    if shown == ELIDED:
        return
    if isinstance(shown, dict):
        assert isinstance(got, dict), (where, got)
        keys = set(shown) - {ELIDED}
        if ELIDED in shown:
            assert keys <= set(got), (where, sorted(keys - set(got)))
        else:
            assert keys == set(got), (where, "shown", sorted(keys), "got", sorted(got))
        for k in keys:
            assert_shape(shown[k], got[k], f"{where}.{k}")
    elif isinstance(shown, list):
        assert isinstance(got, list), (where, got)
        items = [x for x in shown if x != ELIDED]
        if len(items) < len(shown):
            assert len(got) >= len(items), (where, len(got))
        else:
            assert len(got) == len(shown), (where, len(got), len(shown))
        for i, x in enumerate(items):
            assert_shape(x, got[i], f"{where}[{i}]")
    elif shown is None or got is None:
        return  # null and a value may take each other's place
    elif isinstance(shown, bool):
        assert got is shown, (where, got)
    elif isinstance(shown, int | float):
        assert isinstance(got, int | float) and not isinstance(got, bool), (where, got)
    else:
        assert isinstance(got, str), (where, got)
        if ENUM_LIKE.match(shown):
            assert got == shown, (where, got)


async def send_example(client: Client, ex: Example) -> None:
    """Send the example's request and check the answer against the one shown."""
    blocks = dict(ex.blocks)
    assert set(blocks) == {"request", "response"} and len(ex.blocks) == 2, ex
    first, headers, body = http_message(blocks["request"])
    method, path, version = first.split(" ")
    assert version == "HTTP/1.1" and f"{method} " == ex.route[: len(method) + 1], (ex.id, first)
    assert route_pattern(ex.route.split(" ", 1)[1]).match(path), (ex.id, path)
    headers = {k: v.replace("$SPECTRALMC_ADMIN_TOKEN", TOKEN) for k, v in headers.items()}
    r = await client.request(method, path, data=body.encode() if body else None, headers=headers)
    raw = await r.read()
    status_line, shown_headers, shown_body = http_message(blocks["response"])
    assert r.status == int(status_line.split(" ")[1]), (ex.id, r.status, raw[:500])
    for name, value in shown_headers.items():
        if name == "Content-Type":  # the mime type: a text format's version may move with its library
            assert r.content_type == value.split(";")[0], (ex.id, r.headers[name])
        else:
            assert r.headers.get(name) == value, (ex.id, name, r.headers.get(name))
    if r.content_type == "application/json":
        assert_shape(orjson.loads(shown_body), orjson.loads(raw), ex.id)
    elif r.content_type == "text/plain":  # Prometheus text: each sample shown, by name and labels
        samples = {line.rpartition(" ")[0] for line in raw.decode().splitlines() if not line.startswith("#")}
        for line in shown_body.splitlines():
            if line.startswith("# "):
                assert line in raw.decode().splitlines(), (ex.id, line)
            else:
                assert line.rpartition(" ")[0] in samples, (ex.id, line)
    else:
        assert r.content_type == "text/html" and not shown_body, (ex.id, r.content_type)


async def replay_stream(client: Client, ex: Example) -> None:
    """Send each client message of the session and check each server message shown."""
    assert ex.blocks and all(kind in ("send", "receive") for kind, _ in ex.blocks), ex
    async with client.ws_connect("/v1/stream") as ws:
        for i, (kind, text) in enumerate(ex.blocks):
            message = orjson.loads(text)
            if kind == "send":
                await ws.send_str(text)
            else:
                got = await ws.receive_json(timeout=30)
                assert got["type"] == message["type"] and got.get("id") == message.get("id"), (i, got)
                assert_shape(message, got, f"stream[{i}]")


async def test_start_page_links_every_page(make_client: MakeClient) -> None:
    client = await make_client()
    text = await html_page(client, "/")
    page = parse(text)
    assert set(page.references) >= START_LINKS, page.references
    assert_self_contained("/", text, page.references)
    for ref in page.references:
        if ref.startswith("/"):
            r = await client.get(ref)
            assert r.status == 200, (ref, r.status)
    r = await client.head("/")
    assert r.status == 200


async def test_ui_links_back(make_client: MakeClient) -> None:
    client = await make_client()
    refs = parse(await html_page(client, "/ui")).references
    assert {"/", "/docs"} <= set(refs), refs


async def test_docs_shows_every_route_and_every_example_answers_as_shown(make_client: MakeClient) -> None:
    client = await make_client(train={"enabled": True})  # the commit example needs the online trainer
    text = await html_page(client, "/docs")
    page = parse(text)
    assert_self_contained("/docs", text, page.references)
    for ref in ("/", "/ui", "/metrics", "/v1/openapi.json"):
        assert ref in page.references, ref
    anchors = {ref[1:] for ref in page.references if ref.startswith("#")}
    assert anchors <= {ex.id for ex in page.examples} | {"stream"} and anchors, anchors

    spec = orjson.loads(await (await client.get("/v1/openapi.json")).read())
    routes = {f"{method.upper()} {path}" for path, ops in spec["paths"].items() for method in ops}
    shown = {ex.route for ex in page.examples}
    assert routes <= shown, f"routes without an example on /docs (static/docs_examples.json): {routes - shown}"
    assert shown <= routes, f"examples of routes the OpenAPI description lacks: {shown - routes}"

    stream = [ex for ex in page.examples if ex.route == "GET /v1/stream"]
    assert len(stream) == 1, stream
    for ex in page.examples:
        if ex is not stream[0]:
            await send_example(client, ex)
    await replay_stream(client, stream[0])


def test_shape_check_can_fail() -> None:
    """The comparison above rejects a missing, extra or renamed field, another code, a
    list of another length and a string for a number."""
    shown = {"a": 1, "b": {"code": "invalid", "x": [1.0, 2.0]}, "c": "…", "d": [{"e": True}, "…"]}
    assert_shape(shown, {"a": 2, "b": {"code": "invalid", "x": [3, 4.5]}, "c": [1], "d": [{"e": True}, {}]})
    for bad in (
        {"a": 1, "b": {"code": "invalid", "x": [1.0, 2.0]}, "c": 0},  # d missing
        {"a": 1, "b": {"code": "invalid", "x": [1.0, 2.0]}, "c": 0, "d": [{"e": True}], "f": 0},  # extra f
        {"a": 1, "b": {"code": "conflict", "x": [1.0, 2.0]}, "c": 0, "d": [{"e": True}]},  # another code
        {"a": 1, "b": {"code": "invalid", "x": [1.0]}, "c": 0, "d": [{"e": True}]},  # shorter list
        {"a": "1", "b": {"code": "invalid", "x": [1.0, 2.0]}, "c": 0, "d": [{"e": True}]},  # a string
        {"a": 1, "b": {"code": "invalid", "x": [1.0, 2.0]}, "c": 0, "d": [{"e": False}]},  # another boolean
    ):
        with pytest.raises(AssertionError):
            assert_shape(shown, bad)


async def _click_to(page: Page, selector: str, path: str, base: str) -> None:
    async with page.expect_navigation():
        await page.click(selector)
    assert page.url == base + path, (page.url, path)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
async def test_pages_in_a_browser(make_client: MakeClient) -> None:
    """Start page -> /docs -> start page -> /ui (live) -> /docs -> /ui -> start page, by
    clicking the links, with no console error and no failed request (the page leaves /ui
    once it has shown what it fetches: the models and, with no snapshot, the hint)."""
    assert CHROMIUM is not None
    client = await make_client()
    base = str(client.make_url("")).rstrip("/")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            failed: list[str] = []
            page.on("requestfailed", lambda req: failed.append(req.url))
            await page.goto(base + "/")
            assert await page.title() == "SpectralMC server"
            await _click_to(page, "#links a[href='/docs']", "/docs", base)
            assert await page.title() == "SpectralMC API"
            assert await page.is_visible("#stream") and await page.is_visible("section#price-rows pre.response")
            await _click_to(page, "nav a[href='/']", "/", base)
            await _click_to(page, "#links a[href='/ui']", "/ui", base)
            await page.wait_for_function("document.getElementById('status').textContent === 'live'", timeout=10_000)
            await page.wait_for_selector("#models tbody tr", timeout=10_000)  # after the validation histories
            await page.wait_for_selector("#hint:not([hidden])", timeout=10_000)  # no snapshot: its last fetch
            await _click_to(page, "footer a[href='/docs']", "/docs", base)
            await page.go_back()
            await page.wait_for_function("document.getElementById('status').textContent === 'live'", timeout=10_000)
            await page.wait_for_selector("#hint:not([hidden])", timeout=10_000)
            await page.wait_for_selector("#validation svg.chart", timeout=10_000)
            await _click_to(page, "footer a[href='/']", "/", base)
            assert errors == [] and failed == [], (errors, failed)
        finally:
            await browser.close()
