// Elementwise conversions between an element type T and its accumulation type acc_t<T>.
// Used around the GEMMs for half types (float16 / bfloat16 are widened to float32 once and
// every result is rounded once). Device code only.
#include "accumulate.cuh"
#include "grid_stride.cuh"

namespace cupydcn {

// output[i] = input[i] converted to the accumulation type.
template <typename T, typename I>
__global__ void widen_to_acc(const T* __restrict__ input, acc_t<T>* __restrict__ output, I total) {
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) { output[index] = to_acc(input[index]); }
}

// output[i] = input[i] rounded (to nearest even) from the accumulation type to T.
template <typename T, typename I>
__global__ void round_to_output(const acc_t<T>* __restrict__ input, T* __restrict__ output,
                                I total) {
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) { output[index] = from_acc<T>(input[index]); }
}

}  // namespace cupydcn
