// Atomic accumulation into gradient buffers. Device code only.
#pragma once

namespace cupydcn {

// Atomics exist for the accumulation types only (float: all targets, double: sm_60+).
__device__ __forceinline__ void atomic_accumulate(float* address, float value) {
  atomicAdd(address, value);
}
__device__ __forceinline__ void atomic_accumulate(double* address, double value) {
  atomicAdd(address, value);
}

}  // namespace cupydcn
