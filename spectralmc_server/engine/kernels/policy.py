"""When the fused kernels run: a policy (:func:`kernel_policy`). ``auto`` takes the fused
kernels when the normals are on a CUDA device and a launcher is there, ``torch`` never
does, ``fused`` insists (and :func:`check_policy` refuses it up front where it cannot
run). Differentiated calls always take torch: the kernels have no derivative."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Literal

import torch

from spectralmc_server.engine.kernels.launch import fused_unavailable_reason
from spectralmc_server.engine.kernels.source import FusedKernelsUnavailableError

KernelPolicy = Literal["auto", "torch", "fused"]

_policy: contextvars.ContextVar[KernelPolicy] = contextvars.ContextVar("spectralmc_kernel_policy", default="auto")


@contextlib.contextmanager
def kernel_policy(policy: KernelPolicy) -> Iterator[None]:
    """Within the block, simulate with ``policy`` (auto, torch or fused)."""
    token = _policy.set(policy)
    try:
        yield
    finally:
        _policy.reset(token)


def current_policy() -> KernelPolicy:
    return _policy.get()


def check_policy(policy: KernelPolicy, device: torch.device) -> None:
    """Refuse ``fused`` up front where it cannot run (a clear error at construction)."""
    if policy == "fused":
        reason = fused_unavailable_reason(device)
        if reason is not None:
            raise FusedKernelsUnavailableError(f"kernels = 'fused' cannot run: {reason}; use 'auto' or 'torch'")


def _differentiated(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether autograd (reverse or forward mode, torch.func included) tracks any input:
    the kernels have no derivative, so such calls stay on torch."""
    import torch.autograd.forward_ad as fwad
    from torch._C._functorch import is_functorch_wrapped_tensor

    for t in tensors:
        if t.requires_grad or is_functorch_wrapped_tensor(t) or fwad.unpack_dual(t).tangent is not None:  # type: ignore[no-untyped-call]
            return True
    return False


def use_fused(z: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether a simulation over normals ``z`` (and parameters ``others``) takes the fused
    kernels now. Differentiated calls always take torch, whatever the policy."""
    policy = _policy.get()
    if policy == "torch" or _differentiated((z, *others)):
        return False
    reason = fused_unavailable_reason(z.device)
    if reason is None:
        return True
    if policy == "fused":
        raise FusedKernelsUnavailableError(f"kernels = 'fused' cannot run: {reason}")
    return False
