"""The kernels' CUDA C source (``paths.cu``, package data) and the conventions every
launcher of it shares: the REAL type per dtype, the normals' layout, the step limit."""

from __future__ import annotations

from importlib.resources import files

import torch

MAX_FUSED_STEPS = 64  # a Heston path's bridge lives in two local arrays of this length (MAX_STEPS in paths.cu)
THREADS_PER_BLOCK = 256

# One CUDA C source: NVRTC compiles it for the device, a C++ compiler with
# -DSPECTRALMC_HOST for the CPU (host.py).
SOURCE: str = files("spectralmc_server.engine.kernels").joinpath("paths.cu").read_text(encoding="utf-8")


class FusedKernelsUnavailableError(RuntimeError):
    """The fused kernels were required where they cannot run."""


def real_type(dtype: torch.dtype) -> str:
    """The C type the kernels are compiled with (``-DREAL=...``) for normals of ``dtype``."""
    if dtype == torch.float32:
        return "float"
    if dtype == torch.float64:
        return "double"
    raise TypeError(f"the fused kernels take float32 or float64 normals, got {dtype}")


def row_strides(z: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """z (B, N, d) with a unit last stride (copied if not), and its point and path strides
    (32-bit kernel arguments: a block holds fewer than 2^31 normals per row)."""
    if z.stride(-1) != 1 or max(z.stride(0), z.stride(1)) >= 2**31:
        z = z.contiguous()
    if max(z.stride(0), z.stride(1)) >= 2**31:
        raise ValueError(f"normals block too large for the fused kernels: strides {z.stride()}")
    return z, z.stride(0), z.stride(1)


def check_steps(steps: int) -> None:
    """The Heston kernel keeps a path's steps in local arrays of MAX_FUSED_STEPS."""
    if steps > MAX_FUSED_STEPS:
        raise ValueError(f"the fused Heston kernel takes at most {MAX_FUSED_STEPS} steps, got {steps}")
