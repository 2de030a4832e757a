// Tensor-core test kernels (tests/emulator/test_tensor_core.py): mma.sync with fragments built
// from global memory by the PTX layout formulas, the same with tiles staged in shared memory
// and loaded with every ldmatrix form, tf32, the raw registers of ldmatrix, and misuse.
// Launched with 1-D blocks of whole warps; warp w of the grid (blockIdx.x * warps per block +
// threadIdx.x / 32) works on tile w of each operand: A 16 x K and B K x 8 row-major, C and D
// 16 x 8 row-major float32. The same file builds with NVRTC (tests/emulator/test_tensor_core.py
// compiles it for every target architecture).
#include "tensor_core.cuh"

namespace tctest {

using cupydcn::tc::FragA16;
using cupydcn::tc::FragATf32;
using cupydcn::tc::FragB16;
using cupydcn::tc::FragBTf32;
using cupydcn::tc::FragC;
using cupydcn::tc::pack_half2;

__device__ inline unsigned grid_warp() { return (blockIdx.x * blockDim.x + threadIdx.x) / 32; }

__device__ inline unsigned float_bits_of(float x) {
#ifdef CUPYDCN_HOST_EMULATION
  unsigned u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#else
  return __float_as_uint(x);
#endif
}

// The accumulator fragment of a 16 x 8 row-major tile, and its store.
__device__ inline FragC load_c(const float* c, unsigned g, unsigned t) {
  FragC f;
  f.x[0] = c[g * 8 + 2 * t];
  f.x[1] = c[g * 8 + 2 * t + 1];
  f.x[2] = c[(g + 8) * 8 + 2 * t];
  f.x[3] = c[(g + 8) * 8 + 2 * t + 1];
  return f;
}
__device__ inline void store_d(float* d, const FragC& f, unsigned g, unsigned t) {
  d[g * 8 + 2 * t] = f.x[0];
  d[g * 8 + 2 * t + 1] = f.x[1];
  d[(g + 8) * 8 + 2 * t] = f.x[2];
  d[(g + 8) * 8 + 2 * t + 1] = f.x[3];
}

// D = A B + C over K = 16 ksteps, fragments read from global memory by the layout formulas,
// accumulated in place (d and c of each mma the same fragment).
template <typename T>
__global__ void mma_global(const T* a, const T* b, const float* c, float* d, int ksteps) {
  const unsigned w = grid_warp(), lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int k_total = 16 * ksteps;
  const T* A = a + w * 16 * k_total;
  const T* B = b + w * k_total * 8;
  FragC acc = load_c(c + w * 128, g, t);
  for (int s = 0; s < ksteps; ++s) {
    const T* As = A + 16 * s;
    const T* Bs = B + 16 * s * 8;
    FragA16 fa;
    fa.x[0] = pack_half2<T>(As[g * k_total + 2 * t], As[g * k_total + 2 * t + 1]);
    fa.x[1] = pack_half2<T>(As[(g + 8) * k_total + 2 * t], As[(g + 8) * k_total + 2 * t + 1]);
    fa.x[2] = pack_half2<T>(As[g * k_total + 2 * t + 8], As[g * k_total + 2 * t + 9]);
    fa.x[3] = pack_half2<T>(As[(g + 8) * k_total + 2 * t + 8], As[(g + 8) * k_total + 2 * t + 9]);
    FragB16 fb;
    fb.x[0] = pack_half2<T>(Bs[(2 * t) * 8 + g], Bs[(2 * t + 1) * 8 + g]);
    fb.x[1] = pack_half2<T>(Bs[(2 * t + 8) * 8 + g], Bs[(2 * t + 9) * 8 + g]);
    cupydcn::tc::mma_m16n8k16<T>(acc, fa, fb, acc);
  }
  store_d(d + w * 128, acc, g, t);
}

// D = A B + C over K = 8 ksteps with tf32 operands: rounded with float_to_tf32 (round != 0)
// or the raw float32 bits (round == 0: the mma ignores their low 13 bits).
__global__ void mma_tf32(const float* a, const float* b, const float* c, float* d, int ksteps,
                         int round) {
  const unsigned w = grid_warp(), lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int k_total = 8 * ksteps;
  const float* A = a + w * 16 * k_total;
  const float* B = b + w * k_total * 8;
  const FragC c_in = load_c(c + w * 128, g, t);
  FragC acc = c_in;
  for (int s = 0; s < ksteps; ++s) {
    const float* As = A + 8 * s;
    const float* Bs = B + 8 * s * 8;
    const float av[4] = {As[g * k_total + t], As[(g + 8) * k_total + t], As[g * k_total + t + 4],
                         As[(g + 8) * k_total + t + 4]};
    const float bv[2] = {Bs[t * 8 + g], Bs[(t + 4) * 8 + g]};
    FragATf32 fa;
    FragBTf32 fb;
    for (int i = 0; i < 4; ++i) {
      fa.x[i] = round ? cupydcn::tc::float_to_tf32(av[i]) : float_bits_of(av[i]);
    }
    for (int i = 0; i < 2; ++i) {
      fb.x[i] = round ? cupydcn::tc::float_to_tf32(bv[i]) : float_bits_of(bv[i]);
    }
    FragC next;
    cupydcn::tc::mma_m16n8k8_tf32(next, fa, fb, acc);  // d and c distinct here
    acc = next;
  }
  store_d(d + w * 128, acc, g, t);
}

// out[i] = float_to_tf32(x[i]).
__global__ void tf32_round(const float* x, unsigned* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = cupydcn::tc::float_to_tf32(x[i]);
}

constexpr int kMaxWarps = 4;  // per block
constexpr int kMaxK = 32;     // ksteps <= 2
constexpr int kPad = 8;       // elements after each shared row: rows are not contiguous

// mma_global with the tiles staged in shared memory and the fragments loaded by ldmatrix:
//   MODE 0: A ldmatrix_x4,        B ldmatrix_x2_trans (B row-major)
//   MODE 1: A 2 x ldmatrix_x2,    B 2 x ldmatrix_x1_trans
//   MODE 2: A 4 x ldmatrix_x1,    B ldmatrix_x2 (B transposed in shared memory: n x k)
//   MODE 3: A ldmatrix_x4_trans (A transposed in shared memory: k x m),
//           B ldmatrix_x4_trans, both k-steps at once (ksteps must be 2)
// Lanes that give no row address (x1: 8-31, x2: 16-31) repeat the lower lanes' addresses.
template <typename T, int MODE>
__global__ void mma_shared(const T* a, const T* b, const float* c, float* d, int ksteps) {
  alignas(16) __shared__ T a_rows[kMaxWarps][16][kMaxK + kPad];
  alignas(16) __shared__ T a_cols[kMaxWarps][kMaxK][16 + kPad];
  alignas(16) __shared__ T b_rows[kMaxWarps][kMaxK][8 + kPad];
  alignas(16) __shared__ T b_cols[kMaxWarps][8][kMaxK + kPad];
  const unsigned w = grid_warp(), wb = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned g = lane >> 2, t = lane & 3, j = lane >> 3, r = lane & 7;
  const int k_total = 16 * ksteps;
  const T* A = a + w * 16 * k_total;
  const T* B = b + w * k_total * 8;
  for (int i = lane; i < 16 * k_total; i += 32) {
    a_rows[wb][i / k_total][i % k_total] = A[i];
    a_cols[wb][i % k_total][i / k_total] = A[i];
  }
  for (int i = lane; i < k_total * 8; i += 32) {
    b_rows[wb][i / 8][i % 8] = B[i];
    b_cols[wb][i % 8][i / 8] = B[i];
  }
  __syncthreads();
  FragC acc = load_c(c + w * 128, g, t);
  FragB16 fb_all[2];
  if (MODE == 3) {
    cupydcn::tc::ldmatrix_x4_trans(fb_all[0].x[0], fb_all[0].x[1], fb_all[1].x[0], fb_all[1].x[1],
                                   &b_rows[wb][8 * j + r][0]);
  }
  for (int s = 0; s < ksteps; ++s) {
    const int k0 = 16 * s;
    FragA16 fa;
    FragB16 fb;
    if (MODE == 0) {
      cupydcn::tc::ldmatrix_x4(fa.x[0], fa.x[1], fa.x[2], fa.x[3],
                               &a_rows[wb][r + 8 * (j & 1)][k0 + 8 * (j >> 1)]);
      cupydcn::tc::ldmatrix_x2_trans(fb.x[0], fb.x[1], &b_rows[wb][k0 + 8 * (j & 1) + r][0]);
    } else if (MODE == 1) {
      cupydcn::tc::ldmatrix_x2(fa.x[0], fa.x[1], &a_rows[wb][r + 8 * (j & 1)][k0]);
      cupydcn::tc::ldmatrix_x2(fa.x[2], fa.x[3], &a_rows[wb][r + 8 * (j & 1)][k0 + 8]);
      cupydcn::tc::ldmatrix_x1_trans(fb.x[0], &b_rows[wb][k0 + r][0]);
      cupydcn::tc::ldmatrix_x1_trans(fb.x[1], &b_rows[wb][k0 + 8 + r][0]);
    } else if (MODE == 2) {
      for (int q = 0; q < 4; ++q) {
        cupydcn::tc::ldmatrix_x1(fa.x[q], &a_rows[wb][r + 8 * (q & 1)][k0 + 8 * (q >> 1)]);
      }
      cupydcn::tc::ldmatrix_x2(fb.x[0], fb.x[1], &b_cols[wb][r][k0 + 8 * (j & 1)]);
    } else {
      cupydcn::tc::ldmatrix_x4_trans(fa.x[0], fa.x[1], fa.x[2], fa.x[3],
                                     &a_cols[wb][k0 + 8 * (j >> 1) + r][8 * (j & 1)]);
      fb = fb_all[s];
    }
    cupydcn::tc::mma_m16n8k16<T>(acc, fa, fb, acc);
  }
  store_d(d + w * 128, acc, g, t);
}

// The registers of one ldmatrix form (variant 0-5: x1, x2, x4, x1_trans, x2_trans, x4_trans)
// over four 8 x 8 matrices of 16-bit values (values: 32 rows of 8, matrix j = rows 8j .. 8j+7):
// out[4 * lane + j] = register j of the lane (0 past the form's count). One warp.
__global__ void ldmatrix_raw(const int* values, unsigned* out, int variant) {
  alignas(16) __shared__ unsigned short tile[32][8 + kPad];
  const unsigned lane = threadIdx.x % 32;
  for (int i = lane; i < 32 * 8; i += 32) {
    tile[i / 8][i % 8] = static_cast<unsigned short>(values[i]);
  }
  __syncwarp();
  const int count = variant % 3 == 0 ? 1 : variant % 3 == 1 ? 2 : 4;
  const void* row = &tile[lane % (8 * count)][0];
  unsigned reg[4] = {0, 0, 0, 0};
  switch (variant) {
    case 0:
      cupydcn::tc::ldmatrix_x1(reg[0], row);
      break;
    case 1:
      cupydcn::tc::ldmatrix_x2(reg[0], reg[1], row);
      break;
    case 2:
      cupydcn::tc::ldmatrix_x4(reg[0], reg[1], reg[2], reg[3], row);
      break;
    case 3:
      cupydcn::tc::ldmatrix_x1_trans(reg[0], row);
      break;
    case 4:
      cupydcn::tc::ldmatrix_x2_trans(reg[0], reg[1], row);
      break;
    default:
      cupydcn::tc::ldmatrix_x4_trans(reg[0], reg[1], reg[2], reg[3], row);
      break;
  }
  for (int q = 0; q < 4; ++q) out[4 * lane + q] = reg[q];
}

// Each mode misuses the warp-level primitives in one way (out: 4 floats per thread):
//   0 a misaligned ldmatrix row address      1 an ldmatrix row address in global memory
//   2 half the warp at ldmatrix, half at mma  3 lane 5 exits before an mma
//   4 lane 7 at a __syncwarp of the kernel    5 the warp's halves at two mma call sites
//   6 a correct mma (zero fragments)          7 half the warp at mma, half at __syncthreads
__global__ void misuse(float* out, int mode) {
  alignas(16) __shared__ unsigned short tile[8][8];
  const unsigned lane = threadIdx.x % 32;
  if (threadIdx.x < 64) tile[threadIdx.x / 8][threadIdx.x % 8] = 1;
  __syncthreads();
  FragA16 fa = {{0, 0, 0, 0}};
  FragB16 fb = {{0, 0}};
  FragC acc = {{0.0f, 0.0f, 0.0f, 0.0f}};
  unsigned reg = 0;
  if (mode == 0) {
    cupydcn::tc::ldmatrix_x1(reg, &tile[lane % 8][1]);
  } else if (mode == 1) {
    cupydcn::tc::ldmatrix_x1(reg, out);
  } else if (mode == 2) {
    if (lane < 16) {
      cupydcn::tc::ldmatrix_x1(reg, &tile[lane % 8][0]);
    } else {
      cupydcn::tc::mma_m16n8k16<__half>(acc, fa, fb, acc);
    }
  } else if (mode == 3) {
    if (lane == 5) return;
    cupydcn::tc::mma_m16n8k16<__half>(acc, fa, fb, acc);
  } else if (mode == 4) {
    if (lane == 7) {
      __syncwarp();
    } else {
      cupydcn::tc::mma_m16n8k16<__half>(acc, fa, fb, acc);
    }
  } else if (mode == 5) {
    if (lane < 16) {
      cupydcn::tc::mma_m16n8k16<__half>(acc, fa, fb, acc);
    } else {
      cupydcn::tc::mma_m16n8k16<__half>(acc, fa, fb, acc);
    }
  } else if (mode == 6) {
    cupydcn::tc::mma_m16n8k16<__half>(acc, fa, fb, acc);
  } else {
    if (lane < 16) {
      cupydcn::tc::mma_m16n8k16<__half>(acc, fa, fb, acc);
    } else {
      __syncthreads();
    }
  }
  for (int q = 0; q < 4; ++q) out[4 * threadIdx.x + q] = acc.x[q] + static_cast<float>(reg);
}

}  // namespace tctest
