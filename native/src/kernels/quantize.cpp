// Quantization: the public entry points; they pick the kernels built for the best
// instruction set this CPU has (quantize_kernels.inc). quantize.cpp and
// quantize_avx2.cpp are compiled with -ffp-contract=off: a fused multiply-add on one
// machine and none on another would decode the same bytes to different values.
#define PCCL_KERNEL_NS generic
#include "quantize_kernels.inc"

namespace pccl {

#if defined(PCCL_AVX2_KERNELS)
namespace avx2 {
void quantizeImpl(const QuantSpec& spec, DType dtype, const void* src, size_t count, uint8_t* dst);
void dequantizeImpl(const QuantSpec& spec, DType dtype, const uint8_t* src, size_t count, void* dst);
void reduceImpl(const QuantSpec& spec, DType dtype, const void* own, size_t ownRank, const uint8_t* const* contributions,
                size_t ranks, size_t count, size_t divisor, uint8_t* encoded, void* out);
}  // namespace avx2
#endif

namespace {
[[maybe_unused]] bool useAvx2() {
#if defined(PCCL_AVX2_KERNELS)
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}
}  // namespace

const char* quantKindName(QuantKind kind) {
  switch (kind) {
    case QuantKind::kNone:
      return "none";
    case QuantKind::kMinMax:
      return "minmax";
    case QuantKind::kZeroPoint:
      return "zeropoint";
  }
  return "?";
}

bool isValidQuantKind(int code) { return code >= 0 && code <= static_cast<int>(QuantKind::kZeroPoint); }

void checkQuantizable(const QuantSpec& spec, DType dtype) {
  if (spec.kind != QuantKind::kMinMax && spec.kind != QuantKind::kZeroPoint) {
    throw InvalidArgument("unknown quantization kind");
  }
  if (spec.wire != DType::kUInt8 && spec.wire != DType::kUInt16) {
    throw InvalidArgument("quantization to " + std::string(dtypeName(spec.wire)) +
                          " is not supported (uint8 or uint16)");
  }
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16 && dtype != DType::kFloat32 &&
      dtype != DType::kFloat64) {
    throw InvalidArgument("quantization needs a floating-point dtype, not " + std::string(dtypeName(dtype)));
  }
}

size_t quantEncodedBytes(const QuantSpec& spec, DType dtype, size_t count) {
  const size_t paramBytes = dtype == DType::kFloat64 ? 2 * sizeof(double) : 2 * sizeof(float);
  return (count + kQuantBlockElems - 1) / kQuantBlockElems * paramBytes + count * elementSize(spec.wire);
}

void quantize(const QuantSpec& spec, DType dtype, const void* src, size_t count, uint8_t* dst) {
#if defined(PCCL_AVX2_KERNELS)
  if (useAvx2()) return avx2::quantizeImpl(spec, dtype, src, count, dst);
#endif
  generic::quantizeImpl(spec, dtype, src, count, dst);
}

void dequantize(const QuantSpec& spec, DType dtype, const uint8_t* src, size_t count, void* dst) {
#if defined(PCCL_AVX2_KERNELS)
  if (useAvx2()) return avx2::dequantizeImpl(spec, dtype, src, count, dst);
#endif
  generic::dequantizeImpl(spec, dtype, src, count, dst);
}

void reduceQuantized(const QuantSpec& spec, DType dtype, const void* own, size_t ownRank,
                     const uint8_t* const* contributions, size_t ranks, size_t count, size_t divisor,
                     uint8_t* encoded, void* out) {
  PCCL_ENFORCE(ranks >= 1 && ownRank < ranks && divisor >= 1, "bad quantized reduction");
#if defined(PCCL_AVX2_KERNELS)
  if (useAvx2()) return avx2::reduceImpl(spec, dtype, own, ownRank, contributions, ranks, count, divisor, encoded, out);
#endif
  generic::reduceImpl(spec, dtype, own, ownRank, contributions, ranks, count, divisor, encoded, out);
}

}  // namespace pccl
