"""GPU probe (issue 7 groundwork): the same measurements on each available device.

Per device (cpu, and cuda when torch sees one): the copy bandwidth of a large tensor
(read + write), normals per second by mode, MC paths per second of GBM and Heston
terminal simulation from pre-drawn normals against the bound of reading each path's
normals once at that bandwidth, training steps per second of the bundled GBM and
Heston configurations, and inference microseconds per option of the bundled Heston
model at 4,096 distinct points; optionally, error against training time on each
device (``--train-seconds`` at a constant learning rate, or ``--curve-steps`` with the
schedule fitted to the step count). Prints one table, writes JSON to --out and a plot.

The device machine has no network: run it there (carrying pydantic and orjson wheels)
and record here from the JSON it returned:

    python bench/gpu_probe.py --out DIR [--quick] [--devices cpu,cuda]    # measure
    python bench/gpu_probe.py --record-from bench/results/gpu_probe_h200.json --record
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import IMG, ROOT, record, save_figure, table

from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.normals import NormalsConfig, generate_block
from spectralmc_server.engine.pricer import OptionBatch
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.served import load_served_model
from spectralmc_server.engine.trainer import TrainConfig, Trainer
from spectralmc_server.models import bundled_models

F64 = torch.float64


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, device: torch.device, repeat: int) -> float:
    """Median seconds of fn() over ``repeat`` runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bandwidth(device: torch.device, mib: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(mib << 18, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, 5)
    return 2 * src.numel() * 4 / t


def normals_rate(device: torch.device, mode: str, rows: int, dims: int) -> float:
    cfg = NormalsConfig(seed=1, mode=mode, antithetic=True, rows=rows, dims=dims, dtype="float32")
    counter = iter(range(10**9))
    t = timed(lambda: generate_block(cfg, next(counter), device), device, 3)
    return rows * dims / t


def paths_rate(device: torch.device, name: str, points: int, paths: int) -> tuple[float, int]:
    process = get_process(name)
    domain = process.default_domain()
    theta, expiry = domain.from_unit(torch.rand(points, domain.dims, dtype=F64))
    theta, expiry = theta.to(device), expiry.to(device)
    d = process.normals_per_path
    z = torch.randn(points, paths, d, device=device, dtype=torch.float32)
    t = timed(lambda: process.simulate_x(theta, expiry, z), device, 3)
    return points * paths / t, d * 4  # paths/s, bytes of normals per path


def train_rate(device: torch.device, config_file: Path, steps: int) -> tuple[float, float]:
    table_ = tomllib.loads(config_file.read_text())["train"]
    config = TrainConfig.model_validate({**table_, "device": device.type, "validate_every": 10**6})
    trainer = Trainer(config)
    try:
        trainer.train_step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        sync(device)
        dt = time.perf_counter() - t0
    finally:
        trainer.close()
    return steps / dt, steps * config.batch_points * config.paths / dt


def train_curve(device: torch.device, config_file: Path, seconds: float, steps: int = 0) -> list[dict[str, float]]:
    """Train from the bundled configuration (seed 0) for ``steps`` steps with the
    learning-rate schedule fitted to them, or (steps 0) for ``seconds`` of wall time at
    a schedule that never decays; return the validation history: elapsed seconds, p95
    and max in bp of spot."""
    table_ = tomllib.loads(config_file.read_text())["train"]
    schedule = steps if steps else 10**9
    config = TrainConfig.model_validate({**table_, "device": device.type, "schedule_steps": schedule})
    trainer = Trainer(config)
    t0 = time.perf_counter()
    try:
        trainer.run(steps or 10**9, should_stop=lambda: not steps and time.perf_counter() - t0 > seconds)
        trainer.validate()
    finally:
        trainer.close()
    return [
        {"step": v.step, "seconds": v.elapsed_seconds, "p95_bp": v.p95_bp, "max_bp": v.max_bp} for v in trainer.history
    ]


def inference_us(device: torch.device, points: int) -> float:
    served = load_served_model(read_dir(bundled_models()["heston"], need_training=False), device=device)
    domain = served.domain
    theta, expiry = domain.from_unit(torch.rand(points, domain.dims, dtype=F64))
    n = points
    batch = OptionBatch(
        spot=torch.full((n,), 100.0, dtype=F64),
        strike=torch.full((n,), 100.0, dtype=F64),
        expiry=expiry,
        rate=torch.full((n,), 0.03, dtype=F64),
        dividend=torch.full((n,), 0.01, dtype=F64),
        is_call=torch.zeros(n, dtype=torch.bool),
        theta=theta,
    )
    if device.type == "cuda":
        batch = OptionBatch(*(getattr(batch, f).to(device) for f in batch.__dataclass_fields__))
    t = timed(lambda: served.pricer.evaluate(batch, frozenset({"price"})), device, 5)
    return t / n * 1e6


def probe(device: torch.device, quick: bool, train_seconds: float, curve_steps: dict[str, int]) -> dict[str, Any]:
    big = device.type == "cuda"
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if big else "cpu"}
    if curve_steps:  # only the scheduled training curves
        for name, cfg in (("gbm", "default.toml"), ("heston", "heston.toml")):
            if name in curve_steps:
                out[f"curve_{name}"] = train_curve(device, ROOT / "config" / cfg, 0.0, curve_steps[name])
        return out
    out["bandwidth_GBps"] = bandwidth(device, 2048 if big else (64 if quick else 512)) / 1e9
    rows, dims = (8192, 8192) if big else ((512, 512) if quick else (2048, 4096))
    for mode in ("pseudo", "sobol_shift"):
        try:
            out[f"normals_per_s_{mode}"] = normals_rate(device, mode, rows, dims)
        except Exception as exc:  # a probe: record what failed and go on
            out[f"normals_per_s_{mode}"] = f"error: {exc!r}"[:200]
    for name in ("gbm", "heston"):
        pts, n = (1024, 4096) if big else ((16, 256) if quick else (256, 1024))
        try:
            rate, per_path = paths_rate(device, name, pts, n)
            out[f"paths_per_s_{name}"] = rate
            out[f"paths_bound_{name}"] = out["bandwidth_GBps"] * 1e9 / 2 / per_path  # read once
        except Exception as exc:
            out[f"paths_per_s_{name}"] = f"error: {exc!r}"[:200]
    for name, cfg in (("gbm", "default.toml"), ("heston", "heston.toml")):
        try:
            sps, pps = train_rate(device, ROOT / "config" / cfg, 3 if quick else 20)
            out[f"train_steps_per_s_{name}"], out[f"train_paths_per_s_{name}"] = sps, pps
        except Exception as exc:
            out[f"train_steps_per_s_{name}"] = f"error: {exc!r}"[:200]
    if train_seconds > 0:
        for name, cfg in (("gbm", "default.toml"), ("heston", "heston.toml")):
            try:
                out[f"curve_{name}"] = train_curve(device, ROOT / "config" / cfg, train_seconds)
            except Exception as exc:
                out[f"curve_{name}"] = f"error: {exc!r}"[:200]
    try:
        out["inference_us_heston_distinct"] = inference_us(device, 256 if quick else 4096)
    except Exception as exc:
        out["inference_us_heston_distinct"] = f"error: {exc!r}"[:200]
    return out


SHOWN = [
    ("bandwidth_GBps", "copy bandwidth, GB/s (read + write)"),
    ("normals_per_s_pseudo", "normals/s, pseudo-random (generated on the device)"),
    ("normals_per_s_sobol_shift", "normals/s, shifted Sobol (generated on the host, copied)"),
    ("paths_per_s_gbm", "GBM terminal paths/s"),
    ("paths_bound_gbm", "GBM bound: reading each path's normals once"),
    ("paths_per_s_heston", "Heston QE-M paths/s (16 steps)"),
    ("paths_bound_heston", "Heston bound: reading each path's 32 normals once"),
    ("train_steps_per_s_gbm", "training steps/s, GBM (config/default.toml)"),
    ("train_paths_per_s_gbm", "training paths/s, GBM"),
    ("train_steps_per_s_heston", "training steps/s, Heston (config/heston.toml)"),
    ("train_paths_per_s_heston", "training paths/s, Heston"),
    ("inference_us_heston_distinct", "inference, us per option, Heston, distinct points"),
]


def measures_table(results: dict[str, Any]) -> str:
    devices = [d for d in ("cpu", "cuda") if d in results]
    rows = [[label, *[results[d].get(key, "-") for d in devices]] for key, label in SHOWN]
    names = [results[d].get("device", d) for d in devices]
    return table(["measure", *names], rows)


def curves(results: dict[str, Any]) -> dict[str, list[dict[str, float]]]:
    return {
        f"{d} {k[6:]}": v
        for d, r in results.items()
        if isinstance(r, dict)
        for k, v in r.items()
        if k.startswith("curve_") and isinstance(v, list)
    }


def plot(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for label, hist in curves(results).items():
        ax1.plot([h["seconds"] for h in hist], [h["p95_bp"] for h in hist], marker=".", label=label)
    ax1.set_yscale("log")
    ax1.set_xlabel("training time (s)")
    ax1.set_ylabel("validation p95, bp of spot")
    ax1.set_title("error vs training time")
    ax1.legend(fontsize=8)
    names, got, bound = [], [], []
    for d, r in results.items():
        if not isinstance(r, dict):
            continue
        for proc in ("gbm", "heston"):
            v, b = r.get(f"paths_per_s_{proc}"), r.get(f"paths_bound_{proc}")
            if isinstance(v, float) and isinstance(b, float):
                names.append(f"{d} {proc}")
                got.append(v)
                bound.append(b)
    xs = range(len(names))
    ax2.bar([x - 0.2 for x in xs], got, width=0.4, label="measured")
    ax2.bar([x + 0.2 for x in xs], bound, width=0.4, label="read-once bound")
    ax2.set_xticks(list(xs), names)
    ax2.set_yscale("log")
    ax2.set_ylabel("paths/s")
    ax2.set_title("MC paths/s against the bandwidth bound")
    ax2.legend(fontsize=8)
    save_figure(fig, path)


def record_section(results: dict[str, Any], source: Path) -> None:
    curve_rows = []
    for label, hist in curves(results).items():
        last = hist[-1]
        best = min(hist, key=lambda h: h["p95_bp"])
        curve_rows.append([label, last["step"], last["seconds"], last["p95_bp"], last["max_bp"], best["p95_bp"]])
    ctable = table(["device, run", "steps", "seconds", "final p95 bp", "final max bp", "best p95 bp"], curve_rows)
    commands = "\n".join(f"    {c}" for c in results.get("commands", []))
    body = f"""### GPU probe (issue 7 groundwork)

Measured on the lent device machine: {results.get("machine", "?")}; the host CPU
column is that machine's 16 cores, not this VM. Raw results: `{source.relative_to(ROOT)}`,
from (pydantic and orjson carried as wheels; the machine has no network):

{commands}

{measures_table(results)}

Training curves (validation p95/max in bp of spot; `constant_lr` runs keep the peak
learning rate, the others fit the cosine schedule to their step count):

{ctable}

![gpu probe](img/gpu_probe.png)
"""
    record("gpu_probe", body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu_probe")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--record-from", type=Path, help="a results JSON from an earlier run (no measuring)")
    ap.add_argument("--record", action="store_true", help="with --record-from: write docs/benchmarks.md")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--devices", default="cpu,cuda", help="which of cpu,cuda to probe (cuda only where present)")
    ap.add_argument("--train-seconds", type=float, default=0.0, help="error-vs-time training per process (0: none)")
    ap.add_argument("--curve-steps", default="", help="only scheduled curves, e.g. gbm=20000,heston=4800")
    args = ap.parse_args(argv)
    if args.record_from is not None:
        stored = json.loads(args.record_from.read_text())
        print(measures_table(stored))
        plot_path = args.plot or ((IMG if args.record else args.out) / "gpu_probe.png")
        plot(plot_path, stored)
        print(f"plot: {plot_path}")
        if args.record:
            record_section(stored, args.record_from.resolve())
        return 0
    if args.quick and args.train_seconds == 0:
        args.train_seconds = 2.0
    wanted = args.devices.split(",")
    devices = [torch.device(d) for d in wanted if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    results = {}
    for device in devices:
        t0 = time.perf_counter()
        steps = {k: int(v) for k, v in (x.split("=") for x in args.curve_steps.split(",") if x)}
        results[device.type] = probe(device, args.quick, args.train_seconds, steps)
        results[device.type]["probe_seconds"] = time.perf_counter() - t0
        print(json.dumps(results[device.type]), flush=True)
    print(measures_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_probe.json").write_text(json.dumps(results, indent=2))
    plot_path = args.plot or args.out / "gpu_probe.png"
    plot(plot_path, results)
    print(f"plot: {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
