// Deformable RoI pooling (mmcv DeformRoIPool, plus a modulation mask): each bin of each
// RoI is the average of a grid of RoIAlign samples, the bin shifted by a learned offset
// and its average multiplied by the mask (docs/semantics.md §2).
//
// Device code only; templates over the element type T (double, float, __half,
// __nv_bfloat16) and the index type I (int, or long long for tensors past 2^31
// elements). Buffers and launches live in cupydcn/roi_pool/cuda_backend.py; the parameter
// lists are mirrored in KERNEL_PARAMETERS of cupydcn/cuda/kernel_source.py.
//
// Layouts (all C-contiguous; K RoIs, B = pooled_h * pooled_w bins, A = acc_t<T>):
//   input            [N, C, H, W]        T
//   rois             [K, 5]              A  (batch_index, x1, y1, x2, y2); batch_index is
//                                           an integral value in [0, N) (checked by the caller)
//   offset           [K, 2, ph, pw]      T or nullptr; channel 0 is x, channel 1 is y
//   mask             [K, 1, ph, pw]      T or nullptr
//   scale_and_gamma  [2]                 A  (spatial_scale, gamma)
//   output, grad_output [K, C, ph, pw]   T
//   grad_input       [N, C, H, W]        A  accumulated with atomics (zeroed by the caller)
//   grad_offset      [K, 2, ph, pw]      T
//   grad_mask        [K, 1, ph, pw]      T
//
// Gradients, per bin with count = max(grid_h * grid_w, 1) samples s at (y_s, x_s):
//   out               = m / count * sum_s v(y_s, x_s)
//   d out / d offset_x = m / count * gamma * roi_w * sum_s dv/dx(y_s, x_s)   (likewise y)
//   d out / d m        = 1 / count * sum_s v(y_s, x_s)
// because the offset moves the bin (y_s = top + ... with d top / d offset_y = gamma * roi_h)
// and leaves its size and sampling grid unchanged. dv/dx follows the conventions at the
// kinks of roi_common.cuh: 0 where the coordinate is clamped (in [-1, 0) or at/after the
// last row / column) or the sample is outside [-1, H] x [-1, W], the one-sided derivative
// from the right at integer coordinates, NaN for NaN points.
#include "accumulate.cuh"
#include "grid_stride.cuh"
#include "roi_common.cuh"
#include "rounding.cuh"

namespace cupydcn {

// Samples per bin along one axis are capped here: no real RoI comes near it; the cap only
// keeps the float -> int conversion defined for absurd (finite) boxes. Sample counts and
// loop counters are int whatever the index type.
constexpr int kMaxSamplesPerAxis = 1 << 30;

// The sizes of one launch.
template <typename I>
struct RoiSizes {
  I num_rois, channels, height, width, pooled_h, pooled_w, sampling_ratio;
  I bins;  // pooled_h * pooled_w
};

template <typename I>
__device__ __forceinline__ RoiSizes<I> roi_sizes(I num_rois, I channels, I height, I width,
                                                 I pooled_h, I pooled_w, I sampling_ratio) {
  const I bins = pooled_h * pooled_w;
  return RoiSizes<I>{num_rois, channels, height, width, pooled_h, pooled_w, sampling_ratio, bins};
}

// The kernels' shared parameter tail, in KERNEL_PARAMETERS order.
#define CUPYDCN_ROI_SIZE_PARAMETERS \
  I num_rois, I channels, I height, I width, I pooled_h, I pooled_w, I sampling_ratio
#define CUPYDCN_ROI_SIZES \
  roi_sizes<I>(num_rois, channels, height, width, pooled_h, pooled_w, sampling_ratio)

// A flat index of [K, units, ph, pw] (units = C for an output element, 1 for a bin).
template <typename I>
struct RoiItem {
  I k, c, ph, pw;
  I bin_index;  // ph * pooled_w + pw
};

template <typename I>
__device__ __forceinline__ RoiItem<I> roi_item(I index, I units, const RoiSizes<I>& s) {
  RoiItem<I> item;
  item.pw = index % s.pooled_w;
  item.ph = (index / s.pooled_w) % s.pooled_h;
  item.c = (index / s.bins) % units;
  item.k = index / (s.bins * units);
  item.bin_index = item.ph * s.pooled_w + item.pw;
  return item;
}

// mask[k, 0, ph, pw], 1 without a mask.
template <typename T, typename I>
__device__ __forceinline__ acc_t<T> bin_mask(const T* mask, const RoiItem<I>& item,
                                             const RoiSizes<I>& s) {
  using A = acc_t<T>;
  return mask == nullptr ? A(1) : to_acc(mask[item.k * s.bins + item.bin_index]);
}

// Bin (ph, pw) of one RoI: everything its samples depend on.
template <typename A, typename I>
struct RoiBin {
  I batch_index;
  A top, left;         // sample-grid origin: the bin's corner after the offset shift
  A bin_h, bin_w;      // bin size (negative for a reversed RoI, y2 < y1 or x2 < x1)
  int grid_h, grid_w;  // samples along y and x (0 for an empty or reversed RoI if adaptive)
  A count;             // max(grid_h * grid_w, 1), the divisor of the average
  A roi_h, roi_w;      // RoI size (not clamped): d top / d offset_y = gamma * roi_h
};

// sampling_ratio if positive, else ceil(roi_size / pooled); clamped to [0, cap].
template <typename A, typename I>
__device__ __forceinline__ int samples_per_axis(I sampling_ratio, A roi_size, I pooled) {
  if (sampling_ratio > 0) {
    return static_cast<int>(sampling_ratio < I(kMaxSamplesPerAxis) ? sampling_ratio
                                                                   : I(kMaxSamplesPerAxis));
  }
  const A adaptive = ceil(div_rn(roi_size, static_cast<A>(pooled)));
  const A cap = static_cast<A>(kMaxSamplesPerAxis);
  if (!(adaptive > A(0))) return 0;  // also NaN
  return static_cast<int>(adaptive < cap ? adaptive : cap);
}

// corner * spatial_scale - 0.5, the continuous coordinate of a RoI corner.
template <typename A>
__device__ __forceinline__ A roi_corner(A corner, A spatial_scale) {
  return sub_rn(mul_rn(corner, spatial_scale), A(0.5));
}

// Every quantity below decides which samples a bin has and where they fall, so each is
// computed with explicitly rounded operations (rounding.cuh), in the NumPy backend's order.
template <typename T, typename I>
__device__ __forceinline__ RoiBin<acc_t<T>, I> roi_bin(const acc_t<T>* rois, const T* offset,
                                                       const acc_t<T>* scale_and_gamma,
                                                       const RoiItem<I>& item,
                                                       const RoiSizes<I>& s) {
  using A = acc_t<T>;
  const A* roi = rois + item.k * 5;
  const A spatial_scale = scale_and_gamma[0];
  RoiBin<A, I> bin;
  bin.batch_index = static_cast<I>(roi[0]);
  A start_x = roi_corner(roi[1], spatial_scale);
  A start_y = roi_corner(roi[2], spatial_scale);
  bin.roi_w = sub_rn(roi_corner(roi[3], spatial_scale), start_x);
  bin.roi_h = sub_rn(roi_corner(roi[4], spatial_scale), start_y);
  bin.bin_w = div_rn(bin.roi_w, static_cast<A>(s.pooled_w));
  bin.bin_h = div_rn(bin.roi_h, static_cast<A>(s.pooled_h));
  bin.grid_w = samples_per_axis<A, I>(s.sampling_ratio, bin.roi_w, s.pooled_w);
  bin.grid_h = samples_per_axis<A, I>(s.sampling_ratio, bin.roi_h, s.pooled_h);
  const A samples = static_cast<A>(bin.grid_h) * static_cast<A>(bin.grid_w);
  bin.count = samples > A(1) ? samples : A(1);
  if (offset != nullptr) {  // the grid size above is computed before the shift
    const T* bin_offset = offset + item.k * 2 * s.bins + item.bin_index;
    const A gamma = scale_and_gamma[1];
    start_x = add_rn(start_x, mul_rn(mul_rn(gamma, bin.roi_w), to_acc(bin_offset[0])));
    start_y = add_rn(start_y, mul_rn(mul_rn(gamma, bin.roi_h), to_acc(bin_offset[s.bins])));
  }
  bin.left = add_rn(start_x, mul_rn(static_cast<A>(item.pw), bin.bin_w));
  bin.top = add_rn(start_y, mul_rn(static_cast<A>(item.ph), bin.bin_h));
  return bin;
}

// Coordinate of sample i of ``grid`` along a bin starting at ``origin`` of size ``size``.
template <typename A>
__device__ __forceinline__ A bin_sample(A origin, A size, int i, int grid) {
  return add_rn(origin, div_rn(mul_rn(static_cast<A>(i) + A(0.5), size), static_cast<A>(grid)));
}

// Calls visit(y, x) for every sample of the bin, row by row.
template <typename A, typename I, typename Visit>
__device__ __forceinline__ void for_each_sample(const RoiBin<A, I>& bin, Visit&& visit) {
  for (int iy = 0; iy < bin.grid_h; ++iy) {
    const A y = bin_sample<A>(bin.top, bin.bin_h, iy, bin.grid_h);
    for (int ix = 0; ix < bin.grid_w; ++ix) {
      visit(y, bin_sample<A>(bin.left, bin.bin_w, ix, bin.grid_w));
    }
  }
}

// output[k, c, ph, pw] = mask[k, 0, ph, pw] / count * sum of the bin's samples of
// input[batch_index, c]. One thread per output element.
template <typename T, typename I>
__global__ void deform_roi_pool_forward(const T* __restrict__ input,
                                        const acc_t<T>* __restrict__ rois,
                                        const T* __restrict__ offset, const T* __restrict__ mask,
                                        const acc_t<T>* __restrict__ scale_and_gamma,
                                        T* __restrict__ output, CUPYDCN_ROI_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const RoiSizes<I> s = CUPYDCN_ROI_SIZES;
  const I total = s.num_rois * s.channels * s.bins;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const RoiItem<I> item = roi_item(index, s.channels, s);
    const RoiBin<A, I> bin = roi_bin<T, I>(rois, offset, scale_and_gamma, item, s);
    const T* plane = input + (bin.batch_index * s.channels + item.c) * s.height * s.width;
    A sum = A(0);
    for_each_sample(
        bin, [&](A y, A x) { sum += roi_align_sample<A, T, I>(plane, s.height, s.width, y, x); });
    output[index] = from_acc<T>(sum / bin.count * bin_mask<T, I>(mask, item, s));
  }
}

// The contributions of one grad_output element (index) to grad_input: grad_output[k, c,
// ph, pw] * mask / count spread over the corners of each of the bin's samples, passed to
// sink.add(element of grad_input, value) in a fixed order (the samples row by row).
template <typename T, typename I, typename Sink>
__device__ __forceinline__ void roi_backward_input_item(I index, const T* grad_output,
                                                        const acc_t<T>* rois, const T* offset,
                                                        const T* mask,
                                                        const acc_t<T>* scale_and_gamma,
                                                        const RoiSizes<I>& s, Sink& sink) {
  using A = acc_t<T>;
  const RoiItem<I> item = roi_item(index, s.channels, s);
  const RoiBin<A, I> bin = roi_bin<T, I>(rois, offset, scale_and_gamma, item, s);
  const A grad = to_acc(grad_output[index]) * bin_mask<T, I>(mask, item, s) / bin.count;
  PlaneSink<Sink, I> plane{sink, (bin.batch_index * s.channels + item.c) * s.height * s.width};
  for_each_sample(
      bin, [&](A y, A x) { roi_align_scatter_to<A, I>(plane, s.height, s.width, y, x, grad); });
}

// grad_input[batch_index, c] += grad_output[k, c, ph, pw] * mask / count spread over the
// corners of each of the bin's samples. One thread per grad_output element; atomics in A.
// (The deterministic mode's version is deform_roi_pool_deterministic.cu.)
template <typename T, typename I>
__global__ void deform_roi_pool_backward_input(const T* __restrict__ grad_output,
                                               const acc_t<T>* __restrict__ rois,
                                               const T* __restrict__ offset,
                                               const T* __restrict__ mask,
                                               const acc_t<T>* __restrict__ scale_and_gamma,
                                               acc_t<T>* __restrict__ grad_input,
                                               CUPYDCN_ROI_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const RoiSizes<I> s = CUPYDCN_ROI_SIZES;
  const I total = s.num_rois * s.channels * s.bins;
  AtomicSink<A> sink{grad_input};
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    roi_backward_input_item<T, I>(index, grad_output, rois, offset, mask, scale_and_gamma, s, sink);
  }
}

// For each bin (k, ph, pw), with g_c = grad_output[k, c, ph, pw] and v_c the samples of
// input[batch_index, c], summed over the samples s and channels c:
//   grad_offset[k, 0, ph, pw] = m / count * gamma * roi_w * sum g_c * dv_c/dx
//   grad_offset[k, 1, ph, pw] = m / count * gamma * roi_h * sum g_c * dv_c/dy
//   grad_mask[k, 0, ph, pw]   = 1 / count * sum g_c * v_c
// No atomics: each thread owns its outputs and sums over the channels. Either output
// pointer may be nullptr when that gradient is not wanted.
template <typename T, typename I>
__global__ void deform_roi_pool_backward_coord(
    const T* __restrict__ grad_output, const T* __restrict__ input,
    const acc_t<T>* __restrict__ rois, const T* __restrict__ offset, const T* __restrict__ mask,
    const acc_t<T>* __restrict__ scale_and_gamma, T* __restrict__ grad_offset,
    T* __restrict__ grad_mask, CUPYDCN_ROI_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const RoiSizes<I> s = CUPYDCN_ROI_SIZES;
  const I plane_size = s.height * s.width;
  const I total = s.num_rois * s.bins;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const RoiItem<I> item = roi_item(index, I(1), s);
    const RoiBin<A, I> bin = roi_bin<T, I>(rois, offset, scale_and_gamma, item, s);
    const T* image = input + bin.batch_index * s.channels * plane_size;
    const T* image_end = image + s.channels * plane_size;
    // Channel stride: bins.
    const T* grad_bin = grad_output + item.k * s.channels * s.bins + item.bin_index;
    SampleWithGradient<A> sum{A(0), A(0), A(0)};
    for_each_sample(bin, [&](A y, A x) {
      const RoiAlignPoint<A, I> p = roi_align_point<A, I>(y, x, s.height, s.width);
      if (p.is_nan) {
        sum.value += p.nan;
        sum.d_dy += p.nan;
        sum.d_dx += p.nan;
      }
      if (!p.inside) return;  // outside: samples 0 with zero derivatives
      // Per-corner sums over the channels of g_c * input_c, blended once afterwards.
      const RoiAlignCorners<I> q = roi_align_corners<A, I>(p, s.width);
      A s00 = A(0), s01 = A(0), s10 = A(0), s11 = A(0);
      // A pointer loop: ptxas keeps it rolled, which holds the float64 / 64-bit-index
      // build under the register budget (an unrolled counter loop reaches ~127).
      const T* grad = grad_bin;
      for (const T* plane = image; plane != image_end; plane += plane_size, grad += s.bins) {
        const A g = to_acc(*grad);
        s00 += g * to_acc(plane[q.i00]);
        s01 += g * to_acc(plane[q.i01]);
        s10 += g * to_acc(plane[q.i10]);
        s11 += g * to_acc(plane[q.i11]);
      }
      const SampleWithGradient<A> v = roi_align_blend<A, I>(p, s00, s01, s10, s11);
      sum.value += v.value;
      sum.d_dy += v.d_dy;
      sum.d_dx += v.d_dx;
    });
    if (grad_offset != nullptr) {
      const A gamma = scale_and_gamma[1];
      const A per_sample = bin_mask<T, I>(mask, item, s) / bin.count;
      T* out = grad_offset + item.k * 2 * s.bins + item.bin_index;
      out[0] = from_acc<T>(gamma * bin.roi_w * (sum.d_dx * per_sample));
      out[s.bins] = from_acc<T>(gamma * bin.roi_h * (sum.d_dy * per_sample));
    }
    if (grad_mask != nullptr) grad_mask[index] = from_acc<T>(sum.value / bin.count);
  }
}

}  // namespace cupydcn
