"""Hot swap under load: clients price continuously while 10 versions are committed.

Every version has slightly different weights, so a price identifies the version that
made it. Each answer must be 200, name a version whose stored content hash it quotes,
and carry exactly the prices that version gives on its own (one complete version, never
a mix); a client never sees versions go backwards.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from server_util import MakeClient

from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.engine.served import load_served_model
from spectralmc_server.pricing.schemas import PriceRequest
from spectralmc_server.pricing.valuation import Valuer
from spectralmc_server.service import keys

N_VERSIONS = 10
CLIENTS = 6
BODY: dict[str, Any] = {
    "measures": ["price", "delta", "stdev"],
    "contracts": [
        {"id": "a", "right": "call", "strike": 105.0, "spot": 100.0, "expiry_years": 0.5, "vol": 0.25},
        {"id": "b", "right": "put", "strike": 90.0, "spot": 100.0, "expiry_years": 1.5, "vol": 0.4, "rate": 0.02},
    ],
}


def _variant(ckpt: Checkpoint, i: int) -> Checkpoint:
    """Version i: every weight scaled by (1 + i * 1e-3), and the manifest says so.

    Each carries the base model's certificate named for its own content: the variants
    differ from it by at most 1% of each weight, and this test is about swapping, not
    accuracy (a tracker serves only certified versions that pass their gate)."""
    assert ckpt.certificate is not None  # the bundled model's, seeded with it
    model = {k: v * (1.0 + i * 1e-3) if v.is_floating_point() else v for k, v in ckpt.model.items()}
    manifest = {**ckpt.manifest, "metrics": {**ckpt.manifest["metrics"], "variant": i}}
    variant = Checkpoint(manifest, model, ckpt.training)
    return replace(variant, certificate={**ckpt.certificate, "model_hash": variant.content_hash})


async def test_hot_swap_under_load(make_client: MakeClient) -> None:
    client = await make_client(poll_seconds=0.02, models=["gbm"])
    app = client.app
    assert app is not None
    host = app[keys.HOST]
    store = host.stores["gbm"]
    base = await store.load(1, need_training=True)

    seen: list[list[tuple[int, str, list[float]]]] = [[] for _ in range(CLIENTS)]
    statuses: list[int] = []
    done = asyncio.Event()

    async def price_forever(k: int) -> None:
        while not done.is_set():
            r = await client.post("/v1/price", json=BODY)
            statuses.append(r.status)
            body = await r.json()
            if r.status == 200:
                ident = body["models"]["gbm"]
                values = [row[m] for row in body["results"] for m in ("price", "delta", "stdev")]
                seen[k].append((ident["version"], ident["content_hash"], values))

    clients = [asyncio.create_task(price_forever(k)) for k in range(CLIENTS)]
    committed: dict[int, str] = {1: base.content_hash}
    for i in range(1, N_VERSIONS + 1):
        stored = await store.commit(_variant(base, i), f"variant {i}")
        committed[stored.version] = stored.content_hash
        await asyncio.sleep(0.15)
    last = max(committed)
    for _ in range(200):  # the last version reaches the clients
        if any(v == last for v, _, _ in seen[0][-3:]):
            break
        await asyncio.sleep(0.02)
    done.set()
    await asyncio.gather(*clients)

    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
    # What each version answers on its own, priced outside the server.
    request = PriceRequest.model_validate(BODY)
    expected: dict[int, list[float]] = {}
    for version in committed:
        served = load_served_model(await store.load(version), name="gbm", version=version)
        answer = Valuer({"gbm": served}).value(request)
        expected[version] = [row[m] for row in answer["results"] for m in ("price", "delta", "stdev")]
    assert len({tuple(v) for v in expected.values()}) == len(committed)  # versions are distinguishable
    versions_seen: set[int] = set()
    for k, answers in enumerate(seen):
        assert answers, f"client {k} got no answers"
        versions = [v for v, _, _ in answers]
        assert versions == sorted(versions), f"client {k} saw versions go backwards: {versions}"
        for version, content_hash, values in answers:
            assert content_hash == committed[version]
            assert values == expected[version], f"client {k}: an answer mixes versions (v{version})"
        versions_seen.update(versions)
    assert last in versions_seen
    assert len(versions_seen) >= 3, f"too few versions served under load: {sorted(versions_seen)}"
