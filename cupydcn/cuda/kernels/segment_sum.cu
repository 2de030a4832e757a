// The reduction of the deterministic backward (deterministic=True): contributions sorted
// by target with a stable sort, so each target's run is in slot order, are added in that
// order -- no atomics, the same bits whatever the scheduling.
//
//   sorted_keys   [count]    I  target of each contribution, non-decreasing
//   sorted_values [count]    A  the contributions, in the same order
//   output        [targets]  A  output[t] = the sum of the run of t (0 for no run)
//
// One thread per target; it finds its run by binary search. Device code only.
#include "accumulate.cuh"
#include "grid_stride.cuh"

namespace cupydcn {

template <typename T, typename I>
__global__ void segment_sum(const I* __restrict__ sorted_keys,
                            const acc_t<T>* __restrict__ sorted_values,
                            acc_t<T>* __restrict__ output, I count, I targets) {
  using A = acc_t<T>;
  CUPYDCN_GRID_STRIDE_LOOP(t, I, targets) {
    I low = 0, high = count;  // first key >= t
    while (low < high) {
      const I mid = low + (high - low) / 2;
      if (sorted_keys[mid] < t) {
        low = mid + 1;
      } else {
        high = mid;
      }
    }
    A sum = A(0);
    for (I j = low; j < count && sorted_keys[j] == t; ++j) sum += sorted_values[j];
    output[t] = sum;
  }
}

}  // namespace cupydcn
