"""Complex-valued layers, activations and the characteristic-function network.

Complex tensors are carried *packed* as real tensors (..., 2n): the first n entries are
real parts, the last n imaginary parts. A complex linear layer is then one real GEMM
with the block matrix [[Wr^T, Wi^T], [-Wi^T, Wr^T]], and weights stay real float32
tensors that safetensors stores natively.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from spectralmc_server.engine.processes.base import ModelDomain, Process
from spectralmc_server.engine.spectrum import SpectrumConfig

Activation = Literal["modrelu", "csilu", "cardioid", "crelu"]


class NetworkConfig(BaseModel):
    """Shape of the CVNN and how its output becomes a CF."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(64, ge=2, le=4096)  # complex units per hidden layer
    depth: int = Field(3, ge=1, le=32)  # hidden complex layers
    activation: Activation = "csilu"  # split SiLU; modReLU, cardioid, CReLU also available
    # What the network's outputs are: the CF itself (cf) or its logarithm (log_cf, so
    # phi = exp(net) and |phi| decays without the net having to output tiny numbers).
    head: Literal["cf", "log_cf"] = "log_cf"
    # gaussian: add the log-CF (log_cf) or CF (cf) of the normal law with the model's
    # scale, exp(-i w s/2 - w^2/2), so the net learns a residual; none: no baseline.
    baseline: Literal["gaussian", "none"] = "none"


class ComplexLinear(nn.Module):
    """y = W x + b for complex W, x, b, on packed tensors (B, 2n) -> (B, 2m)."""

    def __init__(self, n_in: int, n_out: int, *, zero_init: bool = False) -> None:
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        # Complex He-style init: Var(W) = Var(Wr) + Var(Wi) = 1 / n_in.
        bound = math.sqrt(3.0 / (2.0 * n_in))
        scale = 0.0 if zero_init else bound
        self.weight_re = nn.Parameter((torch.rand(n_out, n_in) * 2.0 - 1.0) * scale)
        self.weight_im = nn.Parameter((torch.rand(n_out, n_in) * 2.0 - 1.0) * scale)
        self.bias_re = nn.Parameter(torch.zeros(n_out))
        self.bias_im = nn.Parameter(torch.zeros(n_out))
        self._cache: tuple[Any, torch.Tensor, torch.Tensor] | None = None  # see matrices()

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The real block matrix (2 n_in, 2 n_out) and the packed bias (2 n_out,).

        Frozen weights (no gradient wanted: serving, calibration) reuse the last build
        while the parameters are unchanged (same storage, same in-place version
        counters: an EMA update or load_state_dict invalidates it); weights that train
        are rebuilt on every call so autograd sees the graph.
        """
        params = (self.weight_re, self.weight_im, self.bias_re, self.bias_im)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._build()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        cached = self._cache
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable anywhere
                big, bias = self._build()
            cached = (key, big, bias)
            self._cache = cached
        return cached[1], cached[2]

    def _build(self) -> tuple[torch.Tensor, torch.Tensor]:
        wr, wi = self.weight_re.t(), self.weight_im.t()  # (n_in, n_out)
        big = torch.cat([torch.cat([wr, wi], 1), torch.cat([-wi, wr], 1)], 0)  # (2 n_in, 2 n_out)
        return big, torch.cat([self.bias_re, self.bias_im])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big, bias = self.matrices()
        return torch.addmm(bias, x, big)


def _split(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = z.shape[-1] // 2
    return z[..., :n], z[..., n:]


class ModReLU(nn.Module):
    """modReLU (Arjovsky et al. 2016): z * relu(|z| + b) / |z|, phase kept."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        re, im = _split(z)
        mod = torch.sqrt(re * re + im * im + 1e-12)
        gain = torch.relu(mod + self.bias) / mod
        return torch.cat([re * gain, im * gain], -1)


class SplitSiLU(nn.Module):
    """SiLU applied to real and imaginary parts separately."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(z)


class Cardioid(nn.Module):
    """Cardioid (Virtue et al. 2017): (1 + cos(arg z)) / 2 * z."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        re, im = _split(z)
        mod = torch.sqrt(re * re + im * im + 1e-12)
        gain = 0.5 * (1.0 + re / mod)
        return torch.cat([re * gain, im * gain], -1)


class CReLU(nn.Module):
    """ReLU applied to real and imaginary parts separately."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(z)


def make_activation(name: Activation, width: int) -> nn.Module:
    if name == "modrelu":
        return ModReLU(width)
    if name == "csilu":
        return SplitSiLU()
    if name == "cardioid":
        return Cardioid()
    return CReLU()


class CVNN(nn.Module):
    """Complex MLP: real inputs in [-1, 1] (imaginary part 0) -> n_out complex outputs."""

    def __init__(self, n_in: int, n_out: int, config: NetworkConfig) -> None:
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        layers: list[nn.Module] = []
        width_in = n_in
        for _ in range(config.depth):
            layers += [ComplexLinear(width_in, config.width), make_activation(config.activation, config.width)]
            width_in = config.width
        self.hidden = nn.Sequential(*layers)
        # A residual over a baseline starts at exactly zero, so an untrained
        # gaussian-baseline model is the normal law with the right scale.
        self.head = ComplexLinear(width_in, n_out, zero_init=config.baseline == "gaussian")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, n_in) real -> complex (B, n_out)."""
        packed = torch.cat([x, torch.zeros_like(x)], -1)  # (B, 2 n_in)
        out = self.head(self.hidden(packed))  # (B, 2 n_out)
        re, im = _split(out)
        return torch.complex(re, im)

    def supports_tangents(self) -> bool:
        return all(isinstance(m, ComplexLinear | SplitSiLU | CReLU) for m in self.hidden)

    def forward_with_tangents(self, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output and its derivatives along P input directions in one pass:
        x (B, n_in), dx (P, B, n_in) -> complex (B, n_out), (P, B, n_out).

        Forward-mode differentiation written out for the layers it supports (complex
        linear, split SiLU, CReLU): a few batched products instead of P autograd passes,
        which is what makes calibration through the network fast.
        """
        h = torch.cat([x, torch.zeros_like(x)], -1)  # (B, 2 n_in)
        t = torch.cat([dx, torch.zeros_like(dx)], -1)  # (P, B, 2 n_in)
        for layer in [*self.hidden, self.head]:
            if isinstance(layer, ComplexLinear):
                big, bias = layer.matrices()
                h = torch.addmm(bias, h, big)
                t = t @ big
            elif isinstance(layer, SplitSiLU):
                sig = torch.sigmoid(h)
                t = t * (sig * (1.0 + h * (1.0 - sig)))  # silu'(h)
                h = h * sig
            elif isinstance(layer, CReLU):
                t = t * (h > 0).to(t.dtype)
                h = torch.relu(h)
            else:
                raise NotImplementedError(f"no tangent rule for {type(layer).__name__}")
        re, im = _split(h)
        t_re, t_im = _split(t)
        return torch.complex(re, im), torch.complex(t_re, t_im)


class CFModel(nn.Module):
    """phi_Y(w_k | theta, T) for k = 0..K-1, with phi_Y(0) = 1 exactly.

    For a defective process (a barrier's survival weight w, Process.defective) phi_Y(0) =
    E[w] is learned too, and the output has one more column, K: the share mass E[e^X w]
    (real, positive), which prices calls by parity on the surviving paths
    (engine/barrier_learned.py).

    Inputs are mapped to [-1, 1] by the model's domain; the network's float32 output is
    combined with the baseline in float64, so the served CF is complex128.
    """

    def __init__(
        self,
        process: Process,
        domain: ModelDomain,
        spectrum: SpectrumConfig,
        network: NetworkConfig,
    ) -> None:
        super().__init__()
        self.process = process
        self.domain = domain
        self.spectrum = spectrum
        self.network_config = network
        # A defective law (a barrier's survival, Process.defective) learns phi(0) and one
        # more output, the share mass E[e^X w]; otherwise phi(0) = 1 is not learned.
        self.defective = process.defective
        first = 0 if self.defective else 1
        self.net = CVNN(domain.dims, spectrum.n_freq - first + int(self.defective), network)
        self.freqs: torch.Tensor
        self.register_buffer("freqs", spectrum.frequencies()[first:], persistent=False)  # float64

    def forward(self, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        """theta (B, P), T (B,) float64 -> phi_Y complex128 (B, K)."""
        x = self.domain.network_input(theta, expiry).to(torch.float32)
        out = self.net(x).to(torch.complex128)  # (B, K-1), or (B, K+1) when defective
        extra = None
        if self.defective:
            out, extra = out[:, :-1], out[:, -1:]
        freqs = self.freqs
        cfg = self.network_config
        if cfg.baseline == "gaussian":
            s = self.process.scale(theta, expiry).to(torch.float64)[:, None]  # (B, 1)
            log_base = torch.complex(-0.5 * freqs * freqs * torch.ones_like(s), -0.5 * freqs * s)
            phi = torch.exp(log_base + out) if cfg.head == "log_cf" else torch.exp(log_base) + out
        else:
            phi = torch.exp(out) if cfg.head == "log_cf" else out
        if extra is not None:  # phi(0) is learned; the share mass (real) follows it, over
            # the vanilla's 1 with a baseline
            if cfg.head == "log_cf":
                share = torch.exp(extra.real)
            else:
                share = extra.real + 1.0 if cfg.baseline == "gaussian" else extra.real
            return torch.cat([phi, share.to(phi.dtype)], 1)
        one = torch.ones(phi.shape[0], 1, dtype=phi.dtype, device=phi.device)
        return torch.cat([one, phi], 1)

    def supports_tangents(self) -> bool:
        return not self.defective and self.net.supports_tangents()

    def forward_with_tangents(
        self, theta: torch.Tensor, expiry: torch.Tensor, d_theta: torch.Tensor, d_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """phi_Y (B, K) and its derivatives (Q, B, K) along Q directions ``d_theta``
        (Q, B, P) of the parameters (expiry fixed); ``d_scale`` (Q, B) is the scale's
        derivative along the same directions (the Gaussian baseline depends on it)."""
        if self.defective:
            raise NotImplementedError("a defective model's derivatives are taken by autograd")
        x = self.domain.network_input(theta, expiry).to(torch.float32)
        dunit = torch.stack(
            [r.unit_derivative(theta[:, i]) for i, r in enumerate(self.domain.ranges[:-1])], 1
        )  # (B, P)
        dx = 2.0 * d_theta * dunit  # (Q, B, P)
        dx = torch.cat([dx, torch.zeros_like(dx[..., :1])], -1).to(torch.float32)  # expiry fixed
        out, d_out = self.net.forward_with_tangents(x, dx)
        out, d_out = out.to(torch.complex128), d_out.to(torch.complex128)
        freqs = self.freqs
        cfg = self.network_config
        if cfg.baseline == "gaussian":
            s = self.process.scale(theta, expiry).to(torch.float64)[:, None]  # (B, 1)
            log_base = torch.complex(-0.5 * freqs * freqs * torch.ones_like(s), -0.5 * freqs * s)
            d_log_base = torch.complex(torch.zeros_like(d_scale[..., None] * freqs), -0.5 * freqs * d_scale[..., None])
            if cfg.head == "log_cf":
                phi = torch.exp(log_base + out)
                d_phi = phi * (d_log_base + d_out)
            else:
                base = torch.exp(log_base)
                phi, d_phi = base + out, base * d_log_base + d_out
        elif cfg.head == "log_cf":
            phi = torch.exp(out)
            d_phi = phi * d_out
        else:
            phi, d_phi = out, d_out
        one = torch.ones(phi.shape[0], 1, dtype=phi.dtype, device=phi.device)
        return torch.cat([one, phi], 1), torch.cat([torch.zeros_like(d_phi[..., :1]), d_phi], -1)
