"""Token rotation (issue 22, item 3): two admin tokens, and two market-data write tokens,
valid at once (``admin_token`` + ``admin_token_previous``, ``marketdata.write_token`` +
``marketdata.write_token_previous``), so tokens rotate with no window of refusals.

The checks once (both accepted, any other refused as before, the settings' validation,
a startup error that names the setting and never the token), then the procedure of
docs/operations.md section 6 under load: settings are read once at start-up, so a
rotation is two rolling restarts of the replicas behind a round-robin balancer, with
clients switching tokens in between. Real servers on loopback (the app on its
production runner), configured through the SPECTRALMC_ environment variables; a
bounded load loop throughout; not one 401 or 403 at any step."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from marketdata_util import ASOF, VDT, snapshot
from multidict import CIMultiDict
from pydantic import SecretStr, ValidationError
from server_util import AppServer, MakeClient, assert_error

from spectralmc_server.service.app import create_app
from spectralmc_server.service.auth import MAX_TOKENS, _matches, accepted_tokens, require_token
from spectralmc_server.service.errors import Forbidden, Unauthorized
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.settings import Settings

OLD, NEW, OTHER = "old-admin-token-1f3a", "new-admin-token-9c2e", "not-a-token-77"
W_OLD, W_NEW = "old-write-token-5d1b", "new-write-token-0e8f"
VERSIONS = "/v1/admin/models/gbm/versions"
PUT = f"/v1/marketdata/default/{VDT}/{ASOF}"
CLIENTS, MAX_REQUESTS, MAX_SECONDS = 4, 20_000, 30.0  # the load's bounds, per client
TOKEN_VARS = (
    "SPECTRALMC_ADMIN_TOKEN",
    "SPECTRALMC_ADMIN_TOKEN_PREVIOUS",
    "SPECTRALMC_MARKETDATA__WRITE_TOKEN",
    "SPECTRALMC_MARKETDATA__WRITE_TOKEN_PREVIOUS",
)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- the check ----------------------------------------------------------------------------


def checked(token: str | None, secret: str | tuple[str, ...]) -> int:
    """The status require_token gives a request with ``token`` (200: let through)."""
    headers = CIMultiDict() if token is None else CIMultiDict(bearer(token))
    request = make_mocked_request("GET", VERSIONS, headers=headers)
    try:
        require_token(request, secret, realm="r", what="tests")
    except (Unauthorized, Forbidden) as exc:
        return exc.status
    return 200


def test_one_or_two_tokens() -> None:
    assert checked(OLD, OLD) == 200  # a single token, as every caller passed before
    assert checked(NEW, OLD) == 403
    assert checked(OLD, (NEW, OLD)) == 200
    assert checked(NEW, (NEW, OLD)) == 200
    assert checked(OTHER, (NEW, OLD)) == 403
    assert checked(NEW[:-1], (NEW, OLD)) == 403  # a prefix of a token
    assert checked(NEW + "x", (NEW, OLD)) == 403
    assert checked(None, (NEW, OLD)) == 401
    assert accepted_tokens(SecretStr(NEW), None) == (NEW,)
    assert accepted_tokens(SecretStr(NEW), SecretStr(OLD)) == (NEW, OLD)


def test_matches_compares_every_slot() -> None:
    assert MAX_TOKENS == 2
    assert _matches(OLD, (OLD,)) and _matches(OLD, (NEW, OLD)) and _matches(NEW, (NEW, OLD))
    assert not _matches(OTHER, (OLD,)) and not _matches(OTHER, (NEW, OLD))
    with pytest.raises(ValueError, match="between 1 and 2"):
        _matches(OLD, ())
    with pytest.raises(ValueError, match="between 1 and 2"):
        _matches(OLD, (OLD, NEW, OTHER))


async def test_both_tokens_through_the_routes(make_client: MakeClient) -> None:
    client = await make_client(
        models=["gbm"],
        admin_token=NEW,
        admin_token_previous=OLD,
        marketdata={"write_token": W_NEW, "write_token_previous": W_OLD},
    )
    for token in (NEW, OLD):
        r = await client.get(VERSIONS, headers=bearer(token))
        assert r.status == 200, await r.text()
    await assert_error(await client.get(VERSIONS, headers=bearer(OTHER)), 403, "forbidden")
    await assert_error(await client.get(VERSIONS, headers=bearer(W_NEW)), 403, "forbidden")  # the other realm's
    r = await client.get(VERSIONS)
    await assert_error(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="spectralmc-admin"'

    body = snapshot()
    statuses = []
    for token in (W_OLD, W_NEW):
        r = await client.put(PUT, json=body, headers=bearer(token))
        statuses.append(r.status)
    assert statuses == [201, 200], statuses  # stored, then the same content again
    await assert_error(await client.put(PUT, json=body, headers=bearer(NEW)), 403, "forbidden")
    r = await client.put(PUT, json=body)
    await assert_error(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="spectralmc-marketdata"'


async def test_without_previous_only_the_current_token(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"], admin_token=NEW, marketdata={"write_token": W_NEW})
    assert (await client.get(VERSIONS, headers=bearer(NEW))).status == 200
    await assert_error(await client.get(VERSIONS, headers=bearer(OLD)), 403, "forbidden")
    await assert_error(await client.put(PUT, json=snapshot(), headers=bearer(W_OLD)), 403, "forbidden")


# -- the settings -------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in TOKEN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    return monkeypatch


def test_previous_tokens_from_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SPECTRALMC_ADMIN_TOKEN", NEW)
    clean_env.setenv("SPECTRALMC_ADMIN_TOKEN_PREVIOUS", OLD)
    clean_env.setenv("SPECTRALMC_MARKETDATA__WRITE_TOKEN", W_NEW)
    clean_env.setenv("SPECTRALMC_MARKETDATA__WRITE_TOKEN_PREVIOUS", W_OLD)
    s = Settings.load()
    assert s.admin_token is not None and s.admin_token_previous is not None
    assert (s.admin_token.get_secret_value(), s.admin_token_previous.get_secret_value()) == (NEW, OLD)
    md = s.marketdata
    assert md.write_token is not None and md.write_token_previous is not None
    assert (md.write_token.get_secret_value(), md.write_token_previous.get_secret_value()) == (W_NEW, W_OLD)
    assert OLD not in repr(s) and W_OLD not in repr(s)  # secrets, like the current ones
    clean_env.delenv("SPECTRALMC_ADMIN_TOKEN_PREVIOUS")  # unset: only the current token
    assert Settings.load().admin_token_previous is None


@pytest.mark.parametrize(
    ("env", "loc", "message"),
    [
        ({"SPECTRALMC_ADMIN_TOKEN": ""}, (), "admin_token (SPECTRALMC_ADMIN_TOKEN) is empty"),
        ({"SPECTRALMC_ADMIN_TOKEN": "   "}, (), "admin_token (SPECTRALMC_ADMIN_TOKEN) is empty"),
        (
            {"SPECTRALMC_ADMIN_TOKEN": NEW, "SPECTRALMC_ADMIN_TOKEN_PREVIOUS": ""},
            (),
            "admin_token_previous (SPECTRALMC_ADMIN_TOKEN_PREVIOUS) is empty",
        ),
        (
            {"SPECTRALMC_ADMIN_TOKEN": NEW + "\n"},
            (),
            "admin_token (SPECTRALMC_ADMIN_TOKEN) starts or ends with whitespace",
        ),
        ({"SPECTRALMC_ADMIN_TOKEN_PREVIOUS": OLD}, (), "admin_token_previous is set without admin_token"),
        (
            {"SPECTRALMC_ADMIN_TOKEN": NEW, "SPECTRALMC_ADMIN_TOKEN_PREVIOUS": NEW},
            (),
            "admin_token_previous is the same as admin_token",
        ),
        (
            {"SPECTRALMC_MARKETDATA__WRITE_TOKEN": ""},
            ("marketdata",),
            "write_token (SPECTRALMC_MARKETDATA__WRITE_TOKEN) is empty",
        ),
        (
            {"SPECTRALMC_MARKETDATA__WRITE_TOKEN": W_NEW, "SPECTRALMC_MARKETDATA__WRITE_TOKEN_PREVIOUS": " "},
            ("marketdata",),
            "write_token_previous (SPECTRALMC_MARKETDATA__WRITE_TOKEN_PREVIOUS) is empty",
        ),
        (
            {"SPECTRALMC_MARKETDATA__WRITE_TOKEN_PREVIOUS": W_OLD},
            ("marketdata",),
            "write_token_previous is set without write_token",
        ),
        (
            {"SPECTRALMC_MARKETDATA__WRITE_TOKEN": W_NEW, "SPECTRALMC_MARKETDATA__WRITE_TOKEN_PREVIOUS": W_NEW},
            ("marketdata",),
            "write_token_previous is the same as write_token",
        ),
    ],
)
def test_bad_token_settings_are_refused(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], loc: tuple[str, ...], message: str
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings.load()
    [error] = info.value.errors()
    assert error["loc"] == loc
    assert message in error["msg"], error["msg"]
    for value in env.values():  # the messages never quote a token
        if value.strip():
            assert value.strip() not in error["msg"]


def test_bad_token_settings_from_a_toml_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text(f'admin_token = "{NEW}"\nadmin_token_previous = "{NEW}"\n')
    with pytest.raises(ValidationError, match="admin_token_previous is the same as admin_token"):
        Settings.load(config)
    config.write_text(f'[marketdata]\nwrite_token = "{W_NEW}"\nwrite_token_previous = "{W_OLD}"\n')
    md = Settings.load(config).marketdata
    assert md.write_token_previous is not None and md.write_token_previous.get_secret_value() == W_OLD


def test_serve_refuses_to_start_naming_the_setting(tmp_path: Path) -> None:
    """The real CLI: exit 2, one line naming the setting and its variable, no token."""
    env = {"SPECTRALMC_ADMIN_TOKEN": NEW, "SPECTRALMC_ADMIN_TOKEN_PREVIOUS": NEW, "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "spectralmc_server.cli", "serve", "--port", "0", "--data-dir", str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "invalid settings" in lines[0] and "admin_token_previous is the same as admin_token" in lines[0]
    assert NEW not in r.stdout + r.stderr

    env = {"SPECTRALMC_MARKETDATA__WRITE_TOKEN": "", "PATH": "/usr/bin:/bin"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "marketdata: write_token (SPECTRALMC_MARKETDATA__WRITE_TOKEN) is empty" in r.stderr, r.stderr


# -- a rotation under load ----------------------------------------------------------------


@dataclass
class Replica:
    """One server: the app on its production runner, listening on 127.0.0.1."""

    name: str
    config: str  # which tokens it accepts, for the record: "old", "new+old", "new"
    server: AppServer
    in_flight: int = 0

    @property
    def url(self) -> str:
        return str(self.server.make_url(""))


@dataclass
class Fleet:
    """Replicas behind a round-robin balancer, and what every request got."""

    live: list[Replica] = field(default_factory=list)
    admin_token: str = OLD  # what clients send now
    write_token: str = W_OLD
    step: str = "0: old everywhere"
    # (step, replica config, kind, token, status) of every request
    results: list[tuple[str, str, str, str, int]] = field(default_factory=list)
    _turn: Iterator[int] = field(default_factory=itertools.count)

    def pick(self) -> Replica:
        return self.live[next(self._turn) % len(self.live)]


def replica_settings(monkeypatch: pytest.MonkeyPatch, data_dir: Path, admin: list[str], write: list[str]) -> Settings:
    """A replica's settings, its tokens from the environment variables a deployment sets
    (current first, then the previous one when there is one)."""
    with monkeypatch.context() as m:
        for var, tokens in (("SPECTRALMC_ADMIN_TOKEN", admin), ("SPECTRALMC_MARKETDATA__WRITE_TOKEN", write)):
            m.setenv(var, tokens[0])
            if len(tokens) == 2:
                m.setenv(f"{var}_PREVIOUS", tokens[1])
            else:
                m.delenv(f"{var}_PREVIOUS", raising=False)
        return Settings(
            engine={"mode": "thread"},
            data_dir=data_dir,
            port=0,
            models=["gbm"],
            poll_seconds=0.05,
            train={"enabled": False},
        )


async def start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, config: str) -> Replica:
    admin, write = {"old": ([OLD], [W_OLD]), "new+old": ([NEW, OLD], [W_NEW, W_OLD]), "new": ([NEW], [W_NEW])}[config]
    settings = replica_settings(monkeypatch, tmp_path / name, admin, write)
    server = AppServer(create_app(settings, Metrics()), host="127.0.0.1")
    await server.start_server()
    return Replica(name, config, server)


async def roll(fleet: Fleet, replace: Replica, new: Replica) -> None:
    """One replica of a rolling restart: the new one joins, the old one leaves the
    balancer, is drained of its requests in flight, and stops."""
    fleet.live.append(new)
    await asyncio.sleep(0.15)  # both serve for a while
    fleet.live.remove(replace)
    deadline = time.monotonic() + 5
    while replace.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    await replace.server.close()


async def load(fleet: Fleet, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
    """One client: admin reads and market-data writes, round-robin, until ``stop``, at
    most MAX_REQUESTS and MAX_SECONDS."""
    body = snapshot()
    deadline = time.monotonic() + MAX_SECONDS
    for i in range(MAX_REQUESTS):
        if stop.is_set() or time.monotonic() > deadline:
            return
        replica = fleet.pick()
        replica.in_flight += 1
        step = fleet.step
        try:
            if i % 2 == 0:
                kind, token = "admin", fleet.admin_token
                resp = await session.get(replica.url + VERSIONS, headers=bearer(token))
            else:
                kind, token = "write", fleet.write_token
                resp = await session.put(replica.url + PUT, json=body, headers=bearer(token))
            async with resp:
                await resp.read()
                fleet.results.append((step, replica.config, kind, token, resp.status))
        finally:
            replica.in_flight -= 1


async def test_rotation_under_load_has_no_refusals(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """docs/operations.md section 6 with two replicas: (1) every replica restarted with
    the new token current and the old one previous, (2) clients switch to the new token,
    (3) every replica restarted without the old one. Clients keep sending throughout."""
    t0 = time.monotonic()
    for name in TOKEN_VARS:
        monkeypatch.delenv(name, raising=False)
    fleet = Fleet()
    fleet.live = list(await asyncio.gather(*(start(monkeypatch, tmp_path, n, "old") for n in ("a0", "b0"))))
    started: list[Replica] = list(fleet.live)
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=8, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        # the order matters: a client on the new token before step 1 is refused
        async with session.get(fleet.live[0].url + VERSIONS, headers=bearer(NEW)) as r:
            assert r.status == 403
        clients = [asyncio.create_task(load(fleet, session, stop)) for _ in range(CLIENTS)]
        try:
            await asyncio.sleep(0.15)
            # 1. new current, old previous: a rolling restart
            fleet.step = "1: roll to new+old"
            for old_name, new_name in (("a0", "a1"), ("b0", "b1")):
                new = await start(monkeypatch, tmp_path, new_name, "new+old")
                started.append(new)
                await roll(fleet, next(r for r in fleet.live if r.name == old_name), new)
            # 2. every replica takes both: clients switch, one kind at a time
            fleet.step = "2: clients switch"
            await asyncio.sleep(0.15)
            fleet.admin_token = NEW
            await asyncio.sleep(0.1)
            fleet.write_token = W_NEW
            await asyncio.sleep(0.15)
            # 3. drop the old token: a second rolling restart
            fleet.step = "3: roll to new"
            for old_name, new_name in (("a1", "a2"), ("b1", "b2")):
                new = await start(monkeypatch, tmp_path, new_name, "new")
                started.append(new)
                await roll(fleet, next(r for r in fleet.live if r.name == old_name), new)
            fleet.step = "4: new everywhere"
            await asyncio.sleep(0.15)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        # after the rotation the old tokens are refused everywhere
        for replica in fleet.live:
            async with session.get(replica.url + VERSIONS, headers=bearer(OLD)) as r:
                assert r.status == 403, replica.name
            async with session.put(replica.url + PUT, json=snapshot(), headers=bearer(W_OLD)) as r:
                assert r.status == 403, replica.name
    for replica in started:
        await replica.server.close()

    refused = [r for r in fleet.results if r[4] not in (200, 201)]
    assert not refused, f"{len(refused)} of {len(fleet.results)} refused, e.g. {refused[:5]}"
    seen = Counter((step[0], config, kind, token) for step, config, kind, token, _ in fleet.results)
    # the load reached every mix the procedure makes: old-only replicas and new+old ones
    # both taking the old token during the first roll, new+old ones and new-only ones
    # both taking the new token during the second
    for key in [
        ("1", "old", "admin", OLD),
        ("1", "new+old", "admin", OLD),
        ("1", "old", "write", W_OLD),
        ("1", "new+old", "write", W_OLD),
        ("2", "new+old", "admin", OLD),
        ("2", "new+old", "admin", NEW),
        ("2", "new+old", "write", W_NEW),
        ("3", "new+old", "admin", NEW),
        ("3", "new", "admin", NEW),
        ("3", "new+old", "write", W_NEW),
        ("3", "new", "write", W_NEW),
    ]:
        assert seen[key] > 0, (key, seen)
    assert len(fleet.results) <= CLIENTS * MAX_REQUESTS
    assert time.monotonic() - t0 < 60
