"""HTTP workers: several HTTP processes on one port (``http_workers``; SO_REUSEPORT).

``spectralmc serve`` with ``http_workers = N`` above 1 starts N worker processes
(cli/serve_workers.py) that each bind the port with SO_REUSEPORT, so the kernel spreads
new connections over them, and each also listen on a Unix socket of their own in a
private run directory. Each worker is a replica: an HTTP process with its own engine
process(es), serving the versions the store names, as replicas behind a load balancer
do (docs/operations.md, "Topology"). What is one per server rather than one per worker:

- **training** and the jobs that write (``derive``), in worker 0 only: workers 1..N-1
  run role ``serve`` and only the ``price`` jobs (which publish to their own stream
  subscribers);
- **routes that need worker 0** (a commit takes the trainer's state; /v1/jobs lists the
  writing jobs): a worker other than 0 hands the request to worker 0 over its Unix
  socket and returns its answer (503 ``primary_unavailable`` if it does not answer);
- **after an admin change** (pin, unpin, commit) the worker that made it asks every other
  worker to read the store before it answers, so the answer is true of every worker;
- **a snapshot stored** through one worker is news to the others at once: their stream
  subscribers are requoted as the first worker's are (else within ``marketdata.poll_seconds``);
- **/metrics** on any worker gathers every worker's series, each with a ``worker``
  label, and ``spectralmc_http_worker_up`` per worker (0: it did not answer in time).

The internal routes (``/internal/...``) answer only on the Unix sockets: 404 over TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp
from aiohttp import web
from prometheus_client.metrics_core import GaugeMetricFamily

from spectralmc_server.marketdata.store import SnapshotRecord
from spectralmc_server.service import keys
from spectralmc_server.service.errors import Unavailable, store_unavailable
from spectralmc_server.service.metrics import merge_expositions
from spectralmc_server.settings import DeriveJob, Settings

log = logging.getLogger(__name__)

# how long a worker waits for another's answer on the internal routes
METRICS_TIMEOUT = 2.0
POLL_TIMEOUT = 10.0
# headers a forwarded request keeps (the rest are about the client's connection)
FORWARDED_HEADERS = ("Authorization", "Content-Type", "Content-Encoding", "Accept", "X-Request-Timeout")
WORKER_HEADER = "X-SpectralMC-Worker"  # on every answer when there are several workers


@dataclass(frozen=True)
class HTTPWorker:
    """This process's place among the HTTP workers."""

    index: int
    count: int
    run_dir: Path

    def socket_path(self, index: int) -> Path:
        return self.run_dir / f"http-{index}.sock"

    @property
    def primary(self) -> bool:
        return self.index == 0

    @property
    def others(self) -> list[int]:
        return [k for k in range(self.count) if k != self.index]


WORKER_KEY = web.AppKey("http_worker", HTTPWorker)
SESSIONS_KEY: web.AppKey[dict[int, aiohttp.ClientSession]] = web.AppKey("http_worker_sessions")


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker ``index``'s settings: worker 0 as configured; the others serve only (role
    ``serve``) and run only the jobs that publish (``price``)."""
    if index == 0:
        return settings
    jobs = [j for j in settings.jobs if not isinstance(j, DeriveJob)]
    role = "serve" if settings.role == "all" else settings.role
    return settings.model_copy(update={"role": role, "jobs": jobs})


def on_unix_socket(request: web.Request) -> bool:
    transport = request.transport
    sock = None if transport is None else transport.get_extra_info("socket")
    return sock is not None and sock.family == socket.AF_UNIX


async def workers_ctx(app: web.Application) -> AsyncIterator[None]:
    """One client session per other worker, over its Unix socket; a snapshot stored
    through this worker is news to the others' stream subscribers at once."""
    worker = app[WORKER_KEY]
    sessions = {
        k: aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(worker.socket_path(k))))
        for k in worker.others
    }
    app[SESSIONS_KEY] = sessions
    pending: set[asyncio.Task[None]] = set()

    def stored(record: SnapshotRecord) -> None:
        task = asyncio.get_running_loop().create_task(_tell_stored(app, record.namespace))
        pending.add(task)
        task.add_done_callback(pending.discard)

    market = app[keys.MARKETDATA]
    if sessions:
        market.listeners.append(stored)
    yield
    if stored in market.listeners:
        market.listeners.remove(stored)
    for task in list(pending):
        task.cancel()
    for session in sessions.values():
        await session.close()


async def _tell_stored(app: web.Application, namespace: str) -> None:
    """Tell every other worker that ``namespace`` has a new snapshot (else their streams
    find it within ``marketdata.poll_seconds``)."""

    async def one(k: int) -> None:
        url = f"http://worker-{k}/internal/marketdata/{quote(namespace, safe='')}/stored"
        try:
            async with app[SESSIONS_KEY][k].post(url, timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT)) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("HTTP worker %d: snapshot news for %s not delivered: %s", k, namespace, exc)

    await asyncio.gather(*(one(k) for k in app[WORKER_KEY].others))


async def forward_to_primary(request: web.Request) -> web.Response:
    """Hand ``request`` to worker 0 and answer what it answers."""
    session = request.app[SESSIONS_KEY][0]
    headers = {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers}
    body = await request.read() if request.can_read_body else None
    timeout = aiohttp.ClientTimeout(total=request.app[keys.SETTINGS].max_request_timeout_seconds + 5)
    try:
        async with session.request(
            request.method, f"http://worker-0{request.path_qs}", data=body, headers=headers, timeout=timeout
        ) as resp:
            payload = await resp.read()
            out = web.Response(status=resp.status, body=payload)
            for name in ("Content-Type", "Retry-After", WORKER_HEADER):
                if name in resp.headers:
                    out.headers[name] = resp.headers[name]
            return out
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise Unavailable(
            f"HTTP worker 0 (which trains and runs the writing jobs) did not answer: {exc or type(exc).__name__}",
            5,
            code="primary_unavailable",
        ) from None


async def poll_others(app: web.Application, name: str) -> None:
    """Ask every other worker to read model ``name``'s store now (after an admin change)."""
    worker = app.get(WORKER_KEY)
    if worker is None or worker.count == 1:
        return

    async def one(k: int) -> None:
        try:
            async with app[SESSIONS_KEY][k].post(
                f"http://worker-{k}/internal/models/{name}/poll", timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT)
            ) as resp:
                if resp.status != 204:
                    log.warning("HTTP worker %d: refresh of model %s answered %d", k, name, resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("HTTP worker %d: refresh of model %s failed (it polls within poll_seconds): %s", k, name, exc)

    await asyncio.gather(*(one(k) for k in worker.others))


async def gather_metrics(app: web.Application, local: bytes) -> bytes:
    """Every worker's exposition merged, each sample labelled with its worker."""
    worker = app[WORKER_KEY]

    async def fetch(k: int) -> bytes | None:
        try:
            async with app[SESSIONS_KEY][k].get(
                f"http://worker-{k}/internal/metrics", timeout=aiohttp.ClientTimeout(total=METRICS_TIMEOUT)
            ) as resp:
                return await resp.read() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None

    fetched = await asyncio.gather(*(fetch(k) for k in worker.others))
    texts: dict[int, bytes | None] = {worker.index: local, **dict(zip(worker.others, fetched, strict=True))}
    return merge_worker_expositions(texts)


def merge_worker_expositions(texts: dict[int, bytes | None]) -> bytes:
    """One exposition from each worker's (None: it did not answer): every sample gains
    ``worker="K"``, and ``spectralmc_http_worker_up`` says who answered."""
    up = GaugeMetricFamily(
        "spectralmc_http_worker_up",
        "1 if the HTTP worker answered this scrape's internal metrics request, else 0",
        labels=["worker"],
    )
    for k in sorted(texts):
        up.add_metric([str(k)], 0.0 if texts[k] is None else 1.0)
    parts = [(text, {"worker": str(k)}) for k, text in sorted(texts.items()) if text is not None]
    return merge_expositions(parts, [up])


def install(app: web.Application, worker: HTTPWorker) -> None:
    """Make ``app`` worker ``worker.index`` of ``worker.count``."""
    app[WORKER_KEY] = worker
    app.cleanup_ctx.append(workers_ctx)
    app.add_routes(internal_routes)
    app.on_response_prepare.append(_tag)


async def _tag(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault(WORKER_HEADER, str(request.app[WORKER_KEY].index))  # a forwarded answer keeps 0


internal_routes = web.RouteTableDef()


def _internal_only(request: web.Request) -> None:
    if not on_unix_socket(request):
        raise web.HTTPNotFound()  # the errors middleware answers its usual 404


@internal_routes.get("/internal/metrics")
async def internal_metrics(request: web.Request) -> web.Response:
    """This worker's own exposition (the /metrics of the worker asked gathers them)."""
    from spectralmc_server.service.routes import local_metrics

    _internal_only(request)
    return web.Response(body=await local_metrics(request.app))


@internal_routes.post("/internal/models/{name}/poll")
async def internal_poll(request: web.Request) -> web.Response:
    """Read model ``name``'s store now (another worker made an admin change)."""
    from spectralmc_server.engine_service.messages import EngineDeadError

    _internal_only(request)
    name = request.match_info["name"]
    if name not in request.app[keys.STORES]:
        raise web.HTTPNotFound()
    with contextlib.suppress(EngineDeadError):  # a restarted engine reads the store anyway
        await request.app[keys.ENGINE].poll(name)
    return web.Response(status=204)


@internal_routes.post("/internal/marketdata/{namespace}/stored")
async def internal_stored(request: web.Request) -> web.Response:
    """Another worker stored a snapshot in ``namespace``: requote this worker's streams."""
    _internal_only(request)
    try:
        latest = await request.app[keys.MARKETDATA].store.latest(request.match_info["namespace"])
    except Exception as exc:  # the store is down: the stream's own poll finds it later
        raise store_unavailable(exc) from None
    if latest is not None and keys.STREAMS in request.app:
        request.app[keys.STREAMS].snapshot_stored(latest)
    return web.Response(status=204)
