"""Vectorised NumPy backend of deform_roi_pool for CPU arrays.

Computes the function of ``cupydcn/cuda/kernels/deform_roi_pool.cu`` (docs/semantics.md §2) with the
kernels' arithmetic, in the same order and dtype where it matters (RoI boxes, bin origins,
sample coordinates, the RoIAlign blend), and the same conventions at the kinks
(``cupydcn/cuda/kernels/roi_common.cuh``): derivative 0 along a clamped coordinate and outside
[-1, H] x [-1, W], one-sided from the right at integer coordinates; a NaN sample is NaN
and adds nothing to the input gradient.

Two paths compute it. The factorised path (section "factorised path" below) sums each bin
as sum_r sum_c Ay[r] * Ax[c] * V[r, c] over the rows and columns its samples touch, with
per-axis summed bilinear weights: its cost is the bins' footprints times C, whatever the
sampling grid. It runs when the data it reads are finite: always for the backward, and for
the forward when ``FACTORISED_FORWARD`` is set (it sums in another order than the kernels,
equal to rounding; see there). The per-sample path below reproduces the kernels' sums bit
for bit and reads every corner of every sample as they do (so a NaN / inf pixel read with
weight 0 poisons the sample); it runs for the forward by default and whenever the data are
not finite.

How the per-sample path is vectorised. Loops run over the sampling grid only; each step
handles one sample of every bin of every RoI at once:

* Samples per bin (grid_h * grid_w) differ between RoIs when sampling_ratio = 0. The RoIs
  are sorted by decreasing sample count, so the RoIs that still have a sample at flat step
  ``s`` (iy = s // grid_w, ix = s % grid_w, per RoI) are a prefix of the order: step s
  works on that prefix only, and the total work is the sum of the RoIs' own grids (no
  padding to the largest).
* The input is copied once into channels-last rows ``planes [N*H*W + 1, C]`` (acc dtype)
  whose last row is zeros. A sample reads its four corner rows with one fancy index, all
  channels at once; samples outside the map or NaN point at the zero row, so no
  per-corner masks are needed, and their gradient lands in that row and is dropped.
* RoIs are processed in chunks (in sorted order), and the steps of a chunk in blocks of
  ``S`` consecutive steps, whose temporaries fit ``_WORKSPACE_BYTES``: a few RoIs with a
  1024 x 1024 grid take a few large steps, not a million small ones, and the memory of a
  call stays within the budget whatever the grid (besides its arguments, its results and
  the planes). A RoI of the block's active prefix with fewer samples than a step of the
  block samples nothing there (zero row, weight 0). The forward adds the block's samples
  in step order (a running sum), so it sums exactly as the kernels do.

Per chunk of ``n`` RoIs (``B`` = ph * pw bins, ``a`` = RoIs active at a block's first step):

    top, left        [n, ph, pw]         bin origins after the offset shift
    corner rows      [S, a, ph, pw]      4 per block
    corner values    [S, a, ph, pw, C]   gathered from planes
    output (sorted)  [n, ph, pw, C]      channels last, transposed and unsorted at the end

Half types (float16, bfloat16) compute in float32 and every returned array is rounded
once to the input dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from cupydcn.core.dtypes import acc_dtype
from cupydcn.roi_pool.spec import RoiPoolGeometry, RoiPoolGrads

# Mirrors kMaxSamplesPerAxis of cupydcn/cuda/kernels/deform_roi_pool.cu.
_MAX_SAMPLES_PER_AXIS = 1 << 30
# Bound on the temporaries of one chunk of RoIs.
_WORKSPACE_BYTES = 256 * 2**20
# Arrays of one RoI's bins x channels alive at once (output / gradient, 4 corners, blend).
_BUFFERS_PER_ROI = 8
# Bytes of the per-sample arrays of one bin that do not depend on the channel (coordinates,
# corner rows, fractions, masks; 8 bytes each).
_COORDINATE_BYTES = 24 * 8
# Huge or NaN coordinates are part of the semantics (they sample 0 or NaN), not errors.
_IGNORE_FLOAT_ERRORS = {"invalid": "ignore", "over": "ignore", "divide": "ignore"}


# ---------------------------------------------------------------------------- public


def roi_pool_forward(
    input: np.ndarray,
    rois: np.ndarray,
    offset: np.ndarray | None,
    mask: np.ndarray | None,
    geom: RoiPoolGeometry,
) -> np.ndarray:
    """Deformable RoI pooling forward on NumPy arrays.

    input [N, C, H, W], rois [K, 5] (any float dtype), offset [K, 2, ph, pw] or None,
    mask [K, 1, ph, pw] or None. Returns output [K, C, ph, pw] in the input dtype, a new
    C-contiguous array. Inputs are never written to.
    """
    acc = acc_dtype(geom.dtype_name)
    output = np.empty(geom.output_shape, dtype=input.dtype)
    if output.size == 0:
        return output
    with np.errstate(**_IGNORE_FLOAT_ERRORS):
        planes = _planes(input, acc)
        boxes = _RoiBoxes.of(rois, geom, acc)
        if FACTORISED_FORWARD and _finite(planes):
            _forward_factorised(output, planes, boxes, offset, mask, geom, acc)
            return output
        for chunk in _chunks(boxes, geom, acc):
            bins = _bins(boxes, chunk, offset, geom, acc)
            pooled = np.zeros((len(chunk), geom.pooled_h, geom.pooled_w, geom.channels), acc)
            for active, samples in _steps(bins, boxes.batch_index[chunk], geom, acc):
                block = samples.blend(*(planes[rows] for rows in samples.rows))
                # pooled + s_0 + s_1 + ... in step order, as the kernels sum
                block[0] += pooled[:active]
                np.add.accumulate(block, axis=0, out=block)
                pooled[:active] = block[-1]
                del block
            pooled /= bins.count[:, None, None, None]
            if mask is not None:
                pooled *= _per_bin(mask, chunk, acc)[..., None]
            output[chunk] = pooled.transpose(0, 3, 1, 2)
    return output


def roi_pool_backward(
    grad_output: np.ndarray,
    input: np.ndarray,
    rois: np.ndarray,
    offset: np.ndarray | None,
    mask: np.ndarray | None,
    geom: RoiPoolGeometry,
    *,
    wrt: frozenset[str],
) -> RoiPoolGrads:
    """Gradients of deformable RoI pooling on NumPy arrays.

    grad_output [K, C, ph, pw]; the other arguments as in :func:`roi_pool_forward`.
    ``wrt`` names the gradients wanted, a subset of {"input", "offset", "mask"}; the
    others come back as None, and so do grad_offset / grad_mask when offset / mask is None.
    Returns new C-contiguous arrays in the input dtype: grad_input [N, C, H, W],
    grad_offset [K, 2, ph, pw], grad_mask [K, 1, ph, pw].
    """
    acc = acc_dtype(geom.dtype_name)
    dtype = input.dtype
    want_input = "input" in wrt
    want_offset = "offset" in wrt and offset is not None
    want_mask = "mask" in wrt and mask is not None

    grad_planes = (
        np.zeros((geom.batch * geom.height * geom.width + 1, geom.channels), acc)
        if want_input
        else None
    )
    grad_offset = np.empty(geom.offset_shape, dtype=dtype) if want_offset else None
    grad_mask = np.empty(geom.mask_shape, dtype=dtype) if want_mask else None

    if geom.num_rois > 0 and (want_input or want_offset or want_mask):
        with np.errstate(**_IGNORE_FLOAT_ERRORS):
            planes = _planes(input, acc) if (want_offset or want_mask) else None
            boxes = _RoiBoxes.of(rois, geom, acc)
            factorised = (
                FACTORISED
                and _finite(grad_output)
                and (mask is None or _finite(mask))
                and (planes is None or _finite(planes))
            )
            chunks = () if factorised else _chunks(boxes, geom, acc)
            if factorised:
                _backward_factorised(
                    grad_planes,
                    grad_offset,
                    grad_mask,
                    grad_output,
                    planes,
                    boxes,
                    offset,
                    mask,
                    geom,
                    acc,
                    want_offset=want_offset,
                    want_mask=want_mask,
                )
            for chunk in chunks:
                bins = _bins(boxes, chunk, offset, geom, acc)
                batch_index = boxes.batch_index[chunk]
                # [n, ph, pw, C]: d loss / d output of the chunk's bins, channels last
                grad_bins = np.asarray(grad_output[chunk], dtype=acc).transpose(0, 2, 3, 1)
                mask_bins = None if mask is None else _per_bin(mask, chunk, acc)
                if want_input:
                    _scatter_to_planes(
                        grad_planes,
                        grad_bins,
                        mask_bins,
                        bins,
                        _steps(bins, batch_index, geom, acc),
                    )
                if not (want_offset or want_mask):
                    continue
                value_sum, dy_sum, dx_sum = _coordinate_sums(
                    planes, grad_bins, _steps(bins, batch_index, geom, acc)
                )
                if want_mask:
                    grad_mask[chunk, 0] = value_sum / bins.count[:, None, None]
                if want_offset:
                    per_sample = (acc.type(1) if mask_bins is None else mask_bins) / (
                        bins.count[:, None, None]
                    )
                    gamma = acc.type(geom.gamma)
                    grad_offset[chunk, 0] = (gamma * bins.roi_w)[:, None, None] * (
                        dx_sum * per_sample
                    )
                    grad_offset[chunk, 1] = (gamma * bins.roi_h)[:, None, None] * (
                        dy_sum * per_sample
                    )

    grad_input = None
    if grad_planes is not None:
        grad_input = np.ascontiguousarray(
            grad_planes[:-1]
            .reshape(geom.batch, geom.height, geom.width, geom.channels)
            .transpose(0, 3, 1, 2),
            dtype=dtype,
        )
    return RoiPoolGrads(grad_input, grad_offset, grad_mask)


# ---------------------------------------------------------------------------- RoIs and bins


@dataclass(frozen=True)
class _RoiBoxes:
    """Per-RoI quantities that do not depend on the bin, [K] each, in the acc dtype
    (grids and batch index as integers), and the processing order."""

    batch_index: np.ndarray  # intp
    start_y: np.ndarray  # y1 * scale - 0.5
    start_x: np.ndarray
    roi_h: np.ndarray  # (y2 * scale - 0.5) - start_y, not clamped
    roi_w: np.ndarray
    grid_h: np.ndarray  # samples per bin along y (int64, >= 0)
    grid_w: np.ndarray
    order: np.ndarray  # RoIs by decreasing grid_h * grid_w (stable)

    @classmethod
    def of(cls, rois: np.ndarray, geom: RoiPoolGeometry, acc: np.dtype) -> _RoiBoxes:
        values = np.asarray(rois, dtype=acc)
        scale, half = acc.type(geom.spatial_scale), acc.type(0.5)
        start_x = values[:, 1] * scale - half
        start_y = values[:, 2] * scale - half
        roi_w = (values[:, 3] * scale - half) - start_x
        roi_h = (values[:, 4] * scale - half) - start_y
        grid_h = _samples_per_axis(geom.sampling_ratio, roi_h, geom.pooled_h, acc)
        grid_w = _samples_per_axis(geom.sampling_ratio, roi_w, geom.pooled_w, acc)
        order = np.argsort(-(grid_h * grid_w), kind="stable")
        return cls(
            values[:, 0].astype(np.intp), start_y, start_x, roi_h, roi_w, grid_h, grid_w, order
        )


def _samples_per_axis(
    sampling_ratio: int, roi_size: np.ndarray, pooled: int, acc: np.dtype
) -> np.ndarray:
    """sampling_ratio if positive, else ceil(roi_size / pooled); clamped to [0, cap]."""
    if sampling_ratio > 0:
        return np.full(roi_size.shape, min(sampling_ratio, _MAX_SAMPLES_PER_AXIS), np.int64)
    adaptive = np.ceil(roi_size / acc.type(pooled))
    positive = adaptive > 0  # False for NaN
    capped = np.minimum(np.where(positive, adaptive, 0), _MAX_SAMPLES_PER_AXIS)
    return capped.astype(np.int64)


def _chunks(boxes: _RoiBoxes, geom: RoiPoolGeometry, acc: np.dtype) -> Iterator[np.ndarray]:
    """Runs of RoI indices, consecutive in ``boxes.order``, sized to the workspace."""
    size = max(1, _WORKSPACE_BYTES // (geom.bins * _bytes_per_sample(geom, acc)))
    for start in range(0, geom.num_rois, size):
        yield boxes.order[start : start + size]


def _bytes_per_sample(geom: RoiPoolGeometry, acc: np.dtype) -> int:
    """Working bytes of one sample of one bin (all channels)."""
    return _BUFFERS_PER_ROI * max(geom.channels, 1) * acc.itemsize + _COORDINATE_BYTES


@dataclass(frozen=True)
class _Bins:
    """The bins of a chunk of RoIs (in processing order): sample-grid origins [n, ph, pw]
    and per-RoI sizes [n]."""

    top: np.ndarray
    left: np.ndarray
    bin_h: np.ndarray
    bin_w: np.ndarray
    grid_h: np.ndarray
    grid_w: np.ndarray
    count: np.ndarray  # max(grid_h * grid_w, 1) in acc
    roi_h: np.ndarray
    roi_w: np.ndarray


def _bins(
    boxes: _RoiBoxes,
    chunk: np.ndarray,
    offset: np.ndarray | None,
    geom: RoiPoolGeometry,
    acc: np.dtype,
) -> _Bins:
    roi_h, roi_w = boxes.roi_h[chunk], boxes.roi_w[chunk]
    grid_h, grid_w = boxes.grid_h[chunk], boxes.grid_w[chunk]
    bin_h = roi_h / acc.type(geom.pooled_h)
    bin_w = roi_w / acc.type(geom.pooled_w)
    start_y = boxes.start_y[chunk][:, None, None]
    start_x = boxes.start_x[chunk][:, None, None]
    if offset is not None:  # the grid above is computed before the shift
        shift = np.asarray(offset[chunk], dtype=acc)
        gamma = acc.type(geom.gamma)
        start_x = start_x + (gamma * roi_w)[:, None, None] * shift[:, 0]
        start_y = start_y + (gamma * roi_h)[:, None, None] * shift[:, 1]
    shape = (len(chunk), geom.pooled_h, geom.pooled_w)
    top = start_y + np.arange(geom.pooled_h, dtype=acc)[:, None] * bin_h[:, None, None]
    left = start_x + np.arange(geom.pooled_w, dtype=acc) * bin_w[:, None, None]
    count = np.maximum(grid_h.astype(acc) * grid_w.astype(acc), acc.type(1))
    return _Bins(
        np.broadcast_to(top, shape),
        np.broadcast_to(left, shape),
        bin_h,
        bin_w,
        grid_h,
        grid_w,
        count,
        roi_h,
        roi_w,
    )


def _per_bin(array: np.ndarray, chunk: np.ndarray, acc: np.dtype) -> np.ndarray:
    """mask [K, 1, ph, pw] of the chunk's RoIs as [n, ph, pw] in acc."""
    return np.asarray(array[chunk, 0], dtype=acc)


# ---------------------------------------------------------------------------- sampling


def _planes(input: np.ndarray, acc: np.dtype) -> np.ndarray:
    """input [N, C, H, W] as channels-last rows [N*H*W + 1, C] in acc; the last row is 0."""
    n, c, h, w = input.shape
    planes = np.empty((n * h * w + 1, c), dtype=acc)
    planes[:-1].reshape(n, h, w, c)[...] = input.transpose(0, 2, 3, 1)
    planes[-1] = 0
    return planes


@dataclass(frozen=True)
class _Samples:
    """A block of S steps: one sample of every bin of the active RoIs per step, located
    for RoIAlign sampling (cupydcn/cuda/kernels/roi_common.cuh), arrays [S, a, ph, pw].

    rows: the planes rows of the corners (low, low), (low, high), (high, low), (high, high)
    in (y, x) (equal at the last row / column; the zero row when outside or NaN).
    frac_y / frac_x: weight of the high corner (0 outside, NaN for NaN samples).
    moves_y / moves_x: 1 where the weights change with the coordinate, 0 where clamped.
    valid [S, a, 1, 1]: the RoI has a sample at that step (else it samples nothing: zero
    row, weights 0).
    """

    rows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    frac_y: np.ndarray
    frac_x: np.ndarray
    moves_y: np.ndarray
    moves_x: np.ndarray
    valid: np.ndarray

    def blend(self, v00, v01, v10, v11):
        """The samples' values from their corner values [S, a, ph, pw, C] (the kernels'
        formula)."""
        ly, lx = self.frac_y[..., None], self.frac_x[..., None]
        hy, hx = 1 - ly, 1 - lx
        return hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11)

    def blend_with_gradient(self, v00, v01, v10, v11):
        """(value, d/dy, d/dx) from corner values [S, a, ph, pw] (or channel sums of them:
        the blend is linear in the corner values); 0 where not ``valid``."""
        ly, lx = self.frac_y, self.frac_x
        hy, hx = 1 - ly, 1 - lx
        value = hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11)
        d_dy = self.moves_y * (hx * (v10 - v00) + lx * (v11 - v01))
        d_dx = self.moves_x * (hy * (v01 - v00) + ly * (v11 - v10))
        zero = value.dtype.type(0)
        return (
            np.where(self.valid, value, zero),
            np.where(self.valid, d_dy, zero),
            np.where(self.valid, d_dx, zero),
        )

    def corner_weights(self):
        """Weights of the four corners, [S, a, ph, pw] each, in the order of ``rows``."""
        ly, lx = self.frac_y, self.frac_x
        hy, hx = 1 - ly, 1 - lx
        return hy * hx, hy * lx, ly * hx, ly * lx


def _steps(
    bins: _Bins, batch_index: np.ndarray, geom: RoiPoolGeometry, acc: np.dtype
) -> Iterator[tuple[int, _Samples]]:
    """(a, samples) per block of consecutive flat sample steps s, in the kernels' order
    (iy-major): the first ``a`` RoIs of the chunk (those with more than the block's first
    s samples) sample (s // grid_w, s % grid_w) of each of their bins where they have
    more than s samples. Blocks are sized to the workspace."""
    samples = bins.grid_h * bins.grid_w  # non-increasing along the chunk
    steps = int(samples[0]) if len(samples) else 0
    per_roi_step = geom.bins * _bytes_per_sample(geom, acc)
    half = acc.type(0.5)
    step = 0
    while step < steps:
        # RoIs with more than ``step`` samples: a prefix of the chunk.
        active = int(np.searchsorted(-samples, -step, side="left"))
        size = max(1, min(steps - step, _WORKSPACE_BYTES // (active * per_roi_step)))
        block = np.arange(step, step + size)[:, None]  # [S, 1]
        grid_h, grid_w = bins.grid_h[:active], bins.grid_w[:active]
        valid = block < samples[:active]  # [S, a]
        iy, ix = np.divmod(block, grid_w)
        y = (
            bins.top[:active]
            + ((iy.astype(acc) + half) * bins.bin_h[:active] / grid_h.astype(acc))[:, :, None, None]
        )
        x = (
            bins.left[:active]
            + ((ix.astype(acc) + half) * bins.bin_w[:active] / grid_w.astype(acc))[:, :, None, None]
        )
        yield active, _locate(y, x, batch_index[:active], geom, acc, valid[:, :, None, None])
        step += size


def _axis(coord: np.ndarray, size: int, acc: np.dtype):
    """(low, step, frac, moves) of coordinates in [-1, size] (roi_align_axis)."""
    clamped_low = coord < 0
    clamped = np.where(clamped_low, acc.type(0), coord)
    low = np.floor(clamped)
    last = low >= size - 1
    frac = np.where(last, acc.type(0), clamped - low)
    moves = np.where(last | clamped_low, acc.type(0), acc.type(1))
    low = np.where(last, size - 1, low).astype(np.intp)
    return low, (~last).astype(np.intp), frac, moves


def _locate(
    y: np.ndarray,
    x: np.ndarray,
    batch_index: np.ndarray,
    geom: RoiPoolGeometry,
    acc: np.dtype,
    valid: np.ndarray,
) -> _Samples:
    """The samples at (y, x) [S, a, ph, pw] of the bins of RoIs on images
    ``batch_index`` [a]; those not ``valid`` [S, a, 1, 1] sample nothing."""
    height, width = geom.height, geom.width
    is_nan = (np.isnan(y) | np.isnan(x)) & valid
    inside = valid & ~is_nan & ~((y < -1) | (y > height) | (x < -1) | (x > width))
    y_low, y_step, frac_y, moves_y = _axis(np.where(inside, y, acc.type(0)), height, acc)
    x_low, x_step, frac_x, moves_x = _axis(np.where(inside, x, acc.type(0)), width, acc)
    row00 = (batch_index[:, None, None] * height + y_low) * width + x_low
    zero_row = geom.batch * height * width
    row00 = np.where(inside, row00, zero_row)
    row01 = row00 + x_step * inside
    row10 = row00 + y_step * width * inside
    row11 = row10 + x_step * inside
    zero = acc.type(0)
    frac_y, frac_x = np.where(inside, frac_y, zero), np.where(inside, frac_x, zero)
    frac_y[is_nan] = np.nan
    frac_x[is_nan] = np.nan
    moves_y, moves_x = np.where(inside, moves_y, zero), np.where(inside, moves_x, zero)
    return _Samples((row00, row01, row10, row11), frac_y, frac_x, moves_y, moves_x, valid)


# ---------------------------------------------------------------------------- gradients


def _scatter_to_planes(
    grad_planes: np.ndarray,
    grad_bins: np.ndarray,
    mask_bins: np.ndarray | None,
    bins: _Bins,
    steps: Iterator[tuple[int, _Samples]],
) -> None:
    """grad_planes [N*H*W + 1, C] += each sample's share of its bin's gradient,
    ``grad_output * mask / count`` spread over its corners (np.add.at, acc dtype)."""
    grad = grad_bins if mask_bins is None else grad_bins * mask_bins[..., None]
    grad = grad / bins.count[:, None, None, None]
    for active, samples in steps:
        for rows, weight in zip(samples.rows, samples.corner_weights()):
            np.add.at(grad_planes, rows, weight[..., None] * grad[:active])


def _coordinate_sums(
    planes: np.ndarray, grad_bins: np.ndarray, steps: Iterator[tuple[int, _Samples]]
):
    """Sums over samples and channels of g_c * v_c, g_c * dv_c/dy and g_c * dv_c/dx per
    bin, three arrays [n, ph, pw] (g = grad_bins [n, ph, pw, C], without mask or 1/count).

    Like the kernel, the per-corner channel sums are formed first and blended once."""
    shape = grad_bins.shape[:3]
    value_sum = np.zeros(shape, grad_bins.dtype)
    dy_sum = np.zeros(shape, grad_bins.dtype)
    dx_sum = np.zeros(shape, grad_bins.dtype)
    for active, samples in steps:
        grad = grad_bins[:active]
        corner_sums = [np.einsum("saijc,aijc->saij", planes[rows], grad) for rows in samples.rows]
        value, d_dy, d_dx = samples.blend_with_gradient(*corner_sums)
        value_sum[:active] += value.sum(axis=0)
        dy_sum[:active] += d_dy.sum(axis=0)
        dx_sum[:active] += d_dx.sum(axis=0)
    return value_sum, dy_sum, dx_sum


# ---------------------------------------------------------------------------- factorised path
#
# Within one bin the samples form a tensor product (y_iy) x (x_ix), and everything the
# sampling does is per axis: the skip test (outside [-1, H] x [-1, W]), the clamps, the
# corners and the bilinear weights, w(y, x) = wy(y) * wx(x). So a bin's sum is
#
#     sum_s v(y_s, x_s) = sum_r sum_c Ay[r] * Ax[c] * V[r, c]
#
# with Ay[r] the weight of image row r summed over the bin's y samples (Ax likewise), over
# the rows and columns the samples touch: the cost is the bin's footprint (at most
# min(2 * grid, bin size + 3) rows times as many columns) times C, not 4 gathers per
# sample. The derivatives factor the same way: d/dy uses dAy[r] (the summed derivative
# weights, -1 / +1 on the two corners where the coordinate moves, 0 where clamped) with Ax,
# d/dx uses Ay with dAx; the input gradient scatters Ay (x) Ax * grad. A sample is NaN when
# its y or its x is NaN, so the NaN samples of a bin are whole rows and columns of its grid:
# they are left out of Ay / Ax (they add nothing to grad_input) and make the bin NaN.
#
# The path runs when the data it reads are finite (input; grad_output and mask in the
# backward). Then every product with a weight 0 is an exact 0 and the result equals the
# per-sample sum up to rounding. Non-finite data take the per-sample path, which reads
# every corner of every sample exactly as the kernels do (a NaN / inf pixel read with
# weight 0 poisons a sample).
#
# Each bin's sums are added in a fixed order (columns, then rows, one elementwise step
# each), so a bin's result does not depend on which other bins share its block: padding
# rows and columns add exact zeros.

# Set to False to run the per-sample path for every call (tests compare the two).
FACTORISED = True
# Footprints of at least this many pixels that are contiguous rectangles are computed bin
# by bin on views of the planes (np.einsum on the window, no gathers).
_WINDOW_CELLS = 1024
# The factorised forward (per bin row and column sums) is the default; it sums in another
# order than the kernels (equal to rounding). False selects the per-sample path, which
# follows the kernels' order to the last bit (tests/test_roi_pool_emulated.py uses it).
FACTORISED_FORWARD = True

# Working bytes per sample of one axis of one bin (coordinates, masks, the two entries of
# its corners, their sort order and slots; 8 bytes each), and per footprint cell.
_AXIS_BYTES_PER_SAMPLE = 40 * 8
_FOOTPRINT_CELL_BYTES = 4 * 8


def _finite(array) -> bool:
    """Every value finite: one summation pass in the accumulation dtype (float64 for
    float64, else float32), no temporaries. A NaN or an infinity makes the sum NaN or
    infinite; so can an overflow of finite values, which only sends the call to the
    per-sample path (exact for any values)."""
    dtype = np.float64 if np.dtype(array.dtype) == np.float64 else np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.sum(array, dtype=dtype)))


def _footprint_bound(grid: np.ndarray, bin_size: np.ndarray, extent: int) -> np.ndarray:
    """Upper bound on the distinct rows (columns) one bin's samples touch, [K] int64."""
    span = np.ceil(np.abs(bin_size.astype(np.float64))) + 3
    span = np.where(np.isfinite(span), np.minimum(span, extent), extent)
    return np.minimum(np.minimum(2 * grid, extent), span.astype(np.int64))


def _bin_bytes(grid_h, grid_w, rows, cols, channels: int, itemsize: int):
    """Working bytes of one bin of the factorised path (arrays or ints)."""
    return (
        _AXIS_BYTES_PER_SAMPLE * (grid_h + grid_w)
        + 4 * rows * max(channels, 1) * itemsize
        + _FOOTPRINT_CELL_BYTES * rows * cols
        + 256
    )


@dataclass(frozen=True)
class _Block:
    """A block of bins (flattened, any RoIs), with their per-axis summed weights.

    Ry [m, Ly] / Rx [m, Lx]: the distinct image rows / columns the bin's samples touch
    (padding: row 0 with weight 0); Wy / Wx: the summed bilinear weights of each; dWy /
    dWx: the summed derivative weights; nan [m]: the bin has a NaN sample.
    """

    batch: np.ndarray
    Ry: np.ndarray
    Wy: np.ndarray
    dWy: np.ndarray
    Rx: np.ndarray
    Wx: np.ndarray
    dWx: np.ndarray
    nan: np.ndarray
    # every bin's rows and columns are contiguous ranges and its footprint is large: the
    # bins are computed one by one on views of the planes (no gathers, no padding)
    windows: bool = False

    def gathers(self, planes: np.ndarray, geom: RoiPoolGeometry):
        """(b, values [m, Ly, C]) per footprint column b: planes at (Ry, Rx[:, b])."""
        rowbase = (self.batch[:, None] * geom.height + self.Ry) * geom.width
        for b in range(self.Rx.shape[1]):
            yield b, planes[rowbase + self.Rx[:, b : b + 1]]

    def groups(self, used_y: np.ndarray, used_x: np.ndarray):
        """(bin indices, sub-block) per footprint size: the bins with the same numbers of
        rows and columns, trimmed to them (no padding; each bin's sums are unchanged)."""
        if len(used_y) == 0:
            return
        m = len(used_y)
        windows = used_y * used_x >= _WINDOW_CELLS
        if windows.any():  # then Ry and Rx have columns
            last_y = self.Ry[np.arange(m), np.maximum(used_y - 1, 0)]
            last_x = self.Rx[np.arange(m), np.maximum(used_x - 1, 0)]
            windows &= (last_y - self.Ry[:, 0] + 1 == used_y) & (
                last_x - self.Rx[:, 0] + 1 == used_x
            )
        key = (used_y * (int(used_x.max()) + 1) + used_x) * 2 + windows
        order = np.argsort(key, kind="stable")
        sizes = key[order]
        edges = np.flatnonzero(np.concatenate(([True], sizes[1:] != sizes[:-1], [True])))
        for first, stop in zip(edges[:-1], edges[1:]):
            index = order[first:stop]
            rows, cols = int(used_y[index[0]]), int(used_x[index[0]])
            yield (
                index,
                _Block(
                    self.batch[index],
                    self.Ry[index, :rows],
                    self.Wy[index, :rows],
                    self.dWy[index, :rows],
                    self.Rx[index, :cols],
                    self.Wx[index, :cols],
                    self.dWx[index, :cols],
                    self.nan[index],
                    bool(windows[index[0]]),
                ),
            )

    def window(self, i: int, planes4: np.ndarray) -> np.ndarray:
        """Bin i's footprint, a view [Ly, Lx, C] of planes4 [N, H, W, C]."""
        r0, c0 = int(self.Ry[i, 0]), int(self.Rx[i, 0])
        rows, cols = self.Ry.shape[1], self.Rx.shape[1]
        return planes4[self.batch[i], r0 : r0 + rows, c0 : c0 + cols]

    def rows_of(self, b: int, geom: RoiPoolGeometry) -> np.ndarray:
        return (self.batch[:, None] * geom.height + self.Ry) * geom.width + self.Rx[:, b : b + 1]


def _axis_sums(
    start: np.ndarray, bin_size: np.ndarray, grid: np.ndarray, extent: int, acc: np.dtype
):
    """Per-axis summed weights of a block of bins: start / bin_size / grid [m] ->
    (rows [m, L] intp, weights [m, L], derivative weights [m, L], any NaN sample [m],
    rows used [m]: the first that many entries of each bin are its rows)."""
    m = len(start)
    gmax = int(grid.max()) if m else 0
    if gmax == 0:
        empty = np.zeros((m, 0), acc)
        return (np.zeros((m, 0), np.intp), empty, empty, np.zeros(m, bool), np.zeros(m, np.intp))
    half = acc.type(0.5)
    index = np.arange(gmax)
    # the kernels' arithmetic: start + ((i + 0.5) * bin_size) / grid
    coord = start[:, None] + (
        (index.astype(acc) + half) * bin_size[:, None] / grid.astype(acc)[:, None]
    )
    valid = index < grid[:, None]
    is_nan = np.isnan(coord) & valid
    inside = valid & ~is_nan & ~((coord < -1) | (coord > extent))
    low, step, frac, moves = _axis(np.where(inside, coord, acc.type(0)), extent, acc)
    del coord
    two = inside & (step == 1)
    zero = acc.type(0)
    rows = np.concatenate([np.where(inside, low, extent), np.where(two, low + 1, extent)], 1)
    weights = np.concatenate([np.where(inside, 1 - frac, zero), np.where(two, frac, zero)], 1)
    dweights = np.concatenate([np.where(inside, -moves, zero), np.where(two, moves, zero)], 1)
    del low, step, frac, moves, two
    order = np.argsort(rows, axis=1, kind="stable")
    rows = np.take_along_axis(rows, order, 1)
    weights = np.take_along_axis(weights, order, 1)
    dweights = np.take_along_axis(dweights, order, 1)
    del order
    new = np.ones(rows.shape, bool)
    new[:, 1:] = rows[:, 1:] != rows[:, :-1]
    slot = np.cumsum(new, axis=1) - 1
    used = (new & (rows < extent)).sum(axis=1)
    length = int(used.max())
    if length == 0:
        empty = np.zeros((m, 0), acc)
        return np.zeros((m, 0), np.intp), empty, empty, is_nan.any(axis=1), used
    np.minimum(slot, length, out=slot)  # entries past the map go to a dropped column
    flat = (np.arange(m)[:, None] * (length + 1) + slot).ravel()
    size = m * (length + 1)
    summed = np.bincount(flat, weights.ravel(), minlength=size)
    dsummed = np.bincount(flat, dweights.ravel(), minlength=size)
    distinct = np.zeros((m, length + 1), np.intp)
    distinct[np.arange(m)[:, None], slot] = rows
    distinct = distinct[:, :length]
    distinct[distinct >= extent] = 0
    shape = (m, length + 1)
    return (
        distinct,
        summed.reshape(shape)[:, :length].astype(acc),
        dsummed.reshape(shape)[:, :length].astype(acc),
        is_nan.any(axis=1),
        used,
    )


def _factorised_order(boxes: _RoiBoxes, geom: RoiPoolGeometry, acc: np.dtype):
    """RoIs by decreasing working bytes per bin (stable), and those bytes [K]."""
    rows = _footprint_bound(boxes.grid_h, boxes.roi_h / acc.type(geom.pooled_h), geom.height)
    cols = _footprint_bound(boxes.grid_w, boxes.roi_w / acc.type(geom.pooled_w), geom.width)
    per_bin = _bin_bytes(boxes.grid_h, boxes.grid_w, rows, cols, geom.channels, acc.itemsize)
    order = np.argsort(-per_bin, kind="stable")
    return order, per_bin, rows, cols


def _factorised_chunks(boxes: _RoiBoxes, geom: RoiPoolGeometry, acc: np.dtype):
    """(RoI indices, bins per block) per run of RoIs in the order of
    :func:`_factorised_order`, sized to the workspace (blocks padded to the run's largest
    grid and footprint)."""
    order, per_bin, rows, cols = _factorised_order(boxes, geom, acc)
    start = 0
    while start < geom.num_rois:
        size = max(1, _WORKSPACE_BYTES // (geom.bins * int(per_bin[order[start]])))
        chunk = order[start : start + size]
        padded = _bin_bytes(
            int(boxes.grid_h[chunk].max()),
            int(boxes.grid_w[chunk].max()),
            int(rows[chunk].max()),
            int(cols[chunk].max()),
            geom.channels,
            acc.itemsize,
        )
        yield chunk, max(1, _WORKSPACE_BYTES // padded)
        start += size


def _blocks(
    bins: _Bins, batch_index: np.ndarray, per_block: int, geom: RoiPoolGeometry, acc: np.dtype
) -> Iterator[tuple[slice, _Block]]:
    """(flat bin indices, block) over the chunk's bins, flattened RoI-major: blocks of
    ``per_block`` bins, each split by footprint size (:meth:`_Block.groups`)."""
    bins_per_roi = geom.bins
    top = np.ascontiguousarray(bins.top).reshape(-1)
    left = np.ascontiguousarray(bins.left).reshape(-1)

    def per_roi(values):
        return np.repeat(values, bins_per_roi)

    batch, grid_h, grid_w = per_roi(batch_index), per_roi(bins.grid_h), per_roi(bins.grid_w)
    bin_h, bin_w = per_roi(bins.bin_h), per_roi(bins.bin_w)
    for first in range(0, len(top), per_block):
        part = slice(first, min(first + per_block, len(top)))
        ry, wy, dwy, nan_y, used_y = _axis_sums(
            top[part], bin_h[part], grid_h[part], geom.height, acc
        )
        rx, wx, dwx, nan_x, used_x = _axis_sums(
            left[part], bin_w[part], grid_w[part], geom.width, acc
        )
        nan = (nan_y & (grid_w[part] > 0)) | (nan_x & (grid_h[part] > 0))
        block = _Block(batch[part], ry, wy, dwy, rx, wx, dwx, nan)
        for index, group in block.groups(used_y, used_x):
            yield index + part.start, group


def _forward_factorised(output, planes, boxes, offset, mask, geom, acc) -> None:
    channels = geom.channels
    for chunk, per_block in _factorised_chunks(boxes, geom, acc):
        bins = _bins(boxes, chunk, offset, geom, acc)
        pooled = np.empty((len(chunk) * geom.bins, channels), acc)
        for part, block in _blocks(bins, boxes.batch_index[chunk], per_block, geom, acc):
            m, rows = len(block.batch), block.Ry.shape[1]
            if block.windows:
                sums = _window_sums(block, planes, geom, acc)
                sums[block.nan] = np.nan
                pooled[part] = sums
                continue
            column_sums = None  # sum_b Wx[b] * V[:, b], the first term as is (0 + t = t)
            for b, values in block.gathers(planes, geom):
                values *= block.Wx[:, b, None, None]
                if column_sums is None:
                    column_sums = values
                else:
                    column_sums += values
                del values
            if column_sums is None:
                column_sums = np.zeros((m, rows, channels), acc)
            sums = np.zeros((m, channels), acc)
            for a in range(rows):
                sums += block.Wy[:, a, None] * column_sums[:, a]
            sums[block.nan] = np.nan
            pooled[part] = sums
        pooled = pooled.reshape(len(chunk), geom.pooled_h, geom.pooled_w, channels)
        pooled /= bins.count[:, None, None, None]
        if mask is not None:
            pooled *= _per_bin(mask, chunk, acc)[..., None]
        output[chunk] = pooled.transpose(0, 3, 1, 2)


def _planes4(planes: np.ndarray, geom: RoiPoolGeometry) -> np.ndarray:
    """planes [N*H*W + 1, C] without the zero row as [N, H, W, C] (a view)."""
    return planes[:-1].reshape(geom.batch, geom.height, geom.width, geom.channels)


def _window_sums(block: _Block, planes, geom: RoiPoolGeometry, acc) -> np.ndarray:
    """[m, C] sum_a sum_b Wy[a] * Wx[b] * V[a, b] per bin of a block of windows, on views
    of the planes (np.einsum: one pass over each window, no BLAS)."""
    planes4 = _planes4(planes, geom)
    sums = np.empty((len(block.batch), geom.channels), acc)
    for i in range(len(block.batch)):
        sums[i] = np.einsum("a,abc,b->c", block.Wy[i], block.window(i, planes4), block.Wx[i])
    return sums


def _backward_factorised(
    grad_planes,
    grad_offset,
    grad_mask,
    grad_output,
    planes,
    boxes,
    offset,
    mask,
    geom,
    acc,
    *,
    want_offset: bool,
    want_mask: bool,
) -> None:
    channels = geom.channels
    want_sums = want_offset or want_mask
    for chunk, per_block in _factorised_chunks(boxes, geom, acc):
        bins = _bins(boxes, chunk, offset, geom, acc)
        n = len(chunk)
        grad_bins = np.asarray(grad_output[chunk], dtype=acc).transpose(0, 2, 3, 1)
        mask_bins = None if mask is None else _per_bin(mask, chunk, acc)
        grad_flat = np.ascontiguousarray(grad_bins).reshape(n * geom.bins, channels)
        scaled = None
        if grad_planes is not None:
            scaled = grad_bins if mask_bins is None else grad_bins * mask_bins[..., None]
            scaled = scaled / bins.count[:, None, None, None]
            scaled = scaled.reshape(n * geom.bins, channels)
        sums = np.zeros((3, n * geom.bins), acc) if want_sums else None
        for part, block in _blocks(bins, boxes.batch_index[chunk], per_block, geom, acc):
            m, rows, cols = len(block.batch), block.Ry.shape[1], block.Rx.shape[1]
            if scaled is not None and block.windows:
                grad4 = _planes4(grad_planes, geom)
                grad = scaled[part]
                for i in range(m):  # one bin at a time: overlapping windows are fine
                    window = block.window(i, grad4)
                    window += np.multiply.outer(
                        block.Wy[i], np.multiply.outer(block.Wx[i], grad[i])
                    )
            elif scaled is not None and rows and cols:
                # Ay (x) Ax * grad into the footprint, one column at a time
                grad = scaled[part]
                for b in range(cols):
                    _scatter_rows(
                        grad_planes, block.rows_of(b, geom), block.Wy * block.Wx[:, b : b + 1], grad
                    )
            if not want_sums:
                continue
            # dots [m, Ly, Lx] = sum_c g_c * V[r, c]; then the weighted sums per axis
            dots = np.zeros((m, rows, cols), acc)
            grad = grad_flat[part]
            if block.windows:
                planes4 = _planes4(planes, geom)
                for i in range(m):
                    dots[i] = np.einsum("abc,c->ab", block.window(i, planes4), grad[i])
            else:
                for b, values in block.gathers(planes, geom):
                    dots[:, :, b] = np.einsum("mac,mc->ma", values, grad)
                    del values
            along_x = np.einsum("mab,mb->ma", dots, block.Wx)
            along_dx = np.einsum("mab,mb->ma", dots, block.dWx)
            value = np.einsum("ma,ma->m", block.Wy, along_x)
            d_dy = np.einsum("ma,ma->m", block.dWy, along_x)
            d_dx = np.einsum("ma,ma->m", block.Wy, along_dx)
            for row, result in enumerate((value, d_dy, d_dx)):
                result[block.nan] = np.nan
                sums[row, part] = result
        if not want_sums:
            continue
        value_sum, dy_sum, dx_sum = sums.reshape(3, n, geom.pooled_h, geom.pooled_w)
        if want_mask:
            grad_mask[chunk, 0] = value_sum / bins.count[:, None, None]
        if want_offset:
            per_sample = (acc.type(1) if mask_bins is None else mask_bins) / (
                bins.count[:, None, None]
            )
            gamma = acc.type(geom.gamma)
            grad_offset[chunk, 0] = (gamma * bins.roi_w)[:, None, None] * (dx_sum * per_sample)
            grad_offset[chunk, 1] = (gamma * bins.roi_h)[:, None, None] * (dy_sum * per_sample)


def _scatter_rows(
    grad_planes: np.ndarray, rows: np.ndarray, weights: np.ndarray, grad: np.ndarray
) -> None:
    """grad_planes[rows[i, a]] += weights[i, a] * grad[i] for rows / weights [m, L] and
    grad [m, C]. The entries are sorted by row and split into rounds by their rank among
    the entries of their row (round r: the r-th entry of every row), so each round updates
    distinct rows with one fancy-indexed add. Entries of weight 0 are left out (exact for
    finite grad)."""
    keep = np.flatnonzero(weights.reshape(-1) != 0)
    if not len(keep):
        return
    targets = rows.reshape(-1)[keep]
    order = np.argsort(targets, kind="stable")
    targets = targets[order]
    entry = keep[order]
    del keep, order
    new = np.empty(len(targets), bool)
    new[0] = True
    np.not_equal(targets[1:], targets[:-1], out=new[1:])
    index = np.arange(len(targets))
    rank = index - np.maximum.accumulate(np.where(new, index, 0))
    del new, index
    by_rank = np.argsort(rank, kind="stable")
    counts = np.bincount(rank)
    del rank
    flat_weights = weights.reshape(-1)
    length = rows.shape[1]
    first = 0
    for count in counts:
        picked = by_rank[first : first + count]
        first += count
        chosen = entry[picked]
        update = grad[chosen // length]
        update *= flat_weights[chosen][:, None]
        grad_planes[targets[picked]] += update
