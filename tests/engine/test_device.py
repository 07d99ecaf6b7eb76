"""Device choice and byte budgets."""

from __future__ import annotations

import threading

import pytest
import torch

from spectralmc_server.engine.device import (
    BudgetConfig,
    BudgetExceededError,
    Budgets,
    DeviceUnavailableError,
    MemoryBudget,
    resolve_device,
    tensor_bytes,
)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected_auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected_auto
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(DeviceUnavailableError, match="no usable CUDA device"):
            resolve_device("cuda")
    with pytest.raises(DeviceUnavailableError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_tensor_bytes() -> None:
    assert tensor_bytes((3, 4), torch.float32) == 48
    assert tensor_bytes((2,), torch.complex128) == 32
    assert tensor_bytes((), torch.float64) == 8


def test_budget_reserve_release_and_report() -> None:
    b = MemoryBudget("inference", 1000)
    b.reserve("a", 600)
    b.reserve("b", 400)
    assert b.reserved_bytes == 1000
    with pytest.raises(BudgetExceededError, match=r"c needs 1 B but budget 'inference' has 0 B free of a 1000 B cap"):
        b.reserve("c", 1)
    b.reserve("a", 100)  # a holder's new reservation replaces its old one
    rep = b.report()
    assert (rep.name, rep.cap_bytes, rep.reserved_bytes, rep.holders) == ("inference", 1000, 500, {"a": 100, "b": 400})
    b.release("b")
    b.release("unknown")  # releasing twice or never is harmless
    assert b.reserved_bytes == 100
    with pytest.raises(ValueError, match="negative"):
        b.reserve("a", -1)
    with pytest.raises(ValueError, match="positive"):
        MemoryBudget("x", 0)


def test_budget_is_never_over_committed_under_contention() -> None:
    b = MemoryBudget("normals", 100)
    granted: list[str] = []
    lock = threading.Lock()

    def take(i: int) -> None:
        try:
            b.reserve(f"h{i}", 7)
            with lock:
                granted.append(f"h{i}")
        except BudgetExceededError:
            pass

    threads = [threading.Thread(target=take, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 14 and b.reserved_bytes == 98


def test_budgets_from_config() -> None:
    budgets = Budgets(BudgetConfig(normals_bytes=10, inference_bytes=20))
    caps = {r.name: r.cap_bytes for r in budgets.reports()}
    assert (
        caps["normals"] == 10
        and caps["inference"] == 20
        and set(caps)
        == {
            "normals",
            "simulator",
            "training",
            "inference",
            "model_cache",
        }
    )
    with pytest.raises(ValueError, match="greater than 0"):
        BudgetConfig(normals_bytes=0)
