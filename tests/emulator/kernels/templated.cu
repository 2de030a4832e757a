// A test kernel file of the emulator in the layout of cupydcn/cuda/kernels/: kernels
// cupydcn::name<T, I, kFactor> with a compile-time integer after <T, I>. The tests register it
// in the kernel_source tables for their duration only (test_cooperative.py).

namespace cupydcn {

// output[i] = input[i] * kFactor, grid-stride.
template <typename T, typename I, int kFactor>
__global__ void emulator_test_scale(const T* input, T* output, I total) {
  for (I i = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
       i < total; i += static_cast<I>(blockDim.x) * static_cast<I>(gridDim.x)) {
    output[i] = input[i] * static_cast<T>(kFactor);
  }
}

// With an explicit 3-D grid of 3-D blocks: output[6 * t + 0 .. 5] = threadIdx.x, y, z,
// blockIdx.x, y, z of the thread whose global linear index is t (x fastest; the thread of a
// block before the block), and kFactor in output[6 * total].
template <typename T, typename I, int kFactor>
__global__ void emulator_test_indices(I* output, I total) {
  const I block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const I thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const I t = block * static_cast<I>(blockDim.x * blockDim.y * blockDim.z) + thread;
  if (t >= total) return;
  I* out = output + 6 * t;
  out[0] = threadIdx.x;
  out[1] = threadIdx.y;
  out[2] = threadIdx.z;
  out[3] = blockIdx.x;
  out[4] = blockIdx.y;
  out[5] = blockIdx.z;
  if (t == 0) output[6 * total] = kFactor;
}

}  // namespace cupydcn
