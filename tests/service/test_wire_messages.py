"""The engine's messages (engine_service/messages.py) pickle as their constructors'
arguments (``Wire``): every field crosses, equal and of its type; the engine gives the
requests of one job and lease one identity dict, which crosses once and arrives shared."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from server_fixtures import make_client  # noqa: F401
from server_util import CONTRACT, MakeClient, app_of, block_worker

from spectralmc_server.engine_service.messages import Head, ModelId, PriceJob, PriceResult, WireEntry
from spectralmc_server.pricing.book import book_of
from spectralmc_server.pricing.schemas import PriceRequest
from spectralmc_server.service import keys

WHEN = datetime(2026, 12, 7, 16, 0, tzinfo=UTC)


def _entry(req: int) -> WireEntry:
    book = book_of(PriceRequest.model_validate({"contracts": [CONTRACT]}))
    head = Head("ns", WHEN, None, ("price", "quantiles"), (0.1, 0.9))
    return WireEntry(req=req, head=head, book=book, offset=7, columnar=True, market=None, rows=(2, 5))


@pytest.mark.parametrize(
    "message",
    [
        Head("ns", WHEN, WHEN, ("price",), None),
        ModelId("gbm", None, "sha256:ab"),
        _entry(3),
        PriceJob((_entry(1), _entry(2)), None),
        PriceResult(({"results": []},), {1: {"gbm": ModelId("gbm", 4, "sha256:cd")}}, 1.5, 2.5, 0.25),
    ],
    ids=lambda m: type(m).__name__,
)
def test_a_message_crosses_whole(message: Any) -> None:
    got = pickle.loads(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
    assert type(got) is type(message)
    for f in dataclasses.fields(message):
        want, value = getattr(message, f.name), getattr(got, f.name)
        if f.name == "book" and want is not None:
            assert {k: str(v) for k, v in vars(value).items()} == {k: str(v) for k, v in vars(want).items()}
            assert np.array_equal(value.strike, want.strike)
        elif f.name == "entries":
            assert [e.head for e in value] == [e.head for e in want]
        else:
            assert value == want and type(value) is type(want), f.name


def test_identities_shared_by_requests_cross_once() -> None:
    """An identity dict shared by requests (the engine gives the requests of one lease
    one dict: core.py _price) crosses once and arrives shared; one per request, as the
    engine made them before, costs ten times the bytes and a ModelId each."""
    names = ("gbm", "heston", "merton", "asian", "rbergomi")

    def identities() -> dict[str, ModelId]:
        return {p: ModelId(p, 1, f"sha256:{p}") for p in names}

    shared = PriceResult((), dict.fromkeys(range(64), identities()), 0.0, 1.0, 0.5)
    apart = PriceResult((), {r: identities() for r in range(64)}, 0.0, 1.0, 0.5)  # as before
    got = pickle.loads(pickle.dumps(shared, protocol=pickle.HIGHEST_PROTOCOL))
    assert got == shared and all(got.models[r] is got.models[0] for r in range(64))
    size = len(pickle.dumps(shared, protocol=pickle.HIGHEST_PROTOCOL))
    assert size * 10 < len(pickle.dumps(apart, protocol=pickle.HIGHEST_PROTOCOL)), size


async def test_the_engine_gives_a_jobs_requests_one_identity_dict(
    make_client: MakeClient,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """core.py _price: requests batched into one job under one lease share the identity
    dict of their answer (the engine on a thread here, so the PriceResult is the
    engine's own object), and each answer still names the version it came from."""
    client = await make_client()
    engine = app_of(client)[keys.ENGINE]
    results: list[PriceResult] = []
    price = engine.price

    def spy(job: PriceJob) -> asyncio.Future[PriceResult]:
        future = price(job)

        def keep(f: asyncio.Future[PriceResult]) -> None:
            if not f.cancelled() and f.exception() is None:
                results.append(f.result())

        future.add_done_callback(keep)
        return future

    monkeypatch.setattr(engine, "price", spy)
    held = block_worker(client, 0.5)  # the requests queue meanwhile, then go as one job

    async def post(k: int) -> Any:
        body = {"contracts": [{**CONTRACT, "id": f"c{k}", "strike": 90.0 + k}]}
        r = await client.post("/v1/price", json=body)
        assert r.status == 200, await r.text()
        return await r.json()

    answers = await asyncio.gather(*(post(k) for k in range(8)))
    await held
    shared = [r for r in results if len(r.models) > 1]
    assert shared, [len(r.models) for r in results]
    for result in shared:
        first = next(iter(result.models.values()))
        assert all(ids is first for ids in result.models.values())
    assert all(a["models"]["gbm"]["version"] == answers[0]["models"]["gbm"]["version"] for a in answers)
