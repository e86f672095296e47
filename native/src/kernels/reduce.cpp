// Reduction kernels. Simple loops the compiler vectorises; 16-bit floats are widened
// to float for every operation and rounded back (round to nearest even), so one
// reduction step gives the same bits on every machine.
#include "pccl/reduce.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <type_traits>

#include "pccl/errors.hpp"

namespace pccl {
namespace {

struct BF16 {
  uint16_t bits;
};

inline float toFloat(BF16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline BF16 fromFloat(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it quiet, never round to inf
    return BF16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  }
  uint32_t roundingBias = 0x7fffu + ((u >> 16) & 1u);
  return BF16{static_cast<uint16_t>((u + roundingBias) >> 16)};
}

// Arithmetic type used for one reduction step of T.
template <typename T>
struct Compute {
  using type = T;
};
template <>
struct Compute<_Float16> {
  using type = float;
};
template <>
struct Compute<BF16> {
  using type = float;
};

template <typename T>
inline typename Compute<T>::type load(T v) {
  if constexpr (std::is_same_v<T, BF16>) {
    return toFloat(v);
  } else {
    return static_cast<typename Compute<T>::type>(v);
  }
}

template <typename T>
inline T store(typename Compute<T>::type v) {
  if constexpr (std::is_same_v<T, BF16>) {
    return fromFloat(v);
  } else {
    return static_cast<T>(v);
  }
}

// Signed integer overflow is undefined in C++; wrap through the unsigned type, as
// two's complement hardware (and numpy) do.
template <typename T>
inline T wrapAdd(T a, T b) {
  using U = std::make_unsigned_t<T>;
  return static_cast<T>(static_cast<U>(static_cast<U>(a) + static_cast<U>(b)));
}
template <typename T>
inline T wrapMul(T a, T b) {
  using U = std::make_unsigned_t<T>;
  using W = std::conditional_t<(sizeof(U) < sizeof(unsigned)), unsigned, U>;  // avoid int promotion
  return static_cast<T>(static_cast<U>(static_cast<W>(static_cast<U>(a)) * static_cast<W>(static_cast<U>(b))));
}

template <typename C>
inline C nanAwareMin(C a, C b) {
  if constexpr (std::is_floating_point_v<C>) {
    if (a != a) return a;
    if (b != b) return b;
  }
  return b < a ? b : a;
}
template <typename C>
inline C nanAwareMax(C a, C b) {
  if constexpr (std::is_floating_point_v<C>) {
    if (a != a) return a;
    if (b != b) return b;
  }
  return a < b ? b : a;
}

template <ReduceOp kOp, typename C>
inline C combine(C x, C y) {
  if constexpr (kOp == ReduceOp::kSum || kOp == ReduceOp::kAvg) {
    if constexpr (std::is_integral_v<C>) {
      return wrapAdd(x, y);
    } else {
      return x + y;
    }
  } else if constexpr (kOp == ReduceOp::kProd) {
    if constexpr (std::is_integral_v<C>) {
      return wrapMul(x, y);
    } else {
      return x * y;
    }
  } else if constexpr (kOp == ReduceOp::kMin) {
    return nanAwareMin(x, y);
  } else {
    return nanAwareMax(x, y);
  }
}

template <typename T, ReduceOp kOp>
void reduceLoop(T* dst, const T* a, const T* b, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = store<T>(combine<kOp>(load(a[i]), load(b[i])));
}

// b[i] = a[i] op b[i], a[i] = old b[i]. a and b never overlap (restrict lets the
// compiler vectorise the pass).
template <typename T, ReduceOp kOp>
void reduceSwapLoop(T* __restrict a, T* __restrict b, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const T bi = b[i];
    b[i] = store<T>(combine<kOp>(load(a[i]), load(bi)));
    a[i] = bi;
  }
}

template <typename T, ReduceOp kOp, bool kSwap>
void reduceRun(void* dst, const void* a, const void* b, size_t n) {
  if constexpr (kSwap) {
    reduceSwapLoop<T, kOp>(static_cast<T*>(const_cast<void*>(a)), static_cast<T*>(dst), n);
  } else {
    reduceLoop<T, kOp>(static_cast<T*>(dst), static_cast<const T*>(a), static_cast<const T*>(b), n);
  }
}

// kSwap: dst is b, and a receives b's old values (reduceSwap).
template <typename T, bool kSwap>
void reduceTyped(ReduceOp op, void* dst, const void* a, const void* b, size_t n) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return reduceRun<T, ReduceOp::kSum, kSwap>(dst, a, b, n);
    case ReduceOp::kProd:
      return reduceRun<T, ReduceOp::kProd, kSwap>(dst, a, b, n);
    case ReduceOp::kMin:
      return reduceRun<T, ReduceOp::kMin, kSwap>(dst, a, b, n);
    case ReduceOp::kMax:
      return reduceRun<T, ReduceOp::kMax, kSwap>(dst, a, b, n);
  }
  throw InvalidArgument("unknown reduce op");
}

template <typename T>
void averageTyped(void* data, size_t n, size_t divisor) {
  auto* d = static_cast<T*>(data);
  using C = typename Compute<T>::type;
  if constexpr (std::is_integral_v<C>) {
    if constexpr (std::is_signed_v<C>) {
      const auto div = static_cast<int64_t>(divisor);
      for (size_t i = 0; i < n; ++i) d[i] = static_cast<T>(static_cast<int64_t>(d[i]) / div);
    } else {
      const auto div = static_cast<uint64_t>(divisor);
      for (size_t i = 0; i < n; ++i) d[i] = static_cast<T>(static_cast<uint64_t>(d[i]) / div);
    }
  } else {
    const C div = static_cast<C>(divisor);
    for (size_t i = 0; i < n; ++i) d[i] = store<T>(load(d[i]) / div);
  }
}

template <template <typename> class Fn, typename... Args>
void dispatch(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::kFloat16:
      return Fn<_Float16>::run(args...);
    case DType::kBFloat16:
      return Fn<BF16>::run(args...);
    case DType::kFloat32:
      return Fn<float>::run(args...);
    case DType::kFloat64:
      return Fn<double>::run(args...);
    case DType::kInt8:
      return Fn<int8_t>::run(args...);
    case DType::kInt16:
      return Fn<int16_t>::run(args...);
    case DType::kInt32:
      return Fn<int32_t>::run(args...);
    case DType::kInt64:
      return Fn<int64_t>::run(args...);
    case DType::kUInt8:
      return Fn<uint8_t>::run(args...);
    case DType::kUInt16:
      return Fn<uint16_t>::run(args...);
    case DType::kUInt32:
      return Fn<uint32_t>::run(args...);
    case DType::kUInt64:
      return Fn<uint64_t>::run(args...);
  }
  throw InvalidArgument("unknown dtype");
}

template <typename T>
struct ReduceFn {
  static void run(ReduceOp op, void* dst, const void* a, const void* b, size_t n) {
    reduceTyped<T, false>(op, dst, a, b, n);
  }
};

template <typename T>
struct ReduceSwapFn {
  static void run(ReduceOp op, void* a, void* b, size_t n) { reduceTyped<T, true>(op, b, a, b, n); }
};

template <typename T>
struct AverageFn {
  static void run(void* data, size_t n, size_t divisor) { averageTyped<T>(data, n, divisor); }
};

}  // namespace

void reduceInto(DType dtype, ReduceOp op, void* dst, const void* a, const void* b, size_t count) {
  dispatch<ReduceFn>(dtype, op, dst, a, b, count);
}

void streamCopy(void* dst, const void* src, size_t bytes) {
  auto* d = static_cast<uint8_t*>(dst);
  const auto* s = static_cast<const uint8_t*>(src);
#if defined(__SSE2__)
  // Non-temporal stores: the destination is not read back soon, and they spare the
  // read of each destination cache line that a normal store costs.
  size_t head = (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15;
  if (head > bytes) head = bytes;
  std::memcpy(d, s, head);
  size_t i = head;
  for (; i + 64 <= bytes; i += 64) {
    const __m128i x0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i x1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
    const __m128i x2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
    const __m128i x3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), x0);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), x1);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), x2);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), x3);
  }
  std::memcpy(d + i, s + i, bytes - i);
  _mm_sfence();
#else
  std::memcpy(d, s, bytes);
#endif
}

void reduceSwap(DType dtype, ReduceOp op, void* a, void* b, size_t count) {
  dispatch<ReduceSwapFn>(dtype, op, a, b, count);
}

void finalizeAverage(DType dtype, void* data, size_t count, size_t divisor) {
  PCCL_ENFORCE(divisor > 0, "average over zero peers");
  if (divisor == 1) return;
  dispatch<AverageFn>(dtype, data, count, divisor);
}

}  // namespace pccl
