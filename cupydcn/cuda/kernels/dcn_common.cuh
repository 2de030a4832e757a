// Shared device helpers of every cupydcn kernel: dtype traits, the grid-stride loop,
// atomics, padding modes, and bilinear sampling with its gradients.
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

// ---------------------------------------------------------------- padding modes
// Where a sample coordinate p is read along a dimension of `size` pixels (SEMANTICS.md
// section 1). The codes are cupydcn/deform_conv/padding.py's PADDING_MODE_CODES; the NumPy backend's
// map_coordinates is the same function.
//   zeros:      p' = p (points outside the map read 0 in the blend)
//   border:     p' = clamp(p, 0, size - 1)
//   reflection: t = |p| mod 2(size - 1), p' = t if t <= size - 1 else 2(size - 1) - t
//               (grid_sample with align_corners=True)
// and p' = 0 when size == 1 (border, reflection). slope = dp'/dp of the branch taken:
// border 1 on the closed [0, size - 1], 0 outside; reflection sign(p) (+1 at p = 0) times
// +1 on the branch t <= size - 1, -1 on the other; 0 for size == 1. A NaN coordinate stays
// NaN, and so does an infinite one under reflection (it has no limit); border clamps
// infinities. fmod is exact, so p' is exact in every precision.
enum PaddingMode : int { PADDING_ZEROS = 0, PADDING_BORDER = 1, PADDING_REFLECTION = 2 };

template <typename A>
struct MappedCoordinate {
  A value;  // p'
  A slope;  // dp'/dp: 1, 0 or -1
};

__device__ __forceinline__ float exact_fmod(float a, float b) { return fmodf(a, b); }
__device__ __forceinline__ double exact_fmod(double a, double b) { return fmod(a, b); }

template <typename A, typename I>
__device__ __forceinline__ MappedCoordinate<A> map_coordinate(A p, I size, int mode) {
  MappedCoordinate<A> m;
  m.value = p;
  m.slope = A(1);
  if (mode == PADDING_ZEROS || p != p) return m;
  if (size <= 1) {
    m.value = A(0);
    m.slope = A(0);
    return m;
  }
  const A last = static_cast<A>(size - 1);
  if (mode == PADDING_BORDER) {
    if (p < A(0) || p > last) {
      m.value = p < A(0) ? A(0) : last;
      m.slope = A(0);
    }
    return m;
  }
  // PADDING_REFLECTION
  const A span = A(2) * last;
  const bool negative = p < A(0);
  const A t = exact_fmod(negative ? -p : p, span);  // NaN for an infinite p
  const bool folded = t > last;
  m.value = folded ? span - t : t;  // span - t is exact (Sterbenz)
  m.slope = negative != folded ? A(-1) : A(1);
  return m;
}

// ---------------------------------------------------------------- bilinear sampling
// x(p) = sum_q g(q_y, p'_y) g(q_x, p'_x) x(q), g(a, b) = max(0, 1 - |a - b|), over the
// integer points q of the map, at the mapped point p' (map_coordinate); points outside
// the map read as zero. Only the four corners of the cell floor(p') + {0, 1}^2 can have a
// nonzero weight. Derivatives with respect to p' follow torchvision: the same four
// corners, invalid ones read as zero, so at p_y == -1 exactly the derivative is the
// one-sided one from inside the map. Border and reflection keep p' inside [0, size - 1];
// there the cell of p' == size - 1 is [size - 2, size - 1] (weight 1 on the last row), so
// the derivative at the last row is also the one from inside the map (the value is the
// same). Derivatives with respect to p are those with respect to p' times the slope.
template <typename A, typename I>
struct BilinearPoint {
  A y, x;             // the mapped point p'
  A slope_y, slope_x; // dp'_y/dp_y, dp'_x/dp_x
  I y0, x0;           // top-left corner of the cell, floor(p') (see above at size - 1)
  A ly, lx;           // p' - (y0, x0), in [0, 1]
  bool y0_in, y1_in;  // rows y0 and y0 + 1 inside [0, height)
  bool x0_in, x1_in;  // columns x0 and x0 + 1 inside [0, width)
  bool any_in;        // some corner lies inside the map
  bool is_nan;        // a coordinate of p' is NaN: value and coordinate gradient are NaN
};

template <typename A, typename I>
__device__ __forceinline__ BilinearPoint<A, I> bilinear_point(A y_in, A x_in, I height, I width,
                                                              int mode = PADDING_ZEROS) {
  BilinearPoint<A, I> p;
  const MappedCoordinate<A> my = map_coordinate<A, I>(y_in, height, mode);
  const MappedCoordinate<A> mx = map_coordinate<A, I>(x_in, width, mode);
  const A y = my.value, x = mx.value;
  p.y = y;
  p.x = x;
  p.slope_y = my.slope;
  p.slope_x = mx.slope;
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
  if (mode != PADDING_ZEROS) {  // p' in [0, size - 1]: keep the cell inside the map
    if (p.y0 == height - 1 && height > 1) {
      p.y0 -= 1;
      p.ly = A(1);
    }
    if (p.x0 == width - 1 && width > 1) {
      p.x0 -= 1;
      p.lx = A(1);
    }
  }
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

// Value of the plane at (y, x), read with padding mode `mode`.
template <typename A, typename T, typename I>
__device__ __forceinline__ A bilinear_sample(const T* plane, I height, I width, A y, A x,
                                             int mode = PADDING_ZEROS) {
  const BilinearPoint<A, I> p = bilinear_point<A, I>(y, x, height, width, mode);
  if (p.is_nan) return p.y + p.x;
  if (!p.any_in) return A(0);
  return blend(corner_values<A, T, I>(plane, p, width), p);
}

// Value and derivatives d value / d y, d value / d x of the plane at (y, x).
template <typename A>
struct SampleWithGradient {
  A value, d_dy, d_dx;
};

// Value and derivatives with respect to the MAPPED point p' at a point located by
// bilinear_point: times p.slope_y / p.slope_x they are those with respect to p. For
// several planes sampled at one point (the mapping and the cell computed once, the
// slopes applied once to the sums).
template <typename A, typename T, typename I>
__device__ __forceinline__ SampleWithGradient<A> bilinear_sample_with_gradient_at(
    const T* plane, const BilinearPoint<A, I>& p, I width) {
  SampleWithGradient<A> s;
  if (p.is_nan) {
    s.value = s.d_dy = s.d_dx = p.y + p.x;
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

// Value and derivatives with respect to the sample point p = (y, x) itself (the padding
// mode's slopes included).
template <typename A, typename T, typename I>
__device__ __forceinline__ SampleWithGradient<A> bilinear_sample_with_gradient(
    const T* plane, I height, I width, A y, A x, int mode = PADDING_ZEROS) {
  const BilinearPoint<A, I> p = bilinear_point<A, I>(y, x, height, width, mode);
  SampleWithGradient<A> s = bilinear_sample_with_gradient_at<A, T, I>(plane, p, width);
  s.d_dy *= p.slope_y;
  s.d_dx *= p.slope_x;
  return s;
}

// grad_plane[q] += G(q, p') * grad for the in-map corners q of p' (atomically).
template <typename A, typename I>
__device__ __forceinline__ void bilinear_scatter(A* grad_plane, I height, I width, A y, A x,
                                                 A grad, int mode = PADDING_ZEROS) {
  const BilinearPoint<A, I> p = bilinear_point<A, I>(y, x, height, width, mode);
  if (p.is_nan || !p.any_in) return;
  const A hy = A(1) - p.ly, hx = A(1) - p.lx;
  const I row0 = p.y0 * width, row1 = row0 + width;
  if (p.y0_in && p.x0_in) atomic_accumulate(grad_plane + (row0 + p.x0), hy * hx * grad);
  if (p.y0_in && p.x1_in) atomic_accumulate(grad_plane + (row0 + p.x0 + 1), hy * p.lx * grad);
  if (p.y1_in && p.x0_in) atomic_accumulate(grad_plane + (row1 + p.x0), p.ly * hx * grad);
  if (p.y1_in && p.x1_in) atomic_accumulate(grad_plane + (row1 + p.x0 + 1), p.ly * p.lx * grad);
}

}  // namespace cupydcn
