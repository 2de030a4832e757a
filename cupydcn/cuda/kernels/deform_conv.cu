// Deformable convolution (DCNv1 and modulated DCNv2): sampling kernels around a GEMM.
//
// Device code only; templates over the element type T (double, float, __half,
// __nv_bfloat16) and the index type I (int, or long long for tensors past 2^31
// elements). Launch configuration, buffers and GEMMs live in
// cupydcn/deform_conv/cuda_backend.py; the parameter lists are mirrored in
// KERNEL_PARAMETERS of cupydcn/cuda/kernel_source.py (tests/test_nvrtc.py checks them).
//
// Layouts (all C-contiguous; n = images in this chunk, K = kernel_h * kernel_w taps,
// G = offset groups, P = out_h * out_w output pixels, A = acc_t<T>):
//   input        [n, C, H, W]            T
//   offset       [n, G * 2 * K, out_h, out_w]  T, channel g*2K + 2k = dy, + 1 = dx
//   mask         [n, G * K, out_h, out_w] T or nullptr (DCNv1)
//   columns      [n, C * K, S]            A, row c*K + k = mask * input sampled at tap k
//   grad_columns [n, C * K, S]            A, d loss / d columns
// where the columns hold the S = pixel_count output pixels [pixel_start, pixel_start + S)
// of each image (S = P, pixel_start = 0 unless one image's columns exceed the workspace:
// then the backend splits the image into ranges of output pixels). The offset, mask and
// grad_offset / grad_mask tensors are always whole: a launch reads or writes its range.
// padding_mode (the last argument, in the index type) is a PADDING_* code of
// padding_modes.cuh: how sample points are read (zeros, border, reflection); one runtime
// argument instead of a specialisation per mode, so the kernels are compiled once.
#include "accumulate.cuh"
#include "bilinear.cuh"
#include "grid_stride.cuh"
#include "rounding.cuh"

#include "conv_geometry.cuh"

namespace cupydcn {

// columns[b, c*K + k, pix] = mask[b, g*K + k, pix] * input[b, c] sampled at tap k.
// One thread per (b, c, pix); loops over the K taps.
template <typename T, typename I>
__global__ void deform_conv_im2col(const T* __restrict__ input, const T* __restrict__ offset,
                                   const T* __restrict__ mask, acc_t<T>* __restrict__ columns,
                                   CUPYDCN_CONV_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const ConvSizes<I> s = CUPYDCN_CONV_SIZES;
  const I total = s.batch * s.channels * s.slice_size;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const ConvItem<I> item = conv_item(index, s.channels, I(1), s);
    const I c = item.unit;
    const I g = c / s.channels_per_group;
    const T* plane = input + plane_base(item.b, c, s);
    const T* offset_pixel = offset + offset_base(item.b, g, s) + item.pix;
    const T* mask_at = mask_pixel(mask, item.b, g, item.pix, s);
    A* column = columns + column_index(item.b, c, I(0), item.col, s);
    for (I i = 0; i < s.kernel_h; ++i) {
      for (I j = 0; j < s.kernel_w; ++j) {
        const I tap = i * s.kernel_w + j;
        const TapPoint<A> t = tap_point<T, I>(offset_pixel, tap, i, j, item.pix, s);
        const A value = bilinear_sample<A, T, I>(plane, s.height, s.width, t.y, t.x, s.mode);
        *column = value * tap_mask(mask_at, tap, s);
        // on to columns[b, c*K + tap + 1, col] (a stepped pointer, not tap * slice_size:
        // 4 registers fewer on sm_80)
        column += s.slice_size;
      }
    }
  }
}

// The contributions of one column element (index) to grad_input: mask * grad_columns[b,
// c*K + k, col] spread bilinearly over the corners of the tap's (mapped) sampling point,
// passed to sink.add(element of grad_input, value) in a fixed order.
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

// grad_input[b, c] += mask * grad_columns[b, c*K + k, pix] spread bilinearly over the
// corners of the tap's (mapped) sampling point. One thread per column element; atomics in A.
// (The deterministic mode's version is deform_conv_deterministic.cu.)
template <typename T, typename I>
__global__ void deform_conv_col2im_input(const acc_t<T>* __restrict__ grad_columns,
                                         const T* __restrict__ offset, const T* __restrict__ mask,
                                         acc_t<T>* __restrict__ grad_input,
                                         CUPYDCN_CONV_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const ConvSizes<I> s = CUPYDCN_CONV_SIZES;
  const I total = s.batch * s.channels * s.taps * s.slice_size;
  AtomicSink<A> sink{grad_input};
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    col2im_input_item<T, I>(index, grad_columns, offset, mask, s, sink);
  }
}

// For each (b, g, k, pix): with s_c = input[b, c] sampled at the tap's (mapped) point and
// g_c = grad_columns[b, c*K + k, pix], summed over the channels c of offset group g,
//   grad_offset[b, g*2K + 2k (+1), pix] = mask * sum_c g_c * d s_c / dy (dx)
//   grad_mask[b, g*K + k, pix]          = sum_c g_c * s_c
// No atomics: each thread owns its outputs.
// Either output pointer may be nullptr when that gradient is not wanted.
template <typename T, typename I>
__global__ void deform_conv_col2im_coord(const acc_t<T>* __restrict__ grad_columns,
                                         const T* __restrict__ input, const T* __restrict__ offset,
                                         const T* __restrict__ mask, T* __restrict__ grad_offset,
                                         T* __restrict__ grad_mask, CUPYDCN_CONV_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const ConvSizes<I> s = CUPYDCN_CONV_SIZES;
  const I total = s.batch * s.offset_groups * s.taps * s.slice_size;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const ConvItem<I> item = conv_item(index, s.offset_groups, s.taps, s);
    const I g = item.unit;
    const TapPoint<A> t = tap_point<T, I>(offset, item, g, s);
    // One sample point for every channel of the group: mapped and located once.
    const BilinearPoint<A, I> p = bilinear_point<A, I>(t.y, t.x, s.height, s.width, s.mode);
    A sum_dy = A(0), sum_dx = A(0), sum_value = A(0);
    const I c_begin = g * s.channels_per_group;
    for (I c = c_begin; c < c_begin + s.channels_per_group; ++c) {
      const A grad = grad_columns[column_index(item.b, c, item.tap, item.col, s)];
      const SampleWithGradient<A> v =
          bilinear_sample_with_gradient_at<A, T, I>(input + plane_base(item.b, c, s), p, s.width);
      sum_dy += grad * v.d_dy;
      sum_dx += grad * v.d_dx;
      sum_value += grad * v.value;
    }
    const A m = tap_mask(mask_pixel(mask, item.b, g, item.pix, s), item.tap, s);
    if (grad_offset != nullptr) {  // d/dp = d/dp' * dp'/dp (the padding mode's slope)
      T* out = grad_offset + offset_base(item.b, g, s) + item.pix;
      out[(2 * item.tap) * s.out_size] = from_acc<T>(m * (sum_dy * p.slope_y));
      out[(2 * item.tap + 1) * s.out_size] = from_acc<T>(m * (sum_dx * p.slope_x));
    }
    if (grad_mask != nullptr) {
      grad_mask[mask_base(item.b, g, s) + item.tap * s.out_size + item.pix] =
          from_acc<T>(sum_value);
    }
  }
}

}  // namespace cupydcn
