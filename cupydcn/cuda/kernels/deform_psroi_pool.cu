// Deformable position-sensitive RoI pooling (R-FCN, MSRA DeformablePSROIPooling):
// forward, and the two backward kernels (input gradient, offset gradient).
//
// Device code only; templates over the element type T (double, float, __half,
// __nv_bfloat16) and the index type I (int, or long long past 2^31 elements). Buffers and
// launches live in cupydcn/psroi_pool/cuda_backend.py; the contract is docs/semantics.md §3.
// The parameter lists are mirrored in KERNEL_PARAMETERS of cupydcn/cuda/kernel_source.py.
//
// Layouts (all C-contiguous; K RoIs, P = pooled_size, S = part_size, G = group_size,
// D = output_dim, L = num_classes (1 without offsets), A = acc_t<T>):
//   input       [N, D * G * G, H, W]   T
//   rois        [K, 5]                 A  (batch_index, x1, y1, x2, y2)
//   offset      [K, 2 * L, S, S]       T  or nullptr (no_trans); channel 2l = x, 2l + 1 = y
//   scalars     [2]                    A  (spatial_scale, trans_std)
//   output      [K, D, P, P]           T
//   count       [K, D, P, P]           int32, samples of the bin that fell inside the map
//   grad_input  [N, D * G * G, H, W]   A  (accumulated with atomics)
//   grad_offset [K, 2 * L, S, S]       T  (written once per element, no atomics)
// Output channel d belongs to class d / (D / L). Per-axis sizes and coordinates (bins,
// parts, groups, samples, H, W) are int; flat element indices and channel bases are I.
//
// Arithmetic follows MSRA's kernel step by step in A (half types in float): the RoI box
// from round() (half away from zero) of the scaled corners, bins of roi / P, sample
// spacing bin / sample_per_part, bin start = bin index * bin size + roi start, then
// + offset * trans_std * roi size, each operation rounded separately (rounding.cuh: they
// decide which samples are skipped and which cells are read, so the GPU must not fuse
// them into FMAs where the emulator and the NumPy backend cannot). One deliberate
// difference: the part of a bin, floor(ph / P * S), is computed exactly in integers; MSRA's
// floating-point version puts some bins into the previous part (e.g. float32, P = S = 22,
// ph = 13 -> 12).
//
// Sampling: a sample with w < -0.5, w > W - 0.5, h < -0.5 or h > H - 0.5 is skipped
// (not counted); the others are clamped into [0, W-1] x [0, H-1] and blended bilinearly.
// A NaN coordinate (from a NaN offset) is kept and counted and yields NaN, where MSRA's
// clamp would silently turn it into 0.
//
// Derivatives (MSRA's backward is the reference):
//  * The sample count is a constant of the backward: the jump of the mean when a sample
//    crosses the skip boundary has no gradient.
//  * d/dw at a clamped sample is 0 (the clamp is flat), and so is d/dw at a sample whose
//    clamped w is an integer: MSRA's corners are floor(w) and ceil(w), which coincide
//    there, so its difference quotient vanishes. Likewise for h. (The one-sided
//    derivatives of deform_conv2d do not apply here.)
//  * grad_input receives the bilinear weights of the kept samples, each times
//    grad_output / count of its bin.
#include "accumulate.cuh"
#include "bilinear.cuh"
#include "grid_stride.cuh"
#include "rounding.cuh"

namespace cupydcn {

// The per-axis sizes of one call, as int (the host validates that they fit).
struct PsRoiSizes {
  int height, width;    // feature map
  int group_size;       // G, position-sensitive grid
  int pooled_size;      // P, output bins per axis
  int part_size;        // S, offset cells per axis
  int sample_per_part;  // samples per bin and axis
};

template <typename I>
__device__ __forceinline__ PsRoiSizes psroi_sizes(I height, I width, I group_size, I pooled_size,
                                                  I part_size, I sample_per_part) {
  return PsRoiSizes{static_cast<int>(height),     static_cast<int>(width),
                    static_cast<int>(group_size), static_cast<int>(pooled_size),
                    static_cast<int>(part_size),  static_cast<int>(sample_per_part)};
}

// The kernels' shared parameter tail, in KERNEL_PARAMETERS order.
#define CUPYDCN_PSROI_SIZE_PARAMETERS                                                   \
  I num_rois, I channels, I height, I width, I output_dim, I group_size, I pooled_size, \
      I part_size, I sample_per_part, I num_classes

// The box of one RoI and its bin and sample spacing, shared by all its bins.
template <typename A, typename I>
struct PsRoiBox {
  I batch;             // image index of the RoI
  A start_h, start_w;  // top-left corner in feature-map coordinates
  A roi_h, roi_w;      // size, at least 0.1; also the scale of the offsets
  A bin_h, bin_w;      // roi / P
  A sub_h, sub_w;      // spacing of the sample_per_part x sample_per_part grid of a bin
};

template <typename A, typename I>
__device__ __forceinline__ PsRoiBox<A, I> psroi_box(const A* roi, A spatial_scale,
                                                    const PsRoiSizes& n) {
  PsRoiBox<A, I> box;
  box.batch = static_cast<I>(roi[0]);
  box.start_w = sub_rn(mul_rn(round(roi[1]), spatial_scale), A(0.5));
  box.start_h = sub_rn(mul_rn(round(roi[2]), spatial_scale), A(0.5));
  const A end_w = sub_rn(mul_rn(add_rn(round(roi[3]), A(1)), spatial_scale), A(0.5));
  const A end_h = sub_rn(mul_rn(add_rn(round(roi[4]), A(1)), spatial_scale), A(0.5));
  box.roi_w = fmax(sub_rn(end_w, box.start_w), A(0.1));
  box.roi_h = fmax(sub_rn(end_h, box.start_h), A(0.1));
  box.bin_w = div_rn(box.roi_w, static_cast<A>(n.pooled_size));
  box.bin_h = div_rn(box.roi_h, static_cast<A>(n.pooled_size));
  box.sub_w = div_rn(box.bin_w, static_cast<A>(n.sample_per_part));
  box.sub_h = div_rn(box.bin_h, static_cast<A>(n.sample_per_part));
  return box;
}

// The part (offset cell) of bin b along one axis: floor(b * S / P), exactly.
__device__ __forceinline__ int part_of_bin(int bin, const PsRoiSizes& n) {
  return bin * n.part_size / n.pooled_size;
}

// The first bin whose part is `part`: part p holds the bins
// [first_bin_of_part(p), first_bin_of_part(p + 1)), possibly none.
__device__ __forceinline__ int first_bin_of_part(int part, const PsRoiSizes& n) {
  return (part * n.pooled_size + n.part_size - 1) / n.part_size;
}

// First sample (row, column) of bin (ph, pw): the bin's corner, moved by the offset of
// its part. class_offset = the [2, S, S] offsets of the RoI and class, or nullptr.
template <typename A>
struct BinStart {
  A h, w;
};

template <typename T, typename I>
__device__ __forceinline__ BinStart<acc_t<T>> bin_start(const PsRoiBox<acc_t<T>, I>& box,
                                                        const T* class_offset, acc_t<T> trans_std,
                                                        int ph, int pw, const PsRoiSizes& n) {
  using A = acc_t<T>;
  BinStart<A> start;
  start.w = add_rn(mul_rn(static_cast<A>(pw), box.bin_w), box.start_w);
  start.h = add_rn(mul_rn(static_cast<A>(ph), box.bin_h), box.start_h);
  if (class_offset != nullptr) {
    const int part_area = n.part_size * n.part_size;
    const T* cell = class_offset + part_of_bin(ph, n) * n.part_size + part_of_bin(pw, n);
    start.w = add_rn(start.w, mul_rn(mul_rn(to_acc(cell[0]), trans_std), box.roi_w));
    start.h = add_rn(start.h, mul_rn(mul_rn(to_acc(cell[part_area]), trans_std), box.roi_h));
  }
  return start;
}

// One coordinate of a sample: start + i * spacing along an axis of `size` pixels. The
// sample is skipped when a coordinate lies outside [-0.5, size - 0.5]; kept ones are
// clamped into [0, size - 1]. Rows and columns are independent, so a bin keeps
// (kept rows) x (kept columns) samples.
template <typename A>
struct AxisSample {
  bool kept;
  A at;  // clamped; NaN stays NaN (and is kept)
};

template <typename A>
__device__ __forceinline__ AxisSample<A> axis_sample(A start, A spacing, int i, int size) {
  const A p = add_rn(start, mul_rn(static_cast<A>(i), spacing));
  const A last = static_cast<A>(size - 1);
  AxisSample<A> s;
  s.kept = !(p < A(-0.5) || p > last + A(0.5));
  s.at = p != p ? p : fmin(fmax(p, A(0)), last);
  return s;
}

template <typename A>
__device__ __forceinline__ int kept_along(A start, A spacing, int samples, int size) {
  int kept = 0;
  for (int i = 0; i < samples; ++i) kept += axis_sample(start, spacing, i, size).kept ? 1 : 0;
  return kept;
}

// Number of kept samples of a bin.
template <typename A, typename I>
__device__ __forceinline__ int kept_samples(const PsRoiBox<A, I>& box, const BinStart<A>& start,
                                            const PsRoiSizes& n) {
  return kept_along(start.h, box.sub_h, n.sample_per_part, n.height) *
         kept_along(start.w, box.sub_w, n.sample_per_part, n.width);
}

// Calls visit(h, w) with the clamped coordinates of every kept sample of a bin, row by row.
template <typename A, typename I, typename Visit>
__device__ __forceinline__ void for_each_kept_sample(const PsRoiBox<A, I>& box,
                                                     const BinStart<A>& start, const PsRoiSizes& n,
                                                     Visit&& visit) {
  for (int ih = 0; ih < n.sample_per_part; ++ih) {
    const AxisSample<A> h = axis_sample(start.h, box.sub_h, ih, n.height);
    if (!h.kept) continue;
    for (int iw = 0; iw < n.sample_per_part; ++iw) {
      const AxisSample<A> w = axis_sample(start.w, box.sub_w, iw, n.width);
      if (w.kept) visit(h.at, w.at);
    }
  }
}

// The position-sensitive input channel of output channel d at bin (ph, pw). The group
// cell floor(ph * G / P) lies in [0, G) because ph < P.
template <typename I>
__device__ __forceinline__ I position_sensitive_channel(I d, int ph, int pw, const PsRoiSizes& n) {
  const int gh = ph * n.group_size / n.pooled_size;
  const int gw = pw * n.group_size / n.pooled_size;
  return (d * n.group_size + gh) * n.group_size + gw;
}

// An output element (k, d, ph, pw) of the flat index of [K, D, P, P].
template <typename I>
struct OutputBin {
  I k, d;
  int ph, pw;
};

template <typename I>
__device__ __forceinline__ OutputBin<I> output_bin(I index, I output_dim, const PsRoiSizes& n) {
  OutputBin<I> b;
  const I pooled = n.pooled_size;
  b.pw = static_cast<int>(index % pooled);
  b.ph = static_cast<int>((index / pooled) % pooled);
  b.d = (index / (pooled * pooled)) % output_dim;
  b.k = index / (pooled * pooled * output_dim);
  return b;
}

// The [2, S, S] offsets of RoI k and class cls, or nullptr without offsets.
template <typename T, typename I>
__device__ __forceinline__ const T* class_offsets(const T* offset, I k, I cls, I num_classes,
                                                  const PsRoiSizes& n) {
  return offset == nullptr ? nullptr
                           : offset + (k * num_classes + cls) * 2 * n.part_size * n.part_size;
}

// output[k, d, ph, pw] = mean of the kept samples of the bin in its position-sensitive
// input channel (0 when none), count[k, d, ph, pw] = how many were kept.
// One thread per output element.
template <typename T, typename I>
__global__ void deform_psroi_pool_forward(const T* __restrict__ input,
                                          const acc_t<T>* __restrict__ rois,
                                          const T* __restrict__ offset,
                                          const acc_t<T>* __restrict__ scalars,
                                          T* __restrict__ output, int* __restrict__ count,
                                          CUPYDCN_PSROI_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const PsRoiSizes n =
      psroi_sizes(height, width, group_size, pooled_size, part_size, sample_per_part);
  const I channels_per_class = output_dim / num_classes;
  const I total = num_rois * output_dim * pooled_size * pooled_size;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const OutputBin<I> b = output_bin(index, output_dim, n);
    const PsRoiBox<A, I> box = psroi_box<A, I>(rois + b.k * 5, scalars[0], n);
    const BinStart<A> start =
        bin_start<T, I>(box, class_offsets(offset, b.k, b.d / channels_per_class, num_classes, n),
                        scalars[1], b.ph, b.pw, n);
    const T* plane =
        input +
        (box.batch * channels + position_sensitive_channel(b.d, b.ph, b.pw, n)) * height * width;
    A sum = A(0);
    int kept = 0;
    for_each_kept_sample(box, start, n, [&](A h, A w) {
      sum += bilinear_sample<A, T, I>(plane, height, width, h, w);
      ++kept;
    });
    output[index] = from_acc<T>(kept == 0 ? A(0) : sum / static_cast<A>(kept));
    count[index] = kept;
  }
}

// The contributions of one output element (index) to grad_input: grad_output[k, d, ph,
// pw] / count * the bilinear weights of each kept sample of the bin, passed to
// sink.add(element of grad_input, value) in a fixed order.
template <typename T, typename I, typename Sink>
__device__ __forceinline__ void psroi_backward_input_item(I index, const T* grad_output,
                                                          const acc_t<T>* rois, const T* offset,
                                                          const acc_t<T>* scalars,
                                                          const PsRoiSizes& n, I channels,
                                                          I output_dim, I num_classes, Sink& sink) {
  using A = acc_t<T>;
  const I height = n.height, width = n.width;
  const I channels_per_class = output_dim / num_classes;
  const OutputBin<I> b = output_bin(index, output_dim, n);
  const PsRoiBox<A, I> box = psroi_box<A, I>(rois + b.k * 5, scalars[0], n);
  const BinStart<A> start =
      bin_start<T, I>(box, class_offsets(offset, b.k, b.d / channels_per_class, num_classes, n),
                      scalars[1], b.ph, b.pw, n);
  const int kept = kept_samples<A, I>(box, start, n);
  if (kept == 0) return;
  const A grad = to_acc(grad_output[index]) / static_cast<A>(kept);
  PlaneSink<Sink, I> plane{
      sink,
      (box.batch * channels + position_sensitive_channel(b.d, b.ph, b.pw, n)) * height * width};
  for_each_kept_sample(box, start, n, [&](A h, A w) {
    bilinear_scatter_to<A, I>(plane, height, width, h, w, grad);
  });
}

// grad_input[b, c] += grad_output[k, d, ph, pw] / count * (bilinear weights of each kept
// sample of the bin). One thread per output element; atomics in A.
// (The deterministic mode's version is deform_psroi_pool_deterministic.cu.)
template <typename T, typename I>
__global__ void deform_psroi_pool_backward_input(const T* __restrict__ grad_output,
                                                 const acc_t<T>* __restrict__ rois,
                                                 const T* __restrict__ offset,
                                                 const acc_t<T>* __restrict__ scalars,
                                                 acc_t<T>* __restrict__ grad_input,
                                                 CUPYDCN_PSROI_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const PsRoiSizes n =
      psroi_sizes(height, width, group_size, pooled_size, part_size, sample_per_part);
  const I total = num_rois * output_dim * pooled_size * pooled_size;
  AtomicSink<A> sink{grad_input};
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    psroi_backward_input_item<T, I>(index, grad_output, rois, offset, scalars, n, channels,
                                    output_dim, num_classes, sink);
  }
}

// grad_offset[k, 2l (+1), part_h, part_w] = trans_std * roi_w (roi_h) * the sum, over the
// bins (ph, pw) of the part, the output channels d of class l and the kept samples of
// each bin, of grad_output[k, d, ph, pw] / count * d sample / dw (dh).
//
// Race-free without atomics: one thread per offset cell (k, l, part_h, part_w) gathers
// every term that lands in it. A part holds several bins when P > S and may hold none
// when P < S (the cell is then written 0). The count of a bin does not depend on d, so it
// is found once per bin.
template <typename T, typename I>
__global__ void deform_psroi_pool_backward_offset(const T* __restrict__ grad_output,
                                                  const T* __restrict__ input,
                                                  const acc_t<T>* __restrict__ rois,
                                                  const T* __restrict__ offset,
                                                  const acc_t<T>* __restrict__ scalars,
                                                  T* __restrict__ grad_offset,
                                                  CUPYDCN_PSROI_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const PsRoiSizes n =
      psroi_sizes(height, width, group_size, pooled_size, part_size, sample_per_part);
  const I bins = pooled_size * pooled_size;
  const I part_area = part_size * part_size;
  const I channels_per_class = output_dim / num_classes;
  const I plane_step = group_size * group_size * height * width;  // input channel of d + 1
  const I total = num_rois * num_classes * part_area;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const int part_w = static_cast<int>(index % part_size);
    const int part_h = static_cast<int>((index / part_size) % part_size);
    const I cls = (index / part_area) % num_classes;
    const I k = index / (part_area * num_classes);
    const A trans_std = scalars[1];
    const PsRoiBox<A, I> box = psroi_box<A, I>(rois + k * 5, scalars[0], n);
    const T* class_offset = class_offsets(offset, k, cls, num_classes, n);
    const I d_begin = cls * channels_per_class;
    A sum_dh = A(0), sum_dw = A(0);
    const int ph_end = first_bin_of_part(part_h + 1, n);
    const int pw_end = first_bin_of_part(part_w + 1, n);
    for (int ph = first_bin_of_part(part_h, n); ph < ph_end; ++ph) {
      for (int pw = first_bin_of_part(part_w, n); pw < pw_end; ++pw) {
        const BinStart<A> start = bin_start<T, I>(box, class_offset, trans_std, ph, pw, n);
        const int kept = kept_samples<A, I>(box, start, n);
        if (kept == 0) continue;
        const T* grad_bin =
            grad_output + ((k * output_dim + d_begin) * pooled_size + ph) * pooled_size + pw;
        const T* first_plane =
            input + (box.batch * channels + position_sensitive_channel(d_begin, ph, pw, n)) *
                        height * width;
        A bin_dh = A(0), bin_dw = A(0);  // sums over the bin's samples, before / count
        for_each_kept_sample(box, start, n, [&](A h, A w) {
          const BilinearPoint<A, I> p = bilinear_point<A, I>(h, w, height, width);
          if (p.is_nan) {
            bin_dh = bin_dw = h + w;
            return;
          }
          // The derivatives are linear in the corner values: blend the corners of all
          // the class's channels, weighted by their gradients, and differentiate once.
          A v00 = A(0), v01 = A(0), v10 = A(0), v11 = A(0);
          // Not unrolled: unrolling costs 20-30 registers (float64 reaches 128) in a loop
          // that is bound by its scattered loads anyway.
#pragma unroll 1
          for (I j = 0; j < channels_per_class; ++j) {
            const A grad = to_acc(grad_bin[j * bins]);
            const CornerValues<A> v =
                corner_values<A, T, I>(first_plane + j * plane_step, p, width);
            v00 += grad * v.v00;
            v01 += grad * v.v01;
            v10 += grad * v.v10;
            v11 += grad * v.v11;
          }
          // MSRA's corners are floor and ceil: on an integer coordinate (which includes
          // every clamped one) they coincide and the derivative along it is 0.
          if (p.lx != A(0)) bin_dw += (A(1) - p.ly) * (v01 - v00) + p.ly * (v11 - v10);
          if (p.ly != A(0)) bin_dh += (A(1) - p.lx) * (v10 - v00) + p.lx * (v11 - v01);
        });
        sum_dh += bin_dh / static_cast<A>(kept);
        sum_dw += bin_dw / static_cast<A>(kept);
      }
    }
    T* cell = grad_offset + (k * num_classes + cls) * 2 * part_area + part_h * part_size + part_w;
    cell[0] = from_acc<T>(sum_dw * trans_std * box.roi_w);
    cell[part_area] = from_acc<T>(sum_dh * trans_std * box.roi_h);
  }
}

}  // namespace cupydcn
