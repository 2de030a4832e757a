"""Vectorised NumPy backend of the deformable-attention ops for CPU arrays
(docs/semantics.md §8): multi_scale_deformable_attn, dcnv3 and dcnv4, forward and
backward, every dtype.

One sampling core serves the three ops. A call's value map is copied once into
channels-last rows ``table [R + 1, C]`` in the accumulation dtype: row
``(n * S + base + y * W + x) * heads + head`` holds the C channels of pixel (y, x) of
one head / group of one image (``S`` keys per image, ``base`` the level's first key; for
DCNv3/v4 one level, ``S = H * W``, ``base = 0``, heads = groups). The last row is zeros.
A sample point reads the four corners of its cell ``floor(p) + {0, 1}^2``: each corner
inside its level's map is a row of the table, each one outside is the zero row, so no
per-corner masks are needed and the input gradient scattered to the zero row is dropped.

Conventions (§8.4, the same as deform_conv2d's "zeros" mode, §1.8):

* value: ``w1 v1 + w2 v2 + w3 v3 + w4 v4`` with ``w1 = (1-ly)(1-lx)``, ``w2 = (1-ly) lx``,
  ``w3 = ly (1-lx)``, ``w4 = ly lx`` (mmcv's order), corners (y0, x0), (y0, x0+1),
  (y0+1, x0), (y0+1, x0+1); summed over the points in order: ``out += a * value``;
* d/dpx = ``(1-ly)(v2 - v1) + ly (v4 - v3)``, d/dpy = ``(1-lx)(v3 - v1) + lx (v4 - v2)``
  from the same four corners (out-of-map corners 0): right-sided at integer coordinates,
  so one-sided from inside the map at the edges ``-1`` and ``size - 1``;
* points outside ``(-2, size + 1)`` on an axis (infinities included) read nothing: value
  and derivatives 0; a NaN coordinate samples NaN, gets NaN coordinate gradients and adds
  nothing to the input gradient.

Memory: the work runs in chunks of consecutive units (a query of one image for MSDA, an
output pixel of one image for DCNv3/v4), every head / group and point of a unit at once,
sized so that a chunk's temporaries stay within ``_WORKSPACE_BYTES`` (at least one unit
per chunk). Besides the arguments and the results, a call holds the table (the size of
the value map in the accumulation dtype), for the backward the input-gradient table of
the same size, and a chunk's temporaries. A non-contiguous argument may be copied once.

Per chunk of ``u`` units (``h`` heads / groups, ``T`` points per head: L * P for MSDA,
P taps for DCN, ``C`` channels per head):

    coordinates, corner rows, fractions, weights   [u, h, T]
    corner values (one point at a time)            [u, h, C]  x 4
    output / grad_output                           [u, h, C]

Half types (float16, bfloat16) compute in float32 and every returned array is rounded
once to the input dtype. The value / input gradient accumulates in the accumulation
dtype with ``np.add.at`` (the kernels' atomics), in a deterministic order that depends on
the chunking (so a different workspace changes it by rounding only); every other result is
bitwise independent of the chunking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cupydcn.core.dtypes import acc_dtype
from cupydcn.deform_attn.spec import (
    DcnGeometry,
    Dcnv3Grads,
    Dcnv4Grads,
    MsdaGeometry,
    MsdaGrads,
    level_shapes_of,
)

# Bound on the temporaries of one chunk of units (small chunks stay in cache: 8 MiB was
# faster than 64 or 256 MiB on the benchmark layers).
_WORKSPACE_BYTES = 8 * 2**20
# Working bytes per (unit, head, point): coordinates, 4 corner rows, fractions, weights,
# masks and the gradients of the coordinates (8 bytes each, generously).
_POINT_BYTES = 24 * 8
# Arrays of one (unit, head) x C alive at once: output / grad_output, 4 corners, blend
# temporaries, and the flat scatter indices of the backward (8 bytes per channel each).
_CHANNEL_BUFFERS = 10
_INDEX_BUFFERS = 2
# Huge or NaN coordinates are part of the semantics (they sample 0 or NaN), not errors.
_IGNORE_FLOAT_ERRORS = {"invalid": "ignore", "over": "ignore", "divide": "ignore"}


# ---------------------------------------------------------------------------- the core


def _units_per_chunk(heads: int, points: int, channels: int, acc: np.dtype) -> int:
    per_unit = max(heads, 1) * (
        max(points, 1) * _POINT_BYTES
        + max(channels, 1) * (_CHANNEL_BUFFERS * acc.itemsize + _INDEX_BUFFERS * 8)
    )
    return max(1, _WORKSPACE_BYTES // per_unit)


def _table(values: np.ndarray, rows: int, channels: int, acc: np.dtype) -> np.ndarray:
    """values (any layout whose C-order flattening is [rows, channels]) as a table
    [rows + 1, channels] in acc whose last row is zeros."""
    table = np.empty((rows + 1, channels), dtype=acc)
    table[:-1].reshape(values.shape)[...] = values
    table[-1] = 0
    return table


@dataclass(frozen=True)
class _Points:
    """The sample points of a chunk, arrays [u, h, T]: the table rows of the four corners
    (zero row outside), the fractions lx, ly (0 for points that read nothing, NaN for NaN
    points) and the weights (attention weight / mask) of every point."""

    rows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    lx: np.ndarray
    ly: np.ndarray
    weight: np.ndarray

    def corner_weights(self, t: int):
        """w1..w4 of point t, [u, h] each (mmcv's order of products)."""
        ly, lx = self.ly[:, :, t], self.lx[:, :, t]
        hy, hx = 1 - ly, 1 - lx
        return hy * hx, hy * lx, ly * hx, ly * lx


def _locate(
    px: np.ndarray,
    py: np.ndarray,
    height,
    width,
    base,
    image: np.ndarray,
    keys_per_image: int,
    heads: int,
    zero_row: int,
    weight: np.ndarray,
) -> _Points:
    """The points at pixel coordinates (px, py) [u, h, T] of units on images ``image``
    [u]; ``height``, ``width``, ``base``: ints or [T] int arrays (the level of each
    point)."""
    acc = px.dtype
    height = np.asarray(height, dtype=np.intp)
    width = np.asarray(width, dtype=np.intp)
    near = (py > -2) & (py < height + 1) & (px > -2) & (px < width + 1)  # False for NaN
    outside = acc.type(-2)
    fy = np.floor(np.where(near, py, outside))
    fx = np.floor(np.where(near, px, outside))
    ly = np.where(near, py - fy, acc.type(0))
    lx = np.where(near, px - fx, acc.type(0))
    is_nan = np.isnan(px) | np.isnan(py)
    ly[is_nan] = np.nan
    lx[is_nan] = np.nan
    y0 = fy.astype(np.intp)
    x0 = fx.astype(np.intp)
    del fy, fx, near, is_nan
    head = np.arange(heads, dtype=np.intp)[None, :, None]
    first = (image.astype(np.intp) * keys_per_image)[:, None, None] + base
    rows = []
    for dy in (0, 1):
        y = y0 + dy
        y_in = (y >= 0) & (y < height)
        for dx in (0, 1):
            x = x0 + dx
            inside = y_in & (x >= 0) & (x < width)
            row = (first + y * width + x) * heads + head
            rows.append(np.where(inside, row, zero_row))
    return _Points(tuple(rows), lx, ly, weight)


def _gather(table: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """table rows [..., C]; the rows are in range by construction (mode "wrap" never
    wraps and is the fastest mode of np.take)."""
    return np.take(table, rows, axis=0, mode="wrap")


def _forward_chunk(table: np.ndarray, points: _Points) -> np.ndarray:
    """[u, h, C]: sum over the points t, in order, of weight * bilinear value."""
    u, h, count = points.weight.shape
    out = np.zeros((u, h, table.shape[1]), dtype=table.dtype)
    for t in range(count):
        w1, w2, w3, w4 = points.corner_weights(t)
        v1, v2, v3, v4 = (_gather(table, rows[:, :, t]) for rows in points.rows)
        value = w1[..., None] * v1
        value += w2[..., None] * v2
        value += w3[..., None] * v3
        value += w4[..., None] * v4
        value *= points.weight[:, :, t, None]
        out += value
    return out


def _backward_chunk(
    table: np.ndarray,
    grad_table: np.ndarray | None,
    grad: np.ndarray,
    points: _Points,
    *,
    coordinates: bool,
):
    """Gradients of a chunk given grad [u, h, C] (d loss / d output of the chunk).

    grad_table [(R + 1) * C] (flat, acc) += the input gradient when given. With
    ``coordinates``: returns (value_sum, d_px, d_py) [u, h, T]: the sums over channels of
    grad * value (the weight gradient) and weight * grad * d value / d (px, py)."""
    u, h, count = points.weight.shape
    channels = table.shape[1]
    sums = None
    if coordinates:
        sums = tuple(np.zeros((u, h, count), dtype=table.dtype) for _ in range(3))
    column = np.arange(channels, dtype=np.intp)
    for t in range(count):
        weights = points.corner_weights(t)
        a = points.weight[:, :, t]
        if coordinates:
            # per-corner channel sums first, blended afterwards (the corner weights do not
            # depend on the channel)
            # (not einsum: its summation order depends on the chunk's size and layout)
            s1, s2, s3, s4 = (
                (_gather(table, rows[:, :, t]) * grad).sum(axis=-1) for rows in points.rows
            )
            w1, w2, w3, w4 = weights
            ly, lx = points.ly[:, :, t], points.lx[:, :, t]
            sums[0][:, :, t] = w1 * s1 + w2 * s2 + w3 * s3 + w4 * s4
            sums[1][:, :, t] = a * ((1 - ly) * (s2 - s1) + ly * (s4 - s3))
            sums[2][:, :, t] = a * ((1 - lx) * (s3 - s1) + lx * (s4 - s2))
        if grad_table is not None:
            for rows, w in zip(points.rows, weights):
                flat = (rows[:, :, t, None] * channels + column).reshape(-1)
                np.add.at(grad_table, flat, ((w * a)[..., None] * grad).reshape(-1))
    return sums


def _round(array: np.ndarray | None, dtype) -> np.ndarray | None:
    """An acc-dtype result rounded once to the element dtype, C-contiguous."""
    return None if array is None else np.ascontiguousarray(array, dtype=dtype)


# ---------------------------------------------------------------------------- MSDA


@dataclass(frozen=True)
class _Levels:
    """Per point t = l * P + p of a head: the level's (H, W), first key and, as acc
    scalars' arrays, W and H for the normalised-to-pixel map."""

    height: np.ndarray  # [T] intp
    width: np.ndarray
    base: np.ndarray
    height_acc: np.ndarray  # [T] acc
    width_acc: np.ndarray

    @classmethod
    def of(cls, shapes, points: int, acc: np.dtype) -> _Levels:
        h = np.array([s[0] for s in shapes], dtype=np.intp)
        w = np.array([s[1] for s in shapes], dtype=np.intp)
        starts = np.concatenate([[0], np.cumsum(h * w)[:-1]]).astype(np.intp)
        rep = lambda a: np.repeat(a, points)  # noqa: E731
        return cls(rep(h), rep(w), rep(starts), rep(h).astype(acc), rep(w).astype(acc))


def _msda_points(
    locations, weights, chunk: slice, geom: MsdaGeometry, levels: _Levels, acc: np.dtype
) -> _Points:
    loc = np.asarray(locations[chunk], dtype=acc)  # [u, M, L*P, 2]
    # mmcv: h_im = loc_h * spatial_h - 0.5 (grid_sample, align_corners=False)
    half = acc.type(0.5)
    px = loc[..., 0] * levels.width_acc - half
    py = loc[..., 1] * levels.height_acc - half
    a = np.asarray(weights[chunk], dtype=acc)  # [u, M, L*P]
    image = np.arange(chunk.start, chunk.stop) // max(geom.num_queries, 1)
    return _locate(
        px,
        py,
        levels.height,
        levels.width,
        levels.base,
        image,
        geom.num_keys,
        geom.heads,
        geom.batch * geom.num_keys * geom.heads,
        a,
    )


def _msda_common(value, spatial_shapes, sampling_locations, attention_weights, geom: MsdaGeometry):
    acc = acc_dtype(geom.dtype_name)
    units = geom.batch * geom.num_queries
    count = geom.levels * geom.points
    levels = _Levels.of(level_shapes_of(geom, spatial_shapes), geom.points, acc)
    locations = sampling_locations.reshape(units, geom.heads, count, 2)
    weights = attention_weights.reshape(units, geom.heads, count)
    size = _units_per_chunk(geom.heads, count, geom.head_dim, acc)
    chunks = [slice(s, min(s + size, units)) for s in range(0, units, size)]
    return acc, levels, locations, weights, chunks


def msda_forward(
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    geom: MsdaGeometry,
):
    """Output [N, Lq, M * D] of multi_scale_deformable_attn on NumPy arrays (a new
    C-contiguous array in the value dtype; the inputs are never written)."""
    output = np.zeros(geom.output_shape, dtype=value.dtype)
    if output.size == 0:
        return output
    with np.errstate(**_IGNORE_FLOAT_ERRORS):
        acc, levels, locations, weights, chunks = _msda_common(
            value, spatial_shapes, sampling_locations, attention_weights, geom
        )
        table = _table(value, geom.batch * geom.num_keys * geom.heads, geom.head_dim, acc)
        flat = output.reshape(-1, geom.heads, geom.head_dim)
        for chunk in chunks:
            points = _msda_points(locations, weights, chunk, geom, levels, acc)
            flat[chunk] = _forward_chunk(table, points)
    return output


def msda_backward(
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    geom: MsdaGeometry,
    *,
    wrt: frozenset[str],
) -> MsdaGrads:
    """Gradients of multi_scale_deformable_attn for the names in ``wrt`` (see
    :class:`MsdaGrads`), new C-contiguous arrays in the value dtype."""
    dtype = value.dtype
    want_value = "value" in wrt
    want_loc = "sampling_locations" in wrt
    want_attn = "attention_weights" in wrt
    acc = acc_dtype(geom.dtype_name)
    rows = geom.batch * geom.num_keys * geom.heads
    grad_table = np.zeros((rows + 1) * geom.head_dim, dtype=acc) if want_value else None
    grad_loc = np.zeros(geom.locations_shape, dtype=acc) if want_loc else None
    grad_attn = np.zeros(geom.weights_shape, dtype=acc) if want_attn else None
    units = geom.batch * geom.num_queries
    if units and geom.heads and (want_value or want_loc or want_attn):
        with np.errstate(**_IGNORE_FLOAT_ERRORS):
            acc, levels, locations, weights, chunks = _msda_common(
                value, spatial_shapes, sampling_locations, attention_weights, geom
            )
            table = _table(value, rows, geom.head_dim, acc)
            grads = grad_output.reshape(units, geom.heads, geom.head_dim)
            count = geom.levels * geom.points
            loc_flat = None if grad_loc is None else grad_loc.reshape(units, geom.heads, count, 2)
            attn_flat = None if grad_attn is None else grad_attn.reshape(units, geom.heads, count)
            for chunk in chunks:
                points = _msda_points(locations, weights, chunk, geom, levels, acc)
                sums = _backward_chunk(
                    table,
                    grad_table,
                    np.asarray(grads[chunk], dtype=acc),
                    points,
                    coordinates=want_loc or want_attn,
                )
                if want_attn:
                    attn_flat[chunk] = sums[0]
                if want_loc:
                    # d px / d x = W_l, d py / d y = H_l
                    loc_flat[chunk, :, :, 0] = levels.width_acc * sums[1]
                    loc_flat[chunk, :, :, 1] = levels.height_acc * sums[2]
    grad_value = None
    if grad_table is not None:
        grad_value = grad_table[: rows * geom.head_dim].reshape(geom.value_shape)
    return MsdaGrads(_round(grad_value, dtype), _round(grad_loc, dtype), _round(grad_attn, dtype))


# ---------------------------------------------------------------------------- DCNv3 / v4


def _dcn_base(geom: DcnGeometry, chunk: slice, acc: np.dtype):
    """(image [u], p0_x_ [u], p0_y_ [u]) of the output pixels of a chunk, as InternImage's
    kernel: p0 = (dil * (k - 1)) // 2 - pad + o * stride (an int), then
    p0_ = p0 - ((dil * (k - 1)) // 2) * offset_scale in acc."""
    flat = np.arange(chunk.start, chunk.stop, dtype=np.intp)
    pixels = geom.out_h * geom.out_w
    image, pixel = np.divmod(flat, pixels)
    oy, ox = np.divmod(pixel, geom.out_w)
    centre_w = (geom.dil_w * (geom.kernel_w - 1)) // 2
    centre_h = (geom.dil_h * (geom.kernel_h - 1)) // 2
    scale = acc.type(geom.offset_scale)
    p0_x = (centre_w - geom.pad_w + ox * geom.stride_w).astype(acc) - acc.type(centre_w) * scale
    p0_y = (centre_h - geom.pad_h + oy * geom.stride_h).astype(acc) - acc.type(centre_h) * scale
    return image, p0_x, p0_y


def _dcn_points(
    offsets: np.ndarray, mask: np.ndarray, chunk: slice, geom: DcnGeometry, acc: np.dtype
) -> _Points:
    """offsets [u, G, P, 2] (x, y) and mask [u, G, P] of a chunk (acc) -> its points:
    loc = p0_ + (i * dil + offset) * offset_scale per axis."""
    taps = geom.taps()
    tap_x = np.array([iw * geom.dil_w for iw, _ in taps], dtype=acc)
    tap_y = np.array([ih * geom.dil_h for _, ih in taps], dtype=acc)
    image, p0_x, p0_y = _dcn_base(geom, chunk, acc)
    scale = acc.type(geom.offset_scale)
    px = p0_x[:, None, None] + (tap_x + offsets[..., 0]) * scale
    py = p0_y[:, None, None] + (tap_y + offsets[..., 1]) * scale
    return _locate(
        px,
        py,
        geom.height,
        geom.width,
        0,
        image,
        geom.height * geom.width,
        geom.group,
        geom.batch * geom.height * geom.width * geom.group,
        mask,
    )


def _dcn_chunks(geom: DcnGeometry, acc: np.dtype) -> list[slice]:
    units = geom.batch * geom.out_h * geom.out_w
    size = _units_per_chunk(geom.group, geom.points, geom.group_channels, acc)
    return [slice(s, min(s + size, units)) for s in range(0, units, size)]


def _unpack(offset_mask: np.ndarray, chunk: slice, geom: DcnGeometry, acc: np.dtype):
    """DCNv4's packed rows of a chunk -> offsets [u, G, P, 2], mask [u, G, P] (acc); the
    padding beyond G * 3P is never read."""
    p = geom.points
    u = chunk.stop - chunk.start
    units = geom.batch * geom.out_h * geom.out_w
    packed = np.asarray(
        offset_mask.reshape(units, geom.packed_dim)[chunk, : geom.group * 3 * p], dtype=acc
    ).reshape(u, geom.group, 3 * p)
    return packed[..., : 2 * p].reshape(u, geom.group, p, 2), packed[..., 2 * p :]


def _split(offset: np.ndarray, mask: np.ndarray, chunk: slice, geom: DcnGeometry, acc: np.dtype):
    """DCNv3's offset / mask rows of a chunk -> offsets [u, G, P, 2], mask [u, G, P]."""
    p = geom.points
    u = chunk.stop - chunk.start
    units = geom.batch * geom.out_h * geom.out_w
    offsets = np.asarray(offset.reshape(units, geom.group * p * 2)[chunk], dtype=acc)
    masks = np.asarray(mask.reshape(units, geom.group * p)[chunk], dtype=acc)
    return offsets.reshape(u, geom.group, p, 2), masks.reshape(u, geom.group, p)


def _dcn_forward(input, unpack, geom: DcnGeometry):
    output = np.zeros(geom.output_shape, dtype=input.dtype)
    if output.size == 0:
        return output
    acc = acc_dtype(geom.dtype_name)
    with np.errstate(**_IGNORE_FLOAT_ERRORS):
        table = _table(
            input, geom.batch * geom.height * geom.width * geom.group, geom.group_channels, acc
        )
        flat = output.reshape(-1, geom.group, geom.group_channels)
        for chunk in _dcn_chunks(geom, acc):
            offsets, mask = unpack(chunk, acc)
            flat[chunk] = _forward_chunk(table, _dcn_points(offsets, mask, chunk, geom, acc))
    return output


def _dcn_backward(grad_output, input, unpack, geom: DcnGeometry, *, want_input: bool, store):
    """The shared backward: grad_input (or None) and, through ``store(chunk, value_sum,
    d_px, d_py)`` (None when no coordinate gradient is wanted), the offset / mask
    gradients."""
    acc = acc_dtype(geom.dtype_name)
    rows = geom.batch * geom.height * geom.width * geom.group
    grad_table = np.zeros((rows + 1) * geom.group_channels, dtype=acc) if want_input else None
    units = geom.batch * geom.out_h * geom.out_w
    if units and (want_input or store is not None):
        with np.errstate(**_IGNORE_FLOAT_ERRORS):
            table = _table(input, rows, geom.group_channels, acc)
            grads = grad_output.reshape(units, geom.group, geom.group_channels)
            for chunk in _dcn_chunks(geom, acc):
                offsets, mask = unpack(chunk, acc)
                points = _dcn_points(offsets, mask, chunk, geom, acc)
                sums = _backward_chunk(
                    table,
                    grad_table,
                    np.asarray(grads[chunk], dtype=acc),
                    points,
                    coordinates=store is not None,
                )
                if store is not None:
                    store(chunk, *sums)
    if grad_table is None:
        return None
    return _round(grad_table[: rows * geom.group_channels].reshape(geom.input_shape), input.dtype)


def dcnv3_forward(input, offset, mask, geom: DcnGeometry):
    """Output [N, H_out, W_out, G * Cg] of dcnv3 on NumPy arrays."""
    return _dcn_forward(input, lambda chunk, acc: _split(offset, mask, chunk, geom, acc), geom)


def dcnv3_backward(
    grad_output, input, offset, mask, geom: DcnGeometry, *, wrt: frozenset[str]
) -> Dcnv3Grads:
    """Gradients of dcnv3 for the names in ``wrt`` (see :class:`Dcnv3Grads`)."""
    acc = acc_dtype(geom.dtype_name)
    want_offset, want_mask = "offset" in wrt, "mask" in wrt
    units = geom.batch * geom.out_h * geom.out_w
    p = geom.points
    grad_offset = np.zeros((units, geom.group, p, 2), dtype=acc) if want_offset else None
    grad_mask = np.zeros((units, geom.group, p), dtype=acc) if want_mask else None
    scale = acc.type(geom.offset_scale)

    def store(chunk, value_sum, d_px, d_py):
        if want_mask:
            grad_mask[chunk] = value_sum
        if want_offset:  # d loc / d offset = offset_scale
            grad_offset[chunk, :, :, 0] = scale * d_px
            grad_offset[chunk, :, :, 1] = scale * d_py

    grad_input = _dcn_backward(
        grad_output,
        input,
        lambda chunk, acc_: _split(offset, mask, chunk, geom, acc_),
        geom,
        want_input="input" in wrt,
        store=store if (want_offset or want_mask) else None,
    )
    dtype = input.dtype
    return Dcnv3Grads(
        grad_input,
        None if grad_offset is None else _round(grad_offset.reshape(geom.offset_shape), dtype),
        None if grad_mask is None else _round(grad_mask.reshape(geom.mask_shape), dtype),
    )


def dcnv4_forward(input, offset_mask, geom: DcnGeometry):
    """Output [N, H_out, W_out, G * Cg] of dcnv4 on NumPy arrays."""
    return _dcn_forward(input, lambda chunk, acc: _unpack(offset_mask, chunk, geom, acc), geom)


def dcnv4_backward(
    grad_output, input, offset_mask, geom: DcnGeometry, *, wrt: frozenset[str]
) -> Dcnv4Grads:
    """Gradients of dcnv4 for the names in ``wrt`` (see :class:`Dcnv4Grads`); the padding
    of offset_mask beyond G * 3P gets 0."""
    acc = acc_dtype(geom.dtype_name)
    want_packed = "offset_mask" in wrt
    units = geom.batch * geom.out_h * geom.out_w
    p = geom.points
    grad_packed = np.zeros((units, geom.packed_dim), dtype=acc) if want_packed else None
    scale = acc.type(geom.offset_scale)

    def store(chunk, value_sum, d_px, d_py):
        block = np.empty(value_sum.shape[:2] + (3 * p,), dtype=acc)  # [u, G, 3P]
        block[..., 0 : 2 * p : 2] = scale * d_px  # (x, y) pairs
        block[..., 1 : 2 * p : 2] = scale * d_py
        block[..., 2 * p :] = value_sum
        grad_packed[chunk, : geom.group * 3 * p] = block.reshape(len(block), -1)

    grad_input = _dcn_backward(
        grad_output,
        input,
        lambda chunk, acc_: _unpack(offset_mask, chunk, geom, acc_),
        geom,
        want_input="input" in wrt,
        store=store if want_packed else None,
    )
    return Dcnv4Grads(
        grad_input,
        None
        if grad_packed is None
        else _round(grad_packed.reshape(geom.offset_mask_shape), input.dtype),
    )
