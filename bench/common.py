"""Shared helpers for the benchmarks: machine description, tables, recording results.

Each benchmark prints a table, writes a PNG plot and, with ``--record``, replaces its own
section of docs/benchmarks.md (between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``)
with the table, the date, the machine and the exact command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BENCH_DOC = DOCS / "benchmarks.md"
IMG = DOCS / "img"


def machine() -> str:
    """One line naming the CPU, core count, torch build and thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def quantiles(err: torch.Tensor) -> tuple[float, float, float]:
    """(median, 95th percentile, max) of an error tensor, any shape."""
    q = torch.quantile(err.flatten().double(), torch.tensor([0.5, 0.95], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(err.max())


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (also readable printed)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(c: object) -> str:
    if isinstance(c, float):
        if c == 0 or 1e-3 <= abs(c) < 1e6:
            return f"{c:.3g}" if abs(c) < 100 else f"{c:,.0f}"
        return f"{c:.2e}"
    return str(c)


def record(name: str, body: str) -> None:
    """Replace the section ``name`` of docs/benchmarks.md (appending it if new)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"<!-- {name}:start -->\n"
        f"Recorded {stamp} on {machine()}.\n\n"
        f"Command: `{command()}`\n\n{body.strip()}\n"
        f"<!-- {name}:end -->"
    )
    text = BENCH_DOC.read_text() if BENCH_DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    BENCH_DOC.write_text(text)


def timeit(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1, quick: bool = False) -> float:
    """Median wall time of ``fn`` in seconds (``quick``: one run, no warm-up, for a smoke test)."""
    if quick:
        repeat, warmup = 1, 0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def output_args(ap: argparse.ArgumentParser, plot_default: Path | None = None) -> None:
    """The ``--record`` and ``--plot`` options every benchmark takes."""
    ap.add_argument("--record", action="store_true", help="write docs/benchmarks.md (and the plot into docs/img/)")
    where = f"default {plot_default}" if plot_default else "default docs/img/ with --record, else bench/out/"
    ap.add_argument("--plot", type=Path, default=plot_default, help=f"PNG path ({where})")


def plot_file(args: argparse.Namespace, filename: str) -> Path:
    """``--plot``, else ``filename`` in docs/img/ with ``--record``, else in bench/out/."""
    path: Path = args.plot or ((IMG if args.record else ROOT / "bench" / "out") / filename)
    return path


def save_figure(fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` as a PNG (making its folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def publish(
    args: argparse.Namespace, name: str, draw: Callable[[Path], object], body: str, image: str | None = None
) -> None:
    """The end of a benchmark with a fixed ``--plot``: draw it there and say where; with
    ``--record`` (not ``--quick``) write ``body`` (then the plot, as ``image``, when given)
    as the section ``name`` of docs/benchmarks.md."""
    draw(args.plot)
    print(f"plot: {args.plot}")
    if args.record and not args.quick:
        if image is not None:
            body = f"{body}\n\n![{image}]({args.plot.resolve().relative_to(DOCS)})"
        record(name, body)
