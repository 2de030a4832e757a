// The geometry of deformable convolution shared by its kernels (deform_conv.cu and the
// files built on it): the sizes of a launch, work-item decomposition, per-image element
// offsets, a tap's mask and sampling point, and the per-item scatter of grad_input that
// the atomic and the deterministic kernels share. Device code only; the layouts are those
// of deform_conv.cu's header comment.
#pragma once

#include "accumulate.cuh"
#include "bilinear.cuh"
#include "rounding.cuh"
#include "scatter_sinks.cuh"

namespace cupydcn {

// The sizes of one launch, with the products every kernel derives from them.
template <typename I>
struct ConvSizes {
  I batch, channels, height, width;
  I kernel_h, kernel_w;
  I stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  I out_h, out_w;
  I offset_groups;
  int mode;              // PADDING_* code
  I taps;                // K = kernel_h * kernel_w
  I out_size;            // P = out_h * out_w
  I channels_per_group;  // C / G
  I slice_start;         // first output pixel of the launch's range
  I slice_size;          // S = pixels of the range (the columns' row length)
};

template <typename I>
__device__ __forceinline__ ConvSizes<I> conv_sizes(I batch, I channels, I height, I width,
                                                   I kernel_h, I kernel_w, I stride_h, I stride_w,
                                                   I pad_h, I pad_w, I dil_h, I dil_w, I out_h,
                                                   I out_w, I offset_groups, I padding_mode,
                                                   I pixel_start, I pixel_count) {
  ConvSizes<I> s;
  s.batch = batch;
  s.channels = channels;
  s.height = height;
  s.width = width;
  s.kernel_h = kernel_h;
  s.kernel_w = kernel_w;
  s.stride_h = stride_h;
  s.stride_w = stride_w;
  s.pad_h = pad_h;
  s.pad_w = pad_w;
  s.dil_h = dil_h;
  s.dil_w = dil_w;
  s.out_h = out_h;
  s.out_w = out_w;
  s.offset_groups = offset_groups;
  s.mode = static_cast<int>(padding_mode);
  s.taps = kernel_h * kernel_w;
  s.out_size = out_h * out_w;
  s.channels_per_group = channels / offset_groups;
  s.slice_start = pixel_start;
  s.slice_size = pixel_count;
  return s;
}

// The kernels' shared parameter tail, in KERNEL_PARAMETERS order.
#define CUPYDCN_CONV_SIZE_PARAMETERS                                                               \
  I batch, I channels, I height, I width, I kernel_h, I kernel_w, I stride_h, I stride_w, I pad_h, \
      I pad_w, I dil_h, I dil_w, I out_h, I out_w, I offset_groups, I padding_mode, I pixel_start, \
      I pixel_count
#define CUPYDCN_CONV_SIZES                                                                     \
  conv_sizes<I>(batch, channels, height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, \
                pad_w, dil_h, dil_w, out_h, out_w, offset_groups, padding_mode, pixel_start,   \
                pixel_count)

// A flat work index split as [batch, units, taps, slice_size] (units: channels or offset
// groups; taps = 1 for one thread per pixel): col is the pixel's index in the launch's
// range (the columns' layout), pix = slice_start + col the output pixel.
template <typename I>
struct ConvItem {
  I b, unit, tap, pix, col;
};

template <typename I>
__device__ __forceinline__ ConvItem<I> conv_item(I index, I units, I taps, const ConvSizes<I>& s) {
  ConvItem<I> item;
  item.col = index % s.slice_size;
  item.tap = (index / s.slice_size) % taps;
  item.unit = (index / (s.slice_size * taps)) % units;
  item.b = index / (s.slice_size * taps * units);
  item.pix = s.slice_start + item.col;
  return item;
}

// Element offsets of the per-image blocks the kernels address.
template <typename I>
__device__ __forceinline__ I plane_base(I b, I c, const ConvSizes<I>& s) {
  return (b * s.channels + c) * s.height * s.width;  // input[b, c]
}
template <typename I>
__device__ __forceinline__ I offset_base(I b, I g, const ConvSizes<I>& s) {
  return (b * s.offset_groups + g) * 2 * s.taps * s.out_size;  // offset[b, g*2K]
}
template <typename I>
__device__ __forceinline__ I mask_base(I b, I g, const ConvSizes<I>& s) {
  return (b * s.offset_groups + g) * s.taps * s.out_size;  // mask[b, g*K]
}
template <typename I>
__device__ __forceinline__ I column_index(I b, I c, I tap, I col, const ConvSizes<I>& s) {
  return ((b * s.channels + c) * s.taps + tap) * s.slice_size + col;  // columns[b, c*K + tap, col]
}

// mask[b, g*K, pix], or nullptr without a mask (DCNv1).
template <typename T, typename I>
__device__ __forceinline__ const T* mask_pixel(const T* mask, I b, I g, I pix,
                                               const ConvSizes<I>& s) {
  return mask == nullptr ? nullptr : mask + mask_base(b, g, s) + pix;
}

// The mask of a tap at the pixel of mask_pixel: mask_pixel[tap * P], 1 without a mask.
template <typename T, typename I>
__device__ __forceinline__ acc_t<T> tap_mask(const T* mask_pixel, I tap, const ConvSizes<I>& s) {
  using A = acc_t<T>;
  return mask_pixel == nullptr ? A(1) : to_acc(mask_pixel[tap * s.out_size]);
}

// Sampling point of tap = i * kernel_w + j at output pixel pix: the undeformed point plus
// the tap's offset, offset_pixel = offset[b, g*2K, pix]. The sum decides which cell is
// read, so it is rounded explicitly (rounding.cuh).
template <typename A>
struct TapPoint {
  A y, x;
};

template <typename T, typename I>
__device__ __forceinline__ TapPoint<acc_t<T>> tap_point(const T* offset_pixel, I tap, I i, I j,
                                                        I pix, const ConvSizes<I>& s) {
  using A = acc_t<T>;
  const I oy = pix / s.out_w, ox = pix % s.out_w;
  const A dy = to_acc(offset_pixel[(2 * tap) * s.out_size]);
  const A dx = to_acc(offset_pixel[(2 * tap + 1) * s.out_size]);
  TapPoint<A> t;
  t.y = add_rn(static_cast<A>(oy * s.stride_h - s.pad_h + i * s.dil_h), dy);
  t.x = add_rn(static_cast<A>(ox * s.stride_w - s.pad_w + j * s.dil_w), dx);
  return t;
}

// The sampling point of a work item's tap (offset group g).
template <typename T, typename I>
__device__ __forceinline__ TapPoint<acc_t<T>> tap_point(const T* offset, const ConvItem<I>& item,
                                                        I g, const ConvSizes<I>& s) {
  return tap_point<T, I>(offset + offset_base(item.b, g, s) + item.pix, item.tap,
                         item.tap / s.kernel_w, item.tap % s.kernel_w, item.pix, s);
}

// The contributions of one column element (index) to grad_input: mask * grad_columns[b,
// c*K + k, col] spread bilinearly over the corners of the tap's (mapped) sampling point,
// passed to sink.add(element of grad_input, value) in a fixed order. The item of the
// grid-stride grad_input kernels: the atomic one (deform_conv.cu) and the deterministic
// one's two passes (deform_conv_deterministic.cu), which must see the same contributions.
template <typename T, typename I, typename Sink>
__device__ __forceinline__ void col2im_input_item(I index, const acc_t<T>* grad_columns,
                                                  const T* offset, const T* mask,
                                                  const ConvSizes<I>& s, Sink& sink) {
  using A = acc_t<T>;
  const ConvItem<I> item = conv_item(index, s.channels, s.taps, s);
  const I c = item.unit;
  const I g = c / s.channels_per_group;
  const TapPoint<A> t = tap_point<T, I>(offset, item, g, s);
  const A grad =
      grad_columns[index] * tap_mask(mask_pixel(mask, item.b, g, item.pix, s), item.tap, s);
  PlaneSink<Sink, I> plane{sink, plane_base(item.b, c, s)};
  bilinear_scatter_to<A, I>(plane, s.height, s.width, t.y, t.x, grad, s.mode);
}

// ---------------------------------------------------------------- specialised kernels
// The kernels of deform_conv.cu are specialised at compile time on the kernel size (KH,
// KW; 0, 0 for any size, read from the arguments) and the padding mode (MODE, a PADDING_*
// code). specialised_sizes puts the constants into the sizes, so every helper reading
// s.kernel_h, s.kernel_w, s.taps or s.mode sees a constant once inlined: tap loops of a
// constant trip count (unrolled), divisions by constants, the padding branch decided.
// The runtime arguments must then agree (the host picks the specialisation from them).
template <int KH, int KW, int MODE, typename I>
__device__ __forceinline__ ConvSizes<I> specialised_sizes(ConvSizes<I> s) {
  static_assert((KH > 0) == (KW > 0), "kernel_h and kernel_w are both specialised, or neither");
  static_assert(MODE == PADDING_ZEROS || MODE == PADDING_BORDER || MODE == PADDING_REFLECTION,
                "MODE is a PADDING_* code");
  if (KH > 0) {
    s.kernel_h = KH;
    s.kernel_w = KW;
    s.taps = KH * KW;
  }
  s.mode = MODE;
  return s;
}

template <typename I>
__device__ __forceinline__ I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

// One output pixel of a launch's range: col its index in the range (the columns' layout),
// pix = slice_start + col, (oy, ox) its position, and the sampling point of tap (0, 0)
// without offset, (oy * stride_h - pad_h, ox * stride_w - pad_w). One division.
template <typename I>
struct OutputPixel {
  I col, pix, oy, ox;
  I y_origin, x_origin;
};

template <typename I>
__device__ __forceinline__ OutputPixel<I> output_pixel(I col, const ConvSizes<I>& s) {
  OutputPixel<I> px;
  px.col = col;
  px.pix = s.slice_start + col;
  px.oy = px.pix / s.out_w;
  px.ox = px.pix - px.oy * s.out_w;
  px.y_origin = px.oy * s.stride_h - s.pad_h;
  px.x_origin = px.ox * s.stride_w - s.pad_w;
  return px;
}

// A slab of at most `size` consecutive channels inside one offset group (the channels of
// a group share their sampling points): slab index = g * slabs_per_group + slab within g;
// the last slab of a group is ragged (count < size) when size does not divide C / G.
template <typename I>
struct ChannelSlab {
  I g;        // offset group
  I c_begin;  // first channel
  I count;    // channels in the slab, 1..size
};

template <typename I>
__device__ __forceinline__ I slabs_per_group(I size, const ConvSizes<I>& s) {
  return ceil_div(s.channels_per_group, size);
}

template <typename I>
__device__ __forceinline__ ChannelSlab<I> slab_of(I slab, I per_group, I size,
                                                  const ConvSizes<I>& s) {
  ChannelSlab<I> cs;
  cs.g = slab / per_group;
  const I first = (slab - cs.g * per_group) * size;  // within the group
  cs.c_begin = cs.g * s.channels_per_group + first;
  cs.count = min(size, s.channels_per_group - first);
  return cs;
}

// A tap's sampling point located once for every channel of its offset group, with its
// mask: offset_pixel = offset[b, g*2K, pix], mask_pixel = mask[b, g*K, pix] or nullptr.
// The tap's three loads are issued first, together; the point is that of tap_point
// (the same rounded sum) mapped and located by bilinear_point.
template <typename A, typename I>
struct TapSample {
  BilinearPoint<A, I> p;
  A m;  // the tap's mask, 1 without one
};

template <typename T, typename I>
__device__ __forceinline__ TapSample<acc_t<T>, I> tap_sample(const T* offset_pixel,
                                                             const T* mask_pixel, I tap, I i, I j,
                                                             const OutputPixel<I>& px,
                                                             const ConvSizes<I>& s) {
  using A = acc_t<T>;
  const A dy = to_acc(offset_pixel[(2 * tap) * s.out_size]);
  const A dx = to_acc(offset_pixel[(2 * tap + 1) * s.out_size]);
  const A m = mask_pixel == nullptr ? A(1) : to_acc(mask_pixel[tap * s.out_size]);
  const A y = add_rn(static_cast<A>(px.y_origin + i * s.dil_h), dy);
  const A x = add_rn(static_cast<A>(px.x_origin + j * s.dil_w), dx);
  TapSample<A, I> t;
  t.p = bilinear_point<A, I>(y, x, s.height, s.width, s.mode);
  t.m = m;
  return t;
}

}  // namespace cupydcn
