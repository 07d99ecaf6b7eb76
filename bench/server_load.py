"""Server load: ``spectralmc serve`` in its own process, loaded by ``wrk`` (Debian package)
from another process on loopback.

Scenarios, each with online training off and on: single-contract requests at
concurrency 64, 1,000-contract requests at concurrency 8 as row JSON and as columnar
JSON, and 10,000-contract Arrow IPC books at concurrency 4; next to an aiohttp
hello-world handler (it reads the same body and answers a constant) and the engine
alone (the served GBM model's pricer on the same 10,000 contracts, in this process,
called back to back for as long as a wrk run, at the run's start and again at its end:
the mean of the two sustained options/s is the Arrow target's baseline, the best single
call is shown beside it), both measured in the same run.
The single-contract scenario also loads the serving path's floor
(bench/floor_server.py: aiohttp, batching and an engine process, with no validation,
admission, metrics or model): what a server of this shape pays before any of
spectralmc's own work. Reports requests/s, options/s, p50 / p99 latency
(wrk's own histogram), non-2xx answers, the server's resident memory idle and under
load, and the CPU (user + system, from /proc) per request of the HTTP process(es), the
engine process(es) and wrk itself over each run: per-core figures for sizing a host
(a core serves 1e6 / us requests/s of that process's work). ``--soak-minutes M``
adds a run of M minutes of single-contract load sampling RSS every 5 s, to show memory
stays flat after warm-up.

    python bench/server_load.py --record                 # ~3 minutes
    python bench/server_load.py --record --soak-minutes 10
    python bench/server_load.py --quick
    python bench/server_load.py --record --http-workers 1,2 --engines 1,2   # the scaling
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import IMG, output_args, publish, save_figure, table

HELLO = """
import sys
from aiohttp import web
async def hello(request):
    await request.read()
    return web.Response(body=b'{"ok":true}', content_type="application/json")
app = web.Application()
app.router.add_post("/v1/price", hello)
app.router.add_get("/readyz", lambda r: hello(r))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


# Irrational rotations: every row its own (vol, T). (The earlier (i * 17 % 89, i * 13 % 97)
# repeated every 8,633 rows, so the engine alone, pricing 10,000 in one call, priced 14%
# fewer parameter points than the server, which splits a book into jobs.)
_VOL_STEP, _EXPIRY_STEP = 0.6180339887498949, 0.7548776662466927


def contract(i: int) -> dict[str, object]:
    """Distinct contracts inside the model's domain: vol in [0.1, 0.84), expiry in
    [0.1, 2.5) years (a distinct pair per row) and strike in [80, 120] vary."""
    return {
        "id": f"c{i}",
        "right": "call" if i % 2 else "put",
        "strike": 80.0 + (i * 7) % 41,
        "spot": 100.0,
        "expiry_years": 0.1 + 2.4 * (i * _EXPIRY_STEP % 1.0),
        "rate": 0.02,
        "dividend": 0.01,
        "vol": 0.1 + 0.74 * (i * _VOL_STEP % 1.0),
    }


def body(n: int) -> bytes:
    return json.dumps({"contracts": [contract(i) for i in range(n)]}).encode()


def columns_body(n: int) -> bytes:
    rows = [contract(i) for i in range(n)]
    return json.dumps({"columns": {k: [r[k] for r in rows] for k in rows[0]}}).encode()


def arrow_body(n: int) -> bytes:
    import pyarrow as pa

    rows = [contract(i) for i in range(n)]
    table = pa.table({k: [r[k] for r in rows] for k in rows[0]})
    table = table.replace_schema_metadata({"spectralmc.request": json.dumps({"measures": ["price"]})})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


ARROW = "application/vnd.apache.arrow.stream"
# name, contracts, connections, body, content type
SCENARIOS = [
    ("single", 1, 64, body, "application/json"),
    ("batch 1,000", 1000, 8, body, "application/json"),
    ("columns 1,000", 1000, 8, columns_body, "application/json"),
    ("arrow 10,000", 10_000, 4, arrow_body, ARROW),
]


@functools.lru_cache(maxsize=1)
def _engine_call(n: int) -> Callable[[], float]:
    """One timed call of the bundled GBM model's pricer on the Arrow scenario's first
    ``n`` contracts (the batch built from the columns, then evaluated), in seconds; the
    model and the book are loaded once for the run's two measures."""
    import torch

    from spectralmc_server.engine.checkpoint import read_dir
    from spectralmc_server.engine.served import load_served_model
    from spectralmc_server.models import bundled_models
    from spectralmc_server.pricing.book import Book
    from spectralmc_server.pricing.schemas import Contract

    served = load_served_model(read_dir(bundled_models()["gbm"], need_training=False), name="gbm")
    book = Book.of([Contract.model_validate(contract(i)) for i in range(n)])
    levels = torch.tensor([0.5], dtype=torch.float64)

    def call() -> float:
        t0 = time.perf_counter()
        served.pricer.evaluate(book.option_batch("gbm"), frozenset({"price"}), levels)
        return time.perf_counter() - t0

    return call


def engine_alone(n: int, seconds: float, warmup: int = 2) -> tuple[float, float]:
    """Options/s of the bundled GBM model's pricer on the Arrow scenario's contracts, in
    this process, as ``(sustained, best)``: calls back to back for ``seconds``, all the
    options over all the time (the like-for-like baseline of the server's wrk runs, which
    are as long), and the best single call. On a VM the best ~40 ms call runs ~25% above
    the sustained rate (measured: 290,000-309,000 against 226,000-245,000 options/s in
    three 8-s runs)."""
    call = _engine_call(n)
    for _ in range(warmup):
        call()
    times = [call()]
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        times.append(call())
    return n * len(times) / sum(times), n / min(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """RSS of ``pid`` and its descendants (the server's engine processes)."""
    total = 0
    for p in _descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server not ready")


@contextmanager
def server(
    kind: str, workdir: Path, training: bool, mode: str = "process", engines: int = 1, workers: int = 1
) -> Iterator[tuple[str, int]]:
    port = free_port()
    if kind == "hello":
        cmd = [sys.executable, "-c", HELLO, str(port)]
    elif kind == "floor":
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "floor_server.py"), str(port)]
    else:
        cmd = [sys.executable, "-m", "spectralmc_server.cli", "serve", "--port", str(port)]
        cmd += ["--data-dir", str(workdir / "data"), "--log-level", "warning"]
    env = {
        **os.environ,
        "SPECTRALMC_TRAIN__ENABLED": "true" if training else "false",
        "SPECTRALMC_ENGINE__MODE": mode,
        "SPECTRALMC_ENGINE__PROCESSES": str(engines),
        "SPECTRALMC_HTTP_WORKERS": str(workers),
    }
    with running(cmd, env, workdir / f"{kind}-{port}.log", port) as answer:
        if workers > 1:
            wait_workers(answer[0], workers)
        yield answer


def wait_workers(url: str, workers: int, timeout: float = 120.0) -> None:
    """Until every HTTP worker answers (/metrics: spectralmc_http_worker_up 1 for each)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            text = r.read().decode()
            if sum(f'spectralmc_http_worker_up{{worker="{k}"}} 1.0' in text for k in range(workers)) == workers:
                return
        time.sleep(0.5)
    raise RuntimeError(f"not all {workers} HTTP workers started")


@contextmanager
def running(cmd: list[str], env: Mapping[str, str], log_path: Path, port: int) -> Iterator[tuple[str, int]]:
    """Run a server command that listens on loopback ``port`` (its output to ``log_path``)
    until it answers ``/readyz``: (url, pid); stopped with SIGTERM (then killed) on exit."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(env))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def serve_only(workdir: Path, env: Mapping[str, str], log_level: str, log_name: str) -> Iterator[tuple[str, int]]:
    """``spectralmc serve --role serve`` (no training) on a free loopback port, its data
    directory ``workdir/data``, its output in ``workdir/<log_name>``: :func:`running`."""
    port = free_port()
    cmd = [sys.executable, "-m", "spectralmc_server.cli", "serve", "--role", "serve", "--port", str(port)]
    cmd += ["--data-dir", str(workdir / "data"), "--log-level", log_level]
    full = {**os.environ, "SPECTRALMC_TRAIN__ENABLED": "false", **env}
    with running(cmd, full, workdir / log_name.format(port=port), port) as answer:
        yield answer


@dataclass
class Load:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    rss_peak: int
    cpu_us: dict[str, float]  # CPU (user + system) per request: "http", "engine" processes and "wrk"


TICK = os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def cpu_by_role(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the server's process tree rooted at ``pid`` by
    role: ``engine`` (spectralmc's engine processes, the floor's engine) or ``http``."""
    out = {"http": 0.0, "engine": 0.0}
    for p in _descendants(pid):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            role = "engine" if b"engine_service" in cmd or b"--engine" in cmd else "http"
            out[role] += (int(fields[11]) + int(fields[12])) / TICK
    return out


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise ValueError(f"cannot read wrk latency {text!r}")
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    return float(m.group(1)) * scale


def wrk(
    url: str,
    payload: bytes,
    connections: int,
    seconds: float,
    workdir: Path,
    pid: int,
    content_type: str = "application/json",
) -> Load:
    path = workdir / f"body-{len(payload)}.bin"
    path.write_bytes(payload)
    script = workdir / f"post-{len(payload)}.lua"
    script.write_text(
        f'local f = io.open("{path}", "rb")\nwrk.method = "POST"\nwrk.body = f:read("*a")\nf:close()\n'
        f'wrk.headers["Content-Type"] = "{content_type}"\n'
    )
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(int(seconds), 1)}s", "--latency", "-s", str(script)]
    before, children = cpu_by_role(pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([*cmd, url + "/v1/price"], stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, rss_bytes(pid))
        time.sleep(0.25)
    after, reaped = cpu_by_role(pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = proc.stdout.read() if proc.stdout else ""
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk printed no Requests/sec line:\n{out}")
    rps = float(found.group(1))
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    non_2xx = int(bad.group(1)) if bad else 0
    if errors:
        print(f"  wrk: {errors.group(0)}")
    done = re.search(r"(\d+) requests in", out)
    count = max(int(done.group(1)) if done else 0, 1)
    cpu = {role: 1e6 * (after[role] - before[role]) / count for role in after}
    cpu["wrk"] = 1e6 * (reaped.ru_utime + reaped.ru_stime - children.ru_utime - children.ru_stime) / count
    return Load(rps, _ms(lat["50"]), _ms(lat["99"]), non_2xx, peak, cpu)


def soak(url: str, pid: int, minutes: float, workdir: Path) -> list[tuple[float, int]]:
    """Single-contract load for ``minutes``, RSS sampled every 5 s."""
    path = workdir / "soak.lua"
    payload = workdir / "soak.json"
    payload.write_bytes(body(1))
    path.write_text(
        f'local f = io.open("{payload}", "rb")\nwrk.method = "POST"\nwrk.body = f:read("*a")\nf:close()\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    proc = subprocess.Popen(
        ["wrk", "-t1", "-c64", f"-d{int(minutes * 60)}s", "-s", str(path), url + "/v1/price"],
        stdout=subprocess.DEVNULL,
    )
    t0 = time.monotonic()
    samples = []
    while proc.poll() is None:
        samples.append((time.monotonic() - t0, rss_bytes(pid)))
        time.sleep(5.0)
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each wrk run")
    ap.add_argument("--soak-minutes", type=float, default=0.0, help="memory soak run length (0: none)")
    output_args(ap, IMG / "server_load.png")
    ap.add_argument(
        "--quick", action="store_true", help="a short smoke run (1 s per scenario, no warm-up, no training)"
    )
    ap.add_argument(
        "--engines",
        default="1",
        help="engine processes to load with (mode process), comma-separated: 1,2 measures the scaling",
    )
    ap.add_argument(
        "--http-workers",
        default="1",
        help="HTTP worker processes (http_workers, SO_REUSEPORT) to load with, comma-separated: 1,2 measures "
        "the scaling",
    )
    ap.add_argument(
        "--modes",
        default="process",
        help="engine modes to load, comma-separated: process (the engine in its own process, the default "
        "of spectralmc serve) and/or thread (the engine on a thread of the server's process)",
    )
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    seconds = 1.0 if args.quick else args.seconds
    rows: list[list[object]] = []
    payloads = {name: (n, conns, make(n), ctype) for name, n, conns, make, ctype in SCENARIOS}
    sustained, best = engine_alone(10_000, seconds)
    rows.append([ENGINE_ALONE, "arrow 10,000", "-", "-", "-", sustained, *["-"] * 7])
    rows.append([ENGINE_BEST, "arrow 10,000", "-", "-", "-", best, *["-"] * 7])
    soak_samples: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with server("hello", work, False) as (url, pid):
            for name, (_n, conns, payload, ctype) in payloads.items():
                if ctype != "application/json" or name.startswith("columns"):
                    continue  # the hello world reads any body: rows stand for the rest
                load = wrk(url, payload, conns, seconds, work, pid)
                rows.append(["aiohttp hello world", name, conns, "-", load.requests_per_s, "-", *_tail(load)])
        with server("floor", work, False) as (url, pid):  # bench/floor_server.py: single contracts only
            _n, conns, payload, _ctype = payloads["single"]
            if not args.quick:
                wrk(url, payload, conns, min(seconds, 2.0), work, pid)  # warm-up
            load = wrk(url, payload, conns, seconds, work, pid)
            rows.append([FLOOR, "single", conns, "-", load.requests_per_s, "-", *_tail(load)])
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        counts = [int(e) for e in args.engines.split(",") if e.strip()]
        workers = [int(w) for w in args.http_workers.split(",") if w.strip()]
        setups = [(m, e, w) for m in modes for e in (counts if m == "process" else [1]) for w in workers]
        runs = [(m, e, w, t) for m, e, w in setups for t in ((False,) if args.quick else (False, True))]
        for mode, engines, nworkers, training in runs:
            with server("spectralmc", work, training, mode, engines, nworkers) as (url, pid):
                time.sleep(1.0)
                idle = rss_bytes(pid)
                for name, (n, conns, payload, ctype) in payloads.items():
                    if not args.quick:
                        wrk(url, payload, conns, min(seconds, 2.0), work, pid, ctype)  # warm-up
                    load = wrk(url, payload, conns, seconds, work, pid, ctype)
                    label = f"spectralmc {'training' if training else 'serving only'}"
                    if len(modes) > 1 or mode != "process":
                        label += f" ({mode})"
                    if engines > 1 or len(counts) > 1:
                        label += f" ({engines} engine{'s' if engines > 1 else ''})"
                    if nworkers > 1 or len(workers) > 1:
                        label += f" ({nworkers} HTTP worker{'s' if nworkers > 1 else ''})"
                    row = [label, name, conns, f"{idle / 2**20:.0f}", load.requests_per_s, load.requests_per_s * n]
                    rows.append([*row, *_tail(load, f"{load.rss_peak / 2**20:.0f}")])
                if args.soak_minutes and not training and not args.quick and (mode, engines, nworkers) == setups[0]:
                    soak_samples = soak(url, pid, args.soak_minutes, work)
    # again at the end: a VM's speed drifts over the minutes of a run (the ratio takes both)
    rows.append([ENGINE_ALONE_END, "arrow 10,000", "-", "-", "-", engine_alone(10_000, seconds)[0], *["-"] * 7])
    headers = [
        "server",
        "requests",
        "conns",
        "RSS idle MiB",  # of the server's processes together (HTTP and engine)
        "req/s",
        "options/s",
        "p50 ms",
        "p99 ms",
        "non-2xx",
        "RSS load MiB",
        "CPU us/req HTTP",  # user + system over the wrk run, per request: the HTTP process(es)
        "engine",  # the engine process(es)
        "wrk",  # the load generator, on the same cores
    ]
    text = table(headers, rows)
    print(text)
    ratios = _ratios(rows)
    print(ratios)
    text = f"{text}\n\n{ratios}"
    soak_text = ""
    if soak_samples:
        warm = [r for t, r in soak_samples if t >= 60.0] or [r for _, r in soak_samples]
        soak_text = (
            f"\n\nSoak: {args.soak_minutes:g} min of single-contract load at concurrency 64, RSS sampled every 5 s: "
            f"{min(warm) / 2**20:.1f} MiB to {max(warm) / 2**20:.1f} MiB after the first minute "
            f"(first sample after warm-up {warm[0] / 2**20:.1f} MiB, last {warm[-1] / 2**20:.1f} MiB)."
        )
        print(soak_text.strip())
    publish(args, "server_load", lambda path: _plot(rows, soak_samples, path), f"{text}{soak_text}", "server load")
    return 0


FLOOR = "floor: aiohttp, batching, an engine process"
ENGINE_ALONE = "engine alone (in process, sustained)"
ENGINE_BEST = "engine alone (in process, best call)"
ENGINE_ALONE_END = "engine alone (in process, sustained, at the end)"


def _tail(load: Load, rss: str = "-") -> list[object]:
    """A row's columns from p50 on: latency, errors, RSS under load, CPU per request."""
    cpu = [f"{load.cpu_us[k]:.0f}" for k in ("http", "engine", "wrk")]
    return [load.p50_ms, load.p99_ms, load.non_2xx, rss, *cpu]


def _ratios(rows: list[list[object]]) -> str:
    """The targets' ratios from the table: req/s against the hello world's (single), and
    the Arrow book's options/s against the engine alone's, sustained (as long as a wrk
    run; the mean of its measures at the run's start and end), with the ratio to its best
    call beside it."""
    hello = {r[1]: float(str(r[4])) for r in rows if r[0] == "aiohttp hello world"}
    sustained = [float(str(r[5])) for r in rows if r[0] in (ENGINE_ALONE, ENGINE_ALONE_END)]
    engine = sum(sustained) / len(sustained)
    best = next(float(str(r[5])) for r in rows if r[0] == ENGINE_BEST)
    floor = next((float(str(r[4])) for r in rows if r[0] == FLOOR), None)
    lines = []
    if floor is not None and hello.get("single"):
        lines.append(f"- {FLOOR}, single: {floor / hello['single']:.2f}x hello world req/s")
    for r in rows:
        if not str(r[0]).startswith("spectralmc"):
            continue
        if r[1] == "single" and hello.get("single"):
            lines.append(f"- {r[0]}, single: {float(str(r[4])) / hello['single']:.2f}x hello world req/s")
        if r[1] == "arrow 10,000":
            rate = float(str(r[5]))
            lines.append(
                f"- {r[0]}, arrow 10,000: {rate / engine:.2f}x the engine alone's sustained options/s "
                f"({rate / best:.2f}x its best call)"
            )
    return "\n".join(lines)


def _plot(rows: list[list[object]], soak: list[tuple[float, int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if soak else 2, figsize=(15 if soak else 10, 4))
    served = [r for r in rows if r[4] != "-"]
    labels = [f"{r[0]}\n{r[1]}" for r in served]
    axes[0].barh(labels, [float(str(r[4])) for r in served])
    axes[0].set_xlabel("requests/s")
    axes[1].barh(labels, [float(str(r[7])) for r in served])
    axes[1].set_xlabel("p99 latency (ms)")
    axes[1].set_yticks([])
    if soak:
        axes[2].plot([t / 60 for t, _ in soak], [r / 2**20 for _, r in soak])
        axes[2].set_xlabel("minutes of load")
        axes[2].set_ylabel("server RSS (MiB)")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
