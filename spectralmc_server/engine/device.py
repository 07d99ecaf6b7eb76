"""Backend choice (cpu/cuda) and byte budgets: hard memory caps for every buffer holder.

Every component that keeps tensors alive (normals pool, simulator workspace, training
batch, inference batch, model cache) takes a :class:`MemoryBudget` and reserves what it
will hold *at construction*, so an over-large configuration is refused with a clear
message instead of running out of memory midway.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

DeviceName = Literal["auto", "cpu", "cuda"]

MiB = 1 << 20


class DeviceUnavailableError(RuntimeError):
    """The configured device cannot be used on this machine."""


class BudgetExceededError(ValueError):
    """A component asked for more bytes than its budget allows."""


def resolve_device(name: DeviceName | str) -> torch.device:
    """Map a configured device name to a torch device.

    ``auto`` takes CUDA when it is usable and the CPU otherwise; ``cuda`` on a machine
    without a usable GPU is an error, never a silent fallback.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "device 'cuda' was requested but torch sees no usable CUDA device; "
                'use --device cpu (or device = "auto")'
            )
        return torch.device("cuda")
    raise DeviceUnavailableError(f"unknown device {name!r}: expected auto, cpu or cuda")


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes a dense tensor of this shape and dtype occupies."""
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def live_tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(t.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def module_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor a module keeps alive: parameters, buffers, and tensors its layers
    cache (the ``_cache`` tuples frozen complex layers keep for serving)."""
    yield from module.parameters()
    yield from module.buffers()
    for sub in module.modules():
        cache = getattr(sub, "_cache", None)
        if isinstance(cache, tuple):
            yield from (c for c in cache if isinstance(c, torch.Tensor))


@dataclass(frozen=True)
class BudgetReport:
    """Use against cap for one budget, in bytes."""

    name: str
    cap_bytes: int
    reserved_bytes: int
    holders: dict[str, int]
    live_bytes: int = 0  # measured now from the tensors the holders keep (those that report)


class MemoryBudget:
    """A hard byte cap with named reservations; thread safe.

    ``reserve`` raises :class:`BudgetExceededError` (naming the holder, the request and
    what is left) rather than over-committing.
    """

    def __init__(self, name: str, cap_bytes: int) -> None:
        if cap_bytes <= 0:
            raise ValueError(f"budget {name!r}: cap must be positive, got {cap_bytes}")
        self.name = name
        self.cap_bytes = int(cap_bytes)
        self._holders: dict[str, int] = {}
        self._probes: dict[str, Callable[[], int]] = {}
        self._lock = threading.Lock()

    @property
    def reserved_bytes(self) -> int:
        with self._lock:
            return sum(self._holders.values())

    def reserve(self, holder: str, nbytes: int) -> None:
        """Reserve ``nbytes`` for ``holder`` (replacing its earlier reservation)."""
        if nbytes < 0:
            raise ValueError(f"cannot reserve a negative byte count ({nbytes})")
        with self._lock:
            others = sum(v for k, v in self._holders.items() if k != holder)
            if others + nbytes > self.cap_bytes:
                raise BudgetExceededError(
                    f"{holder} needs {_fmt(nbytes)} but budget {self.name!r} has "
                    f"{_fmt(self.cap_bytes - others)} free of a {_fmt(self.cap_bytes)} cap; "
                    f"shrink the configuration or raise budgets.{self.name}_bytes"
                )
            self._holders[holder] = nbytes

    def reserve_rows(self, holder: str, per_row: int, max_rows: int | None = None) -> int:
        """Size a working set of ``per_row`` bytes a row to this budget: the most rows
        the cap holds (at most ``max_rows``), reserved for ``holder``. Raises
        :class:`BudgetExceededError` when not even one row fits."""
        rows = self.cap_bytes // per_row if max_rows is None else min(max_rows, self.cap_bytes // per_row)
        if rows < 1:
            self.reserve(holder, per_row)  # raises with the budget's message
        self.reserve(holder, rows * per_row)
        return rows

    def track(self, holder: str, probe: Callable[[], int]) -> None:
        """Register how to measure what ``holder`` keeps alive now (bytes of its tensors);
        :meth:`report` sums the probes as ``live_bytes``. Released with the holder."""
        with self._lock:
            if holder not in self._holders:
                raise ValueError(f"{holder!r} holds no reservation in budget {self.name!r}")
            self._probes[holder] = probe

    def release(self, holder: str) -> None:
        with self._lock:
            self._holders.pop(holder, None)
            self._probes.pop(holder, None)

    def report(self) -> BudgetReport:
        with self._lock:
            holders = dict(self._holders)
            probes = list(self._probes.values())
        live = sum(probe() for probe in probes)  # outside the lock: probes take their own
        return BudgetReport(self.name, self.cap_bytes, sum(holders.values()), holders, live)


def _fmt(nbytes: int) -> str:
    if nbytes >= MiB:
        return f"{nbytes / MiB:.1f} MiB"
    return f"{nbytes} B"


class BudgetConfig(BaseModel):
    """Byte caps per component (defaults suit a laptop; raise them on a GPU box)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    normals_bytes: int = Field(256 * MiB, gt=0)  # normals pool: all cached blocks
    simulator_bytes: int = Field(512 * MiB, gt=0)  # paths, binned samples, FFT buffers
    training_bytes: int = Field(256 * MiB, gt=0)  # network, EMA copy, optimiser state
    inference_bytes: int = Field(256 * MiB, gt=0)  # one inference chunk's working set
    model_cache_bytes: int = Field(256 * MiB, gt=0)  # loaded model versions


class Budgets:
    """One :class:`MemoryBudget` per component, built from a :class:`BudgetConfig`."""

    def __init__(self, config: BudgetConfig | None = None) -> None:
        cfg = config or BudgetConfig()
        self.normals = MemoryBudget("normals", cfg.normals_bytes)
        self.simulator = MemoryBudget("simulator", cfg.simulator_bytes)
        self.training = MemoryBudget("training", cfg.training_bytes)
        self.inference = MemoryBudget("inference", cfg.inference_bytes)
        self.model_cache = MemoryBudget("model_cache", cfg.model_cache_bytes)

    def reports(self) -> list[BudgetReport]:
        return [b.report() for b in (self.normals, self.simulator, self.training, self.inference, self.model_cache)]
