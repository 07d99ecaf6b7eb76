"""The fused path kernels: the CUDA source checked on any machine, the device on a GPU.

On a CPU machine the same source is compiled for the host (``-DSPECTRALMC_HOST``: each
kernel loops over its thread index) and must reproduce the torch implementation path by
path; nvcc, where installed, must compile it for a real GPU architecture. On a CUDA
machine (tests marked ``gpu``) the kernels launched through cupy must match torch there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from spectralmc_server.engine import kernels
from spectralmc_server.engine.device import Budgets
from spectralmc_server.engine.processes import AsianProcess, HestonProcess
from spectralmc_server.engine.processes.asian import MAX_FIXINGS, asian_arguments
from spectralmc_server.engine.processes.heston import heston_arguments
from spectralmc_server.engine.spectrum import SpectrumConfig
from spectralmc_server.engine.trainer import TrainConfig, Trainer, mc_targets

needs_cxx = pytest.mark.skipif(kernels.host_compiler() is None, reason="no C++ compiler (g++/clang++) on this machine")


def _points(process: HestonProcess | AsianProcess, b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    domain = process.default_domain()
    theta, expiry = domain.from_unit(torch.rand(b, domain.dims, generator=g, dtype=torch.float64))
    return process.canonical_params(theta), expiry


def _normals(n: int, b: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The trainer's layout: a block (N, B*d) viewed as (B, N, d) (strides d, B*d, 1)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, b * d, generator=g, dtype=dtype).view(n, b, d).transpose(0, 1)


# Per-path agreement relative to the largest |X|: float64 to rounding accumulated over up
# to 64 steps of ~10 transcendental calls each (measured: 5e-12 at 64 steps, 1e-15 at 16);
# float32 likewise (measured 3e-6 at 16 steps). The kernel evaluates the same formulas in
# another order, with the C library's exp/log/erfc in place of torch's.
TOL = {torch.float64: 1e-11, torch.float32: 2e-5}


@pytest.fixture(scope="module")
def host_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("host-kernels")


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("steps", "bridge"), [(1, True), (2, True), (5, True), (16, True), (16, False), (64, True)])
def test_host_heston_kernel_matches_torch_path_by_path(
    dtype: torch.dtype, steps: int, bridge: bool, host_build: Path
) -> None:
    process = HestonProcess(steps, bridge=bridge)
    theta, expiry = _points(process, 12, seed=steps)
    z = _normals(2048, 12, process.normals_per_path, dtype, seed=steps + 1)
    expected = process.simulate_x(theta, expiry, z)
    got = kernels.compile_host(dtype, host_build).heston_x(z, *heston_arguments(theta, expiry, z, steps), steps, bridge)
    assert got.dtype == dtype and got.shape == expected.shape
    assert torch.isfinite(got).all()
    err = (got - expected).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, expected.abs().max().item()), err


@needs_cxx
def test_host_heston_kernel_covers_both_qe_branches_and_extremes(host_build: Path) -> None:
    """Corner parameters: the exponential branch (large xi, small v), positive rho (the
    martingale correction can fail), the domain's longest and shortest maturities."""
    process = HestonProcess(16)
    theta = torch.tensor(
        [
            [0.01, 0.5, 0.01, 1.0, 0.3],  # psi large: exponential branch, zero variance hits
            [0.25, 5.0, 0.25, 0.1, -0.9],  # nearly deterministic variance: quadratic branch
            [0.04, 1.0, 0.04, 1.0, 0.3],
            [0.09, 2.0, 0.01, 0.8, -0.5],
        ],
        dtype=torch.float64,
    )
    expiry = torch.tensor([3.0, 0.05, 3.0, 1.0], dtype=torch.float64)
    z = _normals(4096, 4, process.normals_per_path, torch.float64, seed=5)
    expected = process.simulate_x(theta, expiry, z)
    got = kernels.compile_host(torch.float64, host_build).heston_x(z, *heston_arguments(theta, expiry, z, 16), 16, True)
    assert (got - expected).abs().max().item() <= TOL[torch.float64] * max(1.0, expected.abs().max().item())


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_asian_kernel_matches_torch_with_its_control_variate(dtype: torch.dtype, host_build: Path) -> None:
    process = AsianProcess()
    theta, expiry = _points(process, 16, seed=3)
    theta[:4, 2] = torch.tensor([1.0, 2.0, 63.0, float(MAX_FIXINGS)], dtype=torch.float64)  # the fixing extremes
    z = _normals(2048, 16, process.normals_per_path, dtype, seed=4)
    x_expected = process.simulate_x(theta, expiry, z)
    xc_expected, _ = process.companion_x(theta, expiry, z)
    host = kernels.compile_host(dtype, host_build)
    x, xc = host.asian_x(z, *asian_arguments(theta, expiry, z), companion=True)
    assert xc is not None
    assert (x - x_expected).abs().max().item() <= TOL[dtype] * max(1.0, x_expected.abs().max().item())
    assert (xc - xc_expected).abs().max().item() <= TOL[dtype] * max(1.0, xc_expected.abs().max().item())
    x_only, none = host.asian_x(z, *asian_arguments(theta, expiry, z), companion=False)
    assert none is None and torch.equal(x_only, x)


@needs_cxx
def test_host_kernel_targets_equal_torch_targets(host_build: Path) -> None:
    """The CF estimate the trainer fits, from kernel paths and from torch paths (float32,
    as in training)."""
    process = HestonProcess()
    spectrum = SpectrumConfig()
    theta, expiry = _points(process, 8, seed=9)
    block = torch.randn(1024, 8 * process.normals_per_path, generator=torch.Generator().manual_seed(2))
    expected = mc_targets(process, spectrum, theta, expiry, block)
    z3 = block.view(1024, 8, -1).transpose(0, 1)
    host = kernels.compile_host(torch.float32, host_build)
    x = host.heston_x(z3, *heston_arguments(theta, expiry, z3, process.steps), process.steps, True)
    from spectralmc_server.engine.spectrum import estimate_cf

    got = estimate_cf(x / process.scale(theta, expiry).to(x.dtype)[:, None], spectrum)
    assert (got - expected).abs().max().item() < 1e-4  # MC noise at 1,024 paths is ~3e-2


def test_the_host_build_refuses_other_dtypes_and_devices(host_build: Path) -> None:
    if kernels.host_compiler() is None:
        pytest.skip("no C++ compiler (g++/clang++) on this machine")
    host = kernels.compile_host(torch.float32, host_build)
    process = HestonProcess()
    theta, expiry = _points(process, 2, seed=0)
    z = _normals(8, 2, 32, torch.float64, 0)
    with pytest.raises(TypeError, match="float32"):
        host.heston_x(z, *heston_arguments(theta, expiry, z, 16), 16, True)
    with pytest.raises(ValueError, match="at most 64 steps"):
        heston_arguments(theta, expiry, torch.zeros(2, 8, 130), 65)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not installed on this machine")
@pytest.mark.parametrize("real", ["float", "double"])
def test_nvcc_compiles_the_kernels_for_a_real_gpu(real: str, tmp_path: Path) -> None:
    """The device build, as NVRTC sees it (no host headers), for sm_90 (H100/H200)."""
    src = tmp_path / "kernels.cu"
    src.write_text(kernels.SOURCE)
    out = tmp_path / "kernels.ptx"
    proc = subprocess.run(
        ["nvcc", "--ptx", "-arch=sm_90", f"-DREAL={real}", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    ptx = out.read_text()
    assert ".entry heston_qe" in ptx and ".entry asian_average" in ptx


def _nvrtc_library() -> ctypes.CDLL | None:
    """libnvrtc from the test extra's nvidia-cuda-nvrtc wheel, the system, or a toolkit."""
    candidates: list[str | None] = []
    spec = importlib.util.find_spec("nvidia")  # the namespace package of NVIDIA's wheels
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        candidates += sorted(str(p) for p in Path(root).glob("cu*/lib/libnvrtc.so*"))
    candidates.append(ctypes.util.find_library("nvrtc"))
    candidates += sorted(str(p) for p in Path("/usr/local").glob("cuda*/lib64/libnvrtc.so*"))
    for name in candidates:
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


@pytest.mark.skipif(_nvrtc_library() is None, reason="NVRTC (libnvrtc, the CUDA toolkit) is not on this machine")
@pytest.mark.parametrize("real", ["float", "double"])
def test_nvrtc_compiles_the_kernels_as_the_runtime_launchers_do(real: str) -> None:
    """cupy and torch's launcher both compile SOURCE with NVRTC at run time (no host
    headers, no nvcc): compile it here the same way, to PTX for sm_90."""
    lib = _nvrtc_library()
    assert lib is not None
    prog = ctypes.c_void_p()
    src = kernels.SOURCE.encode()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"kernels.cu", 0, None, None) == 0
    options = [f"-DREAL={real}".encode(), b"--std=c++17", b"--gpu-architecture=compute_90"]
    argv = (ctypes.c_char_p * len(options))(*options)
    status = lib.nvrtcCompileProgram(prog, len(options), argv)
    log_size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(log_size))
    log = ctypes.create_string_buffer(log_size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert status == 0, log.value.decode(errors="replace")
    size = ctypes.c_size_t()
    assert lib.nvrtcGetPTXSize(prog, ctypes.byref(size)) == 0
    ptx = ctypes.create_string_buffer(size.value)
    assert lib.nvrtcGetPTX(prog, ptx) == 0
    text = ptx.value.decode()
    assert ".entry heston_qe" in text and ".entry asian_average" in text
    lib.nvrtcDestroyProgram(ctypes.byref(prog))


# -- the policy ---------------------------------------------------------------------------
def test_auto_takes_torch_without_cuda_and_fused_is_refused_at_construction() -> None:
    z = torch.zeros(2, 4, 32)
    assert kernels.use_fused(z) is False  # auto on the CPU
    with kernels.kernel_policy("fused"), pytest.raises(kernels.FusedKernelsUnavailableError, match="CUDA devices"):
        kernels.use_fused(z)
    with pytest.raises(kernels.FusedKernelsUnavailableError, match="kernels = 'fused' cannot run"):
        Trainer(TrainConfig(process="heston", kernels="fused", batch_points=8, paths=64), Budgets())
    with kernels.kernel_policy("torch"):
        assert kernels.current_policy() == "torch"
    assert kernels.current_policy() == "auto"


def test_differentiated_inputs_always_take_torch() -> None:
    """Greeks differentiate through the simulation: the kernels have no derivative."""
    theta = torch.ones(2, 5, requires_grad=True)
    assert kernels._differentiated((theta,))
    seen: list[bool] = []

    def probe(t: torch.Tensor) -> torch.Tensor:
        seen.append(kernels._differentiated((t,)))
        return t * 2

    torch.func.jvp(probe, (torch.ones(2),), (torch.ones(2),))
    assert seen == [True]
    assert not kernels._differentiated((torch.ones(2),))


# -- on a CUDA device -----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_fused_kernels_match_torch_on_the_device(dtype: torch.dtype) -> None:
    if kernels.cupy_module() is None:
        pytest.skip("cupy (the gpu extra) is not installed")
    cuda = torch.device("cuda")
    heston = HestonProcess()
    theta, expiry = (t.to(cuda) for t in _points(heston, 64, seed=1))
    z = _normals(4096, 64, heston.normals_per_path, dtype, seed=2).to(cuda)
    with kernels.kernel_policy("torch"):
        expected = heston.simulate_x(theta, expiry, z)
    with kernels.kernel_policy("fused"):
        got = heston.simulate_x(theta, expiry, z)
    assert (got - expected).abs().max().item() <= TOL[dtype] * max(1.0, expected.abs().max().item())
    asian = AsianProcess()
    theta, expiry = (t.to(cuda) for t in _points(asian, 64, seed=3))
    z = _normals(4096, 64, asian.normals_per_path, dtype, seed=4).to(cuda)
    with kernels.kernel_policy("torch"):
        x_t, (xc_t, s_t) = asian.simulate_with_companion(theta, expiry, z)
    with kernels.kernel_policy("fused"):
        x_f, (xc_f, s_f) = asian.simulate_with_companion(theta, expiry, z)
    assert (x_f - x_t).abs().max().item() <= TOL[dtype] * max(1.0, x_t.abs().max().item())
    assert (xc_f - xc_t).abs().max().item() <= TOL[dtype] * max(1.0, xc_t.abs().max().item())
    assert torch.equal(s_f, s_t)


@pytest.mark.gpu
def test_cuda_training_runs_with_fused_kernels_and_with_torch() -> None:
    if kernels.cupy_module() is None:
        pytest.skip("cupy (the gpu extra) is not installed")
    losses = {}
    for policy in ("fused", "torch"):
        cfg = TrainConfig(
            process="heston", device="cuda", kernels=policy, batch_points=32, paths=256, validation_points=64
        )
        trainer = Trainer(cfg, Budgets())
        try:
            losses[policy] = [trainer.train_step() for _ in range(3)]
        finally:
            trainer.close()
    # Same normals and points: the targets differ by float32 rounding only.
    for a, b in zip(losses["fused"], losses["torch"], strict=True):
        assert abs(a - b) <= 1e-3 * abs(b)
