"""The quality gate in a server: the tracker never swaps to a version whose certificate
fails its gate (or that has none), an admin pin of one needs ``"force": true``, /readyz
names a forced version, and online training commits only versions that pass.

One 50-step GBM model is trained and certified once for the module (certifying takes
~30 s); its certificate is far outside the default gate (price p95 ~1,000 bp against
5 bp). The apps here price with loose tolerances, so whenever such a model *is* served
its answers are learned (``cvnn``): what keeps it out is the gate, not the tolerances.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from server_util import CONTRACT, TOKEN, Client, MakeClient, app_of, assert_error

from spectralmc_server.engine.certificate import DEFAULT_TOLERANCE, gate_failures
from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.engine.trainer import TrainConfig, Trainer
from spectralmc_server.service import keys
from spectralmc_server.settings import CertificateSettings
from spectralmc_server.store.objects import LocalObjectStore
from spectralmc_server.store.versions import VersionStore
from spectralmc_server.training.commit import GateResult, certify_checkpoint

AUTH = {"Authorization": f"Bearer {TOKEN}"}
LOOSE_TOLERANCE = {m: 10.0 for m in DEFAULT_TOLERANCE}  # every certified bound passes: learned answers
LOOSE_GATE = {"default": {"price": {"p95": 10.0, "max": 10.0}}}  # the 50-step model passes this one
TINY = TrainConfig.model_validate(
    {
        "process": "gbm",
        "batch_points": 16,
        "paths": 64,
        "validate_every": 10,
        "validation_grid": 3,
        "schedule_steps": 50,
        "network": {"width": 8, "depth": 1},
    }
)


@pytest.fixture(scope="module")
def fifty() -> Iterator[GateResult]:
    """A 50-step GBM model (training state included), certified once, against the
    default gate."""
    trainer = Trainer(TINY)
    try:
        trainer.run(50)
        trainer.validate()
        ckpt = trainer.checkpoint()
    finally:
        trainer.close()
    yield certify_checkpoint(ckpt, model="gbm", points=4096, limits=CertificateSettings().limits("gbm"))


def test_the_gate_refuses_a_fifty_step_model(fifty: GateResult) -> None:
    assert not fifty.passed
    assert fifty.checkpoint.certificate is not None
    assert any(f.startswith("price p95 ") for f in fifty.failures), fifty.failures
    # the same certificate passes a gate loose enough: the failures are the figures, not the format
    assert gate_failures(fifty.checkpoint.certificate, CertificateSettings(gate=LOOSE_GATE).limits("gbm")) == []


async def seed_store(tmp_path: Path, fifty: GateResult) -> VersionStore:
    """The app's store (settings_for's data dir) with the 50-step model as version 1,
    committed past its gate as unqualified."""
    store = VersionStore(LocalObjectStore(tmp_path / "data" / "store"), "gbm")
    stored = await store.commit(fifty.checkpoint, "fifty steps", unqualified=True, gate=fifty.failures)
    assert stored.version == 1 and stored.record.get("unqualified") is True
    return store


async def metric(client: Client, name: str, **labels: str) -> float | None:
    """One sample of a real /metrics scrape (None: no such series)."""
    r = await client.get("/metrics")
    assert r.status == 200
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in (await r.text()).splitlines():
        m = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if m and ",".join(sorted((m.group(1) or "").split(","))) == want:
            return float(m.group(2))
    return None


async def methods(client: Client) -> list[str]:
    r = await client.post("/v1/price", json={"contracts": [CONTRACT, {**CONTRACT, "id": "atm", "strike": 100.0}]})
    text = await r.text()
    assert r.status == 200, text
    return [row["method"] for row in orjson.loads(text)["results"]]


async def eventually(check: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    assert await check()


async def test_tracker_refuses_it_and_a_forced_pin_serves_it(
    tmp_path: Path, make_client: MakeClient, fifty: GateResult
) -> None:
    store = await seed_store(tmp_path, fifty)
    client = await make_client(models=["gbm"], seed_bundled=False, certificate={"tolerance": LOOSE_TOLERANCE})

    # At start the only version fails its gate: nothing is served, /readyz says why.
    r = await client.get("/readyz")
    err = await assert_error(r, 503, "not_ready")
    assert "version 1 fails its quality gate" in err["message"]
    assert fifty.failures[0] in err["message"]
    assert await metric(client, "spectralmc_model_rejected_total", model="gbm", reason="gate") == 1
    await asyncio.sleep(0.3)  # several polls later: still refused, counted once
    assert await metric(client, "spectralmc_model_rejected_total", model="gbm", reason="gate") == 1
    assert await metric(client, "spectralmc_model_rejected_total", model="gbm", reason="no_certificate") == 0

    # An unforced pin is refused with the reasons; nothing is pinned.
    r = await client.post("/v1/admin/models/gbm/pin", json={"version": 1}, headers=AUTH)
    err = await assert_error(r, 409, "conflict", ("force",))
    assert all(f in err["message"] for f in fifty.failures)
    assert [d["reason"] for d in err["details"]] == [f"quality gate: {f}" for f in fifty.failures]
    assert await store.pinned() is None

    # With force: pinned, served, and said so (answer, pin log, /readyz, metrics).
    r = await client.post("/v1/admin/models/gbm/pin", json={"version": 1, "force": True}, headers=AUTH)
    out = orjson.loads(await r.text())
    assert r.status == 200, out
    assert out["forced"] is True and out["gate"] == fifty.failures
    assert out["serving"]["version"] == 1 and out["serving"]["forced"] == fifty.failures
    entry = await store.pin_entry()
    assert entry is not None and entry.body["force"] is True and entry.body["gate"] == fifty.failures
    ready = orjson.loads(await (await client.get("/readyz")).text())
    assert ready["status"] == "ready", ready
    assert ready["forced"] == {"gbm": {"version": 1, "gate": fifty.failures}}
    assert await metric(client, "spectralmc_model_forced", model="gbm") == 1
    assert "cvnn" in await methods(client)  # the forced version answers as learned
    assert (await store.verify()).ok

    # Unpinned, the head is the same version without the force: no longer served.
    r = await client.post("/v1/admin/models/gbm/unpin", headers=AUTH)
    assert r.status == 200, await r.text()
    await assert_error(await client.get("/readyz"), 503, "not_ready")
    assert await metric(client, "spectralmc_model_forced", model="gbm") == 0


async def test_tracker_keeps_serving_when_the_head_has_no_certificate(
    tmp_path: Path, make_client: MakeClient, fifty: GateResult
) -> None:
    store = await seed_store(tmp_path, fifty)
    settings = {"tolerance": LOOSE_TOLERANCE, "gate": LOOSE_GATE}
    client = await make_client(models=["gbm"], seed_bundled=False, certificate=settings)
    ident = app_of(client)[keys.HOST].trackers["gbm"].current
    assert ident is not None and ident.version == 1 and not ident.forced  # passes the loose gate
    assert "cvnn" in await methods(client)

    base = fifty.checkpoint
    uncertified = Checkpoint(
        {**base.manifest, "metrics": {**base.manifest["metrics"], "note": 2}}, base.model, base.training
    )
    stored = await store.commit(uncertified, "no certificate")
    assert stored.version == 2

    async def refused() -> bool:
        return await metric(client, "spectralmc_model_rejected_total", model="gbm", reason="no_certificate") == 1

    await eventually(refused)
    await asyncio.sleep(0.3)
    assert await refused()  # counted once, however many polls see it
    ready = orjson.loads(await (await client.get("/readyz")).text())
    assert ready["models"] == {"gbm": 1}, ready
    assert ready["rejected"]["gbm"]["version"] == 2
    assert ready["rejected"]["gbm"]["kind"] == "no_certificate"
    assert ready["rejected"]["gbm"]["reasons"] == ["no certificate"]
    assert ready["forced"] == {}


async def test_online_training_commits_only_what_passes(
    tmp_path: Path, make_client: MakeClient, fifty: GateResult
) -> None:
    store = await seed_store(tmp_path, fifty)
    train = {
        "enabled": True,
        "validate_every": 10,
        "idle_gap_seconds": 0.0,
        "commit_every_seconds": 1.0,
        "commit_if_improved": False,
        "commit_on_shutdown": False,
    }
    client = await make_client(models=["gbm"], seed_bundled=False, train=train)
    assert app_of(client).get(keys.TRAINING) is not None  # resumed from version 1's training state

    async def rejected() -> bool:
        value = await metric(client, "spectralmc_training_rejected_total", model="gbm")
        return value is not None and value >= 1

    await eventually(rejected, seconds=240.0)  # an auto-commit certified (~30 s) and refused
    head = await store.head()
    assert head is not None and head.version == 1

    # The admin commit of the trainer's state follows the same rule.
    r = await client.post("/v1/admin/models/gbm/commit", json={"message": "x"}, headers=AUTH)
    err = await assert_error(r, 409, "conflict", ("allow_unqualified",))
    assert "fails its quality gate" in err["message"]
    head = await store.head()
    assert head is not None and head.version == 1
