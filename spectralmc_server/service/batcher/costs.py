"""The batcher's cost model: what the worker's time goes to, learned from every job."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from spectralmc_server.service.metrics import Metrics

ClassKey = tuple[str, str, str]  # (process, method, tier)


def correction_key(fit: ClassKey) -> ClassKey:
    """The class of a calibration's reference-correction Monte Carlo (per path and expiry)."""
    return (fit[0], "reference", "correction")


# Starting points of the learned costs (seconds per contract, per quote-evaluation for
# fits; seconds per job of a tier), on the optimistic side: a class not yet measured gets
# jobs of at most PROBE_CONTRACTS of its contracts, RAMP times more each job after, so a
# wrong prior costs a few short jobs (the reference of a process without a closed form
# is a Monte Carlo, ~0.1 s a contract, hence the small probe there).
PRIOR_UNIT_SECONDS = {
    "price": 5e-6,
    "tangents": 2e-5,
    "distribution": 4e-5,
    "quantiles_many": 3e-4,
    "fit": 5e-5,
    # per path and expiry of a calibration's reference correction (rough Bergomi's Monte
    # Carlo in 256 steps: ~2e-5 s on one thread of this 2-core machine)
    "correction": 2e-5,
}
# Barrier contracts priced by Monte Carlo (engine/barrier_pricer.py) take seconds each
# (measured with one torch thread: a heston contract's price ~4 s, its Greeks ~6 times
# that, a gbm one with a year of daily dates ~1 s): their classes start from these, per
# contract, so admission refuses what cannot finish in time before it is first measured.
PRIOR_BARRIER_SECONDS = {"gbm-barrier": 1.0, "heston-barrier": 4.0}
BARRIER_TIER_FACTOR = {"price": 1.0, "tangents": 6.0}
PRIOR_JOB_SECONDS = {"price": 1e-3, "tangents": 3e-3, "distribution": 5e-3, "quantiles_many": 1e-2}
PRIOR_FIT_EVALUATIONS = 30.0
PROBE_CONTRACTS = {"cvnn": 64, "analytic": 64, "reference": 4}
RAMP = 4  # each job that measures a class may hold RAMP times more of it than the last
RAMPED = 3  # jobs after which a class's estimate is trusted (no more slow start)
# The learned pricer evaluates blocks of 64 rows: a smaller chunk costs as much as 64.
MIN_CHUNK = {"cvnn": 64, "analytic": 1, "reference": 1}
EFFICIENCY = 4  # a chunk holds at least this many times its job's fixed cost in contracts


# -- the cost model ---------------------------------------------------------------------


@dataclass
class _Unit:
    """One class's seconds per unit, as log(seconds): from the worker's wall time (what
    a job takes now) and from its CPU time (what the work itself costs)."""

    wall: float
    cpu: float
    samples: int = 0
    at: float = field(default_factory=time.monotonic)


class CostModel:
    """Worker seconds of a pricing job: per tier of measures in it, a fixed overhead
    (``PRIOR_JOB_SECONDS``), plus ``sum_k contracts_k * unit_k`` over its cost classes;
    of a calibration slice: ``evaluations * quotes * unit``.

    After each job its measured time, less the overheads, is shared among its classes
    in proportion to their estimates (what classes still being measured leave
    unexplained goes to them), and each class's implied seconds per unit moves its
    estimates in log space by ``WEIGHT`` of the way, each step at most ``STEP`` times (a
    class's first ``RAMPED`` jobs, which are small, by up to ``FIRST_STEP``), so one
    stalled job (torch's first call) moves it only so far. Two estimates are kept: from
    the wall time, what admission uses (it includes the worker waiting for the GIL while
    the event loop is busy; it rises the whole step at once and falls by ``WEIGHT``, so
    admission errs on the side of refusing), and from the computing thread's CPU time, the work itself,
    which sizes jobs (a worker slowed for everyone gains nothing from smaller jobs but
    more fixed costs; torch's intra-op threads are not counted, so it errs low). The
    wall estimate relaxes toward the CPU one with a half-life of ``HALF_LIFE`` seconds
    while the class is not measured: work refused while the worker was slow is admitted
    again later."""

    WEIGHT = 0.3
    STEP = 4.0
    FIRST_STEP = 30.0
    HALF_LIFE = 60.0

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self.units: dict[ClassKey, _Unit] = {}
        self.fit_evaluations = PRIOR_FIT_EVALUATIONS  # mean evaluations of a finished fit

    def _unit(self, key: ClassKey, usual: bool = False) -> float:
        u = self.units.get(key)
        if u is None:
            if key[1] == "reference" and key[0] in PRIOR_BARRIER_SECONDS:
                return PRIOR_BARRIER_SECONDS[key[0]] * BARRIER_TIER_FACTOR.get(key[2], 1.0)
            return PRIOR_UNIT_SECONDS[key[2]]
        if usual:
            return math.exp(u.cpu)
        relax = 0.5 ** ((time.monotonic() - u.at) / self.HALF_LIFE)
        return math.exp(u.cpu + (u.wall - u.cpu) * relax)

    def unit(self, key: ClassKey) -> float:
        """Seconds per unit of ``key`` now (for admission)."""
        return self._unit(key)

    def samples(self, key: ClassKey) -> int:
        """Jobs that have measured this class."""
        u = self.units.get(key)
        return 0 if u is None else u.samples

    def overhead(self, tiers: Any) -> float:
        """The fixed seconds of one job pricing these tiers."""
        return sum(PRIOR_JOB_SECONDS[t] for t in set(tiers))

    def seconds(self, counts: Mapping[ClassKey, int], *, usual: bool = False) -> float:
        """Seconds of these contracts now, or (``usual``) of the work itself."""
        return sum(n * self._unit(k, usual) for k, n in counts.items())

    def fit_seconds(self, key: ClassKey, evaluations: float, quotes: int, *, usual: bool = False) -> float:
        return evaluations * quotes * self._unit(key, usual)

    def _step(self, current: float, implied: float, first: bool, rise: float) -> float:
        limit = math.log(self.FIRST_STEP if first else self.STEP)
        target = min(max(math.log(max(implied, 1e-12)), current - limit), current + limit)
        weight = 1.0 if first else (rise if target > current else self.WEIGHT)
        return current + weight * (target - current)

    def _update(self, key: ClassKey, wall: float, cpu: float) -> None:
        u = self.units.get(key)
        if u is None:
            prior = math.log(PRIOR_UNIT_SECONDS[key[2]])
            u = self.units[key] = _Unit(prior, prior)
        first = u.samples < RAMPED  # its first jobs set it
        # admission's estimate rises at once (up to STEP a job: a burst that holds the
        # GIL slows the worker many times over within a second) and falls by WEIGHT
        u.wall = self._step(math.log(self._unit(key)), wall, first, 1.0)
        u.cpu = self._step(u.cpu, cpu, first, self.WEIGHT)
        u.samples += 1
        u.at = time.monotonic()
        if self.metrics is not None:
            self.metrics.queue_unit_seconds.labels(*key).set(math.exp(u.wall))

    def observe(self, counts: Mapping[ClassKey, int], seconds: float, cpu_seconds: float | None = None) -> None:
        """A pricing job with ``counts`` contracts per class took ``seconds`` (and
        ``cpu_seconds`` of its thread; None: as many)."""
        parts = {k: n * self._unit(k) for k, n in counts.items() if n > 0}
        if not parts or not math.isfinite(seconds) or seconds <= 0:
            return
        cpu = seconds if cpu_seconds is None or not math.isfinite(cpu_seconds) else min(cpu_seconds, seconds)
        fixed = self.overhead(k[2] for k in parts)
        wall_work, cpu_work = max(seconds - fixed, 0.1 * seconds), max(cpu - fixed, 0.1 * cpu)
        new = {k for k in parts if self.samples(k) < RAMPED}
        if new and len(new) < len(parts):  # the classes still being measured take the surprise
            known = sum(p for k, p in parts.items() if k not in new)
            known_cpu = sum(n * self._unit(k, usual=True) for k, n in counts.items() if k not in new)
            wall_work, cpu_work = max(wall_work - known, 0.05 * wall_work), max(cpu_work - known_cpu, 0.05 * cpu_work)
            parts = {k: p for k, p in parts.items() if k in new}
        total = sum(parts.values())
        for key, part in parts.items():
            share = part / total / counts[key]
            self._update(key, wall_work * share, cpu_work * share)

    def observe_slice(
        self, key: ClassKey, evaluations: int, quotes: int, seconds: float, cpu_seconds: float | None = None
    ) -> None:
        """A calibration slice did ``evaluations`` of ``quotes`` quotes in ``seconds``."""
        if evaluations > 0 and quotes > 0 and math.isfinite(seconds) and seconds > 0:
            cpu = seconds if cpu_seconds is None else min(max(cpu_seconds, 0.0), seconds)
            units = evaluations * quotes
            self._update(key, seconds / units, max(cpu, 0.1 * seconds) / units)

    def observe_fit(self, evaluations: float) -> None:
        self.fit_evaluations = 0.8 * self.fit_evaluations + 0.2 * evaluations
