"""``spectralmc train``: train a model from Monte-Carlo batches, writing a checkpoint
directory (``--out``) and/or committing versions to a store (``--store``) through the
commit step online training uses (training/commit.py: certify, gate, commit)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
import tomllib
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from spectralmc_server.cli.common import (
    EXIT_GATE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    UsageError,
    certificate_settings,
    store_errors,
    store_session,
    validation_message,
)

if TYPE_CHECKING:
    from spectralmc_server.engine.checkpoint import Checkpoint
    from spectralmc_server.training.commit import GateResult


def add_parser(sub: Any) -> None:
    train = sub.add_parser("train", help="train a model online from Monte-Carlo batches")
    train.add_argument(
        "--process",
        required=True,
        help="process to learn: gbm, heston, merton, asian, rbergomi, or a barrier law "
        "(gbm_barrier, gbm_barrier_discrete, heston_barrier)",
    )
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps (also the learning-rate horizon)")
    length.add_argument("--minutes", type=float, help="wall-clock budget, turned into a step count after timing")
    train.add_argument("--seed", type=int, help="seed of the parameter points and normals (default 0)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="compute device (default cpu)")
    train.add_argument(
        "--kernels",
        choices=["auto", "torch", "fused"],
        help="path simulation on CUDA: fused kernels where available (auto, the default), torch, or fused only",
    )
    train.add_argument(
        "--config",
        type=Path,
        help="TOML file whose [train] table sets TrainConfig fields; with --resume, a fine-tuning phase: a new "
        "learning-rate schedule over --steps/--minutes and where points are drawn (lr, lr_final_ratio, "
        "warmup_steps, ema_decay, grad_clip, focus, validate_every)",
    )
    train.add_argument(
        "--resume",
        help="continue from a checkpoint directory, or with --store from a version: N, 'head', 'pin' (the pinned "
        "version) or 'served' (the pinned version, else the head); commits still go on top of the head",
    )
    train.add_argument("--out", type=Path, help="checkpoint directory to write (atomically)")
    train.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (0: end only)")
    train.add_argument("--store", help="commit versions to this store (file:///path or s3://bucket/prefix)")
    train.add_argument("--model", help="model name in the store (default: the process name)")
    train.add_argument("--commit-every", type=int, help="commit every N steps (default: only at the end)")
    train.add_argument("--commit-seconds", type=float, help="commit every T seconds")
    train.add_argument("--commit-if-improved", action="store_true", help="skip due commits that do not improve")
    train.add_argument("--message", help="commit message template with {step}, {loss}, {val_bp}")
    train.add_argument(
        "--allow-unqualified",
        action="store_true",
        help="with --store: commit versions that fail the quality gate anyway (the version records it)",
    )
    train.add_argument(
        "--no-certify",
        action="store_true",
        help="do not certify --out (quick experiments: a checkpoint without certificate.json answers every "
        "measure by the reference, never by the learned model); with --store it needs --allow-unqualified",
    )
    train.add_argument(
        "--settings",
        type=Path,
        help="server settings TOML whose [certificate] table sets the gate, points and tolerances "
        "(default: the built-in ones, or SPECTRALMC_CERTIFICATE__* variables)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    _check_barrier_law(args)
    cert_settings = certificate_settings(args.settings)
    policy = _policy(args)
    if args.out is not None:
        _check_writable(args.out)  # before training, not after it
    model_name = args.model or args.process
    with contextlib.ExitStack() as stack:
        session = stack.enter_context(store_session(args.store, model_name)) if args.store else None
        trainer, steps, origin = _trainer(args, session)
        training = _Run(args, session, policy, cert_settings, model_name, origin)
        training.train(trainer, steps)
    summary = training.summary(trainer)
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    return training.exit_code()


def _check_options(args: argparse.Namespace) -> None:
    if args.steps is not None and args.steps <= 0:
        raise UsageError(f"--steps must be a positive integer, got {args.steps}")
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise UsageError(f"--minutes must be a positive number, got {args.minutes}")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    store_flags = [f for f in ("model", "commit_every", "commit_seconds", "message") if getattr(args, f) is not None]
    store_flags += [f for f in ("commit_if_improved", "allow_unqualified") if getattr(args, f)]
    if args.store is None and store_flags:
        raise UsageError(f"--{store_flags[0].replace('_', '-')} needs --store")
    if args.store is None and args.resume in ("head", "pin", "served") and not Path(args.resume).exists():
        raise UsageError(f"--resume {args.resume} names a stored version: it needs --store")
    if args.store is not None and args.no_certify and not args.allow_unqualified:
        raise UsageError(
            "--no-certify with --store: a version without a certificate fails the quality gate; "
            "add --allow-unqualified to commit it as unqualified"
        )


def _check_barrier_law(args: argparse.Namespace) -> None:
    """A barrier law (gbm_barrier, gbm_barrier_discrete, heston_barrier) trains to --out
    with no certificate: the certificate and the served path are built for vanilla laws
    only, so --store is refused."""
    from spectralmc_server.engine.processes import MODEL_PROCESSES

    process = MODEL_PROCESSES.get(args.process)
    if process is None or not process.defective:
        return
    if args.store is not None:
        raise UsageError(
            f"--store: {args.process} is a barrier law, which is neither certified nor served yet; "
            "train it with --out and measure it with bench/accuracy_barrier*.py"
        )
    if not args.no_certify:
        args.no_certify = True
        if not args.quiet:
            print(f"{args.process}: no certificate (barrier laws are not served yet)", file=sys.stderr)


def _policy(args: argparse.Namespace) -> Any:
    from spectralmc_server.training.policy import DEFAULT_MESSAGE, CommitPolicy

    try:
        return CommitPolicy(
            every_steps=args.commit_every,
            every_seconds=args.commit_seconds,
            only_if_improved=args.commit_if_improved,
            message=args.message or DEFAULT_MESSAGE,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


class _Run:
    """One ``spectralmc train`` run: checkpoints every --checkpoint-every steps, commits
    when the policy says so (certified, gated: the gate's refusals are kept), and the
    final checkpoint (--out, certified unless --no-certify) and summary."""

    def __init__(
        self,
        args: argparse.Namespace,
        session: Any,
        policy: Any,
        cert_settings: Any,
        model_name: str,
        origin: dict[str, Any] | None = None,
    ) -> None:
        self.args = args
        self.session = session
        self.policy = policy
        self.cert_settings = cert_settings
        self.model_name = model_name
        self.limits = cert_settings.limits(model_name)
        self.committed: list[int] = []
        self.committed_at = -1  # the step of the last commit tried
        self.refused: list[dict[str, Any]] = []  # due commits the gate refused: step and failures
        self.unqualified: list[int] = []  # versions committed past the gate (--allow-unqualified)
        self.gates: dict[str, GateResult] = {}  # content hash -> the certified checkpoint (reused by --out)
        self.stop_requested = False
        # the run fact ``trained_from``: the version (or checkpoint) this state continued,
        # then the run's own last commit (training/resume.py)
        self.origin = origin

    def run_facts(self) -> dict[str, Any]:
        """What a checkpoint of this run records outside its content hash."""
        facts: dict[str, Any] = {"command": self.args.cmdline}
        if self.origin is not None:
            facts["trained_from"] = self.origin
        return facts

    def gate(self, ckpt: Checkpoint, step: int) -> GateResult:
        """Certify (about 30 s for GBM on two cores) and check the gate, once per content."""
        from spectralmc_server.training.commit import GateResult, certify_checkpoint

        if self.args.no_certify:
            from spectralmc_server.engine.certificate import gate_failures

            return GateResult(ckpt, gate_failures(None, self.limits))
        if ckpt.content_hash not in self.gates:
            if not self.args.quiet:
                print(f"certifying step {step} ({self.cert_settings.points} held-out points)", file=sys.stderr)
            self.gates[ckpt.content_hash] = certify_checkpoint(
                ckpt, model=self.model_name, points=self.cert_settings.points, limits=self.limits
            )
        return self.gates[ckpt.content_hash]

    def commit(self, t: Any) -> None:
        """The commit step (training/commit.py) for the trainer's state now."""
        from spectralmc_server.training.commit import commit_certified

        assert self.session is not None
        if not t.history or t.history[-1].step != t.step:
            t.validate()
        val = t.history[-1].p95_bp
        message = self.policy.render(step=t.step, loss=t.loss_ema, val_bp=val)
        step, allow = t.step, self.args.allow_unqualified
        self.committed_at = step

        async def certify(ckpt: Checkpoint) -> GateResult:
            return self.gate(ckpt, step)

        def report(result: GateResult) -> None:
            verdict = "committing it as unqualified" if allow else "not committed"
            print(f"quality gate: step {step} {result.describe()}: {verdict}", file=sys.stderr)

        runner, vs = self.session
        ckpt = t.checkpoint(run=self.run_facts())
        with store_errors():
            outcome = runner.run(
                commit_certified(vs, ckpt, message, certify=certify, allow_unqualified=allow, on_failure=report)
            )
        if outcome.stored is None:
            self.refused.append({"step": step, "gate": outcome.gate.failures})
            self.policy.refused()
            return
        self.policy.committed(val)
        self.committed.append(outcome.stored.version)
        from spectralmc_server.training.resume import trained_from

        self.origin = trained_from(outcome.stored.version, outcome.stored.content_hash)
        if outcome.unqualified:
            self.unqualified.append(outcome.stored.version)

    def after_step(self, t: Any) -> None:
        from spectralmc_server.engine.checkpoint import write_dir

        args = self.args
        if args.out is not None and args.checkpoint_every and t.step % args.checkpoint_every == 0:
            write_dir(t.checkpoint(run=self.run_facts()), args.out)
        if self.session is not None and self.policy.due(t.step, t.history[-1].p95_bp if t.history else None):
            self.commit(t)

    def train(self, trainer: Any, steps: int) -> None:
        """Train ``steps`` steps (SIGINT stops after the step under way), then commit the
        final state when it is due; the trainer is closed afterwards."""

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            self.stop_requested = True

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            _run_with_progress(trainer, steps, self.args, lambda: self.stop_requested, self.after_step)
            policy = self.policy
            final_due = self.session is not None and policy.final and self.committed_at != trainer.step
            improved = not policy.only_if_improved or policy.improves(trainer.history[-1].p95_bp)
            if final_due and improved:
                self.commit(trainer)
        finally:
            signal.signal(signal.SIGINT, previous)
            trainer.close()

    def summary(self, trainer: Any) -> dict[str, Any]:
        """What the run did (written as JSON on stdout); writes --out first."""
        args = self.args
        summary: dict[str, Any] = {
            "step": trainer.step,
            "paths_simulated": trainer.paths_simulated,
            "elapsed_seconds": round(trainer.elapsed_seconds, 3),
            "validation": trainer.history[-1].as_dict() if trainer.history else None,
        }
        if args.store is not None:
            summary.update(store=args.store, model=self.model_name, committed=self.committed, refused=self.refused)
            summary["unqualified"] = self.unqualified
        if args.out is not None:
            summary.update(self.write_out(trainer))
        return summary

    def write_out(self, trainer: Any) -> dict[str, Any]:
        """The final checkpoint to --out: certified unless --no-certify or interrupted."""
        from spectralmc_server.engine.checkpoint import write_dir

        args = self.args
        final = trainer.checkpoint(run=self.run_facts())
        result = self.gates.get(final.content_hash)
        if result is None and not args.no_certify and not self.stop_requested:
            result = self.gate(final, trainer.step)
        elif result is None and self.stop_requested and not args.no_certify:
            print(
                f"interrupted: {args.out} is written without a certificate (its answers come from the reference); "
                "train on with --resume to certify it",
                file=sys.stderr,
            )
        return {
            "out": str(args.out),
            "content_hash": write_dir(final if result is None else result.checkpoint, args.out),
            "certified": result is not None,
            "gate": None if result is None else result.failures,
        }

    def exit_code(self) -> int:
        if self.stop_requested:
            return EXIT_INTERRUPTED
        if self.refused and self.refused[-1]["step"] == self.committed_at:
            return EXIT_GATE  # the last due commit was refused: the store does not hold this run's result
        return EXIT_OK


# -- the trainer ------------------------------------------------------------------------


def _trainer(args: argparse.Namespace, session: Any) -> tuple[Any, int, dict[str, Any] | None]:
    """The trainer (new, or resumed), the steps to run, and what it resumed from (the run
    fact ``trained_from``; None for a new run)."""
    from spectralmc_server.engine.checkpoint import CheckpointError
    from spectralmc_server.engine.device import DeviceUnavailableError
    from spectralmc_server.engine.kernels import FusedKernelsUnavailableError

    overrides: dict[str, Any] = {}
    if args.device is not None:
        overrides["device"] = args.device
    if args.kernels is not None:
        overrides["kernels"] = args.kernels
    try:
        if args.resume is not None:
            return _resumed_trainer(args, session, overrides)
        return (*_new_trainer(args, overrides), None)
    except ValidationError as exc:
        raise UsageError(validation_message("invalid training configuration", exc)) from None
    except (CheckpointError, DeviceUnavailableError, FusedKernelsUnavailableError) as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:  # unknown process, budget exceeded, bad domain
        raise UsageError(str(exc)) from None


def _resumed_trainer(
    args: argparse.Namespace, session: Any, overrides: dict[str, Any]
) -> tuple[Any, int, dict[str, Any]]:
    from spectralmc_server.engine.trainer import Trainer

    if args.seed is not None:
        raise UsageError("--resume continues a run as configured: drop --seed")
    # the phase file before the checkpoint, which may come from a store
    phase = _phase_fields(args.config, args.process) if args.config is not None else None
    if phase is not None and args.steps is None and args.minutes is None:
        raise UsageError("--resume with --config starts a new schedule: give its length with --steps or --minutes")
    ckpt, origin, what = _resume_checkpoint(args.resume, session)
    if ckpt.manifest["training"]["process"] != args.process:
        raise UsageError(
            f"--process {args.process} does not match the checkpoint's process {ckpt.manifest['training']['process']!r}"
        )
    trainer = Trainer.from_checkpoint(ckpt, **overrides, **(phase or {}))
    if not args.quiet:
        print(f"resuming from {what} at step {trainer.step}", file=sys.stderr)
    steps = args.steps if args.steps is not None else _steps_for_minutes(trainer.config, args.minutes)
    if phase is not None:  # a warm restart: the schedule counts from here, over this run
        previous = {k: ckpt.manifest["training"].get(k) for k in (*phase, "schedule_start", "schedule_steps")}
        trainer.config = trainer.config.model_copy(update={"schedule_start": trainer.step, "schedule_steps": steps})
        origin = {**origin, "phase_of": previous}
    return trainer, steps, origin


def _phase_fields(path: Path, process: str) -> dict[str, Any]:
    """--config with --resume: a fine-tuning phase, which may set only PHASE_FIELDS."""
    from spectralmc_server.engine.trainer import PHASE_FIELDS

    fields = _load_toml(path)
    if fields.get("process", process) != process:
        raise UsageError(f"--config: process {fields['process']!r} does not match --process {process}")
    fields.pop("process", None)
    other = sorted(set(fields) - set(PHASE_FIELDS))
    if other:
        raise UsageError(
            f"--config with --resume sets a fine-tuning phase, which may set only {', '.join(PHASE_FIELDS)}: "
            f"{other[0]} would change what the checkpoint learned or how"
        )
    if not fields:
        raise UsageError(f"--config: {path} sets no phase field ({', '.join(PHASE_FIELDS)})")
    return fields


def _new_trainer(args: argparse.Namespace, overrides: dict[str, Any]) -> tuple[Any, int]:
    from spectralmc_server.engine.trainer import TrainConfig, Trainer

    fields = _load_toml(args.config) if args.config is not None else {}
    fields.update(overrides, process=args.process)
    if args.seed is not None:
        fields["seed"] = args.seed
    config = TrainConfig.model_validate(fields)
    if args.steps is not None:
        steps = args.steps
    elif args.minutes is not None:
        steps = _steps_for_minutes(config, args.minutes)
    else:
        steps = config.schedule_steps
    config = config.model_copy(update={"schedule_steps": steps})
    return Trainer(config), steps


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--config: {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config: {path} is not valid TOML: {exc}") from None
    table = data.get("train", {})
    if not isinstance(table, dict):
        raise UsageError(f"--config: [train] in {path} must be a table")
    return table


def _resume_checkpoint(resume: str, session: Any) -> tuple[Any, dict[str, Any], str]:
    """--resume: a checkpoint directory, or with --store a version (N, 'head', 'pin',
    'served'); with the run fact ``trained_from`` naming it."""
    from spectralmc_server.engine.checkpoint import read_dir
    from spectralmc_server.training.resume import ResumeError, parse_resume, resume_point

    if session is None:
        ckpt = read_dir(Path(resume))
        return ckpt, {"checkpoint": str(Path(resume).resolve()), "content_hash": ckpt.content_hash}, resume
    where = parse_resume(resume)
    if where is None:
        raise UsageError(f"--resume with --store takes a version number, 'head', 'pin' or 'served', got {resume!r}")
    run, vs = session
    with store_errors():
        try:
            point = run.run(resume_point(vs, where))
        except ResumeError as exc:
            hint = "; use --resume head or a version number" if where == "pin" else ""
            raise UsageError(f"--resume {resume}: {exc}{hint}") from None
    return point.checkpoint, point.trained_from, point.describe()


def _check_writable(out: Path) -> None:
    """--out must be a directory we can create and replace (or a new path in one)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out: cannot create {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out: {parent} is not writable")


def _steps_for_minutes(config: Any, minutes: float | None) -> int:
    """Time a few steps (and one validation) of a throwaway trainer with this config."""
    from spectralmc_server.engine.trainer import Trainer

    if minutes is None:
        raise UsageError("give --steps or --minutes")
    probe = Trainer(config)
    try:
        probe.run(5)  # warm-up
        t0 = time.perf_counter()
        probe.run(20)
        per_step = (time.perf_counter() - t0) / 20
        t0 = time.perf_counter()
        probe.validate()
        per_step += (time.perf_counter() - t0) / config.validate_every
    finally:
        probe.close()
    steps = max(1, int(minutes * 60.0 / per_step))
    print(f"--minutes {minutes:g}: {per_step * 1e3:.1f} ms/step measured -> {steps} steps", file=sys.stderr)
    return steps


def _run_with_progress(trainer: Any, steps: int, args: argparse.Namespace, should_stop: Any, after_step: Any) -> None:
    from tqdm import tqdm

    bar = tqdm(total=steps, unit="step", disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
    start_step, start_paths, t0 = trainer.step, trainer.paths_simulated, time.perf_counter()

    def on_step(t: Any) -> None:
        bar.update(1)
        if t.step % 10 == 0 or t.step - start_step == steps:
            rate = (t.paths_simulated - start_paths) / max(time.perf_counter() - t0, 1e-9)
            post = {"loss": f"{t.loss_ema:.2e}", "paths/s": f"{rate:.3g}"}
            if t.history:
                post["val_p95_bp"] = f"{t.history[-1].p95_bp:.2f}"
            bar.set_postfix(post, refresh=False)
        after_step(t)

    try:
        trainer.run(steps, on_step=on_step, should_stop=should_stop)
        if not trainer.history or trainer.history[-1].step != trainer.step:
            trainer.validate()
    finally:
        bar.close()
