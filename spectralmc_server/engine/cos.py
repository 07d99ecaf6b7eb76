"""From a characteristic function to answers: the COS method (Fang & Oosterlee 2008).

Everything is done for Y = X / s on [a, b] = [-L, L], where the CF is known at exactly
the COS frequencies w_k = k pi / (2L). The density of Y is approximated by

    f_Y(y) = sum'_k A_k cos(w_k (y + L)),   A_k = Re(phi_Y(w_k) exp(i w_k L)) / L,

(the prime halves the k = 0 term). Integrals of the payoff against each cosine are
closed forms, so one CF evaluation prices every strike of one (theta, T):

    P(Y < y)              = sum' A_k psi_k(y),  psi_k(y) = int_{-L}^{y} cos(w_k (t + L)) dt
    E[e^{sY}; Y < y]      = sum' A_k chi_k(y),  chi_k(y) = int_{-L}^{y} e^{st} cos(w_k (t + L)) dt
    put / (D F)           = kappa P(Y < y*) - E[e^{sY}; Y < y*],  y* = log(kappa) / s,
                            kappa = K / F.

Calls come from put-call parity (the COS call is unstable). The put payoff is only
integrated over [-L, min(y*, L)]: a strike beyond the range is priced as 0 (below) or
kappa - 1 (above, using E[e^X] = 1), never from the periodic extension.

All routines work in float64 on tensors shaped (B, ...) with one row per (theta, T).
"""

from __future__ import annotations

import functools

import torch

from spectralmc_server.engine.spectrum import SpectrumConfig


def cos_coefficients(phi_y: torch.Tensor, spectrum: SpectrumConfig) -> torch.Tensor:
    """A_k = Re(phi_Y(w_k) e^{i w_k L}) / L with the k = 0 term halved, (B, K) float64.

    e^{i w_k L} = i^k exactly, so the rotation is a choice of +-Re or +-Im per k.
    """
    if phi_y.dim() != 2 or phi_y.shape[1] != spectrum.n_freq:
        raise ValueError(f"phi_y must be (B, {spectrum.n_freq}), got {tuple(phi_y.shape)}")
    re, im = phi_y.real.to(torch.float64), phi_y.imag.to(torch.float64)
    k = torch.arange(spectrum.n_freq, device=phi_y.device) % 4
    a = torch.where(k == 0, re, torch.where(k == 1, -im, torch.where(k == 2, -re, im)))
    scale = torch.full((spectrum.n_freq,), 1.0 / spectrum.half_width, dtype=torch.float64, device=phi_y.device)
    scale[0] *= 0.5
    return a * scale


class CosExpansion:
    """Cosine coefficients of the density of Y for a batch of CFs."""

    def __init__(self, phi_y: torch.Tensor, spectrum: SpectrumConfig) -> None:
        self._setup(cos_coefficients(phi_y, spectrum), spectrum)

    @classmethod
    def from_coefficients(cls, coef: torch.Tensor, spectrum: SpectrumConfig) -> CosExpansion:
        """An expansion from precomputed :func:`cos_coefficients` (B, K)."""
        self = cls.__new__(cls)
        self._setup(coef, spectrum)
        return self

    def _setup(self, coef: torch.Tensor, spectrum: SpectrumConfig) -> None:
        self.spectrum = spectrum
        self.half_width = spectrum.half_width
        self.w = spectrum.frequencies(dtype=torch.float64, device=coef.device)  # (K,)
        self.coef = coef  # (B, K)
        k = spectrum.n_freq
        self._block = max(1, round(k**0.5))  # trig of k = block * hi + lo from two small tables
        self._inv_w = torch.cat([torch.zeros(1, dtype=torch.float64, device=coef.device), 1.0 / self.w[1:]])

    @property
    def batch(self) -> int:
        return int(self.coef.shape[0])

    # -- building blocks: y is (B, J), results (B, J) -----------------------------------
    def _trig(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of w_k (y + L) for all k, (B, J, K) each.

        With theta = (y + L) pi / (2L) the angle is k theta. Writing k = b*hi + lo, only
        the b + K/b angles lo*theta and hi*b*theta need cos/sin; the rest is one complex
        product per k (angle addition), a quarter of the transcendental work.
        """
        b = self._block
        n_hi = -(-self.spectrum.n_freq // b)
        theta = ((y + self.half_width) * float(self.w[1]))[..., None]  # (B, J, 1)
        lo = theta * torch.arange(b, dtype=torch.float64, device=y.device)  # (B, J, b)
        hi = theta * torch.arange(0, n_hi * b, b, dtype=torch.float64, device=y.device)  # (B, J, n_hi)
        c_lo, s_lo = torch.cos(lo)[..., None, :], torch.sin(lo)[..., None, :]  # (B, J, 1, b)
        c_hi, s_hi = torch.cos(hi)[..., :, None], torch.sin(hi)[..., :, None]  # (B, J, n_hi, 1)
        shape = (*y.shape, n_hi * b)
        c = (c_hi * c_lo - s_hi * s_lo).reshape(shape)[..., : self.spectrum.n_freq]
        s = (s_hi * c_lo + c_hi * s_lo).reshape(shape)[..., : self.spectrum.n_freq]
        return c, s

    def _sum(self, terms: torch.Tensor) -> torch.Tensor:
        """sum'_k A_k terms_k for terms (B, J, K) -> (B, J)."""
        return torch.einsum("bjk,bk->bj", terms, self.coef)

    def _psi(self, y: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """int_{-L}^{y} cos(w_k (t + L)) dt: sin/w_k, and y + L for k = 0."""
        psi = sin * self._inv_w
        psi[..., 0] = y + self.half_width
        return psi

    def density(self, y: torch.Tensor) -> torch.Tensor:
        """f_Y(y); 0 outside [-L, L]."""
        f = self._sum(self._trig(y)[0])
        return torch.where(y.abs() <= self.half_width, f, torch.zeros_like(f))

    def cdf(self, y: torch.Tensor) -> torch.Tensor:
        """P(Y < y) for y clamped to [-L, L] (0 below, total mass above)."""
        yc = y.clamp(-self.half_width, self.half_width)
        return self._sum(self._psi(yc, self._trig(yc)[1]))

    def partial_exp(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """E[exp(s Y); Y < y] with s (B,), y clamped to [-L, L]."""
        yc = y.clamp(-self.half_width, self.half_width)
        cos, sin = self._trig(yc)
        return self._sum(self._chi(yc, s, cos, sin, torch.exp(s[:, None] * yc)))

    def _chi(
        self, y: torch.Tensor, s: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, exp_sy: torch.Tensor
    ) -> torch.Tensor:
        """int_{-L}^{y} e^{st} cos(w_k (t + L)) dt, (B, J, K)."""
        sb = s[:, None, None]  # (B, 1, 1)
        upper = exp_sy[..., None] * (sb * cos + self.w * sin)
        lower = torch.exp(-sb * self.half_width) * sb
        return (upper - lower) / (sb * sb + self.w * self.w)

    # -- products ------------------------------------------------------------------------
    def put_terms(self, s: torch.Tensor, log_kappa: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised put quantities for strikes log(K/F) = log_kappa (B, J).

        Returns ``put`` = E[(kappa - e^X)^+], ``prob_below`` = P(X < log kappa),
        ``share_below`` = E[e^X; X < log kappa] and ``density`` = f_X(log kappa).
        """
        ystar = log_kappa / s[:, None]  # (B, J)
        below = ystar <= -self.half_width
        above = ystar >= self.half_width
        yc = ystar.clamp(-self.half_width, self.half_width)
        cos, sin = self._trig(yc)  # one set of cosines and sines serves all four sums
        kappa = torch.exp(log_kappa)
        # e^{s y*} = kappa inside the range; clamped strikes are overwritten below.
        exp_sy = torch.where(below | above, torch.exp(s[:, None] * yc), kappa)
        prob = self._sum(self._psi(yc, sin))
        share = self._sum(self._chi(yc, s, cos, sin, exp_sy))
        dens = self._sum(cos) / s[:, None]
        zero, one = torch.zeros_like(prob), torch.ones_like(prob)
        prob = torch.where(below, zero, torch.where(above, one, prob))
        share = torch.where(below, zero, torch.where(above, one, share))
        dens = torch.where(below | above, zero, dens)
        return {"put": kappa * prob - share, "prob_below": prob, "share_below": share, "density": dens}

    def quantile(self, levels: torch.Tensor, *, grid: int = 1024, newton_steps: int = 8) -> torch.Tensor:
        """y with P(Y < y) = level, levels (B, Q) in (0, 1).

        The CDF is tabulated on a fixed grid and made monotone (running maximum), the
        bracket found by search, then refined by Newton steps that fall back to
        bisection whenever they leave the bracket.
        """
        lw = self.half_width
        nodes, psi = _cdf_table(self.spectrum, grid, str(self.coef.device))  # (G+1,), (G+1, K)
        table = torch.cummax(self.coef @ psi.t(), dim=1).values.contiguous()  # (B, G+1)
        idx = torch.searchsorted(table, levels.contiguous()).clamp(1, grid)  # first table >= level
        lo, hi = nodes[idx - 1], nodes[idx]
        f_lo = torch.gather(table, 1, idx - 1)
        f_hi = torch.gather(table, 1, idx)
        frac = ((levels - f_lo) / (f_hi - f_lo).clamp(min=1e-300)).clamp(0.0, 1.0)
        y = lo + frac * (hi - lo)
        for _ in range(newton_steps):
            err = self.cdf(y) - levels
            lo = torch.where(err < 0, y, lo)
            hi = torch.where(err < 0, hi, y)
            dens = self.density(y)
            step = y - err / dens.clamp(min=1e-300)
            ok = (dens > 0) & (step >= lo) & (step <= hi)
            y = torch.where(ok, step, 0.5 * (lo + hi))
        return torch.where(levels <= 0, torch.full_like(y, -lw), torch.where(levels >= 1, torch.full_like(y, lw), y))

    def terminal_moments(self, s: torch.Tensor) -> dict[str, torch.Tensor]:
        """Moments of R = S_T / F - 1 = expm1(s Y) under the COS density, (B,) each.

        Gauss-Legendre quadrature in Y, so no raw-moment cancellation for small s.
        Accuracy falls with n s L (the weight e^{n s y} magnifies density error in the
        tails); see docs/method.md.
        """
        nodes, weights, cosm = _quadrature(self.spectrum, str(self.coef.device))  # (Q,), (Q,), (Q, K)
        f = self.coef @ cosm.t()  # (B, Q) density at the nodes
        # Where the series is below its own noise floor (measured by how far it dips
        # below zero, which a density cannot), its value is noise that e^{n s y} would
        # magnify: drop it. Tails lighter than the floor are then left out (a bias
        # towards lighter tails at large n s, reported in docs/method.md).
        floor = 10.0 * torch.clamp(-f.min(dim=1, keepdim=True).values, min=1e-300)
        f = torch.where(f > floor, f, torch.zeros_like(f))
        r = torch.expm1(s[:, None] * nodes)  # (B, Q)
        fw = f * weights
        e1 = (fw * r).sum(1)
        e2 = (fw * r**2).sum(1)
        e3 = (fw * r**3).sum(1)
        e4 = (fw * r**4).sum(1)
        var = e2 - e1 * e1
        m3 = e3 - 3 * e1 * e2 + 2 * e1**3
        m4 = e4 - 4 * e1 * e3 + 6 * e1 * e1 * e2 - 3 * e1**4
        # A density entirely below its own noise floor (an untrained or broken model)
        # has no variance: skew and kurtosis are then undefined (NaN, null in JSON).
        ok = var > 0
        safe = torch.where(ok, var, torch.ones_like(var))
        nan = torch.full_like(var, float("nan"))
        return {
            "mean": 1.0 + e1,
            "stdev": torch.sqrt(var.clamp(min=0.0)),
            "skew": torch.where(ok, m3 / (safe * torch.sqrt(safe)), nan),
            "kurtosis": torch.where(ok, m4 / (safe * safe) - 3.0, nan),
        }


@functools.lru_cache(maxsize=16)
def _cdf_table(spectrum: SpectrumConfig, grid: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    lw = spectrum.half_width
    nodes = torch.linspace(-lw, lw, grid + 1, dtype=torch.float64, device=device)  # (G+1,)
    w = spectrum.frequencies(device=torch.device(device))
    ang = (nodes + lw)[:, None] * w  # (G+1, K)
    psi = torch.where(w > 0, torch.sin(ang) / w.clamp(min=1e-300), (nodes + lw)[:, None].expand_as(ang))
    return nodes, psi


@functools.lru_cache(maxsize=16)
def _quadrature(spectrum: SpectrumConfig, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(256, 4 * spectrum.n_freq)
    x, wts = gauss_legendre(n)
    lw = spectrum.half_width
    nodes, weights = (lw * x).to(device), (lw * wts).to(device)
    cosm = torch.cos((nodes + lw)[:, None] * spectrum.frequencies(device=torch.device(device)))  # (Q, K)
    return nodes, weights, cosm


def gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights on [-1, 1] by Golub-Welsch (eigenvalues of the Jacobi matrix)."""
    k = torch.arange(1, n, dtype=torch.float64)
    off = k / torch.sqrt(4.0 * k * k - 1.0)
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vecs = torch.linalg.eigh(jacobi)
    weights = 2.0 * vecs[0, :] ** 2
    return nodes, weights
