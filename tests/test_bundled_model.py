"""The bundled models: present, small, covering the promised domain, and as accurate as
docs/benchmarks.md says on a random held-out sample (a regression guard; the full
measurements are bench/accuracy_gbm.py, accuracy_heston.py and accuracy_merton.py)."""

from __future__ import annotations

import pytest
import torch

from spectralmc_server.engine.checkpoint import read_dir, run_facts
from spectralmc_server.engine.pricer import OptionBatch
from spectralmc_server.engine.processes import ModelDomain, get_process
from spectralmc_server.engine.reference import black_scholes
from spectralmc_server.engine.reference_pricers import reference_pricer
from spectralmc_server.engine.served import Evaluation, load_served_model
from spectralmc_server.models import bundled_models

F64 = torch.float64


def test_bundled_gbm_model_is_small_and_covers_the_domain() -> None:
    path = bundled_models()["gbm"]
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 3 << 20, f"bundled model is {size} bytes"
    ckpt = read_dir(path)  # verifies every file against the manifest's hashes
    domain = ckpt.manifest["model"]["domain"]["ranges"]
    vol, expiry = domain
    assert vol["name"] == "vol" and vol["low"] <= 0.05 and vol["high"] >= 1.0
    assert expiry["name"] == "expiry_years" and expiry["low"] <= 0.02 and expiry["high"] >= 3.0
    assert ckpt.manifest["model"]["network"]["baseline"] == "none"  # learned, not given the answer
    assert ckpt.manifest["state"]["elapsed_seconds"] <= 15 * 60
    assert ckpt.manifest["metrics"]["command"].startswith("spectralmc train --process gbm")


def test_bundled_gbm_model_accuracy_on_a_held_out_sample() -> None:
    served = load_served_model(read_dir(bundled_models()["gbm"], need_training=False))
    g = torch.Generator().manual_seed(2026)
    n = 4000
    vol = 0.05 + 0.95 * torch.rand(n, generator=g, dtype=F64)
    expiry = 0.02 + 2.98 * torch.rand(n, generator=g, dtype=F64)
    spot = torch.full((n,), 100.0, dtype=F64)
    rate = 0.1 * torch.rand(n, generator=g, dtype=F64) - 0.02
    dividend = 0.04 * torch.rand(n, generator=g, dtype=F64)
    fwd = spot * torch.exp((rate - dividend) * expiry)
    strike = fwd * (0.7 + 0.6 * torch.rand(n, generator=g, dtype=F64))
    is_call = torch.rand(n, generator=g) < 0.5
    batch = OptionBatch(spot, strike, expiry, rate, dividend, is_call, vol[:, None])
    # the network's own accuracy over its domain and certified K/F range (the served
    # pricer swaps the rare learned price that breaks a model-free bound for the reference)
    assert bool(served.pricer.servable(batch, frozenset({"price"})).all())
    ev = Evaluation(served.pricer.learned.evaluate(batch, frozenset({"price"})), torch.ones(n, dtype=torch.bool))
    bs = black_scholes(spot, strike, expiry, rate, dividend, vol, is_call)["price"]
    err_bp = (ev.values["price"] - bs).abs() / spot * 1e4
    p95 = float(torch.quantile(err_bp, 0.95))
    # Targets of issue 2: p95 <= 5 bp, max <= 25 bp (measured: ~1 bp and ~6 bp).
    assert p95 <= 5.0 and float(err_bp.max()) <= 25.0, (p95, float(err_bp.max()))


# -- Heston and Merton ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["heston", "merton", "asian", "rbergomi"])
def test_bundled_model_is_small_and_covers_its_process_default_domain(name: str) -> None:
    path = bundled_models()[name]
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 4 << 20, f"bundled {name} model is {size} bytes"
    ckpt = read_dir(path)
    assert ckpt.manifest["model"]["process"] == name
    domain = ModelDomain.model_validate(ckpt.manifest["model"]["domain"])
    # what the docs and the schemas promise (a newer trainer records the validated K/F range,
    # the default one, in the domain)
    default = get_process(name).default_domain()
    assert domain.ranges == default.ranges and domain.certified_moneyness == default.certified_moneyness
    command = run_facts(ckpt.manifest)["command"]  # the run facts, or metrics.command before them
    assert command is not None and command.startswith(f"spectralmc train --process {name}"), command


@pytest.mark.parametrize("name", ["heston", "merton"])
def test_bundled_model_accuracy_on_a_held_out_sample(name: str) -> None:
    """Random points of the domain (not the training or validation Sobol sets), random
    strikes K/F in [0.7, 1.3], r and q non-zero, against COS on the analytic CF. Targets of
    issue 6: p95 <= 10 bp, max <= 50 bp of spot."""
    served = load_served_model(read_dir(bundled_models()[name], need_training=False))
    g = torch.Generator().manual_seed(6)
    n = 2000
    u = torch.rand(n, served.domain.dims, generator=g, dtype=F64)
    theta, expiry = served.domain.from_unit(u)
    spot = torch.full((n,), 100.0, dtype=F64)
    rate = 0.1 * torch.rand(n, generator=g, dtype=F64) - 0.02
    dividend = 0.04 * torch.rand(n, generator=g, dtype=F64)
    fwd = spot * torch.exp((rate - dividend) * expiry)
    strike = fwd * (0.7 + 0.6 * torch.rand(n, generator=g, dtype=F64))
    is_call = torch.rand(n, generator=g) < 0.5
    batch = OptionBatch(spot, strike, expiry, rate, dividend, is_call, theta)
    # the network's own accuracy over its domain and certified K/F range (the served
    # pricer swaps the rare learned price that breaks a model-free bound for the reference)
    assert bool(served.pricer.servable(batch, frozenset({"price"})).all())
    ev = Evaluation(served.pricer.learned.evaluate(batch, frozenset({"price"})), torch.ones(n, dtype=torch.bool))
    truth = reference_pricer(served.process).evaluate(batch, frozenset({"price"}))["price"]
    err_bp = (ev.values["price"] - truth).abs() / spot * 1e4
    p95 = float(torch.quantile(err_bp, 0.95))
    assert p95 <= 10.0 and float(err_bp.max()) <= 50.0, (p95, float(err_bp.max()))
