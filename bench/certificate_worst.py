"""The worst rows of a certificate whose truth is Monte Carlo: how much of a certificate's
price error is the model's, and how much the truth's own noise?

A certificate (engine/certify.py) compares the learned price with its truth on
``points`` scrambled Sobol points x 13 strikes; where the truth is simulated
(``CERT_MC_PATHS`` = 8,192 paths in 8 groups) it adds 3 standard errors of the truth to
every error, so the bounds widen rather than hide errors. The quality gate's price
``max`` then sees error + 3 SE. This benchmark:

1. draws the certificate's own book (``sample`` with its seed), prices it with the raw
   network (``served.pricer.learned``) and with the certificate's truth (price only;
   the truth is batch-invariant, so each row gets the value the certificate saw), and
   reproduces the certificate's price ``max`` (error + 3 SE);
2. takes the ``--worst`` rows by error + 3 SE and prices them again with a finer truth:
   the same Monte-Carlo reference with ``--fine-paths`` paths (8 groups, another seed);
3. prices those rows through the served pricer (``served.pricer``: the learned model
   only where the contract's certified bound is within the measure's tolerance, else
   the reference), to show what a client is answered there.

Errors are in bp of the discounted forward (the book has spot 1 and no rates: bp of
spot).

    python bench/certificate_worst.py --record       # the bundled rbergomi model (about 15 min)
    python bench/certificate_worst.py --quick        # smoke test: 16 points, 4 rows
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import orjson
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import output_args, plot_file, publish, save_figure, table

from spectralmc_server.engine.certify import CERT_SEED, MC_SE_MULTIPLE, MIN_POINTS, sample, truth_pricer
from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.reference_pricers import MonteCarloReference, reference_with_error
from spectralmc_server.engine.served import load_served_model
from spectralmc_server.models import bundled_models

BP = 1e4
FINE_SEED = 12345  # the finer truth's: neither the certificate's nor the served reference's
PRICE = frozenset({"price"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled rbergomi model)")
    ap.add_argument("--certificate", type=Path, help="certificate.json to explain (default: the model's own)")
    ap.add_argument("--points", type=int, default=MIN_POINTS, help="the certificate's points (x 13 strikes)")
    ap.add_argument("--worst", type=int, default=12, help="rows re-priced with the finer truth")
    ap.add_argument("--fine-paths", type=int, default=1 << 17, help="paths of the finer truth")
    ap.add_argument("--quick", action="store_true", help="16 points, 4 rows, 16,384 fine paths: a smoke test")
    output_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.points, args.worst, args.fine_paths = 16, 4, 1 << 14
    model_dir = args.model or bundled_models()["rbergomi"]
    ckpt = read_dir(model_dir)
    if args.certificate is not None:
        ckpt = replace(ckpt, certificate=orjson.loads(args.certificate.read_bytes()))
    served = load_served_model(ckpt)
    cert = ckpt.certificate or {}
    process = served.process
    if not isinstance(served.pricer.reference, MonteCarloReference):
        print(f"{process.name}: the truth is not simulated (no standard error to separate)")
        return 2

    batch, _, _ = sample(process, served.domain, args.points, CERT_SEED)
    learned = served.pricer.learned.evaluate(batch, PRICE)["price"]
    t0 = time.perf_counter()
    truth, se = reference_with_error(truth_pricer(served), batch, PRICE)
    truth_s = time.perf_counter() - t0
    err = (learned - truth["price"]).abs()
    total = err + MC_SE_MULTIPLE * se["price"]
    order = torch.argsort(total, descending=True)[: args.worst]
    worst = batch.select(order)
    fine = truth_pricer(served, FINE_SEED, paths=args.fine_paths)
    t0 = time.perf_counter()
    fine_truth, fine_se = reference_with_error(fine, worst, PRICE)
    fine_s = time.perf_counter() - t0
    ev = served.pricer.evaluate(worst, PRICE)

    names = [r.name for r in served.domain.ranges if r.name != "expiry_years"]
    rows = []
    fine_err = (learned[order] - fine_truth["price"]).abs()
    served_err = (ev.values["price"] - fine_truth["price"]).abs()
    for j, i in enumerate(order.tolist()):
        rows.append(
            [
                *(round(float(x), 3) for x in worst.theta[j]),
                round(float(worst.expiry[j]), 3),
                round(float(worst.strike[j]), 3),
                float(err[i]) * BP,
                float(se["price"][i]) * BP,
                float(total[i]) * BP,
                float(fine_err[j]) * BP,
                float(fine_se["price"][j]) * BP,
                "learned" if bool(ev.learned[j]) else "reference",
                float(served_err[j]) * BP,
                float(ev.bounds["price"][j]) * BP,
            ]
        )
    heads = [*names, "T", "K/F", "err bp", "SE bp", "err+3SE bp", "err vs fine bp", "fine SE bp"]
    heads += ["served by", "served err bp", "served bound bp"]
    text = table(heads, rows)
    recorded = cert.get("measures", {}).get("price", {}).get("max")
    summary = (
        f"{len(batch):,} rows ({args.points:,} points x 13 strikes), the certificate's truth in {truth_s:.0f} s; "
        f"price max (error + 3 SE) {float(total.max()) * BP:.1f} bp"
        + ("" if recorded is None else f" (the certificate records {recorded * BP:.1f} bp)")
        + f"; the {args.worst} worst re-priced with {args.fine_paths:,} paths in {fine_s:.0f} s: "
        f"the model's own error there at most {float(fine_err.max()) * BP:.1f} bp, "
        f"the truth's 3 SE at most {MC_SE_MULTIPLE * float(se['price'][order].max()) * BP:.1f} bp. "
        f"Served: {int(ev.learned.sum())} of {len(order)} by the learned model, the largest served error "
        f"{float(served_err.max()) * BP:.1f} bp."
    )
    print(text)
    print(summary)

    def draw(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.6))
        x = range(len(rows))
        certified = (total[order] * BP).tolist()
        own = (fine_err * BP).tolist()
        ax.bar([i - 0.2 for i in x], certified, width=0.4, label="certificate: err + 3 SE")
        ax.bar([i + 0.2 for i in x], own, width=0.4, label="err vs the finer truth")
        ax.set_xlabel("worst rows of the certificate's book")
        ax.set_ylabel("bp of spot")
        ax.legend()
        save_figure(fig, path)

    args.plot = plot_file(args, "certificate_worst.png")
    body = (
        f"### The worst rows of the `{process.name}` certificate (`bench/certificate_worst.py`)\n\n"
        f"Model `{model_dir.name}`, content hash `{served.content_hash}`; certificate on "
        f"{cert.get('sample', {}).get('points', '?')} points. Truth: {cert.get('sample', {}).get('truth', '?')}; "
        f"the finer truth the same reference with {args.fine_paths:,} paths.\n\n{text}\n\n{summary}"
    )
    publish(args, "certificate_worst", draw, body, image="certificate_worst")
    return 0


if __name__ == "__main__":
    sys.exit(main())
