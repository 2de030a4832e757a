// Shared device helpers of the RoI pooling kernels: RoIAlign-style bilinear sampling
// (torchvision roi_align / mmcv RoIAlign, docs/semantics.md §2) with its gradients with
// respect to the sample point and its scatter into an input gradient.
//
// Device code only, inlined by the Python loader like every header of cupydcn/cuda/kernels/.
//
// RoIAlign sampling differs from the deformable convolution's (bilinear.cuh): a point
// outside [-1, H] x [-1, W] reads 0; inside, each coordinate is clamped to >= 0, and a
// coordinate whose floor is >= size - 1 reads the last row (column) only. Out-of-map
// corners are never read.
//
// Derivative conventions (where the sample is not differentiable, a choice is needed):
// * d/dy is 0 where y is clamped: y in [-1, 0) and y in [H - 1, H]. The x derivative
//   there is that of the clamped row (the forward interpolates along it).
// * At an integer y in [0, H - 1) the derivative is the one-sided one from the right,
//   i.e. of the cell [floor(y), floor(y) + 1] the forward blends in; in particular at
//   y == 0 it is the slope of the first cell, and at y == H - 1 it is 0.
// * The jumps at y == -1 and y == H (0 outside, the edge value inside) are not
//   differentiated: the derivative is 0 outside, as inside the clamped zone.
// * A NaN coordinate samples NaN and has NaN derivatives; it adds nothing to the input
//   gradient.
// Likewise for x. This is the exact derivative of the forward wherever it is
// differentiable. (mmcv's DeformRoIPool backward instead evaluates the corner weights at
// the unclamped coordinate, so its offset gradient is nonzero in the clamped zone
// y in [-1, 0) and its x derivative vanishes where y is clamped to the last row.)
#pragma once

#include "accumulate.cuh"
#include "scatter_sinks.cuh"
#include "sample_gradient.cuh"

namespace cupydcn {

// One coordinate of a RoIAlign sample: the low cell index, whether the high corner is a
// different row (column), the weight of the high corner and d(weight) / d(coordinate).
template <typename A, typename I>
struct RoiAlignAxis {
  I low;    // floor of the clamped coordinate, at most size - 1
  I step;   // 1, or 0 when clamped to the last row / column (high corner = low corner)
  A frac;   // weight of the high corner, in [0, 1)
  A moves;  // 1 where the weights change with the coordinate, 0 where it is clamped
};

// ``coord`` must lie in [-1, size] (the caller has excluded points outside).
template <typename A, typename I>
__device__ __forceinline__ RoiAlignAxis<A, I> roi_align_axis(A coord, I size) {
  RoiAlignAxis<A, I> axis;
  const bool clamped_low = coord < A(0);
  const A clamped = clamped_low ? A(0) : coord;
  const I low = static_cast<I>(clamped);  // floor: clamped >= 0 and <= size
  if (low >= size - 1) {
    axis.low = size - 1;
    axis.step = 0;
    axis.frac = A(0);
    axis.moves = A(0);
  } else {
    axis.low = low;
    axis.step = 1;
    axis.frac = clamped - static_cast<A>(low);
    axis.moves = clamped_low ? A(0) : A(1);
  }
  return axis;
}

// Where a RoIAlign sample point reads, in one plane [height, width].
template <typename A, typename I>
struct RoiAlignPoint {
  RoiAlignAxis<A, I> y, x;
  bool inside;  // false: the sample reads 0 and has no gradient (or is NaN, see is_nan)
  bool is_nan;  // a coordinate is NaN: value and derivatives are NaN
  A nan;        // the NaN to return (y + x)
};

template <typename A, typename I>
__device__ __forceinline__ RoiAlignPoint<A, I> roi_align_point(A y, A x, I height, I width) {
  RoiAlignPoint<A, I> p;
  p.is_nan = (y != y) || (x != x);
  p.nan = y + x;
  p.inside = !p.is_nan && !(y < A(-1) || y > A(height) || x < A(-1) || x > A(width));
  if (p.inside) {
    p.y = roi_align_axis<A, I>(y, height);
    p.x = roi_align_axis<A, I>(x, width);
  } else {
    p.y = p.x = RoiAlignAxis<A, I>{I(0), I(0), A(0), A(0)};
  }
  return p;
}

// Flat indices, in a plane, of the four corners an inside point reads: (low, low),
// (low, high), (high, low), (high, high) in (y, x). At the last row / column the high
// corner is the low one.
template <typename I>
struct RoiAlignCorners {
  I i00, i01, i10, i11;
};

template <typename A, typename I>
__device__ __forceinline__ RoiAlignCorners<I> roi_align_corners(const RoiAlignPoint<A, I>& p,
                                                                I width) {
  RoiAlignCorners<I> q;
  q.i00 = p.y.low * width + p.x.low;
  q.i01 = q.i00 + p.x.step;
  q.i10 = q.i00 + p.y.step * width;
  q.i11 = q.i10 + p.x.step;
  return q;
}

// Value, d value / dy and d value / dx of an inside point from its four corner values.
// Linear in the corner values: blending per-corner sums over channels of g_c * v_c gives
// the sums over channels of g_c * (value_c, d value_c / dy, d value_c / dx).
template <typename A, typename I>
__device__ __forceinline__ SampleWithGradient<A> roi_align_blend(const RoiAlignPoint<A, I>& p,
                                                                 A v00, A v01, A v10, A v11) {
  const A ly = p.y.frac, lx = p.x.frac;
  const A hy = A(1) - ly, hx = A(1) - lx;
  SampleWithGradient<A> s;
  s.value = hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11);
  s.d_dy = p.y.moves * (hx * (v10 - v00) + lx * (v11 - v01));
  s.d_dx = p.x.moves * (hy * (v01 - v00) + ly * (v11 - v10));
  return s;
}

// Value of the plane [height, width] at (y, x), RoIAlign style.
template <typename A, typename T, typename I>
__device__ __forceinline__ A roi_align_sample(const T* plane, I height, I width, A y, A x) {
  const RoiAlignPoint<A, I> p = roi_align_point<A, I>(y, x, height, width);
  if (p.is_nan) return p.nan;
  if (!p.inside) return A(0);
  const RoiAlignCorners<I> q = roi_align_corners<A, I>(p, width);
  return roi_align_blend<A, I>(p, to_acc(plane[q.i00]), to_acc(plane[q.i01]), to_acc(plane[q.i10]),
                               to_acc(plane[q.i11]))
      .value;  // the derivatives are dead code here
}

// sink.add(q, weight(q) * grad) over the corners q the sample at (y, x) reads (element
// indices within the plane), in a fixed order; corners that coincide at the last row /
// column get one update (scatter_sinks.cuh).
template <typename A, typename I, typename Sink>
__device__ __forceinline__ void roi_align_scatter_to(Sink& sink, I height, I width, A y, A x,
                                                     A grad) {
  const RoiAlignPoint<A, I> p = roi_align_point<A, I>(y, x, height, width);
  if (!p.inside) return;  // also NaN points
  const RoiAlignCorners<I> q = roi_align_corners<A, I>(p, width);
  const A ly = p.y.frac, lx = p.x.frac;
  const A hy = A(1) - ly, hx = A(1) - lx;
  sink.add(q.i00, hy * hx * grad);
  if (p.x.step) sink.add(q.i01, hy * lx * grad);
  if (p.y.step) {
    sink.add(q.i10, ly * hx * grad);
    if (p.x.step) sink.add(q.i11, ly * lx * grad);
  }
}

// grad_plane[q] += weight(q) * grad over the corners q the sample at (y, x) reads
// (atomically); corners that coincide at the last row / column get one update.
template <typename A, typename I>
__device__ __forceinline__ void roi_align_scatter(A* grad_plane, I height, I width, A y, A x,
                                                  A grad) {
  AtomicSink<A> sink{grad_plane};
  roi_align_scatter_to<A, I>(sink, height, width, y, x, grad);
}

}  // namespace cupydcn
