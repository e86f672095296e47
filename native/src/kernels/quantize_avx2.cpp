// The quantization kernels built with -mavx2 (x86-64 only; picked at run time by
// quantize.cpp when the CPU has AVX2). Same operations as the baseline build: no FMA.
#define PCCL_KERNEL_NS avx2
#include "quantize_kernels.inc"
