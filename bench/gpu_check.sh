#!/usr/bin/env bash
# The GPU check (issue 7): ONE script for a GPU machine, meant to finish within 8
# minutes on one H100. It runs the GPU-marked tests, then every measurement on the GPU
# and on the CPU path of the same machine (bench/gpu_check.py), and leaves under $OUT:
#   gpu_tests.txt   the GPU tests' output       results.json  every figure, raw
#   results.md      the tables                  gpu_check.png error vs time, paths vs bound
#   nvidia-smi.txt  the device, when nvidia-smi is there
# On a machine without CUDA it runs the same steps (the GPU tests skip, with the reason
# shown) and measures the CPU path only, which is how the script is checked before a
# GPU session. Settings: OUT (default bench/out/gpu_check), CURVE_SECONDS (GPU
# error-vs-time training per process, default 120), CPU_CURVE_SECONDS (default 25),
# QUICK=1 (tiny sizes: a smoke run of the script itself).
# Wheels the GPU machine lacks come from .whl/ (bench/fetch_device_wheels.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu_check}
mkdir -p "$OUT"
start=$(date +%s)
if [ -d .whl ] && ! python3 -c 'import pydantic, orjson, pytest' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/spectralmc-site .whl/*.whl
  export PYTHONPATH=/tmp/spectralmc-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.is_available() and torch.cuda.get_device_name())'

# 1. The GPU-marked tests (plain pytest: no server plugins, which need the service extras).
timeout 180 python3 -m pytest -q -o addopts="" -p spectralmc_markers -rs -m gpu \
  tests/engine/test_kernels.py tests/engine/test_normals.py > "$OUT/gpu_tests.txt" 2>&1
tests_rc=$?
summary=$(tail -n 1 "$OUT/gpu_tests.txt")
echo "GPU tests (rc $tests_rc): $summary"

# 2. The measurements, GPU and CPU path, in one process.
args=(--out "$OUT" --note "rc $tests_rc: $summary" --curve-seconds "${CURVE_SECONDS:-120}" --cpu-curve-seconds "${CPU_CURVE_SECONDS:-25}")
if [ "${QUICK:-0}" = 1 ]; then args+=(--quick --devices cuda,cpu); fi
timeout 390 python3 bench/gpu_check.py "${args[@]}"
bench_rc=$?
echo "gpu_check.sh: tests rc $tests_rc, measurements rc $bench_rc, $(( $(date +%s) - start )) s; results in $OUT"
[ "$tests_rc" = 0 ] || [ "$tests_rc" = 5 ] || exit "$tests_rc"
exit "$bench_rc"
