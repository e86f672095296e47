// Element-wise reduction kernels.
#pragma once

#include <cstddef>

#include "pccl/dtype.hpp"

namespace pccl {

// dst[i] = a[i] (op) b[i] for i < count. dst may alias a or b. AVG reduces as SUM;
// the division happens once, in finalizeAverage, at the chunk's owner.
void reduceInto(DType dtype, ReduceOp op, void* dst, const void* a, const void* b, size_t count);

// b[i] = a[i] (op) b[i] and a[i] = the old b[i], in one pass: an in-place reduction
// that keeps what it overwrites (a and b must not overlap). Same bits as reduceInto.
void reduceSwap(DType dtype, ReduceOp op, void* a, void* b, size_t count);

// memcpy with non-temporal stores (for copies not read back soon, e.g. backups).
void streamCopy(void* dst, const void* src, size_t bytes);

// data[i] /= divisor. Floating types divide and round to the type; integer types
// divide the (wrapping) sum and truncate toward zero, as C does.
void finalizeAverage(DType dtype, void* data, size_t count, size_t divisor);

}  // namespace pccl
