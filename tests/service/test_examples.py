"""The example files the README and docs point at work against a running app."""

from __future__ import annotations

import json
import re
from pathlib import Path

from server_util import MakeClient

from spectralmc_server.marketdata.objects import MarketSnapshot

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "config" / "examples"


async def test_example_snapshot_and_price_by_reference(make_client: MakeClient) -> None:
    client = await make_client()
    request = json.loads((EXAMPLES / "price_by_reference.json").read_text())
    path = f"/v1/marketdata/default/{request['val_datetime']}/{request['data_asof']}"
    r = await client.put(
        path, data=(EXAMPLES / "snapshot.json").read_bytes(), headers={"Content-Type": "application/json"}
    )
    assert r.status == 201, await r.text()
    stored = await r.json()
    assert stored["arbitrage"] == []  # the example surfaces are arbitrage-free on their grids
    r = await client.post("/v1/price", json=request)
    assert r.status == 200, await r.text()
    answer = await r.json()
    assert [row["id"] for row in answer["results"]] == [c["id"] for c in request["contracts"]]
    assert all(row["price"] > 0 for row in answer["results"])
    assert answer["market_data"] == {
        "namespace": "default",
        "val_datetime": "2026-11-26T16:00:00Z",
        "data_asof": "2026-11-26T16:00:05Z",
        "hash": stored["hash"],
    }


def test_docs_snapshot_example_validates() -> None:
    text = (ROOT / "docs" / "marketdata.md").read_text()
    block = re.search(r"```json\n(.*?)```", text, re.S)
    assert block is not None
    snapshot = MarketSnapshot.model_validate_json(block.group(1))
    assert snapshot.discounting == {"SPX": "USD"}
