// The deformable-attention family (docs/semantics.md section 8): multi-scale deformable
// attention (Deformable DETR / mmcv), DCNv3 (InternImage) and DCNv4 (its packed
// offset_mask layout), forward and backward, on one sampling core.
//
// Device code only; templates over the element type T (double, float, __half,
// __nv_bfloat16) and the index type I (int, or long long past 2^31 elements). Buffers and
// launches live in cupydcn/deform_attn/cuda_backend.py; the parameter lists are mirrored in
// KERNEL_PARAMETERS of cupydcn/cuda/kernel_source.py.
//
// Everything is channels last. A "unit" is a query of one image (MSDA) or an output pixel
// of one image (DCN); a "head" is an attention head (MSDA) or a group (DCN), of D channels
// (head_dim / group_channels). The value map of one image and head is a plane of rows of D
// contiguous channels, pixel_stride = heads * D elements apart.
//
// Threads (no shared memory, no warp shuffles: the CPU emulator runs these kernels too).
// Each (unit, head) has lanes = max(1, ceil(D / kAttnVec)) consecutive threads; lane t
// owns the channels t, t + lanes, t + 2 lanes, ... (at most kAttnVec of them), so that the
// lanes of a head touch consecutive channels at each step: coalesced loads, and the
// grad_value atomics of one warp instruction fall in few 32-byte sectors. Per point, a
// thread computes the coordinates, the cell, the corner offsets and the bilinear weights
// once and reuses them for all its channels.
//   forward:  the thread's (at most kAttnVec) channel sums live in registers.
//   backward: per point the thread sums g_c v_c over its channels for each corner in
//             registers, and scatters (w_k a) g_c into grad_value with one atomic per
//             (in-map corner, channel). The location and weight gradients are linear in
//             those corner sums, so each lane adds its share into an accumulation-dtype
//             buffer: with one lane per head (D <= kAttnVec) a plain store, else one
//             atomic per lane and gradient. Every gradient accumulates in float32 (float64
//             for float64) and is rounded once by the caller.
//
// Arithmetic (the NumPy backend's, cupydcn/deform_attn/numpy_backend.py, in its order):
//   pixel coordinates, cell and corners: explicitly rounded operations (rounding.cuh),
//     so that the GPU build (-ftz, FMA contraction) and the host emulation decide alike;
//   a point with a coordinate outside (-2, size + 1) (infinities included) reads no
//     corner; a NaN point has NaN fractions (so NaN value, weight and coordinate
//     gradients) and scatters nothing;
//   value: w1 v1 + w2 v2 + w3 v3 + w4 v4 (mmcv's order), times the weight a, summed over
//     the points in order; out-of-map corners read 0 and are blended like the others;
//   d/dpx = (1-ly)(v2 - v1) + ly (v4 - v3), d/dpy = (1-lx)(v3 - v1) + lx (v4 - v2).
#include "accumulate.cuh"
#include "atomics.cuh"
#include "grid_stride.cuh"
#include "rounding.cuh"

namespace cupydcn {

// Channels per forward thread.
constexpr int kAttnVec = 8;

// One sample point: its fractions and the element offsets of its four corners (corner k
// = (dy, dx) = (k / 2, k % 2) from the cell's top-left; offsets are formed only for
// corners inside the map, others read 0).
template <typename A, typename I>
struct AttnPoint {
  A lx, ly;
  I offset[4];
  bool in[4];
};

// x < size + 1, exactly (as NumPy compares a float array with an integer size, in float64):
// in float while size + 1 <= 2^24 is exact there (no float64 work for real map sizes).
template <typename A, typename I>
__device__ __forceinline__ bool below_size_plus_one(A x, I size) {
  if (sizeof(A) == sizeof(float) && size < I(1 << 24)) return x < static_cast<A>(size + 1);
  return static_cast<double>(x) < static_cast<double>(size) + 1.0;
}

// The point at pixel coordinates (px, py) of a map [height, width] whose pixel (0, 0)
// starts at element ``first`` (pixels pixel_stride elements apart).
template <typename A, typename I>
__device__ __forceinline__ AttnPoint<A, I> attn_point(A px, A py, I height, I width, I first,
                                                      I pixel_stride) {
  AttnPoint<A, I> p;
  const bool near = py > A(-2) && below_size_plus_one<A, I>(py, height) && px > A(-2) &&
                    below_size_plus_one<A, I>(px, width);
  const A fy = floor(near ? py : A(-2));
  const A fx = floor(near ? px : A(-2));
  const bool is_nan = (px != px) || (py != py);
  const A nan = px + py;  // NaN when is_nan
  p.ly = near ? sub_rn(py, fy) : (is_nan ? nan : A(0));
  p.lx = near ? sub_rn(px, fx) : (is_nan ? nan : A(0));
  const I y0 = static_cast<I>(fy), x0 = static_cast<I>(fx);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const I y = y0 + I(k / 2), x = x0 + I(k % 2);
    p.in[k] = y >= 0 && y < height && x >= 0 && x < width;
    p.offset[k] = p.in[k] ? first + (y * width + x) * pixel_stride : I(0);
  }
  return p;
}

// The bilinear weights w1..w4 of a point (mmcv's order of products).
template <typename A>
struct CornerWeights {
  A w[4];
};

template <typename A, typename I>
__device__ __forceinline__ CornerWeights<A> corner_weights(const AttnPoint<A, I>& p) {
  const A hy = A(1) - p.ly, hx = A(1) - p.lx;
  CornerWeights<A> c;
  c.w[0] = hy * hx;
  c.w[1] = hy * p.lx;
  c.w[2] = p.ly * hx;
  c.w[3] = p.ly * p.lx;
  return c;
}

// The channels of a lane: lane, lane + lanes, ... below D.
template <typename I>
struct Lane {
  I lane, lanes, channels;
  __device__ __forceinline__ bool owns(int j) const { return lane + I(j) * lanes < channels; }
  __device__ __forceinline__ I channel(int j) const { return lane + I(j) * lanes; }
};

template <typename I>
__device__ __forceinline__ I lanes_for(I channels) {
  const I lanes = (channels + I(kAttnVec - 1)) / I(kAttnVec);
  return lanes > 0 ? lanes : I(1);
}

// acc[j] += a * sample of the lane's channel j.
template <typename T, typename A, typename I>
__device__ __forceinline__ void accumulate_point(A (&acc)[kAttnVec], const T* value,
                                                 const AttnPoint<A, I>& p, A a,
                                                 const Lane<I>& lane) {
  const CornerWeights<A> cw = corner_weights<A, I>(p);
#pragma unroll
  for (int j = 0; j < kAttnVec; ++j) {
    if (lane.owns(j)) {
      const I c = lane.channel(j);
      const A v1 = p.in[0] ? to_acc(value[p.offset[0] + c]) : A(0);
      const A v2 = p.in[1] ? to_acc(value[p.offset[1] + c]) : A(0);
      const A v3 = p.in[2] ? to_acc(value[p.offset[2] + c]) : A(0);
      const A v4 = p.in[3] ? to_acc(value[p.offset[3] + c]) : A(0);
      A v = cw.w[0] * v1;
      v += cw.w[1] * v2;
      v += cw.w[2] * v3;
      v += cw.w[3] * v4;
      v *= a;
      acc[j] += v;
    }
  }
}

// Per point of a backward thread: the per-corner sums over the lane's channels s_k =
// sum_c g_c v_k,c (when ``sums``) and the scatter of (w_k a) g_c into grad_value (when not
// null).
template <typename A>
struct PointSums {
  A s[4];
};

template <typename T, typename A, typename I>
__device__ __forceinline__ PointSums<A> backward_point(const T* value, const T* grad,
                                                       const Lane<I>& lane,
                                                       const AttnPoint<A, I>& p, A a, bool sums,
                                                       A* grad_value) {
  PointSums<A> out{{A(0), A(0), A(0), A(0)}};
  const CornerWeights<A> cw = corner_weights<A, I>(p);
  A wa[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) wa[k] = cw.w[k] * a;
  const bool scatter = grad_value != nullptr && (p.in[0] || p.in[1] || p.in[2] || p.in[3]);
  if (!sums && !scatter) return out;
  for (I c = lane.lane; c < lane.channels; c += lane.lanes) {
    const A g = to_acc(grad[c]);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      // Out-of-map corners read 0 and add 0 * g (as NumPy's zero row).
      if (sums) out.s[k] += (p.in[k] ? to_acc(value[p.offset[k] + c]) : A(0)) * g;
      if (scatter && p.in[k]) atomic_accumulate(grad_value + p.offset[k] + c, wa[k] * g);
    }
  }
  return out;
}

// The weight gradient and a * d value / d (px, py) of a point from its corner sums (a
// lane's share of them from its share of the sums).
template <typename A, typename I>
__device__ __forceinline__ void point_gradients(const AttnPoint<A, I>& p, const PointSums<A>& s,
                                                A a, A& value_sum, A& d_px, A& d_py) {
  const CornerWeights<A> cw = corner_weights<A, I>(p);
  value_sum = cw.w[0] * s.s[0] + cw.w[1] * s.s[1] + cw.w[2] * s.s[2] + cw.w[3] * s.s[3];
  d_px = a * ((A(1) - p.ly) * (s.s[1] - s.s[0]) + p.ly * (s.s[3] - s.s[2]));
  d_py = a * ((A(1) - p.lx) * (s.s[2] - s.s[0]) + p.lx * (s.s[3] - s.s[1]));
}

// sink[i] += v: a plain store into the zeroed buffer when this lane is the only one.
template <typename A>
__device__ __forceinline__ void add_share(A* sink, A v, bool alone) {
  if (alone) {
    *sink = v;
  } else {
    atomic_accumulate(sink, v);
  }
}

// ---------------------------------------------------------------------------- MSDA
//
// Layouts (C-contiguous; U = batch * num_queries units, T_h = levels * points):
//   value                [batch, num_keys, heads, head_dim]          T
//   spatial_shapes       [levels, 2]                                 int32 (H_l, W_l)
//   sampling_locations   [batch, num_queries, heads, levels, points, 2] T, normalised (x, y)
//   attention_weights    [batch, num_queries, heads, levels, points]    T
//   output, grad_output  [batch, num_queries, heads * head_dim]      T
//   grad_value           [batch, num_keys, heads, head_dim]          A (zeroed by the caller)
//   grad_sampling_locations, grad_attention_weights: as their inputs, A (zeroed), or nullptr
// The level starts are the prefix sums of H_l * W_l (checked by the caller).

#define CUPYDCN_MSDA_SIZE_PARAMETERS \
  I batch, I num_keys, I heads, I head_dim, I num_queries, I levels, I points

// output[n, q, m * D + c] = sum_{l, p} a * sample(value_l[n, :, :, m, c], x W_l - 0.5,
// y H_l - 0.5). One thread per (n, q, m, lane).
template <typename T, typename I>
__global__ void deform_attn_msda_forward(const T* __restrict__ value,
                                         const int* __restrict__ spatial_shapes,
                                         const T* __restrict__ sampling_locations,
                                         const T* __restrict__ attention_weights,
                                         T* __restrict__ output, CUPYDCN_MSDA_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const I lanes = lanes_for<I>(head_dim);
  const I total = batch * num_queries * heads * lanes;
  const I pixel_stride = heads * head_dim;
  const I per_head = levels * points;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const Lane<I> lane{index % lanes, lanes, head_dim};
    const I unit_head = index / lanes;  // (n * Lq + q) * M + m
    const I head = unit_head % heads;
    const I image = unit_head / heads / num_queries;
    const T* loc = sampling_locations + unit_head * per_head * 2;
    const T* weight = attention_weights + unit_head * per_head;
    I first = image * num_keys * pixel_stride + head * head_dim;  // level 0, pixel (0, 0)
    A acc[kAttnVec];
#pragma unroll
    for (int j = 0; j < kAttnVec; ++j) acc[j] = A(0);
    for (I l = 0; l < levels; ++l) {
      const I height = static_cast<I>(spatial_shapes[2 * l]);
      const I width = static_cast<I>(spatial_shapes[2 * l + 1]);
      const A height_a = static_cast<A>(height), width_a = static_cast<A>(width);
      for (I p = 0; p < points; ++p, loc += 2, ++weight) {
        const A px = sub_rn(mul_rn(to_acc(loc[0]), width_a), A(0.5));
        const A py = sub_rn(mul_rn(to_acc(loc[1]), height_a), A(0.5));
        const AttnPoint<A, I> pt = attn_point<A, I>(px, py, height, width, first, pixel_stride);
        accumulate_point<T, A, I>(acc, value, pt, to_acc(*weight), lane);
      }
      first += height * width * pixel_stride;
    }
    T* out = output + unit_head * head_dim;
#pragma unroll
    for (int j = 0; j < kAttnVec; ++j) {
      if (lane.owns(j)) out[lane.channel(j)] = from_acc<T>(acc[j]);
    }
  }
}

// Gradients given grad_output, for the non-null outputs (all A, zeroed by the caller). One
// thread per (n, q, m, lane):
//   grad_value[corner] += a * w_k * g_c                       (atomics)
//   grad_attention_weights += sum_k w_k s_k                   (s_k = sum_c g_c v_k,c)
//   grad_sampling_locations += (W_l a d_px, H_l a d_py)       (the lane's share)
template <typename T, typename I>
__global__ void deform_attn_msda_backward(
    const T* __restrict__ grad_output, const T* __restrict__ value,
    const int* __restrict__ spatial_shapes, const T* __restrict__ sampling_locations,
    const T* __restrict__ attention_weights, acc_t<T>* __restrict__ grad_value,
    acc_t<T>* __restrict__ grad_sampling_locations, acc_t<T>* __restrict__ grad_attention_weights,
    CUPYDCN_MSDA_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const I lanes = lanes_for<I>(head_dim);
  const bool alone = lanes == 1;
  const I total = batch * num_queries * heads * lanes;
  const I pixel_stride = heads * head_dim;
  const I per_head = levels * points;
  const bool sums = grad_sampling_locations != nullptr || grad_attention_weights != nullptr;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const Lane<I> lane{index % lanes, lanes, head_dim};
    const I unit_head = index / lanes;
    const I head = unit_head % heads;
    const I image = unit_head / heads / num_queries;
    const T* grad = grad_output + unit_head * head_dim;
    I first = image * num_keys * pixel_stride + head * head_dim;
    I t = unit_head * per_head;  // the point's index in attention_weights
    for (I l = 0; l < levels; ++l) {
      const I height = static_cast<I>(spatial_shapes[2 * l]);
      const I width = static_cast<I>(spatial_shapes[2 * l + 1]);
      const A height_a = static_cast<A>(height), width_a = static_cast<A>(width);
      for (I p = 0; p < points; ++p, ++t) {
        const A px = sub_rn(mul_rn(to_acc(sampling_locations[2 * t]), width_a), A(0.5));
        const A py = sub_rn(mul_rn(to_acc(sampling_locations[2 * t + 1]), height_a), A(0.5));
        const A a = to_acc(attention_weights[t]);
        const AttnPoint<A, I> pt = attn_point<A, I>(px, py, height, width, first, pixel_stride);
        const PointSums<A> s = backward_point<T, A, I>(value, grad, lane, pt, a, sums, grad_value);
        if (sums) {
          A value_sum, d_px, d_py;
          point_gradients<A, I>(pt, s, a, value_sum, d_px, d_py);
          if (grad_attention_weights != nullptr) {
            add_share(grad_attention_weights + t, value_sum, alone);
          }
          if (grad_sampling_locations != nullptr) {
            add_share(grad_sampling_locations + 2 * t, width_a * d_px, alone);
            add_share(grad_sampling_locations + 2 * t + 1, height_a * d_py, alone);
          }
        }
      }
      first += height * width * pixel_stride;
    }
  }
}

#undef CUPYDCN_MSDA_SIZE_PARAMETERS

// ---------------------------------------------------------------------------- DCNv3 / v4
//
// Layouts (C-contiguous; U = batch * out_h * out_w units, P = kernel_h * kernel_w -
// remove_center points, G = group, Cg = group_channels):
//   input, grad_input (A)  [batch, height, width, G * Cg]
//   grad_offset, grad_mask (A, zeroed by the caller): as offset, mask
//   offset_scale           [1]  A
//   output, grad_output    [batch, out_h, out_w, G * Cg]
//   DCNv3 (packed_dim == 0):  offset [U, G, P, 2] (x, y), mask [U, G, P]
//   DCNv4 (packed_dim > 0):   offset is offset_mask [U, packed_dim]: group g's 2P offsets
//       at g * 3P + 2k (+1), its P mask values at g * 3P + 2P + k; mask (and grad_mask) are
//       unused (nullptr); grad_offset is grad_offset_mask and gets the mask gradient too
//       (its padding is never written: zeroed by the caller).
// Taps x-major, k = iw * kernel_h + ih, the centre (kw / 2, kh / 2) skipped when
// remove_center. Pixel coordinates, with c = (dil * (k - 1)) / 2 and s = offset_scale:
//   p0 = (c - pad + o * stride) - c * s,  p = p0 + (i * dil + offset) * s.

#define CUPYDCN_DCN_SIZE_PARAMETERS                                                          \
  I batch, I height, I width, I group, I group_channels, I kernel_h, I kernel_w, I stride_h, \
      I stride_w, I pad_h, I pad_w, I dil_h, I dil_w, I out_h, I out_w, I remove_center,     \
      I packed_dim

// Where a (unit, group)'s offsets and mask values start and how they are spaced.
template <typename I>
struct DcnLayout {
  I points;
  I offset_unit, offset_group;  // strides of the offsets' (unit, group)
  I mask_unit, mask_group;      // strides of the mask values' (unit, group)
  I mask_start;                 // first mask value within a (unit, group) block
};

template <typename I>
__device__ __forceinline__ DcnLayout<I> dcn_layout(I group, I kernel_h, I kernel_w, I remove_center,
                                                   I packed_dim) {
  DcnLayout<I> d;
  d.points = kernel_h * kernel_w - (remove_center != 0 ? I(1) : I(0));
  if (packed_dim > 0) {
    d.offset_unit = d.mask_unit = packed_dim;
    d.offset_group = d.mask_group = I(3) * d.points;
    d.mask_start = I(2) * d.points;
  } else {
    d.offset_unit = group * d.points * I(2);
    d.offset_group = d.points * I(2);
    d.mask_unit = group * d.points;
    d.mask_group = d.points;
    d.mask_start = 0;
  }
  return d;
}

// The base coordinates p0 of output pixel (oy, ox), in A.
template <typename A, typename I>
__device__ __forceinline__ void dcn_origin(I oy, I ox, I kernel_h, I kernel_w, I stride_h,
                                           I stride_w, I pad_h, I pad_w, I dil_h, I dil_w, A scale,
                                           A& p0_x, A& p0_y) {
  const I centre_w = (dil_w * (kernel_w - 1)) / 2;
  const I centre_h = (dil_h * (kernel_h - 1)) / 2;
  p0_x = sub_rn(static_cast<A>(centre_w - pad_w + ox * stride_w),
                mul_rn(static_cast<A>(centre_w), scale));
  p0_y = sub_rn(static_cast<A>(centre_h - pad_h + oy * stride_h),
                mul_rn(static_cast<A>(centre_h), scale));
}

// Calls visit(k, iw, ih) for every point in channel order.
template <typename I, typename Visit>
__device__ __forceinline__ void for_each_tap(I kernel_h, I kernel_w, I remove_center,
                                             Visit&& visit) {
  I k = 0;
  for (I iw = 0; iw < kernel_w; ++iw) {
    for (I ih = 0; ih < kernel_h; ++ih) {
      if (remove_center != 0 && iw == kernel_w / 2 && ih == kernel_h / 2) continue;
      visit(k, iw, ih);
      ++k;
    }
  }
}

// output[n, oy, ox, g * Cg + c] = sum_k m_k * sample(input[n, :, :, g * Cg + c], p_k).
// One thread per (n, oy, ox, g, lane).
template <typename T, typename I>
__global__ void deform_attn_dcn_forward(const T* __restrict__ input, const T* __restrict__ offset,
                                        const T* __restrict__ mask,
                                        const acc_t<T>* __restrict__ offset_scale,
                                        T* __restrict__ output, CUPYDCN_DCN_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const DcnLayout<I> d = dcn_layout<I>(group, kernel_h, kernel_w, remove_center, packed_dim);
  const T* mask_array = packed_dim > 0 ? offset : mask;
  const A scale = offset_scale[0];
  const I lanes = lanes_for<I>(group_channels);
  const I total = batch * out_h * out_w * group * lanes;
  const I pixel_stride = group * group_channels;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const Lane<I> lane{index % lanes, lanes, group_channels};
    const I unit_group = index / lanes;  // ((n * out_h + oy) * out_w + ox) * G + g
    const I g = unit_group % group;
    const I unit = unit_group / group;
    const I ox = unit % out_w;
    const I oy = (unit / out_w) % out_h;
    const I image = unit / (out_w * out_h);
    const T* off = offset + unit * d.offset_unit + g * d.offset_group;
    const T* msk = mask_array + unit * d.mask_unit + g * d.mask_group + d.mask_start;
    const I first = image * height * width * pixel_stride + g * group_channels;
    A p0_x, p0_y;
    dcn_origin<A, I>(oy, ox, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                     scale, p0_x, p0_y);
    A acc[kAttnVec];
#pragma unroll
    for (int j = 0; j < kAttnVec; ++j) acc[j] = A(0);
    for_each_tap<I>(kernel_h, kernel_w, remove_center, [&](I k, I iw, I ih) {
      const A px =
          add_rn(p0_x, mul_rn(add_rn(static_cast<A>(iw * dil_w), to_acc(off[2 * k])), scale));
      const A py =
          add_rn(p0_y, mul_rn(add_rn(static_cast<A>(ih * dil_h), to_acc(off[2 * k + 1])), scale));
      const AttnPoint<A, I> pt = attn_point<A, I>(px, py, height, width, first, pixel_stride);
      accumulate_point<T, A, I>(acc, input, pt, to_acc(msk[k]), lane);
    });
    T* out = output + unit_group * group_channels;
#pragma unroll
    for (int j = 0; j < kAttnVec; ++j) {
      if (lane.owns(j)) out[lane.channel(j)] = from_acc<T>(acc[j]);
    }
  }
}

// Gradients given grad_output, for the non-null outputs (all A, zeroed by the caller). One
// thread per (n, oy, ox, g, lane):
//   grad_input[corner] += m_k * w * g_c                                  (atomics)
//   grad_mask += sum_k w_k s_k,  grad_offset += (s * m d_px, s * m d_py)  (the lane's share)
// (packed: both into grad_offset, the offset_mask layout).
template <typename T, typename I>
__global__ void deform_attn_dcn_backward(
    const T* __restrict__ grad_output, const T* __restrict__ input, const T* __restrict__ offset,
    const T* __restrict__ mask, const acc_t<T>* __restrict__ offset_scale,
    acc_t<T>* __restrict__ grad_input, acc_t<T>* __restrict__ grad_offset,
    acc_t<T>* __restrict__ grad_mask, CUPYDCN_DCN_SIZE_PARAMETERS) {
  using A = acc_t<T>;
  const DcnLayout<I> d = dcn_layout<I>(group, kernel_h, kernel_w, remove_center, packed_dim);
  const T* mask_array = packed_dim > 0 ? offset : mask;
  A* grad_mask_array = packed_dim > 0 ? grad_offset : grad_mask;
  const A scale = offset_scale[0];
  const I lanes = lanes_for<I>(group_channels);
  const bool alone = lanes == 1;
  const I total = batch * out_h * out_w * group * lanes;
  const I pixel_stride = group * group_channels;
  const bool sums = grad_offset != nullptr || grad_mask_array != nullptr;
  CUPYDCN_GRID_STRIDE_LOOP(index, I, total) {
    const Lane<I> lane{index % lanes, lanes, group_channels};
    const I unit_group = index / lanes;
    const I g = unit_group % group;
    const I unit = unit_group / group;
    const I ox = unit % out_w;
    const I oy = (unit / out_w) % out_h;
    const I image = unit / (out_w * out_h);
    const I offset_at = unit * d.offset_unit + g * d.offset_group;
    const I mask_at = unit * d.mask_unit + g * d.mask_group + d.mask_start;
    const T* grad = grad_output + unit_group * group_channels;
    const I first = image * height * width * pixel_stride + g * group_channels;
    A p0_x, p0_y;
    dcn_origin<A, I>(oy, ox, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                     scale, p0_x, p0_y);
    for_each_tap<I>(kernel_h, kernel_w, remove_center, [&](I k, I iw, I ih) {
      const T* off = offset + offset_at + 2 * k;
      const A px = add_rn(p0_x, mul_rn(add_rn(static_cast<A>(iw * dil_w), to_acc(off[0])), scale));
      const A py = add_rn(p0_y, mul_rn(add_rn(static_cast<A>(ih * dil_h), to_acc(off[1])), scale));
      const A m = to_acc(mask_array[mask_at + k]);
      const AttnPoint<A, I> pt = attn_point<A, I>(px, py, height, width, first, pixel_stride);
      const PointSums<A> s = backward_point<T, A, I>(input, grad, lane, pt, m, sums, grad_input);
      if (sums) {
        A value_sum, d_px, d_py;
        point_gradients<A, I>(pt, s, m, value_sum, d_px, d_py);
        if (grad_mask_array != nullptr) add_share(grad_mask_array + mask_at + k, value_sum, alone);
        if (grad_offset != nullptr) {
          add_share(grad_offset + offset_at + 2 * k, scale * d_px, alone);
          add_share(grad_offset + offset_at + 2 * k + 1, scale * d_py, alone);
        }
      }
    });
  }
}

#undef CUPYDCN_DCN_SIZE_PARAMETERS

}  // namespace cupydcn
