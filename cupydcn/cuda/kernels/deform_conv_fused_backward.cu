// Fused data gradient of deform_conv2d for the half types on tensor cores (sm_80+):
// grad_input, grad_offset and grad_mask with no grad_columns buffer in memory.
//
// Device code only; templates over the element type T and the index type I (int, or long
// long past 2^31 elements). The kernel does its work for T = __half and __nv_bfloat16 on
// sm_80 and later (and in the host emulation); for float and double, and below sm_80, it
// compiles to an empty body (cupydcn/deform_conv/fused_backward_cuda.py never launches it
// there). Launch shape, tile constants and the applicability rule are
// fused_backward_cuda.py's; the parameter list is mirrored in KERNEL_PARAMETERS of
// cupydcn/cuda/kernel_source.py.
//
// Notation (A = acc_t<T> = float): C input channels in `groups` weight groups of cg = C /
// groups channels, Co output channels, M = Co / groups per weight group; G offset groups
// of cpg = C / G channels (offset and weight groups are independent: an offset group may
// straddle weight groups and the other way round); K = kh * kw taps, tap = i * kw + j;
// P = out_h * out_w. Layouts, C-contiguous:
//   grad_output  [N, Co, out_h, out_w]     T
//   input        [N, C, H, W]              T
//   offset       [N, G * 2K, out_h, out_w] T, channel g*2K + 2k = dy, + 1 = dx
//   mask         [N, G * K, out_h, out_w]  T, or nullptr (DCNv1)
//   weight       [Co, cg, kh, kw]          T
//   grad_input   [N, C, H, W]              A, accumulated into with float atomics, or nullptr
//   grad_offset  like offset, T, or nullptr (not wanted): written once, no atomics
//   grad_mask    like mask, T, or nullptr (not wanted, or DCNv1): written once
//
// The column path's grad_columns (docs/semantics.md §3, §6) are, per weight group g,
//   gc[(c, tap), p] = sum_o weight[g*M + o, c, tap] * grad_output[b, g*M + o, p]
// in float32: here an MMA (mma.m16n8k16, float32 accumulators; the products of two half
// values are exact in float32) whose tiles are spent at once, exactly as
// deform_conv_col2im_input (the corners' weights times mask * gc, float atomics) and
// deform_conv_col2im_coord (per pixel, tap and offset group, the sums over the group's
// channels of gc * d sample / d p' and gc * sample; grad_offset = mask * sum * slope,
// grad_mask = sum, rounded once to T) spend grad_columns. Only the order of the float32
// additions differs (the MMA's reduction over o, the coordinate sums' channel order).
//
// Work decomposition. A block owns one image b, one tap and kFusedBwdTileN = 64
// consecutive output pixels (grid x: pixel tiles, y: taps, z: images; y and z loop past
// 65535) and walks ALL C channels, offset group by offset group, so that it alone forms
// the sums of every (pixel, tap, offset group) it owns: grad_offset and grad_mask are
// written once, in T, without atomics, in an order fixed by the code (bitwise
// reproducible). The channels of an offset group are cut where a weight group ends and
// into chunks of kFusedBwdTileM = 32 channels; per chunk:
//   * gc (32 channels x 64 pixels) = weight^T (32 x M) @ grad_output (M x 64), in steps of
//     kFusedBwdTileK = 32 output channels: the weight tile [channel][o] and the
//     grad_output tile [pixel][o] are loaded into shared memory as o pairs (zero past M,
//     past the chunk's channels and past P), one barrier, then 8 warps, 2 (channels) x 4
//     (pixels) of 16 x 16, each 2 k-slices x 2 mma.m16n8k16 with fragments read from
//     shared memory by 32-bit loads; double-buffered, so a step's loads overlap the
//     previous step's MMAs (one barrier per step);
//   * the accumulators are staged in shared memory (float, 32 x 64), one barrier, then
//     each thread takes one pixel (tid % 64) and 8 channels (tid / 64): per channel the
//     sample with its gradient at the pixel's point (located once per offset group:
//     tap_sample), the three coordinate sums, and the 4 corner atomics of grad_input;
//   * at the end of an offset group the 4 threads of a pixel add their sums in a fixed
//     order through shared memory and one of them writes grad_offset and grad_mask.
// Shared memory (static): 2 x 2560 (weight tiles) + 2 x 5120 (grad_output tiles) + 8704
// (gc stage) + 3072 (coordinate partials) = 27136 bytes.
#include "accumulate.cuh"
#include "atomics.cuh"
#include "bilinear.cuh"
#include "conv_geometry.cuh"
#include "tensor_core.cuh"

// The tensor-core code is built for sm_80 and later (and by the host emulation).
#if defined(CUPYDCN_HOST_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define CUPYDCN_FUSED_BWD_TENSOR_CORES 1
#else
#define CUPYDCN_FUSED_BWD_TENSOR_CORES 0
#endif

namespace cupydcn {

// Threads per block (THREADS in fused_backward_cuda.py): 8 warps. 2 resident blocks per
// SM with 32-bit indices (128 registers), 1 (255) with 64-bit ones.
constexpr int kFusedBwdThreads = 256;
template <typename I>
constexpr int fused_bwd_min_blocks() {
  return sizeof(I) == 4 ? 2 : 1;
}

template <typename T>
struct FusedBwdHalf {
  static constexpr bool value = false;
};
template <>
struct FusedBwdHalf<__half> {
  static constexpr bool value = true;
};
template <>
struct FusedBwdHalf<__nv_bfloat16> {
  static constexpr bool value = true;
};

// The sizes of a launch, by ConvGeometry's names (as deform_conv_fused.cu's).
#define CUPYDCN_FUSED_BWD_SIZE_PARAMETERS                                                          \
  I batch, I in_channels, I height, I width, I out_channels, I groups, I offset_groups,            \
      I kernel_h, I kernel_w, I stride_h, I stride_w, I pad_h, I pad_w, I dil_h, I dil_w, I out_h, \
      I out_w, I padding_mode

#if CUPYDCN_FUSED_BWD_TENSOR_CORES

// Tile constants (mirrored in cupydcn/deform_conv/fused_backward_cuda.py).
constexpr int kFusedBwdTileM = 32;                                 // channels per chunk
constexpr int kFusedBwdTileN = 64;                                 // pixels per block
constexpr int kFusedBwdTileK = 32;                                 // output channels per MMA step
constexpr int kFusedBwdRowWords = kFusedBwdTileK / 2 + 4;          // a staged row: 16 o pairs + 4
constexpr int kFusedBwdStageWords = kFusedBwdTileN + 4;            // a gc row: 64 floats + 4
constexpr int kFusedBwdLanes = kFusedBwdThreads / kFusedBwdTileN;  // threads per pixel: 4
constexpr int kFusedBwdPerLane = kFusedBwdTileM / kFusedBwdLanes;  // channels each: 8
static_assert(kFusedBwdThreads == 8 * 32 && kFusedBwdTileM == 2 * 16 && kFusedBwdTileN == 4 * 16,
              "8 warps, 2 (channels) x 4 (pixels), of 16 x 16");
static_assert(kFusedBwdPerLane * kFusedBwdLanes == kFusedBwdTileM,
              "the 4 threads of a pixel spend 8 channels each");

struct FusedBwdShared {
  unsigned a[2][kFusedBwdTileM][kFusedBwdRowWords];  // weight^T tiles [channel][o pair]
  unsigned b[2][kFusedBwdTileN][kFusedBwdRowWords];  // grad_output tiles [pixel][o pair]
  float gc[kFusedBwdTileM][kFusedBwdStageWords];     // the chunk's grad_columns
  float partial[3][kFusedBwdLanes][kFusedBwdTileN];  // coordinate sums by lane
};
static_assert(sizeof(FusedBwdShared) == 27136, "fused_backward_cuda.SHARED_BYTES");

// The block's work in one chunk: channels [c0, c0 + count) of weight group g (c0 within
// the group), pixels [pix0, pix0 + 64) of image b, tap `tap`.
template <typename T, typename I>
struct FusedBwdChunk {
  const T* grad_output;
  const T* weight;
  const ConvSizes<I>& s;
  I mult, cg, out_channels;
  I b, g, c0, count, tap, pix0;
  int tid;

  // The weight tile of o0: a[row][w] = (weight[g*M + o0 + 2w, c0 + row, tap], o + 1).
  __device__ __forceinline__ void load_weight(I o0, unsigned (*a)[kFusedBwdRowWords]) const {
    const T zero = from_acc<T>(0.0f);
#pragma unroll
    for (int u = 0; u < kFusedBwdTileM * (kFusedBwdTileK / 2) / kFusedBwdThreads; ++u) {
      const int e = tid + u * kFusedBwdThreads;
      const int row = e % kFusedBwdTileM, w = e / kFusedBwdTileM;
      const I o = o0 + 2 * w;
      T v[2] = {zero, zero};
      if (row < count) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (o + h < mult) { v[h] = weight[((g * mult + o + h) * cg + c0 + row) * s.taps + tap]; }
        }
      }
      a[row][w] = tc::pack_half2<T>(v[0], v[1]);
    }
  }

  // The grad_output tile of o0: b[p][w] = (grad_output[b, g*M + o0 + 2w, pix0 + p], o + 1).
  __device__ __forceinline__ void load_grad_output(I o0, unsigned (*bt)[kFusedBwdRowWords]) const {
    const T zero = from_acc<T>(0.0f);
    const I P = s.out_size;
#pragma unroll
    for (int u = 0; u < kFusedBwdTileN * (kFusedBwdTileK / 2) / kFusedBwdThreads; ++u) {
      const int e = tid + u * kFusedBwdThreads;
      const int p = e % kFusedBwdTileN, w = e / kFusedBwdTileN;
      const I o = o0 + 2 * w, pix = pix0 + p;
      T v[2] = {zero, zero};
      if (pix < P) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (o + h < mult) { v[h] = grad_output[(b * out_channels + g * mult + o + h) * P + pix]; }
        }
      }
      bt[p][w] = tc::pack_half2<T>(v[0], v[1]);
    }
  }
};

// acc[ni] += A (rows m0 .. m0 + 16) @ B (pixels n0 + 8 ni .. + 8) over the staged 32 o.
// Fragments (tensor_core.cuh) read as words: A[g][2t, 2t+1] = a[m0 + g][t] and so on.
template <typename T>
__device__ __forceinline__ void fused_bwd_warp_mma(tc::FragC (&acc)[2],
                                                   const unsigned (*a)[kFusedBwdRowWords],
                                                   const unsigned (*b)[kFusedBwdRowWords], int m0,
                                                   int n0, int lane) {
  const int gq = lane >> 2, t = lane & 3;
#pragma unroll
  for (int ks = 0; ks < kFusedBwdTileK / 16; ++ks) {
    const int kw = ks * 8;
    tc::FragA16 fa;
    fa.x[0] = a[m0 + gq][kw + t];
    fa.x[1] = a[m0 + gq + 8][kw + t];
    fa.x[2] = a[m0 + gq][kw + 4 + t];
    fa.x[3] = a[m0 + gq + 8][kw + 4 + t];
#pragma unroll
    for (int ni = 0; ni < 2; ++ni) {
      tc::FragB16 fb;
      fb.x[0] = b[n0 + 8 * ni + gq][kw + t];
      fb.x[1] = b[n0 + 8 * ni + gq][kw + 4 + t];
      tc::mma_m16n8k16<T>(acc[ni], fa, fb, acc[ni]);
    }
  }
}

template <typename T, typename I>
__device__ __forceinline__ void fused_backward_data(
    const T* __restrict__ grad_output, const T* __restrict__ input, const T* __restrict__ offset,
    const T* __restrict__ mask, const T* __restrict__ weight, float* __restrict__ grad_input,
    T* __restrict__ grad_offset, T* __restrict__ grad_mask, const ConvSizes<I>& s, I out_channels,
    I groups, FusedBwdShared& sm) {
  using A = float;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp & 1, warp_n = warp >> 1;
  const int my_p = tid % kFusedBwdTileN, my_lane = tid / kFusedBwdTileN;
  const I P = s.out_size;
  const I cg = s.channels / groups, mult = out_channels / groups, cpg = s.channels_per_group;
  const I plane_size = s.height * s.width;
  const I pix0 = static_cast<I>(blockIdx.x) * kFusedBwdTileN;
  const I pix = pix0 + my_p;
  const bool active = pix < P;
  const OutputPixel<I> px = output_pixel(active ? pix : I(0), s);
  const I steps = ceil_div(mult, I(kFusedBwdTileK));
  for (I b = blockIdx.z; b < s.batch; b += gridDim.z) {
    for (I tap = blockIdx.y; tap < s.taps; tap += gridDim.y) {  // uniform: barriers inside
      const I ti = tap / s.kernel_w, tj = tap - ti * s.kernel_w;
      for (I og = 0; og < s.offset_groups; ++og) {
        TapSample<A, I> t{};
        if (active) {
          t = tap_sample<T, I>(offset + offset_base(b, og, s) + px.pix,
                               mask_pixel(mask, b, og, px.pix, s), tap, ti, tj, px, s);
        }
        A sum_dy = A(0), sum_dx = A(0), sum_value = A(0);
        const I c_end = (og + 1) * cpg;
        for (I c = og * cpg; c < c_end;) {  // uniform
          const I g = c / cg;
          const I chunk_end = min(min(c_end, (g + 1) * cg), c + I(kFusedBwdTileM));
          const FusedBwdChunk<T, I> chunk{grad_output,  weight, s,  mult,       cg,
                                          out_channels, b,      g,  c - g * cg, chunk_end - c,
                                          tap,          pix0,   tid};
          tc::FragC acc[2];
#pragma unroll
          for (int ni = 0; ni < 2; ++ni)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[ni].x[q] = 0.0f;
          // The MMA steps over o, double-buffered: step k's tiles in stage k & 1.
          chunk.load_weight(I(0), sm.a[0]);
          chunk.load_grad_output(I(0), sm.b[0]);
          __syncthreads();
          for (I step = 0; step < steps; ++step) {
            const int cur = static_cast<int>(step & 1);
            if (step + 1 < steps) {  // the other stage was last read before the barrier
              chunk.load_weight((step + 1) * kFusedBwdTileK, sm.a[cur ^ 1]);
              chunk.load_grad_output((step + 1) * kFusedBwdTileK, sm.b[cur ^ 1]);
            }
            fused_bwd_warp_mma<T>(acc, sm.a[cur], sm.b[cur], warp_m * 16, warp_n * 16, lane);
            __syncthreads();
          }
          // Stage the accumulators: C[g][2t, 2t+1] and C[g+8][2t, 2t+1] of each n-block.
          {
            const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
            for (int ni = 0; ni < 2; ++ni) {
              const int col = warp_n * 16 + ni * 8 + 2 * tq;
#pragma unroll
              for (int hrow = 0; hrow < 2; ++hrow) {
                const int row = warp_m * 16 + gq + 8 * hrow;
                sm.gc[row][col] = acc[ni].x[2 * hrow];
                sm.gc[row][col + 1] = acc[ni].x[2 * hrow + 1];
              }
            }
          }
          __syncthreads();
          // Spend the chunk: this thread's pixel, channels my_lane * 8 .. + 8.
          if (active) {
            const I first = static_cast<I>(my_lane * kFusedBwdPerLane);
            const I count = chunk_end - c;
            // grad_input may be nullptr (only grad_offset / grad_mask wanted)
            const bool scatter = grad_input != nullptr && !t.p.is_nan && t.p.any_in;
            const A hy = A(1) - t.p.ly, hx = A(1) - t.p.lx;
            const I row0 = t.p.y0 * s.width, row1 = row0 + s.width;
#pragma unroll 2
            for (int k = 0; k < kFusedBwdPerLane; ++k) {
              const I r = first + k;
              if (r >= count) break;
              const A grad = sm.gc[r][my_p];
              const I channel = c + r;
              const SampleWithGradient<A> v = bilinear_sample_with_gradient_at<A, T, I>(
                  input + plane_base(b, channel, s), t.p, s.width);
              sum_dy += grad * v.d_dy;
              sum_dx += grad * v.d_dx;
              sum_value += grad * v.value;
              if (scatter) {  // deform_conv_col2im_input's contributions, same products
                const A gm = grad * t.m;
                A* plane = grad_input + plane_base(b, channel, s);
                if (t.p.y0_in && t.p.x0_in)
                  atomic_accumulate(plane + (row0 + t.p.x0), hy * hx * gm);
                if (t.p.y0_in && t.p.x1_in) {
                  atomic_accumulate(plane + (row0 + t.p.x0 + 1), hy * t.p.lx * gm);
                }
                if (t.p.y1_in && t.p.x0_in) {
                  atomic_accumulate(plane + (row1 + t.p.x0), t.p.ly * hx * gm);
                }
                if (t.p.y1_in && t.p.x1_in) {
                  atomic_accumulate(plane + (row1 + t.p.x0 + 1), t.p.ly * t.p.lx * gm);
                }
              }
            }
          }
          // The next chunk's first tiles go to stage 0, last read before the barrier
          // above; gc is rewritten only after the next chunk's first barrier.
          c = chunk_end;
        }
        // The offset group's sums: the 4 threads of a pixel, in lane order.
        sm.partial[0][my_lane][my_p] = sum_dy;
        sm.partial[1][my_lane][my_p] = sum_dx;
        sm.partial[2][my_lane][my_p] = sum_value;
        __syncthreads();
        if (active && my_lane == 0) {
          A dy = A(0), dx = A(0), value = A(0);
#pragma unroll
          for (int l = 0; l < kFusedBwdLanes; ++l) {
            dy += sm.partial[0][l][my_p];
            dx += sm.partial[1][l][my_p];
            value += sm.partial[2][l][my_p];
          }
          if (grad_offset != nullptr) {  // d/dp = d/dp' * dp'/dp (the padding mode's slope)
            T* out = grad_offset + offset_base(b, og, s) + px.pix;
            out[(2 * tap) * s.out_size] = from_acc<T>(t.m * (dy * t.p.slope_y));
            out[(2 * tap + 1) * s.out_size] = from_acc<T>(t.m * (dx * t.p.slope_x));
          }
          if (grad_mask != nullptr) {
            grad_mask[mask_base(b, og, s) + tap * s.out_size + px.pix] = from_acc<T>(value);
          }
        }
        __syncthreads();  // partial is rewritten by the next offset group
      }
    }
  }
}

#endif  // CUPYDCN_FUSED_BWD_TENSOR_CORES

// grad_input (+=, float atomics), grad_offset and grad_mask (written, or nullptr) of
// deform_conv2d from grad_output (file header). grid (ceil(P / 64), K, images), block 256.
template <typename T, typename I>
__launch_bounds__(kFusedBwdThreads, fused_bwd_min_blocks<I>()) __global__
    void deform_conv_fused_backward_data(const T* __restrict__ grad_output,
                                         const T* __restrict__ input, const T* __restrict__ offset,
                                         const T* __restrict__ mask, const T* __restrict__ weight,
                                         acc_t<T>* __restrict__ grad_input,
                                         T* __restrict__ grad_offset, T* __restrict__ grad_mask,
                                         CUPYDCN_FUSED_BWD_SIZE_PARAMETERS) {
#if CUPYDCN_FUSED_BWD_TENSOR_CORES
  if constexpr (FusedBwdHalf<T>::value) {
    __shared__ FusedBwdShared sm;
    const I P = out_h * out_w;
    const ConvSizes<I> s = conv_sizes<I>(batch, in_channels, height, width, kernel_h, kernel_w,
                                         stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, out_h,
                                         out_w, offset_groups, padding_mode, I(0), P);
    fused_backward_data<T, I>(grad_output, input, offset, mask, weight, grad_input, grad_offset,
                              grad_mask, s, out_channels, groups, sm);
  }
#endif
}

}  // namespace cupydcn
