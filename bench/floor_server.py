"""The serving path's floor: what a server of `spectralmc serve`'s shape pays per
request before any pricing work, for bench/server_load.py's single-contract scenario.

An aiohttp handler reads the body and parses it (orjson), puts the contract on a batch
with the others that arrive while the previous batch is out, and awaits its answer. A
batch goes to an engine process of its own (this file run with ``--engine``) as numpy
columns, pickled and length-prefixed over a pipe; the engine answers a number per
contract (the discounted intrinsic value: numpy, no model), the HTTP process sets each
request's future and writes one JSON row. Nothing else: no validation, admission,
deadlines, metrics, model versions or error bounds.

    python bench/floor_server.py PORT     # serves POST /v1/price and GET /readyz
"""

from __future__ import annotations

import asyncio
import pickle
import struct
import subprocess
import sys
from typing import Any

import numpy as np
import orjson
from aiohttp import web

HEAD = struct.Struct("<I")
FIELDS = ("spot", "strike", "rate", "expiry_years")


def engine() -> None:
    """The engine process: read a batch of columns from stdin, answer its prices on
    stdout, until stdin closes."""
    read, write = sys.stdin.buffer, sys.stdout.buffer
    while head := read.read(HEAD.size):
        (size,) = HEAD.unpack(head)
        cols = pickle.loads(read.read(size))
        price = np.maximum(cols["spot"] - cols["strike"], 0.0) * np.exp(-cols["rate"] * cols["expiry_years"])
        out = pickle.dumps(price, protocol=5)
        write.write(HEAD.pack(len(out)) + out)
        write.flush()


class Batches:
    """The HTTP process's side: one batch out at a time, the next filling meanwhile."""

    def __init__(self) -> None:
        self.waiting: list[tuple[asyncio.Future[float], dict[str, Any]]] = []
        self.out: list[asyncio.Future[float]] | None = None
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--engine", stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        asyncio.get_running_loop().create_task(self.answers())

    def add(self, contract: dict[str, Any]) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting.append((future, contract))
        if self.out is None and len(self.waiting) == 1:
            asyncio.get_running_loop().call_soon(self.send)
        return future

    def send(self) -> None:
        if self.out is not None or not self.waiting or self.proc is None or self.proc.stdin is None:
            return
        batch, self.waiting = self.waiting, []
        cols = {k: np.array([c[k] for _, c in batch], dtype=np.float64) for k in FIELDS}
        data = pickle.dumps(cols, protocol=5)
        self.out = [f for f, _ in batch]
        self.proc.stdin.write(HEAD.pack(len(data)) + data)

    async def answers(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        stdout = self.proc.stdout
        while True:
            (size,) = HEAD.unpack(await stdout.readexactly(HEAD.size))
            prices = pickle.loads(await stdout.readexactly(size)).tolist()
            futures, self.out = self.out or [], None
            for future, price in zip(futures, prices, strict=True):
                if not future.done():
                    future.set_result(price)
            self.send()


BATCHES = web.AppKey("batches", Batches)


async def price(request: web.Request) -> web.Response:
    contract = orjson.loads(await request.read())["contracts"][0]
    value = await request.app[BATCHES].add(contract)
    answer = {"results": [{"id": contract["id"], "price": value}]}
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def started(app: web.Application) -> None:
    app[BATCHES] = Batches()
    await app[BATCHES].start()


def main() -> None:
    if sys.argv[1:] == ["--engine"]:
        engine()
        return
    app = web.Application()
    app.on_startup.append(started)
    app.router.add_post("/v1/price", price)
    app.router.add_get("/readyz", ready)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
