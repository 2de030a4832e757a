// Where a backward kernel's scatter puts its contributions grad[target] += value: the
// sinks the scatter helpers (bilinear_scatter_to, roi_align_scatter_to) call, through a
// PlaneSink, with an element index and a value. Device code only.
//
//   AtomicSink  the default mode: a floating-point atomic add into the plane (the order
//               of the additions, and so the rounding, depends on the scheduling).
//   CountSink   the deterministic mode's first pass: counts the contributions of one
//               work item.
//   RecordSink  its second pass: writes each contribution to its own slot, (target
//               index, value), from the item's first slot on; a stable sort by target
//               and segment_sum (segment_sum.cu) then add them in slot order.
#pragma once

#include "atomics.cuh"

namespace cupydcn {

template <typename A>
struct AtomicSink {
  A* grad;
  template <typename I>
  __device__ __forceinline__ void add(I element, A value) const {
    atomic_accumulate(grad + element, value);
  }
};

template <typename I>
struct CountSink {
  I count;
  template <typename A>
  __device__ __forceinline__ void add(I, A) {
    ++count;
  }
};

template <typename A, typename I>
struct RecordSink {
  I* keys;    // target element indices, one per slot
  A* values;  // contributions, one per slot
  I slot;     // the next slot to write
  __device__ __forceinline__ void add(I element, A value) {
    keys[slot] = element;
    values[slot] = value;
    ++slot;
  }
};

// A sink for one plane of a gradient: element e of the plane is element base + e of the
// whole gradient the inner sink addresses.
template <typename Sink, typename I>
struct PlaneSink {
  Sink& inner;
  I base;
  template <typename A>
  __device__ __forceinline__ void add(I element, A value) {
    inner.add(base + element, value);
  }
};

}  // namespace cupydcn
