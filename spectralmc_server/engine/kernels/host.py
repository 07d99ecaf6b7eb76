"""The kernel source built for the CPU (verification): with ``-DSPECTRALMC_HOST`` a C++
compiler builds ``paths.cu`` into a shared library whose "kernels" loop over the thread
index. Tests check the kernel arithmetic against the torch implementation with it on a
machine with no GPU. Its kernels take the arguments the processes pack, as the device
launchers (launch.py) do."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from spectralmc_server.engine.kernels.source import (
    SOURCE,
    FusedKernelsUnavailableError,
    check_steps,
    real_type,
    row_strides,
)


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
        self,
        z: torch.Tensor,
        params: torch.Tensor,
        plan_idx: torch.Tensor,
        plan_w: torch.Tensor,
        steps: int,
        use_bridge: bool,
    ) -> torch.Tensor:
        """X (B, N) for Heston QE-M; ``params``, ``plan_idx`` and ``plan_w`` as
        ``heston_arguments`` (processes/heston.py) packs them."""
        self._check(z)
        check_steps(steps)
        z, sb, sn = row_strides(z)
        b, n = z.shape[0], z.shape[1]
        x = torch.empty((b, n), dtype=z.dtype)
        self._lib.heston_qe_host(
            z.data_ptr(),
            sb,
            sn,
            params.data_ptr(),
            plan_idx.data_ptr(),
            plan_w.data_ptr(),
            b,
            n,
            steps,
            int(use_bridge),
            x.data_ptr(),
        )
        return x

    def asian_x(
        self, z: torch.Tensor, params: torch.Tensor, weights: torch.Tensor, companion: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """X (B, N) and, with ``companion``, X_c; ``params`` and ``weights`` as
        ``asian_arguments`` (processes/asian.py) packs them."""
        self._check(z)
        z, sb, sn = row_strides(z)
        b, n = z.shape[0], z.shape[1]
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
    real = real_type(dtype)
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
