"""Fused path kernels: one kernel launch over every time step of a path, not one per step.

torch runs the Heston QE-M step and the Asian running average as ~40 elementwise ops per
time step, each a kernel launch that reads and writes every path's state through device
memory. The kernels here keep a path's state in registers for its whole life: each
thread reads its normals once and writes X (and the Asian control variate) once, which
is the bandwidth bound the design aims at.

One CUDA C source (``paths.cu``, package data; :data:`SOURCE`) serves two compilers:

- on a CUDA device it is compiled at run time by NVRTC and launched on torch's current
  stream, through cupy or torch's own NVRTC launcher (launch.py);
- with ``-DSPECTRALMC_HOST`` a C++ compiler builds the same source into a shared
  library whose "kernels" loop over the thread index on the CPU. Tests use that to
  check the kernel arithmetic against the torch implementation on a machine with no GPU
  (host.py, :func:`compile_host`).

Each process packs its own kernel's arguments (``heston_arguments`` in
processes/heston.py, ``asian_arguments`` in processes/asian.py): nothing here imports
the processes. Which path runs is a policy (policy.py, :func:`kernel_policy`).
"""

from __future__ import annotations

from spectralmc_server.engine.kernels.host import HostKernels, compile_host, host_compiler
from spectralmc_server.engine.kernels.launch import (
    asian_x_cuda,
    backend,
    cupy_module,
    fused_unavailable_reason,
    heston_x_cuda,
    torch_nvrtc_available,
)
from spectralmc_server.engine.kernels.policy import (
    KernelPolicy,
    check_policy,
    current_policy,
    kernel_policy,
    use_fused,
)
from spectralmc_server.engine.kernels.policy import _differentiated as _differentiated  # tests probe it
from spectralmc_server.engine.kernels.source import (
    MAX_FUSED_STEPS,
    SOURCE,
    THREADS_PER_BLOCK,
    FusedKernelsUnavailableError,
    check_steps,
)

__all__ = [
    "MAX_FUSED_STEPS",
    "SOURCE",
    "THREADS_PER_BLOCK",
    "FusedKernelsUnavailableError",
    "HostKernels",
    "KernelPolicy",
    "asian_x_cuda",
    "backend",
    "check_policy",
    "check_steps",
    "compile_host",
    "cupy_module",
    "current_policy",
    "fused_unavailable_reason",
    "heston_x_cuda",
    "host_compiler",
    "kernel_policy",
    "torch_nvrtc_available",
    "use_fused",
]
