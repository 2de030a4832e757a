// The sampler of the fused (implicit-GEMM, no column buffer) deform_conv2d kernels
// (deform_conv_fused.cu): the sampling points of a tile of output pixels located once per
// (pixel, tap, offset group) into shared memory, then column values built from them, each
// bit for bit the value deform_conv_im2col writes (docs/semantics.md §6.1: mask * sample
// computed in the accumulation type and rounded once to T). Device code only; meant for
// reuse by the fused backward kernels.
//
// Exactness: a column value here is from_acc<T>(bilinear_sample_at(plane, p) * m) with p
// and m from tap_sample (conv_geometry.cuh), the very functions and expression im2col
// evaluates; FusedPoint only carries the fields of the located point that the blend reads
// (the corner cell, the fractions, the in-map flags), so the same operations run on the
// same operands and the compiler contracts them alike.
#pragma once

#include "accumulate.cuh"
#include "bilinear.cuh"
#include "conv_geometry.cuh"

namespace cupydcn {

template <typename T>
struct IsHalfType {
  static constexpr bool value = false;
};
template <>
struct IsHalfType<__half> {
  static constexpr bool value = true;
};
template <>
struct IsHalfType<__nv_bfloat16> {
  static constexpr bool value = true;
};

// A half-type value from its 16 bits (the shim's half types are a plain 16-bit pattern;
// CUDA's hide theirs behind intrinsics).
template <typename T>
__device__ __forceinline__ T half_from_bits(unsigned short bits);
template <>
__device__ __forceinline__ __half half_from_bits<__half>(unsigned short bits) {
#ifdef CUPYDCN_HOST_EMULATION
  __half h;
  h.__x = bits;
  return h;
#else
  return __ushort_as_half(bits);
#endif
}
template <>
__device__ __forceinline__ __nv_bfloat16 half_from_bits<__nv_bfloat16>(unsigned short bits) {
#ifdef CUPYDCN_HOST_EMULATION
  __nv_bfloat16 b;
  b.__x = bits;
  return b;
#else
  return __ushort_as_bfloat16(bits);
#endif
}

// A located sampling point: what bilinear_sample_at reads of a BilinearPoint, 24 bytes.
enum FusedPointFlags : unsigned {
  kPointY0In = 1u,
  kPointY1In = 2u,
  kPointX0In = 4u,
  kPointX1In = 8u,
  kPointAnyIn = 16u,
  kPointIsNan = 32u,
};

template <typename A>
struct FusedPoint {
  int y0, x0;      // the cell's top-left corner (in (-5, size + 1): fits an int)
  A ly, lx;        // fractions in the cell; ly = p.y + p.x (NaN) for a NaN point
  A m;             // the tap's mask (1 without one, 0 for a pixel outside the launch)
  unsigned flags;  // FusedPointFlags
};

// The point of a pixel outside the launch (or of a padding row): every value it makes is
// 0 * 0 = +0.
template <typename A>
__device__ __forceinline__ FusedPoint<A> empty_point() {
  FusedPoint<A> e;
  e.y0 = e.x0 = 0;
  e.ly = e.lx = A(0);
  e.m = A(0);
  e.flags = 0u;
  return e;
}

// The point of tap (i, j) = tap at output pixel px for offset group og of image b, as
// im2col locates it (tap_sample).
template <typename T, typename I>
__device__ __forceinline__ FusedPoint<acc_t<T>> locate_point(const T* offset, const T* mask, I b,
                                                             I og, I tap, I i, I j,
                                                             const OutputPixel<I>& px,
                                                             const ConvSizes<I>& s) {
  using A = acc_t<T>;
  const TapSample<A, I> t = tap_sample<T, I>(offset + offset_base(b, og, s) + px.pix,
                                             mask_pixel(mask, b, og, px.pix, s), tap, i, j, px, s);
  FusedPoint<A> e;
  e.y0 = static_cast<int>(t.p.y0);
  e.x0 = static_cast<int>(t.p.x0);
  e.ly = t.p.is_nan ? t.p.y + t.p.x : t.p.ly;
  e.lx = t.p.lx;
  e.m = t.m;
  e.flags = (t.p.y0_in ? kPointY0In : 0u) | (t.p.y1_in ? kPointY1In : 0u) |
            (t.p.x0_in ? kPointX0In : 0u) | (t.p.x1_in ? kPointX1In : 0u) |
            (t.p.any_in ? kPointAnyIn : 0u) | (t.p.is_nan ? kPointIsNan : 0u);
  return e;
}

// bilinear_sample_at(plane, p, width) of the point e stands for.
template <typename A, typename T, typename I>
__device__ __forceinline__ A sample_point(const T* plane, const FusedPoint<A>& e, I width) {
  if (e.flags & kPointIsNan) return e.ly;
  if (!(e.flags & kPointAnyIn)) return A(0);
  BilinearPoint<A, I> p;
  p.y0 = static_cast<I>(e.y0);
  p.x0 = static_cast<I>(e.x0);
  p.ly = e.ly;
  p.lx = e.lx;
  p.y0_in = (e.flags & kPointY0In) != 0u;
  p.y1_in = (e.flags & kPointY1In) != 0u;
  p.x0_in = (e.flags & kPointX0In) != 0u;
  p.x1_in = (e.flags & kPointX1In) != 0u;
  return blend(corner_values<A, T, I>(plane, p, width), p);
}

// The column value of the point for one input plane: deform_conv_im2col's
// from_acc<T>(sample * mask).
template <typename T, typename I>
__device__ __forceinline__ T column_value(const T* plane, const FusedPoint<acc_t<T>>& e, I width) {
  return from_acc<T>(sample_point<acc_t<T>, T, I>(plane, e, width) * e.m);
}

// The offset groups whose channels a weight group's input channels [c_begin, c_end)
// (absolute) touch: [first, first + count).
template <typename I>
struct OffsetGroupSpan {
  I first;
  int count;
};

template <typename I>
__device__ __forceinline__ OffsetGroupSpan<I> offset_group_span(I c_begin, I c_end,
                                                                const ConvSizes<I>& s) {
  OffsetGroupSpan<I> span;
  span.first = c_begin / s.channels_per_group;
  span.count = static_cast<int>((c_end - 1) / s.channels_per_group - span.first + 1);
  return span;
}

}  // namespace cupydcn
