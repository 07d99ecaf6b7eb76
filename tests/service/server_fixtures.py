"""Server fixtures: ``make_client`` (an app on a fresh local store, the bundled model
seeded as version 1, driven by pytest-aiohttp's client) and ``serve`` (real processes)."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from server_util import TOKEN, AppServer, MakeClient, ServerProcess, settings_for, start_server

from spectralmc_server.service.app import create_app
from spectralmc_server.service.metrics import Metrics


@pytest.fixture
async def make_client(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]]
) -> AsyncIterator[MakeClient]:
    """``await make_client(**settings)`` -> a test client of a started app."""

    async def make(**overrides: Any) -> TestClient[Any, Any]:
        settings = settings_for(tmp_path, **overrides)
        app = create_app(settings, Metrics(engine_families=settings.engine.mode == "thread"))
        return await aiohttp_client(AppServer(app))

    yield make


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``serve(*args, env=...)`` starts a server process; all are stopped afterwards."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        base = {"SPECTRALMC_TRAIN__ENABLED": "false", "SPECTRALMC_ADMIN_TOKEN": TOKEN}
        server = start_server(tmp_path, *args, env={**base, **(env or {})})
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)
