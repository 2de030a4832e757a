// cp.async test kernels (tests/emulator/test_tensor_core.py): deferred copies and their
// groups, zero fill, 4-byte copies, misuse, and a cp.async -> ldmatrix -> mma pipeline.
// 1-D blocks; the same file builds with NVRTC for every target architecture.
#include "tensor_core.cuh"

namespace tctest {

constexpr int kMaxThreads = 128;

// Each thread t copies src[4t .. 4t+3] (16 bytes) to shared memory and records what it reads
// (T threads, 4T floats per section of out, block b at src + 8T b and out + 24T b):
//   mode 0: group 0 = chunk t of src[0, 4T), group 1 = chunk t of src[4T, 8T);
//           section 0: its chunk of group 0 before any wait; 1, 2: its chunks of groups 0 and 1
//           after wait<1>; 3: group 1's after wait<0>; 4: thread (t + 1) % T's chunk of
//           group 0 after a __syncthreads; 5: its group-0 chunk after an empty group is
//           committed on top of a new copy of it, after wait<1>
//   mode 1: zero fill: chunk t copied with src_bytes = t % 17 (0 .. 16) and the source of
//           thread 0 the array's base with 0 bytes; section 0 after wait<0>
//   mode 2: 4-byte copies of src[t]: section 0 (first T floats) before the wait, section 1
//           after wait<0>
//   mode 3: a copy never committed: section 0 after wait<0> (still pending), section 1 after
//           commit + wait<0>
//   mode 4: block 0 commits copies to buffer 0 and never waits (they are dropped when the
//           block ends), section 0 its destination; block 1 copies to buffer 1 and waits,
//           section 0 its buffer 0 (untouched by block 0's copies), section 1 its buffer 1
__global__ void async_copy(const float* src, float* out, int mode) {
  alignas(16) __shared__ float buffer[2][4 * kMaxThreads];
  const int t = threadIdx.x, T = blockDim.x;
  const float* source = src + 8 * T * blockIdx.x;
  float* sections = out + 24 * T * blockIdx.x;
  const auto record = [&](int section, const float* chunk) {
    for (int q = 0; q < 4; ++q) sections[section * 4 * T + 4 * t + q] = chunk[q];
  };
  if (mode == 0) {
    cupydcn::tc::cp_async_16(&buffer[0][4 * t], source + 4 * t);
    cupydcn::tc::cp_async_commit();
    cupydcn::tc::cp_async_16(&buffer[1][4 * t], source + 4 * T + 4 * t);
    cupydcn::tc::cp_async_commit();
    record(0, &buffer[0][4 * t]);
    cupydcn::tc::cp_async_wait<1>();
    record(1, &buffer[0][4 * t]);
    record(2, &buffer[1][4 * t]);
    cupydcn::tc::cp_async_wait<0>();
    record(3, &buffer[1][4 * t]);
    __syncthreads();
    record(4, &buffer[0][4 * ((t + 1) % T)]);
    __syncthreads();
    for (int q = 0; q < 4; ++q) buffer[0][4 * t + q] = -1.0f;
    cupydcn::tc::cp_async_16(&buffer[0][4 * t], source + 4 * t);
    cupydcn::tc::cp_async_commit();
    cupydcn::tc::cp_async_commit();  // an empty group: wait<1> leaves only it pending
    cupydcn::tc::cp_async_wait<1>();
    record(5, &buffer[0][4 * t]);
  } else if (mode == 1) {
    const float* from = t == 0 ? src : source + 4 * t;
    cupydcn::tc::cp_async_16_zfill(&buffer[0][4 * t], from, t == 0 ? 0 : t % 17);
    cupydcn::tc::cp_async_commit();
    cupydcn::tc::cp_async_wait<0>();
    record(0, &buffer[0][4 * t]);
  } else if (mode == 2) {
    cupydcn::tc::cp_async_4(&buffer[0][t], source + t);
    cupydcn::tc::cp_async_commit();
    sections[t] = buffer[0][t];
    cupydcn::tc::cp_async_wait<0>();
    sections[T + t] = buffer[0][t];
  } else if (mode == 3) {
    cupydcn::tc::cp_async_16(&buffer[0][4 * t], source + 4 * t);
    cupydcn::tc::cp_async_wait<0>();
    record(0, &buffer[0][4 * t]);
    cupydcn::tc::cp_async_commit();
    cupydcn::tc::cp_async_wait<0>();
    record(1, &buffer[0][4 * t]);
  } else if (blockIdx.x == 0) {
    cupydcn::tc::cp_async_16(&buffer[0][4 * t], source + 4 * t);
    cupydcn::tc::cp_async_commit();
    record(0, &buffer[0][4 * t]);
  } else {
    cupydcn::tc::cp_async_16(&buffer[1][4 * t], source + 4 * t);
    cupydcn::tc::cp_async_commit();
    cupydcn::tc::cp_async_wait<0>();
    record(0, &buffer[0][4 * t]);
    record(1, &buffer[1][4 * t]);
  }
}

// Each mode misuses cp.async in one way (src: at least 8 floats):
//   0 a misaligned shared address      1 a misaligned global address
//   2 a shared address in global memory 3 a global address in shared memory
//   4 src_bytes 17                      5 a 4-byte copy to an address 2 bytes off
//   6 a source past the end of src (n floats)
__global__ void async_misuse(const float* src, float* out, int mode, int n) {
  alignas(16) __shared__ float buffer[8];
  alignas(16) __shared__ float other[8];
  unsigned char* bytes = reinterpret_cast<unsigned char*>(buffer);
  if (threadIdx.x == 0) {
    if (mode == 0) cupydcn::tc::cp_async_16(buffer + 1, src);
    if (mode == 1) cupydcn::tc::cp_async_16(buffer, src + 1);
    if (mode == 2) cupydcn::tc::cp_async_16(out, src);
    if (mode == 3) cupydcn::tc::cp_async_16(buffer, other);
    if (mode == 4) cupydcn::tc::cp_async_16_zfill(buffer, src, 17);
    if (mode == 5) cupydcn::tc::cp_async_4(bytes + 2, src);
    if (mode == 6) cupydcn::tc::cp_async_16(buffer, src + n);
    cupydcn::tc::cp_async_commit();
    cupydcn::tc::cp_async_wait<0>();
  }
  __syncthreads();
  out[threadIdx.x] = buffer[threadIdx.x % 8];
}

// D = A B + C per warp as mma_global, the operand tiles of each 16-deep k-step brought to
// shared memory with cp.async (double-buffered: the next step's copies in flight during this
// step's mma), A loaded with ldmatrix_x4 and B with ldmatrix_x2_trans.
template <typename T>
__global__ void pipeline(const T* a, const T* b, const float* c, float* d, int ksteps) {
  constexpr int kWarps = kMaxThreads / 32;
  alignas(16) __shared__ T a_tile[2][kWarps][16][16 + 8];
  alignas(16) __shared__ T b_tile[2][kWarps][16][8 + 8];
  const unsigned w = (blockIdx.x * blockDim.x + threadIdx.x) / 32, wb = threadIdx.x / 32;
  const unsigned lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3, j = lane >> 3, r = lane & 7;
  const int k_total = 16 * ksteps;
  const T* A = a + w * 16 * k_total;
  const T* B = b + w * k_total * 8;
  const auto fetch = [&](int s) {  // lane: one 16-byte piece of A (row lane / 2), of B (row lane)
    const int stage = s % 2, row = lane / 2, half = lane % 2;
    cupydcn::tc::cp_async_16(&a_tile[stage][wb][row][8 * half],
                             A + row * k_total + 16 * s + 8 * half);
    if (lane < 16) cupydcn::tc::cp_async_16(&b_tile[stage][wb][lane][0], B + (16 * s + lane) * 8);
    cupydcn::tc::cp_async_commit();
  };
  const float* C = c + w * 128;
  cupydcn::tc::FragC acc;
  acc.x[0] = C[g * 8 + 2 * t];
  acc.x[1] = C[g * 8 + 2 * t + 1];
  acc.x[2] = C[(g + 8) * 8 + 2 * t];
  acc.x[3] = C[(g + 8) * 8 + 2 * t + 1];
  fetch(0);
  for (int s = 0; s < ksteps; ++s) {
    if (s + 1 < ksteps) {
      fetch(s + 1);
      cupydcn::tc::cp_async_wait<1>();
    } else {
      cupydcn::tc::cp_async_wait<0>();
    }
    __syncwarp();  // the warp's lanes' copies of step s have all landed
    const int stage = s % 2;
    cupydcn::tc::FragA16 fa;
    cupydcn::tc::FragB16 fb;
    cupydcn::tc::ldmatrix_x4(fa.x[0], fa.x[1], fa.x[2], fa.x[3],
                             &a_tile[stage][wb][r + 8 * (j & 1)][8 * (j >> 1)]);
    cupydcn::tc::ldmatrix_x2_trans(fb.x[0], fb.x[1], &b_tile[stage][wb][8 * (j & 1) + r][0]);
    cupydcn::tc::mma_m16n8k16<T>(acc, fa, fb, acc);
    __syncwarp();  // every lane has read the stage before step s + 2's copies overwrite it
  }
  float* D = d + w * 128;
  D[g * 8 + 2 * t] = acc.x[0];
  D[g * 8 + 2 * t + 1] = acc.x[1];
  D[(g + 8) * 8 + 2 * t] = acc.x[2];
  D[(g + 8) * 8 + 2 * t + 1] = acc.x[3];
}

}  // namespace tctest
