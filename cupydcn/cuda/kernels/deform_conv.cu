// Deformable convolution (DCNv1 and modulated DCNv2): sampling kernels around a GEMM.
//
// Device code only; templates over the element type T (double, float, __half,
// __nv_bfloat16) and the index type I (int, or long long for tensors past 2^31
// elements). Launch configuration, buffers and GEMMs live in cupydcn/_cuda_conv.py.
//
// Layouts (all C-contiguous; n = images in this chunk, K = kernel_h * kernel_w taps,
// G = offset groups, P = out_h * out_w output pixels, A = acc_t<T>):
//   input        [n, C, H, W]            T
//   offset       [n, G * 2 * K, out_h, out_w]  T, channel g*2K + 2k = dy, + 1 = dx
//   mask         [n, G * K, out_h, out_w] T or nullptr (DCNv1)
//   columns      [n, C * K, P]            A, row c*K + k = mask * input sampled at tap k
//   grad_columns [n, C * K, P]            A, d loss / d columns
// padding_mode (the last argument, in the index type) is a PADDING_* code of
// dcn_common.cuh: how sample points are read (zeros, border, reflection); one runtime
// argument instead of a specialisation per mode, so the kernels are compiled once.
#include "dcn_common.cuh"

namespace cupydcn {

// Sampling point of tap (i, j) at output pixel (oy, ox), and its offset.
template <typename A, typename I>
struct TapPoint {
  A y, x;
};

template <typename T, typename I>
__device__ __forceinline__ TapPoint<acc_t<T>, I> tap_point(
    const T* offset_pixel, I out_size, I tap, I i, I j, I oy, I ox, I stride_h, I stride_w,
    I pad_h, I pad_w, I dil_h, I dil_w) {
  using A = acc_t<T>;
  TapPoint<A, I> t;
  const A dy = to_acc(offset_pixel[(2 * tap) * out_size]);
  const A dx = to_acc(offset_pixel[(2 * tap + 1) * out_size]);
  t.y = static_cast<A>(oy * stride_h - pad_h + i * dil_h) + dy;
  t.x = static_cast<A>(ox * stride_w - pad_w + j * dil_w) + dx;
  return t;
}

// columns[b, c*K + k, pix] = mask[b, g*K + k, pix] * input[b, c] sampled at tap k.
// One thread per (b, c, pix); loops over the K taps.
template <typename T, typename I>
__global__ void deform_conv_im2col(
    const T* __restrict__ input, const T* __restrict__ offset, const T* __restrict__ mask,
    acc_t<T>* __restrict__ columns, I batch, I channels, I height, I width, I kernel_h,
    I kernel_w, I stride_h, I stride_w, I pad_h, I pad_w, I dil_h, I dil_w, I out_h,
    I out_w, I offset_groups, I padding_mode) {
  using A = acc_t<T>;
  const I taps = kernel_h * kernel_w;
  const I out_size = out_h * out_w;
  const I channels_per_group = channels / offset_groups;
  const I total = batch * channels * out_size;
  const int mode = static_cast<int>(padding_mode);
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const I pix = index % out_size;
    const I c = (index / out_size) % channels;
    const I b = index / (out_size * channels);
    const I oy = pix / out_w;
    const I ox = pix % out_w;
    const I g = c / channels_per_group;
    const T* plane = input + (b * channels + c) * height * width;
    const T* offset_pixel = offset + (b * offset_groups + g) * 2 * taps * out_size + pix;
    const T* mask_pixel =
        mask == nullptr ? nullptr : mask + (b * offset_groups + g) * taps * out_size + pix;
    A* column = columns + (b * channels + c) * taps * out_size + pix;
    for (I i = 0; i < kernel_h; ++i) {
      for (I j = 0; j < kernel_w; ++j) {
        const I tap = i * kernel_w + j;
        const TapPoint<A, I> t = tap_point<T, I>(offset_pixel, out_size, tap, i, j, oy, ox,
                                                 stride_h, stride_w, pad_h, pad_w, dil_h, dil_w);
        A value = bilinear_sample<A, T, I>(plane, height, width, t.y, t.x, mode);
        if (mask_pixel != nullptr) value *= to_acc(mask_pixel[tap * out_size]);
        column[tap * out_size] = value;
      }
    }
  }
}

// grad_input[b, c] += mask * grad_columns[b, c*K + k, pix] spread bilinearly over the
// corners of the tap's (mapped) sampling point. One thread per column element; atomics in A.
template <typename T, typename I>
__global__ void deform_conv_col2im_input(
    const acc_t<T>* __restrict__ grad_columns, const T* __restrict__ offset,
    const T* __restrict__ mask, acc_t<T>* __restrict__ grad_input, I batch, I channels,
    I height, I width, I kernel_h, I kernel_w, I stride_h, I stride_w, I pad_h, I pad_w,
    I dil_h, I dil_w, I out_h, I out_w, I offset_groups, I padding_mode) {
  using A = acc_t<T>;
  const I taps = kernel_h * kernel_w;
  const I out_size = out_h * out_w;
  const I channels_per_group = channels / offset_groups;
  const I total = batch * channels * taps * out_size;
  const int mode = static_cast<int>(padding_mode);
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const I pix = index % out_size;
    const I tap = (index / out_size) % taps;
    const I c = (index / (out_size * taps)) % channels;
    const I b = index / (out_size * taps * channels);
    const I oy = pix / out_w;
    const I ox = pix % out_w;
    const I i = tap / kernel_w;
    const I j = tap % kernel_w;
    const I g = c / channels_per_group;
    const T* offset_pixel = offset + (b * offset_groups + g) * 2 * taps * out_size + pix;
    const TapPoint<A, I> t = tap_point<T, I>(offset_pixel, out_size, tap, i, j, oy, ox,
                                             stride_h, stride_w, pad_h, pad_w, dil_h, dil_w);
    A grad = grad_columns[index];
    if (mask != nullptr) {
      grad *= to_acc(mask[((b * offset_groups + g) * taps + tap) * out_size + pix]);
    }
    bilinear_scatter<A, I>(grad_input + (b * channels + c) * height * width, height, width,
                           t.y, t.x, grad, mode);
  }
}

// For each (b, g, k, pix): with s_c = input[b, c] sampled at the tap's (mapped) point,
//   grad_offset[b, g*2K + 2k (+1), pix] = mask * sum_c grad_columns[b, c*K + k, pix] * d s_c / dy (dx)
//   grad_mask[b, g*K + k, pix]          = sum_c grad_columns[b, c*K + k, pix] * s_c
// over the channels c of offset group g. No atomics: each thread owns its outputs.
// Either output pointer may be nullptr when that gradient is not wanted.
template <typename T, typename I>
__global__ void deform_conv_col2im_coord(
    const acc_t<T>* __restrict__ grad_columns, const T* __restrict__ input,
    const T* __restrict__ offset, const T* __restrict__ mask, T* __restrict__ grad_offset,
    T* __restrict__ grad_mask, I batch, I channels, I height, I width, I kernel_h,
    I kernel_w, I stride_h, I stride_w, I pad_h, I pad_w, I dil_h, I dil_w, I out_h, I out_w,
    I offset_groups, I padding_mode) {
  using A = acc_t<T>;
  const I taps = kernel_h * kernel_w;
  const I out_size = out_h * out_w;
  const I channels_per_group = channels / offset_groups;
  const I total = batch * offset_groups * taps * out_size;
  const int mode = static_cast<int>(padding_mode);
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const I pix = index % out_size;
    const I tap = (index / out_size) % taps;
    const I g = (index / (out_size * taps)) % offset_groups;
    const I b = index / (out_size * taps * offset_groups);
    const I oy = pix / out_w;
    const I ox = pix % out_w;
    const I i = tap / kernel_w;
    const I j = tap % kernel_w;
    const I group_base = b * offset_groups + g;
    const T* offset_pixel = offset + group_base * 2 * taps * out_size + pix;
    const TapPoint<A, I> t = tap_point<T, I>(offset_pixel, out_size, tap, i, j, oy, ox,
                                             stride_h, stride_w, pad_h, pad_w, dil_h, dil_w);
    // One sample point for every channel of the group: mapped and located once.
    const BilinearPoint<A, I> p = bilinear_point<A, I>(t.y, t.x, height, width, mode);
    A sum_dy = A(0), sum_dx = A(0), sum_value = A(0);
    const I c_begin = g * channels_per_group;
    for (I c = c_begin; c < c_begin + channels_per_group; ++c) {
      const A grad = grad_columns[((b * channels + c) * taps + tap) * out_size + pix];
      const SampleWithGradient<A> s = bilinear_sample_with_gradient_at<A, T, I>(
          input + (b * channels + c) * height * width, p, width);
      sum_dy += grad * s.d_dy;
      sum_dx += grad * s.d_dx;
      sum_value += grad * s.value;
    }
    const A m = mask == nullptr ? A(1) : to_acc(mask[(group_base * taps + tap) * out_size + pix]);
    if (grad_offset != nullptr) {  // d/dp = d/dp' * dp'/dp (the padding mode's slope)
      T* out = grad_offset + group_base * 2 * taps * out_size + pix;
      out[(2 * tap) * out_size] = from_acc<T>(m * (sum_dy * p.slope_y));
      out[(2 * tap + 1) * out_size] = from_acc<T>(m * (sum_dx * p.slope_x));
    }
    if (grad_mask != nullptr) {
      grad_mask[(group_base * taps + tap) * out_size + pix] = from_acc<T>(sum_value);
    }
  }
}

}  // namespace cupydcn
