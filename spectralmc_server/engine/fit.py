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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from spectralmc_server.engine.cos import cos_coefficients
from spectralmc_server.engine.processes.base import ParameterRange, Process
from spectralmc_server.engine.spectrum import SpectrumConfig

CFFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (theta (B, P), T (B,)) -> phi_Y (B, K)
# (theta (B, P), T (B,), d_theta (Q, B, P), d_scale (Q, B)) -> phi_Y (B, K), d phi_Y (Q, B, K):
# a CF with its derivatives along Q parameter directions (CFModel.forward_with_tangents).
TangentCF = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
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


def _levenberg_marquardt(
    fit: _Fit,
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


def calibrate(
    cf: CFFunction,
    process: Process,
    spectrum: SpectrumConfig,
    quotes: Quotes,
    bounds: tuple[ParameterRange, ...],
    start: dict[str, float],
    *,
    max_iterations: int = 100,
    tolerance: float = 1e-4,
    tangents: TangentCF | None = None,
    on_iteration: Callable[[int, int], None] | None = None,
) -> CalibrationResult:
    """Levenberg-Marquardt fit of ``process``'s parameters (named by ``bounds``, in the
    process's order) to ``quotes``; stops when a step improves the sum of squares by
    less than ``tolerance`` relative, or after ``max_iterations`` accepted or rejected
    steps. ``tangents``, where given, supplies the CF's derivatives in one pass (the
    learned network's); otherwise they come from ``torch.func.jacfwd`` through ``cf``.
    ``on_iteration(iterations, evaluations)``, where given, is called before each step
    with the counts so far; an exception it raises stops the fit (a deadline, a pause
    point for a caller that runs the fit in slices)."""
    t0 = time.perf_counter()
    names = process.param_names
    _check_quotes(quotes, names, bounds)
    fit = _Fit(cf, process, spectrum, quotes, bounds, tangents)
    x = torch.tensor([_to_x(start[nm], b) for nm, b in zip(names, bounds, strict=True)], dtype=torch.float64)
    x, iterations, converged, history = _levenberg_marquardt(fit, x, max_iterations, tolerance, on_iteration)
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
        start=dict(start),
        history=history,
    )


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
