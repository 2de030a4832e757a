// Test kernels that misuse barriers, warp collectives or memory, each of which the emulator
// must report instead of hanging or computing garbage (tests/emulator/test_cooperative.py).

namespace emutest {

// Thread 3 returns before a barrier the others wait at.
__global__ void barrier_after_exit(float* output) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  output[threadIdx.x] = 1.0f;
}

// Odd and even threads wait at different barriers.
__global__ void divergent_barriers(float* output) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  output[threadIdx.x] = 1.0f;
}

// Lane 5 exits; the others shuffle with a mask that names it.
__global__ void shuffle_after_exit(float* output) {
  if (threadIdx.x % warpSize == 5) return;
  output[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, 1.0f, 1);
}

// The lower half of the warp shuffles with the full mask while the upper half waits at a
// block barrier.
__global__ void shuffle_against_barrier(float* output) {
  if (threadIdx.x < 16) {
    output[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, 1.0f, 1);
  } else {
    __syncthreads();
  }
}

// Every lane passes mask 1, which names lane 0 only.
__global__ void mask_without_caller(float* output) {
  output[threadIdx.x] = __shfl_sync(1u, 1.0f, 0);
}

// A shuffle width that is not a power of two.
__global__ void bad_width(float* output, int width) {
  output[threadIdx.x] = __shfl_down_sync(0xFFFFFFFFu, 1.0f, 1, width);
}

// Writes output[n + i] (past its end) after a barrier, inside the fibers.
__global__ void write_past_end(float* output, int n) {
  __shared__ float values[256];
  values[threadIdx.x] = 1.0f;
  __syncthreads();
  output[n + threadIdx.x] = values[threadIdx.x];
}

// Recursion with a 4 KiB frame `depth` deep: past the fiber stack (and its guard page) for
// depth > 64.
__noinline__ __device__ int deep(int depth) {
  volatile char frame[4096];
  frame[0] = static_cast<char>(depth);
  frame[4095] = frame[0];
  return depth == 0 ? frame[4095] : deep(depth - 1) + frame[4095];
}
__global__ void overflow_stack(int* output, int depth) {
  __syncthreads();
  output[threadIdx.x] = deep(depth);
}

// Signed overflow after a barrier (UBSan reports it from inside the fiber).
__global__ void overflow_after_barrier(int* output, int big) {
  __syncthreads();
  output[threadIdx.x] = big + static_cast<int>(threadIdx.x) * big;
}

}  // namespace emutest
