"""Least-squares calibration of a process's parameters through a CF pricer.

The residual of quote i is (model price - market price) / Black vega, both normalised
by the discounted forward and taken on the out-of-the-money side, so it is close to
the implied-vol error and quotes of every strike and expiry count alike. The model
price comes from COS on the CF, the learned network's or an analytic one, and is
differentiable in the parameters: the Jacobian comes from forward-mode autograd (one
pass per parameter), and Levenberg-Marquardt with Marquardt's diagonal scaling takes
the steps. Parameters stay inside their bounds by construction: the optimiser works
in x with theta = bound.from_unit(sigmoid(x)), in each bound's own coordinate (log
for log-scale ranges), which keeps a learned model inside its trained domain.

A pricer that gives prices but no CF (the rough Bergomi reference Monte Carlo, with
fixed random numbers so that its prices are smooth in the parameters) is fitted the
same way by :func:`calibrate_prices`, its Jacobian by forward differences in x. Either
fit may be given several starts: each is screened by its sum of squares (one pricing
each) and Levenberg-Marquardt runs from the best.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

import torch

from spectralmc_server.engine.cos import cos_coefficients
from spectralmc_server.engine.processes.base import ParameterRange, Process
from spectralmc_server.engine.spectrum import SpectrumConfig

# (the aliases are strings: this module is imported where torch is not, lazy_torch.py)
CFFunction: TypeAlias = "Callable[[torch.Tensor, torch.Tensor], torch.Tensor]"  # (theta (B, P), T (B,)) -> phi_Y (B, K)
# (theta (B, P), T (B,), d_theta (Q, B, P), d_scale (Q, B)) -> phi_Y (B, K), d phi_Y (Q, B, K):
# a CF with its derivatives along Q parameter directions (CFModel.forward_with_tangents).
TangentCF: TypeAlias = (
    "Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]"
)
# theta (P,) -> the normalised out-of-the-money prices (n,) of the quotes, like Quotes.price
PriceFunction: TypeAlias = "Callable[[torch.Tensor], torch.Tensor]"
Start = Mapping[str, float]
_SQRT_2PI = math.sqrt(2.0 * math.pi)


class CalibrationError(ValueError):
    """The quotes cannot be calibrated to (too few, outside the model, not finite)."""


@dataclass(frozen=True)
class Quotes:
    """Option quotes as normalised out-of-the-money prices, all (n,) float64.

    ``price`` is the undiscounted out-of-the-money option value over the forward
    (E[(kappa - e^X)^+] for kappa <= 1, E[(e^X - kappa)^+] above), ``vega`` its Black
    vega per 1.00 of vol in the same units, ``vol`` the market implied vol.
    """

    expiry: torch.Tensor
    log_moneyness: torch.Tensor
    price: torch.Tensor
    vega: torch.Tensor
    vol: torch.Tensor

    def __len__(self) -> int:
        return int(self.expiry.shape[0])

    @classmethod
    def from_vols(cls, expiry: torch.Tensor, log_moneyness: torch.Tensor, vol: torch.Tensor) -> Quotes:
        """Quotes from Black implied vols at log(K/F)."""
        sd = vol * torch.sqrt(expiry)
        d1 = -log_moneyness / sd + 0.5 * sd
        d2 = d1 - sd
        kappa = torch.exp(log_moneyness)
        call = torch.special.ndtr(d1) - kappa * torch.special.ndtr(d2)
        put = call - 1.0 + kappa
        price = torch.where(log_moneyness <= 0, put, call)
        vega = torch.exp(-0.5 * d1 * d1) / _SQRT_2PI * torch.sqrt(expiry)
        return cls(expiry, log_moneyness, price, vega, vol)

    def with_vega_floor(self, fraction: float) -> Quotes:
        """These quotes with each vega raised to at least ``fraction`` of the at-the-money
        vega at its expiry and vol (sqrt(T) n(vol sqrt(T) / 2)): the fit's residual is
        then the vol error where the vega is above the floor and the price error over
        the floor where it is below, so a far wing whose price is a fraction of a basis
        point (where a pricer's price error of 1 bp is hundreds of bp of vol) cannot
        outweigh the smile. ``fraction`` 0 leaves them as they are."""
        if fraction <= 0.0:
            return self
        sd = self.vol * torch.sqrt(self.expiry)
        atm = torch.exp(-0.125 * sd * sd) / _SQRT_2PI * torch.sqrt(self.expiry)
        return Quotes(self.expiry, self.log_moneyness, self.price, torch.maximum(self.vega, fraction * atm), self.vol)


@dataclass
class CalibrationResult:
    """The fitted parameters and how well they fit."""

    params: dict[str, float]
    model_price: torch.Tensor  # (n,) normalised, like Quotes.price
    residual: torch.Tensor  # (n,) (model - market) / vega: approximately the vol error
    rmse_vol: float  # root mean square of residual
    iterations: int
    evaluations: int
    seconds: float
    converged: bool
    start: dict[str, float]
    history: list[float] = field(default_factory=list)  # sum of squares after each accepted step


def _cos_put(
    coef: torch.Tensor, s: torch.Tensor, log_moneyness: torch.Tensor, spectrum: SpectrumConfig
) -> torch.Tensor:
    """The COS put E[(kappa - e^X)^+] of engine/cos.py written out on (..., n, K) arrays
    for coefficient rows ``coef``, scales ``s`` (n, 1) and log(K/F) (n,); linear in
    ``coef`` inside [-L, L], constant (0 or kappa - 1) outside.

    For the few dozen quotes of a surface this is a handful of small ops (the pricer's
    trig-table scheme pays off only for many strikes).
    """
    lw = spectrum.half_width
    w = spectrum.frequencies(dtype=torch.float64, device=coef.device)  # (K,)
    inv_w = torch.cat([torch.zeros_like(w[:1]), 1.0 / w[1:]])
    y = log_moneyness / s[:, 0]  # (n,)
    yc = y.clamp(-lw, lw)[:, None]  # (n, 1)
    angle = w * (yc + lw)  # (n, K)
    denom = s * s + w * w  # (n, K)
    kappa = torch.exp(log_moneyness)
    k_sin = kappa[:, None] * s * s * inv_w * torch.sin(angle) / denom  # (n, K)
    k_cos = (s * torch.exp(-s * lw) - kappa[:, None] * s * torch.cos(angle)) / denom  # (n, K)
    inside = kappa * coef[..., 0] * (yc[:, 0] + lw) + (coef * (k_sin + k_cos)).sum(-1)  # (..., n)
    return torch.where(y <= -lw, torch.zeros_like(inside), torch.where(y >= lw, kappa - 1.0, inside))


def _cos_put_ds(
    coef: torch.Tensor, s: torch.Tensor, log_moneyness: torch.Tensor, spectrum: SpectrumConfig
) -> torch.Tensor:
    """d/ds of :func:`_cos_put` with the coefficients fixed (n,), from differentiating
    its terms by hand: with y = log(K/F)/s, a_k = w_k (y + L), D_k = s^2 + w_k^2,
    dy/ds = -y/s and da_k/ds = -w_k y/s."""
    lw = spectrum.half_width
    w = spectrum.frequencies(dtype=torch.float64, device=coef.device)  # (K,)
    inv_w = torch.cat([torch.zeros_like(w[:1]), 1.0 / w[1:]])
    y = log_moneyness / s[:, 0]
    yc = y.clamp(-lw, lw)[:, None]  # (n, 1)
    angle = w * (yc + lw)
    da = -w * yc / s  # (n, K)
    d = s * s + w * w
    kappa = torch.exp(log_moneyness)[:, None]
    sin, cos = torch.sin(angle), torch.cos(angle)
    tail = torch.exp(-s * lw)
    f1 = kappa * inv_w * ((2.0 * s * sin + s * s * cos * da) / d - s * s * sin * 2.0 * s / (d * d))
    f2 = tail * (1.0 - s * lw) / d - s * tail * 2.0 * s / (d * d)
    f3 = -kappa * (cos - s * sin * da) / d + kappa * s * cos * 2.0 * s / (d * d)
    inside = -kappa[:, 0] * coef[:, 0] * yc[:, 0] / s[:, 0] + (coef * (f1 + f2 + f3)).sum(-1)
    return torch.where(y.abs() >= lw, torch.zeros_like(inside), inside)


def _otm(put: torch.Tensor, log_moneyness: torch.Tensor) -> torch.Tensor:
    """Out-of-the-money side: the put below the forward, the call (by parity) above."""
    return torch.where(log_moneyness <= 0, put, put + 1.0 - torch.exp(log_moneyness))


def model_prices(
    cf: CFFunction,
    process: Process,
    spectrum: SpectrumConfig,
    theta: torch.Tensor,
    expiries: torch.Tensor,
    rows: torch.Tensor,
    log_moneyness: torch.Tensor,
) -> torch.Tensor:
    """Normalised out-of-the-money prices (n,) for one parameter vector ``theta`` (P,)
    at distinct ``expiries`` (E,), with quote i at expiry ``rows[i]``."""
    th = theta[None, :].expand(expiries.shape[0], -1)  # (E, P)
    coef = cos_coefficients(cf(th, expiries), spectrum)[rows]  # (n, K)
    s = process.scale(th, expiries)[rows][:, None]  # (n, 1)
    return _otm(_cos_put(coef, s, log_moneyness, spectrum), log_moneyness)


def _unit(u: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(u)


def _to_x(value: float, bound: ParameterRange) -> float:
    u = float(bound.to_unit(torch.tensor(value, dtype=torch.float64)))
    u = min(max(u, 1e-6), 1.0 - 1e-6)
    return math.log(u / (1.0 - u))


def _check_quotes(quotes: Quotes, names: tuple[str, ...], bounds: tuple[ParameterRange, ...]) -> None:
    if tuple(b.name for b in bounds) != names:
        raise CalibrationError(f"bounds must name {', '.join(names)} in order")
    n, p = len(quotes), len(names)
    if n < p:
        raise CalibrationError(f"{n} quotes cannot determine {p} parameters: need at least {p}")
    for what, t in (("expiry", quotes.expiry), ("price", quotes.price), ("vega", quotes.vega)):
        if not bool(torch.isfinite(t).all()):
            raise CalibrationError(f"quote {what}s must be finite")
    if bool((quotes.vega <= 1e-8).any()):
        bad = int(torch.nonzero(quotes.vega <= 1e-8)[0, 0])
        raise CalibrationError(f"quote {bad} has no vega (too far from the money): its vol is not identifiable")


class _Fit:
    """One calibration's residuals and Jacobian in the unconstrained coordinates x (each
    parameter mapped from its bounds through the logistic): the CF and the scale are
    evaluated once per distinct expiry, the quotes index them."""

    def __init__(
        self,
        cf: CFFunction,
        process: Process,
        spectrum: SpectrumConfig,
        quotes: Quotes,
        bounds: tuple[ParameterRange, ...],
        tangents: TangentCF | None,
    ) -> None:
        self.cf, self.process, self.spectrum, self.quotes = cf, process, spectrum, quotes
        self.bounds, self.tangents = bounds, tangents
        self.p = len(bounds)
        self.expiries, self.rows = torch.unique(quotes.expiry, return_inverse=True)
        self.evaluations = 0

    def theta_of(self, x: torch.Tensor) -> torch.Tensor:
        u = _unit(x)
        return torch.stack([b.from_unit(u[i]) for i, b in enumerate(self.bounds)])

    def prices(self, theta: torch.Tensor) -> torch.Tensor:
        q = self.quotes
        return model_prices(self.cf, self.process, self.spectrum, theta, self.expiries, self.rows, q.log_moneyness)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return (self.prices(self.theta_of(x)) - self.quotes.price) / self.quotes.vega

    def _per_expiry(
        self, x: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        th = self.theta_of(x)[None, :].expand(self.expiries.shape[0], -1)  # (E, P)
        out = cos_coefficients(self.cf(th, self.expiries), self.spectrum), self.process.scale(th, self.expiries)
        return out, out  # (E, K), (E,)

    def _per_expiry_tangents(
        self, x: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        assert self.tangents is not None
        p, expiries, bounds = self.p, self.expiries, self.bounds
        e = expiries.shape[0]
        u = _unit(x)
        th = torch.stack([b.from_unit(u[i]) for i, b in enumerate(bounds)])[None, :].expand(e, -1)  # (E, P)
        dth = torch.stack([b.from_unit_derivative(u[i]) for i, b in enumerate(bounds)]) * u * (1.0 - u)  # (P,)
        d_theta = torch.diag_embed(dth)[:, None, :].expand(p, e, p)  # (P dirs, E, P)
        with torch.enable_grad():
            leaf = th.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.process.scale(leaf, expiries).sum(), leaf)  # (E, P): rows independent
        d_scale = (d_theta * g[None]).sum(-1)  # (P, E)
        with torch.no_grad():
            phi, d_phi = self.tangents(th, expiries, d_theta, d_scale)  # (E, K), (P, E, K)
            coef = cos_coefficients(phi, self.spectrum)
            k = coef.shape[1]
            d_coef = cos_coefficients(d_phi.reshape(p * e, k), self.spectrum).reshape(p, e, k).permute(1, 2, 0)
            s = self.process.scale(th, expiries)
        return (d_coef, d_scale.T), (coef, s)

    def jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residuals and their Jacobian (n, P). Only the CF and the scale, one row per
        expiry, go through forward-mode autograd (all P directions in one vectorised
        pass); the put is linear in the COS coefficients, so their derivatives go
        through the same put formula, and its derivative in s is one more jvp."""
        q, spectrum, rows, lm = self.quotes, self.spectrum, self.rows, self.quotes.log_moneyness
        if self.tangents is not None:
            (d_coef, d_s), (coef, s) = self._per_expiry_tangents(x)  # (E, K, P), (E, P)
        else:
            (d_coef, d_s), (coef, s) = torch.func.jacfwd(self._per_expiry, has_aux=True)(x)
        self.evaluations += 1
        coef_q, s_q = coef[rows].detach(), s[rows][:, None].detach()  # (n, K), (n, 1)
        put = _cos_put(coef_q, s_q, lm, spectrum)
        dput_ds = _cos_put_ds(coef_q, s_q, lm, spectrum)
        r = (_otm(put, lm) - q.price) / q.vega
        lin = _cos_put(d_coef[rows].permute(2, 0, 1), s_q, lm, spectrum)  # (P, n): put along d coef_j
        outside = (lm / s_q[:, 0]).abs() >= spectrum.half_width  # constant branches
        lin = torch.where(outside, torch.zeros_like(lin), lin)
        jac = (lin.T + dput_ds[:, None] * d_s[rows]) / q.vega[:, None]  # (n, P)
        return r.detach(), jac.detach()


class _Problem(Protocol):
    """What the Levenberg-Marquardt loop needs of a fit: residuals, and residuals with
    their Jacobian, in the unconstrained coordinates x."""

    evaluations: int

    def theta_of(self, x: torch.Tensor) -> torch.Tensor: ...

    def prices(self, theta: torch.Tensor) -> torch.Tensor: ...

    def residual(self, x: torch.Tensor) -> torch.Tensor: ...

    def jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class _PriceFit:
    """A fit through a pricer that gives prices only: residuals as for :class:`_Fit`,
    the Jacobian by forward differences of ``step`` in each x (P + 1 pricings). For a
    Monte Carlo the pricer must draw the same random numbers at every call (common
    random numbers), so that its prices are a smooth function of the parameters."""

    def __init__(self, price: PriceFunction, quotes: Quotes, bounds: tuple[ParameterRange, ...], step: float) -> None:
        self.price, self.quotes, self.bounds, self.step = price, quotes, bounds, step
        self.p = len(bounds)
        self.evaluations = 0

    def theta_of(self, x: torch.Tensor) -> torch.Tensor:
        u = _unit(x)
        return torch.stack([b.from_unit(u[i]) for i, b in enumerate(self.bounds)])

    def prices(self, theta: torch.Tensor) -> torch.Tensor:
        return self.price(theta).to(torch.float64)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return (self.prices(self.theta_of(x)) - self.quotes.price) / self.quotes.vega

    def jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.residual(x)
        cols = []
        for j in range(self.p):
            xj = x.clone()
            xj[j] += self.step
            cols.append((self.residual(xj) - r) / self.step)
        self.evaluations += self.p + 1
        return r, torch.stack(cols, dim=1)


def _levenberg_marquardt(
    fit: _Problem,
    x: torch.Tensor,
    max_iterations: int,
    tolerance: float,
    on_iteration: Callable[[int, int], None] | None,
) -> tuple[torch.Tensor, int, bool, list[float]]:
    """The damped Gauss-Newton loop from ``x``: the solution, iterations, converged, and
    the sum of squares after each accepted step."""
    r, jac = fit.jacobian(x)
    cost = float(r @ r)
    history = [cost]
    lam = 1e-3
    iterations = 0
    while iterations < max_iterations:
        if on_iteration is not None:
            on_iteration(iterations, fit.evaluations)
        iterations += 1
        a = jac.T @ jac
        g = jac.T @ r
        diag = torch.diag(a).clamp(min=1e-12)
        try:
            step = torch.linalg.solve(a + lam * torch.diag(diag), -g)
        except RuntimeError:  # singular even with damping: damp harder
            lam *= 10.0
            continue
        x_new = x + step
        with torch.no_grad():
            r_new = fit.residual(x_new)
        fit.evaluations += 1
        cost_new = float(r_new @ r_new)
        if math.isfinite(cost_new) and cost_new < cost:
            gain = (cost - cost_new) / max(cost, 1e-300)
            x = x_new
            r, jac = fit.jacobian(x)
            cost = float(r @ r)
            history.append(cost)
            lam = max(lam / 3.0, 1e-12)
            if gain < tolerance or float(step.abs().max()) < 1e-7 or cost < 1e-24:
                return x, iterations, True, history
        else:
            lam *= 4.0
            if lam > 1e12:  # no descent direction left: a (local) minimum
                return x, iterations, True, history
    return x, iterations, False, history


def _screen(fit: _Problem, xs: list[torch.Tensor]) -> int:
    """The index of the start with the least sum of squares (one pricing each; a start
    whose prices are not finite loses)."""
    if len(xs) == 1:
        return 0
    costs = []
    for x in xs:
        with torch.no_grad():
            r = fit.residual(x)
        fit.evaluations += 1
        c = float(r @ r)
        costs.append(c if math.isfinite(c) else math.inf)
    return min(range(len(xs)), key=costs.__getitem__)


def _run(
    fit: _Problem,
    names: tuple[str, ...],
    quotes: Quotes,
    bounds: tuple[ParameterRange, ...],
    start: Start | Sequence[Start],
    max_iterations: int,
    tolerance: float,
    on_iteration: Callable[[int, int], None] | None,
    t0: float,
) -> CalibrationResult:
    starts = [start] if isinstance(start, Mapping) else list(start)
    if not starts:
        raise CalibrationError("no start given")
    xs = [
        torch.tensor([_to_x(s[nm], b) for nm, b in zip(names, bounds, strict=True)], dtype=torch.float64)
        for s in starts
    ]
    best = _screen(fit, xs)
    x, iterations, converged, history = _levenberg_marquardt(fit, xs[best], max_iterations, tolerance, on_iteration)
    theta = fit.theta_of(x).detach()
    with torch.no_grad():
        price = fit.prices(theta)
    res = (price - quotes.price) / quotes.vega
    return CalibrationResult(
        params={nm: float(theta[i]) for i, nm in enumerate(names)},
        model_price=price,
        residual=res,
        rmse_vol=float(res.square().mean().sqrt()),
        iterations=iterations,
        evaluations=fit.evaluations,
        seconds=time.perf_counter() - t0,
        converged=converged,
        start=dict(starts[best]),
        history=history,
    )


def calibrate(
    cf: CFFunction,
    process: Process,
    spectrum: SpectrumConfig,
    quotes: Quotes,
    bounds: tuple[ParameterRange, ...],
    start: Start | Sequence[Start],
    *,
    max_iterations: int = 100,
    tolerance: float = 1e-4,
    tangents: TangentCF | None = None,
    on_iteration: Callable[[int, int], None] | None = None,
) -> CalibrationResult:
    """Levenberg-Marquardt fit of ``process``'s parameters (named by ``bounds``, in the
    process's order) to ``quotes``; stops when a step improves the sum of squares by
    less than ``tolerance`` relative, or after ``max_iterations`` accepted or rejected
    steps. ``start`` is one start or several: several are screened by their sum of
    squares (one CF evaluation each, counted in ``evaluations``) and the fit runs from
    the best, which the result reports as its ``start``. ``tangents``, where given,
    supplies the CF's derivatives in one pass (the learned network's); otherwise they
    come from ``torch.func.jacfwd`` through ``cf``. ``on_iteration(iterations,
    evaluations)``, where given, is called before each step with the counts so far; an
    exception it raises stops the fit (a deadline, a pause point for a caller that runs
    the fit in slices)."""
    t0 = time.perf_counter()
    names = process.param_names
    _check_quotes(quotes, names, bounds)
    fit = _Fit(cf, process, spectrum, quotes, bounds, tangents)
    return _run(fit, names, quotes, bounds, start, max_iterations, tolerance, on_iteration, t0)


def calibrate_prices(
    price: PriceFunction,
    names: tuple[str, ...],
    quotes: Quotes,
    bounds: tuple[ParameterRange, ...],
    start: Start | Sequence[Start],
    *,
    max_iterations: int = 100,
    tolerance: float = 1e-4,
    step: float = 1e-3,
    on_iteration: Callable[[int, int], None] | None = None,
) -> CalibrationResult:
    """:func:`calibrate` through a pricer that gives prices only: ``price(theta)`` (P,)
    -> the quotes' normalised out-of-the-money prices (n,), like ``Quotes.price``. The
    Jacobian is forward differences of ``step`` in the unconstrained coordinates (P + 1
    pricings per iteration, counted in ``evaluations``); a Monte Carlo pricer must use
    the same random numbers at every call."""
    t0 = time.perf_counter()
    _check_quotes(quotes, names, bounds)
    fit = _PriceFit(price, quotes, bounds, step)
    return _run(fit, names, quotes, bounds, start, max_iterations, tolerance, on_iteration, t0)


def heston_start(quotes: Quotes, bounds: tuple[ParameterRange, ...]) -> dict[str, float]:
    """A sensible Heston start from the surface: v0 from the shortest expiry's
    at-the-money vol, theta from the longest's, rho from the sign and size of the
    short-end skew, kappa = 1.5 and xi = 0.5; each clamped inside its bound."""
    t = quotes.expiry
    atm = quotes.log_moneyness.abs()

    def atm_var(mask: torch.Tensor) -> float:
        idx = torch.nonzero(mask).flatten()
        best = idx[torch.argmin(atm[idx])]
        return float(quotes.vol[best]) ** 2

    short, long_ = t == t.min(), t == t.max()
    idx = torch.nonzero(short).flatten()
    slope = 0.0
    if len(idx) >= 2:
        k, v = quotes.log_moneyness[idx], quotes.vol[idx]
        kc = k - k.mean()
        slope = float((kc * (v - v.mean())).sum() / kc.square().sum().clamp(min=1e-12))
    guess = {
        "v0": atm_var(short),
        "kappa": 1.5,
        "theta": atm_var(long_),
        "xi": 0.5,
        "rho": max(-0.9, min(0.5, slope * 3.0)),
    }
    out = {}
    for b in bounds:
        margin = 0.02 * (b.high - b.low)
        out[b.name] = min(max(guess[b.name], b.low + margin), b.high - margin)
    return out


def _clamped(guess: Mapping[str, float], bounds: tuple[ParameterRange, ...]) -> dict[str, float]:
    """Each guess moved inside its bound, 2% of the range from either end."""
    out = {}
    for b in bounds:
        margin = 0.02 * (b.high - b.low)
        out[b.name] = min(max(guess[b.name], b.low + margin), b.high - margin)
    return out


@dataclass(frozen=True)
class Smile:
    """One expiry's smile near the money: the at-the-money vol and skew d vol / d log(K/F)
    (None with a single strike), from a local quadratic in log(K/F)."""

    expiry: float
    atm_vol: float
    skew: float | None


def smiles(quotes: Quotes) -> list[Smile]:
    """Per distinct expiry (ascending): a least-squares quadratic (linear with two
    strikes) in k = log(K/F) through the quotes within 1.5 standard deviations of the
    money (vol sqrt(T) at the quote nearest it), at least the three nearest."""
    out = []
    for t in torch.unique(quotes.expiry).tolist():
        idx = torch.nonzero(quotes.expiry == t).flatten()
        k, v = quotes.log_moneyness[idx], quotes.vol[idx]
        near = torch.argsort(k.abs())
        sd = float(v[near[0]]) * math.sqrt(t)
        window = (k.abs() <= 1.5 * sd).nonzero().flatten()
        if len(window) < 3:
            window = near[:3]
        ks, vs = k[window].tolist(), v[window].tolist()
        if len(ks) == 1:
            out.append(Smile(t, vs[0], None))
            continue
        level, slope = _polyfit(ks, vs, min(2, len(ks) - 1))
        out.append(Smile(t, level, slope))
    return out


def _polyfit(x: list[float], y: list[float], degree: int) -> tuple[float, float]:
    """The constant and linear coefficients of the least-squares polynomial of
    ``degree`` (1 or 2) through (x, y), by its normal equations in plain floats (the
    same bits on every call, which LAPACK's lstsq does not promise: a start, and so a
    stored fit, must not change from one run to the next)."""
    n = degree + 1
    a = [[sum(xi ** (r + c) for xi in x) for c in range(n)] for r in range(n)]
    b = [sum(yi * xi**r for xi, yi in zip(x, y, strict=True)) for r in range(n)]
    for col in range(n):  # Gauss-Jordan with partial pivoting
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        if a[col][col] == 0.0:
            return sum(y) / len(y), 0.0  # all x equal: no slope to read
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [ar - f * ac for ar, ac in zip(a[r], a[col], strict=True)]
                b[r] -= f * b[col]
    return b[0] / a[0][0], b[1] / a[1][1]


def variance_swap(quotes: Quotes, expiry: float, points: int = 2001) -> float:
    """The variance swap's fair variance at ``expiry`` from its smile: (2 / T) times the
    integral of the out-of-the-money price over K / F against d(K/F) / (K/F)^2 =
    -2 E[log(S_T / F)] / T (Carr and Madan), on about ``points`` log-strikes across 6 standard
    deviations either side of the money, the vol linear in log(K/F) between the quotes
    and flat beyond them (the trapezoid rule, a node at the money where the integrand's
    slope jumps). For a model with E[int V dt] = xi0 T it is xi0."""
    idx = torch.nonzero(quotes.expiry == expiry).flatten()
    k, v = quotes.log_moneyness[idx], quotes.vol[idx]
    order = torch.argsort(k)
    k, v = k[order], v[order]
    half = 6.0 * float(v.max()) * math.sqrt(expiry)
    lo, hi = min(-half, float(k[0])), max(half, float(k[-1]))
    half_points = points // 2 + 1  # each side of the node at the money
    below = torch.linspace(lo, 0.0, half_points, dtype=torch.float64)
    grid = torch.cat([below, torch.linspace(0.0, hi, half_points, dtype=torch.float64)[1:]])
    pos = torch.searchsorted(k, grid).clamp(1, max(len(k) - 1, 1))
    if len(k) == 1:
        vol = v.expand_as(grid)
    else:
        k0, k1, v0, v1 = k[pos - 1], k[pos], v[pos - 1], v[pos]
        w = ((grid - k0) / (k1 - k0)).clamp(0.0, 1.0)
        vol = v0 + w * (v1 - v0)
    otm = Quotes.from_vols(torch.full_like(grid, expiry), grid, vol).price
    integrand = otm * torch.exp(-grid)
    step = grid[1:] - grid[:-1]
    return float(2.0 / expiry * (0.5 * (integrand[1:] + integrand[:-1]) * step).sum())


def rbergomi_starts(quotes: Quotes, bounds: tuple[ParameterRange, ...]) -> list[dict[str, float]]:
    """Rough Bergomi starts from the surface, the heuristic's own first.

    xi0 is the shortest expiry's variance swap variance (:func:`variance_swap`:
    E[int_0^T V dt] = xi0 T for a flat forward variance; the at-the-money variance lies
    well below it where eta is large, and a longer expiry's strikes cover less of its
    distribution). The short-time at-the-money skew of rough Bergomi is (Bayer, Friz and Gatheral 2016)

      d vol / d log(K/F) ~ rho eta sqrt(2H) / (2 (H + 1/2) (H + 3/2)) T^(H - 1/2),

    so a straight line through log|skew| against log T over the expiries gives H as 1/2
    plus its slope and rho eta from its level (with one expiry H = 0.1). The skew fixes
    only the product: the heuristic takes rho = -0.7 and eta = rho eta / rho, and the
    other starts split the same product at rho = -0.9, -0.5, -0.3 and halve or double H
    (the fit screens them by their errors and runs from the best). Each is clamped
    inside its bound."""
    found = smiles(quotes)
    xi0 = variance_swap(quotes, found[0].expiry)
    skews = [(s.expiry, -s.skew) for s in found if s.skew is not None and s.skew < 0]
    hurst = 0.1
    level = 0.05  # |skew| at T = 1 when the surface shows none
    if len(skews) >= 2:
        level_log, slope = _polyfit([math.log(t) for t, _ in skews], [math.log(s) for _, s in skews], 1)
        hurst = 0.5 + slope
        level = math.exp(level_log)
    elif skews:
        t, s = skews[0]
        level = s * t ** (0.5 - hurst)
    h_bound = next(b for b in bounds if b.name == "H")
    hurst = min(max(hurst, h_bound.low * 1.4), h_bound.high * 0.96)

    def point(h: float, rho: float) -> dict[str, float]:
        rho_eta = level * 2.0 * (h + 0.5) * (h + 1.5) / math.sqrt(2.0 * h)
        return _clamped({"H": h, "eta": rho_eta / abs(rho), "rho": rho, "xi0": xi0}, bounds)

    out: list[dict[str, float]] = []
    for h in (hurst, hurst / 2.0, hurst * 2.0):
        for rho in (-0.7, -0.9, -0.5, -0.3):
            p = point(h, rho)
            if p not in out:
                out.append(p)
    return out


def rbergomi_start(quotes: Quotes, bounds: tuple[ParameterRange, ...]) -> dict[str, float]:
    """The rough Bergomi heuristic start (:func:`rbergomi_starts`' first)."""
    return rbergomi_starts(quotes, bounds)[0]
