"""Naive float64 reference of deform_roi_pool, written from docs/semantics.md §2 alone.

Deliberately loop-form and independent of cupydcn: Python loops over RoIs, bins and the
sampling grid (vectorised over channels only), scalar RoIAlign bilinear sampling. For
tiny sizes only.

The gradients are written out analytically. What the semantics leave open is fixed
here explicitly, as the kernels do (cupydcn/cuda/kernels/roi_common.cuh):

* d sample / dy is 0 where y is clamped (y in [-1, 0), or floor(max(y, 0)) >= H - 1) and
  for samples outside [-1, H] x [-1, W]; at other integer y it is the one-sided derivative
  from the right (the cell [floor(y), floor(y) + 1]). Likewise x.
* The offset moves the bin: d y_sample / d offset_y = gamma * roi_h (roi_w for x); the
  bin size and the sampling grid do not change with the offset.
* A sample with a NaN coordinate is NaN (value and coordinate derivatives) and adds
  nothing to the input gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


@dataclass
class Sample:
    """One RoIAlign sample of a stack of planes [C, H, W]."""

    value: np.ndarray  # [C]
    d_dy: np.ndarray  # [C]
    d_dx: np.ndarray  # [C]
    corners: list  # [((row, col), weight)]: the input-gradient weights


def roi_align_sample(planes: np.ndarray, y: float, x: float) -> Sample:
    """Bilinear RoIAlign sample of every plane at (y, x), with its derivatives."""
    channels, height, width = planes.shape
    if math.isnan(y) or math.isnan(x):
        nan = np.full(channels, math.nan)
        return Sample(nan, nan, nan, [])
    if y < -1 or y > height or x < -1 or x > width:
        zero = np.zeros(channels)
        return Sample(zero, zero, zero, [])

    def axis(coord: float, size: int):
        """(low, high, weight of high, coordinate moves the weights)"""
        moves = coord >= 0
        coord = max(coord, 0.0)
        low = math.floor(coord)
        if low >= size - 1:
            return size - 1, size - 1, 0.0, False
        return low, low + 1, coord - low, moves

    y_low, y_high, ly, y_moves = axis(y, height)
    x_low, x_high, lx, x_moves = axis(x, width)
    hy, hx = 1.0 - ly, 1.0 - lx
    v00, v01 = planes[:, y_low, x_low], planes[:, y_low, x_high]
    v10, v11 = planes[:, y_high, x_low], planes[:, y_high, x_high]
    value = hy * hx * v00 + hy * lx * v01 + ly * hx * v10 + ly * lx * v11
    d_dy = (hx * (v10 - v00) + lx * (v11 - v01)) if y_moves else np.zeros(channels)
    d_dx = (hy * (v01 - v00) + ly * (v11 - v10)) if x_moves else np.zeros(channels)
    corners = [
        ((y_low, x_low), hy * hx),
        ((y_low, x_high), hy * lx),
        ((y_high, x_low), ly * hx),
        ((y_high, x_high), ly * lx),
    ]
    return Sample(value, d_dy, d_dx, corners)


@dataclass
class Bin:
    """Bin (i, j) of RoI k: its samples' coordinates and what the gradients need."""

    batch_index: int
    points: list  # [(y, x)]
    count: int  # max(grid_h * grid_w, 1)
    roi_h: float
    roi_w: float


def bins(rois, offset, output_size, spatial_scale, sampling_ratio, gamma) -> Iterator[tuple]:
    """Yields ((k, i, j), Bin) for every bin of every RoI, per docs/semantics.md §2."""
    ph, pw = _pair(output_size)
    rois = np.asarray(rois, dtype=np.float64)
    off = None if offset is None else np.asarray(offset, dtype=np.float64)
    for k in range(rois.shape[0]):
        batch_index, x1, y1, x2, y2 = (float(v) for v in rois[k])
        start_w = x1 * spatial_scale - 0.5
        start_h = y1 * spatial_scale - 0.5
        end_w = x2 * spatial_scale - 0.5
        end_h = y2 * spatial_scale - 0.5
        roi_w = end_w - start_w
        roi_h = end_h - start_h
        bin_w = roi_w / pw
        bin_h = roi_h / ph
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / ph)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pw)
        count = max(grid_h * grid_w, 1)
        for i in range(ph):
            for j in range(pw):
                bin_start_w, bin_start_h = start_w, start_h
                if off is not None:
                    bin_start_w += gamma * roi_w * off[k, 0, i, j]
                    bin_start_h += gamma * roi_h * off[k, 1, i, j]
                points = []
                for iy in range(grid_h):
                    y = bin_start_h + i * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = bin_start_w + j * bin_w + (ix + 0.5) * bin_w / grid_w
                        points.append((y, x))
                yield (k, i, j), Bin(int(batch_index), points, count, roi_h, roi_w)


def deform_roi_pool_reference(
    input,
    rois,
    offset=None,
    mask=None,
    *,
    output_size,
    spatial_scale=1.0,
    sampling_ratio=0,
    gamma=0.1,
) -> np.ndarray:
    """Output [K, C, ph, pw] in float64: mask * mean of the bin's RoIAlign samples."""
    x = np.asarray(input, dtype=np.float64)
    m = None if mask is None else np.asarray(mask, dtype=np.float64)
    ph, pw = _pair(output_size)
    out = np.zeros((np.shape(rois)[0], x.shape[1], ph, pw))
    for (k, i, j), b in bins(rois, offset, output_size, spatial_scale, sampling_ratio, gamma):
        total = np.zeros(x.shape[1])
        for y, xx in b.points:
            total = total + roi_align_sample(x[b.batch_index], y, xx).value
        out[k, :, i, j] = total / b.count * (1.0 if m is None else m[k, 0, i, j])
    return out


def deform_roi_pool_backward_reference(
    grad_output,
    input,
    rois,
    offset=None,
    mask=None,
    *,
    output_size,
    spatial_scale=1.0,
    sampling_ratio=0,
    gamma=0.1,
):
    """(grad_input [N, C, H, W], grad_offset [K, 2, ph, pw] or None,
    grad_mask [K, 1, ph, pw] or None) in float64."""
    x = np.asarray(input, dtype=np.float64)
    g = np.asarray(grad_output, dtype=np.float64)
    m = None if mask is None else np.asarray(mask, dtype=np.float64)
    ph, pw = _pair(output_size)
    num_rois = np.shape(rois)[0]
    grad_input = np.zeros_like(x)
    grad_offset = None if offset is None else np.zeros((num_rois, 2, ph, pw))
    grad_mask = None if mask is None else np.zeros((num_rois, 1, ph, pw))
    for (k, i, j), b in bins(rois, offset, output_size, spatial_scale, sampling_ratio, gamma):
        modulation = 1.0 if m is None else m[k, 0, i, j]
        grad_bin = g[k, :, i, j]  # [C]
        value_sum = d_dy_sum = d_dx_sum = 0.0
        for y, xx in b.points:
            sample = roi_align_sample(x[b.batch_index], y, xx)
            value_sum += float(np.dot(grad_bin, sample.value))
            d_dy_sum += float(np.dot(grad_bin, sample.d_dy))
            d_dx_sum += float(np.dot(grad_bin, sample.d_dx))
            for (row, col), weight in sample.corners:
                grad_input[b.batch_index, :, row, col] += weight * modulation * grad_bin / b.count
        if grad_mask is not None:
            grad_mask[k, 0, i, j] = value_sum / b.count
        if grad_offset is not None:
            grad_offset[k, 0, i, j] = modulation * gamma * b.roi_w * d_dx_sum / b.count
            grad_offset[k, 1, i, j] = modulation * gamma * b.roi_h * d_dy_sum / b.count
    return grad_input, grad_offset, grad_mask


def sample_points(
    rois, offset, *, output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1
) -> dict:
    """{(k, i, j): [(y, x), ...]}: the sample coordinates of every bin (for choosing points
    away from the kinks in finite-difference tests)."""
    return {
        key: b.points
        for key, b in bins(rois, offset, output_size, spatial_scale, sampling_ratio, gamma)
    }


# ---------------------------------------------------------------- random test problems
# Problem sizes and random arrays shared by the test files (NumPy only, like the rest).


ROI_KINDS = ("inside", "partly_outside", "outside", "tiny", "reversed", "large")


@dataclass(frozen=True)
class RoiCase:
    """Sizes, options and the kinds of RoIs of one small problem."""

    batch: int = 2
    channels: int = 3
    height: int = 7
    width: int = 9
    output_size: tuple[int, int] = (3, 2)
    spatial_scale: float = 1.0
    sampling_ratio: int = 0
    gamma: float = 0.1
    with_offset: bool = True
    with_mask: bool = True
    roi_kinds: tuple[str, ...] = ("inside", "partly_outside", "tiny")
    rois_per_kind: int = 2
    offset_scale: float = 1.0

    @property
    def options(self) -> dict:
        return dict(
            output_size=self.output_size,
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio,
            gamma=self.gamma,
        )

    def rois(self, rng) -> np.ndarray:
        """[K, 5] boxes of the requested kinds, in image coordinates (map / scale)."""
        h, w = self.height, self.width
        rows = []
        for kind in self.roi_kinds:
            for _ in range(self.rois_per_kind):
                if kind == "inside":
                    x1, y1 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
                    x2, y2 = x1 + rng.uniform(1, max(w / 2, 2)), y1 + rng.uniform(1, max(h / 2, 2))
                elif kind == "partly_outside":
                    x1, y1 = rng.uniform(-w / 2, 0.5), rng.uniform(-h / 2, 0.5)
                    x2, y2 = rng.uniform(w / 2, 1.5 * w), rng.uniform(h / 2, 1.5 * h)
                elif kind == "outside":  # entirely beyond the map on some side
                    x1, y1 = rng.uniform(w + 2, w + 5), rng.uniform(-h, h)
                    x2, y2 = x1 + rng.uniform(1, 3), y1 + rng.uniform(1, 3)
                    if rng.uniform() < 0.5:
                        x1, x2, y1, y2 = y1, y2, -x2 + 1, -x1 + 1
                elif kind == "tiny":
                    x1, y1 = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
                    x2, y2 = x1 + rng.uniform(0.01, 0.3), y1 + rng.uniform(0.01, 0.3)
                elif kind == "reversed":  # x2 < x1 and / or y2 < y1
                    x1, y1 = rng.uniform(2, w), rng.uniform(2, h)
                    x2, y2 = x1 - rng.uniform(0.5, 3), y1 + rng.uniform(-3, 2)
                elif kind == "large":
                    x1, y1 = rng.uniform(-w, 0), rng.uniform(-h, 0)
                    x2, y2 = rng.uniform(w, 2 * w), rng.uniform(h, 2 * h)
                else:
                    raise ValueError(kind)
                rows.append([rng.integers(self.batch), x1, y1, x2, y2])
        rois = np.array(rows, dtype=np.float64).reshape(-1, 5)
        rois[:, 1:] /= self.spatial_scale
        return rois

    def arrays(self, rng) -> dict:
        rois = self.rois(rng)
        k = rois.shape[0]
        ph, pw = self.output_size
        return {
            "input": rng.normal(size=(self.batch, self.channels, self.height, self.width)),
            "rois": rois,
            "offset": (
                rng.normal(scale=self.offset_scale, size=(k, 2, ph, pw))
                if self.with_offset
                else None
            ),
            "mask": rng.uniform(-0.5, 1.5, size=(k, 1, ph, pw)) if self.with_mask else None,
        }
