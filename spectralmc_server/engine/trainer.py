"""Online training of a CF model from Monte-Carlo batches.

Each step: B parameter points from a scrambled Sobol sequence over the model's domain
(reproducible by index), N paths per point with normals from the shared pool, the FFT
estimate of each point's CF as the target, one Adam step on the mean squared modulus
of the error, and an update of the exponential moving average (EMA) of the weights,
which is what is served. The learning rate follows warmup then cosine decay, a pure
function of the step. Every piece of state that the next step depends on (weights, EMA,
Adam moments, step, Sobol index, normals block index) is in the checkpoint, so N steps,
save, resume, N steps gives the same bits as 2N steps on the same device type.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spectralmc_server.engine.barrier_learned import defective_puts
from spectralmc_server.engine.checkpoint import RUN, Checkpoint, library_versions, run_facts, timed_history
from spectralmc_server.engine.cos import CosExpansion
from spectralmc_server.engine.cvnn import CFModel, NetworkConfig
from spectralmc_server.engine.device import (
    Budgets,
    DeviceName,
    MemoryBudget,
    live_tensor_bytes,
    module_tensors,
    resolve_device,
    tensor_bytes,
)
from spectralmc_server.engine.kernels import KernelPolicy, check_policy, kernel_policy
from spectralmc_server.engine.normals import NormalsConfig, NormalsMode, NormalsPool, sobol_engine
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.processes.base import ModelDomain, Process
from spectralmc_server.engine.reference import analytic_cf_y, conditional_cf_y, simulated_cf_y
from spectralmc_server.engine.spectrum import ControlCoefficient, SpectrumConfig

VALIDATION_STRIKES = tuple(0.7 + 0.05 * i for i in range(13))  # K/F in [0.7, 1.3]


def _with_moneyness(domain: ModelDomain) -> ModelDomain:
    """The domain as served: with the K/F range its prices are validated on."""
    if domain.moneyness is not None:
        return domain
    return domain.model_copy(update={"moneyness": (min(VALIDATION_STRIKES), max(VALIDATION_STRIKES))})


TRAINING_HOLDER = "trainer: weights, EMA, Adam moments, activations"
# The fields a fine-tuning phase may set (``spectralmc train --resume DIR --config F``):
# the optimiser's schedule and where the points are drawn, never the law learned, the
# network or the data streams. The CLI sets schedule_start and schedule_steps itself.
PHASE_FIELDS = ("lr", "lr_final_ratio", "warmup_steps", "ema_decay", "grad_clip", "focus", "validate_every")
VALIDATION_SEED = 2**31 + 7  # held-out Sobol scramble for validation points


class FocusBox(BaseModel):
    """A sub-box of the domain that receives a fixed share of every step's points: the
    last ``round(batch_points * share)`` points of each Sobol draw are mapped into it
    (its ranges in each parameter's own units, its other axes left whole). A region the
    uniform draw visits rarely (rough Bergomi's high vol of vol at long expiries is 0.7%
    of the box under the log scales) then gets the samples its harder law needs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ranges: dict[str, tuple[float, float]]
    share: float = Field(gt=0, lt=1)


class TrainConfig(BaseModel):
    """Everything that determines a training run's bits (plus the device type)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    process: str = "gbm"
    domain: ModelDomain | None = None  # None: the process's default domain
    spectrum: SpectrumConfig = SpectrumConfig()
    network: NetworkConfig = NetworkConfig()
    seed: int = Field(0, ge=0, lt=2**31)  # Sobol scramble for points; root of the normals stream
    batch_points: int = Field(256, ge=1)  # B: parameter points per step
    paths: int = Field(512, ge=2)  # N: paths per point
    normals_mode: NormalsMode = "sobol"
    antithetic: bool = True
    # Correct each CF target with a Gaussian companion driven by the same normals (the
    # process's companion_x), whose CF is known: see spectrum.control_variate_cf. The
    # coefficient: unit (unbiased) or a regression estimated from the same paths
    # (lower variance when the correlation is weak, but biased by O(1/paths)).
    control_variate: bool = False
    control_coefficient: ControlCoefficient = "unit"
    # mc: FFT estimates from simulated paths (the method). conditional: the mixed
    # estimate, the mean of X's conditional Gaussian CF given the variance driver's path
    # (a stochastic-volatility process with Process.has_conditional; reference.
    # conditional_cf_y): the same paths, less noise. exact: the analytic CF as the
    # target, a noise-free diagnostic that separates MC noise from fitting limits.
    targets: Literal["mc", "conditional", "exact"] = "mc"
    # A defective law's (a barrier's, Process.defective) loss weight on its two masses,
    # phi(0) = P(survived) and the share mass E[e^X w], over each frequency's weight of 1:
    # a price takes each mass with weight about 1, frequency k with about 1 / w_k^2.
    mass_weight: float = Field(1.0, gt=0)
    lr: float = Field(2e-3, gt=0)  # peak Adam learning rate
    lr_final_ratio: float = Field(0.02, gt=0, le=1)  # lr at the end of the cosine, over peak
    warmup_steps: int = Field(200, ge=0)
    schedule_steps: int = Field(10_000, ge=1)  # horizon of the cosine decay
    # The step at which the schedule's warmup starts: 0 for a run from scratch, the
    # resumed step for a fine-tuning phase (a warm restart of the cosine).
    schedule_start: int = Field(0, ge=0)
    # Where a share of each step's points is drawn (None: the whole domain, uniformly in
    # the domain's scales).
    focus: FocusBox | None = None
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)  # max global gradient norm
    validate_every: int = Field(250, ge=1)  # steps between validations
    validation_grid: int = Field(12, ge=2)  # points per axis of the validation grid
    # Points of a held-out scrambled Sobol set instead of the grid (a grid of 12 per axis
    # has 3 million points in Heston's 6 dimensions); None: the grid.
    validation_points: int | None = Field(None, ge=16, le=65536)
    device: DeviceName = "cpu"
    # Path simulation on CUDA: fused kernels (one launch over all steps, needs the gpu
    # extra) where available, or torch's per-step ops; 'fused' refuses to start without.
    kernels: KernelPolicy = "auto"

    @field_validator("process")
    @classmethod
    def _known_process(cls, v: str) -> str:
        get_process(v)  # raises naming the known processes
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        process = get_process(self.process)
        domain = self.resolved_domain()
        if domain.param_names != process.param_names:
            raise ValueError(
                f"domain parameters {domain.param_names} do not match process "
                f"{self.process!r} parameters {process.param_names}"
            )
        if self.control_variate and not process.has_companion:
            raise ValueError(f"control_variate needs a companion process, which {self.process!r} lacks")
        if self.targets == "conditional" and not process.has_conditional:
            raise ValueError(f"targets = 'conditional' needs a conditional Gaussian law, which {self.process!r} lacks")
        if self.targets == "conditional" and self.control_variate:
            raise ValueError("targets = 'conditional' takes no control_variate (set control_variate = false)")
        if self.targets == "exact" and not process.has_analytic_cf:
            raise ValueError(f"targets = 'exact' needs an analytic CF, which {self.process!r} lacks")
        if self.focus is not None:
            self._check_focus(self.focus, domain)
        return self

    def _check_focus(self, focus: FocusBox, domain: ModelDomain) -> None:
        ranges = {r.name: r for r in domain.ranges}
        if not focus.ranges:
            raise ValueError("focus.ranges: name at least one of " + ", ".join(ranges))
        for name, (low, high) in focus.ranges.items():
            if name not in ranges:
                raise ValueError(f"focus.ranges.{name}: not a domain axis (the axes: {', '.join(ranges)})")
            r = ranges[name]
            if not (r.low <= low < high <= r.high):
                raise ValueError(f"focus.ranges.{name}: need {r.low} <= low < high <= {r.high}, got [{low}, {high}]")
        if round(self.batch_points * focus.share) < 1:
            raise ValueError(f"focus.share: {focus.share} of {self.batch_points} points rounds to none")

    def resolved_domain(self) -> ModelDomain:
        return self.domain or get_process(self.process).default_domain()

    def lr_at(self, step: int) -> float:
        """Warmup, then cosine from lr to lr * lr_final_ratio at schedule_steps, then flat;
        counted from schedule_start."""
        step = max(step - self.schedule_start, 0)
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.schedule_steps - self.warmup_steps, 1)
        frac = min((step - self.warmup_steps) / span, 1.0)
        lo = self.lr * self.lr_final_ratio
        return lo + 0.5 * (self.lr - lo) * (1.0 + math.cos(math.pi * frac))

    def ema_decay_at(self, step: int) -> float:
        """EMA decay warmed up so early averages are not dominated by the random init."""
        return min(self.ema_decay, (1.0 + step) / (10.0 + step))


@dataclass(frozen=True)
class Validation:
    """Errors of the EMA model against the analytic answer on the validation grid."""

    step: int
    elapsed_seconds: float
    paths: int
    loss: float
    p50_bp: float  # put price error, basis points of spot (r = q = 0)
    p95_bp: float
    max_bp: float
    cf_rmse: float  # root mean squared |phi_model - phi_true| over points and frequencies

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)

    def measured(self) -> dict[str, float | int]:
        """The numbers without the wall-clock time: what a checkpoint's identity holds
        (``elapsed_seconds`` differs between two runs that train the same bits, so a
        checkpoint keeps it among its run facts, ``run.validation_seconds``)."""
        return {k: v for k, v in self.__dict__.items() if k != "elapsed_seconds"}


class Trainer:
    """Owns the model, its EMA copy, the optimiser and the training streams."""

    def __init__(self, config: TrainConfig, budgets: Budgets | None = None, *, prefetch: bool = True) -> None:
        """``prefetch`` False makes every step generate its own normals block (to measure
        what prefetching overlaps); the bits are the same either way."""
        self.config = config
        self.process: Process = get_process(config.process)
        self.domain = config.resolved_domain()
        self.device = resolve_device(config.device)
        check_policy(config.kernels, self.device)
        budgets = budgets or Budgets()
        self._budgets = budgets
        # The network's initial weights come from the seed without touching the caller's
        # global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = CFModel(self.process, self.domain, config.spectrum, config.network).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr_at(0))
        self._reserve(budgets.training, budgets.simulator)
        try:
            self.pool = NormalsPool(
                NormalsConfig(
                    seed=config.seed,
                    mode=config.normals_mode,
                    antithetic=config.antithetic,
                    rows=config.paths,
                    dims=config.batch_points * self.process.normals_per_path,
                    dtype="float32",
                    cache_blocks=3,
                    lookahead=1,
                ),
                budgets.normals,
                self.device,
                prefetch=prefetch,
            )
        except BaseException:
            self._release()
            raise
        self.normals = self.pool.stream()
        self._sobol = sobol_engine(self.domain.dims, config.seed)
        self.step = 0
        self.sobol_index = 0
        self.paths_simulated = 0
        self.elapsed_seconds = 0.0
        self.loss_ema = float("nan")
        self.history: list[Validation] = []
        self._validation = _ValidationSet(self, config.validation_grid, config.validation_points)

    # -- memory ---------------------------------------------------------------------------
    def _reserve(self, training: MemoryBudget, simulator: MemoryBudget) -> None:
        cfg = self.config
        n_params = sum(p.numel() for p in self.model.parameters())
        buffers = live_tensor_bytes(self.model.buffers())
        act = cfg.batch_points * cfg.network.width * 2 * (cfg.network.depth + 1) * 3
        # float32: weights, EMA, Adam's two moments, the frozen EMA's packed serving
        # matrices (twice its weights, built by validation), activations; both copies'
        # buffers. live_training_bytes() measures the held part of this.
        training.reserve(TRAINING_HOLDER, 4 * (6 * n_params + act) + 2 * buffers)
        training.track(TRAINING_HOLDER, self.live_training_bytes)
        b, n, m = cfg.batch_points, cfg.paths, cfg.spectrum.n_bins
        d = self.process.normals_per_path
        # Paths and binning temporaries (~8 arrays of (B, N)), the bins, the padded FFT.
        sim = tensor_bytes((b, n, 8 + d), torch.float32) + tensor_bytes((b, 2 * m + 2), torch.complex64) * 2
        simulator.reserve("trainer: simulator workspace", sim)

    def live_training_bytes(self) -> int:
        """Bytes the network, its EMA copy and the optimiser's moments hold now."""
        tensors = [*module_tensors(self.model), *module_tensors(self.ema)]
        for state in self.optimizer.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        return live_tensor_bytes(tensors)

    def _release(self) -> None:
        self._budgets.training.release(TRAINING_HOLDER)
        self._budgets.simulator.release("trainer: simulator workspace")

    def close(self) -> None:
        self.pool.close()
        self._release()

    # -- one step -------------------------------------------------------------------------
    def _draw_points(self) -> tuple[torch.Tensor, torch.Tensor]:
        u: torch.Tensor = self._sobol.draw(self.config.batch_points, dtype=torch.float64)  # (B, dims)
        self.sobol_index += self.config.batch_points
        if self.config.focus is not None:
            u = _focused(u, self.config.focus, self.domain)
        theta, expiry = self.domain.from_unit(u.to(self.device))
        return self.process.canonical_params(theta), expiry

    def targets(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """FFT CF estimates (B, K) from the block z (N, B*d)."""
        cfg = self.config
        with kernel_policy(cfg.kernels):
            return mc_targets(
                self.process,
                cfg.spectrum,
                theta,
                expiry,
                z,
                cfg.control_variate,
                cfg.control_coefficient,
                conditional=cfg.targets == "conditional",
            )

    def train_step(self) -> float:
        cfg = self.config
        theta, expiry = self._draw_points()
        with torch.no_grad():
            if cfg.targets == "exact":
                target = analytic_cf_y(self.process, cfg.spectrum, theta, expiry)
            else:
                _, z = self.normals.next()
                target = self.targets(theta, expiry, z).to(torch.complex128)  # (B, K)
                self.paths_simulated += cfg.batch_points * cfg.paths
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        pred = self.model(theta, expiry)  # (B, K) complex128; (B, K + 1) for a defective law
        if self.process.defective:  # phi(0) and the share mass (last) are learned, weighted
            sq = (pred - target).abs().square()
            weight = torch.ones(sq.shape[1], dtype=sq.dtype, device=sq.device)
            weight[0] = weight[-1] = cfg.mass_weight
            loss = (sq * weight).sum(1).mean() / weight.sum()
        else:  # phi(0) = 1 is not learned
            loss = (pred[:, 1:] - target[:, 1:]).abs().square().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        decay = cfg.ema_decay_at(self.step)
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                pe.lerp_(p, 1.0 - decay)
        self.step += 1
        value = float(loss.detach())
        self.loss_ema = value if math.isnan(self.loss_ema) else 0.98 * self.loss_ema + 0.02 * value
        return value

    def run(
        self,
        steps: int,
        on_step: Callable[[Trainer], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        """Run ``steps`` more steps, validating every ``validate_every`` steps."""
        self.model.train()
        for _ in range(steps):
            if should_stop is not None and should_stop():
                break
            t0 = time.perf_counter()
            self.train_step()
            if self.step % self.config.validate_every == 0:
                self.validate()
            self.elapsed_seconds += time.perf_counter() - t0
            if on_step is not None:
                on_step(self)

    # -- validation -----------------------------------------------------------------------
    def validate(self) -> Validation:
        v = self._validation.evaluate(self.ema)
        self.history.append(v)
        return v

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint(self, metrics: dict[str, Any] | None = None, *, run: dict[str, Any] | None = None) -> Checkpoint:
        """The full training state (EMA weights in ``model``, the rest in ``training``).

        ``metrics`` joins the manifest's metrics, which are part of the content hash;
        ``run`` (such as the command line) joins the run facts, which are not, with the
        wall-clock times: two runs that train the same bits get the same content hash
        (engine/checkpoint.py, ``manifest_hash``)."""
        training: dict[str, torch.Tensor] = {f"weights/{k}": v for k, v in self.model.state_dict().items()}
        opt = self.optimizer.state_dict()
        for idx, st in opt["state"].items():
            for key, val in st.items():
                training[f"optim/{idx}/{key}"] = torch.as_tensor(val)
        manifest = {
            "library": library_versions(),
            "model": model_description(self.config),
            "training": self.config.model_dump(mode="json"),
            "state": {
                "step": self.step,
                "sobol_index": self.sobol_index,
                "normals_block": self.normals.position,
                "paths_simulated": self.paths_simulated,
                "loss_ema": None if math.isnan(self.loss_ema) else self.loss_ema,
                "device_type": self.device.type,
            },
            "metrics": {
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "validation": self.history[-1].measured() if self.history else None,
                "history": [v.measured() for v in self.history],
                **(metrics or {}),
            },
            RUN: {
                "elapsed_seconds": self.elapsed_seconds,
                "validation_seconds": [v.elapsed_seconds for v in self.history],
                **(run or {}),
            },
        }
        return Checkpoint(manifest, dict(self.ema.state_dict()), training)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, budgets: Budgets | None = None, **overrides: Any) -> Trainer:
        """Rebuild a trainer exactly where ``ckpt`` left off (config ``overrides`` allowed
        for fields that do not change the bits, such as validate_every or device)."""
        cfg = TrainConfig.model_validate({**ckpt.manifest["training"], **overrides})
        trainer = cls(cfg, budgets)
        state = ckpt.manifest["state"]
        weights = {k.removeprefix("weights/"): v for k, v in ckpt.training.items() if k.startswith("weights/")}
        trainer.model.load_state_dict(weights)
        trainer.ema.load_state_dict(ckpt.model)
        opt = trainer.optimizer.state_dict()
        for key, val in ckpt.training.items():
            if key.startswith("optim/"):
                _, idx, name = key.split("/")
                opt["state"].setdefault(int(idx), {})[name] = val.to(trainer.device)
        trainer.optimizer.load_state_dict(opt)
        trainer.step = int(state["step"])
        trainer.sobol_index = int(state["sobol_index"])
        trainer._sobol.fast_forward(trainer.sobol_index)
        trainer.normals.seek(int(state["normals_block"]))
        trainer.paths_simulated = int(state["paths_simulated"])
        # Wall-clock times are run facts: read from ``run``, or where an older checkpoint
        # kept them; 0 where none were recorded.
        trainer.elapsed_seconds = float(run_facts(ckpt.manifest)["elapsed_seconds"] or 0.0)
        trainer.loss_ema = float("nan") if state.get("loss_ema") is None else float(state["loss_ema"])
        trainer.history = [
            Validation(**{**v, "elapsed_seconds": float(v["elapsed_seconds"] or 0.0)})
            for v in timed_history(ckpt.manifest)
        ]
        return trainer


def _focused(u: torch.Tensor, focus: FocusBox, domain: ModelDomain) -> torch.Tensor:
    """u (B, dims) in [0, 1] with its last round(B * share) rows mapped into the focus box."""
    u = u.clone()
    rows = slice(u.shape[0] - round(u.shape[0] * focus.share), u.shape[0])
    for i, r in enumerate(domain.ranges):
        if r.name in focus.ranges:
            low, high = (float(r.to_unit(torch.tensor(v, dtype=torch.float64))) for v in focus.ranges[r.name])
            u[rows, i] = low + (high - low) * u[rows, i]
    return u


def mc_targets(
    process: Process,
    spectrum: SpectrumConfig,
    theta: torch.Tensor,
    expiry: torch.Tensor,
    z: torch.Tensor,
    control_variate: bool = False,
    coefficient: ControlCoefficient = "unit",
    *,
    conditional: bool = False,
) -> torch.Tensor:
    """FFT estimates of phi_Y (B, K) for B points from a normals block z (N, B*d), point
    b taking columns b*d .. b*d + d - 1; with ``control_variate`` corrected by the
    process's Gaussian companion (spectrum.control_variate_cf); with ``conditional`` the
    mixed estimate instead (reference.conditional_cf_y)."""
    b, d = theta.shape[0], process.normals_per_path
    z3 = z.view(z.shape[0], b, d).transpose(0, 1)  # (B, N, d)
    if conditional:
        return conditional_cf_y(process, spectrum, theta, expiry, z3)
    return simulated_cf_y(process, spectrum, theta, expiry, z3, control_variate, coefficient)


def model_description(config: TrainConfig) -> dict[str, Any]:
    """What a server needs to rebuild the served network."""
    return {
        "process": config.process,
        "domain": _with_moneyness(config.resolved_domain()).model_dump(mode="json"),
        "spectrum": config.spectrum.model_dump(mode="json"),
        "network": config.network.model_dump(mode="json"),
    }


class _ValidationSet:
    """A fixed grid of (theta, T) and strikes with the analytic answer, for monitoring."""

    def __init__(self, trainer: Trainer, per_axis: int, points: int | None) -> None:
        self.trainer = trainer
        domain, process, spectrum = trainer.domain, trainer.process, trainer.config.spectrum
        if points is None:
            axes = [(torch.arange(per_axis, dtype=torch.float64) + 0.5) / per_axis] * domain.dims
            u = torch.cartesian_prod(*axes).reshape(-1, domain.dims)  # (G, dims) cell centres
        else:  # a scramble no training seed uses (seeds are < 2^31)
            u = sobol_engine(domain.dims, VALIDATION_SEED).draw(points, dtype=torch.float64)  # (G, dims)
        theta, self.expiry = domain.from_unit(u.to(trainer.device))
        self.theta = process.canonical_params(theta)
        self.s = process.scale(self.theta, self.expiry)
        kappa = torch.tensor(VALIDATION_STRIKES, dtype=torch.float64, device=trainer.device)
        self.log_kappa = torch.log(kappa)[None, :].expand(len(self.s), -1)
        reference = process.reference_put(self.theta, self.expiry, self.log_kappa)
        if reference is None:
            self.true_phi: torch.Tensor | None = analytic_cf_y(process, spectrum, self.theta, self.expiry)
            self.true_put = CosExpansion(self.true_phi, spectrum).put_terms(self.s, self.log_kappa)["put"]
        else:  # no analytic CF: the process's own reference prices, and no CF error to report
            self.true_phi, self.true_put = None, reference

    @torch.no_grad()
    def evaluate(self, model: CFModel) -> Validation:
        t = self.trainer
        phi = model(self.theta, self.expiry)
        if model.defective:
            put = defective_puts(phi, model, self.s, self.log_kappa)["put"]
        else:
            put = CosExpansion(phi, t.config.spectrum).put_terms(self.s, self.log_kappa)["put"]
        err = ((put - self.true_put).abs() * 1e4).flatten()  # bp of spot with S = F
        q = torch.quantile(err, torch.tensor([0.5, 0.95], dtype=torch.float64, device=err.device))
        return Validation(
            step=t.step,
            elapsed_seconds=t.elapsed_seconds,
            paths=t.paths_simulated,
            loss=t.loss_ema,
            p50_bp=float(q[0]),
            p95_bp=float(q[1]),
            max_bp=float(err.max()),
            cf_rmse=float("nan")
            if self.true_phi is None
            else float((phi - self.true_phi).abs().square().mean().sqrt()),
        )
