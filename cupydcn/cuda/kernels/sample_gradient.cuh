// The result of sampling a plane with derivatives. Device code only.
#pragma once

namespace cupydcn {

// Value and derivatives d value / d y, d value / d x of a plane sampled at (y, x).
template <typename A>
struct SampleWithGradient {
  A value, d_dy, d_dx;
};

}  // namespace cupydcn
