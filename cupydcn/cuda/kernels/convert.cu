// Elementwise conversions between an element type T and its accumulation type acc_t<T>.
// Used around the GEMMs for half types (float16 / bfloat16 are widened to float32 once and
// every result is rounded once). Device code only.
#include "dcn_common.cuh"

namespace cupydcn {

// out[i] = in[i] converted to the accumulation type.
template <typename T, typename I>
__global__ void widen_to_acc(const T* __restrict__ in, acc_t<T>* __restrict__ out, I total) {
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) { out[index] = to_acc(in[index]); }
}

// out[i] = in[i] rounded (to nearest even) from the accumulation type to T.
template <typename T, typename I>
__global__ void round_to_output(const acc_t<T>* __restrict__ in, T* __restrict__ out, I total) {
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) { out[index] = from_acc<T>(in[index]); }
}

}  // namespace cupydcn
