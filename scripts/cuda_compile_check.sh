#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (CI): when nvcc exists, compile native/cuda/*.cu
# for the architectures the build targets; without nvcc, say so and succeed.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
  echo "cuda compile check: nvcc not found, skipped"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for src in native/cuda/*.cu; do
  nvcc -std=c++17 -O3 -fmad=false -Inative/include -Xcompiler -Wall,-Werror \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=compute_90 \
    -c "$src" -o "$out/$(basename "$src").o"
  echo "cuda compile check: $src ok ($(nvcc --version | tail -1))"
done
