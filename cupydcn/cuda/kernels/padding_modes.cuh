// Padding modes of the deformable convolution: where a sample coordinate is read.
// Device code only.
#pragma once

namespace cupydcn {

// Where a sample coordinate p is read along a dimension of `size` pixels (docs/semantics.md
// §4). The codes are PADDING_MODE_CODES of cupydcn/deform_conv/padding.py, whose
// map_coordinates is the same function for the NumPy backend.
//   zeros:      p' = p (points outside the map read 0 in the blend)
//   border:     p' = clamp(p, 0, size - 1)
//   reflection: t = |p| mod 2(size - 1), p' = t if t <= size - 1 else 2(size - 1) - t
//               (grid_sample with align_corners=True)
// and p' = 0 when size == 1 (border, reflection). slope = dp'/dp of the branch taken:
// border 1 on the closed [0, size - 1], 0 outside; reflection sign(p) (+1 at p = 0) times
// +1 on the branch t <= size - 1, -1 on the other; 0 for size == 1. A NaN coordinate stays
// NaN, and so does an infinite one under reflection (it has no limit); border clamps
// infinities. fmod is exact, so p' is exact in every precision.
enum PaddingMode : int { PADDING_ZEROS = 0, PADDING_BORDER = 1, PADDING_REFLECTION = 2 };

template <typename A>
struct MappedCoordinate {
  A value;  // p'
  A slope;  // dp'/dp: 1, 0 or -1
};

__device__ __forceinline__ float exact_fmod(float a, float b) { return fmodf(a, b); }
__device__ __forceinline__ double exact_fmod(double a, double b) { return fmod(a, b); }

template <typename A, typename I>
__device__ __forceinline__ MappedCoordinate<A> map_coordinate(A p, I size, int mode) {
  MappedCoordinate<A> m;
  m.value = p;
  m.slope = A(1);
  if (mode == PADDING_ZEROS || p != p) return m;
  if (size <= 1) {
    m.value = A(0);
    m.slope = A(0);
    return m;
  }
  const A last = static_cast<A>(size - 1);
  if (mode == PADDING_BORDER) {
    if (p < A(0) || p > last) {
      m.value = p < A(0) ? A(0) : last;
      m.slope = A(0);
    }
    return m;
  }
  // PADDING_REFLECTION
  const A span = A(2) * last;
  const bool negative = p < A(0);
  const A t = exact_fmod(negative ? -p : p, span);  // NaN for an infinite p
  const bool folded = t > last;
  m.value = folded ? span - t : t;  // span - t is exact (Sterbenz)
  m.slope = negative != folded ? A(-1) : A(1);
  return m;
}

}  // namespace cupydcn
