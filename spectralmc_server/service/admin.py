"""Admin routes: commit, versions, pin (rollback), unpin, pins (the pin log), verify, gc.

Every route needs ``Authorization: Bearer <admin_token>`` (or, during a rotation,
``admin_token_previous``), compared in constant time.
With no token configured they answer 403: an admin API nobody configured is off.

The quality gate (``[certificate.gate]``) holds here too: a commit certifies the
trainer's state first and is refused (409, naming the failures) unless it passes or
``"allow_unqualified": true`` records it as unqualified; a pin of a version that fails
its gate or has no certificate is refused (409) unless ``"force": true``, which the pin
log records and the answer repeats (``"forced": true`` and the failures).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from spectralmc_server.engine.certificate import gate_failures
from spectralmc_server.engine_service.messages import CommitRefused, EngineDeadError
from spectralmc_server.service import http_workers, keys
from spectralmc_server.service.auth import ADMIN_REALM, accepted_tokens, require_token
from spectralmc_server.service.errors import Conflict, Forbidden, NotFound
from spectralmc_server.service.gc_schedule import STORE_GC
from spectralmc_server.service.routes import json_response, read_json, validate
from spectralmc_server.service.schemas import CommitBody, GCBody, PinBody, UnpinBody
from spectralmc_server.store.lease import LeaseHeldError, holder_name, iso
from spectralmc_server.store.objects import CorruptObjectError
from spectralmc_server.store.versions import (
    ContentCollectedError,
    VersionError,
    VersionNotFoundError,
    VersionStore,
)
from spectralmc_server.training.history import list_versions

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


def gate_conflict(message: str, failures: list[str], flag: str) -> Conflict:
    """409 naming each gate failure (details), and the flag that would override it."""
    details = [{"field": flag, "reason": f"quality gate: {f}"} for f in failures]
    return Conflict(f'{message}: {"; ".join(failures)}; send "{flag}": true to do it anyway', details=details)


def authorize(request: web.Request) -> None:
    settings = request.app[keys.SETTINGS]
    token = settings.admin_token
    if token is None:
        raise Forbidden("the admin API is off: no admin_token is configured (SPECTRALMC_ADMIN_TOKEN)")
    tokens = accepted_tokens(token, settings.admin_token_previous)
    require_token(request, tokens, realm=ADMIN_REALM, what="admin routes")


def model_store(request: web.Request) -> VersionStore:
    authorize(request)
    name = request.match_info["name"]
    stores = request.app[keys.STORES]
    if name not in stores:
        raise NotFound(f"no served model {name!r}; served: {', '.join(stores)}")
    return stores[name]


async def optional_body(request: web.Request) -> Any:
    return await read_json(request) if request.can_read_body else {}


async def refresh(request: web.Request, name: str) -> dict[str, Any]:
    """Make this server serve what the store now says, before answering (an engine that
    is down reads the store when it starts again)."""
    try:
        await request.app[keys.ENGINE].poll(name)
    except EngineDeadError as exc:
        log.warning("model %s: refresh after an admin change: the engine is down (%s)", name, exc)
    await http_workers.poll_others(request.app, name)  # every HTTP worker serves it before the answer
    return next(m for m in request.app[keys.MODELS].current.describe() if m["name"] == name)


@routes.post("/v1/admin/models/{name}/commit")
async def commit(request: web.Request) -> web.Response:
    """Commit the online trainer's current state as a new version (HTTP worker 0's: it
    alone trains)."""
    worker = request.app.get(http_workers.WORKER_KEY)
    if worker is not None and not worker.primary:
        model_store(request)  # an unknown model is this worker's 404 too
        return await http_workers.forward_to_primary(request)
    store = model_store(request)
    body: CommitBody = validate(CommitBody, await optional_body(request))
    outcome = await request.app[keys.ENGINE].commit(store.name, body.message, body.allow_unqualified)
    if isinstance(outcome, CommitRefused):
        if outcome.kind == "gate":
            raise gate_conflict(outcome.message, outcome.failures, "allow_unqualified")
        raise Conflict(outcome.message)
    serving = await refresh(request, store.name)
    return json_response(
        {
            "version": outcome.version,
            "content_hash": outcome.content_hash,
            "step": outcome.step,
            "unqualified": outcome.unqualified,
            "gate": outcome.gate,
            "serving": serving,
        },
        status=201,
    )


@routes.get("/v1/admin/models/{name}/versions")
async def versions(request: web.Request) -> web.Response:
    """Every version, oldest first, with head / pinned / collected flags."""
    store = model_store(request)
    return json_response({"model": store.name, "versions": await list_versions(store)})


@routes.post("/v1/admin/models/{name}/pin")
async def pin(request: web.Request) -> web.Response:
    """Serve version n everywhere (rollback); past its quality gate only with force."""
    store = model_store(request)
    body: PinBody = validate(PinBody, await read_json(request))
    what = f"version {body.version} of {store.name!r}"
    try:
        cert = await store.certificate(body.version)
        failures = gate_failures(cert, request.app[keys.SETTINGS].certificate.limits(store.name))
        if failures and not body.force:
            raise gate_conflict(f"{what} fails its quality gate and was not pinned", failures, "force")
        entry = await store.pin(body.version, body.by, force=bool(failures), gate=failures)
    except VersionNotFoundError:
        raise NotFound(f"model {store.name!r} has no version {body.version}") from None
    except ContentCollectedError:
        raise Conflict(f"{what} was garbage-collected and cannot be served") from None
    except CorruptObjectError as exc:  # a damaged certificate link: nothing to judge the version by
        raise Conflict(f"{what} cannot be pinned: {exc}") from None
    if failures:
        log.warning("model %s: version %d pinned with force past its gate: %s", store.name, body.version, failures)
    serving = await refresh(request, store.name)
    return json_response(
        {"pinned": body.version, "seq": entry.index, "forced": bool(failures), "gate": failures, "serving": serving}
    )


@routes.post("/v1/admin/models/{name}/unpin")
async def unpin(request: web.Request) -> web.Response:
    """Track the head again."""
    store = model_store(request)
    body: UnpinBody = validate(UnpinBody, await optional_body(request))
    entry = await store.unpin(body.by)
    serving = await refresh(request, store.name)
    return json_response({"pinned": None, "seq": entry.index, "serving": serving})


@routes.get("/v1/admin/models/{name}/pins")
async def pins(request: web.Request) -> web.Response:
    """The pin log, oldest first: who pinned or unpinned what, when, and whether a pin
    was forced past the quality gate (:meth:`VersionStore.pin_history`). ``pinned`` is
    what its last entry tells servers to serve (null: the head)."""
    store = model_store(request)
    try:
        entries = await store.pin_history()
    except CorruptObjectError as exc:  # a damaged pin-log entry: run verify
        raise Conflict(f"the pin log of {store.name!r} cannot be read: {exc}") from None
    pinned = entries[-1]["version"] if entries else None
    return json_response({"model": store.name, "pinned": pinned, "pins": entries})


@routes.get("/v1/admin/models/{name}/verify")
async def verify(request: web.Request) -> web.Response:
    """Walk the whole chain; ``ok`` is false and ``problems`` lists damage."""
    store = model_store(request)
    report = await store.verify()
    return json_response(report.as_dict())


@routes.post("/v1/admin/models/{name}/gc")
async def gc(request: web.Request) -> web.Response:
    """Delete the content of old versions (records stay); a dry run by default. A real
    run holds the model's GC lease in the store (service/gc_schedule.py): while another
    holder has it (the schedule on some replica, ``spectralmc store gc``), 409 naming the
    holder and when its lease expires."""
    store = model_store(request)
    body: GCBody = validate(GCBody, await read_json(request))
    try:
        if body.dry_run:  # writes nothing: no lease
            report = await store.gc(
                body.keep, protect=body.protect, min_keep=body.min_keep, dry_run=True, grace_seconds=body.grace_seconds
            )
        else:
            report = await request.app[STORE_GC].collect(
                store.name,
                "admin",
                keep=body.keep,
                protect=body.protect,
                min_keep=body.min_keep,
                grace_seconds=body.grace_seconds,
                holder=holder_name("admin api"),
            )
    except LeaseHeldError as exc:
        detail = {"field": "lease", "reason": str(exc), "holder": exc.holder, "expires": iso(exc.expires)}
        raise Conflict(f"{exc}; try again after it", details=[detail]) from None
    except (VersionError, CorruptObjectError) as exc:  # a damaged link: run verify
        raise Conflict(str(exc)) from None
    return json_response(report.as_dict())
