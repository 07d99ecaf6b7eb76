#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has CUDA torch and numpy, no network, Python
# 3.12): pydantic and orjson for the engine, pytest for the GPU tests. Run here, before
# a device session; bench/gpu_check.sh installs them from .whl/ (carried, git-ignored
# through .git/info/exclude). cupy (66 MiB) exceeds what a device call carries, so on
# that machine the fused kernels launch through torch's own NVRTC route.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$DEST" \
  'pydantic==2.14.4' 'pydantic-core==2.50.5' 'annotated-types==0.8.0' 'typing-inspection==0.4.5' \
  'orjson==3.13.0' 'pytest>=8,<9' 'pluggy>=1.5' 'iniconfig>=2' 'packaging>=24' 'typing-extensions>=4.12'
ls -la "$DEST"
