"""The shared normals pool: reproducible blocks, modes, antithetics, caps, concurrency."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from spectralmc_server.engine.device import BudgetExceededError, MemoryBudget
from spectralmc_server.engine.normals import (
    NormalsConfig,
    NormalsMode,
    NormalsPool,
    generate_block,
    sobol_bits,
    sobol_engine,
)

CPU = torch.device("cpu")


def _pool(config: NormalsConfig, *, prefetch: bool = True) -> NormalsPool:
    return NormalsPool(config, MemoryBudget("normals", 64 << 20), CPU, prefetch=prefetch)


@pytest.mark.parametrize("mode", ["sobol", "pseudo"])
def test_blocks_are_a_pure_function_of_seed_and_index(mode: str) -> None:
    cfg = NormalsConfig.model_validate(dict(seed=7, mode=mode, rows=256, dims=8, cache_blocks=2, lookahead=1))
    direct = [generate_block(cfg, i, CPU) for i in range(6)]
    # Different buffering: a tiny cache with prefetching, read in order...
    with _pool(cfg) as pool:
        stream = pool.stream()
        in_order = [stream.next()[1].clone() for _ in range(6)]
    # ...a larger cache, no prefetch, read backwards and twice.
    bigger = cfg.model_copy(update={"cache_blocks": 8, "lookahead": 0})
    with _pool(bigger, prefetch=False) as pool:
        backwards = [pool.block(i).clone() for i in reversed(range(6))][::-1]
        again = [pool.block(i) for i in range(6)]
    for a, b, c, d in zip(direct, in_order, backwards, again, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    assert not torch.equal(direct[0], direct[1])


def test_seeds_and_indices_give_different_blocks() -> None:
    a = generate_block(NormalsConfig(seed=1, rows=64, dims=4), 0, CPU)
    b = generate_block(NormalsConfig(seed=2, rows=64, dims=4), 0, CPU)
    c = generate_block(NormalsConfig(seed=1, rows=64, dims=4), 1, CPU)
    assert not torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("mode", ["sobol", "pseudo"])
def test_blocks_are_standard_normal(mode: str) -> None:
    cfg = NormalsConfig.model_validate(dict(seed=3, mode=mode, antithetic=False, rows=4096, dims=16, dtype="float64"))
    z = generate_block(cfg, 0, CPU)
    n = z.shape[0]
    assert z.shape == (4096, 16) and z.dtype == torch.float64
    # Mean and variance of each column within 5 standard errors of N(0, 1).
    assert float(z.mean(0).abs().max()) < 5 / math.sqrt(n)
    assert float((z.var(0) - 1).abs().max()) < 5 * math.sqrt(2 / n)
    # Kolmogorov-Smirnov distance of the pooled sample to the normal CDF.
    x = z.flatten().sort().values
    cdf = torch.special.ndtr(x)
    emp = torch.arange(1, x.numel() + 1, dtype=torch.float64) / x.numel()
    assert float((cdf - emp).abs().max()) < 1.63 / math.sqrt(x.numel()) * 1.5


def test_sobol_columns_are_stratified() -> None:
    """Each column of a scrambled Sobol block has exactly one point per 1/n stratum."""
    cfg = NormalsConfig(seed=5, mode="sobol", antithetic=False, rows=512, dims=32, dtype="float64")
    u = torch.special.ndtr(generate_block(cfg, 3, CPU))  # back to [0, 1)
    strata = torch.floor(u * 512).long()
    for col in strata.t():
        assert torch.equal(col.sort().values, torch.arange(512))


def test_sobol_beats_pseudo_on_a_smooth_expectation() -> None:
    """E[cos(Z)] = exp(-1/2): quasi-random error is far below pseudo-random error."""
    exact = math.exp(-0.5)
    errs = {}
    for mode in ("sobol", "pseudo"):
        cfg = NormalsConfig.model_validate(
            dict(seed=11, mode=mode, antithetic=False, rows=1024, dims=64, dtype="float64")
        )
        z = generate_block(cfg, 0, CPU)
        errs[mode] = float((torch.cos(z).mean(0) - exact).pow(2).mean().sqrt())
    assert errs["sobol"] < errs["pseudo"] / 20


def test_antithetic_rows_are_negated() -> None:
    z = generate_block(NormalsConfig(seed=0, rows=128, dims=3, antithetic=True), 4, CPU)
    assert torch.equal(z[64:], -z[:64])
    assert float(z.sum(0).abs().max()) == 0.0


def test_configuration_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="even"):
        NormalsConfig(rows=7, antithetic=True, mode="pseudo")
    with pytest.raises(ValueError, match="power-of-two"):
        NormalsConfig(rows=96, mode="sobol")
    with pytest.raises(ValueError, match="at most 21201 dims"):
        NormalsConfig(rows=64, dims=30_000, mode="sobol")
    with pytest.raises(ValueError, match="non-negative"):
        generate_block(NormalsConfig(), -1, CPU)


def test_pool_refuses_a_configuration_over_its_cap() -> None:
    cfg = NormalsConfig(rows=1024, dims=1024, cache_blocks=8)  # (8 + 1) x 4 MiB + 3 x 4 MiB workspace
    budget = MemoryBudget("normals", 24 << 20)
    with pytest.raises(BudgetExceededError, match=r"normals pool .* needs 48\.0 MiB .* 24\.0 MiB cap"):
        NormalsPool(cfg, budget, CPU)
    assert budget.reserved_bytes == 0  # nothing was held back by the refusal
    small = cfg.model_copy(update={"cache_blocks": 1})
    with NormalsPool(small, budget, CPU) as pool:
        assert budget.report().reserved_bytes == small.pool_bytes() == 20 << 20
        assert pool.cached_blocks == 0
    assert budget.reserved_bytes == 0  # released on close


def test_cache_never_holds_more_than_its_capacity() -> None:
    cfg = NormalsConfig(rows=64, dims=4, cache_blocks=3, lookahead=2)
    with _pool(cfg) as pool:
        s = pool.stream()
        for _ in range(20):
            s.next()
            assert pool.cached_blocks <= 3


def test_concurrent_consumers_get_the_same_blocks() -> None:
    cfg = NormalsConfig(seed=9, rows=128, dims=16, cache_blocks=4, lookahead=2)
    expected = [generate_block(cfg, i, CPU) for i in range(24)]
    results: dict[int, list[tuple[int, torch.Tensor]]] = {}
    errors: list[BaseException] = []
    with _pool(cfg) as pool:

        def consume(worker: int) -> None:
            try:
                # Four consumers: two share stride 1 from 0, two interleave even/odd blocks.
                start, stride = [(0, 1), (0, 1), (0, 2), (1, 2)][worker]
                stream = pool.stream(start=start, stride=stride)
                n = 24 if stride == 1 else 12
                results[worker] = [(i, z.clone()) for i, z in (stream.next() for _ in range(n))]
                stream.close()
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=consume, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors
    assert sorted(results) == [0, 1, 2, 3]
    for got in results.values():
        for index, z in got:
            assert torch.equal(z, expected[index])
    assert [i for i, _ in results[2]] == list(range(0, 24, 2))
    assert [i for i, _ in results[3]] == list(range(1, 24, 2))


def test_stream_seek_resumes_at_a_position() -> None:
    cfg = NormalsConfig(seed=4, rows=64, dims=2)
    with _pool(cfg) as pool:
        s = pool.stream()
        first = [s.next() for _ in range(5)]
        s.seek(2)
        again = s.next()
        assert again[0] == 2 and torch.equal(again[1], first[2][1])
        with pytest.raises(ValueError, match="non-negative"):
            s.seek(-1)


def test_closed_pool_refuses_work() -> None:
    pool = _pool(NormalsConfig(rows=64, dims=2))
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.block(0)


# -- Sobol on the device, prefetch statistics, live bytes ------------------------------------
@pytest.mark.parametrize("mode", ["sobol", "sobol_shift"])
@pytest.mark.parametrize(
    ("rows", "dims", "antithetic"), [(512, 3, True), (256, 2048, True), (64, 7, False), (1, 5, False)]
)
def test_device_sobol_route_gives_the_host_route_bits(
    mode: NormalsMode, rows: int, dims: int, antithetic: bool
) -> None:
    """The device route (used on CUDA) builds the same integer points as torch's
    SobolEngine on the host; run on the CPU, both routes give identical blocks."""
    cfg = NormalsConfig(seed=3, mode=mode, rows=rows, dims=dims, antithetic=antithetic, dtype="float64")
    for index in (0, 1, 17):
        host = generate_block(cfg, index, CPU, sobol_on_device=False)
        device = generate_block(cfg, index, CPU, sobol_on_device=True)
        assert torch.equal(host, device), (mode, index)


def test_sobol_bits_match_the_engine_and_refuse_other_counts() -> None:
    engine = sobol_engine(6, seed=11)
    state, shift = engine.sobolstate.clone(), engine.shift.clone()
    drawn = (engine.draw(64, dtype=torch.float64)[1:] * 2.0**30).to(torch.int64)  # row 0 is kept in float32
    bits = sobol_bits(state, shift, 64, CPU)
    assert bits.dtype == torch.int32
    assert torch.equal(bits[1:].to(torch.int64), drawn)
    with pytest.raises(ValueError, match="power-of-two"):
        sobol_bits(state, shift, 48, CPU)


def test_pool_statistics_show_prefetch_hiding_generation() -> None:
    cfg = NormalsConfig(seed=2, rows=256, dims=512, cache_blocks=3, lookahead=2)
    with NormalsPool(cfg, MemoryBudget("n", 1 << 30), CPU, prefetch=False) as pool:
        s = pool.stream()
        for _ in range(4):
            s.next()
        assert (pool.stats.ready, pool.stats.waited, pool.stats.generated) == (0, 0, 4)
        assert pool.stats.hidden_fraction == 0.0
    with NormalsPool(cfg, MemoryBudget("n", 1 << 30), CPU) as pool:
        s = pool.stream()
        for _ in range(6):
            deadline = time.monotonic() + 10
            while not pool.is_cached(s.position) and time.monotonic() < deadline:  # a slow consumer
                time.sleep(0.005)
            s.next()
        st = pool.stats
        assert (st.ready, st.waited, st.generated) == (6, 0, 0)
        assert st.hidden_fraction == 1.0
        assert st.prefetch_generate_seconds > 0


def test_pool_live_bytes_are_its_cached_blocks_and_stay_within_the_reservation() -> None:
    cfg = NormalsConfig(rows=128, dims=64, cache_blocks=2, lookahead=0)
    budget = MemoryBudget("normals", 1 << 30)
    with NormalsPool(cfg, budget, CPU) as pool:
        assert pool.live_bytes() == 0 == budget.report().live_bytes
        pool.block(0)
        assert pool.live_bytes() == cfg.block_bytes()
        for i in range(1, 5):
            pool.block(i)
        assert pool.live_bytes() == 2 * cfg.block_bytes() == budget.report().live_bytes
        assert budget.report().live_bytes <= budget.report().reserved_bytes
    assert budget.report().live_bytes == 0  # released with the pool


@pytest.mark.gpu
def test_cuda_pool_hands_blocks_across_streams_with_the_same_values() -> None:
    """Blocks made on the pool's own CUDA stream reach a consumer on another stream intact
    (the consumer's stream waits on the block's event), equal to a direct generation."""
    cuda = torch.device("cuda")
    cfg = NormalsConfig(seed=4, mode="sobol_shift", rows=1024, dims=2048, cache_blocks=3, lookahead=2)
    consumer = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    with NormalsPool(cfg, MemoryBudget("n", 1 << 30), cuda) as pool, torch.cuda.stream(consumer):
        s = pool.stream()
        time.sleep(0.5)  # let the prefetcher run ahead on its stream
        got = [s.next()[1].sum(dtype=torch.float64) for _ in range(4)]
        expected = [generate_block(cfg, i, cuda).sum(dtype=torch.float64) for i in range(4)]
        torch.cuda.synchronize()
        assert [float(g) for g in got] == [float(e) for e in expected]
        assert pool.stats.ready >= 1


@pytest.mark.gpu
def test_cuda_block_generation_stays_within_the_pool_reservation() -> None:
    """The byte accounting against torch's allocator: generating one block (device Sobol,
    inverse CDF, antithetic copy) peaks within generation_bytes() + block_bytes()."""
    cuda = torch.device("cuda")
    for mode in ("sobol", "sobol_shift", "pseudo"):
        cfg = NormalsConfig(seed=1, mode=mode, rows=2048, dims=4096)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        z = generate_block(cfg, 0, cuda)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        assert torch.cuda.memory_allocated() - base == z.untyped_storage().nbytes() == cfg.block_bytes()
        assert peak <= cfg.generation_bytes() + cfg.block_bytes(), (mode, peak)
        del z


def test_the_sobol_dimension_bound_is_torchs() -> None:
    """engine/normals.py states SobolEngine's bound without importing torch (it is
    imported where torch is not: spectralmc_server/lazy_torch.py)."""
    from torch.quasirandom import SobolEngine

    from spectralmc_server.engine.normals import SOBOL_MAX_DIMS

    assert SobolEngine.MAXDIM == SOBOL_MAX_DIMS
