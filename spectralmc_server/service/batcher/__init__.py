"""Batcher: admission by estimated cost, dynamic batching and bounded jobs in
front of the compute worker.

Cost. The queue learns what the worker's time goes to: a pricing job costs a fixed
overhead plus, per contract, the seconds of its cost class (process; method: ``cvnn``
inside the served model's domain, ``reference`` outside; tier: the heaviest kind of
measure asked for), a calibration slice costs the seconds per quote-evaluation of its
class. Every job's measured wall and CPU time updates the estimates (:class:`CostModel`).

Admission. At submit a request's wait is estimated as the work queued and in flight,
plus one online-training step, plus its own compute. When that exceeds
``admission_fraction`` of the request's deadline it is refused at once with 503
``overloaded`` and Retry-After (the seconds until enough of that work has drained)
instead of waiting to time out. An idle queue admits anything (its jobs are bounded,
and running it corrects the estimate). The queue is also bounded in requests and
contracts, and in concurrent calibrations.

Jobs. Requests are grouped by (models, namespace, val_datetime, data_asof): one batch
prices one market-data key. A job holds at most ``max_batch_contracts`` contracts and
about ``max_job_seconds`` of compute (at the work's own cost, its CPU time: a worker
slowed by a busy event loop gains nothing from smaller jobs), so a large request is
split into chunks priced one after another (at most one in flight per request) and
other batches run between them. Each request is priced with one snapshot of model versions and one
resolved market-data snapshot, taken at its first chunk; the chunks' answers are joined
into the bytes an unsplit answer has (the engine is batch-invariant). A calibration runs
in the engine in slices, one slice per job.

The engine is reached through an :class:`~spectralmc_server.service.engine.EngineClient`
(in this process or in its own): jobs go as Books, answers come back per request. When
the engine is lost, everything queued or in flight is answered 503 ``engine_unavailable``
at once, and new work is refused the same way until an engine is back.

Order. Jobs go in arrival order, except that work behind a request that is being split
(or a calibration) may go first while that request's slack (its deadline, less the work
that must run before it finishes) covers it: a one-contract request does not wait for a
20,000-contract one, and the large one still finishes in time. Work whose client has
gone or whose deadline has passed is dropped before it is computed, and between chunks.
Two jobs are kept on the worker so it never idles between them (up to eight while the
event loop is slow to hear that one ended); it runs them in order, so versions never go
backwards.
"""

from spectralmc_server.service.batcher.core import Batcher
from spectralmc_server.service.batcher.costs import PRIOR_UNIT_SECONDS, ClassKey, CostModel
from spectralmc_server.service.batcher.items import (
    MAX_RETRY_AFTER,
    VECTOR_MIN_CONTRACTS,
    _classify_each,
    classify,
    merge_answers,
    tier_of,
)

__all__ = [
    "MAX_RETRY_AFTER",
    "PRIOR_UNIT_SECONDS",
    "VECTOR_MIN_CONTRACTS",
    "Batcher",
    "ClassKey",
    "CostModel",
    "_classify_each",
    "classify",
    "merge_answers",
    "tier_of",
]
