"""The ``spectralmc`` command line.

Exit codes: 0 success, 2 bad input (one line on stderr naming what is wrong),
1 an unexpected failure, 130 interrupted (training writes its checkpoint first).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import orjson
from pydantic import ValidationError

from spectralmc_server import __version__

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad input from the user: reported on one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spectralmc", description="SpectralMC pricing service and tools.")
    parser.add_argument("--version", action="version", version=f"spectralmc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model online from Monte-Carlo batches")
    train.add_argument("--process", required=True, help="process to learn (gbm)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps (also the learning-rate horizon)")
    length.add_argument("--minutes", type=float, help="wall-clock budget, turned into a step count after timing")
    train.add_argument("--seed", type=int, help="seed of the parameter points and normals (default 0)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="compute device (default cpu)")
    train.add_argument("--config", type=Path, help="TOML file whose [train] table sets TrainConfig fields")
    train.add_argument("--resume", type=Path, help="checkpoint directory to continue from")
    train.add_argument("--out", type=Path, help="checkpoint directory to write (atomically)")
    train.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (0: end only)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    price = sub.add_parser("price", help="price one request read as JSON on stdin")
    price.add_argument("--model", help="bundled model to use (default: every bundled model)")
    price.add_argument("--checkpoint", type=Path, help="price with this checkpoint directory instead")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.cmdline = "spectralmc " + " ".join(shlex.quote(a) for a in argv)
        if args.command == "train":
            return _train(args)
        return _price(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug or an environment failure: one line, unless debugging
        if os.environ.get("SPECTRALMC_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (set SPECTRALMC_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_FAILURE


# -- train ------------------------------------------------------------------------------


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


def _validation_message(prefix: str, exc: ValidationError) -> str:
    from spectralmc_server.service.schemas import format_validation_error, one_line

    return f"{prefix}: {one_line(format_validation_error(exc))}"


def _train(args: argparse.Namespace) -> int:
    from spectralmc_server.engine.checkpoint import CheckpointError, read_dir, write_dir
    from spectralmc_server.engine.device import DeviceUnavailableError
    from spectralmc_server.engine.trainer import TrainConfig, Trainer

    if args.steps is not None and args.steps <= 0:
        raise UsageError(f"--steps must be a positive integer, got {args.steps}")
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise UsageError(f"--minutes must be a positive number, got {args.minutes}")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if args.out is not None:
        _check_writable(args.out)  # before training, not after it
    overrides: dict[str, Any] = {}
    if args.device is not None:
        overrides["device"] = args.device
    try:
        if args.resume is not None:
            if args.seed is not None or args.config is not None:
                raise UsageError("--resume continues a run as configured: drop --seed and --config")
            ckpt = read_dir(args.resume)
            if ckpt.manifest["training"]["process"] != args.process:
                raise UsageError(
                    f"--process {args.process} does not match the checkpoint's process "
                    f"{ckpt.manifest['training']['process']!r}"
                )
            trainer = Trainer.from_checkpoint(ckpt, **overrides)
            steps = args.steps if args.steps is not None else _steps_for_minutes(trainer.config, args.minutes)
        else:
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
            trainer = Trainer(config)
    except ValidationError as exc:
        raise UsageError(_validation_message("invalid training configuration", exc)) from None
    except (CheckpointError, DeviceUnavailableError) as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:  # unknown process, budget exceeded, bad domain
        raise UsageError(str(exc)) from None

    stop = {"requested": False}

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        stop["requested"] = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        _run_with_progress(trainer, steps, args, lambda: stop["requested"])
    finally:
        signal.signal(signal.SIGINT, previous)
        trainer.close()
    summary: dict[str, Any] = {
        "step": trainer.step,
        "paths_simulated": trainer.paths_simulated,
        "elapsed_seconds": round(trainer.elapsed_seconds, 3),
        "validation": trainer.history[-1].as_dict() if trainer.history else None,
    }
    if args.out is not None:
        summary["out"] = str(args.out)
        summary["content_hash"] = write_dir(trainer.checkpoint({"command": args.cmdline}), args.out)
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    return EXIT_INTERRUPTED if stop["requested"] else EXIT_OK


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


def _run_with_progress(trainer: Any, steps: int, args: argparse.Namespace, should_stop: Any) -> None:
    from tqdm import tqdm

    from spectralmc_server.engine.checkpoint import write_dir

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
        if args.out is not None and args.checkpoint_every and t.step % args.checkpoint_every == 0:
            write_dir(t.checkpoint({"command": args.cmdline}), args.out)

    try:
        trainer.run(steps, on_step=on_step, should_stop=should_stop)
        if not trainer.history or trainer.history[-1].step != trainer.step:
            trainer.validate()
    finally:
        bar.close()


# -- price ------------------------------------------------------------------------------


def _price(args: argparse.Namespace) -> int:
    from spectralmc_server.engine.checkpoint import CheckpointError, read_dir
    from spectralmc_server.engine.pricer import load_served_model
    from spectralmc_server.models import bundled_models
    from spectralmc_server.service.schemas import PriceRequest
    from spectralmc_server.service.valuation import RequestError, Valuer, dumps

    raw = sys.stdin.buffer.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"stdin is not valid JSON: {exc}") from None
    try:
        request = PriceRequest.model_validate(body)
    except ValidationError as exc:
        raise UsageError(_validation_message("invalid request", exc)) from None

    try:
        if args.checkpoint is not None:
            served = [load_served_model(read_dir(args.checkpoint, need_training=False))]
        else:
            available = bundled_models()
            if not available:
                raise RuntimeError("no bundled models found: the package data is missing, reinstall spectralmc-server")
            if args.model is not None and args.model not in available:
                raise UsageError(f"--model: no bundled model {args.model!r}; bundled: {', '.join(available)}")
            names = [args.model] if args.model is not None else list(available)
            served = [load_served_model(read_dir(available[n], need_training=False), name=n) for n in names]
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    valuer = Valuer({m.process.name: m for m in served})
    try:
        response = valuer.value(request)
    except RequestError as exc:
        raise UsageError(f"invalid request: {exc}") from None
    sys.stdout.buffer.write(dumps(response) + b"\n")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
