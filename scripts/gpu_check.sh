#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and nvcc: build with the CUDA kernels, run the GPU
# tests and the quantization tests, then a quantized benchmark (64M float32, N=2 and 4).
# Usage: scripts/gpu_check.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "nvcc not found: the CUDA kernels cannot be built" >&2; exit 2; }
nvidia-smi -L || true
make install
.venv/bin/python -c "import pccl_py._native as n, torch; assert n.CUDA_BUILT, 'built without CUDA'; \
print('CUDA kernels built; device visible:', n.cuda_available(), '; torch sees', torch.cuda.device_count(), 'GPU(s)')"
.venv/bin/python -m pytest -q -rs tests/test_cuda.py tests/test_quantization.py "$@"
uptime
.venv/bin/pccl bench --peers 2 4 --sizes 64M --quantization uint8 --rounds 3
