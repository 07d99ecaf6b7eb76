"""The stream hub's tasks: merged requotes through the batcher, retries and splits, topic publishing."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from spectralmc_server.marketdata.store import SnapshotRecord
from spectralmc_server.pricing.schemas import (
    PriceRequest,
    format_validation_error,
)
from spectralmc_server.service.errors import (
    APIError,
    DeadlineExceeded,
    Invalid,
    NoMarketData,
    Unavailable,
    store_unavailable,
)
from spectralmc_server.service.stream.connection import (
    CONTRACT_FIELD,
    NOTHING_SEEN,
    RETRY_MAX_SECONDS,
    SPLIT_AFTER,
    Connection,
    GroupKey,
    Interned,
    Item,
    Retry,
    SplitRefusedError,
    Subscription,
)
from spectralmc_server.service.stream.state import HubState

log = logging.getLogger(__name__)


class Requoting(HubState):
    # -- the hub's tasks --------------------------------------------------------------------

    async def run(self) -> None:
        """Requote whatever the triggers name, one round at a time."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            started, self._trigger_time = self._trigger_time, None
            namespaces, self._namespaces = self._namespaces, {}
            everyone, self._all = self._all, None
            due, self._due = self._due, {}
            work: dict[tuple[int, str], tuple[Connection, Subscription, str]] = {}
            for conn in list(self.connections):
                for sub in list(conn.subs.values()):
                    if sub.spec.contracts is None:
                        continue
                    if everyone is not None:
                        work[(id(conn), sub.id)] = (conn, sub, everyone)
                    elif sub.spec.namespace in namespaces and sub.needs_market:
                        work[(id(conn), sub.id)] = (conn, sub, namespaces[sub.spec.namespace])
            for key, item in due.items():
                work.setdefault(key, item)
            try:
                await self.requote(list(work.values()))
            except Exception:
                log.exception("stream requote failed")
            if started is not None and work:
                self.metrics.stream_publish_seconds.observe(time.perf_counter() - started)

    async def watch(self) -> None:
        """Find snapshots stored through other replicas: poll the latest ref of every
        namespace someone streams from."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            names = {s.spec.namespace for c in self.connections for s in c.subs.values() if s.needs_market}
            for ns in sorted(names):
                try:
                    latest = await self.market.store.latest(ns)
                except Exception as exc:  # the store is down: try again next time
                    log.debug("latest snapshot poll of %s failed: %s", ns, exc)
                    continue
                if latest is None:
                    continue
                seen = self._seen.get(ns)
                if seen is None:
                    self._seen[ns] = latest.sort_key()
                elif latest.sort_key() > seen:
                    self.snapshot_stored(latest)

    async def requote(self, work: list[Item]) -> None:
        """Quote every subscription in ``work``: grouped by what one request must share,
        each group priced in as few merged queue requests as possible, and every
        subscription's quote queued on its connection."""
        if not work:
            return
        latest: dict[str, SnapshotRecord | None] = {}
        failed: dict[str, APIError] = {}
        for _, sub, _ in work:
            ns = sub.spec.namespace
            if not (sub.needs_market and sub.spec.val_datetime is None) or ns in latest or ns in failed:
                continue
            try:
                record = latest[ns] = await self.market.store.latest(ns)
            except Exception as exc:  # the store is down: these subscriptions get an error
                failed[ns] = store_unavailable(exc)
                continue
            seen = self._seen.get(ns)
            if record is None:  # nothing yet: the first snapshot (even via a replica) is news
                self._seen.setdefault(ns, NOTHING_SEEN)
            elif seen is None or record.sort_key() > seen:
                self._seen[ns] = record.sort_key()

        # group key -> fingerprint -> the subscriptions asking exactly that
        groups: dict[GroupKey, dict[bytes, list[Item]]] = {}
        for item in work:
            conn, sub, _ = item
            spec = sub.spec
            val_datetime, data_asof = spec.val_datetime, None
            if sub.needs_market and spec.val_datetime is None:
                err = failed.get(spec.namespace)
                record = latest.get(spec.namespace)
                if err is None and record is None:
                    err = NoMarketData(f"no market-data snapshot in namespace {spec.namespace!r} yet")
                if err is not None:
                    conn.error(sub.id, err.code, err.message, err.details)
                    continue
                assert record is not None
                val_datetime, data_asof = record.val_datetime, record.data_asof
            levels = None if spec.quantile_levels is None else tuple(spec.quantile_levels)
            key = (spec.namespace, val_datetime, data_asof, tuple(spec.measures), levels, sub.needs_market)
            groups.setdefault(key, {}).setdefault(sub.fingerprint, []).append(item)
        await asyncio.gather(*(self._group(key, list(prints.values())) for key, prints in groups.items()))

    def _limit(self, key: GroupKey) -> int:
        """Distinct contracts per merged request of this group: ``merge_contracts``, or
        less for a measure set whose requests have missed their deadline (see _learn)."""
        return min(self.settings.merge_contracts, self._caps.get(key[3:], self.settings.merge_contracts))

    async def _group(self, key: GroupKey, prints: list[list[Item]], below: int | None = None) -> None:
        """One group's fingerprint groups in merged requests of at most ``_limit`` (and
        fewer than ``below``) distinct contracts each."""
        jobs: list[asyncio.Task[None]] = []
        start = 0
        try:
            while start < len(prints):
                limit = self._limit(key) if below is None else min(self._limit(key), below - 1)
                chunk, start = self._take(prints, start, limit)
                jobs.append(asyncio.create_task(self._merged(key, chunk)))
            await asyncio.gather(*jobs)
        finally:
            for job in jobs:  # the round was cancelled (shutdown): so are its requests
                job.cancel()

    @staticmethod
    def _take(prints: list[list[Item]], start: int, limit: int) -> tuple[list[list[Item]], int]:
        """Fingerprint groups from ``start`` holding at most ``limit`` distinct contracts
        (at least one group); the chunk and where the next one starts."""
        chunk: list[list[Item]] = []
        held: set[Interned] = set()
        for i in range(start, len(prints)):
            fresh = {entry for entry in prints[i][0][1].entries if entry not in held}
            if chunk and len(held) + len(fresh) > limit:
                break
            chunk.append(prints[i])
            held |= fresh
        return chunk, start + len(chunk)

    async def _merged(self, key: GroupKey, chunk: list[list[Item]], retry: Retry | None = None) -> None:
        """Price the fingerprint groups of ``chunk`` (one group key) in one request: each
        distinct contract once under its hub id, the rows handed back under each
        subscription's own ids."""
        if len(chunk) == 1:
            await self._alone(key, chunk[0], retry)
            return
        namespace, val_datetime, data_asof, _, _, _ = key
        index: dict[Interned, int] = {}
        for members in chunk:
            for entry in members[0][1].entries:
                index.setdefault(entry, len(index))
        spec = chunk[0][0][1].spec
        try:
            request = PriceRequest.model_validate(
                {
                    "namespace": namespace,
                    "val_datetime": val_datetime,
                    "data_asof": data_asof,
                    "measures": spec.measures,
                    "quantile_levels": spec.quantile_levels,
                    "contracts": [entry.contract for entry in index],
                }
            )
        except ValidationError:  # each subscription validated alone: price them apart
            await self._split(key, chunk, None)
            return
        retry = retry or Retry()
        try:
            answer = await self._price(request, key, retry, split=True)
        except SplitRefusedError:
            await self._split(key, chunk, None, retry)
            return
        except DeadlineExceeded as exc:
            if len(index) > 1:  # smaller requests, sized by the time this one took (_learn)
                await self._group(key, chunk, below=len(index))
            else:
                self._fail(chunk, exc)
            return
        except APIError as exc:
            culprit = self._culprit(exc, list(index))
            if culprit is not False:  # it names a contract: only its holders may fail
                await self._split(key, chunk, culprit)
            else:
                self._fail(chunk, exc)
            return
        await self._hand_back(key, chunk, index, answer)

    @staticmethod
    def _fail(chunk: list[list[Item]], exc: APIError) -> None:
        for members in chunk:
            for conn, sub, _ in members:
                conn.error(sub.id, exc.code, exc.message, exc.details)

    async def _hand_back(
        self, key: GroupKey, chunk: list[list[Item]], index: dict[Interned, int], answer: dict[str, Any]
    ) -> None:
        """A merged answer's rows to each subscription under its own ids, with the models
        of its own rows."""
        rows: list[dict[str, Any]] = answer["results"]
        # A response names the model of each process that answered a row with the network
        # (rows name the process), in process-name order; a subscription's quote names
        # those of its own rows. Models are named after their process unless configured
        # otherwise; then the order tells which is which.
        learned = sorted({row["model"] for row in rows if row["method"] == "cvnn"})
        identities = list(answer["models"].items())
        if len(learned) != len(identities):
            log.warning("merged answer names models %s for processes %s: pricing apart", answer["models"], learned)
            await asyncio.gather(*(self._alone(key, members) for members in chunk))
            return
        if set(answer["models"]) == set(learned):
            model_of = {proc: (proc, answer["models"][proc]) for proc in learned}
        else:
            model_of = dict(zip(learned, identities, strict=True))
        for members in chunk:
            sub = members[0][1]
            mine = zip(sub.entries, sub.spec.contracts or (), strict=True)
            own = [{**rows[index[entry]], "id": c.id} for entry, c in mine]
            used = {row["model"] for row in own if row["method"] == "cvnn"}
            models = {name: identity for proc, (name, identity) in model_of.items() if proc in used}
            self._deliver(members, {**answer, "results": own, "models": models})

    @staticmethod
    def _culprit(exc: APIError, contracts: list[Interned]) -> Interned | Literal[False] | None:
        """For a request-level failure naming a contract (422 with ``contracts[i]``): the
        contract (None when the index is not one); False for a failure that every
        subscription of the request would have alone (no snapshot, overloaded, ...)."""
        if not isinstance(exc, Invalid):
            return False
        fields = [str(d.get("field") or "") for d in exc.details]
        if not any(f.startswith("contracts") for f in fields):
            return False
        for f in fields:
            m = CONTRACT_FIELD.match(f)
            if m is not None and int(m.group(1)) < len(contracts):
                return contracts[int(m.group(1))]
        return None

    async def _split(
        self, key: GroupKey, chunk: list[list[Item]], culprit: Interned | None, retry: Retry | None = None
    ) -> None:
        """A merged request failed for one of its subscriptions (or was refused again and
        again): those holding the contract it named are priced alone (each gets exactly
        its own answer) and the rest in two halves, so k bad subscriptions cost
        O(k log n) requests."""
        suspects = [m for m in chunk if culprit is not None and culprit in m[0][1].entries]
        rest = [m for m in chunk if not (culprit is not None and culprit in m[0][1].entries)]
        jobs = [self._alone(key, members) for members in suspects]
        if len(rest) > 1:
            half = len(rest) // 2
            jobs += [self._merged(key, rest[:half], retry), self._merged(key, rest[half:], retry)]
        elif rest:
            jobs.append(self._alone(key, rest[0], retry))
        await asyncio.gather(*jobs)

    async def _alone(self, key: GroupKey, members: list[Item], retry: Retry | None = None) -> None:
        """Subscriptions asking for the same thing: their own request, as if alone."""
        _, val_datetime, data_asof, _, _, _ = key
        try:
            request = members[0][1].spec.price_request(val_datetime, data_asof)
            answer = await self._price(request, key, retry or Retry())
        except APIError as exc:
            for conn, sub, _ in members:
                conn.error(sub.id, exc.code, exc.message, exc.details)
            return
        except ValidationError as exc:
            for conn, sub, _ in members:
                conn.error(sub.id, "invalid", "the subscription cannot be priced", format_validation_error(exc))
            return
        self._deliver(members, answer)

    async def _price(self, request: PriceRequest, key: GroupKey, retry: Retry, split: bool = False) -> dict[str, Any]:
        """One queue request within the hub's in-flight budget, its time learned (_learn).
        Refused as overloaded, it is retried alone (after the hub's other requests: an
        idle queue admits even a request it deems costly) with ``retry``'s backoff, from
        RETRY_FIRST_SECONDS doubling to RETRY_MAX_SECONDS, until ``overload_retry_seconds``
        after its first refusal; then the refusal is the answer. With ``split`` (a merged
        request), SPLIT_AFTER refusals in a row raise SplitRefusedError instead."""
        n = len(request.contracts)
        loop = asyncio.get_running_loop()
        alone = False
        refusals = 0
        while True:
            await self._budget.acquire(n, alone=alone)
            self.queue_requests += 1
            sent = loop.time()
            try:
                answer = await self.price(request)
            except DeadlineExceeded:
                self._learn(key, n, loop.time() - sent, missed=True)
                raise
            except Unavailable as exc:
                if exc.code != "overloaded":
                    raise
                if retry.give_up is None:
                    retry.give_up = loop.time() + self.settings.overload_retry_seconds
                if loop.time() >= retry.give_up:
                    if self.settings.overload_retry_seconds > 0:
                        raise Unavailable(
                            f"{exc.message} (the stream retried for {self.settings.overload_retry_seconds:g} s)",
                            code="overloaded",
                        ) from None
                    raise
            else:
                self._learn(key, n, loop.time() - sent)
                return answer
            finally:
                self._budget.release(n)
            self.overload_retries += 1
            await asyncio.sleep(min(retry.delay, retry.give_up - loop.time()))
            retry.delay = min(2 * retry.delay, RETRY_MAX_SECONDS)
            refusals += 1
            if split and refusals >= SPLIT_AFTER:
                raise SplitRefusedError
            alone = True

    def _learn(self, key: GroupKey, n: int, seconds: float, *, missed: bool = False) -> None:
        """A request of ``n`` contracts of this measure set took ``seconds`` (``missed``:
        and then missed its deadline). A miss caps the set's merged requests at the
        contracts that take ``merge_seconds`` at that pace (below ``n``: the deadline is
        well above ``merge_seconds``); an answer within ``merge_seconds`` lets the cap
        grow to what would take ``merge_seconds`` at its pace. A request's time is a
        fixed part plus a part per contract, so n * merge_seconds / seconds contracts take
        at most merge_seconds after an answer that came within it, and answers never
        shrink the cap: only misses do."""
        kind = key[3:]
        target = int(n * self.settings.merge_seconds / max(seconds, 1e-9))
        cap = self._caps.get(kind)
        if missed:
            self._caps[kind] = max(1, min(n - 1, target, self.settings.merge_contracts if cap is None else cap))
        elif cap is not None and seconds <= self.settings.merge_seconds and target > cap:
            if target >= self.settings.merge_contracts:
                del self._caps[kind]
            else:
                self._caps[kind] = target

    @staticmethod
    def _deliver(members: list[Item], answer: dict[str, Any]) -> None:
        for conn, sub, reason in members:
            if conn.subs.get(sub.id) is not sub:
                continue  # unsubscribed meanwhile
            sub.seq += 1
            conn.offer_quote(
                sub.id, orjson.dumps({"type": "quote", "id": sub.id, "seq": sub.seq, "reason": reason, **answer})
            )

    def publish(self, topic: str, body: dict[str, Any]) -> int:
        """Send a job's result to every subscription of ``topic``; how many got it."""
        self.topics[topic] = body
        sent = 0
        for conn in list(self.connections):
            for sub in conn.subs.values():
                if sub.spec.topic == topic:
                    sub.seq += 1
                    conn.offer_quote(
                        sub.id,
                        orjson.dumps(
                            {"type": "quote", "id": sub.id, "seq": sub.seq, "reason": "job", "topic": topic, **body}
                        ),
                    )
                    sent += 1
        return sent
