// Element types and their accumulation types: half types are loaded into float, computed
// and accumulated in float, and rounded once when a final value is stored.
//
// Device code only. The Python loader inlines the headers of cupydcn/cuda/kernels/ into each kernel
// source (so a change here changes the source string and recompiles despite CuPy's disk
// cache). The CPU test harness compiles the same text with a host C++ compiler after its
// shim header, which defines CUPYDCN_HOST_EMULATION.
#pragma once

#ifndef CUPYDCN_HOST_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace cupydcn {

template <typename T>
struct AccumulateType {
  using type = T;
};
template <>
struct AccumulateType<__half> {
  using type = float;
};
template <>
struct AccumulateType<__nv_bfloat16> {
  using type = float;
};
template <typename T>
using acc_t = typename AccumulateType<T>::type;

__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ float from_acc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace cupydcn
