"""The shared pool of standard normal numbers.

A block is a ``(rows, dims)`` tensor and a pure function of
``(seed, block index, mode, antithetic, shape, dtype, device type)``: whatever the
buffering, prefetching, order of requests or number of consumers, block ``i`` holds
the same bits. That is what makes training resumable bit for bit and any Monte-Carlo
answer reproducible from its seed.

Modes:
- ``pseudo``: i.i.d. normals from torch's generator (Philox on CUDA, MT19937 on CPU).
- ``sobol``: scrambled Sobol points (one fresh scramble per block) mapped through the
  inverse normal CDF. Each column is a (0, m, 1)-net: perfectly stratified in 1-D,
  which is what cuts the variance of a characteristic-function estimate.
- ``sobol_shift``: Sobol points with a fresh random digital shift per block (each
  coordinate's bits XORed with a random 30-bit word), mapped the same way. A digital
  shift keeps every net property and makes each point uniform, so estimates stay
  unbiased; it costs a fraction of a fresh LMS scramble, which dominates generation in
  thousands of dimensions (measured at 6,144 dims x 256 rows: 306 ms to scramble
  against 25 ms to draw).

``antithetic`` makes the second half of the rows the negation of the first half.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from spectralmc_server.engine.device import MemoryBudget, tensor_bytes

SOBOL_MAX_DIMS = 21201  # torch's SobolEngine.MAXDIM (tests/engine/test_normals.py checks)


def _sobol(dims: int, **kwargs: Any) -> Any:
    """torch's SobolEngine (untyped), imported here: this module is imported where torch
    is not (lazy_torch.py)."""
    from torch.quasirandom import SobolEngine

    engine: Any = SobolEngine  # torch.quasirandom carries no type annotations
    return engine(dims, **kwargs)


def sobol_engine(dims: int, seed: int) -> Any:
    """A scrambled (LMS + digital shift) Sobol engine over [0, 1)^dims."""
    return _sobol(dims, scramble=True, seed=seed)


NormalsMode = Literal["sobol", "sobol_shift", "pseudo"]
SOBOL_BITS = 30  # torch's Sobol points are k / 2^30


class NormalsConfig(BaseModel):
    """Shape and law of the blocks in one pool."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(0, ge=0, lt=2**63)  # root of every block's stream
    mode: NormalsMode = "sobol"  # quasi-random (scrambled or shifted Sobol) or pseudo
    antithetic: bool = True  # rows [n/2:] = -rows[:n/2]
    rows: int = Field(512, gt=0)  # paths per block (a power of two in sobol mode)
    dims: int = Field(1, gt=0)  # normals per row (parameter points x normals per path)
    dtype: Literal["float32", "float64"] = "float32"
    cache_blocks: int = Field(4, ge=1)  # blocks held at once, prefetched ones included
    lookahead: int = Field(1, ge=0)  # blocks each stream generates ahead of its cursor

    @model_validator(mode="after")
    def _check(self) -> NormalsConfig:
        if self.antithetic and self.rows % 2:
            raise ValueError(f"rows must be even with antithetic=true, got {self.rows}")
        if self.mode != "pseudo":
            base = self.rows // 2 if self.antithetic else self.rows
            if base & (base - 1):
                raise ValueError(
                    f"sobol mode needs a power-of-two number of base rows (rows"
                    f"{'/2' if self.antithetic else ''} = {base}) to keep its stratification"
                )
            if self.dims > SOBOL_MAX_DIMS:
                raise ValueError(f"sobol mode supports at most {SOBOL_MAX_DIMS} dims, got {self.dims}")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float64": torch.float64}[self.dtype]

    def block_bytes(self) -> int:
        return tensor_bytes((self.rows, self.dims), self.torch_dtype)

    def generation_bytes(self) -> int:
        """Peak temporaries while one block is made: three float64 arrays of the base
        rows (the uniforms or their integer table, the inverse CDF's output, and the
        cast), on whichever route (host or device Sobol, pseudo-random)."""
        base = self.rows // 2 if self.antithetic else self.rows
        return 3 * tensor_bytes((base, self.dims), torch.float64)

    def pool_bytes(self) -> int:
        """The cached blocks, one more block being made while the cache is full (it is
        inserted, and the oldest evicted, once complete), and its generation workspace."""
        return (self.cache_blocks + 1) * self.block_bytes() + self.generation_bytes()


@functools.lru_cache(maxsize=8)
def _unscrambled_state(dims: int) -> torch.Tensor:
    """Sobol direction numbers (dims, 30) for ``dims`` coordinates, unscrambled."""
    state: torch.Tensor = _sobol(dims, scramble=False).sobolstate
    return state.clone()


def block_seed(seed: int, index: int) -> int:
    """A 63-bit seed for block ``index``, independent across indices (hash, not seed+i)."""
    digest = hashlib.blake2b(f"spectralmc-normals:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sobol_bits(state: torch.Tensor, shift: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """The first ``n`` (a power of two) Sobol points as 30-bit integers (n, dims) int32,
    computed on ``device``: exactly the bits torch's SobolEngine draws on the host from
    direction numbers ``state`` (dims, 30) and shift ``shift`` (dims,).

    SobolEngine returns point k = shift XOR (XOR of v_j over the bits j of gray(k)),
    gray(k) = k ^ (k >> 1). Here the table over all indices i < n of XOR_{bits j of i} v_j
    is built by doubling (log2 n steps, each element written once) and read in Gray-code
    order: a few passes over the block's memory instead of n sequential host steps.
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"device Sobol draws a power-of-two number of points, got {n}")
    v = state.to(device=device, dtype=torch.int32)  # (dims, 30)
    table = torch.zeros((1, v.shape[0]), dtype=torch.int32, device=device)
    for j in range(n.bit_length() - 1):
        table = torch.cat([table, table ^ v[:, j]], dim=0)
    k = torch.arange(n, device=device)
    return table[k ^ (k >> 1)] ^ shift.to(device=device, dtype=torch.int32)


def generate_block(
    config: NormalsConfig, index: int, device: torch.device, *, sobol_on_device: bool | None = None
) -> torch.Tensor:
    """Block ``index`` of the stream ``config`` describes: shape ``(rows, dims)``.

    The pure function behind the pool; callers that need one block once may use it
    directly. Sobol points are drawn on ``device`` when it is a CUDA device (or when
    ``sobol_on_device`` says so): the same integer points either way, so on the CPU both
    routes give the same bits.
    """
    if index < 0:
        raise ValueError(f"block index must be non-negative, got {index}")
    seed = block_seed(config.seed, index)
    n = config.rows // 2 if config.antithetic else config.rows
    on_device = device.type == "cuda" if sobol_on_device is None else sobol_on_device
    if config.mode == "sobol_shift":
        gen = torch.Generator()
        gen.manual_seed(seed)
        shift = torch.randint(0, 1 << SOBOL_BITS, (config.dims,), generator=gen, dtype=torch.int64)
        if on_device:
            bits = sobol_bits(_unscrambled_state(config.dims), shift, n, device).to(torch.int64)
        else:
            raw = _sobol(config.dims, scramble=False).draw(n, dtype=torch.float64)  # (n, dims), k / 2^30
            bits = (raw * float(1 << SOBOL_BITS)).to(torch.int64) ^ shift  # digital shift
        u_mid = (bits.to(torch.float64) + 0.5) * 2.0**-SOBOL_BITS  # cell centres: never 0 or 1
        z: torch.Tensor = torch.special.ndtri(u_mid).to(device=device, dtype=config.torch_dtype)
    elif config.mode == "sobol":
        engine = sobol_engine(config.dims, seed)
        u: torch.Tensor
        if on_device:  # the scramble (small: dims x 30 words) on the host, the points on the device
            u = sobol_bits(engine.sobolstate, engine.shift, n, device).to(torch.float64) * 2.0**-SOBOL_BITS
            # SobolEngine keeps its first point in float32 (shift / 2^30 in the default
            # dtype); round it the same way so both routes give the same bits.
            u[0] = u[0].to(torch.float32).to(torch.float64)
        else:
            u = engine.draw(n, dtype=torch.float64)  # (n, dims) in [0, 1)
        # Scrambled points are never exactly 0 or 1 in practice; clamp for safety so the
        # inverse CDF stays finite (|z| <= 8.3 at the float64 edge).
        eps = 2.0**-53
        u = u.clamp_(eps, 1.0 - eps)
        z = torch.special.ndtri(u).to(device=device, dtype=config.torch_dtype)
    else:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        z = torch.randn((n, config.dims), generator=gen, device=device, dtype=torch.float64)
        z = z.to(config.torch_dtype)
    if config.antithetic:
        z = torch.cat([z, -z], dim=0)  # (rows, dims)
    return z.contiguous()


@dataclass
class PoolStats:
    """How consumers found their blocks: the measure of how well prefetching overlaps.

    ``ready``: the block was in the cache (generation fully hidden); ``waited``: the
    prefetcher was still making it and the consumer waited ``wait_seconds`` in all;
    ``generated``: the consumer made it itself (nothing overlapped), taking
    ``consumer_generate_seconds``. ``prefetch_generate_seconds`` is the host time the
    prefetcher spent (on a CUDA device, enqueueing onto its own stream)."""

    ready: int = 0
    waited: int = 0
    generated: int = 0
    wait_seconds: float = 0.0
    consumer_generate_seconds: float = 0.0
    prefetch_generate_seconds: float = 0.0

    @property
    def hidden_fraction(self) -> float:
        """Share of requests whose block was ready: 1.0 when generation never blocked."""
        total = self.ready + self.waited + self.generated
        return self.ready / total if total else float("nan")


@dataclass
class _Block:
    z: torch.Tensor
    ready: torch.cuda.Event | None  # recorded on the pool's stream after generation (CUDA)


class NormalsPool:
    """Shared, capped, prefetching cache of normal blocks for several consumers.

    Consumers either ask for a block by index (:meth:`block`) or hold a
    :class:`NormalsStream` cursor (:meth:`stream`) that a background thread fills ahead
    of. On a CUDA device the prefetcher generates on its own CUDA stream and records an
    event per block; a consumer's stream waits on that event (the host does not), and the
    block is marked as used by the consumer's stream so the caching allocator never
    recycles it early. Generation thus overlaps simulation and training on the device.

    The pool reserves ``config.pool_bytes()`` from ``budget`` at construction and
    refuses a configuration over its cap there; :meth:`live_bytes` is what it holds now.
    Returned tensors are shared: do not modify them in place.
    """

    def __init__(
        self,
        config: NormalsConfig,
        budget: MemoryBudget,
        device: torch.device | None = None,
        *,
        prefetch: bool = True,
    ) -> None:
        self.config = config
        self.device = device or torch.device("cpu")
        self._holder = f"normals pool (seed {config.seed}, {config.rows}x{config.dims} {config.dtype})"
        budget.reserve(self._holder, config.pool_bytes())
        budget.track(self._holder, self.live_bytes)
        self._budget = budget
        self._cache: OrderedDict[int, _Block] = OrderedDict()
        self._in_progress: set[int] = set()
        self._streams: list[NormalsStream] = []
        self._cond = threading.Condition()
        self._closed = False
        self.stats = PoolStats()
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # type: ignore[no-untyped-call]
        self._thread: threading.Thread | None = None
        if prefetch and config.lookahead > 0:
            self._thread = threading.Thread(target=self._prefetch_loop, name="normals-prefetch", daemon=True)
            self._thread.start()

    # -- consumers -------------------------------------------------------------------
    def block(self, index: int) -> torch.Tensor:
        """Block ``index`` (cached, awaited from the prefetcher, or generated now)."""
        waited = False
        t0 = time.perf_counter()
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("normals pool is closed")
                cached = self._cache.get(index)
                if cached is not None:
                    self._cache.move_to_end(index)
                    if waited:
                        self.stats.waited += 1
                        self.stats.wait_seconds += time.perf_counter() - t0
                    else:
                        self.stats.ready += 1
                    return self._hand_over(cached)
                if index not in self._in_progress:
                    self._in_progress.add(index)
                    break
                waited = True
                self._cond.wait()
        block = self._generate_and_insert(index, side=False)
        with self._cond:
            self.stats.generated += 1
            self.stats.consumer_generate_seconds += time.perf_counter() - t0
        return block.z

    def _hand_over(self, block: _Block) -> torch.Tensor:
        """Order the consumer's CUDA stream after the block's generation."""
        if block.ready is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(block.ready)
            block.z.record_stream(consumer)
        return block.z

    def stream(self, start: int = 0, stride: int = 1) -> NormalsStream:
        """A new cursor over blocks ``start, start + stride, ...``."""
        s = NormalsStream(self, start, stride)
        with self._cond:
            self._streams.append(s)
            self._cond.notify_all()
        return s

    def live_bytes(self) -> int:
        """Bytes of the blocks the pool holds now (measured from the tensors)."""
        with self._cond:
            return sum(b.z.untyped_storage().nbytes() for b in self._cache.values())

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cache.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._budget.release(self._holder)

    def __enter__(self) -> NormalsPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_cached(self, index: int) -> bool:
        """Whether block ``index`` is ready in the cache now."""
        with self._cond:
            return index in self._cache

    @property
    def cached_blocks(self) -> int:
        with self._cond:
            return len(self._cache)

    # -- internals -------------------------------------------------------------------
    def _generate_and_insert(self, index: int, *, side: bool) -> _Block:
        try:
            if side and self._side_stream is not None:
                with torch.cuda.stream(self._side_stream):
                    z = generate_block(self.config, index, self.device)
                    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                    event.record(self._side_stream)
                block = _Block(z, event)
            else:
                block = _Block(generate_block(self.config, index, self.device), None)
        except BaseException:
            with self._cond:
                self._in_progress.discard(index)
                self._cond.notify_all()
            raise
        with self._cond:
            self._in_progress.discard(index)
            if not self._closed:
                self._insert(index, block)
            self._cond.notify_all()
        return block

    def _wanted(self) -> list[int]:
        wanted: list[int] = []
        for s in self._streams:
            wanted.extend(s.window(self.config.lookahead))
        return wanted

    def _insert(self, index: int, block: _Block) -> None:
        # Called with the lock held. Evict least recently used blocks, preferring those
        # no stream is about to read.
        wanted = set(self._wanted())
        while len(self._cache) >= self.config.cache_blocks:
            victim = next((k for k in self._cache if k not in wanted), None)
            if victim is None:
                victim = next(iter(self._cache))
            del self._cache[victim]
        self._cache[index] = block

    def _next_prefetch(self) -> int | None:
        wanted = self._wanted()
        if not wanted:
            return None
        missing = [i for i in wanted if i not in self._cache and i not in self._in_progress]
        if not missing:
            return None
        # Only prefetch into a free slot or over a block no stream is about to read.
        wanted_set = set(wanted)
        full = len(self._cache) + len(self._in_progress) >= self.config.cache_blocks
        if full and all(k in wanted_set for k in self._cache):
            return None
        return missing[0]

    def _prefetch_loop(self) -> None:
        while True:
            with self._cond:
                index = None
                while not self._closed and (index := self._next_prefetch()) is None:
                    self._cond.wait()
                if self._closed or index is None:
                    return
                self._in_progress.add(index)
            t0 = time.perf_counter()
            try:
                self._generate_and_insert(index, side=True)
            except Exception:  # the consumer regenerates and sees the error itself
                continue
            finally:
                with self._cond:
                    self.stats.prefetch_generate_seconds += time.perf_counter() - t0


class NormalsStream:
    """One consumer's cursor into a :class:`NormalsPool`; its position is checkpointed."""

    def __init__(self, pool: NormalsPool, start: int, stride: int) -> None:
        if start < 0 or stride < 1:
            raise ValueError(f"stream needs start >= 0 and stride >= 1, got {start}, {stride}")
        self._pool = pool
        self.position = start  # index of the next block this stream will return
        self.stride = stride

    def window(self, lookahead: int) -> list[int]:
        return [self.position + k * self.stride for k in range(lookahead)]

    def next(self) -> tuple[int, torch.Tensor]:
        index = self.position
        z = self._pool.block(index)
        self.position = index + self.stride
        with self._pool._cond:
            self._pool._cond.notify_all()  # the window moved: wake the prefetcher
        return index, z

    def seek(self, position: int) -> None:
        """Move the cursor (used when resuming from a checkpoint)."""
        if position < 0:
            raise ValueError(f"position must be non-negative, got {position}")
        self.position = position
        with self._pool._cond:
            self._pool._cond.notify_all()

    def close(self) -> None:
        with self._pool._cond:
            if self in self._pool._streams:
                self._pool._streams.remove(self)
            self._pool._cond.notify_all()
