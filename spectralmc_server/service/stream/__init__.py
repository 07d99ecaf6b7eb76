"""WebSocket ``/v1/stream``: subscriptions and quotes pushed as data and models change.

Client messages (JSON text)::

    {"op": "subscribe", "id": "s1", "namespace": "default", "contracts": [...],
     "measures": [...], "interval_seconds": 1.0}          # or "topic": "<job topic>"
    {"op": "unsubscribe", "id": "s1"}

Server messages: ``{"type": "subscribed", ...}``, ``{"type": "quote", "id", "seq",
"reason", "results", "models", "market_data", ...}`` and ``{"type": "error", "id",
"code", "message", "details"}``. A bad message gets an error and the connection stays.

Quotes are pushed on subscribe, on each new snapshot for the namespace (stored here or,
found by polling the namespace's latest ref, through another replica), on each model
version change and every ``interval_seconds``. One hub task computes them in order, so
seq and data never go backwards. A subscription to a topic no price job publishes is
refused (``not_found``, naming the known topics).

Requotes are merged: every subscription due in one round (new subscriptions, a
snapshot, a model swap, intervals falling due together) is grouped by what one request
must share (namespace, val_datetime, data_asof, measures, quantile levels, by reference
or not), and each group is priced in as few queue requests as possible: at most
``merge_contracts`` distinct contracts each, identical contracts of many subscriptions
priced once under a hub-wide id, the answer's rows mapped back to each subscription's
own ids. Each subscription gets the quote it would have got alone. A request the queue
refuses as overloaded is retried (after the hub's other requests; a merged one refused
SPLIT_AFTER times in a row as two halves) with backoff for ``overload_retry_seconds``
in all; one that fails naming a contract is split (the subscriptions holding it priced
alone, the rest in halves) so one subscription's bad contract fails only its own
quote; one that misses its deadline (a costly measure set) is priced again in requests
sized to take ``merge_seconds`` at the pace it showed, and that measure set's requests
stay capped until answers show they can grow. The hub holds at most
``max_inflight_requests`` requests and ``max_inflight_contracts`` contracts in the
queue at once, so its backlog waits in the hub, not against any request's deadline.

Each connection has one writer task and a bounded send queue: at most one pending
quote per subscription (a newer one replaces it: ``coalesced``) and at most
``control_queue`` error messages. A stalled client costs nothing but its own queue,
and after ``send_timeout_seconds`` blocked on one send it is disconnected.
"""

from spectralmc_server.service.stream.connection import Connection
from spectralmc_server.service.stream.hub import StreamHub, serve_connection
from spectralmc_server.service.stream.messages import Subscribe, Unsubscribe

__all__ = ["Connection", "StreamHub", "Subscribe", "Unsubscribe", "serve_connection"]
