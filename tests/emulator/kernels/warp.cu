// Warp-level test kernels of the emulator (tests/emulator/test_cooperative.py): shuffles in
// width segments, votes, match and reduce intrinsics. One 1-D block; lane = threadIdx.x % 32.

namespace emutest {

// The mask of the lanes of the caller's warp that exist (a partial last warp has fewer).
__device__ inline unsigned warp_lanes_mask() {
  const unsigned first = threadIdx.x - threadIdx.x % warpSize;
  const unsigned lanes = blockDim.x - first < 32 ? blockDim.x - first : 32;
  return lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1;
}

// Butterfly: every lane ends with the sum of its width segment.
template <typename T>
__global__ void xor_sum(const T* input, T* output, int width) {
  T v = input[threadIdx.x];
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xFFFFFFFFu, v, offset, width);
  }
  output[threadIdx.x] = v;
}

// Reduction down the segment: lane 0 of each segment ends with its sum; every lane adds what
// __shfl_down_sync gives it (its own value past the segment's end).
template <typename T>
__global__ void down_sum(const T* input, T* output, int width) {
  T v = input[threadIdx.x];
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xFFFFFFFFu, v, offset, width);
  }
  output[threadIdx.x] = v;
}

// Inclusive prefix sums within each width segment.
template <typename T>
__global__ void up_scan(const T* input, T* output, int width) {
  T v = input[threadIdx.x];
  const int lane = static_cast<int>(threadIdx.x % warpSize) % width;
  for (int offset = 1; offset < width; offset *= 2) {
    const T before = __shfl_up_sync(0xFFFFFFFFu, v, offset, width);
    if (lane >= offset) v += before;
  }
  output[threadIdx.x] = v;
}

// output[i] = the value of lane source[i] of i's width segment (__shfl_sync).
__global__ void gather(const float* input, const int* source, float* output, int width) {
  output[threadIdx.x] = __shfl_sync(0xFFFFFFFFu, input[threadIdx.x], source[threadIdx.x], width);
}

// output[3 * i + 0 .. 2] = __shfl_up_sync(delta), __shfl_down_sync(delta) and
// __shfl_xor_sync(lane_mask) of input[i], in segments of width.
__global__ void shifts(const float* input, float* output, int delta, int lane_mask, int width) {
  const float v = input[threadIdx.x];
  float* out = output + 3 * threadIdx.x;
  out[0] = __shfl_up_sync(0xFFFFFFFFu, v, static_cast<unsigned>(delta), width);
  out[1] = __shfl_down_sync(0xFFFFFFFFu, v, static_cast<unsigned>(delta), width);
  out[2] = __shfl_xor_sync(0xFFFFFFFFu, v, lane_mask, width);
}

// The sum of each warp's inputs into output[warp], for any block size: the mask names the
// warp's existing lanes, and a lane adds only what comes from one of them (kGuard = 1; with
// kGuard = 0 it adds what lanes outside the mask "give": undefined, NaN in the emulator).
template <int kGuard>
__global__ void partial_warp_sum(const float* input, float* output) {
  const unsigned mask = warp_lanes_mask();
  const unsigned lanes = __popc(mask);
  const unsigned lane = threadIdx.x % warpSize;
  float v = input[threadIdx.x];
  for (unsigned offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_down_sync(mask, v, offset);
    if (!kGuard || lane + offset < lanes) v += other;
  }
  if (lane == 0) output[threadIdx.x / warpSize] = v;
}

// Per thread, kVotes results (see the Python model in test_cooperative.py).
constexpr int kVotes = 12;
__global__ void votes(const int* input, unsigned* output) {
  const unsigned mask = warp_lanes_mask();
  const int p = input[threadIdx.x];
  const unsigned lane = threadIdx.x % warpSize;
  unsigned* out = output + kVotes * threadIdx.x;
  out[0] = __ballot_sync(mask, p & 1);
  out[1] = static_cast<unsigned>(__any_sync(mask, p == 7));
  out[2] = static_cast<unsigned>(__all_sync(mask, p >= 0));
  out[3] = __match_any_sync(mask, p % 5);
  out[4] = __reduce_add_sync(mask, static_cast<unsigned>(p));
  out[5] = static_cast<unsigned>(__reduce_min_sync(mask, p - 50));
  out[6] = __reduce_max_sync(mask, static_cast<unsigned>(p));
  out[7] = __activemask();
  int same = 0;
  out[8] = __match_all_sync(mask, p / 1000, &same);
  out[9] = static_cast<unsigned>(same);
  out[10] = static_cast<unsigned>(__reduce_add_sync(mask, p - 50));
  // the lower half of each warp votes alone
  const unsigned low = mask & 0xFFFFu;
  out[11] = lane < 16 ? __ballot_sync(low, p & 2) : 0xDEADu;
  __syncwarp(mask);
}

}  // namespace emutest
