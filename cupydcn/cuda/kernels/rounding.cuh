// Explicitly rounded arithmetic, for the expressions that decide something discontinuous:
// which cell and corners a sample reads, whether it is skipped or clamped, how many
// samples a bin has.
//
// The GPU build and the CPU emulation must take the same branch there, and by default they
// would not: NVRTC contracts a * b + c into one fused multiply-add (one rounding instead
// of two) and CuPy builds every RawModule with -ftz=true (float subnormals flushed to
// zero), where the host compiler does neither (-ffp-contract=off). The __f*_rn / __d*_rn
// intrinsics are never contracted, and the emulator's versions of them
// (tests/emulator/cuda_shim.h) flush float subnormals as -ftz=true does, so both sides
// compute the same bits. The NumPy backends evaluate the same expressions with separately
// rounded operations in the same order, so they agree too, except where a float32
// subnormal is involved (NumPy does not flush).
#pragma once

namespace cupydcn {

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

}  // namespace cupydcn
