// Element types and reduction operators understood by the engine.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pccl {

// Codes are part of the wire protocol (op digests) and of the Python binding.
enum class DType : uint8_t {
  kFloat16 = 0,
  kBFloat16 = 1,
  kFloat32 = 2,
  kFloat64 = 3,
  kInt8 = 4,
  kInt16 = 5,
  kInt32 = 6,
  kInt64 = 7,
  kUInt8 = 8,
  kUInt16 = 9,
  kUInt32 = 10,
  kUInt64 = 11,
};
constexpr int kNumDTypes = 12;

enum class ReduceOp : uint8_t {
  kSum = 0,
  kAvg = 1,
  kProd = 2,
  kMin = 3,
  kMax = 4,
};
constexpr int kNumReduceOps = 5;

size_t elementSize(DType dtype);
const char* dtypeName(DType dtype);
const char* reduceOpName(ReduceOp op);
bool isValidDType(int code);
bool isValidReduceOp(int code);

}  // namespace pccl
