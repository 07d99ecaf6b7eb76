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
    live_tensor_bytes,
    module_tensors,
    resolve_device,
    tensor_bytes,
)
from spectralmc_server.engine.trainer import TrainConfig, Trainer


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


# -- live bytes: what the components hold, measured from their tensors -------------------------
def test_live_tensor_bytes_counts_each_storage_once() -> None:
    a = torch.zeros(1000, dtype=torch.float32)
    assert live_tensor_bytes([a, a[10:], a.view(10, 100)]) == 4000
    assert live_tensor_bytes([a, torch.zeros(3, dtype=torch.float64)]) == 4024
    assert live_tensor_bytes([]) == 0


def test_track_needs_a_reservation_and_report_sums_the_probes() -> None:
    budget = MemoryBudget("x", 1000)
    with pytest.raises(ValueError, match="holds no reservation"):
        budget.track("a", lambda: 1)
    budget.reserve("a", 500)
    budget.track("a", lambda: 123)
    budget.reserve("b", 100)
    assert budget.report().live_bytes == 123
    budget.release("a")
    assert budget.report().live_bytes == 0


def test_trainer_live_bytes_are_weights_ema_and_moments_within_the_reservation() -> None:
    budgets = Budgets()
    trainer = Trainer(TrainConfig(batch_points=16, paths=64, validation_grid=4), budgets)
    try:
        n_params = sum(p.numel() for p in trainer.model.parameters())
        buffers = sum(b.untyped_storage().nbytes() for b in trainer.model.buffers())  # the frequency grid (a view)
        before = budgets.training.report()
        assert before.live_bytes == 2 * (4 * n_params + buffers)  # weights and the EMA copy, float32
        trainer.train_step()
        trainer.validate()  # the frozen EMA builds its serving matrices
        after = budgets.training.report()
        assert after.live_bytes >= 4 * 4 * n_params  # + Adam's two moments
        assert after.live_bytes <= after.reserved_bytes
    finally:
        trainer.close()
    assert budgets.training.report().live_bytes == 0


def test_a_served_model_holds_at_most_three_times_its_weights() -> None:
    """The model cache reserves 3x the checkpoint's weights: the weights and the packed
    block matrices frozen layers cache for serving (measured after pricing)."""
    from spectralmc_server.engine.checkpoint import read_dir
    from spectralmc_server.engine.served import load_served_model
    from spectralmc_server.engine_service.models import SERVED_BYTES_PER_WEIGHT_BYTE
    from spectralmc_server.models import bundled_models

    ckpt = read_dir(bundled_models()["heston"], need_training=False)
    weights = sum(t.numel() * t.element_size() for t in ckpt.model.values())
    served = load_served_model(ckpt)
    assert served.network is not None
    buffers = sum(b.untyped_storage().nbytes() for b in served.network.buffers())  # not checkpointed
    assert live_tensor_bytes(module_tensors(served.network)) == weights + buffers  # nothing cached yet
    theta = torch.tensor([[0.04, 1.5, 0.04, 0.5, -0.7]], dtype=torch.float64)
    with torch.no_grad():
        served.network(theta, torch.tensor([1.0], dtype=torch.float64))
    live = live_tensor_bytes(module_tensors(served.network))
    assert weights < live <= SERVED_BYTES_PER_WEIGHT_BYTE * weights
