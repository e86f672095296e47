// Quantization kernels. Block loops without branches, written for the compiler to
// vectorise; 16-bit floats are widened into a block-sized float buffer first. This
// file is compiled with -ffp-contract=off (CMakeLists.txt): a fused multiply-add on one
// machine and none on another would decode the same bytes to different values.
#include "pccl/quantize.hpp"

#include <algorithm>
#include <cstring>
#include <string>
#include <limits>
#include <type_traits>

#include "pccl/errors.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

inline BF16 fromFloat(float f) {  // round to nearest even, as reduce.cpp
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return BF16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  uint32_t roundingBias = 0x7fffu + ((u >> 16) & 1u);
  return BF16{static_cast<uint16_t>((u + roundingBias) >> 16)};
}

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename A, typename T>
inline A loadAs(T v) {
  if constexpr (std::is_same_v<T, BF16>) {
    return toFloat(v);
  } else {
    return static_cast<A>(v);
  }
}

template <typename T, typename A>
inline T storeAs(A v) {
  if constexpr (std::is_same_v<T, BF16>) {
    return fromFloat(v);
  } else {
    return static_cast<T>(v);
  }
}

template <typename A>
struct Params {
  A p0;  // min-max: lo; zero-point: zp
  A p1;  // scale
};

inline size_t blockCount(size_t count) { return (count + kQuantBlockElems - 1) / kQuantBlockElems; }

// Lane-wise min/max over GCC/Clang vector types (the plain loop is not vectorised:
// a float min reduction is order-sensitive for the compiler, not for us).
typedef float FloatVec __attribute__((vector_size(16)));
typedef double DoubleVec __attribute__((vector_size(16)));
template <typename A>
struct VecOf {
  using type = FloatVec;
};
template <>
struct VecOf<double> {
  using type = DoubleVec;
};

template <typename A>
inline void minMax(const A* x, size_t n, A& lo, A& hi) {
  using V = typename VecOf<A>::type;
  constexpr size_t kW = sizeof(V) / sizeof(A);
  size_t i = 0;
  lo = x[0];
  hi = x[0];
  if (n >= 2 * kW) {
    V mn0, mn1;
    std::memcpy(&mn0, x, sizeof(V));
    std::memcpy(&mn1, x + kW, sizeof(V));
    V mx0 = mn0, mx1 = mn1;
    for (i = 2 * kW; i + 2 * kW <= n; i += 2 * kW) {
      V a, b;
      std::memcpy(&a, x + i, sizeof(V));
      std::memcpy(&b, x + i + kW, sizeof(V));
      mn0 = a < mn0 ? a : mn0;
      mn1 = b < mn1 ? b : mn1;
      mx0 = a > mx0 ? a : mx0;
      mx1 = b > mx1 ? b : mx1;
    }
    mn0 = mn1 < mn0 ? mn1 : mn0;
    mx0 = mx1 > mx0 ? mx1 : mx0;
    for (size_t j = 0; j < kW; ++j) {
      lo = mn0[j] < lo ? mn0[j] : lo;
      hi = mx0[j] > hi ? mx0[j] : hi;
    }
  }
  for (; i < n; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
  }
}

// Clamps to [0, qmax] (NaN becomes 0) and rounds half up.
template <typename A, typename Q>
inline Q roundClamp(A v, A qmax) {
  v = v > A(0) ? v : A(0);
  v = v < qmax ? v : qmax;
  return static_cast<Q>(static_cast<int32_t>(v + A(0.5)));
}

// q[i] = roundClamp((x[i] - sub) * mul + add): min-max is (x - lo) * inv + 0, zero-point
// (x - 0) * inv + zp; both equal the plain formulas bit for bit.
template <typename A, typename Q>
inline void encodeLoop(const A* __restrict x, size_t n, A sub, A mul, A add, Q* __restrict q) {
  constexpr A qmax = static_cast<A>(std::numeric_limits<Q>::max());
  size_t i = 0;
#if defined(__SSE2__)
  // The compiler's own vectorisation of the clamp and the narrowing is poor; spell it out.
  if constexpr (std::is_same_v<A, float>) {
    const __m128 vs = _mm_set1_ps(sub), vm = _mm_set1_ps(mul), va = _mm_set1_ps(add);
    const __m128 zero = _mm_setzero_ps(), top = _mm_set1_ps(qmax), half = _mm_set1_ps(0.5f);
    auto conv = [&](const float* p) {
      __m128 v = _mm_add_ps(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(p), vs), vm), va);
      v = _mm_min_ps(_mm_max_ps(v, zero), top);  // max(NaN, 0) is 0
      return _mm_cvttps_epi32(_mm_add_ps(v, half));
    };
    if constexpr (sizeof(Q) == 1) {
      for (; i + 16 <= n; i += 16) {
        __m128i lo16 = _mm_packs_epi32(conv(x + i), conv(x + i + 4));
        __m128i hi16 = _mm_packs_epi32(conv(x + i + 8), conv(x + i + 12));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm_packus_epi16(lo16, hi16));
      }
    } else {
      const __m128i bias = _mm_set1_epi32(32768);
      const __m128i flip = _mm_set1_epi16(static_cast<int16_t>(0x8000));
      for (; i + 8 <= n; i += 8) {
        __m128i a = _mm_sub_epi32(conv(x + i), bias);
        __m128i b = _mm_sub_epi32(conv(x + i + 4), bias);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm_xor_si128(_mm_packs_epi32(a, b), flip));
      }
    }
  }
#endif
  for (; i < n; ++i) q[i] = roundClamp<A, Q>((x[i] - sub) * mul + add, qmax);
}

template <typename A, typename Q, QuantKind K>
inline void encodeBlock(const A* __restrict x, size_t n, Params<A>* p, Q* __restrict q) {
  constexpr A qmax = static_cast<A>(std::numeric_limits<Q>::max());
  A lo;
  A hi;
  minMax(x, n, lo, hi);
  if constexpr (K == QuantKind::kZeroPoint) {
    lo = lo < A(0) ? lo : A(0);
    hi = hi > A(0) ? hi : A(0);
  }
  const A range = hi - lo;
  A inv = range > A(0) ? qmax / range : A(0);
  if (!(inv <= std::numeric_limits<A>::max())) inv = A(0);  // range too small (or not finite)
  p->p1 = range / qmax;
  if constexpr (K == QuantKind::kMinMax) {
    p->p0 = lo;
    encodeLoop<A, Q>(x, n, lo, inv, A(0), q);
  } else {
    const A zp = static_cast<A>(roundClamp<A, Q>((A(0) - lo) * inv, qmax));
    p->p0 = zp;
    encodeLoop<A, Q>(x, n, A(0), inv, zp, q);
  }
}

template <typename A, typename Q, QuantKind K>
inline void decodeBlock(const Params<A>& p, const Q* __restrict q, size_t n, A* __restrict y) {
  const A p0 = p.p0;
  const A p1 = p.p1;
  if constexpr (K == QuantKind::kMinMax) {
    for (size_t i = 0; i < n; ++i) y[i] = p0 + static_cast<A>(q[i]) * p1;
  } else {
    for (size_t i = 0; i < n; ++i) y[i] = (static_cast<A>(q[i]) - p0) * p1;
  }
}

// acc[i] += decoded q[i] (the same rounding as decodeBlock, then one addition).
template <typename A, typename Q, QuantKind K>
inline void decodeAddBlock(const Params<A>& p, const Q* __restrict q, size_t n, A* __restrict acc) {
  const A p0 = p.p0;
  const A p1 = p.p1;
  if constexpr (K == QuantKind::kMinMax) {
    for (size_t i = 0; i < n; ++i) acc[i] += p0 + static_cast<A>(q[i]) * p1;
  } else {
    for (size_t i = 0; i < n; ++i) acc[i] += (static_cast<A>(q[i]) - p0) * p1;
  }
}

// Views of an encoded run.
template <typename A, typename Q>
struct Encoded {
  Encoded(uint8_t* base, size_t count)
      : params(reinterpret_cast<Params<A>*>(base)),
        data(reinterpret_cast<Q*>(base + blockCount(count) * sizeof(Params<A>))) {}
  Params<A>* params;
  Q* data;
};

template <typename T, typename Q, QuantKind K>
struct Kernels {
  using A = typename AccOf<T>::type;
  static constexpr bool kDirect = std::is_same_v<T, A>;

  static void quantize(const void* src, size_t count, uint8_t* dst) {
    const T* x = static_cast<const T*>(src);
    Encoded<A, Q> enc(dst, count);
    A buf[kQuantBlockElems];
    for (size_t b = 0, off = 0; off < count; ++b, off += kQuantBlockElems) {
      const size_t n = std::min(kQuantBlockElems, count - off);
      const A* block;
      if constexpr (kDirect) {
        block = x + off;
      } else {
        for (size_t i = 0; i < n; ++i) buf[i] = loadAs<A>(x[off + i]);
        block = buf;
      }
      encodeBlock<A, Q, K>(block, n, enc.params + b, enc.data + off);
    }
  }

  static void dequantize(const uint8_t* src, size_t count, void* dst) {
    T* y = static_cast<T*>(dst);
    Encoded<A, Q> enc(const_cast<uint8_t*>(src), count);
    A buf[kQuantBlockElems];
    for (size_t b = 0, off = 0; off < count; ++b, off += kQuantBlockElems) {
      const size_t n = std::min(kQuantBlockElems, count - off);
      if constexpr (kDirect) {
        decodeBlock<A, Q, K>(enc.params[b], enc.data + off, n, y + off);
      } else {
        decodeBlock<A, Q, K>(enc.params[b], enc.data + off, n, buf);
        for (size_t i = 0; i < n; ++i) y[off + i] = storeAs<T>(buf[i]);
      }
    }
  }

  static void reduce(const void* ownSrc, size_t ownRank, const uint8_t* const* contributions, size_t ranks,
                     size_t count, size_t divisor, uint8_t* encoded, void* outDst) {
    const T* own = static_cast<const T*>(ownSrc);
    T* out = static_cast<T*>(outDst);
    Encoded<A, Q> result(encoded, count);
    A acc[kQuantBlockElems];
    A term[kQuantBlockElems];
    const A div = static_cast<A>(divisor);
    for (size_t b = 0, off = 0; off < count; ++b, off += kQuantBlockElems) {
      const size_t n = std::min(kQuantBlockElems, count - off);
      // acc = term_0 + term_1 + ... in rank order, each addition rounded once.
      for (size_t k = 0; k < ranks; ++k) {
        if (k == ownRank) {
          if (k == 0) {
            for (size_t i = 0; i < n; ++i) acc[i] = loadAs<A>(own[off + i]);
          } else {
            for (size_t i = 0; i < n; ++i) acc[i] += loadAs<A>(own[off + i]);
          }
        } else {
          Encoded<A, Q> c(const_cast<uint8_t*>(contributions[k]), count);
          if (k == 0) {
            decodeBlock<A, Q, K>(c.params[b], c.data + off, n, acc);
          } else {
            decodeAddBlock<A, Q, K>(c.params[b], c.data + off, n, acc);
          }
        }
      }
      if (divisor > 1) {
        for (size_t i = 0; i < n; ++i) acc[i] = acc[i] / div;
      }
      encodeBlock<A, Q, K>(acc, n, result.params + b, result.data + off);
      if (out == nullptr) continue;
      if constexpr (kDirect) {
        decodeBlock<A, Q, K>(result.params[b], result.data + off, n, out + off);
      } else {
        decodeBlock<A, Q, K>(result.params[b], result.data + off, n, term);
        for (size_t i = 0; i < n; ++i) out[off + i] = storeAs<T>(term[i]);
      }
    }
  }
};

template <template <typename, typename, QuantKind> class Fn, typename T, typename Q, typename... Args>
void byKind(QuantKind kind, Args&&... args) {
  if (kind == QuantKind::kMinMax) return Fn<T, Q, QuantKind::kMinMax>::run(args...);
  if (kind == QuantKind::kZeroPoint) return Fn<T, Q, QuantKind::kZeroPoint>::run(args...);
  throw InvalidArgument("unknown quantization kind");
}

template <template <typename, typename, QuantKind> class Fn, typename T, typename... Args>
void byWire(const QuantSpec& spec, Args&&... args) {
  if (spec.wire == DType::kUInt8) return byKind<Fn, T, uint8_t>(spec.kind, args...);
  if (spec.wire == DType::kUInt16) return byKind<Fn, T, uint16_t>(spec.kind, args...);
  throw InvalidArgument("quantization to " + std::string(dtypeName(spec.wire)) + " is not supported");
}

template <template <typename, typename, QuantKind> class Fn, typename... Args>
void dispatch(const QuantSpec& spec, DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::kFloat16:
      return byWire<Fn, _Float16>(spec, args...);
    case DType::kBFloat16:
      return byWire<Fn, BF16>(spec, args...);
    case DType::kFloat32:
      return byWire<Fn, float>(spec, args...);
    case DType::kFloat64:
      return byWire<Fn, double>(spec, args...);
    default:
      throw InvalidArgument("quantization needs a floating-point dtype, not " + std::string(dtypeName(dtype)));
  }
}

template <typename T, typename Q, QuantKind K>
struct QuantizeFn {
  static void run(const void* src, size_t count, uint8_t* dst) { Kernels<T, Q, K>::quantize(src, count, dst); }
};
template <typename T, typename Q, QuantKind K>
struct DequantizeFn {
  static void run(const uint8_t* src, size_t count, void* dst) { Kernels<T, Q, K>::dequantize(src, count, dst); }
};
template <typename T, typename Q, QuantKind K>
struct ReduceFn {
  static void run(const void* own, size_t ownRank, const uint8_t* const* contributions, size_t ranks, size_t count,
                  size_t divisor, uint8_t* encoded, void* out) {
    Kernels<T, Q, K>::reduce(own, ownRank, contributions, ranks, count, divisor, encoded, out);
  }
};

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
  return blockCount(count) * paramBytes + count * elementSize(spec.wire);
}

void quantize(const QuantSpec& spec, DType dtype, const void* src, size_t count, uint8_t* dst) {
  dispatch<QuantizeFn>(spec, dtype, src, count, dst);
}

void dequantize(const QuantSpec& spec, DType dtype, const uint8_t* src, size_t count, void* dst) {
  dispatch<DequantizeFn>(spec, dtype, src, count, dst);
}

void reduceQuantized(const QuantSpec& spec, DType dtype, const void* own, size_t ownRank,
                     const uint8_t* const* contributions, size_t ranks, size_t count, size_t divisor,
                     uint8_t* encoded, void* out) {
  PCCL_ENFORCE(ranks >= 1 && ownRank < ranks && divisor >= 1, "bad quantized reduction");
  dispatch<ReduceFn>(spec, dtype, own, ownRank, contributions, ranks, count, divisor, encoded, out);
}

}  // namespace pccl
