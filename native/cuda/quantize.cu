// CUDA quantize/dequantize: one thread block per quantization block (kQuantBlockElems
// elements). Min and max are exact, so their reduction order does not matter; the
// parameters are computed with IEEE division and the values with the same clamp and
// round-half-up as native/src/kernels/quantize.cpp, and decoding uses explicitly rounded
// multiply and add (never an FMA), so the bytes and the decoded values match the CPU's.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "pccl/cuda_quantize.hpp"
#include "pccl/errors.hpp"

namespace pccl {
namespace cuda {
namespace {

constexpr int kThreads = 256;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw Error(std::string("CUDA ") + what + ": " + cudaGetErrorString(err));
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
__device__ inline A loadAs(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return static_cast<A>(v);
  }
}

template <typename T, typename A>
__device__ inline T storeAs(A v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<T>(v);
  }
}

__device__ inline float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ inline float add(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double add(double a, double b) { return __dadd_rn(a, b); }
__device__ inline float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ inline double sub(double a, double b) { return __dsub_rn(a, b); }

template <typename A, typename Q>
__device__ inline Q roundClamp(A v, A qmax) {
  v = v > A(0) ? v : A(0);
  v = v < qmax ? v : qmax;
  return static_cast<Q>(static_cast<int>(add(v, A(0.5))));
}

template <typename A>
struct Params {
  A p0;
  A p1;
};

template <typename T, typename Q, QuantKind K>
__global__ void encodeKernel(const T* __restrict__ x, size_t count, Params<typename AccOf<T>::type>* params,
                             Q* __restrict__ q) {
  using A = typename AccOf<T>::type;
  __shared__ A sLo[kThreads];
  __shared__ A sHi[kThreads];
  const size_t off = static_cast<size_t>(blockIdx.x) * kQuantBlockElems;
  const size_t n = min(kQuantBlockElems, count - off);
  A lo = loadAs<A>(x[off]);
  A hi = lo;
  for (size_t i = threadIdx.x; i < n; i += kThreads) {
    const A v = loadAs<A>(x[off + i]);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  sLo[threadIdx.x] = lo;
  sHi[threadIdx.x] = hi;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      sLo[threadIdx.x] = sLo[threadIdx.x + s] < sLo[threadIdx.x] ? sLo[threadIdx.x + s] : sLo[threadIdx.x];
      sHi[threadIdx.x] = sHi[threadIdx.x + s] > sHi[threadIdx.x] ? sHi[threadIdx.x + s] : sHi[threadIdx.x];
    }
    __syncthreads();
  }
  lo = sLo[0];
  hi = sHi[0];
  const A qmax = static_cast<A>(Q(~Q(0)));
  if constexpr (K == QuantKind::kZeroPoint) {
    lo = lo < A(0) ? lo : A(0);
    hi = hi > A(0) ? hi : A(0);
  }
  const A range = sub(hi, lo);
  A inv = range > A(0) ? qmax / range : A(0);
  if (!(inv <= (sizeof(A) == 4 ? A(3.402823466e38) : A(1.7976931348623157e308)))) inv = A(0);
  A zp = A(0);
  if constexpr (K == QuantKind::kZeroPoint) zp = static_cast<A>(roundClamp<A, Q>(mul(sub(A(0), lo), inv), qmax));
  if (threadIdx.x == 0) {
    params[blockIdx.x].p1 = range / qmax;
    params[blockIdx.x].p0 = K == QuantKind::kMinMax ? lo : zp;
  }
  for (size_t i = threadIdx.x; i < n; i += kThreads) {
    const A v = loadAs<A>(x[off + i]);
    q[off + i] = K == QuantKind::kMinMax ? roundClamp<A, Q>(mul(sub(v, lo), inv), qmax)
                                         : roundClamp<A, Q>(add(mul(v, inv), zp), qmax);
  }
}

template <typename T, typename Q, QuantKind K>
__global__ void decodeKernel(const Params<typename AccOf<T>::type>* params, const Q* __restrict__ q, size_t count,
                             T* __restrict__ y) {
  using A = typename AccOf<T>::type;
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const Params<A> p = params[i / kQuantBlockElems];
  const A v = static_cast<A>(q[i]);
  y[i] = storeAs<T>(K == QuantKind::kMinMax ? add(p.p0, mul(v, p.p1)) : mul(sub(v, p.p0), p.p1));
}

size_t blocksOf(size_t count) { return (count + kQuantBlockElems - 1) / kQuantBlockElems; }

template <typename T, typename Q, QuantKind K>
void run(bool encode, const void* src, size_t count, void* dst) {
  using A = typename AccOf<T>::type;
  const size_t nb = blocksOf(count);
  if (encode) {
    auto* base = static_cast<uint8_t*>(dst);
    encodeKernel<T, Q, K><<<static_cast<unsigned>(nb), kThreads>>>(
        static_cast<const T*>(src), count, reinterpret_cast<Params<A>*>(base),
        reinterpret_cast<Q*>(base + nb * sizeof(Params<A>)));
  } else {
    const auto* base = static_cast<const uint8_t*>(src);
    decodeKernel<T, Q, K><<<static_cast<unsigned>((count + kThreads - 1) / kThreads), kThreads>>>(
        reinterpret_cast<const Params<A>*>(base), reinterpret_cast<const Q*>(base + nb * sizeof(Params<A>)), count,
        static_cast<T*>(dst));
  }
  check(cudaGetLastError(), "kernel launch");
  check(cudaDeviceSynchronize(), "kernel");
}

template <typename T, typename Q>
void byKind(QuantKind kind, bool encode, const void* src, size_t count, void* dst) {
  if (kind == QuantKind::kMinMax) return run<T, Q, QuantKind::kMinMax>(encode, src, count, dst);
  return run<T, Q, QuantKind::kZeroPoint>(encode, src, count, dst);
}

template <typename T>
void byWire(const QuantSpec& spec, bool encode, const void* src, size_t count, void* dst) {
  if (spec.wire == DType::kUInt8) return byKind<T, uint8_t>(spec.kind, encode, src, count, dst);
  return byKind<T, uint16_t>(spec.kind, encode, src, count, dst);
}

void dispatch(const QuantSpec& spec, DType dtype, bool encode, const void* src, size_t count, void* dst) {
  checkQuantizable(spec, dtype);
  if (count == 0) return;
  switch (dtype) {
    case DType::kFloat16:
      return byWire<__half>(spec, encode, src, count, dst);
    case DType::kBFloat16:
      return byWire<__nv_bfloat16>(spec, encode, src, count, dst);
    case DType::kFloat32:
      return byWire<float>(spec, encode, src, count, dst);
    default:
      return byWire<double>(spec, encode, src, count, dst);
  }
}

}  // namespace

bool available() {
  int devices = 0;
  return cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
}

void quantize(const QuantSpec& spec, DType dtype, const void* src, size_t count, uint8_t* dst) {
  dispatch(spec, dtype, true, src, count, dst);
}

void dequantize(const QuantSpec& spec, DType dtype, const uint8_t* src, size_t count, void* dst) {
  dispatch(spec, dtype, false, src, count, dst);
}

}  // namespace cuda
}  // namespace pccl
