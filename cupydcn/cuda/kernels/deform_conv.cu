// Deformable convolution (DCNv1 and modulated DCNv2): sampling kernels around a GEMM.
//
// Device code only; templates over the element type T (double, float, __half,
// __nv_bfloat16), the index type I (int, or long long for tensors past 2^31 elements) and
// the module's specialisation, three compile-time integers (FILE_TEMPLATE_PARAMETERS of
// cupydcn/cuda/kernel_source.py): KH, KW = the kernel size (0, 0: any size, read from the
// arguments) and MODE = the padding mode's PADDING_* code (padding_modes.cuh); see
// specialised_sizes in conv_geometry.cuh. The launch shapes (explicit grids and blocks)
// and the choice of specialisation are cupydcn/deform_conv/cuda_kernels.py's; the
// parameter lists are mirrored in KERNEL_PARAMETERS of kernel_source.py
// (tests/test_nvrtc.py checks them).
//
// Layouts (all C-contiguous; n = images in this chunk, K = kernel_h * kernel_w taps,
// G = offset groups, P = out_h * out_w output pixels, A = acc_t<T>):
//   input        [n, C, H, W]            T
//   offset       [n, G * 2 * K, out_h, out_w]  T, channel g*2K + 2k = dy, + 1 = dx
//   mask         [n, G * K, out_h, out_w] T or nullptr (DCNv1)
//   columns      [n, C * K, S]            T, row c*K + k = mask * input sampled at tap k
//                                           (computed in A, rounded once to T)
//   grad_columns [n, C * K, S]            A, d loss / d columns
// where the columns hold the S = pixel_count output pixels [pixel_start, pixel_start + S)
// of each image (S = P, pixel_start = 0 unless one image's columns exceed the workspace:
// then the backend splits the image into ranges of output pixels). The offset, mask and
// grad_offset / grad_mask tensors are always whole: a launch reads or writes its range.
// The padding_mode argument (a PADDING_* code, in the index type) stays in the parameter
// list shared with the other conv kernels; MODE decides.
//
// Work decomposition. No kernel splits a flat index into (image, channel, tap, pixel) by
// division: blockIdx.z walks images, blockIdx.y channel slabs or (group, tap) pairs (both
// loop past the 65535 limit of those grid dimensions), x the pixels of the range (one
// division per thread for (oy, ox)). The samples of one offset group at one tap and pixel
// share their point, so it is located once and used for every channel of a slab.
// (deform_conv_col2im_input is the grid-stride exception: the fallback of the tiled one.)
#include "accumulate.cuh"
#include "atomics.cuh"
#include "bilinear.cuh"
#include "grid_stride.cuh"
#include "rounding.cuh"

#include "conv_geometry.cuh"

namespace cupydcn {

// Channels per im2col thread (IM2COL_SLAB in cuda_kernels.py).
constexpr int kIm2colSlab = 8;
// Shared memory of the tiled grad_input accumulator (WINDOW_BYTES in cuda_kernels.py).
constexpr int kWindowBytes = 24576;
// Threads per block at most (MAX_THREADS in cuda_kernels.py): the size of
// deform_conv_col2im_coord's reduction buffer. With min_blocks resident blocks per SM it
// is also the register budget of the sampling kernels: 80 registers for float arithmetic
// with 32-bit indices (three blocks of 256 threads per SM), none (255) for double or
// 64-bit indices, which need 100 to 200 on sm_100 / sm_120 and would spill at 128.
constexpr int kMaxThreads = 256;
template <typename T, typename I>
constexpr int min_blocks() {
  return sizeof(I) == 4 && sizeof(acc_t<T>) == 4 ? 3 : 1;
}
// How far the taps of a kernel row are unrolled: all of them up to 3 (1x1, 3x3), else
// none. The rows are a loop (of constant trip count when specialised). Unrolling more
// lets ptxas hoist more taps' loads: 128 and 183 registers for 3x3 and 5x5 im2col with
// everything unrolled on sm_80, spills on sm_100 for 5x5 rows within 80 registers, and
// ten times NVRTC's time for 5x5.
template <int KW>
constexpr int tap_unroll() {
  return KW > 0 && KW <= 3 ? KW : 1;
}

// columns[b, c*K + k, col] = mask[b, g*K + k, pix] * input[b, c] sampled at tap k.
// grid (ceil(S / blockDim.x), slabs, images), block (pixels, slabs): a thread samples its
// pixel for a slab of kIm2colSlab channels of one offset group, tap by tap: the tap's
// offsets and mask loaded together, the point located once, then per channel four corner
// loads and a blend. Stores are coalesced over the pixels of a warp. The taps of a row
// are unrolled as tap_unroll says.
template <typename T, typename I, int KH, int KW, int MODE>
__launch_bounds__(kMaxThreads, min_blocks<T, I>()) __global__
    void deform_conv_im2col(const T* __restrict__ input, const T* __restrict__ offset,
                            const T* __restrict__ mask, T* __restrict__ columns,
                            CUPYDCN_CONV_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const ConvSizes<I> s = specialised_sizes<KH, KW, MODE>(CUPYDCN_CONV_SIZES);
  const I col =
      static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
  if (col >= s.slice_size) return;  // no barriers below
  const OutputPixel<I> px = output_pixel(col, s);
  const I per_group = slabs_per_group(I(kIm2colSlab), s);
  const I slabs = s.offset_groups * per_group;
  const I plane_size = s.height * s.width;
  const I row_step = s.taps * s.slice_size;  // columns row c*K + k to (c + 1)*K + k
  for (I b = blockIdx.z; b < s.batch; b += gridDim.z) {
    for (I slab =
             static_cast<I>(blockIdx.y) * static_cast<I>(blockDim.y) + static_cast<I>(threadIdx.y);
         slab < slabs; slab += static_cast<I>(gridDim.y) * static_cast<I>(blockDim.y)) {
      const ChannelSlab<I> cs = slab_of(slab, per_group, I(kIm2colSlab), s);
      const T* offset_pixel = offset + offset_base(b, cs.g, s) + px.pix;
      const T* mask_at = mask_pixel(mask, b, cs.g, px.pix, s);
      const T* plane = input + plane_base(b, cs.c_begin, s);
      T* column = columns + column_index(b, cs.c_begin, I(0), col, s);
#pragma unroll 1
      for (I i = 0; i < s.kernel_h; ++i) {
#pragma unroll(tap_unroll<KW>())
        for (I j = 0; j < s.kernel_w; ++j) {
          const I tap = i * s.kernel_w + j;
          const TapSample<A, I> t = tap_sample<T, I>(offset_pixel, mask_at, tap, i, j, px, s);
#pragma unroll
          for (int k = 0; k < kIm2colSlab; ++k) {
            if (k < cs.count) {
              const A v = bilinear_sample_at<A, T, I>(plane + k * plane_size, t.p, s.width);
              column[k * row_step + tap * s.slice_size] = from_acc<T>(v * t.m);
            }
          }
        }
      }
    }
  }
}

// grad_input[b, c] += mask * grad_columns[b, c*K + k, pix] spread bilinearly over the
// corners of the tap's (mapped) sampling point. One thread per column element, a
// grid-stride loop, atomics in A: about 4 K global atomics per input element (36 for
// 3x3). The fallback of deform_conv_col2im_input_tiled where its window does not fit
// shared memory. (The deterministic mode's version is deform_conv_deterministic.cu.)
template <typename T, typename I, int KH, int KW, int MODE>
__global__ void deform_conv_col2im_input(const acc_t<T>* __restrict__ grad_columns,
                                         const T* __restrict__ offset, const T* __restrict__ mask,
                                         acc_t<T>* __restrict__ grad_input,
                                         CUPYDCN_CONV_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const ConvSizes<I> s = specialised_sizes<KH, KW, MODE>(CUPYDCN_CONV_SIZES);
  const I total = s.batch * s.channels * s.taps * s.slice_size;
  AtomicSink<A> sink{grad_input};
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    col2im_input_item<T, I>(index, grad_columns, offset, mask, s, sink);
  }
}

// The rectangle of input elements a tile of output pixels scatters into when its offsets
// stay within `halo` pixels: rows [y0, y0 + rows), columns [x0, x0 + cols), clipped to
// the map (empty: rows = cols = 0). For output rows oy0..oy1 the undeformed points of the
// taps span rows r_lo = oy0 * stride_h - pad_h to r_hi = oy1 * stride_h - pad_h +
// (kernel_h - 1) * dil_h, so points within halo of them have their corners in
// [r_lo - halo, r_hi + halo + 1]; columns likewise. Unclipped that is
// (tile_h - 1) * stride_h + (kernel_h - 1) * dil_h + 2 * halo + 2 rows, the extent
// cuda_kernels.py sizes the slab by.
template <typename I>
struct Window {
  I y0, x0, rows, cols, area;
};

template <typename I>
__device__ __forceinline__ Window<I> scatter_window(I oy0, I ox0, I tile_h, I tile_w, I halo,
                                                    const ConvSizes<I>& s) {
  const I oy1 = min(oy0 + tile_h, s.out_h) - 1, ox1 = min(ox0 + tile_w, s.out_w) - 1;
  const I y_lo = oy0 * s.stride_h - s.pad_h - halo;
  const I y_hi = oy1 * s.stride_h - s.pad_h + (s.kernel_h - 1) * s.dil_h + halo + 1;
  const I x_lo = ox0 * s.stride_w - s.pad_w - halo;
  const I x_hi = ox1 * s.stride_w - s.pad_w + (s.kernel_w - 1) * s.dil_w + halo + 1;
  Window<I> w;
  w.y0 = max(y_lo, I(0));
  w.x0 = max(x_lo, I(0));
  w.rows = max(min(y_hi + 1, s.height) - w.y0, I(0));
  w.cols = max(min(x_hi + 1, s.width) - w.x0, I(0));
  w.area = w.rows * w.cols;
  return w;
}

// Where the four corners (00, 01, 10, 11) of a located point go: weight[q] (the products
// of bilinear_scatter_to, so each contribution rounds as there), element[q] the corner's
// index in the plane or -1 outside the map, slot[q] its index in the window or -1 outside
// it (the window lies in the map: a slot implies an element).
template <typename A, typename I>
struct CornerTargets {
  A weight[4];
  I element[4];
  int slot[4];  // < kWindowBytes
};

template <typename A, typename I>
__device__ __forceinline__ CornerTargets<A, I> corner_targets(const BilinearPoint<A, I>& p,
                                                              const Window<I>& w, I width) {
  CornerTargets<A, I> c;
  const A hy = A(1) - p.ly, hx = A(1) - p.lx;
  c.weight[0] = hy * hx;
  c.weight[1] = hy * p.lx;
  c.weight[2] = p.ly * hx;
  c.weight[3] = p.ly * p.lx;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const I y = p.y0 + (q >> 1), x = p.x0 + (q & 1);
    const bool in_map = ((q >> 1) ? p.y1_in : p.y0_in) && ((q & 1) ? p.x1_in : p.x0_in);
    const I r = y - w.y0, cc = x - w.x0;
    c.element[q] = in_map ? y * width + x : I(-1);
    c.slot[q] = (in_map && r >= 0 && r < w.rows && cc >= 0 && cc < w.cols)
                    ? static_cast<int>(r * w.cols + cc)
                    : -1;
  }
  return c;
}

// grad_input as deform_conv_col2im_input computes it, privatised in shared memory.
// grid (tiles, slabs, images), block (tile_w, tile_h): a block owns a tile of tile_h x
// tile_w output pixels of one image (rows from the range's first row on; threads whose
// pixel lies outside the range or the map only help with the window) and a slab of
// channel_slab channels of one offset group (ragged at the group's end). Its
// contributions mostly fall in the tile's input footprint widened by `halo`
// (scatter_window), held for the slab's channels in a shared A accumulator: they are
// added there with shared atomics, the rest (points more than halo beyond the footprint)
// go straight to global atomics; after a barrier the window's nonzero entries are flushed
// with one global atomic each and zeroed for the next slab. The host sizes channel_slab
// * window area to fit kWindowBytes; should it not, the window is left empty and every
// contribution goes to global memory (correct, slow).
// Contention left: shared atomics, 4 per column element (4 K per input element, among the
// threads of a block, on the SM); global atomics, per input element and channel, one per
// block whose window holds it: for 3x3, stride 1, tiles of 8 x 32 and offsets within the
// halo about (8 + 3)(32 + 3) / (8 * 32) = 1.5 where the grid-stride kernel issues 36.
template <typename T, typename I, int KH, int KW, int MODE>
__launch_bounds__(kMaxThreads, min_blocks<T, I>()) __global__
    void deform_conv_col2im_input_tiled(const acc_t<T>* __restrict__ grad_columns,
                                        const T* __restrict__ offset, const T* __restrict__ mask,
                                        acc_t<T>* __restrict__ grad_input,
                                        CUPYDCN_CONV_SIZE_PARAMETERS, I channel_slab, I halo) {
  using A = acc_t<T>;
  constexpr int capacity = kWindowBytes / static_cast<int>(sizeof(A));
  __shared__ A accumulator[capacity];
  const ConvSizes<I> s = specialised_sizes<KH, KW, MODE>(CUPYDCN_CONV_SIZES);
  const I tile_w = blockDim.x, tile_h = blockDim.y;
  const I tx = threadIdx.x, ty = threadIdx.y;
  const I threads = tile_w * tile_h, thread = ty * tile_w + tx;
  const I tiles_x = ceil_div(s.out_w, tile_w);
  const I tile_row = static_cast<I>(blockIdx.x) / tiles_x;
  const I oy0 = s.slice_start / s.out_w + tile_row * tile_h;
  const I ox0 = (static_cast<I>(blockIdx.x) - tile_row * tiles_x) * tile_w;
  // This thread's pixel, and whether it is in the map and the range.
  const I ox = ox0 + tx, pix = (oy0 + ty) * s.out_w + ox;
  const bool active = ox < s.out_w && pix >= s.slice_start && pix < s.slice_start + s.slice_size;
  const OutputPixel<I> px = output_pixel(active ? pix - s.slice_start : I(0), s);

  Window<I> w = scatter_window(oy0, ox0, tile_h, tile_w, halo, s);
  if (channel_slab * w.area > I(capacity)) w.rows = w.cols = w.area = 0;
  for (I e = thread; e < channel_slab * w.area; e += threads) accumulator[e] = A(0);
  __syncthreads();

  const I per_group = slabs_per_group(channel_slab, s);
  const I slabs = s.offset_groups * per_group;
  const I plane_size = s.height * s.width;
  const I row_step = s.taps * s.slice_size;
  for (I b = blockIdx.z; b < s.batch; b += gridDim.z) {
    for (I slab = blockIdx.y; slab < slabs; slab += gridDim.y) {  // uniform: barriers inside
      const ChannelSlab<I> cs = slab_of(slab, per_group, channel_slab, s);
      A* planes = grad_input + plane_base(b, cs.c_begin, s);
      if (active) {
        const T* offset_pixel = offset + offset_base(b, cs.g, s) + px.pix;
        const T* mask_at = mask_pixel(mask, b, cs.g, px.pix, s);
        const A* grad_pixel = grad_columns + column_index(b, cs.c_begin, I(0), px.col, s);
#pragma unroll 1
        for (I i = 0; i < s.kernel_h; ++i) {
#pragma unroll(tap_unroll<KW>())
          for (I j = 0; j < s.kernel_w; ++j) {
            const I tap = i * s.kernel_w + j;
            const TapSample<A, I> t = tap_sample<T, I>(offset_pixel, mask_at, tap, i, j, px, s);
            if (t.p.is_nan || !t.p.any_in) continue;
            const CornerTargets<A, I> ct = corner_targets(t.p, w, s.width);
            const A* grad_tap = grad_pixel + tap * s.slice_size;
            for (I k = 0; k < cs.count; ++k) {
              const A grad = grad_tap[k * row_step] * t.m;
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                if (ct.element[q] < 0) continue;
                const A v = ct.weight[q] * grad;
                if (ct.slot[q] >= 0) {
                  atomic_accumulate(accumulator + (k * w.area + ct.slot[q]), v);
                } else {
                  atomic_accumulate(planes + (k * plane_size + ct.element[q]), v);
                }
              }
            }
          }
        }
      }
      __syncthreads();
      if (w.area > 0) {
        for (I k = 0; k < cs.count; ++k) {
          A* window = accumulator + k * w.area;
          A* target = planes + (k * plane_size + w.y0 * s.width + w.x0);
          for (I r = ty; r < w.rows; r += tile_h) {
            for (I c = tx; c < w.cols; c += tile_w) {
              const A v = window[r * w.cols + c];
              if (v != A(0)) atomic_accumulate(target + (r * s.width + c), v);
              window[r * w.cols + c] = A(0);
            }
          }
        }
      }
      __syncthreads();
    }
  }
}

// For each (b, g, k, pix): with s_c = input[b, c] sampled at the tap's (mapped) point and
// g_c = grad_columns[b, c*K + k, pix], summed over the channels c of offset group g,
//   grad_offset[b, g*2K + 2k (+1), pix] = mask * sum_c g_c * d s_c / dy (dx)
//   grad_mask[b, g*K + k, pix]          = sum_c g_c * s_c
// grid (ceil(S / blockDim.x), G * K, images), block (pixels, channel split): the (group,
// tap) of a block is blockIdx.y (a constant division by K when specialised). The point is
// located once; the channel loop reads one grad_columns row and four corners per channel.
// With blockDim.y > 1 (few pixels, many channels) the threads of a column split the
// channels (c = threadIdx.y + blockDim.y * m) and their sums are added in shared memory
// in a fixed order. No atomics: each output is written by one thread.
// Either output pointer may be nullptr when that gradient is not wanted.
template <typename T, typename I, int KH, int KW, int MODE>
__launch_bounds__(kMaxThreads, min_blocks<T, I>()) __global__
    void deform_conv_col2im_coord(const acc_t<T>* __restrict__ grad_columns,
                                  const T* __restrict__ input, const T* __restrict__ offset,
                                  const T* __restrict__ mask, T* __restrict__ grad_offset,
                                  T* __restrict__ grad_mask, CUPYDCN_CONV_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  __shared__ A partial[3 * kMaxThreads];
  const ConvSizes<I> s = specialised_sizes<KH, KW, MODE>(CUPYDCN_CONV_SIZES);
  const I col =
      static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
  const bool active = col < s.slice_size;
  const OutputPixel<I> px = output_pixel(active ? col : I(0), s);
  const I split = blockDim.y, lane = threadIdx.y;
  const I me = lane * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
  const I units = s.offset_groups * s.taps;
  const I plane_size = s.height * s.width;
  const I row_step = s.taps * s.slice_size;
  for (I b = blockIdx.z; b < s.batch; b += gridDim.z) {
    for (I unit = blockIdx.y; unit < units; unit += gridDim.y) {  // uniform: barriers inside
      const I g = unit / s.taps, tap = unit - g * s.taps;
      const I i = tap / s.kernel_w, j = tap - i * s.kernel_w;
      A sum_dy = A(0), sum_dx = A(0), sum_value = A(0);
      TapSample<A, I> t{};
      if (active) {
        t = tap_sample<T, I>(offset + offset_base(b, g, s) + px.pix,
                             mask_pixel(mask, b, g, px.pix, s), tap, i, j, px, s);
        const I c_begin = g * s.channels_per_group;
        const A* grad_tap = grad_columns + column_index(b, c_begin, tap, col, s);
        const T* plane = input + plane_base(b, c_begin, s);
#pragma unroll 4
        for (I c = lane; c < s.channels_per_group; c += split) {
          const A grad = grad_tap[c * row_step];
          const SampleWithGradient<A> v =
              bilinear_sample_with_gradient_at<A, T, I>(plane + c * plane_size, t.p, s.width);
          sum_dy += grad * v.d_dy;
          sum_dx += grad * v.d_dx;
          sum_value += grad * v.value;
        }
      }
      if (split > 1) {  // uniform
        partial[me] = sum_dy;
        partial[kMaxThreads + me] = sum_dx;
        partial[2 * kMaxThreads + me] = sum_value;
        __syncthreads();
        if (lane == 0) {
          for (I l = 1; l < split; ++l) {
            const I other = me + l * static_cast<I>(blockDim.x);
            sum_dy += partial[other];
            sum_dx += partial[kMaxThreads + other];
            sum_value += partial[2 * kMaxThreads + other];
          }
        }
        __syncthreads();
      }
      if (active && lane == 0) {
        if (grad_offset != nullptr) {  // d/dp = d/dp' * dp'/dp (the padding mode's slope)
          T* out = grad_offset + offset_base(b, g, s) + px.pix;
          out[(2 * tap) * s.out_size] = from_acc<T>(t.m * (sum_dy * t.p.slope_y));
          out[(2 * tap + 1) * s.out_size] = from_acc<T>(t.m * (sum_dx * t.p.slope_x));
        }
        if (grad_mask != nullptr) {
          grad_mask[mask_base(b, g, s) + tap * s.out_size + px.pix] = from_acc<T>(sum_value);
        }
      }
    }
  }
}

}  // namespace cupydcn
