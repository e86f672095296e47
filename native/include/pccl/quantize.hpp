// Quantization kernels of the quantized all-reduce (allreduce_quantized.hpp).
//
// An encoded run of `count` elements is split into blocks of kQuantBlockElems; each
// block carries its own parameters, so one outlier only coarsens its own block. The
// run's bytes are: the blocks' parameters (two values of the accumulation type each),
// then the `count` quantized values (uint8 or uint16, little-endian).
//
//   min-max:    p0 = lo, p1 = scale = (hi - lo) / qmax;  q = round((x - lo) / scale);
//               x' = p0 + q * p1
//   zero-point: the range is widened to hold 0; p1 = scale, p0 = zp = round(-lo / scale);
//               q = round(x / scale) + zp;  x' = (q - zp) * p1  (0 is exact)
//
// The accumulation type is float for float16/bfloat16/float32 and double for float64.
// Rounding is round-half-up of a clamped non-negative value, written without branches
// so the loops vectorise. Dequantization is one function used by every peer, compiled
// without floating-point contraction, so equal bytes decode to equal values everywhere.
#pragma once

#include <cstddef>
#include <cstdint>

#include "pccl/dtype.hpp"

namespace pccl {

// Codes are part of the wire protocol (op digests) and of the Python binding.
enum class QuantKind : uint8_t { kNone = 0, kMinMax = 1, kZeroPoint = 2 };

constexpr size_t kQuantBlockElems = 2048;

struct QuantSpec {
  QuantKind kind = QuantKind::kNone;
  DType wire = DType::kUInt8;  // kUInt8 or kUInt16
};

const char* quantKindName(QuantKind kind);
bool isValidQuantKind(int code);
// Throws InvalidArgument unless `spec` can quantize `dtype` (float types; uint8/uint16).
void checkQuantizable(const QuantSpec& spec, DType dtype);

// Bytes of an encoded run of `count` elements of `dtype`.
size_t quantEncodedBytes(const QuantSpec& spec, DType dtype, size_t count);

// Encodes src[0, count) into dst (quantEncodedBytes bytes).
void quantize(const QuantSpec& spec, DType dtype, const void* src, size_t count, uint8_t* dst);

// Decodes an encoded run into dst[0, count) (rounded to `dtype`).
void dequantize(const QuantSpec& spec, DType dtype, const uint8_t* src, size_t count, void* dst);

// The chunk owner's step, fused per block: sums the N contributions in rank order
// (contributions[k] is rank k's encoded run; rank `ownRank` contributes `own` exactly,
// its entry is ignored), in the accumulation type, divides by `divisor` (AVG; 1 for
// SUM), encodes the sum into `encoded` and decodes that into `out` (what every other
// peer will decode from the same bytes; `out` may be null: encode only).
void reduceQuantized(const QuantSpec& spec, DType dtype, const void* own, size_t ownRank,
                     const uint8_t* const* contributions, size_t ranks, size_t count, size_t divisor,
                     uint8_t* encoded, void* out);

}  // namespace pccl
