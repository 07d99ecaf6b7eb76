"""The kernels on a CUDA device: compiled at run time by NVRTC and launched on torch's
current stream, through cupy where the ``gpu`` extra (``cupy-cuda13x``) is installed,
with tensors exchanged zero-copy through DLPack, and otherwise through torch's own NVRTC
launcher (``torch.cuda._compile_kernel``, a CUDA build of torch >= 2.8), with raw device
pointers.

The launchers take each kernel's arguments packed by its process (``heston_arguments``
in processes/heston.py, ``asian_arguments`` in processes/asian.py).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch

from spectralmc_server.engine.kernels.source import (
    SOURCE,
    THREADS_PER_BLOCK,
    FusedKernelsUnavailableError,
    check_steps,
    real_type,
    row_strides,
)


@functools.lru_cache(maxsize=1)
def cupy_module() -> Any | None:
    """cupy when it imports and sees a device (the ``gpu`` extra); None otherwise."""
    try:
        import cupy  # type: ignore[import-not-found,unused-ignore]
    except Exception:
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return cupy


def torch_nvrtc_available() -> bool:
    """Whether torch can compile and launch a raw kernel itself (NVRTC through
    ``torch.cuda._compile_kernel``, torch >= 2.8 built with CUDA): the route where cupy
    is not installed."""
    return torch.version.cuda is not None and hasattr(torch.cuda, "_compile_kernel")


def backend(device: torch.device) -> Literal["cupy", "torch-nvrtc"] | None:
    """Which launcher runs the kernels on ``device``: cupy (preferred), torch's NVRTC
    route, or None (no fused kernels here)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if cupy_module() is not None:
        return "cupy"
    if torch_nvrtc_available():
        return "torch-nvrtc"
    return None


def fused_unavailable_reason(device: torch.device) -> str | None:
    """Why the fused kernels cannot run on ``device`` (None: they can)."""
    if device.type != "cuda":
        return f"the fused kernels run on CUDA devices; this one is {device.type!r}"
    if backend(device) is None:
        return (
            "neither cupy (pip install 'spectralmc-server[gpu]') nor torch's NVRTC kernel "
            "compiler (a CUDA build of torch >= 2.8) is available"
        )
    return None


# -- CUDA: cupy (DLPack) or torch's own NVRTC route ----------------------------------------
@functools.lru_cache(maxsize=4)
def _cupy_module(real: str) -> Any:
    cupy = cupy_module()
    if cupy is None:
        raise FusedKernelsUnavailableError("cupy is not available")
    return cupy.RawModule(code=SOURCE, options=(f"-DREAL={real}", "--std=c++17"))


@functools.lru_cache(maxsize=8)
def _torch_kernel(name: str, real: str) -> Any:
    compile_kernel: Any = torch.cuda._compile_kernel
    return compile_kernel(SOURCE, name, nvcc_options=[f"-DREAL={real}", "--std=c++17"])


def _launch(name: str, real: str, total: int, args: list[torch.Tensor | int]) -> None:
    """Launch kernel ``name`` over ``total`` threads on torch's current stream. Tensor
    arguments are passed zero-copy (DLPack views for cupy, raw pointers for torch's
    route); ints are 32-bit."""
    grid = (total + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    stream = torch.cuda.current_stream()
    route = backend(stream.device)
    if route == "cupy":
        cupy = cupy_module()
        assert cupy is not None
        conv = [cupy.from_dlpack(a) if isinstance(a, torch.Tensor) else cupy.int32(a) for a in args]
        with cupy.cuda.ExternalStream(stream.cuda_stream):
            _cupy_module(real).get_function(name)((grid,), (THREADS_PER_BLOCK,), tuple(conv))
    elif route == "torch-nvrtc":
        _torch_kernel(name, real)(grid=(grid, 1, 1), block=(THREADS_PER_BLOCK, 1, 1), args=args, stream=stream)
    else:
        raise FusedKernelsUnavailableError(fused_unavailable_reason(stream.device) or "no launcher")


def heston_x_cuda(
    z: torch.Tensor,
    params: torch.Tensor,
    plan_idx: torch.Tensor,
    plan_w: torch.Tensor,
    steps: int,
    use_bridge: bool,
) -> torch.Tensor:
    """X (B, N) for Heston QE-M from normals z (B, N, 2 steps) in one fused launch;
    ``params``, ``plan_idx`` and ``plan_w`` as ``heston_arguments`` packs them."""
    check_steps(steps)
    z, sb, sn = row_strides(z)
    b, n = z.shape[0], z.shape[1]
    x = torch.empty((b, n), dtype=z.dtype, device=z.device)
    args: list[torch.Tensor | int] = [z, sb, sn, params, plan_idx, plan_w, b, n, steps, int(use_bridge), x]
    _launch("heston_qe", real_type(z.dtype), b * n, args)
    return x


def asian_x_cuda(
    z: torch.Tensor, params: torch.Tensor, weights: torch.Tensor, companion: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """X (B, N) and, with ``companion``, the control variate X_c (B, N) in one launch;
    ``params`` and ``weights`` as ``asian_arguments`` packs them."""
    z, sb, sn = row_strides(z)
    b, n = z.shape[0], z.shape[1]
    x = torch.empty((b, n), dtype=z.dtype, device=z.device)
    xc = torch.empty_like(x) if companion else x[:1, :1]
    args: list[torch.Tensor | int] = [z, sb, sn, params, weights, weights.shape[1], b, n, x, xc, int(companion)]
    _launch("asian_average", real_type(z.dtype), b * n, args)
    return x, (xc if companion else None)
