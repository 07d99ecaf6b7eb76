"""GPU check (issue 7): every device figure, measured on the GPU and on the CPU in one run.

Per device (cuda when torch sees one, and the CPU path on the same machine for the
ratio):

- copy bandwidth (read + write) and the bound it sets on Monte Carlo: writing each
  path's normals once (generation) and reading them once (simulation), 8 bytes per
  float32 normal;
- normals per second by mode (pseudo, shifted Sobol, scrambled Sobol; Sobol points are
  built on the device on CUDA);
- MC paths per second of GBM, Heston QE-M (16 steps) and the 64-fixing Asian average,
  simulation alone and generation + simulation, with torch's per-step ops and with the
  fused kernels where they run, against that bound;
- the normals pool's overlap: training steps with prefetching (the pool's own CUDA
  stream) against steps that generate their own block, and the share of generation
  time that prefetching hid;
- memory per capped component: reserved, measured live bytes and (CUDA) the caching
  allocator's peak, for a Heston training run;
- training throughput (steps/s, paths/s) of the bundled GBM and Heston configurations;
- inference microseconds per option (bundled Heston and Asian models, distinct points);
- error against training time for GBM and Heston, the schedule fitted to the time.

Prints the table, writes results.json, results.md and the plots (curves + paths) to
--out. ``bench/gpu_check.sh`` is the one script for a GPU machine (it runs the GPU tests
first); record its JSON here with ``--record-from OUT/results.json --record``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import IMG, ROOT, record, save_figure, table
from gpu_probe import bandwidth, sync, timed

from spectralmc_server.engine import kernels
from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.device import Budgets
from spectralmc_server.engine.kernels import KernelPolicy
from spectralmc_server.engine.normals import NormalsConfig, generate_block
from spectralmc_server.engine.pricer import OptionBatch
from spectralmc_server.engine.processes import Process, get_process
from spectralmc_server.engine.served import load_served_model
from spectralmc_server.engine.trainer import TrainConfig, Trainer
from spectralmc_server.models import bundled_models

F64 = torch.float64
CONFIGS = {"gbm": "default.toml", "heston": "heston.toml"}


def _config(name: str, device: torch.device, **changes: Any) -> TrainConfig:
    fields = tomllib.loads((ROOT / "config" / CONFIGS[name]).read_text())["train"]
    return TrainConfig.model_validate({**fields, "device": device.type, **changes})


def _err(exc: BaseException) -> str:
    return f"error: {exc!r}"[:200]


def normals_rates(device: torch.device, rows: int, dims: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("pseudo", "sobol_shift", "sobol"):
        cfg = NormalsConfig(seed=1, mode=mode, antithetic=True, rows=rows, dims=dims, dtype="float32")
        counter = iter(range(10**9))
        try:
            make = functools.partial(_next_block, cfg, counter, device)
            out[f"normals_per_s_{mode}"] = rows * dims / timed(make, device, 3)
        except Exception as exc:
            out[f"normals_per_s_{mode}"] = _err(exc)
    return out


def _next_block(cfg: NormalsConfig, counter: Any, device: torch.device) -> torch.Tensor:
    return generate_block(cfg, next(counter), device)


def _same(z: torch.Tensor) -> torch.Tensor:
    return z


def _fresh_block(cfg: NormalsConfig, device: torch.device, paths: int, points: int, d: int) -> torch.Tensor:
    """A newly generated block in the trainer's (B, N, d) layout."""
    return generate_block(cfg, 1, device).view(paths, points, d).transpose(0, 1)


def _simulate(
    process: Process, theta: torch.Tensor, expiry: torch.Tensor, normals: Any, route: KernelPolicy
) -> torch.Tensor:
    with kernels.kernel_policy(route):
        return process.simulate_x(theta, expiry, normals())


def paths_rates(device: torch.device, points: int, paths: int, bw: float) -> dict[str, Any]:
    """Paths/s of simulation alone and of generation + simulation, per process and route."""
    out: dict[str, Any] = {}
    routes: list[KernelPolicy] = ["torch"]
    if kernels.fused_unavailable_reason(device) is None:
        routes.append("fused")
    for name in ("gbm", "heston", "asian"):
        process = get_process(name)
        domain = process.default_domain()
        g = torch.Generator().manual_seed(0)
        theta, expiry = domain.from_unit(torch.rand(points, domain.dims, generator=g, dtype=F64))
        theta, expiry = process.canonical_params(theta).to(device), expiry.to(device)
        d = process.normals_per_path
        cfg = NormalsConfig(seed=2, mode="pseudo", rows=paths, dims=points * d, dtype="float32")
        out[f"paths_bound_{name}"] = bw / (2 * 4 * d)  # write once + read once, float32
        for route in routes:
            if name == "gbm" and route == "fused":
                continue  # GBM is one exact step: there is nothing to fuse
            key = f"{name}_{route}"
            try:
                block = generate_block(cfg, 0, device)
                z = block.view(paths, points, d).transpose(0, 1)  # the trainer's layout

                sim = functools.partial(_simulate, process, theta, expiry, functools.partial(_same, z), route)
                fresh = functools.partial(_fresh_block, cfg, device, paths, points, d)
                gen_sim = functools.partial(_simulate, process, theta, expiry, fresh, route)
                out[f"paths_per_s_{key}"] = points * paths / timed(sim, device, 3)
                out[f"paths_per_s_gen_{key}"] = points * paths / timed(gen_sim, device, 3)
                del block, z
            except Exception as exc:
                out[f"paths_per_s_{key}"] = _err(exc)
    return out


def timed_steps(trainer: Trainer, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` training steps after one warm-up step."""
    trainer.train_step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync(device)
    return time.perf_counter() - t0


def overlap(device: torch.device, steps: int, quick: bool) -> dict[str, Any]:
    """Heston training with and without prefetching, and generation alone."""
    changes: dict[str, Any] = {"validate_every": 10**6}
    if quick:
        changes.update(batch_points=16, paths=64, validation_points=64)
    out: dict[str, Any] = {}
    times = {}
    for prefetch in (True, False):
        trainer = Trainer(_config("heston", device, **changes), Budgets(), prefetch=prefetch)
        try:
            times[prefetch] = timed_steps(trainer, steps, device)
            if prefetch:
                out["pool_hidden_fraction"] = trainer.pool.stats.hidden_fraction
            cfg = trainer.pool.config
        finally:
            trainer.close()
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        generate_block(cfg, 10_000 + i, device)
    sync(device)
    t_gen = time.perf_counter() - t0
    out["steps_s_prefetch"] = times[True]
    out["steps_s_no_prefetch"] = times[False]
    out["generation_s"] = t_gen
    out["overlap_hidden_share"] = max(0.0, min(1.0, (times[False] - times[True]) / t_gen)) if t_gen > 0 else 0.0
    return out


def memory(device: torch.device, steps: int, quick: bool) -> dict[str, Any]:
    """Reserved vs live vs (CUDA) allocator peak for a Heston training run."""
    changes: dict[str, Any] = {"validate_every": max(1, steps - 1)}
    if quick:
        changes.update(batch_points=16, paths=64, validation_points=64)
    budgets = Budgets()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(_config("heston", device, **changes), budgets)
    try:
        for _ in range(steps):
            trainer.train_step()
        trainer.validate()
        sync(device)
        out: dict[str, Any] = {
            r.name: {"cap": r.cap_bytes, "reserved": r.reserved_bytes, "live": r.live_bytes} for r in budgets.reports()
        }
        if device.type == "cuda":
            out["allocator"] = {
                "allocated": torch.cuda.memory_allocated() - base,
                "peak": torch.cuda.max_memory_allocated() - base,
                "reserved_total": sum(r.reserved_bytes for r in budgets.reports()),
            }
    finally:
        trainer.close()
    return out


def train_rates(device: torch.device, steps: int, quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in CONFIGS:
        changes: dict[str, Any] = {"validate_every": 10**6}
        if quick:
            changes.update(batch_points=16, paths=64)
        try:
            trainer = Trainer(_config(name, device, **changes), Budgets())
            try:
                dt = timed_steps(trainer, steps, device)
                out[f"train_steps_per_s_{name}"] = steps / dt
                out[f"train_paths_per_s_{name}"] = steps * trainer.config.batch_points * trainer.config.paths / dt
            finally:
                trainer.close()
        except Exception as exc:
            out[f"train_steps_per_s_{name}"] = _err(exc)
    return out


def inference_us(device: torch.device, model: str, points: int) -> float:
    served = load_served_model(read_dir(bundled_models()[model], need_training=False), device=device)
    g = torch.Generator().manual_seed(3)
    theta, expiry = served.domain.from_unit(torch.rand(points, served.domain.dims, generator=g, dtype=F64))
    theta = served.process.canonical_params(theta)
    n = points
    carry = theta[:, 1] if model == "asian" else torch.full((n,), 0.02, dtype=F64)
    batch = OptionBatch(
        spot=torch.full((n,), 100.0, dtype=F64),
        strike=torch.full((n,), 100.0, dtype=F64),
        expiry=expiry,
        rate=carry + 0.01,
        dividend=torch.full((n,), 0.01, dtype=F64),
        is_call=torch.zeros(n, dtype=torch.bool),
        theta=theta,
    )
    if device.type == "cuda":
        batch = OptionBatch(*(getattr(batch, f).to(device) for f in batch.__dataclass_fields__))
    t = timed(lambda: served.pricer.evaluate(batch, frozenset({"price"})), device, 5)
    return t / n * 1e6


def curve(device: torch.device, name: str, seconds: float, steps_per_s: float, quick: bool) -> list[dict[str, float]]:
    """Train for about ``seconds`` with the cosine schedule fitted to the steps that
    fit in them at the measured rate; the validation history (elapsed s, p95/max bp)."""
    steps = max(20, int(steps_per_s * seconds))
    changes: dict[str, Any] = {"schedule_steps": steps, "validate_every": max(10, steps // 8)}
    if quick:
        changes.update(batch_points=16, paths=64, validation_points=64, warmup_steps=5)
        changes.pop("validate_every")
        changes["validate_every"] = max(5, steps // 3)
        if name == "gbm":
            changes["validation_grid"] = 4
    trainer = Trainer(_config(name, device, **changes), Budgets())
    try:
        trainer.run(steps)
        if trainer.step % trainer.config.validate_every:
            trainer.validate()
    finally:
        trainer.close()
    return [
        {"step": v.step, "seconds": v.elapsed_seconds, "p95_bp": v.p95_bp, "max_bp": v.max_bp} for v in trainer.history
    ]


def measure(device: torch.device, quick: bool, curve_seconds: float) -> dict[str, Any]:
    big = device.type == "cuda"
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if big else cpu_name(),
        "kernels_backend": kernels.backend(device) or "torch only",
    }
    t_start = time.perf_counter()
    bw = bandwidth(device, 2048 if big else (32 if quick else 512))
    out["bandwidth_GBps"] = bw / 1e9
    rows, dims = (8192, 8192) if big else ((256, 256) if quick else (2048, 2048))
    out.update(normals_rates(device, rows, dims))
    pts, n = (1024, 4096) if big else ((8, 128) if quick else (128, 1024))
    out.update(paths_rates(device, pts, n, bw))
    steps = 3 if quick else (200 if big else 20)
    for key, fn in (("overlap", overlap), ("memory", memory)):
        try:
            out[key] = fn(device, steps, quick)
        except Exception as exc:
            out[key] = _err(exc)
    out.update(train_rates(device, steps, quick))
    for model in ("heston", "asian"):
        try:
            out[f"inference_us_{model}"] = inference_us(device, model, 128 if quick else 4096)
        except Exception as exc:
            out[f"inference_us_{model}"] = _err(exc)
    for name in CONFIGS:
        rate = out.get(f"train_steps_per_s_{name}")
        if isinstance(rate, float) and curve_seconds > 0:
            try:
                out[f"curve_{name}"] = curve(device, name, curve_seconds, rate, quick)
            except Exception as exc:
                out[f"curve_{name}"] = _err(exc)
    out["seconds"] = time.perf_counter() - t_start
    return out


ROWS = [
    ("bandwidth_GBps", "copy bandwidth, GB/s (read + write)"),
    ("normals_per_s_pseudo", "normals/s, pseudo-random"),
    ("normals_per_s_sobol_shift", "normals/s, shifted Sobol"),
    ("normals_per_s_sobol", "normals/s, scrambled Sobol"),
    ("paths_bound_gbm", "GBM bound: write + read each path's normal once"),
    ("paths_per_s_gbm_torch", "GBM paths/s, simulation"),
    ("paths_per_s_gen_gbm_torch", "GBM paths/s, generation + simulation"),
    ("paths_bound_heston", "Heston bound: 32 normals written + read once"),
    ("paths_per_s_heston_torch", "Heston paths/s, torch per-step ops"),
    ("paths_per_s_heston_fused", "Heston paths/s, fused kernel"),
    ("paths_per_s_gen_heston_fused", "Heston paths/s, generation + fused kernel"),
    ("paths_bound_asian", "Asian bound: 64 normals written + read once"),
    ("paths_per_s_asian_torch", "Asian paths/s, torch ops"),
    ("paths_per_s_asian_fused", "Asian paths/s, fused kernel"),
    ("paths_per_s_gen_asian_fused", "Asian paths/s, generation + fused kernel"),
    ("train_steps_per_s_gbm", "training steps/s, GBM (config/default.toml)"),
    ("train_paths_per_s_gbm", "training paths/s, GBM"),
    ("train_steps_per_s_heston", "training steps/s, Heston (config/heston.toml)"),
    ("train_paths_per_s_heston", "training paths/s, Heston"),
    ("inference_us_heston", "inference us/option, Heston, distinct points"),
    ("inference_us_asian", "inference us/option, Asian, distinct points"),
]


def _value(r: dict[str, Any], key: str) -> Any:
    return r.get(key, "-")


def results_table(results: dict[str, Any]) -> str:
    devices = [d for d in ("cuda", "cpu") if isinstance(results.get(d), dict)]
    headers = ["measure", *[f"{d}: {results[d]['device']}" for d in devices]]
    if len(devices) == 2:
        headers.append("cuda / cpu")
    rows = []
    for key, label in ROWS:
        vals = [_value(results[d], key) for d in devices]
        if len(devices) == 2:
            a, b = vals
            vals.append(a / b if isinstance(a, float) and isinstance(b, float) and b else "-")
        rows.append([label, *vals])
    return table(headers, rows)


def bound_table(results: dict[str, Any]) -> str:
    """Measured generation + simulation against the bound (the target: within 2x)."""
    rows = []
    for d in ("cuda", "cpu"):
        r = results.get(d)
        if not isinstance(r, dict):
            continue
        for proc in ("gbm", "heston", "asian"):
            bound = r.get(f"paths_bound_{proc}")
            for route in ("fused", "torch"):
                got = r.get(f"paths_per_s_gen_{proc}_{route}")
                if isinstance(bound, float) and isinstance(got, float):
                    rows.append([d, proc, route, got, bound, bound / got])
    return table(["device", "process", "route", "gen + sim paths/s", "bound paths/s", "bound / measured"], rows)


def side_table(results: dict[str, Any]) -> str:
    rows = []
    for d in ("cuda", "cpu"):
        r = results.get(d)
        if not isinstance(r, dict):
            continue
        ov = r.get("overlap")
        if isinstance(ov, dict):
            rows.append([d, "overlap: steps with prefetch (s)", ov["steps_s_prefetch"]])
            rows.append([d, "overlap: steps generating their own block (s)", ov["steps_s_no_prefetch"]])
            rows.append([d, "overlap: generation alone (s)", ov["generation_s"]])
            rows.append([d, "overlap: share of generation hidden", ov["overlap_hidden_share"]])
            rows.append([d, "overlap: blocks ready when asked", ov["pool_hidden_fraction"]])
        mem = r.get("memory")
        if isinstance(mem, dict):
            for comp, v in mem.items():
                if comp == "allocator":
                    rows.append([d, "allocator: peak / sum of reservations", v["peak"] / max(1, v["reserved_total"])])
                    rows.append([d, "allocator: peak MiB", v["peak"] / 2**20])
                elif v["reserved"]:
                    rows.append([d, f"memory {comp}: live / reserved / cap MiB", _mib(v)])
    return table(["device", "measure", "value"], rows)


def _mib(v: dict[str, int]) -> str:
    return " / ".join(f"{v[k] / 2**20:.1f}" for k in ("live", "reserved", "cap"))


def curves(results: dict[str, Any]) -> dict[str, list[dict[str, float]]]:
    return {
        f"{d} {k[6:]}": v
        for d, r in results.items()
        if isinstance(r, dict)
        for k, v in r.items()
        if k.startswith("curve_") and isinstance(v, list)
    }


def curve_table(results: dict[str, Any]) -> str:
    rows = []
    for label, hist in curves(results).items():
        last, best = hist[-1], min(hist, key=lambda h: h["p95_bp"])
        rows.append([label, last["step"], last["seconds"], last["p95_bp"], last["max_bp"], best["p95_bp"]])
    return table(["device, process", "steps", "seconds", "final p95 bp", "final max bp", "best p95 bp"], rows)


def plot(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    for label, hist in curves(results).items():
        ax1.plot([h["seconds"] for h in hist], [h["p95_bp"] for h in hist], marker=".", label=label)
    ax1.axhline(1.0, color="grey", ls=":", lw=1)
    ax1.axhline(2.0, color="grey", ls="--", lw=1)
    ax1.set_yscale("log")
    ax1.set_xlabel("training time (s)")
    ax1.set_ylabel("validation p95, bp of spot")
    ax1.set_title("error vs training time (targets: GBM 1 bp, Heston 2 bp)")
    ax1.legend(fontsize=8)
    names, got, bound = [], [], []
    for d in ("cuda", "cpu"):
        r = results.get(d)
        if not isinstance(r, dict):
            continue
        for proc in ("gbm", "heston", "asian"):
            for route in ("fused", "torch"):
                v, b = r.get(f"paths_per_s_gen_{proc}_{route}"), r.get(f"paths_bound_{proc}")
                if isinstance(v, float) and isinstance(b, float):
                    names.append(f"{d}\n{proc} {route}")
                    got.append(v)
                    bound.append(b)
    xs = range(len(names))
    ax2.bar([x - 0.2 for x in xs], got, width=0.4, label="generation + simulation")
    ax2.bar([x + 0.2 for x in xs], bound, width=0.4, label="write + read once bound")
    ax2.set_xticks(list(xs), names, fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylabel("paths/s")
    ax2.set_title("MC paths/s against the bandwidth bound")
    ax2.legend(fontsize=8)
    save_figure(fig, path)


def report(results: dict[str, Any]) -> str:
    return "\n\n".join([results_table(results), bound_table(results), side_table(results), curve_table(results)])


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def record_section(results: dict[str, Any], source: Path) -> None:
    pending = ""
    if not isinstance(results.get("cuda"), dict):
        pending = (
            "\n**The GPU run is pending**: no GPU machine was lent when this was recorded. The\n"
            "figures below are the script's CPU path only, on the machine named; the GPU\n"
            "columns, the paths/s-against-bound target and the error-vs-time targets on one\n"
            "H100 are not yet measured (docs/gpu.md says how to run it on a lent device).\n"
        )
    body = f"""### GPU check (issue 7)

Device: {results.get("machine", "?")}. Raw results: `{source.relative_to(ROOT)}`, from
`bash bench/gpu_check.sh` (GPU tests: {results.get("gpu_tests", "?")}).
{pending}
{report(results)}

![gpu check](img/gpu_check.png)
"""
    record("gpu_check", body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu_check")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, CPU only unless --devices says otherwise")
    ap.add_argument("--devices", default="cuda,cpu", help="which of cuda,cpu to measure (cuda only where present)")
    ap.add_argument("--curve-seconds", type=float, default=120.0, help="error-vs-time training per process on CUDA")
    ap.add_argument("--cpu-curve-seconds", type=float, default=30.0, help="the same on the CPU path")
    ap.add_argument("--record-from", type=Path, help="a results.json from a GPU run (no measuring)")
    ap.add_argument("--record", action="store_true", help="with --record-from: write docs/benchmarks.md")
    ap.add_argument("--note", default="", help="stored in the results (the GPU tests' outcome, say)")
    args = ap.parse_args(argv)
    if args.record_from is not None:
        stored = json.loads(args.record_from.read_text())
        print(report(stored))
        plot_path = args.plot or ((IMG if args.record else args.out) / "gpu_check.png")
        plot(plot_path, stored)
        print(f"plot: {plot_path}")
        if args.record:
            record_section(stored, args.record_from.resolve())
        return 0
    wanted = args.devices.split(",")
    if args.quick and args.devices == ap.get_default("devices"):
        wanted = ["cpu"]
    results: dict[str, Any] = {"gpu_tests": args.note or "not run"}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        results["machine"] = f"{p.name} ({p.total_memory >> 20} MiB), torch {torch.__version__}"
    else:
        results["machine"] = f"no CUDA device; {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"
    for name in wanted:
        if name == "cuda" and not torch.cuda.is_available():
            results["cuda"] = "no CUDA device"
            continue
        device = torch.device(name)
        seconds = args.curve_seconds if name == "cuda" else args.cpu_curve_seconds
        if args.quick:
            seconds = min(seconds, 2.0)
        results[name] = measure(device, args.quick, seconds)
        print(json.dumps(results[name]), flush=True)
    text = report(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(text + "\n")
    plot_path = args.plot or args.out / "gpu_check.png"
    try:
        plot(plot_path, results)
        print(f"plot: {plot_path}")
    except ImportError as exc:  # a GPU machine without matplotlib: plot later with --record-from
        print(f"no plot ({exc}); make it from results.json with --record-from")
    return 0


if __name__ == "__main__":
    sys.exit(main())
