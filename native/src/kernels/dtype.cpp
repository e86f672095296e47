#include "pccl/dtype.hpp"

#include <string>

#include "pccl/errors.hpp"

namespace pccl {

size_t elementSize(DType dtype) {
  switch (dtype) {
    case DType::kInt8:
    case DType::kUInt8:
      return 1;
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kInt16:
    case DType::kUInt16:
      return 2;
    case DType::kFloat32:
    case DType::kInt32:
    case DType::kUInt32:
      return 4;
    case DType::kFloat64:
    case DType::kInt64:
    case DType::kUInt64:
      return 8;
  }
  throw InvalidArgument("unknown dtype code " + std::to_string(static_cast<int>(dtype)));
}

const char* dtypeName(DType dtype) {
  static const char* kNames[kNumDTypes] = {"float16", "bfloat16", "float32", "float64",
                                           "int8",    "int16",    "int32",   "int64",
                                           "uint8",   "uint16",   "uint32",  "uint64"};
  int code = static_cast<int>(dtype);
  return isValidDType(code) ? kNames[code] : "invalid";
}

const char* reduceOpName(ReduceOp op) {
  static const char* kNames[kNumReduceOps] = {"sum", "avg", "prod", "min", "max"};
  int code = static_cast<int>(op);
  return isValidReduceOp(code) ? kNames[code] : "invalid";
}

bool isValidDType(int code) { return code >= 0 && code < kNumDTypes; }
bool isValidReduceOp(int code) { return code >= 0 && code < kNumReduceOps; }

}  // namespace pccl
