// Deformable convolution, second derivatives along an offset direction: the terms of the
// double backward that need the cross derivatives of bilinear sampling (the CUDA version of
// cupydcn/deform_conv/second_order.py, whose arithmetic these kernels mirror, in acc_t<T>
// instead of float64). Orchestrated by cupydcn/deform_conv/second_order_cuda.py.
//
// With v = (vy, vx) the offset tangent of a tap, l = (ly, lx) the point's position in its
// cell and the corners q = floor(p) + (dy, dx) weighted a_y(dy) a_x(dx) (a(0) = 1 - l,
// a(1) = l; derivatives da(0) = -1, da(1) = +1):
//   coefficient of corner q  c_q = da_y a_x vy + a_y da_x vx
//   T_c   = sum_q c_q x_c(q)             (dS_c/dp . v, corners outside the map read 0)
//   cross_c = sum_q da_y da_x x_c(q)     (d2 S_c / dpy dpx)
// Layouts as deform_conv.cu (the columns hold the S = pixel_count output pixels from
// pixel_start on); offset_tangent has the layout of offset.
//   columns      [n, C * K, S]  A   m * T_c                          (..._columns)
//   grad_columns [n, C * K, S]  A   W^T grad_output (colgrad)
//   grad_offset  [n, G*2K, P]   T   (dy, dx) = (sum_c colgrad m cross_c) * (vx, vy)
//   grad_mask    [n, G*K, P]    T   sum_c colgrad T_c                (..._coord)
//   grad_input   [n, C, H, W]   A   += colgrad m c_q at the in-map corners (..._input)
// padding_mode "zeros" only (the orchestration refuses the others; the argument is there
// for the shared size list). A non-finite sample point contributes nothing (all its
// corners are outside the map, bilinear_point), as in second_order.py.
#include "accumulate.cuh"
#include "atomics.cuh"
#include "bilinear.cuh"
#include "conv_geometry.cuh"
#include "grid_stride.cuh"

namespace cupydcn {

// The corner coefficients c_q of a point located by bilinear_point, for the tangent v.
template <typename A>
struct CornerCoefficients {
  A c00, c01, c10, c11;
};

template <typename A, typename I>
__device__ __forceinline__ CornerCoefficients<A> corner_coefficients(const BilinearPoint<A, I>& p,
                                                                     A vy, A vx) {
  const A hy = A(1) - p.ly, hx = A(1) - p.lx;
  CornerCoefficients<A> c;
  c.c00 = -hx * vy + -hy * vx;
  c.c01 = -p.lx * vy + hy * vx;
  c.c10 = hx * vy + -p.ly * vx;
  c.c11 = p.lx * vy + p.ly * vx;
  return c;
}

// The offset tangent (vy, vx) of a tap at a pixel: tangent_pixel = offset_tangent[b, g*2K, pix].
template <typename T, typename I>
__device__ __forceinline__ TapPoint<acc_t<T>> tap_tangent(const T* tangent_pixel, I tap,
                                                          const ConvSizes<I>& s) {
  TapPoint<acc_t<T>> v;
  v.y = to_acc(tangent_pixel[(2 * tap) * s.out_size]);
  v.x = to_acc(tangent_pixel[(2 * tap + 1) * s.out_size]);
  return v;
}

// The sample point of a tap, located (zeros padding).
template <typename T, typename I>
__device__ __forceinline__ BilinearPoint<acc_t<T>, I> located_tap(const T* offset_pixel, I tap,
                                                                  I pix, const ConvSizes<I>& s) {
  using A = acc_t<T>;
  const TapPoint<A> t =
      tap_point<T, I>(offset_pixel, tap, tap / s.kernel_w, tap % s.kernel_w, pix, s);
  return bilinear_point<A, I>(t.y, t.x, s.height, s.width, PADDING_ZEROS);
}

template <typename A>
__device__ __forceinline__ A along_tangent(const CornerValues<A>& v,
                                           const CornerCoefficients<A>& c) {
  return v.v00 * c.c00 + v.v01 * c.c01 + v.v10 * c.c10 + v.v11 * c.c11;
}

// columns[b, c*K + k, col] = mask * T_c at tap k. One thread per (b, c, pix); loops over
// the K taps (like deform_conv_im2col).
template <typename T, typename I>
__global__ void deform_conv_second_order_columns(const T* __restrict__ input,
                                                 const T* __restrict__ offset,
                                                 const T* __restrict__ mask,
                                                 const T* __restrict__ offset_tangent,
                                                 acc_t<T>* __restrict__ columns,
                                                 CUPYDCN_CONV_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const ConvSizes<I> s = CUPYDCN_CONV_SIZES;
  const I total = s.batch * s.channels * s.slice_size;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const ConvItem<I> item = conv_item(index, s.channels, I(1), s);
    const I c = item.unit;
    const I g = c / s.channels_per_group;
    const T* plane = input + plane_base(item.b, c, s);
    const I pixel_base = offset_base(item.b, g, s) + item.pix;
    const T* mask_at = mask_pixel(mask, item.b, g, item.pix, s);
    A* column = columns + column_index(item.b, c, I(0), item.col, s);
    for (I tap = 0; tap < s.taps; ++tap) {
      const BilinearPoint<A, I> p = located_tap<T, I>(offset + pixel_base, tap, item.pix, s);
      const TapPoint<A> v = tap_tangent<T, I>(offset_tangent + pixel_base, tap, s);
      const A t = along_tangent(corner_values<A, T, I>(plane, p, s.width),
                                corner_coefficients<A, I>(p, v.y, v.x));
      column[tap * s.slice_size] = tap_mask(mask_at, tap, s) * t;
    }
  }
}

// For each (b, g, k, pix), over the channels c of offset group g, with
// colgrad_c = grad_columns[b, c*K + k, col] (col = pix - pixel_start):
//   grad_offset[b, g*2K + 2k, pix]     = (sum_c colgrad_c m cross_c) * vx
//   grad_offset[b, g*2K + 2k + 1, pix] = (sum_c colgrad_c m cross_c) * vy
//   grad_mask[b, g*K + k, pix]         = sum_c colgrad_c T_c
// No atomics: each thread owns its outputs. Either output may be nullptr.
template <typename T, typename I>
__global__ void deform_conv_second_order_coord(
    const acc_t<T>* __restrict__ grad_columns, const T* __restrict__ input,
    const T* __restrict__ offset, const T* __restrict__ mask, const T* __restrict__ offset_tangent,
    T* __restrict__ grad_offset, T* __restrict__ grad_mask, CUPYDCN_CONV_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const ConvSizes<I> s = CUPYDCN_CONV_SIZES;
  const I total = s.batch * s.offset_groups * s.taps * s.slice_size;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const ConvItem<I> item = conv_item(index, s.offset_groups, s.taps, s);
    const I g = item.unit;
    const I pixel_base = offset_base(item.b, g, s) + item.pix;
    const BilinearPoint<A, I> p = located_tap<T, I>(offset + pixel_base, item.tap, item.pix, s);
    const TapPoint<A> v = tap_tangent<T, I>(offset_tangent + pixel_base, item.tap, s);
    const CornerCoefficients<A> coef = corner_coefficients<A, I>(p, v.y, v.x);
    const A m = tap_mask(mask_pixel(mask, item.b, g, item.pix, s), item.tap, s);
    A sum_cross = A(0), sum_t = A(0);
    const I c_begin = g * s.channels_per_group;
    for (I c = c_begin; c < c_begin + s.channels_per_group; ++c) {
      const A colgrad = grad_columns[column_index(item.b, c, item.tap, item.col, s)];
      const CornerValues<A> x =
          corner_values<A, T, I>(input + plane_base(item.b, c, s), p, s.width);
      sum_cross += (colgrad * m) * (((x.v00 - x.v01) - x.v10) + x.v11);
      sum_t += colgrad * along_tangent(x, coef);
    }
    if (grad_offset != nullptr) {
      T* out = grad_offset + pixel_base;
      out[(2 * item.tap) * s.out_size] = from_acc<T>(sum_cross * v.x);
      out[(2 * item.tap + 1) * s.out_size] = from_acc<T>(sum_cross * v.y);
    }
    if (grad_mask != nullptr) {
      grad_mask[mask_base(item.b, g, s) + item.tap * s.out_size + item.pix] = from_acc<T>(sum_t);
    }
  }
}

// grad_input[b, c] += colgrad m c_q at each in-map corner q of the tap's sample point,
// colgrad = grad_columns[b, c*K + k, col]. One thread per column element; atomics in A.
template <typename T, typename I>
__global__ void deform_conv_second_order_input(const acc_t<T>* __restrict__ grad_columns,
                                               const T* __restrict__ offset,
                                               const T* __restrict__ mask,
                                               const T* __restrict__ offset_tangent,
                                               acc_t<T>* __restrict__ grad_input,
                                               CUPYDCN_CONV_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const ConvSizes<I> s = CUPYDCN_CONV_SIZES;
  const I total = s.batch * s.channels * s.taps * s.slice_size;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const ConvItem<I> item = conv_item(index, s.channels, s.taps, s);
    const I c = item.unit;
    const I g = c / s.channels_per_group;
    const I pixel_base = offset_base(item.b, g, s) + item.pix;
    const BilinearPoint<A, I> p = located_tap<T, I>(offset + pixel_base, item.tap, item.pix, s);
    if (!p.any_in) continue;
    const TapPoint<A> v = tap_tangent<T, I>(offset_tangent + pixel_base, item.tap, s);
    const CornerCoefficients<A> coef = corner_coefficients<A, I>(p, v.y, v.x);
    const A a =
        grad_columns[index] * tap_mask(mask_pixel(mask, item.b, g, item.pix, s), item.tap, s);
    A* plane = grad_input + plane_base(item.b, c, s);
    const I row0 = p.y0 * s.width, row1 = row0 + s.width;
    if (p.y0_in && p.x0_in) atomic_accumulate(plane + (row0 + p.x0), a * coef.c00);
    if (p.y0_in && p.x1_in) atomic_accumulate(plane + (row0 + p.x0 + 1), a * coef.c01);
    if (p.y1_in && p.x0_in) atomic_accumulate(plane + (row1 + p.x0), a * coef.c10);
    if (p.y1_in && p.x1_in) atomic_accumulate(plane + (row1 + p.x0 + 1), a * coef.c11);
  }
}

}  // namespace cupydcn
