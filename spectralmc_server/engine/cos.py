"""From a characteristic function to answers: the COS method (Fang & Oosterlee 2008).

Everything is done for Y = X / s on [a, b] = [-L, L], where the CF is known at exactly
the COS frequencies w_k = k pi / (2L). The density of Y is approximated by

    f_Y(y) = sum'_k A_k cos(w_k (y + L)),   A_k = Re(phi_Y(w_k) exp(i w_k L)) / L,

(the prime halves the k = 0 term). Integrals of the payoff against each cosine are
closed forms, so one CF evaluation prices every strike of one (theta, T):

    P(Y < y)              = sum' A_k psi_k(y),  psi_k(y) = int_{-L}^{y} cos(w_k (t + L)) dt
    E[e^{sY}; Y < y]      = sum' A_k chi_k(y),  chi_k(y) = int_{-L}^{y} e^{st} cos(w_k (t + L)) dt
                          = sum' A_k [e^{sy} (s cos_k + w_k sin_k) - s e^{-sL}] / (s^2 + w_k^2)
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


PUT_TERMS = frozenset({"put", "prob_below", "share_below", "density"})


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

    # -- building blocks: y is (B, J), results (B, J) -----------------------------------
    def trig_sums(
        self, y: torch.Tensor, coefs: torch.Tensor, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """sum_k c_k cos(w_k (y + L)) and sum_k c_k sin(w_k (y + L)) for several
        coefficient vectors at once.

        y (N, J); coefs (R, C, K); ``rows`` (N,) picks each y-row's coefficient row
        (default: row n for y-row n). Returns two (N, J, C) tensors.

        With theta = (y + L) pi / (2L) the angle is k theta. Writing k = b hi + lo
        (b ~ sqrt(K)), cos(k theta) = cos(b hi theta) cos(lo theta) - sin(.) sin(.), so
        each sum is an inner sum over lo (one batched matrix product) and an outer sum
        over hi: 2 (b + K/b) cosines and sines per y instead of 2K, and no (N, J, K)
        temporaries.
        """
        b = self._block
        n_hi = -(-self.spectrum.n_freq // b)
        pad = n_hi * b - self.spectrum.n_freq
        if pad:
            coefs = torch.nn.functional.pad(coefs, (0, pad))
        r, c = coefs.shape[0], coefs.shape[1]
        n = y.shape[0]
        theta = ((y + self.half_width) * float(self.w[1]))[..., None]  # (N, J, 1)
        lo = theta * torch.arange(b, dtype=torch.float64, device=y.device)  # (N, J, b)
        hi = theta * torch.arange(0, n_hi * b, b, dtype=torch.float64, device=y.device)  # (N, J, n_hi)
        trig_lo = torch.cat([torch.cos(lo), torch.sin(lo)], 1)  # (N, 2J, b)
        coefs = coefs.reshape(r, c * n_hi, b)
        if rows is not None:
            coefs = coefs[rows]  # (N, C n_hi, b)
        inner = torch.bmm(coefs, trig_lo.transpose(1, 2))  # (N, C n_hi, 2J)
        inner = inner.view(n, c, n_hi, 2, -1).permute(0, 4, 3, 1, 2)  # (N, J, 2, C, n_hi)
        in_c, in_s = inner[:, :, 0], inner[:, :, 1]  # (N, J, C, n_hi): sums with cos(lo), sin(lo)
        c_hi, s_hi = torch.cos(hi)[:, :, None, :], torch.sin(hi)[:, :, None, :]  # (N, J, 1, n_hi)
        cos_sum = (c_hi * in_c - s_hi * in_s).sum(-1)
        sin_sum = (s_hi * in_c + c_hi * in_s).sum(-1)
        return cos_sum, sin_sum

    def density(self, y: torch.Tensor) -> torch.Tensor:
        """f_Y(y); 0 outside [-L, L]."""
        f = self.trig_sums(y, self.coef[:, None, :])[0][..., 0]
        return torch.where(y.abs() <= self.half_width, f, torch.zeros_like(f))

    def cdf(self, y: torch.Tensor) -> torch.Tensor:
        """P(Y < y) = sum' A_k psi_k(y), psi_k = sin(w_k (y + L)) / w_k (y + L for k = 0),
        for y clamped to [-L, L] (0 below, total mass above)."""
        yc = y.clamp(-self.half_width, self.half_width)
        sin_sum = self.trig_sums(yc, (self.coef * self._inv_w)[:, None, :])[1][..., 0]
        return self.coef[:, :1] * (yc + self.half_width) + sin_sum

    # -- products ------------------------------------------------------------------------
    def put_terms(
        self,
        s: torch.Tensor,
        log_kappa: torch.Tensor,
        need: frozenset[str] = PUT_TERMS,
        rows: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Normalised put quantities for strikes log(K/F) = log_kappa (N, J).

        ``put`` = E[(kappa - e^X)^+], ``prob_below`` = P(X < log kappa),
        ``share_below`` = E[e^X; X < log kappa], ``density`` = f_X(log kappa); only those
        in ``need`` are computed. ``s`` is (R,), one per expansion row, and ``rows`` (N,)
        maps strike rows to expansion rows (default: the identity), so many strikes can
        share one (theta, T) without copying its coefficients first.

        With B_k = A_k / (s^2 + w_k^2) the chi integrals fold into the put as

            put = kappa (A_0 (y* + L) + s^2 sum_{k>=1} B_k/w_k sin_k - s sum_k B_k cos_k)
                  + s e^{-sL} sum_k B_k,

        using e^{s y*} = kappa: two sums over K per strike.
        """
        lw = self.half_width
        s_rows = s if rows is None else s[rows]
        sb_rows = s_rows[:, None]  # (N, 1)
        ystar = log_kappa / sb_rows  # (N, J)
        below, above = ystar <= -lw, ystar >= lw
        yc = ystar.clamp(-lw, lw)
        kappa = torch.exp(log_kappa)
        zero, one = torch.zeros_like(ystar), torch.ones_like(ystar)
        a0 = self.coef[:, :1] if rows is None else self.coef[rows, :1]
        head = a0 * (yc + lw)  # k = 0 term of P(Y < y*)
        want_put = bool(need & {"put", "share_below"})
        want_prob = bool(need & {"prob_below", "share_below"})
        stack: list[torch.Tensor] = []
        if want_put:
            sb = s[:, None]  # (R, 1)
            bk = self.coef / (sb * sb + self.w * self.w)  # (R, K)
            stack += [bk, bk * self._inv_w]
            tail = sb * torch.exp(-sb * lw) * bk.sum(1, keepdim=True)  # (R, 1)
        if want_prob:
            stack.append(self.coef * self._inv_w)
        if "density" in need:
            stack.append(self.coef)
        cos_sum, sin_sum = self.trig_sums(yc, torch.stack(stack, 1), rows)  # (N, J, C)
        out: dict[str, torch.Tensor] = {}
        i = 0
        if want_put:
            tail_rows = tail if rows is None else tail[rows]
            inside = kappa * (head + sb_rows * sb_rows * sin_sum[..., 1] - sb_rows * cos_sum[..., 0]) + tail_rows
            out["put"] = torch.where(below, zero, torch.where(above, kappa - 1.0, inside))
            i = 2
        if want_prob:
            prob = head + sin_sum[..., i]
            out["prob_below"] = torch.where(below, zero, torch.where(above, one, prob))
            i += 1
        if "share_below" in need:
            out["share_below"] = kappa * out["prob_below"] - out["put"]  # 0 below, 1 above
        if "density" in need:
            out["density"] = torch.where(below | above, zero, cos_sum[..., i] / sb_rows)
        return {k: v for k, v in out.items() if k in need}

    def quantile(self, levels: torch.Tensor, *, grid: int = 1024, newton_steps: int = 8) -> torch.Tensor:
        """y with P(Y < y) = level, levels (B, Q) in (0, 1).

        The CDF is tabulated on a fixed grid and made monotone (running maximum), the
        bracket found by search, then refined by Newton steps that fall back to
        bisection whenever they leave the bracket.
        """
        lw = self.half_width
        nodes, psi = _cdf_table(self.spectrum, grid, str(self.coef.device))  # (G+1,), (G+1, K)
        table = torch.cummax(rowwise_matmul(self.coef, psi.t()), dim=1).values.contiguous()  # (B, G+1)
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

        Composite Gauss-Legendre quadrature in Y (:func:`composite_rule`), so no
        raw-moment cancellation for small s.
        Accuracy falls with n s L (the weight e^{n s y} magnifies density error in the
        tails); see docs/method.md.
        """
        nodes, weights, cosm = _quadrature(self.spectrum, str(self.coef.device))  # (Q,), (Q,), (Q, K)
        f = rowwise_matmul(self.coef, cosm.t())  # (B, Q) density at the nodes
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


ROW_CHUNK = 64
ROW_MAX_BLOCK = 4096


def rowwise_matmul(a: torch.Tensor, b: torch.Tensor, chunk: int = ROW_CHUNK) -> torch.Tensor:
    """``a @ b`` for a (B, K), in blocks of at most ``ROW_MAX_BLOCK`` rows whose row count
    is a multiple of ``chunk`` (the last padded with zeros): BLAS picks its kernel by
    shape, and a row's answer must not change with what it is batched with."""
    n = a.shape[0]
    if n == 0:
        return a @ b
    short = (-n) % chunk
    if short:
        a = torch.cat([a, a.new_zeros(short, a.shape[1])])
    out = torch.cat([a[i : i + ROW_MAX_BLOCK] @ b for i in range(0, a.shape[0], ROW_MAX_BLOCK)])
    return out[:n]


@functools.lru_cache(maxsize=16)
def _cdf_table(spectrum: SpectrumConfig, grid: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    lw = spectrum.half_width
    nodes = torch.linspace(-lw, lw, grid + 1, dtype=torch.float64, device=device)  # (G+1,)
    w = spectrum.frequencies(device=torch.device(device))
    ang = (nodes + lw)[:, None] * w  # (G+1, K)
    psi = torch.where(w > 0, torch.sin(ang) / w.clamp(min=1e-300), (nodes + lw)[:, None].expand_as(ang))
    return nodes, psi


QUADRATURE_PANEL_NODES = 32  # Gauss-Legendre nodes per panel of the composite rule


@functools.lru_cache(maxsize=16)
def _quadrature(spectrum: SpectrumConfig, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return composite_rule(spectrum, torch.device(device))


def composite_rule(spectrum: SpectrumConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nodes, weights and the cosine table (Q, K) of a composite Gauss-Legendre rule on
    [-L, L]: ``max(8, K / 8)`` equal panels of ``QUADRATURE_PANEL_NODES`` nodes each.

    The density is a cosine series whose highest frequency w_{K-1} ~ K pi / (2L) turns
    through at most 8 pi radians (4 periods) across one panel of width 16 L / K; a
    32-node rule is exact to degree 63, and its error for cos(omega t) on [-1, 1] with
    omega = 4 pi is below (omega / 2)^64 / 64! ~ 1e-38. So the rule is as exact as one
    4K-node rule, while its nodes cost one 32x32 eigenproblem instead of a (4K)^2 one
    (K = 2,048: 8,192^2, about 100 s on one core, on the compute thread).
    """
    panels = max(8, spectrum.n_freq // 8)
    x, wts = gauss_legendre(QUADRATURE_PANEL_NODES)  # (p,) on [-1, 1]
    lw = spectrum.half_width
    h = 2.0 * lw / panels
    centres = -lw + h * (torch.arange(panels, dtype=torch.float64) + 0.5)  # (M,)
    nodes = (centres[:, None] + 0.5 * h * x[None, :]).reshape(-1).to(device)  # (M p,)
    weights = (0.5 * h * wts).repeat(panels).to(device)  # (M p,)
    cosm = torch.cos((nodes + lw)[:, None] * spectrum.frequencies(device=device))  # (Q, K)
    return nodes, weights, cosm


def gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights on [-1, 1] by Golub-Welsch (eigenvalues of the Jacobi matrix)."""
    k = torch.arange(1, n, dtype=torch.float64)
    off = k / torch.sqrt(4.0 * k * k - 1.0)
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vecs = torch.linalg.eigh(jacobi)
    weights = 2.0 * vecs[0, :] ** 2
    return nodes, weights
