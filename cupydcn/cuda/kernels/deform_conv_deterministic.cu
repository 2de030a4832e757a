// Deformable convolution, the deterministic grad_input (deterministic=True): instead of
// floating-point atomics, each contribution is written to its own slot and the slots are
// added per target in a fixed order (segment_sum.cu). Orchestrated by
// cupydcn/deform_conv/cuda_backend.py:
//
//   slots  [items]  I   pass 1 (keys == nullptr): slots[index] = the number of
//                       contributions of column element index (at most 4);
//                       the host turns it into the exclusive prefix sum;
//   keys   [M]      I   pass 2: the contributions of element index go to the slots from
//   values [M]      A   slots[index] on: keys = element of grad_input, values = the value,
//                       in the order col2im_input_item produces them.
//
// The same per-item code as the atomic grid-stride kernel of deform_conv.cu
// (col2im_input_item in conv_geometry.cuh).
#include "conv_geometry.cuh"
#include "grid_stride.cuh"
#include "scatter_sinks.cuh"

namespace cupydcn {

template <typename T, typename I>
__global__ void deform_conv_col2im_input_slots(const acc_t<T>* __restrict__ grad_columns,
                                               const T* __restrict__ offset,
                                               const T* __restrict__ mask, I* __restrict__ slots,
                                               I* __restrict__ keys, acc_t<T>* __restrict__ values,
                                               CUPYDCN_CONV_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const ConvSizes<I> s = CUPYDCN_CONV_SIZES;
  const I total = s.batch * s.channels * s.taps * s.slice_size;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    if (keys == nullptr) {
      CountSink<I> sink{I(0)};
      col2im_input_item<T, I>(index, grad_columns, offset, mask, s, sink);
      slots[index] = sink.count;
    } else {
      RecordSink<A, I> sink{keys, values, slots[index]};
      col2im_input_item<T, I>(index, grad_columns, offset, mask, s, sink);
    }
  }
}

}  // namespace cupydcn
