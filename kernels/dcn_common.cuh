// Shared device helpers of every cupydcn kernel: dtype traits, the grid-stride loop,
// atomics, and bilinear sampling with its gradients.
//
// Device code only. The Python loader inlines this header into each kernel source (so a
// change here changes the source string and recompiles despite CuPy's disk cache). The
// CPU test harness compiles the same text with a host C++ compiler after its shim header,
// which defines CUPYDCN_HOST_EMULATION.
#pragma once

#ifndef CUPYDCN_HOST_EMULATION
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

namespace cupydcn {

// ---------------------------------------------------------------- dtype traits
// Half types are loaded into float, computed and accumulated in float, and rounded once
// when a final value is stored.
template <typename T> struct AccumulateType { using type = T; };
template <> struct AccumulateType<__half> { using type = float; };
template <> struct AccumulateType<__nv_bfloat16> { using type = float; };
template <typename T> using acc_t = typename AccumulateType<T>::type;

__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------- launch helpers
// Grid-stride loop over [0, total) in the index type I (int or long long): launches may
// use fewer blocks than elements, and 64-bit sizes loop without overflow.
#define CUPYDCN_GRID_STRIDE_LOOP(index, I, total)                                    \
  for (I index = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) +          \
                 static_cast<I>(threadIdx.x);                                        \
       index < (total); index += static_cast<I>(blockDim.x) * static_cast<I>(gridDim.x))

// Atomics exist for the accumulation types only (float: all targets, double: sm_60+).
__device__ __forceinline__ void atomic_accumulate(float* address, float value) {
  atomicAdd(address, value);
}
__device__ __forceinline__ void atomic_accumulate(double* address, double value) {
  atomicAdd(address, value);
}

// ---------------------------------------------------------------- bilinear sampling
// x(p) = sum_q g(q_y, p_y) g(q_x, p_x) x(q), g(a, b) = max(0, 1 - |a - b|), over the
// integer points q of the map; points outside the map read as zero. Only the four corners
// floor(p) + {0, 1}^2 can have a nonzero weight. Derivatives with respect to p follow
// torchvision: the same four corners, invalid ones read as zero, so at p_y == -1 exactly
// the derivative is the one-sided one from inside the map.
template <typename A, typename I>
struct BilinearPoint {
  I y0, x0;           // top-left corner, floor(p)
  A ly, lx;           // p - floor(p), in [0, 1)
  bool y0_in, y1_in;  // rows y0 and y0 + 1 inside [0, height)
  bool x0_in, x1_in;  // columns x0 and x0 + 1 inside [0, width)
  bool any_in;        // some corner lies inside the map
  bool is_nan;        // a coordinate is NaN: value and coordinate gradient are NaN
};

template <typename A, typename I>
__device__ __forceinline__ BilinearPoint<A, I> bilinear_point(A y, A x, I height, I width) {
  BilinearPoint<A, I> p;
  p.is_nan = (y != y) || (x != x);
  // Beyond (-2, size + 1) no corner can be inside; the guard also keeps the float->int
  // conversion below defined for huge or infinite coordinates.
  const bool near = y > A(-2) && y < A(height + 1) && x > A(-2) && x < A(width + 1);
  const A yf = near ? floor(y) : A(-4);
  const A xf = near ? floor(x) : A(-4);
  p.y0 = static_cast<I>(yf);
  p.x0 = static_cast<I>(xf);
  p.ly = near ? y - yf : A(0);
  p.lx = near ? x - xf : A(0);
  p.y0_in = p.y0 >= 0 && p.y0 < height;
  p.y1_in = p.y0 + 1 >= 0 && p.y0 + 1 < height;
  p.x0_in = p.x0 >= 0 && p.x0 < width;
  p.x1_in = p.x0 + 1 >= 0 && p.x0 + 1 < width;
  p.any_in = near && (p.y0_in || p.y1_in) && (p.x0_in || p.x1_in);
  return p;
}

// The four corner values of p in the plane [height, width]; out-of-map corners read 0.
template <typename A, typename T, typename I>
struct CornerValues {
  A v00, v01, v10, v11;
};

template <typename A, typename T, typename I>
__device__ __forceinline__ CornerValues<A, T, I> corner_values(
    const T* plane, const BilinearPoint<A, I>& p, I width) {
  CornerValues<A, T, I> c;
  // Element offsets are formed only for in-map corners (no out-of-range pointers).
  const I row0 = p.y0 * width, row1 = row0 + width;
  c.v00 = (p.y0_in && p.x0_in) ? to_acc(plane[row0 + p.x0]) : A(0);
  c.v01 = (p.y0_in && p.x1_in) ? to_acc(plane[row0 + p.x0 + 1]) : A(0);
  c.v10 = (p.y1_in && p.x0_in) ? to_acc(plane[row1 + p.x0]) : A(0);
  c.v11 = (p.y1_in && p.x1_in) ? to_acc(plane[row1 + p.x0 + 1]) : A(0);
  return c;
}

template <typename A, typename T, typename I>
__device__ __forceinline__ A blend(const CornerValues<A, T, I>& c, const BilinearPoint<A, I>& p) {
  const A hy = A(1) - p.ly, hx = A(1) - p.lx;
  return hy * (hx * c.v00 + p.lx * c.v01) + p.ly * (hx * c.v10 + p.lx * c.v11);
}

// Value of the plane at (y, x).
template <typename A, typename T, typename I>
__device__ __forceinline__ A bilinear_sample(const T* plane, I height, I width, A y, A x) {
  const BilinearPoint<A, I> p = bilinear_point<A, I>(y, x, height, width);
  if (p.is_nan) return y + x;
  if (!p.any_in) return A(0);
  return blend(corner_values<A, T, I>(plane, p, width), p);
}

// Value and derivatives d value / d y, d value / d x of the plane at (y, x).
template <typename A>
struct SampleWithGradient {
  A value, d_dy, d_dx;
};

template <typename A, typename T, typename I>
__device__ __forceinline__ SampleWithGradient<A> bilinear_sample_with_gradient(
    const T* plane, I height, I width, A y, A x) {
  SampleWithGradient<A> s;
  const BilinearPoint<A, I> p = bilinear_point<A, I>(y, x, height, width);
  if (p.is_nan) {
    s.value = s.d_dy = s.d_dx = y + x;
    return s;
  }
  if (!p.any_in) {
    s.value = s.d_dy = s.d_dx = A(0);
    return s;
  }
  const CornerValues<A, T, I> c = corner_values<A, T, I>(plane, p, width);
  const A hy = A(1) - p.ly, hx = A(1) - p.lx;
  s.value = blend(c, p);
  s.d_dy = hx * (c.v10 - c.v00) + p.lx * (c.v11 - c.v01);
  s.d_dx = hy * (c.v01 - c.v00) + p.ly * (c.v11 - c.v10);
  return s;
}

// grad_plane[q] += G(q, p) * grad for the in-map corners q of p (atomically).
template <typename A, typename I>
__device__ __forceinline__ void bilinear_scatter(A* grad_plane, I height, I width, A y, A x,
                                                 A grad) {
  const BilinearPoint<A, I> p = bilinear_point<A, I>(y, x, height, width);
  if (p.is_nan || !p.any_in) return;
  const A hy = A(1) - p.ly, hx = A(1) - p.lx;
  const I row0 = p.y0 * width, row1 = row0 + width;
  if (p.y0_in && p.x0_in) atomic_accumulate(grad_plane + (row0 + p.x0), hy * hx * grad);
  if (p.y0_in && p.x1_in) atomic_accumulate(grad_plane + (row0 + p.x0 + 1), hy * p.lx * grad);
  if (p.y1_in && p.x0_in) atomic_accumulate(grad_plane + (row1 + p.x0), p.ly * hx * grad);
  if (p.y1_in && p.x1_in) atomic_accumulate(grad_plane + (row1 + p.x0 + 1), p.ly * p.lx * grad);
}

}  // namespace cupydcn
