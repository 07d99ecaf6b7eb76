"""Version-store latency: commit and load of 1 MB and 50 MB checkpoints, and list /
verify of 1,000 versions, on the local-directory backend and on a real S3 server
(SeaweedFS ``weed mini`` on loopback, started here).

    python bench/store.py --record
    python bench/store.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))  # devtools/ (the SeaweedFS launcher)

from common import output_args, plot_file, record, save_figure, table

from devtools.seaweed import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS, boto3_client
from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.store.objects import LocalObjectStore, ObjectStore
from spectralmc_server.store.s3 import S3ObjectStore, S3Settings
from spectralmc_server.store.versions import VersionStore


def checkpoint(mbytes: float, tag: int) -> Checkpoint:
    """A checkpoint of about ``mbytes`` MB: a third served weights, two thirds training state."""
    n = max(int(mbytes * 1e6 / 4 / 3), 1)
    g = torch.Generator().manual_seed(tag)
    return Checkpoint(
        manifest={"model": {"process": "bench"}, "state": {"step": tag}, "metrics": {}},
        model={"w": torch.randn(n, generator=g)},
        training={"weights/w": torch.randn(n, generator=g), "optim/0/exp_avg": torch.randn(n, generator=g)},
    )


async def timed(fn: Callable[[], Awaitable[Any]], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def _commit_next(vs: VersionStore, encoded: Iterator[dict[str, bytes]]) -> object:
    return await vs.commit_files(next(encoded), "bench")


async def measure(objects: ObjectStore, sizes: list[float], n_versions: int, repeat: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for mb in sizes:
        vs = VersionStore(objects, f"size{int(mb)}")
        encoded = iter([checkpoint(mb, i).encode() for i in range(repeat)])  # encoded first: time the store only
        out[f"commit {mb:g} MB"] = await timed(partial(_commit_next, vs, encoded), repeat)
        out[f"load {mb:g} MB (all files)"] = await timed(partial(vs.load, 1, need_training=True), repeat)
    vs = VersionStore(objects, "many")
    files = checkpoint(0.001, 0).encode()
    t0 = time.perf_counter()
    for i in range(n_versions):
        await vs.commit_files(files, f"v{i}")
    out[f"commit (mean of {n_versions}, tiny)"] = (time.perf_counter() - t0) / n_versions
    out[f"head lookup ({n_versions} versions)"] = await timed(vs.head, 5)
    out[f"list {n_versions} versions"] = await timed(vs.versions, 3)
    out[f"verify {n_versions} versions"] = await timed(vs.verify, 3)
    return out


@asynccontextmanager
async def s3_store(server: SeaweedFS) -> AsyncIterator[ObjectStore]:
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    boto3_client(server.endpoint_url).create_bucket(Bucket=bucket)
    settings = S3Settings(
        endpoint_url=server.endpoint_url, region=REGION, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY
    )
    async with S3ObjectStore(bucket, "bench", settings) as store:
        yield store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    output_args(ap)
    args = ap.parse_args(argv)
    sizes = [1.0, 50.0]
    if args.quick:
        sizes, args.versions, args.repeat = [1.0], 20, 2
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["local directory"] = asyncio.run(
            measure(LocalObjectStore(Path(tmp) / "local"), sizes, args.versions, args.repeat)
        )
        server = SeaweedFS(Path(tmp) / "weed", Path(tmp) / "weed.log")
        (Path(tmp) / "weed").mkdir()
        server.start()
        try:

            async def on_s3() -> dict[str, float]:
                async with s3_store(server) as store:
                    return await measure(store, sizes, args.versions, args.repeat)

            results["S3 (SeaweedFS, loopback)"] = asyncio.run(on_s3())
        finally:
            server.stop()
    names = list(next(iter(results.values())))
    rows = [[name, *(f"{results[b][name] * 1e3:.1f}" for b in results)] for name in names]
    result_table = table(["operation", *(f"{b}: ms" for b in results)], rows)
    print(result_table)
    plot_path = plot_file(args, "store.png")
    plot(plot_path, results)
    print(f"plot: {plot_path}")
    if args.record:
        record(
            "store",
            f"""### Version store latency

Median of {args.repeat} runs (tiny commits: mean of {args.versions}); checkpoints are
encoded before timing, so the figures are the store's own: uploads of content blobs
with put-if-absent, the record claim and the head CAS, with fsync on the local backend.
SeaweedFS runs as `weed mini` on loopback on the same 2-core machine.

{result_table}

![store](img/store.png)
""",
        )
    return 0


def plot(path: Path, results: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(next(iter(results.values())))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(results)
    for i, (backend, vals) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(names))], [vals[n] * 1e3 for n in names], width, label=backend)
    ax.set_xticks([j + width / 2 for j in range(len(names))], names, rotation=20, fontsize=7, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("milliseconds")
    ax.set_title("Version store latency")
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
