// Deformable convolution with few input channels per weight group (depthwise convolution
// and its channel multipliers): direct kernels, no column buffer and no GEMM.
//
// Device code only; templates over the element type T (double, float, __half,
// __nv_bfloat16), the index type I (int, or long long past 2^31 elements) and the kernel
// size KH x KW: a specialisation (3 x 3) unrolls the tap loops and keeps each tap's
// sampling point in registers; 0 x 0 is the generic version, the size taken from the
// runtime kernel_h / kernel_w (which must equal KH / KW otherwise). Launch shapes and
// buffers are in cupydcn/deform_conv/depthwise_cuda.py; the parameter lists are mirrored
// in KERNEL_PARAMETERS of cupydcn/cuda/kernel_source.py.
//
// Notation (A = acc_t<T>): C input channels in `groups` weight groups of cg = C / groups
// channels; Co output channels, mult = Co / groups per group; output channel o = gr * mult
// + j reads input channels c = gr * cg + c' (c' < cg) through weight[o, c', i, j]. G offset
// groups of cpg = C / G channels (channel c samples at the points of group c / cpg). K = kh
// * kw taps, tap k = i * kw + j; P = out_h * out_w output pixels. Layouts, C-contiguous:
//   input       [N, C, H, W]               T
//   offset      [N, G * 2K, out_h, out_w]  T, channel g*2K + 2k = dy, + 1 = dx
//   mask        [N, G * K, out_h, out_w]   T, or nullptr (DCNv1)
//   weight      [Co, cg, kh, kw]           T;  bias [Co] T or nullptr
//   output, grad_output [N, Co, out_h, out_w] T
//   grad_input  [N, C, H, W]               A, accumulated with atomics (zeroed by the host)
//   grad_offset, grad_mask                 T, the shapes of offset and mask, written once
//   grad_weight [Co, cg, kh, kw], grad_bias [Co]  A, accumulated with atomics (zeroed)
// padding_mode is a PADDING_* code of padding_modes.cuh (a runtime argument).
//
// The formulas and their order are the generic path's (docs/semantics.md §1.5, §1.6): a
// column value is mask * sample, rounded once to the element type (§6.1: for the half
// types, as the generic path's GEMM operands are), an output sum_{c', k} weight * column
// + bias, a column gradient sum_j weight * grad_output (not rounded).
#include "accumulate.cuh"
#include "atomics.cuh"
#include "bilinear.cuh"
#include "grid_stride.cuh"
#include "rounding.cuh"

namespace cupydcn {

// The sizes of a launch and the quotients every kernel derives from them.
template <typename I>
struct DepthwiseSizes {
  I batch, channels, height, width, out_channels, groups, offset_groups;
  I kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, out_h, out_w;
  int mode;    // PADDING_* code
  I taps;      // K = kernel_h * kernel_w
  I out_size;  // P = out_h * out_w
  I plane;     // H * W
  I cpg;       // channels per offset group, C / G
  I cg;        // input channels per weight group, C / groups
  I mult;      // output channels per weight group, Co / groups
};

// KH, KW > 0: the kernel size is a compile-time constant (the runtime values are equal).
template <typename I, int KH, int KW>
__device__ __forceinline__ DepthwiseSizes<I> depthwise_sizes(I batch, I in_channels, I height,
                                                             I width, I out_channels, I groups,
                                                             I offset_groups, I kernel_h,
                                                             I kernel_w, I stride_h, I stride_w,
                                                             I pad_h, I pad_w, I dil_h, I dil_w,
                                                             I out_h, I out_w, I padding_mode) {
  DepthwiseSizes<I> s;
  s.batch = batch;
  s.channels = in_channels;
  s.height = height;
  s.width = width;
  s.out_channels = out_channels;
  s.groups = groups;
  s.offset_groups = offset_groups;
  s.kernel_h = KH > 0 ? I(KH) : kernel_h;
  s.kernel_w = KW > 0 ? I(KW) : kernel_w;
  s.stride_h = stride_h;
  s.stride_w = stride_w;
  s.pad_h = pad_h;
  s.pad_w = pad_w;
  s.dil_h = dil_h;
  s.dil_w = dil_w;
  s.out_h = out_h;
  s.out_w = out_w;
  s.mode = static_cast<int>(padding_mode);
  s.taps = s.kernel_h * s.kernel_w;
  s.out_size = out_h * out_w;
  s.plane = height * width;
  s.cpg = in_channels / offset_groups;
  s.cg = in_channels / groups;
  s.mult = out_channels / groups;
  return s;
}

// The kernels' shared parameter tail, in KERNEL_PARAMETERS order.
#define CUPYDCN_DEPTHWISE_SIZE_PARAMETERS                                                          \
  I batch, I in_channels, I height, I width, I out_channels, I groups, I offset_groups,            \
      I kernel_h, I kernel_w, I stride_h, I stride_w, I pad_h, I pad_w, I dil_h, I dil_w, I out_h, \
      I out_w, I padding_mode
#define CUPYDCN_DEPTHWISE_SIZES                                                                   \
  depthwise_sizes<I, KH, KW>(batch, in_channels, height, width, out_channels, groups,             \
                             offset_groups, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, \
                             dil_h, dil_w, out_h, out_w, padding_mode)

// The located sampling point of tap k = i * kw + j at output pixel (oy, ox), from
// offset_pixel = offset[b, g*2K, pix] (docs/semantics.md §1.3; the sum decides the cell,
// so it is rounded explicitly, rounding.cuh).
template <typename T, typename I>
__device__ __forceinline__ BilinearPoint<acc_t<T>, I> depthwise_point(const T* offset_pixel, I k,
                                                                      I i, I j, I oy, I ox,
                                                                      const DepthwiseSizes<I>& s) {
  using A = acc_t<T>;
  const A dy = to_acc(offset_pixel[(2 * k) * s.out_size]);
  const A dx = to_acc(offset_pixel[(2 * k + 1) * s.out_size]);
  const A y = add_rn(static_cast<A>(oy * s.stride_h - s.pad_h + i * s.dil_h), dy);
  const A x = add_rn(static_cast<A>(ox * s.stride_w - s.pad_w + j * s.dil_w), dx);
  return bilinear_point<A, I>(y, x, s.height, s.width, s.mode);
}

// A column value mask * sample as the generic path holds it: rounded once to the element
// type (docs/semantics.md §6.1; exact for float and double).
template <typename T>
__device__ __forceinline__ acc_t<T> column_value(acc_t<T> masked_sample) {
  return to_acc(from_acc<T>(masked_sample));
}

// The mask of tap k at mask_pixel = mask[b, g*K, pix] (1 without a mask).
template <typename T, typename I>
__device__ __forceinline__ acc_t<T> depthwise_mask(const T* mask_pixel, I k, I out_size) {
  using A = acc_t<T>;
  return mask_pixel == nullptr ? A(1) : to_acc(mask_pixel[k * out_size]);
}

// The value of a plane at a located point (bilinear_sample's rule: NaN for a NaN point,
// 0 without an in-map corner, else the blend).
template <typename A, typename T, typename I>
__device__ __forceinline__ A sample_at(const T* plane, const BilinearPoint<A, I>& p, I width) {
  if (p.is_nan) return p.y + p.x;
  if (!p.any_in) return A(0);
  return blend(corner_values<A, T, I>(plane, p, width), p);
}

// grad_plane[q] += G(q, p') * grad over the in-map corners q of a located point, in
// bilinear_scatter_to's order (atomically, in A).
template <typename A, typename I>
__device__ __forceinline__ void scatter_at(A* grad_plane, const BilinearPoint<A, I>& p, I width,
                                           A grad) {
  if (p.is_nan || !p.any_in) return;
  const A hy = A(1) - p.ly, hx = A(1) - p.lx;
  const I row0 = p.y0 * width, row1 = row0 + width;
  if (p.y0_in && p.x0_in) atomic_accumulate(grad_plane + row0 + p.x0, hy * hx * grad);
  if (p.y0_in && p.x1_in) atomic_accumulate(grad_plane + row0 + p.x0 + 1, hy * p.lx * grad);
  if (p.y1_in && p.x0_in) atomic_accumulate(grad_plane + row1 + p.x0, p.ly * hx * grad);
  if (p.y1_in && p.x1_in) atomic_accumulate(grad_plane + row1 + p.x0 + 1, p.ly * p.lx * grad);
}

// A tap's located point compacted for reuse across the channels of an offset group:
// the cell's top-left element, its fractions, which corners lie in the map, the mask.
enum : unsigned {
  TAP_IN_00 = 1u,
  TAP_IN_01 = 2u,
  TAP_IN_10 = 4u,
  TAP_IN_11 = 8u,
  TAP_NAN = 16u,  // a NaN point: ly holds the NaN the sample returns
};

template <typename A, typename I>
struct CachedTap {
  I corner;  // y0 * width + x0 (an element of the plane when one of its corners is in)
  A ly, lx;
  A mask;
  unsigned flags;
};

template <typename A, typename I>
__device__ __forceinline__ CachedTap<A, I> cache_tap(const BilinearPoint<A, I>& p, I width,
                                                     A mask) {
  CachedTap<A, I> t;
  t.corner = p.y0 * width + p.x0;
  t.ly = p.is_nan ? p.y + p.x : p.ly;
  t.lx = p.lx;
  t.mask = mask;
  t.flags = p.is_nan ? TAP_NAN
                     : ((p.y0_in && p.x0_in) ? TAP_IN_00 : 0u) |
                           ((p.y0_in && p.x1_in) ? TAP_IN_01 : 0u) |
                           ((p.y1_in && p.x0_in) ? TAP_IN_10 : 0u) |
                           ((p.y1_in && p.x1_in) ? TAP_IN_11 : 0u);
  return t;
}

// sample_at for a cached tap: the same corners, the same blend (bilinear.cuh's blend).
template <typename A, typename T, typename I>
__device__ __forceinline__ A cached_sample(const T* plane, const CachedTap<A, I>& t, I width) {
  if (t.flags & TAP_NAN) return t.ly;
  const A v00 = (t.flags & TAP_IN_00) ? to_acc(plane[t.corner]) : A(0);
  const A v01 = (t.flags & TAP_IN_01) ? to_acc(plane[t.corner + 1]) : A(0);
  const A v10 = (t.flags & TAP_IN_10) ? to_acc(plane[t.corner + width]) : A(0);
  const A v11 = (t.flags & TAP_IN_11) ? to_acc(plane[t.corner + width + 1]) : A(0);
  const A hy = A(1) - t.ly, hx = A(1) - t.lx;
  return hy * (hx * v00 + t.lx * v01) + t.ly * (hx * v10 + t.lx * v11);
}

// Output channels of one weight group handled together: they share every column value
// (one sample per channel and tap serves up to this many output channels); a group with
// more output channels is done in chunks of this many.
constexpr int OUTPUTS_PER_PASS = 4;

// The accumulators of one chunk of output channels [j0, j0 + count) of group gr.
template <typename A>
struct OutputChunk {
  A acc[OUTPUTS_PER_PASS];
};

// chunk.acc[u] += weight[o_u, c', k] * column for the chunk's output channels o_u = gr * mult
// + j0 + u (u < count), w = &weight[gr * mult + j0, c', k], stride = cg * K between them.
template <typename A, typename T, typename I>
__device__ __forceinline__ void accumulate_column(OutputChunk<A>& chunk, const T* w, I stride,
                                                  I count, A column) {
#pragma unroll
  for (int u = 0; u < OUTPUTS_PER_PASS; ++u) {
    if (u < count) chunk.acc[u] += to_acc(w[u * stride]) * column;
  }
}

// output[b, o, pix] = sum_{c' < cg, k} weight[o, c', k] * mask_k * input[b, c] sampled at
// tap k, + bias[o], for the output channels o of a run of groups_per_thread consecutive
// weight groups. One thread per (b, run, pix), pixels fastest; each column value is
// sampled once per chunk of OUTPUTS_PER_PASS output channels of its group. With a
// kernel-size specialisation the K located points of the current offset group stay in
// registers, located again only when a channel of another offset group comes.
template <typename T, typename I, int KH, int KW>
__global__ void deform_conv_depthwise_forward(
    const T* __restrict__ input, const T* __restrict__ offset, const T* __restrict__ mask,
    const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ output,
    CUPYDCN_DEPTHWISE_SIZE_PARAMETERS, I groups_per_thread) {
  using A = acc_t<T>;
  constexpr bool SPECIALISED = KH > 0 && KW > 0;
  constexpr int CACHED = SPECIALISED ? KH * KW : 1;
  const DepthwiseSizes<I> s = CUPYDCN_DEPTHWISE_SIZES;
  const I runs = (s.groups + groups_per_thread - 1) / groups_per_thread;
  const I total = s.batch * runs * s.out_size;
  const I weight_stride = s.cg * s.taps;  // between consecutive output channels
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const I pix = index % s.out_size;
    const I run = (index / s.out_size) % runs;
    const I b = index / (s.out_size * runs);
    const I oy = pix / s.out_w, ox = pix % s.out_w;
    const I group_begin = run * groups_per_thread;
    const I group_end =
        group_begin + groups_per_thread < s.groups ? group_begin + groups_per_thread : s.groups;
    CachedTap<A, I> taps[CACHED];
    I cached_group = -1;
    for (I gr = group_begin; gr < group_end; ++gr) {
      for (I j0 = 0; j0 < s.mult; j0 += OUTPUTS_PER_PASS) {
        const I count = s.mult - j0 < OUTPUTS_PER_PASS ? s.mult - j0 : I(OUTPUTS_PER_PASS);
        const I o0 = gr * s.mult + j0;
        OutputChunk<A> chunk;
#pragma unroll
        for (int u = 0; u < OUTPUTS_PER_PASS; ++u) chunk.acc[u] = A(0);
        for (I cp = 0; cp < s.cg; ++cp) {
          const I c = gr * s.cg + cp;
          const I g = c / s.cpg;
          const I base =
              (b * s.offset_groups + g) * s.taps * s.out_size + pix;  // mask[b, g*K, pix]
          const T* offset_pixel = offset + 2 * base - pix;            // offset[b, g*2K, pix]
          const T* mask_pixel = mask == nullptr ? nullptr : mask + base;
          const T* plane = input + (b * s.channels + c) * s.plane;
          const T* w = weight + (o0 * s.cg + cp) * s.taps;
          if constexpr (SPECIALISED) {
            if (g != cached_group) {
#pragma unroll
              for (int i = 0; i < KH; ++i) {
#pragma unroll
                for (int jj = 0; jj < KW; ++jj) {
                  const int k = i * KW + jj;
                  taps[k] = cache_tap<A, I>(
                      depthwise_point<T, I>(offset_pixel, I(k), I(i), I(jj), oy, ox, s), s.width,
                      depthwise_mask<T, I>(mask_pixel, I(k), s.out_size));
                }
              }
              cached_group = g;
            }
#pragma unroll
            for (int k = 0; k < CACHED; ++k) {
              const A column =
                  column_value<T>(cached_sample<A, T, I>(plane, taps[k], s.width) * taps[k].mask);
              accumulate_column<A, T, I>(chunk, w + k, weight_stride, count, column);
            }
          } else {
            for (I i = 0; i < s.kernel_h; ++i) {
              for (I jj = 0; jj < s.kernel_w; ++jj) {
                const I k = i * s.kernel_w + jj;
                const BilinearPoint<A, I> p =
                    depthwise_point<T, I>(offset_pixel, k, i, jj, oy, ox, s);
                const A column = column_value<T>(sample_at<A, T, I>(plane, p, s.width) *
                                                 depthwise_mask<T, I>(mask_pixel, k, s.out_size));
                accumulate_column<A, T, I>(chunk, w + k, weight_stride, count, column);
              }
            }
          }
        }
#pragma unroll
        for (int u = 0; u < OUTPUTS_PER_PASS; ++u) {
          if (u < count) {
            const I o = o0 + u;
            const A value = bias != nullptr ? chunk.acc[u] + to_acc(bias[o]) : chunk.acc[u];
            output[(b * s.out_channels + o) * s.out_size + pix] = from_acc<T>(value);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- block-cooperative parts

// Warps per block of the backward kernels (blocks of up to 256 threads, the host's size).
constexpr int DEPTHWISE_MAX_WARPS = 8;
constexpr unsigned FULL_WARP = 0xFFFFFFFFu;

// Blocks of 256 threads per multiprocessor the input / offset / mask gradient kernel is
// built for: 4 (64 registers a thread, 32 warps) for the 32-bit float types with 32-bit
// indices, which fit without spilling on every target; double and 64-bit indices keep
// ptxas's choice. (The weight kernel's 3 x 3 version needs a few more: 3 blocks.)
template <typename T, typename I>
constexpr int depthwise_min_blocks() {
  return sizeof(acc_t<T>) == 4 && sizeof(I) == 4 ? 4 : 1;
}

// The sum over the block of each of the N values of every thread, in thread 0's values
// (the other threads' values are left partial): a shuffle tree within each warp, then warp
// 0 over the warps' sums through `partials`. The tree is fixed, so the result does not
// depend on the order in which threads run. Every thread of the block must call it
// (blockDim.x a multiple of 32, at most 32 * DEPTHWISE_MAX_WARPS).
template <typename A, int N>
__device__ __forceinline__ void block_sum(A (&v)[N], A (&partials)[DEPTHWISE_MAX_WARPS][N]) {
  const unsigned lane = threadIdx.x % 32u, warp = threadIdx.x / 32u;
  const unsigned warps = blockDim.x / 32u;
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int delta = 16; delta > 0; delta /= 2) v[n] += __shfl_down_sync(FULL_WARP, v[n], delta);
  }
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) partials[warp][n] = v[n];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      v[n] = lane < warps ? partials[lane][n] : A(0);
#pragma unroll
      for (int delta = DEPTHWISE_MAX_WARPS / 2; delta > 0; delta /= 2) {
        v[n] += __shfl_down_sync(FULL_WARP, v[n], delta);
      }
    }
  }
  __syncthreads();  // partials may be written again by the caller's next round
}

// The input, offset and mask gradients. A block item is (b, g, k, a tile of pixels); the
// block's warps are channel_slices slices x tiles of 32 consecutive pixels (warp w: slice
// w % channel_slices, tile w / channel_slices). Each thread locates its pixel's point of
// tap k once and goes through the channels c = g * cpg + slice, + channel_slices, ... of
// offset group g, with the column gradient gc = sum_j weight[o, c', k] * grad_output[b, o,
// pix] (o = gr * mult + j) formed on the fly. Per channel:
//   grad_input[b, c]          += mask * gc spread bilinearly over the point's corners (atomics)
// and, summed over the channels of the group (the slices' sums added in slice order
// through shared memory: written once, no atomics),
//   grad_offset[b, g*2K + 2k (+1), pix] = mask * slope * sum_c gc * d sample_c / dy (dx)
//   grad_mask[b, g*K + k, pix]          = sum_c gc * sample_c
// Any of the three outputs may be nullptr when not wanted. channel_slices divides the
// block's warps (blockDim.x / 32 <= DEPTHWISE_MAX_WARPS); any grid.
template <typename T, typename I, int KH, int KW>
__launch_bounds__(256, depthwise_min_blocks<T, I>()) __global__
    void deform_conv_depthwise_backward_data(
        const T* __restrict__ grad_output, const T* __restrict__ input,
        const T* __restrict__ offset, const T* __restrict__ mask, const T* __restrict__ weight,
        acc_t<T>* __restrict__ grad_input, T* __restrict__ grad_offset, T* __restrict__ grad_mask,
        CUPYDCN_DEPTHWISE_SIZE_PARAMETERS, I channel_slices) {
  using A = acc_t<T>;
  __shared__ A partials[3][DEPTHWISE_MAX_WARPS][32];
  const DepthwiseSizes<I> s = CUPYDCN_DEPTHWISE_SIZES;
  const I lane = static_cast<I>(threadIdx.x % 32u), warp = static_cast<I>(threadIdx.x / 32u);
  const I slice = warp % channel_slices, tile = warp / channel_slices;
  const I tile_pixels = 32 * (static_cast<I>(blockDim.x / 32u) / channel_slices);
  const I pixel_tiles = (s.out_size + tile_pixels - 1) / tile_pixels;
  const I block_items = s.batch * s.offset_groups * s.taps * pixel_tiles;
  const bool want_coord = grad_offset != nullptr || grad_mask != nullptr;
  for (I item = blockIdx.x; item < block_items; item += gridDim.x) {
    const I pixel_tile = item % pixel_tiles;
    const I k = (item / pixel_tiles) % s.taps;
    const I bg = item / (pixel_tiles * s.taps);  // b * G + g
    const I g = bg % s.offset_groups;
    const I b = bg / s.offset_groups;
    const I pix = pixel_tile * tile_pixels + tile * 32 + lane;
    const bool active = pix < s.out_size;
    const I base = bg * s.taps * s.out_size + pix;  // mask[b, g*K, pix]
    A sum_dy = A(0), sum_dx = A(0), sum_value = A(0);
    BilinearPoint<A, I> p;
    A m = A(0);
    if (active) {
      p = depthwise_point<T, I>(offset + 2 * base - pix, k, k / s.kernel_w, k % s.kernel_w,
                                pix / s.out_w, pix % s.out_w, s);
      m = depthwise_mask<T, I>(mask == nullptr ? nullptr : mask + base, k, s.out_size);
      const I c_end = (g + 1) * s.cpg;
      for (I c = g * s.cpg + slice; c < c_end; c += channel_slices) {
        const I gr = c / s.cg;
        const I cp = c - gr * s.cg;
        A gc = A(0);
        for (I j = 0; j < s.mult; ++j) {
          const I o = gr * s.mult + j;
          gc += to_acc(weight[(o * s.cg + cp) * s.taps + k]) *
                to_acc(grad_output[(b * s.out_channels + o) * s.out_size + pix]);
        }
        const I plane = (b * s.channels + c) * s.plane;
        if (want_coord) {
          const SampleWithGradient<A> v =
              bilinear_sample_with_gradient_at<A, T, I>(input + plane, p, s.width);
          sum_dy += gc * v.d_dy;
          sum_dx += gc * v.d_dx;
          sum_value += gc * v.value;
        }
        if (grad_input != nullptr) scatter_at<A, I>(grad_input + plane, p, s.width, gc * m);
      }
    }
    if (!want_coord) continue;  // block-uniform
    if (channel_slices > 1) {   // block-uniform: add the slices' sums in slice order
      partials[0][warp][lane] = sum_dy;
      partials[1][warp][lane] = sum_dx;
      partials[2][warp][lane] = sum_value;
      __syncthreads();
      if (slice == 0) {
        for (I other = 1; other < channel_slices; ++other) {
          sum_dy += partials[0][warp + other][lane];
          sum_dx += partials[1][warp + other][lane];
          sum_value += partials[2][warp + other][lane];
        }
      }
      __syncthreads();  // partials are written again by the next item
    }
    if (slice == 0 && active) {
      if (grad_offset != nullptr) {             // d/dp = d/dp' * dp'/dp (the padding mode's slope)
        T* out = grad_offset + 2 * base - pix;  // grad_offset[b, g*2K, pix]
        out[(2 * k) * s.out_size] = from_acc<T>(m * (sum_dy * p.slope_y));
        out[(2 * k + 1) * s.out_size] = from_acc<T>(m * (sum_dx * p.slope_x));
      }
      if (grad_mask != nullptr) grad_mask[base + k * s.out_size] = from_acc<T>(sum_value);
    }
  }
}

// grad_weight[o, c', k] = sum_{b, pix} grad_output[b, o, pix] * mask_k * input[b, c] sampled
// at tap k, and grad_bias[o] = sum_{b, pix} grad_output[b, o, pix]. A unit is a chunk of up
// to OUTPUTS_PER_PASS output channels of one group (sharing each sample) for one input
// channel c' and one row of KW taps when the kernel size is a specialisation, one tap
// otherwise; without grad_weight (nullptr) a unit is a chunk of output channels, for
// grad_bias alone. pixel_threads threads (splits = pixel_threads / blockDim.x blocks)
// share a unit: a block item is (unit, split), and its thread t = split * blockDim.x +
// threadIdx.x sums the flattened (b, pix) items t, t + pixel_threads, ... (consecutive
// threads, consecutive pixels). The block's sums are reduced (block_sum) and thread 0 adds
// them to the accumulators: one atomic per block and result element. grad_bias may be
// nullptr. blockDim.x: a multiple of 32 up to 32 * DEPTHWISE_MAX_WARPS dividing
// pixel_threads; any grid.
template <typename T, typename I, int KH, int KW>
__global__ void deform_conv_depthwise_backward_weight(
    const T* __restrict__ grad_output, const T* __restrict__ input, const T* __restrict__ offset,
    const T* __restrict__ mask, acc_t<T>* __restrict__ grad_weight,
    acc_t<T>* __restrict__ grad_bias, CUPYDCN_DEPTHWISE_SIZE_PARAMETERS, I pixel_threads) {
  using A = acc_t<T>;
  constexpr int UNIT_TAPS = (KH > 0 && KW > 0) ? KW : 1;
  constexpr int WEIGHT_SUMS = OUTPUTS_PER_PASS * UNIT_TAPS;
  constexpr int SUMS = WEIGHT_SUMS + OUTPUTS_PER_PASS;  // then the bias sums
  __shared__ A partials[DEPTHWISE_MAX_WARPS][SUMS];
  const DepthwiseSizes<I> s = CUPYDCN_DEPTHWISE_SIZES;
  const I chunks = (s.mult + OUTPUTS_PER_PASS - 1) / OUTPUTS_PER_PASS;  // per group
  const I tap_units = grad_weight != nullptr ? s.taps / I(UNIT_TAPS) : I(1);
  const I channel_units = grad_weight != nullptr ? s.cg : I(1);
  const I units = s.groups * chunks * channel_units * tap_units;
  const I splits = pixel_threads / static_cast<I>(blockDim.x);
  const I items = s.batch * s.out_size;
  const I weight_stride = s.cg * s.taps;
  for (I block_item = blockIdx.x; block_item < units * splits; block_item += gridDim.x) {
    const I unit = block_item / splits;
    const I t =
        (block_item - unit * splits) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
    // unit = ((gr * chunks + chunk) * channel_units + cp) * tap_units + tap unit
    const I k0 = (unit % tap_units) * I(UNIT_TAPS);
    const I cp = (unit / tap_units) % channel_units;
    const I chunk = (unit / (tap_units * channel_units)) % chunks;
    const I gr = unit / (tap_units * channel_units * chunks);
    const I j0 = chunk * OUTPUTS_PER_PASS;
    const I count = s.mult - j0 < OUTPUTS_PER_PASS ? s.mult - j0 : I(OUTPUTS_PER_PASS);
    const I o0 = gr * s.mult + j0;
    const I c = gr * s.cg + cp;
    const I g = c / s.cpg;
    A sums[SUMS];  // [u * UNIT_TAPS + v] weight sums, [WEIGHT_SUMS + u] bias sums
#pragma unroll
    for (int n = 0; n < SUMS; ++n) sums[n] = A(0);
    for (I q = t; q < items; q += pixel_threads) {
      const I pix = q % s.out_size;
      const I b = q / s.out_size;
      const T* go_pixel = grad_output + (b * s.out_channels + o0) * s.out_size + pix;
      A go[OUTPUTS_PER_PASS];
#pragma unroll
      for (int u = 0; u < OUTPUTS_PER_PASS; ++u) {
        go[u] = u < count ? to_acc(go_pixel[u * s.out_size]) : A(0);
        sums[WEIGHT_SUMS + u] += go[u];
      }
      if (grad_weight == nullptr) continue;
      const I base = (b * s.offset_groups + g) * s.taps * s.out_size + pix;  // mask[b, g*K, pix]
      const T* offset_pixel = offset + 2 * base - pix;
      const T* mask_pixel = mask == nullptr ? nullptr : mask + base;
      const T* plane = input + (b * s.channels + c) * s.plane;
      const I oy = pix / s.out_w, ox = pix % s.out_w;
#pragma unroll
      for (int v = 0; v < UNIT_TAPS; ++v) {
        const I k = k0 + v;
        const BilinearPoint<A, I> p =
            depthwise_point<T, I>(offset_pixel, k, k / s.kernel_w, k % s.kernel_w, oy, ox, s);
        const A column = column_value<T>(sample_at<A, T, I>(plane, p, s.width) *
                                         depthwise_mask<T, I>(mask_pixel, k, s.out_size));
#pragma unroll
        for (int u = 0; u < OUTPUTS_PER_PASS; ++u) sums[u * UNIT_TAPS + v] += go[u] * column;
      }
    }
    block_sum<A, SUMS>(sums, partials);
    if (threadIdx.x == 0) {
      const bool with_bias = grad_bias != nullptr && cp == 0 && k0 == 0;
#pragma unroll
      for (int u = 0; u < OUTPUTS_PER_PASS; ++u) {
        if (u >= count) continue;
        if (grad_weight != nullptr) {
          A* out = grad_weight + (o0 + u) * weight_stride + cp * s.taps + k0;
#pragma unroll
          for (int v = 0; v < UNIT_TAPS; ++v) atomic_accumulate(out + v, sums[u * UNIT_TAPS + v]);
        }
        if (with_bias) atomic_accumulate(grad_bias + o0 + u, sums[WEIGHT_SUMS + u]);
      }
    }
  }
}

}  // namespace cupydcn
