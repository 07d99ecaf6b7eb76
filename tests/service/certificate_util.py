"""Certificates for server tests: a made-up certificate of a bundled model (engine/
certificate.py's format, random figures), committed with a new version of it."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from typing import Any

import torch
from aiohttp.test_utils import TestClient
from server_util import app_of

from spectralmc_server.engine import certificate
from spectralmc_server.engine.certify import MIN_POINTS
from spectralmc_server.engine.checkpoint import Checkpoint, read_dir
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.processes.base import ModelDomain
from spectralmc_server.engine.served import ServedModel
from spectralmc_server.models import bundled_models
from spectralmc_server.service import keys
from spectralmc_server.store.versions import VersionStore

Client = TestClient[Any, Any]


def fake_certificate(ckpt: Checkpoint, seed: int) -> dict[str, Any]:
    """A certificate of ``ckpt``'s model in engine/certificate.py's format, with random
    figures (well inside the default gate) and one cell of the heat map empty: what
    /v1/models and /ui show must come from it, whatever its numbers."""
    gen = random.Random(seed)
    process = get_process(ckpt.manifest["model"]["process"])
    domain = ModelDomain.model_validate(ckpt.manifest["model"]["domain"])
    a, b = certificate.main_dims(process, domain)
    grid = torch.linspace(0, 1, certificate.GRID + 1, dtype=torch.float64)

    def figure() -> float:
        return 10 ** gen.uniform(-8, -5)

    def cells(*shape: int) -> Any:
        if not shape:
            return figure()
        return [cells(*shape[1:]) for _ in range(shape[0])]

    measures: dict[str, dict[str, Any]] = {}
    for m in ("price", "delta", "digital", "mean"):
        low, mid, high = sorted(figure() for _ in range(3))
        shape = (
            (certificate.GRID, certificate.GRID, certificate.BANDS)
            if m != "mean"
            else (certificate.GRID, certificate.GRID)
        )
        measures[m] = {"unit": certificate.UNITS[m], "p50": low, "p95": mid, "max": high, "count": 53248}
        measures[m]["cells"] = cells(*shape)
    p95: list[list[float | None]] = cells(certificate.GRID, certificate.GRID)
    worst: list[list[float | None]] = [[3 * v for v in row if v is not None] for row in p95]
    empty = (gen.randrange(certificate.GRID), gen.randrange(certificate.GRID))
    p95[empty[0]][empty[1]] = worst[empty[0]][empty[1]] = None
    return {
        "format": certificate.CERT_FORMAT,
        "model_hash": ckpt.content_hash,
        "process": process.name,
        "sample": {"points": MIN_POINTS, "seed": seed, "levels": list(certificate.CERT_LEVELS), "truth": "test"},
        "cells": {
            "dims": [domain.ranges[a].name, domain.ranges[b].name],
            "edges": [[float(x) for x in domain.ranges[d].from_unit(grid)] for d in (a, b)],
            "band_edges": [0.5, 1.0, 1.5, 2.0],
        },
        "measures": measures,
        "heatmap": {"measure": "price", "p95": p95, "max": worst},
    }


def bundled_checkpoint(name: str) -> Checkpoint:
    return read_dir(bundled_models()[name])


async def serving(client: Client, name: str, version: int) -> ServedModel:
    """The served model once the tracker serves ``version`` (it polls every 50 ms)."""
    tracker = app_of(client)[keys.HOST].trackers[name]
    async with asyncio.timeout(30):
        while (cur := tracker.current) is None or cur.version != version:
            await asyncio.sleep(0.05)
    return cur.model


async def commit_certified(client: Client, name: str, certs: list[dict[str, Any] | None]) -> VersionStore:
    """Commit the bundled model again once per entry of ``certs``, each with that
    certificate (None: without one); returns the model's store."""
    store = app_of(client)[keys.STORES][name]
    ckpt = bundled_checkpoint(name)
    for cert in certs:
        await store.commit(replace(ckpt, certificate=cert), "a test version")
    return store
