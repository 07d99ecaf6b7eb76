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

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.quasirandom import SobolEngine

from spectralmc_server.engine.device import MemoryBudget, tensor_bytes

SOBOL_MAX_DIMS = SobolEngine.MAXDIM  # 21201 in torch
_Sobol: Any = SobolEngine  # torch.quasirandom carries no type annotations


def sobol_engine(dims: int, seed: int) -> Any:
    """A scrambled (LMS + digital shift) Sobol engine over [0, 1)^dims."""
    return _Sobol(dims, scramble=True, seed=seed)


NormalsMode = Literal["sobol", "sobol_shift", "pseudo"]
SOBOL_BITS = 30  # torch's Sobol points are k / 2^30

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


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
        return _DTYPES[self.dtype]

    def block_bytes(self) -> int:
        return tensor_bytes((self.rows, self.dims), self.torch_dtype)

    def pool_bytes(self) -> int:
        """Cached blocks plus one float64 generation workspace."""
        return self.cache_blocks * self.block_bytes() + tensor_bytes((self.rows, self.dims), torch.float64)


def block_seed(seed: int, index: int) -> int:
    """A 63-bit seed for block ``index``, independent across indices (hash, not seed+i)."""
    digest = hashlib.blake2b(f"spectralmc-normals:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generate_block(config: NormalsConfig, index: int, device: torch.device) -> torch.Tensor:
    """Block ``index`` of the stream ``config`` describes: shape ``(rows, dims)``.

    The pure function behind the pool; callers that need one block once may use it
    directly.
    """
    if index < 0:
        raise ValueError(f"block index must be non-negative, got {index}")
    seed = block_seed(config.seed, index)
    n = config.rows // 2 if config.antithetic else config.rows
    if config.mode == "sobol_shift":
        gen = torch.Generator()
        gen.manual_seed(seed)
        shift = torch.randint(0, 1 << SOBOL_BITS, (config.dims,), generator=gen, dtype=torch.int64)
        raw = _Sobol(config.dims, scramble=False).draw(n, dtype=torch.float64)  # (n, dims), k / 2^30
        bits = (raw * float(1 << SOBOL_BITS)).to(torch.int64) ^ shift  # digital shift
        u_mid = (bits.to(torch.float64) + 0.5) * 2.0**-SOBOL_BITS  # cell centres: never 0 or 1
        z: torch.Tensor = torch.special.ndtri(u_mid).to(device=device, dtype=config.torch_dtype)
    elif config.mode == "sobol":
        u: torch.Tensor = sobol_engine(config.dims, seed).draw(n, dtype=torch.float64)  # (n, dims) in [0, 1)
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


class NormalsPool:
    """Shared, capped, prefetching cache of normal blocks for several consumers.

    Consumers either ask for a block by index (:meth:`block`) or hold a
    :class:`NormalsStream` cursor (:meth:`stream`) that a background thread fills ahead
    of. The pool reserves ``config.pool_bytes()`` from ``budget`` at construction and
    refuses a configuration over its cap there. Returned tensors are shared: do not
    modify them in place.
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
        self._budget = budget
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._in_progress: set[int] = set()
        self._streams: list[NormalsStream] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if prefetch and config.lookahead > 0:
            self._thread = threading.Thread(target=self._prefetch_loop, name="normals-prefetch", daemon=True)
            self._thread.start()

    # -- consumers -------------------------------------------------------------------
    def block(self, index: int) -> torch.Tensor:
        """Block ``index`` (cached, awaited from the prefetcher, or generated now)."""
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("normals pool is closed")
                cached = self._cache.get(index)
                if cached is not None:
                    self._cache.move_to_end(index)
                    return cached
                if index not in self._in_progress:
                    self._in_progress.add(index)
                    break
                self._cond.wait()
        return self._generate_and_insert(index)

    def stream(self, start: int = 0, stride: int = 1) -> NormalsStream:
        """A new cursor over blocks ``start, start + stride, ...``."""
        s = NormalsStream(self, start, stride)
        with self._cond:
            self._streams.append(s)
            self._cond.notify_all()
        return s

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

    @property
    def cached_blocks(self) -> int:
        with self._cond:
            return len(self._cache)

    # -- internals -------------------------------------------------------------------
    def _generate_and_insert(self, index: int) -> torch.Tensor:
        try:
            z = generate_block(self.config, index, self.device)
        except BaseException:
            with self._cond:
                self._in_progress.discard(index)
                self._cond.notify_all()
            raise
        with self._cond:
            self._in_progress.discard(index)
            if not self._closed:
                self._insert(index, z)
            self._cond.notify_all()
        return z

    def _wanted(self) -> list[int]:
        wanted: list[int] = []
        for s in self._streams:
            wanted.extend(s.window(self.config.lookahead))
        return wanted

    def _insert(self, index: int, z: torch.Tensor) -> None:
        # Called with the lock held. Evict least recently used blocks, preferring those
        # no stream is about to read.
        wanted = set(self._wanted())
        while len(self._cache) >= self.config.cache_blocks:
            victim = next((k for k in self._cache if k not in wanted), None)
            if victim is None:
                victim = next(iter(self._cache))
            del self._cache[victim]
        self._cache[index] = z

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
            try:
                self._generate_and_insert(index)
            except Exception:  # the consumer regenerates and sees the error itself
                continue


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
