"""The torch-free twins of the processes' closed forms (engine/processes/spec.py) against
the engine's torch formulas, and request validation running on them with no torch op.

Each twin is the torch formula's operations in the torch formula's order: with torch's
own sqrt, exp and expm1 put in place of math's and numpy's, every twin (T1 to T7) is the
torch formula bit for bit. With their own, the last bits differ: torch's CPU sqrt, exp
and expm1 are not math's (which are correctly rounded, or all but), so T1 and T4 differ
by up to 2 ulp, T3, T5 and T7 by 1, T6 by 4, and T2, whose terms cancel where v0 <<
theta, by up to 1.8e-13 relative; the measured figures are asserted. The columnar validator hands
rows within BORDER (1e-9 relative) of a bound to the row validator, far above these
differences: a book and its rows keep getting the same verdicts (checked below on books
of each process with rows on and around every cross-field bound).
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from pydantic import ValidationError
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from spectralmc_server.engine.processes import PROCESSES, Process, spec
from spectralmc_server.engine.processes.base import EXPIRY_BOUNDS, MAX_SCALE, MONEYNESS_BOUNDS
from spectralmc_server.pricing.cells import BORDER, PARAMS_PREFIX
from spectralmc_server.pricing.columns import request_from_columns
from spectralmc_server.pricing.errors import RequestRefusedError
from spectralmc_server.pricing.schemas import Contract, PriceRequest, format_validation_error

Floats = npt.NDArray[np.float64]
F64 = torch.float64
EPS = 2.0**-52
HESTON = ("v0", "kappa", "theta", "xi", "rho")


# -- points over the bounds ----------------------------------------------------------------


def _axis(low: float, high: float, k: int) -> Floats:
    """k points from low to high, both included: log-spaced where low > 0."""
    if low > 0:
        return np.exp(np.linspace(math.log(low), math.log(high), k))
    return np.linspace(low, high, k)


def _draw(rng: np.random.Generator, low: float, high: float, n: int) -> Floats:
    """n points in [low, high], half log-uniform (where low > 0), half uniform."""
    uniform = rng.uniform(low, high, n)
    if low <= 0:
        return uniform
    log = np.exp(rng.uniform(math.log(low), math.log(high), n))
    return np.where(rng.random(n) < 0.5, log, uniform)


def points(process: Process, n_random: int = 20_000, seed: int = 0) -> tuple[Floats, Floats]:
    """theta (B, P), T (B,): a grid over param_bounds x EXPIRY_BOUNDS (every fixing count
    for an asian) and n_random random points, float64."""
    rng = np.random.default_rng(seed)
    axes = []
    for name in process.param_names:
        low, high = process.param_bounds[name]
        if name == "fixings":
            axes.append(np.arange(low, high + 1.0))
        else:
            axes.append(_axis(low, high, 3 if name in ("xi", "rho") else 5))
    axes.append(_axis(*EXPIRY_BOUNDS, 7))
    grid = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1)
    cols = [_draw(rng, *process.param_bounds[name], n_random) for name in process.param_names]
    if "fixings" in process.param_names:  # whole fixings (the schema's rule)
        j = process.param_names.index("fixings")
        cols[j] = rng.integers(1, spec.MAX_FIXINGS + 1, n_random).astype(np.float64)
    cols.append(_draw(rng, *EXPIRY_BOUNDS, n_random))
    rand = np.stack(cols, axis=1)
    both = np.concatenate([grid, rand])
    return np.ascontiguousarray(both[:, :-1]), np.ascontiguousarray(both[:, -1])


@pytest.fixture(autouse=True, scope="module")
def _warm_torch() -> None:
    """Torch's elementary kernels run once, in parallel, before any is a reference. Seen
    under pytest on this 2-core VM: in ~20% of processes, the first float64 sqrt or exp
    over more than 2,048 elements (two threads) came out off on the second thread's half,
    by 3e-11 (sqrt) and 3.3e-9 (exp) relative, and exact from the next call on: torch's
    noise, not the twins'."""
    x = torch.linspace(1.0, 2.0, 1 << 16, dtype=F64)
    for fn in (torch.sqrt, torch.exp, torch.expm1):
        fn(x)


def ulps(a: Floats, b: Floats) -> npt.NDArray[np.int64]:
    """|a - b| in units in the last place (positive finite float64s)."""
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(a > 0) and np.all(b > 0)
    diff: npt.NDArray[np.int64] = np.abs(a.view(np.int64) - b.view(np.int64))
    return diff


def _torch_one(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], theta: Floats, t: Floats) -> Floats:
    """fn on 1-element tensors, one point at a time: as the row schema called it."""
    out = [
        float(fn(torch.tensor([row.tolist()], dtype=F64), torch.tensor([tk], dtype=F64))[0])
        for row, tk in zip(theta, t.tolist(), strict=True)
    ]
    return np.array(out, dtype=np.float64)


def _torch_all(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], theta: Floats, t: Floats) -> Floats:
    """fn on the whole book at once: as the columnar validator called it."""
    out: Floats = fn(torch.from_numpy(theta), torch.from_numpy(t)).numpy()
    return out


def _scale(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return PROCESSES[name].scale


def _average_ratio(theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return PROCESSES["asian"].forward_ratio(theta, t, t, t)


def _math_twin(name: str, what: str) -> Callable[[Sequence[float], float], float]:
    process = PROCESSES[name]
    if what == "scale":
        return process.scale_math
    return lambda theta, t: process.forward_ratio_math(theta, t, 0.0, 0.0)


def _np_twin(name: str, what: str) -> Callable[[Floats, Floats], Floats]:
    process = PROCESSES[name]
    if what == "scale":
        return process.scale_np
    return lambda theta, t: process.forward_ratio_np(theta, t, t, t)


CASES = {  # id: process, twin of, the torch formula
    "T1": ("gbm", "scale", _scale("gbm")),
    "T2": ("heston", "scale", _scale("heston")),
    "T3": ("merton", "scale", _scale("merton")),
    "T4": ("asian", "scale", _scale("asian")),
    "T6": ("asian", "forward_ratio", _average_ratio),
    "T7": ("rbergomi", "scale", _scale("rbergomi")),
}


def agreement(case: str, n_random: int = 20_000, stride: int = 1) -> dict[str, Any]:
    """The twins of ``case`` against torch over the bounds (every ``stride``-th point):
    max ulp of the math twin (one point at a time) and of the numpy twin (all at once),
    and the largest relative differences."""
    name, what, fn = CASES[case]
    theta, t = points(PROCESSES[name], n_random)
    theta, t = np.ascontiguousarray(theta[::stride]), np.ascontiguousarray(t[::stride])
    want = _torch_all(fn, theta, t)
    # the row schema's 1-element tensors round as the whole book does (checked on a sample)
    sample = np.arange(0, len(t), max(1, len(t) // 500))
    assert np.array_equal(_torch_one(fn, theta[sample], t[sample]), want[sample])
    twin = _math_twin(name, what)
    scalar = np.array([twin(row, tk) for row, tk in zip(theta.tolist(), t.tolist(), strict=True)])
    vector = _np_twin(name, what)(theta, t)
    return {
        "points": len(t),
        "math": int(ulps(scalar, want).max()),
        "math_share": float((scalar != want).mean()),
        "numpy": int(ulps(vector, want).max()),
        "rows_vs_columns": float(np.max(np.abs(scalar - vector) / vector)),
        "relative": float(np.max(np.abs(scalar - want) / want)),
    }


class _Module:
    """A module with some of its functions replaced."""

    def __init__(self, module: Any, **replaced: Any) -> None:
        self.module = module
        self.replaced = replaced

    def __getattr__(self, name: str) -> Any:
        return self.replaced[name] if name in self.replaced else getattr(self.module, name)


@contextmanager
def torch_elementary() -> Iterator[None]:
    """spec's exp, expm1 and sqrt (math's and numpy's) replaced by torch's own."""

    def scalar(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[float], float]:
        return lambda x: float(fn(torch.tensor([x], dtype=F64))[0])

    def vector(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Floats]:
        def call(x: Any) -> Floats:
            out: Floats = fn(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).numpy()
            return out

        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spec, "math", _Module(math, **{f: scalar(getattr(torch, f)) for f in ("exp", "expm1", "sqrt")}))
        mp.setattr(spec, "np", _Module(np, **{f: vector(getattr(torch, f)) for f in ("exp", "expm1", "sqrt")}))
        yield


# -- the twins against torch -----------------------------------------------------------------


@pytest.mark.parametrize("case", ["T1", "T2", "T3", "T4", "T6", "T7"])
def test_twins_are_the_torch_formula_bit_for_bit_with_its_elementary_functions(case: str) -> None:
    """With torch's sqrt, exp and expm1 in place of math's and numpy's, every twin is the
    torch formula bit for bit, one point or a book: the same operations in the same order
    (T4's rounding and clamping and T6's 64-term sum in ATen's order included)."""
    with torch_elementary():
        got = agreement(case, n_random=4_000, stride=5 if case == "T6" else 1)
    assert got["math"] == 0 and got["numpy"] == 0, got


# The largest difference from torch (ulp) measured over the grid and 20,000 random points,
# for the math twin and the numpy twin. torch's float64 sqrt on the CPU is off the
# correctly rounded one (math's, numpy's) by an ulp on ~0.8% of arguments, its exp on ~3%
# (math's is correctly rounded but in rare cases), its expm1 on ~2%: T3 ends in that sqrt,
# T1 and T4 multiply it by the vol (2 ulp), T6 adds 64 such exps (4 ulp, on ~3% of points;
# numpy's exp is torch's bit for bit on an AVX-512 CPU, 0 here, else as math's); T7
# (rough Bergomi, sqrt(xi0 T)) ends in that sqrt alone (1 ulp).
MAX_ULPS = {"T1": (2, 2), "T3": (1, 1), "T4": (2, 2), "T6": (4, 4), "T7": (1, 1)}


@pytest.mark.parametrize("case", sorted(MAX_ULPS))
def test_twins_agree_with_torch_to_the_last_bits(case: str) -> None:
    got = agreement(case)
    assert got["math"] <= MAX_ULPS[case][0] and got["numpy"] <= MAX_ULPS[case][1], got
    assert got["rows_vs_columns"] <= 8 * EPS, got  # far below BORDER: rows and columns agree


def test_heston_scale_agrees_with_torch_to_1e_12() -> None:
    """T2: where v0 << theta, theta T and (v0 - theta)(1 - e^{-kappa T}) / kappa nearly
    cancel and an ulp of expm1 grows into many of the result: measured at most 128 ulp
    (math) and 1,284 ulp (numpy), 1.8e-13 relative, over the grid and random points. Where
    the terms add (v0 >= theta), an ulp."""
    got = agreement("T2")
    assert got["relative"] <= 1e-12 and got["rows_vs_columns"] <= 1e-12 <= BORDER / 1000, got
    theta, t = points(PROCESSES["heston"])
    keep = theta[:, 0] >= theta[:, 2]
    theta, t = np.ascontiguousarray(theta[keep]), np.ascontiguousarray(t[keep])
    want = _torch_all(_scale("heston"), theta, t)
    process = PROCESSES["heston"]
    scalar = np.array([process.scale_math(row, tk) for row, tk in zip(theta.tolist(), t.tolist(), strict=True)])
    assert ulps(scalar, want).max() <= 1
    assert ulps(process.scale_np(theta, t), want).max() <= 1


def test_heston_cancelling_corner_agrees_with_torch_to_1e_12() -> None:
    """T2's worst corner (v0 near its floor, theta near its ceiling, kappa T small):
    measured 5e-14 relative, BORDER (1e-9) far above."""
    rng = np.random.default_rng(3)
    n = 20_000
    v0 = np.exp(rng.uniform(math.log(1e-6), math.log(1e-4), n))
    kappa = np.exp(rng.uniform(math.log(1e-3), math.log(50.0), n))
    mean_v = rng.uniform(1.0, 4.0, n)
    t = np.exp(rng.uniform(math.log(EXPIRY_BOUNDS[0]), math.log(1e-2), n))
    theta = np.stack([v0, kappa, mean_v, np.full(n, 0.5), np.zeros(n)], axis=1)
    want = _torch_all(_scale("heston"), theta, t)
    process = PROCESSES["heston"]
    scalar = np.array([process.scale_math(row, tk) for row, tk in zip(theta.tolist(), t.tolist(), strict=True)])
    vector = process.scale_np(theta, t)
    assert np.max(np.abs(scalar - want) / want) <= 1e-12
    assert np.max(np.abs(vector - want) / want) <= 1e-12
    assert np.max(np.abs(scalar - vector) / vector) <= 1e-12


def test_european_forward_ratio_within_one_ulp() -> None:
    """T5, e^{(r - q) T} over the schema's rate and dividend bounds: math.exp and torch's
    exp differ in the last bit on ~3% of arguments; numpy's exp may be torch's bit for bit
    (AVX-512) or the C library's. With torch's exp in their place, bit for bit."""
    rng = np.random.default_rng(5)
    axis = np.linspace(-1.0, 1.0, 9)
    r, q, t = (g.ravel() for g in np.meshgrid(axis, axis, _axis(*EXPIRY_BOUNDS, 9), indexing="ij"))
    rate = np.concatenate([r, rng.uniform(-1, 1, 20_000)])
    dividend = np.concatenate([q, rng.uniform(-1, 1, 20_000)])
    expiry = np.concatenate([t, _draw(rng, *EXPIRY_BOUNDS, 20_000)])
    gbm = PROCESSES["gbm"]
    theta = np.full((len(rate), 1), 0.2)
    one = torch.from_numpy
    want = gbm.forward_ratio(one(theta), one(expiry), one(rate), one(dividend)).numpy()
    args = list(zip(expiry.tolist(), rate.tolist(), dividend.tolist(), strict=True))
    scalar = np.array([gbm.forward_ratio_math([0.2], tk, rk, qk) for tk, rk, qk in args])
    assert ulps(scalar, want).max() <= 1
    assert ulps(gbm.forward_ratio_np(theta, expiry, rate, dividend), want).max() <= 1
    # the schemas' own expression before the twins: unchanged, bit for bit
    assert scalar.tolist() == [math.exp((rk - qk) * tk) for tk, rk, qk in args]
    with torch_elementary():
        assert [gbm.forward_ratio_math([0.2], tk, rk, qk) for tk, rk, qk in args] == want.tolist()
        assert np.array_equal(gbm.forward_ratio_np(theta, expiry, rate, dividend), want)


def test_fixing_count_rounds_half_to_even_and_clamps() -> None:
    values = [-3.0, 0.0, 0.4, 0.5, 1.0, 1.5, 2.5, 3.5, 12.49, 12.5, 13.5, 63.5, 64.0, 64.5, 65.0, 1e300, math.inf]
    theta = np.array([[0.2, 0.0, v] for v in values])
    want = torch.round(torch.from_numpy(theta)[:, 2]).clamp(1, spec.MAX_FIXINGS).numpy()
    assert np.array_equal(spec.fixing_count_np(theta), want)
    assert [spec.fixing_count(v) for v in values] == want.tolist()
    assert math.isnan(spec.fixing_count(math.nan)) and np.isnan(spec.fixing_count_np(np.array([[0, 0, np.nan]])))


def test_sum_order_is_atens() -> None:
    """The order the T6 twins add in is torch.sum's over a row of 64 float64s."""
    rng = np.random.default_rng(9)
    terms = np.exp(rng.normal(0.0, 4.0, (5_000, spec.MAX_FIXINGS)))
    terms[rng.random(terms.shape) < 0.3] = 0.0
    want = torch.from_numpy(terms).sum(1).numpy()
    assert np.array_equal(spec.sum_fixings_np(terms), want)
    assert [spec.sum_fixings(row) for row in terms[:500].tolist()] == want[:500].tolist()


def test_spec_imports_no_torch() -> None:
    source = inspect.getsource(spec)
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert all("torch" not in line and "spectralmc_server" not in line for line in imports), imports


# -- validation runs no torch op ---------------------------------------------------------------


class TorchUsedError(Exception):
    """Torch was called (not a ValueError or AssertionError: pydantic would take those for
    a refusal of the contract)."""


class NoTorch(TorchFunctionMode):
    """Any torch function called (torch.tensor, torch.sqrt, a tensor's method) raises."""

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        raise TorchUsedError(f"torch function called during validation: {func}")


class NoAten(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Any aten operator run (torch.from_numpy included) raises."""

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        raise TorchUsedError(f"torch operator run during validation: {func}")


@contextmanager
def no_torch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise TorchUsedError("a process's torch formula called during validation")

    with monkeypatch.context() as mp:
        for process in PROCESSES.values():
            mp.setattr(process, "scale", refuse)
            mp.setattr(process, "forward_ratio", refuse)
        with NoTorch(), NoAten():  # type: ignore[no-untyped-call]
            yield


def _old_check(self: Contract) -> None:
    """Contract._check_spread_and_moneyness as it was before the twins (torch formulas
    on 1-element tensors): the reference for 'accepts and refuses as before'."""
    spot, t, rate, dividend = self.market_inputs()
    process = PROCESSES[self.process]
    given = self.process_params()
    if self.vol_driven:
        s = given["vol"] * math.sqrt(t)
    else:
        theta = torch.tensor([[given[n] for n in process.param_names]], dtype=F64)
        s = float(process.scale(theta, torch.tensor([t], dtype=F64))[0])
    if not s <= MAX_SCALE:
        raise ValueError("spread")
    process.check_spread(given, t, s)
    if process.averages:
        theta = torch.tensor([[given[n] for n in process.param_names]], dtype=F64)
        one = torch.tensor([t], dtype=F64)
        ratio = float(process.forward_ratio(theta, one, one * rate, one * dividend)[0])
    else:
        ratio = math.exp((rate - dividend) * t)
    if not MONEYNESS_BOUNDS[0] <= self.strike / (spot * ratio) <= MONEYNESS_BOUNDS[1]:
        raise ValueError("moneyness")


Row = dict[str, Any]


def _random_params(rng: random.Random, process: Process) -> dict[str, float]:
    out = {}
    for name in process.market_param_names:
        low, high = process.param_bounds[name]
        if low > 0 and rng.random() < 0.5:
            out[name] = math.exp(rng.uniform(math.log(low), math.log(high)))
        else:
            out[name] = rng.uniform(low, high)
    return out


def _kf_strike(
    rng: random.Random, process: Process, params: Mapping[str, float], t: float, rate: float, dividend: float
) -> float:
    """A strike (spot 1) whose K/F is at a moneyness bound, a hair inside or outside it,
    or anywhere between 1e-5 and 1e5, K/F taken with the torch forward ratio."""
    theta = [params.get("vol", 0.0), rate - dividend, params.get("fixings", 1.0)] if process.averages else []
    one = torch.tensor([t], dtype=F64)
    if process.averages:
        ratio = float(process.forward_ratio(torch.tensor([theta], dtype=F64), one, one * rate, one * dividend)[0])
    else:
        ratio = math.exp((rate - dividend) * t)
    bound = rng.choice([*MONEYNESS_BOUNDS, math.exp(rng.uniform(math.log(1e-5), math.log(1e5)))])
    return bound * ratio * rng.choice([1.0, 1.0 + 1e-12, 1.0 - 1e-12, 1.0 + 4 * EPS, 1.0 - 4 * EPS, 1.1, 0.9])


def _spread_at_max(process: Process, params: dict[str, float], row: Row, hair: float) -> None:
    """Move a heston's (v0, theta) or a merton's expiry so that its torch scale is
    MAX_SCALE x hair (as near as rounding lets), where the bounds allow."""
    names = process.param_names
    t = float(row["expiry_years"])
    s = float(process.scale(torch.tensor([[params[n] for n in names]], dtype=F64), torch.tensor([t], dtype=F64))[0])
    c = (MAX_SCALE * hair / s) ** 2  # scale^2 is linear in (v0, theta) and in merton's T
    if process.name == "heston" and max(params["v0"], params["theta"]) * c <= 4.0:
        params["v0"], params["theta"] = params["v0"] * c, params["theta"] * c
    elif process.name == "merton" and t * c <= EXPIRY_BOUNDS[1]:
        row["expiry_years"] = t * c


def random_rows(name: str, n: int, seed: int) -> list[Row]:
    """Contracts of process ``name`` spread over its bounds: spreads on both sides of
    MAX_SCALE, K/F on and around its bounds, merton's spikes."""
    rng = random.Random(seed)
    process = PROCESSES[name]
    rows = []
    for i in range(n):
        params = _random_params(rng, process)
        t = math.exp(rng.uniform(math.log(EXPIRY_BOUNDS[0]), math.log(EXPIRY_BOUNDS[1])))
        rate, dividend = rng.uniform(-1, 1) * rng.choice([0.05, 1.0]), rng.uniform(-1, 1) * rng.choice([0.05, 1.0])
        row: Row = {"id": f"c{i}", "right": rng.choice(["call", "put"]), "spot": 1.0, "expiry_years": t}
        row.update(rate=rate, dividend=dividend, process=name)
        if process.averages:
            row["fixings"] = rng.randint(1, spec.MAX_FIXINGS)
            params_all = {**params, "fixings": float(row["fixings"])}
        else:
            params_all = params
        if process.market_param_names == ("vol",):
            row["vol"] = params["vol"]
        else:
            row["params"] = params
        if rng.random() < 0.3:  # the spread at MAX_SCALE, a hair inside or outside
            hair = rng.choice([1.0, 1 + 1e-15, 1 - 1e-15, 1 + 1e-12, 1 - 1e-12, 1.001])
            if process.market_param_names == ("vol",):
                row["vol"] = min(MAX_SCALE / math.sqrt(t) * hair, 5.0)
                params_all["vol"] = row["vol"]
            else:
                _spread_at_max(process, params, row, hair)
                t = row["expiry_years"]
        row["strike"] = min(max(_kf_strike(rng, process, params_all, t, rate, dividend), 1e-6), 1e9)
        rows.append(row)
    return rows


def _row_verdicts(rows: Sequence[Row]) -> set[int]:
    """The rows PriceRequest.model_validate refuses."""
    try:
        PriceRequest.model_validate({"contracts": list(rows)})
    except ValidationError as exc:
        return {_index(d["field"]) for d in format_validation_error(exc)}
    return set()


def _column_verdicts(rows: Sequence[Row]) -> set[int]:
    """The rows request_from_columns refuses."""
    names: list[str] = []
    for row in rows:
        for key, value in row.items():
            keys = [PARAMS_PREFIX + k for k in value] if key == "params" else [key]
            names += [k for k in keys if k not in names]
    cols: dict[str, list[Any]] = {}
    for name in names:
        if name.startswith(PARAMS_PREFIX):
            cols[name] = [(row.get("params") or {}).get(name[len(PARAMS_PREFIX) :]) for row in rows]
        else:
            cols[name] = [row.get(name) for row in rows]
    try:
        request_from_columns({}, cols)
    except RequestRefusedError as exc:
        return {_index(str(d["field"])) for d in exc.details}
    return set()


def _index(field: str) -> int:
    assert field.startswith("contracts["), field
    return int(field[len("contracts[") : field.index("]")])


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_validation_runs_no_torch_and_decides_as_before(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A book of each process, rows near every cross-field bound included, through the
    row schema and the columnar validator with every torch function and operator
    refused: both refuse exactly the rows the torch formulas refused."""
    for seed in range(4):
        rows = random_rows(name, 90, seed)
        with monkeypatch.context() as mp:
            mp.setattr(Contract, "_check_spread_and_moneyness", _old_check)
            before = _row_verdicts(rows)
        with no_torch(monkeypatch):
            by_rows = _row_verdicts(rows)
            by_columns = _column_verdicts(rows)
            accepted = [r for i, r in enumerate(rows) if i not in by_rows]
            assert _row_verdicts(accepted) == set() and _column_verdicts(accepted) == set()
        assert by_rows == before, (sorted(by_rows ^ before), name, seed)
        assert by_columns == before, (sorted(by_columns ^ before), name, seed)
        assert 5 <= len(before) <= 85, (name, len(before))  # both verdicts well represented


def test_the_guard_catches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The no-torch guard is not vacuous: the old check (torch on 1-element tensors) and
    torch.from_numpy both trip it."""
    row = random_rows("heston", 1, 0)[0]
    with no_torch(monkeypatch), pytest.raises(TorchUsedError):
        torch.from_numpy(np.ones(2))
    with monkeypatch.context() as mp:
        mp.setattr(Contract, "_check_spread_and_moneyness", _old_check)
        with no_torch(monkeypatch), pytest.raises(TorchUsedError):
            Contract.model_validate(row)
