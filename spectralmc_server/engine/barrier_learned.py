"""Barrier prices from a learned defective characteristic function.

A barrier model (a CFModel of a defective process, engine/processes/gbm_barrier.py)
gives, per (theta, T), the defective CF of Y = X / s on the grid w_k and the share mass
M_S = E[e^X 1{survived}]. With m = phi_Y(0) = P(survived) and kappa = K / F:

    out put  / (D F) = E[(kappa - e^X)^+ 1{survived}]      COS on the defective density,
    out call / (D F) = out put / (D F) + M_S - kappa m      parity on the surviving paths,

where COS integrates the put's payoff over [-L, y*] only (engine/cos.py), so it never
needs the density's tails. A strike beyond the COS range is priced from the masses
alone: below -L the put is 0; above L it is kappa m - M_S. Calls come by parity because
a call integrated by COS weights the density's right tail by e^{sY}, which amplifies
the learned density's small errors there (the vanilla's reason too, engine/cos.py).

Knock-ins are priced by in-out parity against the vanilla of the same contract,
``in = vanilla - out(0) + R D P``, so in + out = vanilla + R D exactly; a rebate R is
paid at expiry: out(R) = out(0) + R D (1 - P), P = m.
"""

from __future__ import annotations

import torch

from spectralmc_server.engine.barrier_mc import BarrierBatch
from spectralmc_server.engine.cos import CosExpansion
from spectralmc_server.engine.cvnn import CFModel
from spectralmc_server.engine.pricer import invariant_cf
from spectralmc_server.engine.processes.gbm_barrier import barrier_distance, barrier_params
from spectralmc_server.engine.processes.gbm_barrier_discrete import MAX_DATES
from spectralmc_server.engine.processes.heston_barrier import heston_barrier_theta


def defective_puts(
    phi_ext: torch.Tensor, model: CFModel, s: torch.Tensor, log_kappa: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Normalised knock-out prices for strikes log(K/F) = log_kappa (B, J).

    ``phi_ext`` (B, K + 1) is the model's output (the defective CF, then the share mass
    M_S); ``s`` (B,) the spread. Keys: put and call (B, J), each over D F; mass (B,),
    the survival probability; share (B,), M_S.
    """
    k = model.spectrum.n_freq
    if phi_ext.shape[1] != k + 1:
        raise ValueError(f"a defective model's output is (B, {k + 1}), got {tuple(phi_ext.shape)}")
    phi, share = phi_ext[:, :k], phi_ext[:, k].real
    mass = phi[:, 0].real
    half_width = model.spectrum.half_width
    put_in_range = CosExpansion(phi, model.spectrum).put_terms(s, log_kappa, frozenset({"put"}))["put"]
    kappa = torch.exp(log_kappa)
    ystar = log_kappa / s[:, None]
    put_above = kappa * mass[:, None] - share[:, None]
    put = torch.where(ystar >= half_width, put_above, put_in_range)  # put_terms gives 0 below -L
    call = put + share[:, None] - kappa * mass[:, None]
    return {"put": put, "call": call, "mass": mass, "share": share}


def law_params(model: CFModel, batch: BarrierBatch) -> torch.Tensor:
    """The barrier law's theta for each row of ``batch``, checking that the law covers the
    rows' process and monitoring: ``gbm_barrier`` (GBM, continuous), ``gbm_barrier_discrete``
    (GBM, 1 to MAX_DATES dates) or ``heston_barrier`` (Heston, continuous)."""
    name = model.process.name
    if name == "heston_barrier":
        if any(m != "continuous" for m in batch.monitoring):
            raise ValueError("the heston_barrier model prices continuous monitoring only")
        if batch.theta.shape[1] != 5:
            raise ValueError(f"the heston_barrier model needs Heston's 5 parameters a row, got {batch.theta.shape[1]}")
        return heston_barrier_theta(batch.theta, batch.drift, batch.spot, batch.level, batch.expiry)
    if name == "gbm_barrier":
        if any(m != "continuous" for m in batch.monitoring):
            raise ValueError("the gbm_barrier model prices continuous monitoring only")
    elif name == "gbm_barrier_discrete":
        if any(isinstance(m, str) or not 1 <= m <= MAX_DATES for m in batch.monitoring):
            raise ValueError(f"the gbm_barrier_discrete model prices 1 to {MAX_DATES} monitoring dates only")
    else:
        raise ValueError(f"need a barrier law (gbm_barrier, gbm_barrier_discrete, heston_barrier), got {name!r}")
    vol = batch.theta[:, 0]
    theta = barrier_params(vol, batch.drift, barrier_distance(batch.spot, batch.level, vol, batch.expiry))
    if name == "gbm_barrier_discrete":
        dates = torch.tensor([float(m) for m in batch.monitoring], dtype=theta.dtype, device=theta.device)
        theta = torch.cat([theta, dates.reshape(-1, 1)], 1)
    return theta


def learned_barrier_prices(model: CFModel, batch: BarrierBatch, vanilla: torch.Tensor) -> dict[str, torch.Tensor]:
    """Prices (B,) of a batch of barrier options from a barrier law (:func:`law_params`:
    GBM continuous or on 1 to MAX_DATES dates, Heston continuous); ``vanilla`` (B,) the
    same contracts' vanilla prices, which the knock-ins are built from by in-out parity.
    Keys: price, survival (P), knock_out (out(0)). Differentiable in every tensor of the
    batch (Greeks by autograd), and batch-invariant: the network sees blocks of 64 rows
    (``pricer.invariant_cf``).

    The barrier's distance is clamped to the model's MAX_DISTANCE (engine/processes/
    gbm_barrier.py); the domain's other bounds are the caller's to check.
    """
    theta = law_params(model, batch)
    s = model.process.scale(theta, batch.expiry)
    log_kappa = torch.log(batch.strike / batch.forward)[:, None]
    terms = defective_puts(invariant_cf(model, theta, batch.expiry), model, s, log_kappa)
    scale = batch.discount * batch.forward
    out0 = scale * torch.where(batch.is_call, terms["call"][:, 0], terms["put"][:, 0])
    survival = terms["mass"]
    rebate = batch.rebate * batch.discount
    price = torch.where(batch.is_in, vanilla - out0 + rebate * survival, out0 + rebate * (1.0 - survival))
    return {"price": price, "survival": survival, "knock_out": out0}


__all__ = ["defective_puts", "law_params", "learned_barrier_prices"]
