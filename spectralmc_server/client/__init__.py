"""A Python client for the SpectralMC server (docs/client.md).

- :class:`Client` (blocking) and :class:`AsyncClient` (asyncio, aiohttp): ``price``
  (row JSON), ``price_table`` (a pyarrow Table or pandas DataFrame, sent as Arrow),
  ``models``, ``ready`` and ``stream`` (quotes from the WebSocket, reconnecting after a
  dropped connection). Books over ``chunk_size`` contracts (default the server's limit,
  20,000) are sent in several requests and joined in order.
- Errors: :class:`SpectralMCError` and its families (:class:`InvalidRequest`,
  :class:`NoMarketData`, :class:`TooLarge`, :class:`Unauthorized`, :class:`NotFound`,
  :class:`Conflict`, :class:`Unavailable`, :class:`Overloaded`,
  :class:`DeadlineExceeded`, :class:`ServerError`, :class:`ConnectionFailed`), each with
  ``status``, ``code``, ``message``, ``details`` and ``retry_after``.

Example::

    import pandas as pd
    from spectralmc_server.client import Client

    book = pd.DataFrame({"id": ["c1", "c2"], "right": ["call", "put"], "strike": [105.0, 95.0],
                         "spot": 100.0, "expiry_years": 0.5, "vol": 0.25})
    with Client("http://127.0.0.1:8080") as client:
        priced = client.price_table(book, measures=["price", "delta"])  # a DataFrame
        answer = client.price(book.to_dict("records"))                   # row JSON

pandas is optional: it is imported only when a DataFrame is priced.
"""

from __future__ import annotations

from spectralmc_server.client import errors
from spectralmc_server.client.aio import AsyncClient
from spectralmc_server.client.books import ARROW_STREAM, DEFAULT_CHUNK_SIZE
from spectralmc_server.client.errors import *  # noqa: F403  (the error classes: errors.__all__)
from spectralmc_server.client.stream import Stream
from spectralmc_server.client.sync import Client, SyncStream

__all__ = [
    "ARROW_STREAM",
    "DEFAULT_CHUNK_SIZE",
    "AsyncClient",
    "Client",
    "Stream",
    "SyncStream",
]
__all__ += errors.__all__
