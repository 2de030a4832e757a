// Warp-level tensor-core primitives (namespace cupydcn::tc): mma.sync fragments and
// instructions, ldmatrix and cp.async, as inline PTX, for the implicit-GEMM kernels.
//
// Device code only. Everything here is written from the PTX ISA's description of each
// instruction (the "Matrix Fragments for mma.m16n8k16 / mma.m16n8k8" tables, ldmatrix,
// cp.async); the fragment layouts below are those tables, with
//   groupID = laneid >> 2, threadID_in_group (t) = laneid % 4.
//
// Architectures. mma.sync m16n8k16 (f16, bf16) and m16n8k8 (tf32), cvt.rna.tf32.f32 and
// cp.async need sm_80; ldmatrix needs sm_75. The header compiles for every target the
// package builds (sm_70 and later), but below those architectures the instructions are
// replaced by __trap(): the CUDA backend never launches a kernel that uses them on a device
// below sm_80 (float_to_tf32 and pack_half2 are plain arithmetic there and work everywhere).
//
// Warp-level instructions (mma_*, ldmatrix_*) are .sync.aligned: all 32 lanes of the warp
// must execute the same call, converged, with the full warp present (no partial warps).
//
// Host emulation (CUPYDCN_HOST_EMULATION): the CPU test harness compiles this header after
// tests/emulator/tensor_core_shim.h, which implements each primitive on the host; the
// functions here then forward to it with the caller's source position, for its misuse
// messages. There a warp-level primitive is a rendezvous of the warp's 32 fibers, and
// cp.async copies are deferred to the cp_async_wait that completes their group (a shared
// memory read before that wait sees the old bytes). The shim's header comment describes it.
#pragma once

#ifndef CUPYDCN_HOST_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#elif !defined(CUPYDCN_TENSOR_CORE_SHIM)
#error "the host emulation of tensor_core.cuh is tests/emulator/tensor_core_shim.h; include it"
#endif

namespace cupydcn {
namespace tc {

// m16n8k16 A (16 x 16, row-major), f16 or bf16 pairs, low half = lower column:
//   x[0] = A[g][2t, 2t+1]      x[1] = A[g+8][2t, 2t+1]
//   x[2] = A[g][2t+8, 2t+9]    x[3] = A[g+8][2t+8, 2t+9]
struct FragA16 {
  unsigned x[4];
};
// m16n8k16 B (16 x 8, "col": consecutive k in one register), low half = lower row:
//   x[0] = B[2t, 2t+1][g]      x[1] = B[2t+8, 2t+9][g]
struct FragB16 {
  unsigned x[2];
};
// 16 x 8 float32 accumulator (C and D of both shapes):
//   x[0] = C[g][2t]  x[1] = C[g][2t+1]  x[2] = C[g+8][2t]  x[3] = C[g+8][2t+1]
struct FragC {
  float x[4];
};
// m16n8k8 tf32 A (16 x 8, row-major), one tf32 (float32 bits, low 13 ignored) per register:
//   x[0] = A[g][t]  x[1] = A[g+8][t]  x[2] = A[g][t+4]  x[3] = A[g+8][t+4]
struct FragATf32 {
  unsigned x[4];
};
// m16n8k8 tf32 B (8 x 8, "col"):  x[0] = B[t][g]  x[1] = B[t+4][g]
struct FragBTf32 {
  unsigned x[2];
};

// Two 16-bit values in one register, lo in bits 0-15 (T = __half or __nv_bfloat16).
template <typename T>
__device__ __forceinline__ unsigned pack_half2(T lo, T hi);

// The 16-bit float types of mma_m16n8k16 (any other type is an incomplete-type error).
template <typename T>
struct HalfKind;
template <>
struct HalfKind<__half> {
  static constexpr bool bf16 = false;
};
template <>
struct HalfKind<__nv_bfloat16> {
  static constexpr bool bf16 = true;
};

#ifdef CUPYDCN_HOST_EMULATION
// ---------------------------------------------------------------- host emulation
// The trailing source position is the emulator's (as its __syncthreads takes one): callers
// never pass it.
#define CUPYDCN_TC_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

template <>
__device__ __forceinline__ unsigned pack_half2<__half>(__half lo, __half hi) {
  return static_cast<unsigned>(lo.__x) | (static_cast<unsigned>(hi.__x) << 16);
}
template <>
__device__ __forceinline__ unsigned pack_half2<__nv_bfloat16>(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return static_cast<unsigned>(lo.__x) | (static_cast<unsigned>(hi.__x) << 16);
}

__device__ __forceinline__ unsigned float_to_tf32(float x) {
  return cupydcn_emulation::tc::float_to_tf32(x);
}

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(FragC& d, const FragA16& a, const FragB16& b,
                                             const FragC& c, CUPYDCN_TC_SITE) {
  cupydcn_emulation::tc::mma(
      HalfKind<T>::bf16 ? cupydcn_emulation::tc::kMmaBf16 : cupydcn_emulation::tc::kMmaF16, d.x,
      a.x, b.x, c.x, file, line);
}
__device__ __forceinline__ void mma_m16n8k8_tf32(FragC& d, const FragATf32& a, const FragBTf32& b,
                                                 const FragC& c, CUPYDCN_TC_SITE) {
  cupydcn_emulation::tc::mma(cupydcn_emulation::tc::kMmaTf32, d.x, a.x, b.x, c.x, file, line);
}

__device__ __forceinline__ void ldmatrix_x1(unsigned& r0, const void* shared_row, CUPYDCN_TC_SITE) {
  unsigned r[1];
  cupydcn_emulation::tc::ldmatrix(1, false, shared_row, r, file, line);
  r0 = r[0];
}
__device__ __forceinline__ void ldmatrix_x2(unsigned& r0, unsigned& r1, const void* shared_row,
                                            CUPYDCN_TC_SITE) {
  unsigned r[2];
  cupydcn_emulation::tc::ldmatrix(2, false, shared_row, r, file, line);
  r0 = r[0];
  r1 = r[1];
}
__device__ __forceinline__ void ldmatrix_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                            const void* shared_row, CUPYDCN_TC_SITE) {
  unsigned r[4];
  cupydcn_emulation::tc::ldmatrix(4, false, shared_row, r, file, line);
  r0 = r[0];
  r1 = r[1];
  r2 = r[2];
  r3 = r[3];
}
__device__ __forceinline__ void ldmatrix_x1_trans(unsigned& r0, const void* shared_row,
                                                  CUPYDCN_TC_SITE) {
  unsigned r[1];
  cupydcn_emulation::tc::ldmatrix(1, true, shared_row, r, file, line);
  r0 = r[0];
}
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned& r0, unsigned& r1,
                                                  const void* shared_row, CUPYDCN_TC_SITE) {
  unsigned r[2];
  cupydcn_emulation::tc::ldmatrix(2, true, shared_row, r, file, line);
  r0 = r[0];
  r1 = r[1];
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned& r0, unsigned& r1, unsigned& r2,
                                                  unsigned& r3, const void* shared_row,
                                                  CUPYDCN_TC_SITE) {
  unsigned r[4];
  cupydcn_emulation::tc::ldmatrix(4, true, shared_row, r, file, line);
  r0 = r[0];
  r1 = r[1];
  r2 = r[2];
  r3 = r[3];
}

__device__ __forceinline__ void cp_async_16(void* shared, const void* global, CUPYDCN_TC_SITE) {
  cupydcn_emulation::tc::cp_async(16, shared, global, 16, false, file, line);
}
__device__ __forceinline__ void cp_async_16_zfill(void* shared, const void* global, int src_bytes,
                                                  CUPYDCN_TC_SITE) {
  cupydcn_emulation::tc::cp_async(16, shared, global, src_bytes, true, file, line);
}
__device__ __forceinline__ void cp_async_4(void* shared, const void* global, CUPYDCN_TC_SITE) {
  cupydcn_emulation::tc::cp_async(4, shared, global, 4, false, file, line);
}
__device__ __forceinline__ void cp_async_commit(CUPYDCN_TC_SITE) {
  cupydcn_emulation::tc::cp_async_commit(file, line);
}
template <int N>
__device__ __forceinline__ void cp_async_wait(CUPYDCN_TC_SITE) {
  static_assert(N >= 0, "cp.async.wait_group takes a count >= 0");
  cupydcn_emulation::tc::cp_async_wait(N, file, line);
}

#undef CUPYDCN_TC_SITE

#else
// ---------------------------------------------------------------- device: inline PTX

template <>
__device__ __forceinline__ unsigned pack_half2<__half>(__half lo, __half hi) {
  return static_cast<unsigned>(__half_as_ushort(lo)) |
         (static_cast<unsigned>(__half_as_ushort(hi)) << 16);
}
template <>
__device__ __forceinline__ unsigned pack_half2<__nv_bfloat16>(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return static_cast<unsigned>(__bfloat16_as_ushort(lo)) |
         (static_cast<unsigned>(__bfloat16_as_ushort(hi)) << 16);
}

// The 32-bit .shared address of a generic pointer into shared memory.
__device__ __forceinline__ unsigned shared_address(const void* pointer) {
  return static_cast<unsigned>(__cvta_generic_to_shared(pointer));
}

// float32 -> tf32 (in a 32-bit register, the low 13 bits zero): round to nearest, ties away
// from zero (cvt.rna.tf32.f32). Below sm_80 the same rounding in integer arithmetic.
__device__ __forceinline__ unsigned float_to_tf32(float x) {
  unsigned r;
#if __CUDA_ARCH__ >= 800
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
#else
  const unsigned u = __float_as_uint(x);
  if ((u & 0x7F800000u) != 0x7F800000u) {
    r = (u + 0x1000u) & 0xFFFFE000u;  // half a tf32 ulp on the magnitude: ties away from 0
  } else {
    r = (u & 0x007FFFFFu) ? ((u | 0x00400000u) & 0xFFFFE000u) : u;  // NaN stays NaN, Inf Inf
  }
#endif
  return r;
}

// D = A * B + C, m16n8k16, float32 accumulators (d may be c).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(FragC& d, const FragA16& a, const FragB16& b,
                                             const FragC& c) {
  static_assert(sizeof(HalfKind<T>) > 0, "mma_m16n8k16 takes __half or __nv_bfloat16");
#if __CUDA_ARCH__ >= 800
  if constexpr (!HalfKind<T>::bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d.x[0]), "=f"(d.x[1]), "=f"(d.x[2]), "=f"(d.x[3])
        : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]), "f"(c.x[0]),
          "f"(c.x[1]), "f"(c.x[2]), "f"(c.x[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d.x[0]), "=f"(d.x[1]), "=f"(d.x[2]), "=f"(d.x[3])
        : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]), "f"(c.x[0]),
          "f"(c.x[1]), "f"(c.x[2]), "f"(c.x[3]));
  }
#else
  __trap();
#endif
}

// D = A * B + C, m16n8k8 with tf32 operands (their low 13 bits are ignored), float32
// accumulators (d may be c).
__device__ __forceinline__ void mma_m16n8k8_tf32(FragC& d, const FragATf32& a, const FragBTf32& b,
                                                 const FragC& c) {
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d.x[0]), "=f"(d.x[1]), "=f"(d.x[2]), "=f"(d.x[3])
      : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]), "f"(c.x[0]),
        "f"(c.x[1]), "f"(c.x[2]), "f"(c.x[3]));
#else
  __trap();
#endif
}

// ldmatrix .m8n8 .b16: 1, 2 or 4 matrices of 8 x 8 16-bit elements from shared memory. Lane
// 8j + r gives the address of row r of matrix j (16 bytes, 16-byte aligned; x1 uses lanes
// 0-7, x2 lanes 0-15, x4 all: let the other lanes repeat valid addresses). Register j of lane l
// receives, of matrix j, the elements (row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1), low
// half first; with .trans, the elements (rows 2 (l % 4) and 2 (l % 4) + 1, column l / 4).
__device__ __forceinline__ void ldmatrix_x1(unsigned& r0, const void* shared_row) {
#if __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r0)
               : "r"(shared_address(shared_row))
               : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void ldmatrix_x2(unsigned& r0, unsigned& r1, const void* shared_row) {
#if __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(shared_address(shared_row))
               : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void ldmatrix_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                            const void* shared_row) {
#if __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(shared_address(shared_row))
               : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void ldmatrix_x1_trans(unsigned& r0, const void* shared_row) {
#if __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r0)
               : "r"(shared_address(shared_row))
               : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned& r0, unsigned& r1,
                                                  const void* shared_row) {
#if __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(shared_address(shared_row))
               : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned& r0, unsigned& r1, unsigned& r2,
                                                  unsigned& r3, const void* shared_row) {
#if __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(shared_address(shared_row))
               : "memory");
#else
  __trap();
#endif
}

// cp.async global -> shared, per thread. A copy is complete (and its bytes readable by the
// issuing thread) only after a cp_async_wait<N> that leaves at most N newer committed groups
// pending; other threads need a __syncthreads after that wait. Addresses aligned to the copy
// size (16 or 4 bytes), the shared one a generic pointer into __shared__ memory. The global
// operand is the generic pointer itself (generic addresses of global memory are global
// addresses); converting it with __cvta_generic_to_global would make NVRTC crash where the
// compiler can see that the pointer is a shared one.
__device__ __forceinline__ void cp_async_16(void* shared, const void* global) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
               :
               : "r"(shared_address(shared)), "l"(global)
               : "memory");
#else
  __trap();
#endif
}
// The src-size form: copies src_bytes (0 .. 16) bytes and zeroes the rest of the 16; with 0
// nothing is read (global must still be a 16-byte aligned address, e.g. the tensor's base).
__device__ __forceinline__ void cp_async_16_zfill(void* shared, const void* global, int src_bytes) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :
               : "r"(shared_address(shared)), "l"(global), "r"(src_bytes)
               : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void cp_async_4(void* shared, const void* global) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n"
               :
               : "r"(shared_address(shared)), "l"(global)
               : "memory");
#else
  __trap();
#endif
}
// Closes the thread's current group of cp.async copies (an empty group is a group).
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
  __trap();
#endif
}
// Waits until at most N of the thread's most recently committed groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group takes a count >= 0");
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}

#endif  // CUPYDCN_HOST_EMULATION

}  // namespace tc
}  // namespace cupydcn
