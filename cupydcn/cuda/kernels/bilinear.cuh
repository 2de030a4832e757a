// Bilinear sampling of a plane at a (padding-mode mapped) point, with its gradients and
// its scatter into an input gradient: the sampling of the deformable convolution, also
// used by the position-sensitive RoI pooling. Device code only.
#pragma once

#include "accumulate.cuh"
#include "scatter_sinks.cuh"
#include "padding_modes.cuh"
#include "sample_gradient.cuh"

namespace cupydcn {

// x(p) = sum_q g(q_y, p'_y) g(q_x, p'_x) x(q), g(a, b) = max(0, 1 - |a - b|), over the
// integer points q of the map, at the mapped point p' (map_coordinate); points outside
// the map read as zero. Only the four corners of the cell floor(p') + {0, 1}^2 can have a
// nonzero weight. Derivatives with respect to p' follow torchvision: the same four
// corners, invalid ones read as zero, so at p_y == -1 exactly the derivative is the
// one-sided one from inside the map. Border and reflection keep p' inside [0, size - 1];
// there the cell of p' == size - 1 is [size - 2, size - 1] (weight 1 on the last row), so
// the derivative at the last row is also the one from inside the map (the value is the
// same). Derivatives with respect to p are those with respect to p' times the slope.
// The cell, the corners and the padding branch are decided here from p as given: callers
// compute p with explicitly rounded operations (rounding.cuh), so that the GPU build and
// the CPU emulation decide alike.
template <typename A, typename I>
struct BilinearPoint {
  A y, x;              // the mapped point p'
  A slope_y, slope_x;  // dp'_y/dp_y, dp'_x/dp_x
  I y0, x0;            // top-left corner of the cell, floor(p') (see above at size - 1)
  A ly, lx;            // p' - (y0, x0), in [0, 1]
  bool y0_in, y1_in;   // rows y0 and y0 + 1 inside [0, height)
  bool x0_in, x1_in;   // columns x0 and x0 + 1 inside [0, width)
  bool any_in;         // some corner lies inside the map
  bool is_nan;         // a coordinate of p' is NaN: value and coordinate gradient are NaN
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
template <typename A>
struct CornerValues {
  A v00, v01, v10, v11;
};

template <typename A, typename T, typename I>
__device__ __forceinline__ CornerValues<A> corner_values(const T* plane,
                                                         const BilinearPoint<A, I>& p, I width) {
  CornerValues<A> c;
  // Element offsets are formed only for in-map corners (no out-of-range pointers).
  const I row0 = p.y0 * width, row1 = row0 + width;
  c.v00 = (p.y0_in && p.x0_in) ? to_acc(plane[row0 + p.x0]) : A(0);
  c.v01 = (p.y0_in && p.x1_in) ? to_acc(plane[row0 + p.x0 + 1]) : A(0);
  c.v10 = (p.y1_in && p.x0_in) ? to_acc(plane[row1 + p.x0]) : A(0);
  c.v11 = (p.y1_in && p.x1_in) ? to_acc(plane[row1 + p.x0 + 1]) : A(0);
  return c;
}

template <typename A, typename I>
__device__ __forceinline__ A blend(const CornerValues<A>& c, const BilinearPoint<A, I>& p) {
  const A hy = A(1) - p.ly, hx = A(1) - p.lx;
  return hy * (hx * c.v00 + p.lx * c.v01) + p.ly * (hx * c.v10 + p.lx * c.v11);
}

// Value of the plane at a point located by bilinear_point (for several planes sampled at
// one point: the mapping and the cell computed once).
template <typename A, typename T, typename I>
__device__ __forceinline__ A bilinear_sample_at(const T* plane, const BilinearPoint<A, I>& p,
                                                I width) {
  if (p.is_nan) return p.y + p.x;
  if (!p.any_in) return A(0);
  return blend(corner_values<A, T, I>(plane, p, width), p);
}

// Value of the plane at (y, x), read with padding mode `mode`.
template <typename A, typename T, typename I>
__device__ __forceinline__ A bilinear_sample(const T* plane, I height, I width, A y, A x,
                                             int mode = PADDING_ZEROS) {
  return bilinear_sample_at<A, T, I>(plane, bilinear_point<A, I>(y, x, height, width, mode), width);
}

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
  const CornerValues<A> c = corner_values<A, T, I>(plane, p, width);
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

// sink.add(q, G(q, p') * grad) for the in-map corners q of p' (element indices within
// the plane), in a fixed order (scatter_sinks.cuh).
template <typename A, typename I, typename Sink>
__device__ __forceinline__ void bilinear_scatter_to(Sink& sink, I height, I width, A y, A x, A grad,
                                                    int mode = PADDING_ZEROS) {
  const BilinearPoint<A, I> p = bilinear_point<A, I>(y, x, height, width, mode);
  if (p.is_nan || !p.any_in) return;
  const A hy = A(1) - p.ly, hx = A(1) - p.lx;
  const I row0 = p.y0 * width, row1 = row0 + width;
  if (p.y0_in && p.x0_in) sink.add(row0 + p.x0, hy * hx * grad);
  if (p.y0_in && p.x1_in) sink.add(row0 + p.x0 + 1, hy * p.lx * grad);
  if (p.y1_in && p.x0_in) sink.add(row1 + p.x0, p.ly * hx * grad);
  if (p.y1_in && p.x1_in) sink.add(row1 + p.x0 + 1, p.ly * p.lx * grad);
}

// grad_plane[q] += G(q, p') * grad for the in-map corners q of p' (atomically).
template <typename A, typename I>
__device__ __forceinline__ void bilinear_scatter(A* grad_plane, I height, I width, A y, A x, A grad,
                                                 int mode = PADDING_ZEROS) {
  AtomicSink<A> sink{grad_plane};
  bilinear_scatter_to<A, I>(sink, height, width, y, x, grad, mode);
}

}  // namespace cupydcn
