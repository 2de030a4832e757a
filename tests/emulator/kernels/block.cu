// Block-level test kernels of the emulator (tests/emulator/test_cooperative.py): shared
// memory, __syncthreads and its count / and / or forms, over 3-D blocks and grids. Each block
// handles the contiguous chunk of the input at its linear block index.

namespace emutest {

__device__ inline unsigned linear_thread() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__device__ inline unsigned linear_block() {
  return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
}
__device__ inline unsigned block_threads() { return blockDim.x * blockDim.y * blockDim.z; }

// output[b] = the sum of input[b * threads .. (b + 1) * threads) (elements past n count 0),
// by a tree over shared memory.
template <typename T>
__global__ void block_sum(const T* input, T* output, int n) {
  __shared__ T partial[1024];
  const unsigned tid = linear_thread();
  const unsigned threads = block_threads();
  const unsigned index = linear_block() * threads + tid;
  partial[tid] = index < static_cast<unsigned>(n) ? input[index] : T(0);
  __syncthreads();
  unsigned span = 1;
  while (span < threads) span <<= 1;
  for (unsigned s = span / 2; s > 0; s >>= 1) {
    if (tid < s && tid + s < threads) partial[tid] += partial[tid + s];
    __syncthreads();
  }
  if (tid == 0) output[linear_block()] = partial[0];
}

// output[i] = input[the next thread's index, cyclically within the block], through shared
// memory; kBarrier = 0 drops the barrier between the write and the read (a race).
template <int kBarrier>
__global__ void rotate(const float* input, float* output) {
  __shared__ float values[1024];
  const unsigned tid = linear_thread();
  const unsigned threads = block_threads();
  const unsigned base = linear_block() * threads;
  values[tid] = input[base + tid];
  if (kBarrier) __syncthreads();
  output[base + tid] = values[(tid + 1) % threads];
}

// output[3 * b + 0 .. 2] = __syncthreads_count / _and / _or of (input[index] > 0).
__global__ void barrier_votes(const int* input, int* output) {
  const unsigned index = linear_block() * block_threads() + linear_thread();
  const int positive = input[index] > 0;
  const int count = __syncthreads_count(positive);
  const int all = __syncthreads_and(positive);
  const int any = __syncthreads_or(positive);
  if (linear_thread() == 0) {
    output[3 * linear_block() + 0] = count;
    output[3 * linear_block() + 1] = all;
    output[3 * linear_block() + 2] = any;
  }
}

// output[b * bins + k] = how many of the block's inputs equal k, counted with shared-memory
// atomics.
__global__ void shared_histogram(const int* input, int* output, int bins) {
  __shared__ int counts[64];
  const unsigned tid = linear_thread();
  for (unsigned k = tid; k < static_cast<unsigned>(bins); k += block_threads()) counts[k] = 0;
  __syncthreads();
  atomicAdd(&counts[input[linear_block() * block_threads() + tid]], 1);
  __syncthreads();
  for (unsigned k = tid; k < static_cast<unsigned>(bins); k += block_threads()) {
    output[linear_block() * bins + k] = counts[k];
  }
}

// output[i] = the shared value of thread i, of which thread 0 of block b writes element 1 + b
// only: the others are read before any write, poisoned by the emulator at each block start.
__global__ void uninitialised_shared(float* output) {
  __shared__ float values[256];
  if (linear_thread() == 0) values[1 + linear_block()] = 2.0f;
  __syncthreads();
  output[linear_block() * block_threads() + linear_thread()] = values[linear_thread()];
}

// output[i] = rounds rounds of: write, barrier, read the neighbour, barrier.
__global__ void barrier_rounds(const float* input, float* output, int rounds) {
  __shared__ float values[1024];
  const unsigned tid = linear_thread();
  const unsigned threads = block_threads();
  float v = input[linear_block() * threads + tid];
  for (int r = 0; r < rounds; ++r) {
    values[tid] = v;
    __syncthreads();
    v = 0.5f * (v + values[(tid + 1) % threads]);
    __syncthreads();
  }
  output[linear_block() * threads + tid] = v;
}

}  // namespace emutest
