// Deformable position-sensitive RoI pooling, the deterministic grad_input
// (deterministic=True): instead of floating-point atomics, each contribution is written
// to its own slot and the slots are added per target in a fixed order (segment_sum.cu).
// Orchestrated by cupydcn/psroi_pool/cuda_backend.py:
//
//   slots  [items]  I   pass 1 (keys == nullptr): slots[index] = the number of
//                       contributions of output element index (up to 4 per kept sample);
//                       the host turns it into the exclusive prefix sum;
//   keys   [M]      I   pass 2: the contributions of element index go to the slots from
//   values [M]      A   slots[index] on: keys = element of grad_input, values = the value,
//                       in the order psroi_backward_input_item produces them.
//
// The same per-item code as the atomic kernel (deform_psroi_pool.cu).
#include "deform_psroi_pool.cu"
#include "scatter_sinks.cuh"

namespace cupydcn {

template <typename T, typename I>
__global__ void deform_psroi_pool_backward_input_slots(
    const T* __restrict__ grad_output, const acc_t<T>* __restrict__ rois,
    const T* __restrict__ offset, const acc_t<T>* __restrict__ scalars, I* __restrict__ slots,
    I* __restrict__ keys, acc_t<T>* __restrict__ values, CUPYDCN_PSROI_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const PsRoiSizes n =
      psroi_sizes(height, width, group_size, pooled_size, part_size, sample_per_part);
  const I total = num_rois * output_dim * pooled_size * pooled_size;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    if (keys == nullptr) {
      CountSink<I> sink{I(0)};
      psroi_backward_input_item<T, I>(index, grad_output, rois, offset, scalars, n, channels,
                                      output_dim, num_classes, sink);
      slots[index] = sink.count;
    } else {
      RecordSink<A, I> sink{keys, values, slots[index]};
      psroi_backward_input_item<T, I>(index, grad_output, rois, offset, scalars, n, channels,
                                      output_dim, num_classes, sink);
    }
  }
}

}  // namespace cupydcn
