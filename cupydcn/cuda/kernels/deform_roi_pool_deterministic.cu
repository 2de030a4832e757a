// Deformable RoI pooling, the deterministic grad_input (deterministic=True): instead of
// floating-point atomics, each contribution is written to its own slot and the slots are
// added per target in a fixed order (segment_sum.cu). Orchestrated by
// cupydcn/roi_pool/cuda_backend.py:
//
//   slots  [items]  I   pass 1 (keys == nullptr): slots[index] = the number of
//                       contributions of grad_output element index (up to 4 per sample of
//                       its bin; the adaptive sampling grid makes it data dependent);
//                       the host turns it into the exclusive prefix sum;
//   keys   [M]      I   pass 2: the contributions of element index go to the slots from
//   values [M]      A   slots[index] on: keys = element of grad_input, values = the value,
//                       in the order roi_backward_input_item produces them.
//
// The same per-item code as the atomic kernel (deform_roi_pool.cu).
#include "deform_roi_pool.cu"
#include "scatter_sinks.cuh"

namespace cupydcn {

template <typename T, typename I>
__global__ void deform_roi_pool_backward_input_slots(
    const T* __restrict__ grad_output, const acc_t<T>* __restrict__ rois,
    const T* __restrict__ offset, const T* __restrict__ mask,
    const acc_t<T>* __restrict__ scale_and_gamma, I* __restrict__ slots, I* __restrict__ keys,
    acc_t<T>* __restrict__ values, CUPYDCN_ROI_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const RoiSizes<I> s = CUPYDCN_ROI_SIZES;
  const I total = s.num_rois * s.channels * s.bins;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    if (keys == nullptr) {
      CountSink<I> sink{I(0)};
      roi_backward_input_item<T, I>(index, grad_output, rois, offset, mask, scale_and_gamma, s,
                                    sink);
      slots[index] = sink.count;
    } else {
      RecordSink<A, I> sink{keys, values, slots[index]};
      roi_backward_input_item<T, I>(index, grad_output, rois, offset, mask, scale_and_gamma, s,
                                    sink);
    }
  }
}

}  // namespace cupydcn
