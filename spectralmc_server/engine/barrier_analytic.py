"""Closed forms for single-barrier European options on GBM, continuously monitored.

The underlying follows dS = (r - q) S dt + sigma S dW under the risk-neutral measure,
the barrier at level L > 0 is watched continuously from now to expiry T, and:

* a knock-out pays the vanilla payoff at T if the barrier was never touched, else the
  rebate R **at expiry** (not at the hitting time);
* a knock-in pays the vanilla payoff at T if the barrier was touched, else R at expiry.

With P the risk-neutral probability that the barrier is not touched before T and
D = exp(-rT):  out(R) = out(0) + R D (1 - P),  in(R) = vanilla - out(0) + R D P, so
in(0) + out(0) = vanilla exactly; knock-ins are built by that parity, never by their own
formulas. A barrier already breached at spot (down: S <= L, up: S >= L) leaves a
knock-out worth R D and a knock-in worth the vanilla (P = 0).

out(0) is Reiner & Rubinstein (1991), "Breaking down the barriers", Risk 4(8), in the
notation of Haug, "The Complete Guide to Option Pricing Formulas" (2nd ed., section
4.17.1), terms A-D. Haug's rebate terms are not used: his F pays the knock-out rebate at
the hitting time; his E (the knock-in rebate at expiry) is R D P.

All inputs are float64 tensors broadcastable to one shape (B,); everything is vectorised
and differentiable (autograd Greeks), with no NaN at the edges (see ``MIN_TOTAL_VOL``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

BARRIER_KINDS: tuple[str, ...] = ("down-and-out", "up-and-out", "down-and-in", "up-and-in")
"""Barrier types; a type's per-row code is its index here (down: even, knock-in: >= 2)."""

MIN_TOTAL_VOL = 1e-12
"""Floor on the total volatility s = sigma sqrt(T). Below it (vol or expiry zero or
denormal) the formulas would divide by zero; flooring s changes a price by O(s S), i.e.
at most ~1e-12 of spot, and gives the deterministic limits (discounted intrinsic value,
survival 0 or 1) instead of NaN. Only s, s^2 and (r - q) T enter the formulas (never
sigma^2 or 1/T alone), so T = 0 is fine too."""

ZETA_HALF = -1.4603545088095868128894991525152980125
"""Riemann zeta(1/2) (OEIS A059750)."""

BGK_BETA = -ZETA_HALF / math.sqrt(2.0 * math.pi)
"""Broadie-Glasserman-Kou beta = -zeta(1/2) / sqrt(2 pi) = 0.5825971579390106...: the
expected overshoot of a Gaussian random walk over a level, in step standard deviations,
as the step goes to zero (Siegmund's constant)."""

_SQRT_HALF = math.sqrt(0.5)


def barrier_codes(kind: str | Sequence[str] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row integer codes (index into ``BARRIER_KINDS``) of ``kind``: one name for
    every row, one name per row, or codes already (returned as int64)."""
    if isinstance(kind, torch.Tensor):
        codes = kind.to(device=like.device, dtype=torch.int64)
        if codes.numel() and bool(((codes < 0) | (codes >= len(BARRIER_KINDS))).any()):
            raise ValueError(f"barrier codes must lie in 0..{len(BARRIER_KINDS) - 1}")
        return torch.broadcast_to(codes, like.shape)
    names = [kind] if isinstance(kind, str) else list(kind)
    unknown = sorted({n for n in names if n not in BARRIER_KINDS})
    if unknown:
        raise ValueError(f"unknown barrier type(s) {unknown}; expected one of {BARRIER_KINDS}")
    codes = torch.tensor([BARRIER_KINDS.index(n) for n in names], dtype=torch.int64, device=like.device)
    return torch.broadcast_to(codes, like.shape)


def is_call_mask(right: str | Sequence[str] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row bool (True: call) of ``right``: a bool tensor, "call"/"put", or one per row."""
    if isinstance(right, torch.Tensor):
        return torch.broadcast_to(right.to(device=like.device, dtype=torch.bool), like.shape)
    names = [right] if isinstance(right, str) else list(right)
    bad = sorted({n for n in names if n not in ("call", "put")})
    if bad:
        raise ValueError(f"unknown option right(s) {bad}; expected 'call' or 'put'")
    return torch.broadcast_to(torch.tensor([n == "call" for n in names], device=like.device), like.shape)


def _image(x: torch.Tensor, k: torch.Tensor, mt: torch.Tensor, s: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """The reflected ("image") term exp(-2 x mT / s^2) N(eta (-x - k + mT) / s).

    x = log(S/L), k = log(K/L) (0 for the barrier itself), mT the log-drift over [0, T]
    of the measure (cash: (r - q)T - s^2/2, share: (r - q)T + s^2/2), eta = +1 down,
    -1 up. This is Haug's (H/S)^{2 mu} N(eta y) with (H/S)^{2 mu} = exp(-2 x mT / s^2).
    Callers pass eta * x >= 0 (spot on the live side) and eta * k >= 0 (level on the
    live side), where the term is a probability-like number in [0, 1].

    Computed without the overflow of the naive product (for small s the power is huge
    and N tiny): with u = eta (-x - k + mT) / s and w = (x - k + mT) / s, completing the
    square gives  -2 x mT / s^2 - u^2 / 2 = -w^2 / 2 - 2 x k / s^2  (<= 0), so for u < 0
    the term is exp(-w^2/2 - 2xk/s^2) erfcx(-u / sqrt 2) / 2 (erfcx <= 1 there), and for
    u >= 0 the exponent -2 x mT / s^2 is itself <= 0. Both branches are fed clamped
    arguments so that the branch torch.where discards has no inf (whose zero gradient
    would still be NaN).
    """
    u = eta * (mt - x - k) / s
    w = (x - k + mt) / s
    neg = u < 0
    small = torch.exp(-0.5 * w * w - 2.0 * x * k / (s * s)) * 0.5 * torch.special.erfcx(-u.clamp(max=0.0) * _SQRT_HALF)
    large = torch.exp((-2.0 * x * mt / (s * s)).clamp(max=0.0)) * torch.special.ndtr(u.clamp(min=0.0))
    return torch.where(neg, small, large)


def _terms(
    down: torch.Tensor,
    is_call: torch.Tensor,
    spot: torch.Tensor,
    strike: torch.Tensor,
    level: torch.Tensor,
    expiry: torch.Tensor,
    rate: torch.Tensor,
    dividend: torch.Tensor,
    vol: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """out(0), vanilla, survival probability P and the knock-out digital, all broadcast.

    Haug's terms, each split into a share part (measure with drift (r-q)T + s^2/2,
    weighted phi S e^{-qT}) and a cash part (drift (r-q)T - s^2/2, weighted -phi K D),
    with phi = +1 call / -1 put, eta = +1 down / -1 up, x = log(S/L), k = log(K/L):
      A: N(phi (log(S/K) + mT) / s)      (the vanilla)
      B: N(phi (x + mT) / s)
      C: image(x, k, mT)                  (Haug's (H/S)^{2mu[+2]} N(eta y1 ...))
      D: image(x, 0, mT)
    out(0) by (Haug's table, rebate terms dropped):
      call down / put up ("payoff away from the barrier"):
          strike on the live side (K >= L down, K <= L up): A - C; else B - D
      put down / call up ("payoff towards the barrier"):
          strike on the live side: A - B + C - D; else 0
    The cash parts' combination is P(in the money at T and never touched); the same with
    A..D replaced by N(eta (x + mT)/s) - image(x, 0, mT) is P itself.
    """
    # The common shape by arithmetic: torch.broadcast_shapes is untyped in torch's stubs.
    shape = (spot * strike * level * expiry * rate * dividend * vol * down * is_call).shape
    spot, strike, level, expiry, rate, dividend, vol, down, is_call = (
        torch.broadcast_to(t, shape) for t in (spot, strike, level, expiry, rate, dividend, vol, down, is_call)
    )
    one = torch.ones_like(spot)
    eta = torch.where(down, one, -one)
    phi = torch.where(is_call, one, -one)
    s = (vol * torch.sqrt(expiry)).clamp(min=MIN_TOTAL_VOL)
    carry = (rate - dividend) * expiry
    mt_share, mt_cash = carry + 0.5 * s * s, carry - 0.5 * s * s
    disc = torch.exp(-rate * expiry)
    fwd_disc = spot * torch.exp(-dividend * expiry)

    x_raw = torch.log(spot / level)
    breached = eta * x_raw <= 0  # down: S <= L; up: S >= L
    x = torch.where(breached, eta, x_raw)  # any live-side spot: these rows are overwritten
    k = torch.log(strike / level)
    strike_live = eta * k >= 0
    k_live = torch.where(strike_live, k, torch.zeros_like(k))  # C is only used where the strike is live
    away = phi == eta
    # Coefficients of A, B, C, D in out(0).
    c_a = torch.where(strike_live, one, 0.0 * one)
    c_b = torch.where(away, torch.where(strike_live, 0.0 * one, one), torch.where(strike_live, -one, 0.0 * one))
    image_sign = torch.where(away, -one, one)  # C and D enter as -A, -B (away) or +A, +B (towards)
    c_c, c_d = image_sign * c_a, image_sign * c_b

    log_sk = torch.log(spot / strike)

    def combination(mt: torch.Tensor) -> torch.Tensor:
        a = torch.special.ndtr(phi * (log_sk + mt) / s)
        b = torch.special.ndtr(phi * (x + mt) / s)
        c = _image(x, k_live, mt, s, eta)
        d = _image(x, torch.zeros_like(x), mt, s, eta)
        total: torch.Tensor = c_a * a + c_b * b + c_c * c + c_d * d
        return total

    share, cash = combination(mt_share), combination(mt_cash)
    zero = torch.zeros_like(spot)
    out0 = torch.where(breached, zero, phi * (fwd_disc * share - strike * disc * cash))
    digital = torch.where(breached, zero, disc * cash)
    a_share = torch.special.ndtr(phi * (log_sk + mt_share) / s)
    a_cash = torch.special.ndtr(phi * (log_sk + mt_cash) / s)
    vanilla = phi * (fwd_disc * a_share - strike * disc * a_cash)
    survival = torch.special.ndtr(eta * (x + mt_cash) / s) - _image(x, zero, mt_cash, s, eta)
    survival = torch.where(breached, zero, survival.clamp(0.0, 1.0))
    return {"out0": out0, "vanilla": vanilla, "survival": survival, "digital": digital, "disc": disc}


def survival_probability(
    down: torch.Tensor,
    spot: torch.Tensor,
    level: torch.Tensor,
    expiry: torch.Tensor,
    rate: torch.Tensor,
    dividend: torch.Tensor,
    vol: torch.Tensor,
) -> torch.Tensor:
    """Risk-neutral probability that S never touches L in [0, T] (continuous monitoring).

    log(S_t / L) = x + nu t + sigma W_t with x = log(S/L), nu = r - q - sigma^2/2; by the
    reflection principle for Brownian motion with drift (e.g. Harrison, "Brownian Motion
    and Stochastic Flow Systems", 1.8; Haug's E term over D), with s = sigma sqrt(T) and
    eta = +1 for a down barrier (S > L), -1 for an up barrier (S < L):

        P = N(eta (x + nu T) / s) - exp(-2 nu x / sigma^2) N(eta (-x + nu T) / s).

    0 where the barrier is already breached (down: S <= L, up: S >= L). The second term is
    evaluated without overflow (see ``_image``); s is floored at ``MIN_TOTAL_VOL``.
    """
    is_call = torch.ones_like(down, dtype=torch.bool)
    return _terms(down, is_call, spot, level, level, expiry, rate, dividend, vol)["survival"]


def barrier_out_price(
    down: torch.Tensor,
    right: str | Sequence[str] | torch.Tensor,
    spot: torch.Tensor,
    strike: torch.Tensor,
    level: torch.Tensor,
    expiry: torch.Tensor,
    rate: torch.Tensor,
    dividend: torch.Tensor,
    vol: torch.Tensor,
    rebate: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Knock-out call/put price, rebate R paid at expiry on knock-out:

        out(R) = out(0) + R e^{-rT} (1 - P),

    out(0) by Reiner-Rubinstein / Haug's A-D terms (see ``_terms``), P from
    ``survival_probability``. ``down`` bool per row (False: up barrier); ``right`` a bool
    tensor (True: call) or "call"/"put" (one, or one per row). Breached rows: R e^{-rT}.
    """
    is_call = is_call_mask(right, torch.as_tensor(spot))
    t = _terms(down, is_call, spot, strike, level, expiry, rate, dividend, vol)
    return t["out0"] + rebate * t["disc"] * (1.0 - t["survival"])


def barrier_price(
    kind: str | Sequence[str] | torch.Tensor,
    right: str | Sequence[str] | torch.Tensor,
    spot: torch.Tensor,
    strike: torch.Tensor,
    level: torch.Tensor,
    expiry: torch.Tensor,
    rate: torch.Tensor,
    dividend: torch.Tensor,
    vol: torch.Tensor,
    rebate: torch.Tensor | float = 0.0,
) -> dict[str, torch.Tensor]:
    """Any of the four barrier types (``BARRIER_KINDS``: one name, one per row, or codes),
    rebate paid at expiry (to a knock-out that was knocked out; to a knock-in that never
    knocked in):

        out(R) = out(0) + R D (1 - P),      in(R) = vanilla - out(0) + R D P.

    Keys: price; vanilla (Black-Scholes-Merton, the same number as
    ``reference.black_scholes`` up to rounding); survival (P); knock_out (out(0)).
    """
    spot = torch.as_tensor(spot)
    codes = barrier_codes(kind, spot)
    is_call = is_call_mask(right, spot)
    down = codes % 2 == 0
    knock_in = codes >= 2
    t = _terms(down, is_call, spot, strike, level, expiry, rate, dividend, vol)
    out = t["out0"] + rebate * t["disc"] * (1.0 - t["survival"])
    into = t["vanilla"] - t["out0"] + rebate * t["disc"] * t["survival"]
    return {
        "price": torch.where(knock_in, into, out),
        "vanilla": t["vanilla"],
        "survival": t["survival"],
        "knock_out": t["out0"],
    }


def barrier_digital_survival(
    down: torch.Tensor,
    right: str | Sequence[str] | torch.Tensor,
    spot: torch.Tensor,
    strike: torch.Tensor,
    level: torch.Tensor,
    expiry: torch.Tensor,
    rate: torch.Tensor,
    dividend: torch.Tensor,
    vol: torch.Tensor,
) -> torch.Tensor:
    """Knock-out cash-or-nothing: e^{-rT} P(S_T beyond K on the option's side and the
    barrier never touched), i.e. the price of 1 paid at T under those conditions.

    It is the cash half of out(0) (Haug's A-D terms on the cash measure), and the strike
    sensitivity of the knock-out: d out / dK = -phi e^{-rT} P(ITM, alive) (the payoff
    vanishes at K, so only the indicator's weight remains). Breached rows: 0.
    """
    is_call = is_call_mask(right, torch.as_tensor(spot))
    return _terms(down, is_call, spot, strike, level, expiry, rate, dividend, vol)["digital"]


def bgk_shifted_level(
    level: torch.Tensor,
    vol: torch.Tensor,
    expiry: torch.Tensor,
    n: int | torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Broadie, Glasserman & Kou (1997), "A continuity correction for discrete barrier
    options", Math. Finance 7(4): a barrier watched at n equally spaced dates (T/n apart)
    is priced as a continuous one moved away from spot by exp(beta sigma sqrt(T/n)),

        L_down * exp(-beta sigma sqrt(T/n)),    L_up * exp(+beta sigma sqrt(T/n)),

    beta = -zeta(1/2)/sqrt(2 pi) ~ 0.5826 (``BGK_BETA``). The error is o(1/sqrt(n)); it
    is least accurate with the barrier very close to spot (within a few steps' stdev).
    """
    shift = BGK_BETA * vol * torch.sqrt(expiry / torch.as_tensor(n, dtype=torch.float64))
    return level * torch.exp(torch.where(down, -shift, shift))
