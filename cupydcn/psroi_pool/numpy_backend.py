"""deform_psroi_pool on the CPU: vectorised NumPy.

Two paths compute it. The factorised path (section "factorised path" at the end) sums each
output element as sum_r sum_c Ay[r] * Ax[c] * V[r, c] over the distinct rows and columns
its kept samples touch, with per-axis summed bilinear weights; it runs whenever the data it
reads are finite (input; grad_output in the backward). The per-sample path described next
runs otherwise: it reads every corner of every sample as the kernels do.

Every step works on a block of samples of every bin of a chunk of RoIs, all classes and
output channels at once; the only Python loops run over the chunks and over the blocks of
the sample_per_part**2 samples of a bin. Chunks and blocks are sized so the temporaries of
a call fit ``_WORKSPACE_BYTES`` (besides the arguments and results): a 1024 x 1024 sample
grid takes a few large steps, not a million small ones. Samples are added in the kernels'
order (a running sum over each block). The arithmetic follows the CUDA
kernels (cupydcn/cuda/kernels/deform_psroi_pool.cu) operation by operation in the accumulation dtype
(float32 for half types), so both backends place every sample identically and agree on
which samples are skipped. Conventions at the kinks are the kernels' (MSRA's); see there.

Shapes inside: ``[K, L, J, P, P]`` with L offset classes and J = output_dim / L output
channels per class (output channel d = l * J + j); per-bin quantities that do not depend
on the channel are ``[K, L, 1, P, P]``; a block of S samples adds a leading axis
``[S, K, L, J, P, P]``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from cupydcn.core.dtypes import acc_dtype
from cupydcn.psroi_pool.spec import PSRoiPoolGeometry, PSRoiPoolGrads


def _quiet_float_errors(function):
    """Huge or infinite offsets legitimately overflow sample coordinates (those samples
    are skipped) and NaN offsets propagate: no floating-point warnings for them."""

    @functools.wraps(function)
    def quiet(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore"):
            return function(*args, **kwargs)

    return quiet


# Bound on the temporaries of one step (a block of samples of a chunk of RoIs).
_WORKSPACE_BYTES = 256 * 2**20
# Working bytes per sample of one output element (corner indices, values, blend) and of
# one bin of a class (coordinates, masks, fractions, weights): estimates, 8 bytes each.
_BYTES_PER_ELEMENT = 16 * 8
_BYTES_PER_BIN = 32 * 8


def _bytes_per_roi_sample(geom: PSRoiPoolGeometry) -> int:
    """Working bytes of one sample of every bin and channel of one RoI."""
    bins = geom.pooled_size * geom.pooled_size
    return bins * (geom.output_dim * _BYTES_PER_ELEMENT + geom.num_classes * _BYTES_PER_BIN)


def _roi_chunks(geom: PSRoiPoolGeometry) -> Iterator[tuple[slice, PSRoiPoolGeometry]]:
    """(RoIs, their geometry) per chunk of consecutive RoIs sized to the workspace."""
    size = max(1, _WORKSPACE_BYTES // _bytes_per_roi_sample(geom))
    for start in range(0, geom.num_rois, size):
        rois = slice(start, min(start + size, geom.num_rois))
        yield rois, dataclasses.replace(geom, num_rois=rois.stop - rois.start)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's round(): to the nearest integer, halves away from zero (np.round rounds them
    to even)."""
    whole = np.trunc(x)
    return whole + np.where(np.abs(x - whole) >= 0.5, np.sign(x), 0).astype(x.dtype)


class _Bins(NamedTuple):
    """Where the samples of every bin lie (acc dtype)."""

    batch: np.ndarray  # [K] int64, image of each RoI
    hstart: np.ndarray  # [K, L, 1, P, P] first sample row, offset applied
    wstart: np.ndarray  # [K, L, 1, P, P] first sample column
    sub_h: np.ndarray  # [K, 1, 1, 1, 1] sample spacing
    sub_w: np.ndarray
    roi_h: np.ndarray  # [K] RoI size, the scale of the offsets
    roi_w: np.ndarray


def _part_of_bin(geom: PSRoiPoolGeometry) -> np.ndarray:
    """[P] the offset cell of each bin index: floor(b * S / P), exactly."""
    return np.arange(geom.pooled_size) * geom.part_size // geom.pooled_size


def _bins(rois_acc: np.ndarray, offset_acc: np.ndarray | None, geom: PSRoiPoolGeometry) -> _Bins:
    acc = rois_acc.dtype.type
    scale, trans_std = acc(geom.spatial_scale), acc(geom.trans_std)
    x1, y1, x2, y2 = (rois_acc[:, i] for i in range(1, 5))
    start_w = _round_half_away(x1) * scale - acc(0.5)
    start_h = _round_half_away(y1) * scale - acc(0.5)
    end_w = (_round_half_away(x2) + acc(1)) * scale - acc(0.5)
    end_h = (_round_half_away(y2) + acc(1)) * scale - acc(0.5)
    roi_w = np.maximum(end_w - start_w, acc(0.1))
    roi_h = np.maximum(end_h - start_h, acc(0.1))
    bin_w = roi_w / acc(geom.pooled_size)
    bin_h = roi_h / acc(geom.pooled_size)
    sub_w = bin_w / acc(geom.sample_per_part)
    sub_h = bin_h / acc(geom.sample_per_part)

    index = np.arange(geom.pooled_size).astype(rois_acc.dtype)
    wstart = (index[None, :] * bin_w[:, None] + start_w[:, None])[:, None, None, None, :]
    hstart = (index[None, :] * bin_h[:, None] + start_h[:, None])[:, None, None, :, None]
    if offset_acc is not None:
        part = _part_of_bin(geom)
        cells = offset_acc.reshape(
            geom.num_rois, geom.num_classes, 2, geom.part_size, geom.part_size
        )[:, :, :, part[:, None], part[None, :]]
        wstart = wstart + cells[:, :, None, 0] * trans_std * roi_w[:, None, None, None, None]
        hstart = hstart + cells[:, :, None, 1] * trans_std * roi_h[:, None, None, None, None]
    shape = (geom.num_rois, geom.num_classes, 1, geom.pooled_size, geom.pooled_size)
    to_grid = (slice(None), None, None, None, None)
    return _Bins(
        batch=rois_acc[:, 0].astype(np.int64),
        hstart=np.broadcast_to(hstart, shape),
        wstart=np.broadcast_to(wstart, shape),
        sub_h=sub_h[to_grid],
        sub_w=sub_w[to_grid],
        roi_h=roi_h,
        roi_w=roi_w,
    )


class _Sample(NamedTuple):
    """A block of S samples (ih, iw) of every bin, [S, K, L, 1, P, P]."""

    kept: np.ndarray  # inside [-0.5, W-0.5] x [-0.5, H-0.5] (or NaN)
    is_nan: np.ndarray
    y0: np.ndarray  # floor of the clamped coordinates (int64; 0 where NaN)
    x0: np.ndarray
    ly: np.ndarray  # fractional parts (acc dtype)
    lx: np.ndarray


def _samples(bins: _Bins, geom: PSRoiPoolGeometry) -> Iterator[_Sample]:
    """Blocks of consecutive samples t = ih * sample_per_part + iw (the kernels' order),
    sized to the workspace."""
    acc = bins.hstart.dtype.type
    h_last, w_last = acc(geom.height - 1), acc(geom.width - 1)
    total = geom.sample_per_part**2
    size = max(
        1, min(total, _WORKSPACE_BYTES // (max(geom.num_rois, 1) * _bytes_per_roi_sample(geom)))
    )
    for first in range(0, total, size):
        ih, iw = np.divmod(np.arange(first, min(first + size, total)), geom.sample_per_part)
        block = (slice(None),) + (None,) * bins.hstart.ndim  # [S, 1, 1, 1, 1, 1]
        w = bins.wstart + iw.astype(acc)[block] * bins.sub_w
        h = bins.hstart + ih.astype(acc)[block] * bins.sub_h
        kept = ~((w < -0.5) | (w > w_last + acc(0.5)) | (h < -0.5) | (h > h_last + acc(0.5)))
        is_nan = np.isnan(h) | np.isnan(w)
        h = np.where(is_nan, 0, np.clip(h, 0, h_last)).astype(h.dtype)
        w = np.where(is_nan, 0, np.clip(w, 0, w_last)).astype(w.dtype)
        y0, x0 = np.floor(h), np.floor(w)
        yield _Sample(kept, is_nan, y0.astype(np.int64), x0.astype(np.int64), h - y0, w - x0)


class _Corner(NamedTuple):
    """One of the four bilinear corners of a sample, for every output channel."""

    index: np.ndarray  # [K, L, J, P, P] flat index into input (clipped where not inside)
    inside: np.ndarray  # [K, L, 1, P, P] the corner lies in the map
    weight: np.ndarray  # [K, L, 1, P, P] bilinear weight


def _plane_starts(bins: _Bins, geom: PSRoiPoolGeometry) -> np.ndarray:
    """[K, L, J, P, P] flat input index of the first pixel of the position-sensitive
    channel plane each output element reads."""
    group = np.arange(geom.pooled_size) * geom.group_size // geom.pooled_size
    d = np.arange(geom.output_dim)[:, None, None]
    channel = (d * geom.group_size + group[None, :, None]) * geom.group_size + group[None, None, :]
    channel = channel.reshape(
        geom.num_classes, geom.channels_per_class, geom.pooled_size, geom.pooled_size
    )
    plane = bins.batch[:, None, None, None, None] * geom.channels + channel[None]
    return plane * (geom.height * geom.width)


def _corners(sample: _Sample, plane_starts: np.ndarray, geom: PSRoiPoolGeometry) -> list[_Corner]:
    """The corners (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1) in the blend's order."""
    hy, hx = 1 - sample.ly, 1 - sample.lx
    y1_inside = sample.y0 + 1 < geom.height
    x1_inside = sample.x0 + 1 < geom.width
    y1 = np.minimum(sample.y0 + 1, geom.height - 1)
    x1 = np.minimum(sample.x0 + 1, geom.width - 1)
    everywhere = np.ones_like(y1_inside)
    corners = []
    for y, y_inside, wy in ((sample.y0, everywhere, hy), (y1, y1_inside, sample.ly)):
        for x, x_inside, wx in ((sample.x0, everywhere, hx), (x1, x1_inside, sample.lx)):
            corners.append(
                _Corner(plane_starts + (y * geom.width + x), y_inside & x_inside, wy * wx)
            )
    return corners


def _corner_values(flat_input: np.ndarray, corners: list[_Corner]) -> list[np.ndarray]:
    """[K, L, J, P, P] input values at each corner; 0 for corners outside the map."""
    return [np.where(c.inside, flat_input[c.index], 0).astype(flat_input.dtype) for c in corners]


def _counts(bins: _Bins, geom: PSRoiPoolGeometry) -> np.ndarray:
    """[K, L, 1, P, P] number of kept samples per bin (int64)."""
    return sum(s.kept.sum(axis=0, dtype=np.int64) for s in _samples(bins, geom))


def _prepare(input, rois, offset, geom: PSRoiPoolGeometry):
    acc = acc_dtype(input.dtype.name)
    rois_acc = np.asarray(rois).astype(acc, copy=False)
    offset_acc = None if offset is None else np.asarray(offset).astype(acc, copy=False)
    bins = _bins(rois_acc, offset_acc, geom)
    return acc, bins, _plane_starts(bins, geom)


@_quiet_float_errors
def psroi_pool_forward(input, rois, offset, geom: PSRoiPoolGeometry):
    """(output [K, output_dim, P, P] of the input dtype, count [K, output_dim, P, P]
    int32) for NumPy arrays."""
    output = np.zeros(geom.output_shape, dtype=input.dtype)
    count = np.zeros(geom.output_shape, dtype=np.int32)
    acc = acc_dtype(input.dtype.name)
    flat_input = np.asarray(input).astype(acc, copy=False).reshape(-1)
    if FACTORISED and _finite(flat_input):
        for chunk, chunk_geom in _factorised_chunks(geom):
            output[chunk], count[chunk] = _forward_factorised(
                flat_input, rois[chunk], None if offset is None else offset[chunk], chunk_geom
            )
        return output, count
    for chunk, chunk_geom in _roi_chunks(geom):
        output[chunk], count[chunk] = _forward_chunk(
            flat_input, rois[chunk], None if offset is None else offset[chunk], chunk_geom
        )
    return output, count


def _forward_chunk(flat_input, rois, offset, geom: PSRoiPoolGeometry):
    acc, bins, plane_starts = _prepare(flat_input, rois, offset, geom)
    total = np.zeros(plane_starts.shape, dtype=acc)
    kept_count = np.zeros(bins.hstart.shape, dtype=np.int64)
    for sample in _samples(bins, geom):
        v00, v01, v10, v11 = _corner_values(flat_input, _corners(sample, plane_starts, geom))
        hy, hx = 1 - sample.ly, 1 - sample.lx
        value = hy * (hx * v00 + sample.lx * v01) + sample.ly * (hx * v10 + sample.lx * v11)
        value = np.where(sample.is_nan, np.nan, value).astype(acc)
        block = np.where(sample.kept, value, 0).astype(acc)
        del v00, v01, v10, v11, value
        block[0] += total  # total + s_0 + s_1 + ... in sample order
        np.add.accumulate(block, axis=0, out=block)
        total = block[-1].copy()
        del block
        kept_count += sample.kept.sum(axis=0, dtype=np.int64)
    mean = total / np.maximum(kept_count, 1).astype(acc)
    output = np.where(kept_count > 0, mean, 0).reshape(geom.output_shape)
    count = np.broadcast_to(kept_count, plane_starts.shape).reshape(geom.output_shape)
    return output, count


@_quiet_float_errors
def psroi_pool_backward(
    grad_output, input, rois, offset, geom: PSRoiPoolGeometry, *, wrt: frozenset[str]
):
    """(grad_input [N, C, H, W] or None, grad_offset [K, 2 * num_classes, S, S] or None)
    for the names in ``wrt``, NumPy arrays of the input dtype."""
    want_input = "input" in wrt
    want_offset = "offset" in wrt and offset is not None
    dtype = input.dtype
    acc = acc_dtype(input.dtype.name)
    flat_input = np.asarray(input).astype(acc, copy=False).reshape(-1)
    factorised = FACTORISED and _finite(grad_output) and (not want_offset or _finite(flat_input))
    # the per-sample path sums grad_input in float64; the factorised one, with far fewer
    # terms per pixel, in the accumulation dtype (as the kernels do)
    grad_input = (
        np.zeros(flat_input.size, dtype=acc if factorised else np.float64) if want_input else None
    )
    grad_offset = np.zeros(geom.offset_shape, dtype=dtype) if want_offset else None
    for chunk, chunk_geom in (_factorised_chunks if factorised else _roi_chunks)(geom):
        if factorised:
            offset_part = _backward_factorised(
                grad_input,
                grad_output[chunk],
                flat_input,
                rois[chunk],
                None if offset is None else offset[chunk],
                chunk_geom,
                dtype=dtype,
                want_offset=want_offset,
            )
            if want_offset:
                grad_offset[chunk] = offset_part
            continue
        chunk_offset = None if offset is None else offset[chunk]
        offset_part = _backward_chunk(
            grad_input,
            grad_output[chunk],
            flat_input,
            rois[chunk],
            chunk_offset,
            chunk_geom,
            dtype=dtype,
            want_offset=want_offset,
        )
        if want_offset:
            grad_offset[chunk] = offset_part
    return PSRoiPoolGrads(
        None
        if grad_input is None
        else grad_input.reshape(geom.input_shape).astype(dtype, copy=False),
        grad_offset,
    )


def _backward_chunk(
    grad_input,
    grad_output,
    flat_input,
    rois,
    offset,
    geom: PSRoiPoolGeometry,
    *,
    dtype,
    want_offset: bool,
):
    """Adds the chunk's share to grad_input (flat float64, or None) and returns its
    grad_offset [K, 2 * num_classes, S, S] (or None)."""
    acc, bins, plane_starts = _prepare(flat_input, rois, offset, geom)
    counts = _counts(bins, geom)
    grad = np.asarray(grad_output).astype(acc, copy=False).reshape(plane_starts.shape)
    grad = grad / np.maximum(counts, 1).astype(acc)  # bins without samples have no terms

    bin_dh = np.zeros(bins.hstart.shape, dtype=acc) if want_offset else None
    bin_dw = np.zeros(bins.hstart.shape, dtype=acc) if want_offset else None
    for sample in _samples(bins, geom):
        corners = _corners(sample, plane_starts, geom)
        usable = sample.kept & ~sample.is_nan
        if grad_input is not None:
            # grad_input[q] += weight(q) * grad over the in-map corners q of kept samples
            indices, values = [], []
            for corner in corners:
                scattered = np.broadcast_to(usable & corner.inside, corner.index.shape)
                indices.append(corner.index[scattered])
                values.append(np.broadcast_to(corner.weight * grad, scattered.shape)[scattered])
            grad_input += np.bincount(
                np.concatenate(indices), np.concatenate(values), minlength=grad_input.size
            )
            del indices, values
        if want_offset:
            # The derivatives are linear in the corner values: weight them by grad, sum
            # over the class's channels, then differentiate (MSRA: 0 on an integer
            # coordinate, which covers every clamped sample).
            v00, v01, v10, v11 = (
                (grad * v).sum(axis=-3, keepdims=True) for v in _corner_values(flat_input, corners)
            )
            d_dw = (1 - sample.ly) * (v01 - v00) + sample.ly * (v11 - v10)
            d_dh = (1 - sample.lx) * (v10 - v00) + sample.lx * (v11 - v01)
            bin_dw += np.where(usable & (sample.lx != 0), d_dw, 0).astype(acc).sum(axis=0)
            bin_dh += np.where(usable & (sample.ly != 0), d_dh, 0).astype(acc).sum(axis=0)
            poisoned = (sample.kept & sample.is_nan).any(axis=0)
            bin_dw[poisoned] = np.nan
            bin_dh[poisoned] = np.nan

    if not want_offset:
        return None
    grad_offset = np.empty(geom.offset_shape, dtype=dtype)
    cells = grad_offset.reshape(geom.num_rois, geom.num_classes, 2, geom.part_size, geom.part_size)
    trans_std = acc.type(geom.trans_std)
    for axis, bin_sums, roi_size in ((0, bin_dw, bins.roi_w), (1, bin_dh, bins.roi_h)):
        cells[:, :, axis] = (
            _sum_bins_into_parts(bin_sums[:, :, 0], geom)
            * trans_std
            * (roi_size[:, None, None, None])
        )
    return grad_offset


def _sum_bins_into_parts(per_bin: np.ndarray, geom: PSRoiPoolGeometry) -> np.ndarray:
    """[K, L, P, P] -> [K, L, S, S]: the sum over the bins of each offset cell (0 for a
    cell without bins). A NaN stays in its own cell."""
    part = _part_of_bin(geom)
    cells = np.zeros((geom.part_size, geom.part_size, *per_bin.shape[:2]), dtype=per_bin.dtype)
    np.add.at(cells, (part[:, None], part[None, :]), np.moveaxis(per_bin, (2, 3), (0, 1)))
    return np.moveaxis(cells, (0, 1), (2, 3))


# ---------------------------------------------------------------------------- factorised path
#
# A bin's samples are a tensor product (h_ih) x (w_iw), and the skip test, the clamps, the
# corners and the bilinear weights are per axis, so the sum over a bin's kept samples of
# its channel plane V is sum_r sum_c Ay[r] * Ax[c] * V[r, c], with Ay[r] the weight of row
# r summed over the kept, non-NaN h samples (Ax likewise), over the distinct rows and
# columns they touch (at most 2 * sample_per_part each): the cost is a bin's footprint, not
# 4 corners per sample. count = (kept rows) * (kept columns). The offset gradient uses the
# summed derivative weights (dAx: -1 / +1 on the corners of a sample whose lx != 0, MSRA's
# convention) with Ay, and dAy with Ax. A kept sample is NaN when its h or its w is NaN:
# those bins are NaN (output and grad_offset) and their NaN samples add nothing to
# grad_input.
#
# The path runs when the data it reads are finite (input; grad_output in the backward):
# products with a weight 0 are then exact zeros and the results equal the per-sample sums
# to rounding. Each element is summed in a fixed order (columns, then rows), so blocking
# does not change the forward. Non-finite data take the per-sample path (a NaN / inf pixel
# read with weight 0 poisons a sample there, as in the kernels).

# Set to False to run the per-sample path for every call (tests compare the two).
FACTORISED = True

# Working bytes per footprint cell of one output element (indices, values, products) and
# per sample of one axis of one bin of a class (coordinates, entries, sort, slots).
_CELL_BYTES = 6 * 8
_AXIS_BYTES = 40 * 8


def _finite(array) -> bool:
    """Every value finite: one summation pass in the accumulation dtype (float64 for
    float64, else float32), no temporaries. A NaN or an infinity makes the sum NaN or
    infinite; so can an overflow of finite values, which only sends the call to the
    per-sample path (exact for any values)."""
    dtype = np.float64 if np.dtype(array.dtype) == np.float64 else np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.sum(array, dtype=dtype)))


def _footprint(geom: PSRoiPoolGeometry) -> tuple[int, int]:
    """Bounds on the distinct rows and columns a bin's samples touch."""
    return (min(2 * geom.sample_per_part, geom.height), min(2 * geom.sample_per_part, geom.width))


def _factorised_bytes_per_roi(geom: PSRoiPoolGeometry) -> int:
    rows, cols = _footprint(geom)
    bins = geom.pooled_size * geom.pooled_size
    return bins * (
        geom.output_dim * rows * _CELL_BYTES
        + geom.num_classes * (rows * cols * 8 + 2 * geom.sample_per_part * _AXIS_BYTES)
    )


def _factorised_chunks(geom: PSRoiPoolGeometry):
    """(RoIs, their geometry) per chunk of consecutive RoIs sized to the workspace."""
    size = max(1, _WORKSPACE_BYTES // _factorised_bytes_per_roi(geom))
    for start in range(0, geom.num_rois, size):
        rois = slice(start, min(start + size, geom.num_rois))
        yield rois, dataclasses.replace(geom, num_rois=rois.stop - rois.start)


class _AxisSums(NamedTuple):
    """Per bin of a class, one axis: the distinct in-map rows its usable samples touch
    [m, L] (padding: 0 with weight 0), their summed weights and derivative weights
    [m, L] (acc), the kept samples [m] (int64) and whether one of them is NaN [m]."""

    rows: np.ndarray
    weights: np.ndarray
    dweights: np.ndarray
    kept: np.ndarray
    nan: np.ndarray
    used: np.ndarray  # [m] the first that many entries of each bin are its rows

    def take(self, index: np.ndarray, length: int) -> _AxisSums:
        return _AxisSums(
            self.rows[index, :length],
            self.weights[index, :length],
            self.dweights[index, :length],
            self.kept[index],
            self.nan[index],
            self.used[index],
        )


def _axis_sums(
    start: np.ndarray, step: np.ndarray, geom: PSRoiPoolGeometry, extent: int
) -> _AxisSums:
    """start [m] (hstart / wstart), step [m] (sub_h / sub_w) -> the axis's sums."""
    acc = start.dtype.type
    last = acc(extent - 1)
    index = np.arange(geom.sample_per_part).astype(start.dtype)
    # the kernels' arithmetic: start + i * step
    coord = start[:, None] + index[None, :] * step[:, None]
    kept = ~((coord < -0.5) | (coord > last + acc(0.5)))
    is_nan = np.isnan(coord)
    usable = kept & ~is_nan
    clamped = np.where(is_nan, 0, np.clip(coord, 0, last)).astype(start.dtype)
    low = np.floor(clamped)
    frac = clamped - low
    low = low.astype(np.int64)
    high_inside = usable & (low + 1 < extent)
    moves = usable & (frac != 0)
    zero, one = acc(0), acc(1)
    rows = np.concatenate(
        [np.where(usable, low, extent), np.where(high_inside, low + 1, extent)], axis=1
    )
    weights = np.concatenate(
        [np.where(usable, 1 - frac, zero), np.where(high_inside, frac, zero)], axis=1
    )
    dweights = np.concatenate([np.where(moves, -one, zero), np.where(moves, one, zero)], axis=1)
    distinct, summed, dsummed, used = _compact(rows, weights, dweights, extent)
    return _AxisSums(
        distinct,
        summed,
        dsummed,
        kept.sum(axis=1, dtype=np.int64),
        (kept & is_nan).any(axis=1),
        used,
    )


def _compact(rows: np.ndarray, weights: np.ndarray, dweights: np.ndarray, extent: int):
    """Entries (row, weight, derivative weight) [m, E], rows == extent for none -> per
    bin the distinct rows [m, L] with the summed weights (in entry order, sorted by row)."""
    m = rows.shape[0]
    order = np.argsort(rows, axis=1, kind="stable")
    rows = np.take_along_axis(rows, order, 1)
    weights = np.take_along_axis(weights, order, 1)
    dweights = np.take_along_axis(dweights, order, 1)
    new = np.ones(rows.shape, bool)
    new[:, 1:] = rows[:, 1:] != rows[:, :-1]
    slot = np.cumsum(new, axis=1) - 1
    used = (new & (rows < extent)).sum(axis=1)
    length = int(used.max()) if m else 0
    acc = weights.dtype
    if length == 0:
        empty = np.zeros((m, 0), acc)
        return np.zeros((m, 0), np.int64), empty, empty, used
    np.minimum(slot, length, out=slot)  # entries past the map go to a dropped column
    flat = (np.arange(m)[:, None] * (length + 1) + slot).ravel()
    size = m * (length + 1)
    shape = (m, length + 1)
    summed = np.bincount(flat, weights.ravel(), minlength=size).reshape(shape)[:, :length]
    dsummed = np.bincount(flat, dweights.ravel(), minlength=size).reshape(shape)[:, :length]
    distinct = np.zeros(shape, np.int64)
    distinct[np.arange(m)[:, None], slot] = rows
    distinct = distinct[:, :length]
    distinct[distinct >= extent] = 0
    return distinct, summed.astype(acc), dsummed.astype(acc), used


class _Footprints(NamedTuple):
    """The bins of a chunk, per class: [m] = [K * L * P * P] bins (RoI, class, row,
    column order), elements [m, J] (their output channels), per-axis sums."""

    starts: np.ndarray  # [m, J] flat input index of each element's channel plane
    y: _AxisSums
    x: _AxisSums
    count: np.ndarray  # [m] kept samples (int64)
    nan: np.ndarray  # [m] a kept sample is NaN


def _footprints(flat_input, rois, offset, geom: PSRoiPoolGeometry) -> _Footprints:
    acc, bins, plane_starts = _prepare(flat_input, rois, offset, geom)
    p = geom.pooled_size
    shape = (geom.num_rois, geom.num_classes, 1, p, p)
    m = geom.num_rois * geom.num_classes * p * p

    def flat(values):
        return np.ascontiguousarray(np.broadcast_to(values, shape)).reshape(m)

    y = _axis_sums(flat(bins.hstart), flat(bins.sub_h), geom, geom.height)
    x = _axis_sums(flat(bins.wstart), flat(bins.sub_w), geom, geom.width)
    starts = np.moveaxis(plane_starts, 2, -1).reshape(m, geom.channels_per_class)
    nan = (y.nan & (x.kept > 0)) | (x.nan & (y.kept > 0))
    return _Footprints(starts, y, x, y.kept * x.kept, nan)


def _groups(fp: _Footprints):
    """(bin indices, footprints) per footprint size: the bins with the same numbers of
    rows and columns, trimmed to them (no padding; each element's sums are unchanged)."""
    if len(fp.count) == 0:
        return
    key = fp.y.used * (int(fp.x.used.max()) + 1) + fp.x.used
    order = np.argsort(key, kind="stable")
    sizes = key[order]
    edges = np.flatnonzero(np.concatenate(([True], sizes[1:] != sizes[:-1], [True])))
    for first, stop in zip(edges[:-1], edges[1:]):
        index = order[first:stop]
        rows, cols = int(fp.y.used[index[0]]), int(fp.x.used[index[0]])
        yield (
            index,
            _Footprints(
                fp.starts[index],
                fp.y.take(index, rows),
                fp.x.take(index, cols),
                fp.count[index],
                fp.nan[index],
            ),
        )


def _element_rows(fp: _Footprints, geom: PSRoiPoolGeometry) -> np.ndarray:
    """[m, J, Ly] flat input index of each element's footprint rows at column 0."""
    return fp.starts[:, :, None] + (fp.y.rows * geom.width)[:, None, :]


def _to_output(per_bin: np.ndarray, geom: PSRoiPoolGeometry) -> np.ndarray:
    """[m, J] -> [K, output_dim, P, P]."""
    p = geom.pooled_size
    return np.moveaxis(
        per_bin.reshape(geom.num_rois, geom.num_classes, p, p, geom.channels_per_class), -1, 2
    ).reshape(geom.output_shape)


def _forward_factorised(flat_input, rois, offset, geom: PSRoiPoolGeometry):
    everything = _footprints(flat_input, rois, offset, geom)
    acc = flat_input.dtype
    total = np.zeros(everything.starts.shape, acc)
    for index, fp in _groups(everything):
        m, j = fp.starts.shape
        ly = fp.y.rows.shape[1]
        rows = _element_rows(fp, geom)
        column_sums = np.zeros((m, j, ly), acc) if fp.x.rows.shape[1] == 0 else None
        for b in range(fp.x.rows.shape[1]):
            values = flat_input[rows + fp.x.rows[:, None, None, b]]
            values *= fp.x.weights[:, None, None, b]
            if column_sums is None:  # the first term as is (0 + t = t)
                column_sums = values
            else:
                column_sums += values
            del values
        sums = np.zeros((m, j), acc)
        for a in range(ly):
            sums += fp.y.weights[:, None, a] * column_sums[:, :, a]
        del column_sums
        total[index] = sums
    total[everything.nan] = np.nan
    count = everything.count[:, None]
    mean = total / np.maximum(count, 1).astype(acc)
    output = np.where(count > 0, mean, 0).astype(acc)
    counts = np.broadcast_to(count, total.shape)
    return _to_output(output, geom), _to_output(counts, geom)


def _backward_factorised(
    grad_input,
    grad_output,
    flat_input,
    rois,
    offset,
    geom: PSRoiPoolGeometry,
    *,
    dtype,
    want_offset: bool,
):
    """The factorised :func:`_backward_chunk`."""
    everything = _footprints(flat_input, rois, offset, geom)
    acc = flat_input.dtype
    p = geom.pooled_size
    j = geom.channels_per_class
    grad_all = (
        np.asarray(grad_output)
        .astype(acc, copy=False)
        .reshape(geom.num_rois, geom.num_classes, j, p, p)
    )
    grad_all = np.moveaxis(grad_all, 2, -1).reshape(-1, j)
    grad_all = grad_all / np.maximum(everything.count, 1).astype(acc)[:, None]
    bin_dw = np.zeros(len(everything.count), acc)
    bin_dh = np.zeros(len(everything.count), acc)
    scatter = None if grad_input is None else _Scatter(grad_input)
    for index, fp in _groups(everything):
        m = len(index)
        grad = grad_all[index]
        rows = _element_rows(fp, geom)
        ly, lx = fp.y.rows.shape[1], fp.x.rows.shape[1]
        if not (ly and lx):
            continue
        if scatter is not None:
            _scatter(scatter, rows, fp, grad)
        if not want_offset:
            continue
        # dots [m, Ly, Lx] = sum over the class's channels of grad * V
        dots = np.zeros((m, ly, lx), acc)
        for b in range(lx):
            dots[:, :, b] = np.einsum(
                "mja,mj->ma", flat_input[rows + fp.x.rows[:, None, None, b]], grad
            )
        bin_dw[index] = np.einsum("ma,mab,mb->m", fp.y.weights, dots, fp.x.dweights)
        bin_dh[index] = np.einsum("ma,mab,mb->m", fp.y.dweights, dots, fp.x.weights)
    if scatter is not None:
        scatter.flush()
    if not want_offset:
        return None
    bin_dw[everything.nan] = np.nan
    bin_dh[everything.nan] = np.nan
    grad_offset = np.empty(geom.offset_shape, dtype=dtype)
    cells = grad_offset.reshape(geom.num_rois, geom.num_classes, 2, geom.part_size, geom.part_size)
    shape = (geom.num_rois, geom.num_classes, p, p)
    trans_std = acc.type(geom.trans_std)
    roi_h, roi_w = _roi_sizes(rois, geom, acc)
    for axis, bin_sums, roi_size in ((0, bin_dw, roi_w), (1, bin_dh, roi_h)):
        cells[:, :, axis] = (
            _sum_bins_into_parts(bin_sums.reshape(shape), geom)
            * trans_std
            * (roi_size[:, None, None, None])
        )
    return grad_offset


class _Scatter:
    """grad_input (flat, acc dtype) += weights at indices, buffered: entries are collected
    up to a workspace-sized batch, then added with one np.bincount over the range of
    indices they touch when that range is at most 4 times the entries (one pass, bounded
    memory), else with np.add.at."""

    def __init__(self, grad_input: np.ndarray):
        self.grad_input = grad_input
        self.limit = max(1, _WORKSPACE_BYTES // 64)
        self.indices: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.size = 0

    def add(self, indices: np.ndarray, weights: np.ndarray) -> None:
        used = weights != 0
        self.indices.append(indices[used])
        self.weights.append(weights[used])
        self.size += self.indices[-1].size
        if self.size >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.size:
            return
        indices, weights = np.concatenate(self.indices), np.concatenate(self.weights)
        self.indices, self.weights, self.size = [], [], 0
        low, high = int(indices.min()), int(indices.max())
        if high + 1 - low <= 4 * len(indices):
            self.grad_input[low : high + 1] += np.bincount(
                indices - low, weights, minlength=high + 1 - low
            )
        else:
            np.add.at(self.grad_input, indices, weights.astype(self.grad_input.dtype))


def _scatter(scatter: _Scatter, rows, fp: _Footprints, grad) -> None:
    """Ay[a] * Ax[b] * grad into each element's footprint, a few columns at a time."""
    m, j, ly = rows.shape
    lx = fp.x.rows.shape[1]
    per_row = fp.y.weights[:, None, :] * grad[:, :, None]
    step = max(1, _WORKSPACE_BYTES // (8 * max(m * j * ly, 1) * _CELL_BYTES))
    for first in range(0, lx, step):
        cols = slice(first, min(first + step, lx))
        index = rows[..., None] + fp.x.rows[:, None, None, cols]
        weight = per_row[..., None] * fp.x.weights[:, None, None, cols]
        scatter.add(index.ravel(), weight.ravel())
        del index, weight


def _roi_sizes(rois, geom: PSRoiPoolGeometry, acc: np.dtype):
    bins = _bins(np.asarray(rois).astype(acc, copy=False), None, geom)
    return bins.roi_h, bins.roi_w
