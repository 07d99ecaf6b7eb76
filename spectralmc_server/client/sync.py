"""The synchronous client: :class:`AsyncClient`'s API on a private event loop.

Each :class:`Client` runs one event loop in a daemon thread and submits every call to
it, so it works the same from scripts, threads (calls from several threads are safe)
and notebooks whose own loop is running. Example::

    with Client("http://127.0.0.1:8080") as client:
        frame = client.price_table(book_df, measures=["price", "delta"])
        for quote in client.stream({"id": "s1", "contracts": [...], "interval_seconds": 1.0}):
            print(quote["seq"], quote["results"])
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterator, Mapping
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from spectralmc_server.client import books
from spectralmc_server.client.aio import AsyncClient
from spectralmc_server.client.stream import Stream

T = TypeVar("T")
P = ParamSpec("P")
F = TypeVar("F", bound=Callable[..., Any])
_END: Any = object()
CLOSE_WAIT = 10.0  # seconds close() waits for the loop to close its connections


def _shutdown(loop: asyncio.AbstractEventLoop, thread: threading.Thread, client: AsyncClient) -> None:
    """Close ``client`` on its loop, stop the loop and its thread (close() and the
    finalizer of a Client nobody closed)."""
    if loop.is_closed():
        return
    if thread.is_alive():
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(client.close(), loop).result(CLOSE_WAIT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CLOSE_WAIT)
    if not thread.is_alive():
        loop.close()


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]], doc: str
) -> Callable[Concatenate[Client, P], T]:
    """``Client``'s blocking form of an ``AsyncClient`` method: the same arguments and
    answer (one table of forwards instead of each signature written twice)."""

    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(method(self._async, *args, **kwargs))

    return _named(call, doc)


def _blocking_stream(
    method: Callable[Concatenate[AsyncClient, P], Stream], doc: str
) -> Callable[Concatenate[Client, P], SyncStream]:
    """``Client.stream``: the stream is made on the client's loop and read blocking."""

    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> SyncStream:
        async def make() -> Stream:
            return method(self._async, *args, **kwargs)

        return SyncStream(self, self._run(make()))

    call.__annotations__ = {**call.__annotations__, "return": "SyncStream"}
    call.__signature__ = inspect.signature(method).replace(return_annotation="SyncStream")  # type: ignore[attr-defined]
    return _named(call, doc)


def _named(call: F, doc: str) -> F:
    call.__module__ = __name__
    call.__qualname__ = f"Client.{call.__name__}"
    call.__doc__ = doc
    return call


class Client:
    """A blocking client of one SpectralMC server: the API of :class:`AsyncClient`
    (same arguments, same answers and errors), each call waiting for its answer.

    Example::

        import pandas as pd
        from spectralmc_server.client import Client

        book = pd.DataFrame({"id": ["c1", "c2"], "right": ["call", "put"], "strike": [105.0, 95.0],
                             "spot": 100.0, "expiry_years": 0.5, "vol": 0.25})
        with Client("http://127.0.0.1:8080") as client:
            priced = client.price_table(book, measures=["price", "delta"])
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 60.0,
        token: str | None = None,
        chunk_size: int = books.DEFAULT_CHUNK_SIZE,
    ) -> None:
        self._async = AsyncClient(base_url, timeout=timeout, token=token, chunk_size=chunk_size)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="spectralmc-client", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._thread, self._async)

    @property
    def base_url(self) -> str:
        return self._async.base_url

    @property
    def chunk_size(self) -> int:
        return self._async.chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"chunk_size must be at least 1, got {value}")
        self._async.chunk_size = value

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._finalizer.alive:
            coro.close()
            raise RuntimeError("this Client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # interrupted (Ctrl-C): the call stops on the loop too
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close streams and connections and stop the client's thread (idempotent)."""
        self._finalizer()

    models = _blocking(AsyncClient.models, """``GET /v1/models``: one row per served model.""")
    ready = _blocking(AsyncClient.ready, """``GET /readyz`` (raises :class:`Unavailable` when not ready).""")
    price = _blocking(AsyncClient.price, """Row JSON pricing; see :meth:`AsyncClient.price`.""")
    price_table = _blocking(
        AsyncClient.price_table,
        """Arrow pricing of a pyarrow Table or pandas DataFrame; see :meth:`AsyncClient.price_table`.""",
    )
    stream = _blocking_stream(
        AsyncClient.stream,
        """A blocking quote iterator over ``/v1/stream``; see :meth:`AsyncClient.stream`
        and :class:`Stream` (reconnects, errors).""",
    )


class SyncStream:
    """A :class:`Stream` as a blocking iterator: ``for quote in stream``, or
    ``stream.get(timeout)`` for the next quote within ``timeout`` seconds
    (:class:`TimeoutError` past it; the stream stays usable). Use ``with`` or
    ``close()`` to close it."""

    def __init__(self, client: Client, stream: Stream) -> None:
        self._client = client
        self._stream = stream

    @property
    def reconnects(self) -> int:
        return self._stream.reconnects

    @property
    def subscriptions(self) -> list[str]:
        return self._stream.subscriptions

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        return self.get()

    def connect(self) -> None:
        self._client._run(self._stream.connect())

    def get(self, timeout: float | None = None) -> dict[str, Any]:
        """The next quote (StopIteration once the stream is closed)."""

        async def next_quote() -> Any:
            try:
                return await asyncio.wait_for(self._stream.__anext__(), timeout)
            except StopAsyncIteration:
                return _END

        quote = self._client._run(next_quote())
        if quote is _END:
            raise StopIteration
        message: dict[str, Any] = quote
        return message

    def subscribe(self, subscription: Mapping[str, Any]) -> None:
        self._client._run(self._stream.subscribe(subscription))

    def unsubscribe(self, sub_id: str) -> None:
        self._client._run(self._stream.unsubscribe(sub_id))

    def close(self) -> None:
        if self._client._finalizer.alive:
            self._client._run(self._stream.close())
