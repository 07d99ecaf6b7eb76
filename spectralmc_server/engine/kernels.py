"""Fused path kernels: one kernel launch over every time step of a path, not one per step.

torch runs the Heston QE-M step and the Asian running average as ~40 elementwise ops per
time step, each a kernel launch that reads and writes every path's state through device
memory. The kernels here keep a path's state in registers for its whole life: each
thread reads its normals once and writes X (and the Asian control variate) once, which
is the bandwidth bound the design aims at.

One CUDA C source serves two compilers:

- on a CUDA device it is compiled at run time by NVRTC and launched on torch's current
  stream: through cupy where the ``gpu`` extra (``cupy-cuda13x``) is installed, with
  tensors exchanged zero-copy through DLPack, and otherwise through torch's own NVRTC
  launcher (``torch.cuda._compile_kernel``, a CUDA build of torch >= 2.8), with raw
  device pointers;
- with ``-DSPECTRALMC_HOST`` a C++ compiler builds the same source into a shared
  library whose "kernels" loop over the thread index on the CPU. Tests use that to
  check the kernel arithmetic against the torch implementation on a machine with no GPU
  (see :func:`compile_host`).

Which path runs is a policy (:func:`kernel_policy`): ``auto`` takes the fused kernels
when the normals are on a CUDA device and a launcher is there, ``torch`` never does, ``fused``
insists (and :func:`check_policy` refuses it up front where it cannot run).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

KernelPolicy = Literal["auto", "torch", "fused"]
MAX_FUSED_STEPS = 64  # a Heston path's bridge lives in two local arrays of this length
THREADS_PER_BLOCK = 256

SOURCE = r"""
#ifdef SPECTRALMC_HOST
#include <math.h>
#define DEVICE static inline
#define KERNEL(name) extern "C" void name##_host
#define FOR_EACH_THREAD(total) for (long long tid = 0; tid < (total); ++tid)
static inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
static inline double normcdf(double x) { return 0.5 * erfc(-x * 0.70710678118654752); }
#else
#define DEVICE __device__ __forceinline__
#define KERNEL(name) extern "C" __global__ void name
#define FOR_EACH_THREAD(total) \
    long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x; \
    if (tid < (total))
#endif

#ifndef REAL
#define REAL float
#endif
#define MAX_STEPS 64

DEVICE float ex(float x) { return expf(x); }
DEVICE double ex(double x) { return exp(x); }
DEVICE float lg(float x) { return logf(x); }
DEVICE double lg(double x) { return log(x); }
DEVICE float sq(float x) { return sqrtf(x); }
DEVICE double sq(double x) { return sqrt(x); }
DEVICE float ndtr(float x) { return normcdff(x); }
DEVICE double ndtr(double x) { return normcdf(x); }
DEVICE REAL mx(REAL a, REAL b) { return a > b ? a : b; }
DEVICE REAL mn(REAL a, REAL b) { return a < b ? a : b; }

/* Brownian bridge: normals in bridge order -> increments in time order (bridge.py). */
DEVICE void bridge(const REAL* zp, int n, const int* plan_idx, const REAL* plan_w, REAL* w, REAL* out) {
    w[0] = (REAL)0;
    for (int k = 0; k < n; ++k) {
        int pt = plan_idx[3 * k], lo = plan_idx[3 * k + 1], hi = plan_idx[3 * k + 2];
        REAL zk = zp[k];
        if (hi < 0) w[pt] = plan_w[3 * k + 2] * zk;
        else w[pt] = plan_w[3 * k] * w[lo] + plan_w[3 * k + 1] * w[hi] + plan_w[3 * k + 2] * zk;
    }
    for (int i = 0; i < n; ++i) out[i] = w[i + 1] - w[i];
}

/* Heston QE-M (heston.py): params (B, 6) = v0, kappa, theta, xi, rho, T; z[b*sb + p*sn + k],
   k < steps the variance normals, k >= steps the price normals; x (B, N). */
KERNEL(heston_qe)(const REAL* __restrict__ z, int sb, int sn,
                  const REAL* __restrict__ params, const int* __restrict__ plan_idx,
                  const REAL* __restrict__ plan_w, int B, int N, int steps, int use_bridge,
                  REAL* __restrict__ x_out) {
    FOR_EACH_THREAD((long long)B * N) {
        int b = (int)(tid / N);
        long long p = tid % N;
        const REAL* zp = z + (long long)b * sb + p * sn;
        const REAL* th = params + 6 * b;
        REAL v0 = th[0], kappa = th[1], mean_v = th[2], xi = th[3], rho = th[4];
        REAL dt = th[5] / (REAL)steps;
        REAL work[MAX_STEPS + 1], zv[MAX_STEPS], zx[MAX_STEPS];
        if (use_bridge) {
            bridge(zp, steps, plan_idx, plan_w, work, zv);
            bridge(zp + steps, steps, plan_idx, plan_w, work, zx);
        } else {
            for (int i = 0; i < steps; ++i) { zv[i] = zp[i]; zx[i] = zp[steps + i]; }
        }
        REAL ekt = ex(-kappa * dt);
        REAL c1 = xi * xi * ekt * ((REAL)1 - ekt) / kappa;
        REAL c2 = mean_v * xi * xi * ((REAL)1 - ekt) * ((REAL)1 - ekt) / ((REAL)2 * kappa);
        REAL half = (REAL)0.5 * dt * (kappa * rho / xi - (REAL)0.5);
        REAL k1 = half - rho / xi, k2 = half + rho / xi;
        REAL k3 = (REAL)0.5 * dt * ((REAL)1 - rho * rho);
        REAL k0 = -rho * kappa * mean_v * dt / xi;
        REAL big_a = k2 + (REAL)0.5 * k3;
        REAL v = v0, x = (REAL)0;
        for (int i = 0; i < steps; ++i) {
            REAL m = mean_v + (v - mean_v) * ekt;
            REAL s2 = c1 * v + c2;
            REAL psi = s2 / (m * m);
            REAL zi = zv[i];
            REAL v_next, log_m;
            bool ok;
            if (psi <= (REAL)1.5) {
                REAL inv = (REAL)2 / mx(psi, (REAL)1e-12);
                REAL b2 = mx(inv - (REAL)1 + sq(inv) * sq(mx(inv - (REAL)1, (REAL)0)), (REAL)0);
                REAL a = m / ((REAL)1 + b2);
                REAL r = sq(b2) + zi;
                v_next = a * r * r;
                REAL den = mx((REAL)1 - (REAL)2 * big_a * a, (REAL)1e-12);
                log_m = lg(ex(big_a * b2 * a / den) / sq(den));
                ok = big_a * a < (REAL)0.5;
            } else {
                REAL pp = mn(mx((psi - (REAL)1) / (psi + (REAL)1), (REAL)0), (REAL)1);
                REAL beta = ((REAL)1 - pp) / m;
                REAL u = ndtr(zi);
                REAL tail = ndtr(-zi);
                v_next = u <= pp ? (REAL)0 : lg(((REAL)1 - pp) / tail) / beta;
                log_m = lg(pp + beta * ((REAL)1 - pp) / mx(beta - big_a, (REAL)1e-12));
                ok = big_a < beta;
            }
            REAL k0s = ok ? -log_m - (k1 + (REAL)0.5 * k3) * v : k0;
            REAL var = mx(k3 * (v + v_next), (REAL)0);
            x = x + k0s + k1 * v + k2 * v_next + sq(var) * zx[i];
            v = v_next;
        }
        x_out[tid] = x;
    }
}

/* Arithmetic average of GBM over n fixings (asian.py): params (B, 4) = vol, T, n, s_geo;
   weights (B, M) the normalised forward weights (0 past n); z[b*sb + p*sn + i].
   x = log sum_i w_i exp(l_i), l_i = -vol^2 t_i / 2 + vol W(t_i), by a running
   log-sum-exp; xc = -s_geo^2 / 2 + vol (1/n) sum_i W(t_i) (the control variate). */
KERNEL(asian_average)(const REAL* __restrict__ z, int sb, int sn,
                      const REAL* __restrict__ params, const REAL* __restrict__ weights, int M,
                      int B, int N, REAL* __restrict__ x_out, REAL* __restrict__ xc_out,
                      int companion) {
    FOR_EACH_THREAD((long long)B * N) {
        int b = (int)(tid / N);
        long long p = tid % N;
        const REAL* zp = z + (long long)b * sb + p * sn;
        const REAL* th = params + 4 * b;
        const REAL* wb = weights + (long long)M * b;
        REAL vol = th[0], expiry = th[1], s_geo = th[3];
        int n = (int)th[2];
        REAL dt = expiry / (REAL)n, sdt = sq(dt);
        REAL w = (REAL)0, top = (REAL)0, acc = (REAL)0, wsum = (REAL)0;
        for (int i = 0; i < n; ++i) {
            w += zp[i] * sdt;
            REAL t = (REAL)(i + 1) * expiry / (REAL)n;
            REAL l = (REAL)-0.5 * vol * vol * t + vol * w;
            if (i == 0) { top = l; acc = wb[0]; }
            else if (l > top) { acc = acc * ex(top - l) + wb[i]; top = l; }
            else acc += wb[i] * ex(l - top);
            wsum += w;
        }
        x_out[tid] = top + lg(acc);
        if (companion) xc_out[tid] = (REAL)-0.5 * s_geo * s_geo + vol * wsum / (REAL)n;
    }
}
"""

_policy: contextvars.ContextVar[KernelPolicy] = contextvars.ContextVar("spectralmc_kernel_policy", default="auto")


class FusedKernelsUnavailableError(RuntimeError):
    """The fused kernels were required where they cannot run."""


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


def _real(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "float"
    if dtype == torch.float64:
        return "double"
    raise TypeError(f"the fused kernels take float32 or float64 normals, got {dtype}")


def _row_strides(z: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """z (B, N, d) with a unit last stride (copied if not), and its point and path strides
    (32-bit kernel arguments: a block holds fewer than 2^31 normals per row)."""
    if z.stride(-1) != 1 or max(z.stride(0), z.stride(1)) >= 2**31:
        z = z.contiguous()
    if max(z.stride(0), z.stride(1)) >= 2**31:
        raise ValueError(f"normals block too large for the fused kernels: strides {z.stride()}")
    return z, z.stride(0), z.stride(1)


def heston_arguments(
    theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's parameter table (B, 6) and bridge plan (steps, 3) int32 / (steps, 3)."""
    from spectralmc_server.engine.processes.bridge import bridge_plan

    if steps > MAX_FUSED_STEPS:
        raise ValueError(f"the fused Heston kernel takes at most {MAX_FUSED_STEPS} steps, got {steps}")
    params = torch.cat([theta.to(z.dtype), expiry.to(z.dtype)[:, None]], dim=1).contiguous()
    plan = bridge_plan(steps)
    idx = torch.tensor([[p, lo, hi] for p, lo, hi, *_ in plan], dtype=torch.int32, device=z.device)
    w = torch.tensor([[wl, wr, sd] for *_, wl, wr, sd in plan], dtype=z.dtype, device=z.device)
    return params, idx, w


def asian_arguments(theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's parameter table (B, 4) and forward weights (B, M)."""
    from spectralmc_server.engine.processes.asian import average_weights, fixing_count, geometric_scale

    n = fixing_count(theta)
    cols = [theta[:, 0], expiry, n, geometric_scale(theta, expiry)]
    params = torch.stack([c.to(z.dtype) for c in cols], dim=1).contiguous()
    weights = average_weights(theta, expiry).to(z.dtype).contiguous()
    return params, weights


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
    theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor, steps: int, use_bridge: bool
) -> torch.Tensor:
    """X (B, N) for Heston QE-M from normals z (B, N, 2 steps) in one fused launch."""
    z, sb, sn = _row_strides(z)
    b, n = z.shape[0], z.shape[1]
    params, idx, w = heston_arguments(theta, expiry, z, steps)
    x = torch.empty((b, n), dtype=z.dtype, device=z.device)
    args: list[torch.Tensor | int] = [z, sb, sn, params, idx, w, b, n, steps, int(use_bridge), x]
    _launch("heston_qe", _real(z.dtype), b * n, args)
    return x


def asian_x_cuda(
    theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor, companion: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """X (B, N) and, with ``companion``, the control variate X_c (B, N) in one launch."""
    z, sb, sn = _row_strides(z)
    b, n = z.shape[0], z.shape[1]
    params, weights = asian_arguments(theta, expiry, z)
    x = torch.empty((b, n), dtype=z.dtype, device=z.device)
    xc = torch.empty_like(x) if companion else x[:1, :1]
    args: list[torch.Tensor | int] = [z, sb, sn, params, weights, weights.shape[1], b, n, x, xc, int(companion)]
    _launch("asian_average", _real(z.dtype), b * n, args)
    return x, (xc if companion else None)


# -- the same source on the CPU (verification) -------------------------------------------
class HostKernels:
    """The kernel source compiled for the host: each kernel loops over its threads."""

    def __init__(self, library: Path, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._lib = ctypes.CDLL(str(library))
        p, i32 = ctypes.c_void_p, ctypes.c_int
        self._lib.heston_qe_host.argtypes = [p, i32, i32, p, p, p, i32, i32, i32, i32, p]
        self._lib.heston_qe_host.restype = None
        self._lib.asian_average_host.argtypes = [p, i32, i32, p, p, i32, i32, i32, p, p, i32]
        self._lib.asian_average_host.restype = None

    def _check(self, z: torch.Tensor) -> None:
        if z.device.type != "cpu" or z.dtype != self.dtype:
            raise TypeError(
                f"host kernels for {self.dtype} take CPU tensors of that dtype, got {z.dtype} on {z.device}"
            )

    def heston_x(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor, steps: int, use_bridge: bool
    ) -> torch.Tensor:
        self._check(z)
        z, sb, sn = _row_strides(z)
        b, n = z.shape[0], z.shape[1]
        params, idx, w = heston_arguments(theta, expiry, z, steps)
        x = torch.empty((b, n), dtype=z.dtype)
        self._lib.heston_qe_host(
            z.data_ptr(),
            sb,
            sn,
            params.data_ptr(),
            idx.data_ptr(),
            w.data_ptr(),
            b,
            n,
            steps,
            int(use_bridge),
            x.data_ptr(),
        )
        return x

    def asian_x(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor, companion: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check(z)
        z, sb, sn = _row_strides(z)
        b, n = z.shape[0], z.shape[1]
        params, weights = asian_arguments(theta, expiry, z)
        x = torch.empty((b, n), dtype=z.dtype)
        xc = torch.empty_like(x)
        self._lib.asian_average_host(
            z.data_ptr(), sb, sn, params.data_ptr(), weights.data_ptr(), weights.shape[1], b, n,
            x.data_ptr(), xc.data_ptr(), int(companion),
        )  # fmt: skip
        return x, (xc if companion else None)


def host_compiler() -> str | None:
    """A C++ compiler for :func:`compile_host` ($CXX, g++, clang++ or c++), or None."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def compile_host(dtype: torch.dtype, directory: Path | None = None) -> HostKernels:
    """Build :data:`SOURCE` for the CPU with ``-DSPECTRALMC_HOST`` and load it. Strict
    IEEE arithmetic (no fast-math), so results match a CUDA build to rounding."""
    cxx = host_compiler()
    if cxx is None:
        raise FusedKernelsUnavailableError("no C++ compiler found (set CXX or install g++)")
    real = _real(dtype)
    key = hashlib.sha256(f"{SOURCE}{real}{cxx}".encode()).hexdigest()[:16]
    out_dir = directory or Path(tempfile.gettempdir()) / "spectralmc-host-kernels"
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / f"kernels-{real}-{key}.so"
    if not library.exists():
        src = out_dir / f"kernels-{key}.cpp"
        src.write_text(SOURCE)
        tmp = library.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-DSPECTRALMC_HOST", f"-DREAL={real}"]
        subprocess.run([*cmd, "-o", str(tmp), str(src)], check=True, capture_output=True, text=True)
        tmp.replace(library)
    return HostKernels(library, dtype)


__all__ = [
    "MAX_FUSED_STEPS",
    "SOURCE",
    "FusedKernelsUnavailableError",
    "HostKernels",
    "KernelPolicy",
    "asian_x_cuda",
    "backend",
    "check_policy",
    "compile_host",
    "current_policy",
    "heston_x_cuda",
    "host_compiler",
    "kernel_policy",
    "use_fused",
]
