"""Start-up time of ``spectralmc price`` for one contract, next to its floor.

Each command is run ``--repeat`` times as a fresh process (wall time, median and max);
the floor is the interpreter itself and ``import torch``, measured in the same run, since
this machine's speed varies from one VM to the next: the ratio to ``import torch`` is the
figure that carries over.

    python bench/cli_startup.py --record     # 7 runs each, writes docs/
    python bench/cli_startup.py --quick      # 1 timed run each
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import output_args, plot_file, publish, save_figure, table

ONE = (
    b'{"contracts": [{"id": "a", "right": "call", "strike": 100, "spot": 100, '
    b'"expiry_years": 1, "rate": 0.02, "dividend": 0.0, "vol": 0.2}]}'
)
TARGET_SECONDS = 1.5


def timed(cmd: list[str], stdin: bytes, repeat: int) -> list[float]:
    """Wall seconds of ``repeat`` fresh runs of ``cmd`` (after one untimed run: disk caches warm)."""
    runs = []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=120, check=False)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
        if i:
            runs.append(elapsed)
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per command (default 7)")
    ap.add_argument("--quick", action="store_true", help="1 timed run per command: a smoke test")
    output_args(ap)
    args = ap.parse_args(argv)
    repeat = 1 if args.quick else args.repeat
    py = sys.executable
    with tempfile.TemporaryDirectory() as home:
        env_home = ["env", f"HOME={home}"]  # no user settings or store in the way
        commands = [
            ("python -c pass", [py, "-c", "pass"], b""),
            ("python -c 'import torch'", [py, "-c", "import torch"], b""),
            ("spectralmc --version", [*env_home, py, "-m", "spectralmc_server.cli", "--version"], b""),
            (
                "spectralmc price, one contract (bundled model)",
                [*env_home, py, "-m", "spectralmc_server.cli", "price"],
                ONE,
            ),
        ]
        results = {label: timed(cmd, stdin, repeat) for label, cmd, stdin in commands}
    torch_s = statistics.median(results["python -c 'import torch'"])
    rows = [[label, statistics.median(r), max(r), statistics.median(r) / torch_s] for label, r in results.items()]
    text = table(["command (fresh process)", "median s", "max s", "x import torch"], rows)
    price = statistics.median(results["spectralmc price, one contract (bundled model)"])
    verdict = (
        f"One contract: {price:.2f} s median, {price / torch_s:.2f}x `import torch` ({torch_s:.2f} s) in the same run; "
        f"target <= {TARGET_SECONDS} s on this machine: {'met' if price <= TARGET_SECONDS else 'not met'}."
    )
    print(text)
    print(verdict)

    def draw(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.2))
        labels = list(results)
        ax.barh(labels, [statistics.median(r) for r in results.values()])
        ax.axvline(TARGET_SECONDS, color="red", linestyle="--", label=f"target {TARGET_SECONDS} s (one contract)")
        ax.set_xlabel("wall seconds, median of fresh processes")
        ax.invert_yaxis()
        ax.legend(loc="lower right")
        save_figure(fig, path)

    args.plot = plot_file(args, "cli_startup.png")
    body = (
        "### Start-up of `spectralmc price` (`bench/cli_startup.py`)\n\n"
        f"Each command as a fresh process, {repeat} timed runs after one untimed (disk caches warm), "
        f"HOME set to an empty directory.\n\n{text}\n\n{verdict}"
    )
    publish(args, "cli_startup", draw, body, image="CLI start-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
