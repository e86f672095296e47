// Quantization kernels on a CUDA device, producing and reading the exact encoding of
// quantize.hpp (same blocks, parameters and rounding; decoding without fused
// multiply-add), so bytes encoded on a GPU decode to the same values on a CPU peer and
// back. Built only when CMake finds nvcc (PCCL_WITH_CUDA); pointers are device memory.
#pragma once

#include <cstddef>
#include <cstdint>

#include "pccl/quantize.hpp"

namespace pccl {
namespace cuda {

// Whether the kernels were built and a CUDA device is visible.
bool available();
// Encode src[0, count) (device) into dst (device, quantEncodedBytes bytes); synchronous.
void quantize(const QuantSpec& spec, DType dtype, const void* src, size_t count, uint8_t* dst);
// Decode an encoded run (device) into dst[0, count) (device); synchronous.
void dequantize(const QuantSpec& spec, DType dtype, const uint8_t* src, size_t count, void* dst);

}  // namespace cuda
}  // namespace pccl
