// Fused deform_conv2d for the half types on tensor cores: implicit GEMMs that sample the
// columns into shared memory as they go, with no column buffer in global memory.
//
// Device code only; templates over the element type T and the index type I (int, or long
// long past 2^31 elements), like every file of the package. The kernels do their work for
// T = __half and __nv_bfloat16 on sm_80 and later; for float and double, and below sm_80,
// they compile to empty bodies (cupydcn/deform_conv/fused_cuda.py never launches them
// there: fused_supports, fused_supported). Launch shapes, tile constants and the
// applicability rule are fused_cuda.py's; the parameter lists are mirrored in
// KERNEL_PARAMETERS of cupydcn/cuda/kernel_source.py.
//
// Notation (A = acc_t<T> = float): C input channels in `groups` weight groups of cg = C /
// groups channels, Co output channels, M = Co / groups per group; G offset groups of cpg = C
// / G channels; K = kh * kw taps, tap k = i * kw + j; P = out_h * out_w output pixels.
// Layouts, C-contiguous:
//   input          [N, C, H, W]               T
//   offset         [N, G * 2K, out_h, out_w]  T, channel g*2K + 2k = dy, + 1 = dx
//   mask           [N, G * K, out_h, out_w]   T, or nullptr (DCNv1)
//   weight         [Co, cg, kh, kw]           T (the GEMM operand [groups, M, cg * K])
//   weight_packed  [groups, M, K, cg_pad]     T, weight[g*M + m, c, tap] at [g, m, tap, c],
//                  zero for c >= cg; cg_pad = channels_padded = cg rounded up to 16
//                  (deform_conv_fused_pack_weight writes it)
//   bias           [Co] T, or nullptr
//   output, grad_output [N, Co, out_h, out_w] T
//   grad_weight    [groups, M, cg * K]        A (weight's order), accumulated with atomics
//
// The column value of (channel c, tap k, pixel) is exactly deform_conv_im2col's
// (fused_sampling.cuh): computed in float and rounded once to T (docs/semantics.md §6.1).
//
// Forward, deform_conv_fused_forward: per image b and weight group g, an implicit GEMM
// output[b, g] (M x P) = weight_packed[g] (M x K*cg_pad) @ columns (K*cg_pad x P), the
// reduction ordered (tap, channel). A block owns kFusedTileM = 128 output channels x
// kFusedTileN = 64 pixels of one image (grid x: pixel tiles, y: (group, output-channel tile), z:
// images; y and z loop past 65535) and walks the reduction in steps of one tap and
// kFusedTileK = 32 channels (16 for the last step of a tap when cg_pad % 32 == 16):
//   * the sampling points of the tile's 64 pixels at a tap, for each offset group the
//     group's channels touch (at most kFusedMaxOffsetGroups), are located once into shared
//     memory (24 bytes each), one tap ahead (double-buffered by tap parity);
//   * the weight tile (128 x 32) is copied by cp.async (zero-filled past M and cg_pad),
//     and the column tile (64 pixels x 32 channels) built by the threads: each a pixel and
//     8 channels (4 corner loads and a blend per value, one 16-byte shared store), zero
//     past P and past cg; both double-buffered, so the next step's copies and gathers
//     overlap this step's MMAs, one barrier per step;
//   * 8 warps, 4 (M) x 2 (N), each 32 x 32: per 16-deep slice 2 ldmatrix.x4 of A, 2 of
//     B, 8 mma.m16n8k16 into float accumulators (warps whose rows are all past M skip);
//   * epilogue: + bias (float), rounded once to T, staged in shared memory, stored
//     coalesced along the pixels.
// Shared memory: 20480 (A) + 10240 (B) + 12288 (points) = 43008 bytes, static.
//
// grad_weight, deform_conv_fused_grad_weight: per weight group, grad_weight[g] (M x
// cg*K) += sum over images and pixels of grad_output[b, g] (M x P) @ columns^T (P x
// cg*K). A block owns 128 output channels x 64 columns (one tap, 64 channels of the group)
// (grid x: (tap, channel tile), y: (group, output-channel tile), z: splits of the images'
// pixels) and walks its split's pixels in slices of 32 (a slice lies in one image; the
// last of an image is zero-filled): grad_output tile (128 x 32) loaded pairwise into
// shared memory, column tile (64 channels x 32 pixels) built from the slice's points
// (located one slice ahead), 2 x 8 MMAs per warp per slice; at the end each accumulator
// is added with one float atomic (splits > 1 add in an unspecified order).
// Shared memory: 20480 + 10240 + 6144 = 36864 bytes, static.
//
// Both kernels stage in shared memory rows of kFusedRowWords = 20 words (80 bytes): the
// ldmatrix row addresses of a phase then fall on distinct banks, and cp.async
// destinations stay 16-byte aligned.
#include "accumulate.cuh"
#include "atomics.cuh"
#include "conv_geometry.cuh"
#include "fused_sampling.cuh"
#include "grid_stride.cuh"
#include "tensor_core.cuh"

// The tensor-core code is built for sm_80 and later (and by the host emulation).
#if defined(CUPYDCN_HOST_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define CUPYDCN_FUSED_TENSOR_CORES 1
#else
#define CUPYDCN_FUSED_TENSOR_CORES 0
#endif

namespace cupydcn {

// Threads per block (THREADS in cupydcn/deform_conv/fused_cuda.py): 8 warps. With
// fused_min_blocks resident blocks per SM it is also the register budget: 128 registers
// with 32-bit indices (two blocks of 256 threads per SM), none (255) with 64-bit ones,
// where grad_weight needs a few more than 128 and would spill.
constexpr int kFusedThreads = 256;
template <typename I>
constexpr int fused_min_blocks() {
  return sizeof(I) == 4 ? 2 : 1;
}

// The sizes of a launch (ConvGeometry's names) and what the kernels derive from them.
#define CUPYDCN_FUSED_SIZE_PARAMETERS                                                              \
  I batch, I in_channels, I height, I width, I out_channels, I groups, I offset_groups,            \
      I kernel_h, I kernel_w, I stride_h, I stride_w, I pad_h, I pad_w, I dil_h, I dil_w, I out_h, \
      I out_w, I padding_mode
#define CUPYDCN_FUSED_SIZES                                                                        \
  fused_sizes<I>(batch, in_channels, height, width, out_channels, groups, offset_groups, kernel_h, \
                 kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, out_h, out_w,           \
                 padding_mode)

template <typename I>
struct FusedSizes {
  ConvSizes<I> conv;  // whole images (slice 0 .. P): the sampler's sizes
  I out_channels, groups;
  I cg;     // input channels per weight group, C / groups
  I mult;   // output channels per weight group, M = Co / groups
  I plane;  // H * W
};

template <typename I>
__device__ __forceinline__ FusedSizes<I> fused_sizes(I batch, I in_channels, I height, I width,
                                                     I out_channels, I groups, I offset_groups,
                                                     I kernel_h, I kernel_w, I stride_h, I stride_w,
                                                     I pad_h, I pad_w, I dil_h, I dil_w, I out_h,
                                                     I out_w, I padding_mode) {
  FusedSizes<I> s;
  s.conv = conv_sizes<I>(batch, in_channels, height, width, kernel_h, kernel_w, stride_h, stride_w,
                         pad_h, pad_w, dil_h, dil_w, out_h, out_w, offset_groups, padding_mode,
                         I(0), out_h * out_w);
  s.out_channels = out_channels;
  s.groups = groups;
  s.cg = in_channels / groups;
  s.mult = out_channels / groups;
  s.plane = height * width;
  return s;
}

// A 16-byte shared-memory store of four words (one st.shared.v4 on the GPU).
struct alignas(16) FusedWords4 {
  unsigned w[4];
};

// ---------------------------------------------------------------- weight packing

// weight_packed[g, m, tap, c] = weight[g*M + m, c, tap] for c < cg, 0 for cg <= c <
// channels_padded. Grid-stride over the packed elements.
template <typename T, typename I>
__global__ void deform_conv_fused_pack_weight(const T* __restrict__ weight,
                                              T* __restrict__ weight_packed,
                                              CUPYDCN_FUSED_SIZE_PARAMETERS, I channels_padded) {
  const FusedSizes<I> s = CUPYDCN_FUSED_SIZES;
  const I taps = s.conv.taps;
  const I total = s.out_channels * taps * channels_padded;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const I c = index % channels_padded;
    const I rest = index / channels_padded;  // (g*M + m) * K + tap
    const I tap = rest % taps, row = rest / taps;
    weight_packed[index] = c < s.cg ? weight[(row * s.cg + c) * taps + tap] : from_acc<T>(0.0f);
  }
}

#if CUPYDCN_FUSED_TENSOR_CORES

// Tile constants (mirrored in cupydcn/deform_conv/fused_cuda.py).
constexpr int kFusedTileM = 128;  // output channels per block
constexpr int kFusedTileN = 64;   // pixels (forward) / columns (grad_weight) per block
constexpr int kFusedTileK = 32;   // reduction per step: channels (forward) / pixels
constexpr int kFusedRowWords = kFusedTileK / 2 + 4;  // a staged row: 32 halves + 8 of padding
constexpr int kFusedMaxOffsetGroups = 4;             // offset groups a weight group may touch
constexpr int kFusedWarpTile = 32;                   // each warp: 32 x 32 of the block tile
static_assert(kFusedTileM == 4 * kFusedWarpTile && kFusedTileN == 2 * kFusedWarpTile &&
                  kFusedThreads == 8 * 32,
              "8 warps, 4 (M) x 2 (N), of 32 x 32");

// ---------------------------------------------------------------- the warp's MMAs

// acc[mi][ni] += A (rows a_row0 + 16 mi .. + 16) @ B (B rows b_row0 + 8 ni .. + 8) over
// `ksteps` slices of 16 of the staged k, A staged [row][k], B staged [n][k] (both
// kFusedRowWords words a row, k pairs packed low first).
template <typename T>
__device__ __forceinline__ void fused_warp_mma(tc::FragC (&acc)[2][4],
                                               const unsigned (*a)[kFusedRowWords],
                                               const unsigned (*b)[kFusedRowWords], int a_row0,
                                               int b_row0, int ksteps, int lane) {
  // ldmatrix.x4 row addresses: lane 8j + r gives row r of matrix j.
  const int r = lane & 7, j = lane >> 3;
  const int a_row = a_row0 + r + (j & 1) * 8, a_word = (j >> 1) * 4;  // (rows, k) 0-7 / 8-15
  const int b_row = b_row0 + r + (j >> 1) * 8, b_word = (j & 1) * 4;  // (n, k) 0-7 / 8-15
#pragma unroll
  for (int ks = 0; ks < kFusedTileK / 16; ++ks) {
    if (ks < ksteps) {
      const int kw = ks * 8;
      tc::FragA16 fa[2];
      tc::FragB16 fb[4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        tc::ldmatrix_x4(fa[mi].x[0], fa[mi].x[1], fa[mi].x[2], fa[mi].x[3],
                        &a[a_row + 16 * mi][kw + a_word]);
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        tc::ldmatrix_x4(fb[2 * np].x[0], fb[2 * np].x[1], fb[2 * np + 1].x[0], fb[2 * np + 1].x[1],
                        &b[b_row + 16 * np][kw + b_word]);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          tc::mma_m16n8k16<T>(acc[mi][ni], fa[mi], fb[ni], acc[mi][ni]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- forward

// The epilogue stages the block's outputs (T pairs) over the weight tiles.
constexpr int kFusedStageWords = kFusedTileN / 2 + 4;  // 36: conflict-free fragment stores

struct alignas(16) FusedForwardShared {  // 16: cp.async, ldmatrix rows
  union {
    unsigned a[2][kFusedTileM][kFusedRowWords];     // weight tiles [m][k]
    unsigned stage[kFusedTileM][kFusedStageWords];  // the epilogue's outputs
  };
  unsigned b[2][kFusedTileN][kFusedRowWords];                       // column tiles [pixel][k]
  FusedPoint<float> points[2][kFusedMaxOffsetGroups][kFusedTileN];  // by tap parity
};
static_assert(sizeof(FusedForwardShared) == 43008, "fused_cuda.FORWARD_SHARED_BYTES");

// One block's work: output channels [m0, m0 + 128) of group g, pixels [pix0, pix0 + 64)
// of image b.
template <typename T, typename I>
struct FusedForwardTile {
  const T* input;
  const T* offset;
  const T* mask;
  const T* weight_packed;
  const FusedSizes<I>& s;
  FusedForwardShared& sm;
  I b, g, m0, pix0, cg_pad;
  OffsetGroupSpan<I> span;
  int chunks;  // reduction steps per tap, ceil(cg_pad / 32)
  int tid;

  __device__ __forceinline__ int tap_of(int step) const { return step / chunks; }
  __device__ __forceinline__ I channel_of(int step) const {
    return static_cast<I>(step - tap_of(step) * chunks) * kFusedTileK;
  }
  // 16-deep slices of a step: 2, or 1 for a tap's last 16 channels.
  __device__ __forceinline__ int ksteps(int step) const {
    return cg_pad - channel_of(step) >= I(kFusedTileK) ? 2 : 1;
  }

  // The points of tap `tap` at the tile's pixels, for the group's offset groups.
  __device__ __forceinline__ void locate(int tap) const {
    using A = acc_t<T>;
    const ConvSizes<I>& c = s.conv;
    const I i = static_cast<I>(tap) / c.kernel_w, j = static_cast<I>(tap) - i * c.kernel_w;
    for (int e = tid; e < span.count * kFusedTileN; e += kFusedThreads) {
      const int slot = e / kFusedTileN, p = e - slot * kFusedTileN;
      const I pix = pix0 + p;
      sm.points[tap & 1][slot][p] = pix < c.out_size
                                        ? locate_point<T, I>(offset, mask, b, span.first + slot,
                                                             I(tap), i, j, output_pixel(pix, c), c)
                                        : empty_point<A>();
    }
  }

  // cp.async of the weight tile of `step` into stage `st`: 128 rows x 4 pieces of 16 bytes.
  __device__ __forceinline__ void load_weight(int step, int st) const {
    const I tap = tap_of(step), c0 = channel_of(step);
#pragma unroll
    for (int u = 0; u < kFusedTileM * 4 / kFusedThreads; ++u) {
      const int id = tid + u * kFusedThreads, row = id >> 2, piece = id & 3;
      const I m = m0 + row, c = c0 + 8 * piece;
      const bool valid = m < s.mult && c < cg_pad;
      const T* src = valid ? weight_packed + (((g * s.mult + m) * s.conv.taps + tap) * cg_pad + c)
                           : weight_packed;
      tc::cp_async_16_zfill(&sm.a[st][row][4 * piece], src, valid ? 16 : 0);
    }
    tc::cp_async_commit();
  }

  // The column tile of `step` into stage `st`: this thread's pixel (tid % 64) and 8
  // channels (8 (tid / 64) ..), zero past P (the point's mask is 0) and past cg.
  __device__ __forceinline__ void build_columns(int step, int st) const {
    const ConvSizes<I>& c = s.conv;
    const int tap = tap_of(step);
    const int p = tid % kFusedTileN, octet = tid / kFusedTileN;
    const I first = channel_of(step) + 8 * octet;  // within the group
    const FusedPoint<float>(&points)[kFusedMaxOffsetGroups][kFusedTileN] = sm.points[tap & 1];
    const I group_begin = g * s.cg;
    FusedWords4 out;
    FusedPoint<float> e = empty_point<float>();
    I boundary = 0;  // the first channel past e's offset group (0: none loaded)
    int slot = -1;
#pragma unroll
    for (int k = 0; k < 8; k += 2) {
      T v[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const I channel = first + k + h;
        if (channel < s.cg) {
          const I ch = group_begin + channel;  // absolute input channel
          if (ch >= boundary) {
            slot = static_cast<int>(ch / c.channels_per_group - span.first);
            boundary = (span.first + slot + 1) * c.channels_per_group;
            e = points[slot][p];
          }
          v[h] = column_value<T, I>(input + plane_base(b, ch, c), e, c.width);
        } else {
          v[h] = from_acc<T>(0.0f);
        }
      }
      out.w[k / 2] = tc::pack_half2<T>(v[0], v[1]);
    }
    *reinterpret_cast<FusedWords4*>(&sm.b[st][p][4 * octet]) = out;
  }
};

template <typename T, typename I>
__device__ __forceinline__ void fused_forward(
    const T* __restrict__ input, const T* __restrict__ offset, const T* __restrict__ mask,
    const T* __restrict__ weight_packed, const T* __restrict__ bias, T* __restrict__ output,
    const FusedSizes<I>& s, I cg_pad, FusedForwardShared& sm) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp & 3, warp_n = warp >> 2;
  const I P = s.conv.out_size;
  const I m_tiles = ceil_div(s.mult, I(kFusedTileM));
  const I units = s.groups * m_tiles;
  const int chunks = static_cast<int>(ceil_div(cg_pad, I(kFusedTileK)));
  const int steps = static_cast<int>(s.conv.taps) * chunks;
  const I pix0 = static_cast<I>(blockIdx.x) * kFusedTileN;
  for (I b = blockIdx.z; b < s.conv.batch; b += gridDim.z) {
    for (I unit = blockIdx.y; unit < units; unit += gridDim.y) {  // uniform: barriers inside
      const I g = unit / m_tiles, m0 = (unit - g * m_tiles) * kFusedTileM;
      const FusedForwardTile<T, I> tile{
          input,  offset, mask,   weight_packed,
          s,      sm,     b,      g,
          m0,     pix0,   cg_pad, offset_group_span(g * s.cg, (g + 1) * s.cg, s.conv),
          chunks, tid};
      const bool active = m0 + warp_m * kFusedWarpTile < s.mult;  // warp-uniform
      tc::FragC acc[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[mi][ni].x[q] = 0.0f;

      // Prologue: points of tap 0, then step 0's tiles (and tap 1's points when a tap is
      // one step).
      tile.locate(0);
      __syncthreads();
      tile.load_weight(0, 0);
      tile.build_columns(0, 0);
      if (steps > 1 && chunks == 1) tile.locate(1);
      tc::cp_async_wait<0>();
      __syncthreads();
      for (int step = 0; step < steps; ++step) {
        const int cur = step & 1;
        if (step + 1 < steps) {  // the next step's tiles into the other stage
          tile.load_weight(step + 1, cur ^ 1);
          tile.build_columns(step + 1, cur ^ 1);
        }
        // The points of the step after, when it starts a tap (its parity's last reader,
        // the tap two back, was built before the last barrier).
        if (step + 2 < steps && (step + 2) % chunks == 0) tile.locate((step + 2) / chunks);
        if (active) {
          fused_warp_mma<T>(acc, sm.a[cur], sm.b[cur], warp_m * kFusedWarpTile,
                            warp_n * kFusedWarpTile, tile.ksteps(step), lane);
        }
        tc::cp_async_wait<0>();
        __syncthreads();
      }

      // Epilogue: + bias, round once, stage [row][pixel pair] over the weight tiles.
      const int gq = lane >> 2, t = lane & 3;
      if (active) {
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
          for (int hrow = 0; hrow < 2; ++hrow) {
            const int row = warp_m * kFusedWarpTile + mi * 16 + gq + 8 * hrow;
            const I m = m0 + row;
            const bool with_bias = bias != nullptr && m < s.mult;
            const float add = with_bias ? to_acc(bias[g * s.mult + m]) : 0.0f;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
              const int col = warp_n * kFusedWarpTile + ni * 8 + 2 * t;
              float v0 = acc[mi][ni].x[2 * hrow], v1 = acc[mi][ni].x[2 * hrow + 1];
              if (with_bias) {
                v0 += add;
                v1 += add;
              }
              sm.stage[row][col / 2] = tc::pack_half2<T>(from_acc<T>(v0), from_acc<T>(v1));
            }
          }
        }
      }
      __syncthreads();
      for (int e = tid; e < kFusedTileM * (kFusedTileN / 2); e += kFusedThreads) {
        const int row = e / (kFusedTileN / 2), w = e - row * (kFusedTileN / 2);
        const I m = m0 + row, pix = pix0 + 2 * w;
        if (m >= s.mult || pix >= P) continue;
        const unsigned word = sm.stage[row][w];
        T* out = output + ((b * s.out_channels + g * s.mult + m) * P + pix);
        out[0] = half_from_bits<T>(static_cast<unsigned short>(word & 0xFFFFu));
        if (pix + 1 < P) out[1] = half_from_bits<T>(static_cast<unsigned short>(word >> 16));
      }
      __syncthreads();  // the stage is the next unit's weight tiles
    }
  }
}

#endif  // CUPYDCN_FUSED_TENSOR_CORES

// output = deform_conv2d(input, offset, mask; weight, bias), weight as weight_packed
// (file header). grid (ceil(P / 64), groups * ceil(M / 128), images), block 256.
template <typename T, typename I>
__launch_bounds__(kFusedThreads, fused_min_blocks<I>()) __global__
    void deform_conv_fused_forward(const T* __restrict__ input, const T* __restrict__ offset,
                                   const T* __restrict__ mask, const T* __restrict__ weight_packed,
                                   const T* __restrict__ bias, T* __restrict__ output,
                                   CUPYDCN_FUSED_SIZE_PARAMETERS, I channels_padded) {
#if CUPYDCN_FUSED_TENSOR_CORES
  if constexpr (IsHalfType<T>::value) {
    __shared__ FusedForwardShared shared;
    fused_forward<T, I>(input, offset, mask, weight_packed, bias, output, CUPYDCN_FUSED_SIZES,
                        channels_padded, shared);
  }
#endif
}

#if CUPYDCN_FUSED_TENSOR_CORES

// ---------------------------------------------------------------- grad_weight

constexpr int kFusedSlice = kFusedTileK;  // pixels per step of grad_weight

struct alignas(16) FusedWeightShared {
  unsigned a[2][kFusedTileM][kFusedRowWords];                       // grad_output [m][pixel]
  unsigned b[2][kFusedTileN][kFusedRowWords];                       // columns [channel][pixel]
  FusedPoint<float> points[2][kFusedMaxOffsetGroups][kFusedSlice];  // by slice parity
};
static_assert(sizeof(FusedWeightShared) == 36864, "fused_cuda.WEIGHT_SHARED_BYTES");

// One block's work: output channels [m0, m0 + 128) of group g, columns (tap, channels
// [c0, c0 + 64) of the group), the pixel slices [first, first + count) of the flattened
// (image, slice) order.
template <typename T, typename I>
struct FusedWeightTile {
  const T* grad_output;
  const T* input;
  const T* offset;
  const T* mask;
  const FusedSizes<I>& s;
  FusedWeightShared& sm;
  I g, m0, c0, tap, i, j;
  I first, slices_per_image;
  OffsetGroupSpan<I> span;
  int tid;

  __device__ __forceinline__ void slice_at(I step, I& b, I& pix0) const {
    const I slice = first + step;
    b = slice / slices_per_image;
    pix0 = (slice - b * slices_per_image) * kFusedSlice;
  }

  // The points of the slice of `step` (parity step & 1).
  __device__ __forceinline__ void locate(I step) const {
    using A = acc_t<T>;
    const ConvSizes<I>& c = s.conv;
    I b, pix0;
    slice_at(step, b, pix0);
    for (int e = tid; e < span.count * kFusedSlice; e += kFusedThreads) {
      const int slot = e / kFusedSlice, p = e - slot * kFusedSlice;
      const I pix = pix0 + p;
      sm.points[static_cast<int>(step & 1)][slot][p] =
          pix < c.out_size ? locate_point<T, I>(offset, mask, b, span.first + slot, tap, i, j,
                                                output_pixel(pix, c), c)
                           : empty_point<A>();
    }
  }

  // grad_output rows [m0, m0 + 128) x the slice's 32 pixels into stage st: a thread
  // loads pixel pairs (tid % 16) of 8 rows (tid / 16 + 16 u), zero past M and P.
  __device__ __forceinline__ void load_grad_output(I step, int st) const {
    I b, pix0;
    slice_at(step, b, pix0);
    const I P = s.conv.out_size;
    const int w = tid % (kFusedSlice / 2), r0 = tid / (kFusedSlice / 2);
    const I pix = pix0 + 2 * w;
    const T zero = from_acc<T>(0.0f);
#pragma unroll
    for (int u = 0; u < kFusedTileM / (kFusedThreads / (kFusedSlice / 2)); ++u) {
      const int row = r0 + u * (kFusedThreads / (kFusedSlice / 2));
      const I m = m0 + row;
      T v0 = zero, v1 = zero;
      if (m < s.mult && pix < P) {
        const T* src = grad_output + ((b * s.out_channels + g * s.mult + m) * P + pix);
        v0 = src[0];
        if (pix + 1 < P) v1 = src[1];
      }
      sm.a[st][row][w] = tc::pack_half2<T>(v0, v1);
    }
  }

  // The column tile of `step` into stage st: a thread builds pixel pair tid % 16 of 4
  // channels (4 (tid / 16) ..), zero past P and past cg.
  __device__ __forceinline__ void build_columns(I step, int st) const {
    const ConvSizes<I>& c = s.conv;
    I b, pix0;
    slice_at(step, b, pix0);
    const int w = tid % (kFusedSlice / 2), quad = tid / (kFusedSlice / 2);
    const FusedPoint<float>(&points)[kFusedMaxOffsetGroups][kFusedSlice] =
        sm.points[static_cast<int>(step & 1)];
    const I group_begin = g * s.cg;
    FusedPoint<float> e0 = empty_point<float>(), e1 = empty_point<float>();
    I boundary = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int row = 4 * quad + k;
      const I channel = c0 + row;  // within the group
      T v0 = from_acc<T>(0.0f), v1 = v0;
      if (channel < s.cg) {
        const I ch = group_begin + channel;
        if (ch >= boundary) {
          const int slot = static_cast<int>(ch / c.channels_per_group - span.first);
          boundary = (span.first + slot + 1) * c.channels_per_group;
          e0 = points[slot][2 * w];
          e1 = points[slot][2 * w + 1];
        }
        const T* plane = input + plane_base(b, ch, c);
        v0 = column_value<T, I>(plane, e0, c.width);
        v1 = column_value<T, I>(plane, e1, c.width);
      }
      sm.b[st][row][w] = tc::pack_half2<T>(v0, v1);
    }
  }
};

template <typename T, typename I>
__device__ __forceinline__ void fused_grad_weight(const T* __restrict__ grad_output,
                                                  const T* __restrict__ input,
                                                  const T* __restrict__ offset,
                                                  const T* __restrict__ mask,
                                                  float* __restrict__ grad_weight,
                                                  const FusedSizes<I>& s, FusedWeightShared& sm) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp & 3, warp_n = warp >> 2;
  const ConvSizes<I>& c = s.conv;
  const I m_tiles = ceil_div(s.mult, I(kFusedTileM));
  const I c_tiles = ceil_div(s.cg, I(kFusedTileN));
  const I units = s.groups * m_tiles, columns = c.taps * c_tiles;
  const I slices_per_image = ceil_div(c.out_size, I(kFusedSlice));
  // This split's slices: [z * total / splits, (z + 1) * total / splits), in 64-bit.
  const long long total = static_cast<long long>(c.batch) * slices_per_image;
  const long long splits = gridDim.z, z = blockIdx.z;
  const I first = static_cast<I>(z * total / splits);
  const I count = static_cast<I>((z + 1) * total / splits - z * total / splits);
  if (count == 0) return;                                       // uniform, before any barrier
  for (I unit = blockIdx.y; unit < units; unit += gridDim.y) {  // uniform: barriers inside
    for (I column = blockIdx.x; column < columns; column += gridDim.x) {
      const I g = unit / m_tiles, m0 = (unit - g * m_tiles) * kFusedTileM;
      const I tap = column / c_tiles, c0 = (column - tap * c_tiles) * kFusedTileN;
      const I i = tap / c.kernel_w, j = tap - i * c.kernel_w;
      const I c_end = min(c0 + I(kFusedTileN), s.cg);
      const FusedWeightTile<T, I> tile{grad_output,
                                       input,
                                       offset,
                                       mask,
                                       s,
                                       sm,
                                       g,
                                       m0,
                                       c0,
                                       tap,
                                       i,
                                       j,
                                       first,
                                       slices_per_image,
                                       offset_group_span(g * s.cg + c0, g * s.cg + c_end, c),
                                       tid};
      const bool active = m0 + warp_m * kFusedWarpTile < s.mult &&
                          c0 + warp_n * kFusedWarpTile < s.cg;  // warp-uniform
      tc::FragC acc[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[mi][ni].x[q] = 0.0f;

      tile.locate(0);
      __syncthreads();
      tile.load_grad_output(0, 0);
      tile.build_columns(0, 0);
      if (count > 1) tile.locate(1);
      __syncthreads();
      for (I step = 0; step < count; ++step) {
        const int cur = static_cast<int>(step & 1);
        if (step + 1 < count) {
          tile.load_grad_output(step + 1, cur ^ 1);
          tile.build_columns(step + 1, cur ^ 1);
        }
        // The points of the slice after next (its parity's last reader, this slice's
        // columns, were built before the last barrier).
        if (step + 2 < count) tile.locate(step + 2);
        if (active) {
          fused_warp_mma<T>(acc, sm.a[cur], sm.b[cur], warp_m * kFusedWarpTile,
                            warp_n * kFusedWarpTile, kFusedTileK / 16, lane);
        }
        __syncthreads();
      }

      // One atomic per accumulator into grad_weight[g, m, c * K + tap].
      if (active) {
        const int gq = lane >> 2, t = lane & 3;
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
          for (int hrow = 0; hrow < 2; ++hrow) {
            const I m = m0 + warp_m * kFusedWarpTile + mi * 16 + gq + 8 * hrow;
            if (m >= s.mult) continue;
            float* row = grad_weight + (g * s.mult + m) * s.cg * c.taps;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const I channel = c0 + warp_n * kFusedWarpTile + ni * 8 + 2 * t + h;
                if (channel < s.cg) {
                  atomic_accumulate(row + channel * c.taps + tap, acc[mi][ni].x[2 * hrow + h]);
                }
              }
            }
          }
        }
      }
    }
  }
}

#endif  // CUPYDCN_FUSED_TENSOR_CORES

// grad_weight_acc (file header) += grad_output @ columns^T over the images and pixels of
// the launch. grid (K * ceil(cg / 64), groups * ceil(M / 128), splits), block 256.
template <typename T, typename I>
__launch_bounds__(kFusedThreads, fused_min_blocks<I>()) __global__
    void deform_conv_fused_grad_weight(const T* __restrict__ grad_output,
                                       const T* __restrict__ input, const T* __restrict__ offset,
                                       const T* __restrict__ mask,
                                       acc_t<T>* __restrict__ grad_weight,
                                       CUPYDCN_FUSED_SIZE_PARAMETERS) {
#if CUPYDCN_FUSED_TENSOR_CORES
  if constexpr (IsHalfType<T>::value) {
    __shared__ FusedWeightShared shared;
    fused_grad_weight<T, I>(grad_output, input, offset, mask, grad_weight, CUPYDCN_FUSED_SIZES,
                            shared);
  }
#endif
}

}  // namespace cupydcn
