"""The asynchronous client (aiohttp): :class:`AsyncClient` and its quote :class:`Stream`.

Example::

    async with AsyncClient("http://127.0.0.1:8080") as client:
        answer = await client.price(
            [{"id": "c1", "right": "call", "strike": 105.0, "spot": 100.0, "expiry_years": 0.5, "vol": 0.25}],
            measures=["price", "delta"],
        )
        answer["results"][0]["price"]
        frame = await client.price_table(book_df, measures=["price"])  # pandas in, pandas out
        async for quote in client.stream({"id": "s1", "contracts": [...], "interval_seconds": 1.0}):
            print(quote["seq"], quote["results"])
"""

from __future__ import annotations

import itertools
import logging
import math
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp
import orjson

from spectralmc_server.client import books
from spectralmc_server.client.errors import (
    ConnectionFailed,
    ServerError,
    SpectralMCError,
    error_from_answer,
    error_from_code,
    parse_retry_after,
)
from spectralmc_server.client.stream import Stream, Time, _time

log = logging.getLogger("spectralmc_server.client")
T = TypeVar("T")
TIMEOUT_HEADER = "X-Request-Timeout"
REPRICE_ROUNDS = 2  # chunks answered by a model version that changed mid-book: priced again at most this often
MAX_STREAM_MESSAGE = 256 << 20  # the largest quote message the stream accepts (bytes)


def request_fields(
    measures: Sequence[str] | None,
    namespace: str | None,
    val_datetime: Time | None,
    data_asof: Time | None,
    quantile_levels: Sequence[float] | None,
) -> dict[str, Any]:
    """The request-level fields that were given (the server's defaults stand for the rest)."""
    fields: dict[str, Any] = {
        "namespace": namespace,
        "val_datetime": _time(val_datetime),
        "data_asof": _time(data_asof),
        "measures": None if measures is None else list(measures),
        "quantile_levels": None if quantile_levels is None else list(quantile_levels),
    }
    return {k: v for k, v in fields.items() if v is not None}


class AsyncClient:
    """A client of one SpectralMC server, on aiohttp.

    - ``base_url``: the server, e.g. ``http://127.0.0.1:8080``.
    - ``timeout``: seconds the client waits for each HTTP answer (raised to
      ``request_timeout`` + 5 for a call that gives a longer server deadline).
    - ``token``: sent as ``Authorization: Bearer <token>`` on every request.
    - ``chunk_size``: the most contracts per request; a larger book is sent as several
      requests and the answers joined in order (default: the server's limit, 20,000).

    One instance per event loop; ``close()`` it (or use ``async with``). Example::

        async with AsyncClient("http://127.0.0.1:8080") as client:
            answer = await client.price([{"id": "c1", "right": "call", "strike": 105.0,
                                          "spot": 100.0, "expiry_years": 0.5, "vol": 0.25}])
            print(answer["results"][0]["price"])
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 60.0,
        token: str | None = None,
        chunk_size: int = books.DEFAULT_CHUNK_SIZE,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.chunk_size = chunk_size
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None
        self._streams: weakref.WeakSet[Stream] = weakref.WeakSet()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every open stream and the HTTP session (a later call opens a new one)."""
        for stream in list(self._streams):
            await stream.close()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        request_timeout: float | None = None,
    ) -> tuple[bytes, str]:
        """One HTTP exchange: the answer's body and content type, or the typed error."""
        sent = dict(headers or {})
        wait = self.timeout
        if request_timeout is not None:
            sent[TIMEOUT_HEADER] = f"{request_timeout:g}"
            wait = max(wait, request_timeout + 5.0)
        try:
            async with self._http().request(
                method,
                self.base_url + path,
                data=body,
                headers=sent,
                timeout=aiohttp.ClientTimeout(total=wait),
            ) as r:
                data = await r.read()
                if r.status >= 300:
                    raise error_from_answer(r.status, data, r.headers)
                return data, r.content_type
        except TimeoutError:
            raise ConnectionFailed(f"no answer from {self.base_url}{path} within {wait:g} s") from None
        except aiohttp.ClientError as exc:
            raise ConnectionFailed(f"{method} {self.base_url}{path} failed: {exc}") from exc

    async def _get_json(self, path: str) -> Any:
        data, _ = await self._request("GET", path)
        return orjson.loads(data)

    async def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: one row per served model (name, process, version,
        content_hash, mode, domain, certificate, heatmap, previous, ...)."""
        rows: list[dict[str, Any]] = (await self._get_json("/v1/models"))["models"]
        return rows

    async def ready(self) -> dict[str, Any]:
        """``GET /readyz``: the readiness answer (raises :class:`Unavailable` when not ready)."""
        answer: dict[str, Any] = await self._get_json("/readyz")
        return answer

    # -- pricing --------------------------------------------------------------------------

    async def price(
        self,
        contracts: Sequence[Mapping[str, Any]],
        *,
        measures: Sequence[str] | None = None,
        namespace: str | None = None,
        val_datetime: Time | None = None,
        data_asof: Time | None = None,
        quantile_levels: Sequence[float] | None = None,
        request_timeout: float | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/price`` with row JSON: the answer as the server gives it
        (``namespace``, ``val_datetime``, ``data_asof``, ``results`` in book order,
        ``models``, ``market_data``).

        ``contracts`` are dicts as in docs/api.md; the other arguments are the request's
        fields (None: the server's default). A book over ``chunk_size`` contracts is
        sent in chunks, one after another, and joined (see :meth:`_chunked` for how it
        stays on one snapshot and one model version). ``request_timeout`` is each
        request's server-side deadline (``X-Request-Timeout``, seconds).
        """
        books.check_unique_ids(c.get("id") for c in contracts if isinstance(c, Mapping))
        fields = request_fields(measures, namespace, val_datetime, data_asof, quantile_levels)
        size = self.chunk_size

        async def send(i: int, pins: Mapping[str, Any]) -> tuple[dict[str, Any], list[Any]]:
            body = {**fields, **pins, "contracts": list(contracts[i * size : (i + 1) * size])}
            data, _ = await self._request(
                "POST",
                "/v1/price",
                body=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
                request_timeout=request_timeout,
            )
            answer: dict[str, Any] = orjson.loads(data)
            results: list[Any] = answer.pop("results")
            return answer, results

        meta, parts = await self._chunked(max(1, math.ceil(len(contracts) / size)), send)
        results = [row for part in parts for row in part]
        return {k: meta[k] for k in ("namespace", "val_datetime", "data_asof")} | {
            "results": results,
            "models": meta["models"],
            "market_data": meta["market_data"],
        }

    async def price_table(
        self,
        book: Any,
        *,
        measures: Sequence[str] | None = None,
        namespace: str | None = None,
        val_datetime: Time | None = None,
        data_asof: Time | None = None,
        quantile_levels: Sequence[float] | None = None,
        request_timeout: float | None = None,
    ) -> Any:
        """``POST /v1/price`` with an Arrow book: a pyarrow Table in, a pyarrow Table
        out; a pandas DataFrame in, a DataFrame out (on the book's index).

        The book has one column per contract field (``id``, ``right``, ``strike``,
        ``spot``, ``expiry_years``, ``rate``, ``dividend``, ``process``, ``vol``,
        ``fixings``, ``underlying``, ``expiry``; ``params.<name>`` or a ``params`` struct
        column for process parameters); a null (NaN in pandas) is a field the contract
        does not give. The answer has ``id``, ``model``, ``method``, one column per
        scalar measure, ``quantiles.<level>``, ``error_bound.<measure>``,
        ``error_bound.quantiles.<level>`` and ``warnings``, row i answering the book's
        row i; the response's namespace, times, ``models`` and ``market_data`` are the
        table's ``spectralmc.response`` metadata (JSON), or ``df.attrs["spectralmc"]``.
        """
        table, index = books.as_table(book)
        books.check_unique_ids(books.ids_of(table))
        fields = request_fields(measures, namespace, val_datetime, data_asof, quantile_levels)
        size = self.chunk_size
        rows = books.n_rows(table)

        async def send(i: int, pins: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
            chunk = books.slice_rows(table, i * size, min(rows, (i + 1) * size))
            data, content_type = await self._request(
                "POST",
                "/v1/price",
                body=books.encode(chunk, {**fields, **pins}),
                headers={"Content-Type": books.ARROW_STREAM, "Accept": books.ARROW_STREAM},
                request_timeout=request_timeout,
            )
            if content_type != books.ARROW_STREAM:
                raise ServerError(
                    f"asked for {books.ARROW_STREAM}, the server answered {content_type or 'no content type'}",
                    code="bad_answer",
                )
            answer, meta = books.decode(data)
            return meta, answer

        meta, parts = await self._chunked(max(1, math.ceil(rows / size)), send)
        result = books.concat(parts, meta)
        if not books.is_dataframe(book):
            return result
        return books.to_dataframe(result, meta, index)

    async def _chunked(
        self, n: int, send: Callable[[int, Mapping[str, Any]], Awaitable[tuple[dict[str, Any], T]]]
    ) -> tuple[dict[str, Any], list[T]]:
        """Chunks 0..n-1 sent in order: the joined metadata and each chunk's payload.

        One book, one snapshot, one model version:

        - once a chunk names the snapshot its contracts by reference were priced from
          (``market_data``), the chunks after it ask for that exact snapshot
          (``val_datetime``, ``data_asof`` = its resolved key), so a snapshot stored
          mid-book does not split the book;
        - when a model's version changes mid-book (a hot swap), the chunks answered by
          another version than the newest answer that used the model (in time: a chunk
          priced again is newer than every chunk before it) are priced again (at most
          ``REPRICE_ROUNDS`` times; then :class:`SpectralMCError` ``models_changed``).

        The answer echoes the first chunk's ``namespace``, ``val_datetime`` and
        ``data_asof`` (the request's own).
        """
        pins: dict[str, Any] = {}
        metas: list[dict[str, Any]] = []
        payloads: list[T] = []
        answers = itertools.count()
        answered: list[int] = []  # per chunk: when its latest answer came (0 for the first answer, ...)
        for i in range(n):
            meta, payload = await send(i, pins)
            metas.append(meta)
            payloads.append(payload)
            answered.append(next(answers))
            market = meta.get("market_data")
            if n > 1 and market and not pins:
                pins = {"val_datetime": market["val_datetime"], "data_asof": market["data_asof"]}
        echo = {k: metas[0].get(k) for k in ("namespace", "val_datetime", "data_asof")}
        for round_ in range(REPRICE_ROUNDS + 1):
            served: dict[str, Any] = {}  # model -> its identity in the newest answer that used it
            for i in sorted(range(n), key=answered.__getitem__):
                served.update(metas[i].get("models") or {})
            stale = [i for i, m in enumerate(metas) if any(served[k] != v for k, v in (m.get("models") or {}).items())]
            if not stale:
                break
            if round_ == REPRICE_ROUNDS:
                raise SpectralMCError(
                    f"the served model versions kept changing while the book was priced ({len(stale)} of {n} "
                    "chunks on an older version); try again",
                    code="models_changed",
                )
            log.info("model version changed mid-book: pricing %d of %d chunks again", len(stale), n)
            for i in stale:
                metas[i], payloads[i] = await send(i, pins)
                answered[i] = next(answers)
        market = next((m["market_data"] for m in metas if m.get("market_data")), None)
        return {**echo, "models": served, "market_data": market}, payloads

    # -- streaming ------------------------------------------------------------------------

    def stream(
        self,
        *subscriptions: Mapping[str, Any],
        yield_errors: bool = False,
        heartbeat: float = 30.0,
        reconnect_initial: float = 0.1,
        reconnect_max: float = 5.0,
        reconnect_for: float | None = 300.0,
    ) -> Stream:
        """A quote stream from ``GET /v1/stream`` (WebSocket) for ``subscriptions``:
        each a subscribe message without ``op`` (``{"id": "s1", "contracts": [...],
        "measures": [...], "interval_seconds": 1.0}``, or ``{"id": "t1", "topic": ...}``).
        Iterate it (``async for quote in client.stream(...)``) or enter it
        (``async with client.stream(...) as s``); see :class:`Stream`."""
        stream = Stream(
            self,
            subscriptions,
            yield_errors=yield_errors,
            heartbeat=heartbeat,
            reconnect_initial=reconnect_initial,
            reconnect_max=reconnect_max,
            reconnect_for=reconnect_for,
        )
        self._streams.add(stream)
        return stream

    async def _ws_connect(self, heartbeat: float) -> aiohttp.ClientWebSocketResponse:
        url = self.base_url + "/v1/stream"
        try:
            return await self._http().ws_connect(
                url, heartbeat=heartbeat, max_msg_size=MAX_STREAM_MESSAGE, timeout=aiohttp.ClientWSTimeout(ws_close=5.0)
            )
        except aiohttp.WSServerHandshakeError as exc:
            retry_after = parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            code = {503: "unavailable", 404: "not_found", 401: "unauthorized", 403: "forbidden"}.get(exc.status, "")
            raise error_from_code(
                code or "http_error",
                f"the WebSocket upgrade at {url} was answered {exc.status}: {exc.message}",
                status=exc.status,
                retry_after=retry_after,
            ) from None
        except TimeoutError:
            raise ConnectionFailed(f"no WebSocket answer from {url}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectionFailed(f"cannot connect to {url}: {exc}") from exc
