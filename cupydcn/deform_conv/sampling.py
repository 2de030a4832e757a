"""Sampling-location analysis of deformable convolutions.

Where a deformable layer reads its input, from its offsets alone (no input, no weights):

* :func:`sampling_locations` — the absolute (y, x) sampling point of every output
  position, offset group and tap;
* :func:`effective_dilation` — the DCN paper's statistic (Dai et al. 2017, section 4):
  the mean distance between the sampling locations of adjacent taps, per output position;
* :func:`stacked_sampling_locations` — the sampling points in the *input image* of a
  stack of deformable layers for chosen output positions (``K^L`` points for ``L``
  layers of ``K`` taps), as in the paper's figure of a 3-layer 3 x 3 stack.

Layouts and units (docs/semantics.md §1.2 and §5.2):

    offset     [N, 2 * G * kh * kw, H_out, W_out]  interleaved (dy, dx), tap k = i * kw + j
    locations  [N, G, kh * kw, 2, H_out, W_out]    (y, x) in input pixels: the offset
                                                   tensor reshaped, plus the regular grid
    dilation   [N, G, H_out, W_out]                in input pixels

    locations[n, g, k, 0, oy, ox] = oy * stride_h - pad_h + i * dil_h + dy
    locations[n, g, k, 1, oy, ox] = ox * stride_w - pad_w + j * dil_w + dx

Coordinates are not clamped to the map: a point outside it is where the layer reads its
zero padding. Arithmetic is carried out in float64 for float64 offsets and in float32
otherwise; results have that dtype (half-precision coordinates would be too coarse) and
come back in the caller's array type, on the offsets' device.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np

from cupydcn.core.checks import check_float_dtypes, conv_output_size, int_pair, is_int, shape_of
from cupydcn.core.dispatch import Backends, Prepared, dispatch
from cupydcn.core.dtypes import dtype_info
from cupydcn.core.errors import type_error, value_error

SAMPLING_OP = "sampling_locations"
DILATION_OP = "effective_dilation"
STACKED_OP = "stacked_sampling_locations"
INTERPOLATIONS = ("bilinear", "nearest")


class StackedSampling(NamedTuple):
    """Result of :func:`stacked_sampling_locations`.

    locations [N, P, T, 2]: (y, x) in input-image pixels, T = product of the layers' tap
        counts; the last layer's tap index is the most significant (row-major over
        (k_L, k_{L-1}, ..., k_1)).
    weights [N, P, T]: the product of the mask values along each point's path through the
        stack (layers without a mask count 1), or None when no mask was given.
    """

    locations: object
    weights: object


# ---------------------------------------------------------------------------- helpers


def _compute_dtype(xp, dtype_name: str):
    return xp.float64 if dtype_name == "float64" else xp.float32


def _offset_groups(op: str, name: str, offset, taps: int, kernel: tuple[int, int]) -> int:
    shape = shape_of(offset)
    if len(shape) != 4:
        raise value_error(
            op, f"{name} must be 4-D [N, 2 * G * kh * kw, H_out, W_out]; got shape {shape}"
        )
    channels = shape[1]
    if channels < 2 * taps or channels % (2 * taps) != 0:
        raise value_error(
            op,
            f"{name}.shape[1] = {channels} must be a positive multiple of 2 * kh * kw = "
            f"{2 * taps} (kernel_size {kernel})",
        )
    if shape[0] < 1 or shape[2] < 1 or shape[3] < 1:
        raise value_error(
            op, f"{name} must have a batch and an output size of at least 1; got shape {shape}"
        )
    return channels // (2 * taps)


def _geometry(op: str, kernel_size, stride, padding, dilation):
    kernel = int_pair(op, "kernel_size", kernel_size, minimum=1)
    return (
        kernel,
        int_pair(op, "stride", stride, minimum=1),
        int_pair(op, "padding", padding, minimum=0),
        int_pair(op, "dilation", dilation, minimum=1),
    )


def _tap_grid(xp, kernel, dilation, dtype):
    """[K, 2] (i * dil_h, j * dil_w) of every tap k = i * kw + j."""
    kh, kw = kernel
    i = xp.repeat(xp.arange(kh), kw) * dilation[0]
    j = xp.tile(xp.arange(kw), kh) * dilation[1]
    return xp.stack([i, j], axis=1).astype(dtype)


def _locations(xp, offset, dtype, kernel, stride, padding, dilation):
    """[N, G, K, 2, H_out, W_out] sampling locations of a native offset array."""
    n, channels, out_h, out_w = shape_of(offset)
    taps = kernel[0] * kernel[1]
    groups = channels // (2 * taps)
    locations = offset.astype(dtype).reshape(n, groups, taps, 2, out_h, out_w)
    taps_yx = _tap_grid(xp, kernel, dilation, dtype)  # [K, 2]
    base_y = xp.arange(out_h, dtype=dtype) * stride[0] - padding[0]
    base_x = xp.arange(out_w, dtype=dtype) * stride[1] - padding[1]
    grid = xp.empty((taps, 2, out_h, out_w), dtype=dtype)
    grid[:, 0] = taps_yx[:, 0, None, None] + base_y[None, :, None]
    grid[:, 1] = taps_yx[:, 1, None, None] + base_x[None, None, :]
    return locations + grid


def _adjacent_mean_distance(xp, locations, kernel):
    """[N, G, H, W]: mean Euclidean distance of horizontally and vertically adjacent taps
    of locations [N, G, K, 2, H, W]."""
    n, groups, _, _, out_h, out_w = locations.shape
    kh, kw = kernel
    grid = locations.reshape(n, groups, kh, kw, 2, out_h, out_w)
    total = xp.zeros((n, groups, out_h, out_w), dtype=locations.dtype)
    if kw > 1:
        d = grid[:, :, :, 1:] - grid[:, :, :, :-1]
        total = total + xp.sqrt((d * d).sum(axis=4)).sum(axis=(2, 3))
    if kh > 1:
        d = grid[:, :, 1:] - grid[:, :, :-1]
        total = total + xp.sqrt((d * d).sum(axis=4)).sum(axis=(2, 3))
    pairs = kh * (kw - 1) + (kh - 1) * kw
    return total / pairs


# ---------------------------------------------------------------------------- public


def sampling_locations(offset, *, kernel_size, stride=1, padding=0, dilation=1):
    """Absolute sampling coordinates of a deformable convolution.

    ``offset [N, 2 * G * kh * kw, H_out, W_out]`` is the offset argument of
    :func:`cupydcn.deform_conv2d`; ``kernel_size`` (the weight's ``(kh, kw)``), ``stride``,
    ``padding`` and ``dilation`` are those of the call (an int or an ``(h, w)`` pair).

    Returns ``[N, G, kh * kw, 2, H_out, W_out]``: for output position ``(oy, ox)``, offset
    group ``g`` and tap ``k = i * kw + j``, ``[..., 0, oy, ox]`` is
    ``y = oy * stride_h - pad_h + i * dil_h + dy`` and ``[..., 1, oy, ox]`` is
    ``x = ox * stride_w - pad_w + j * dil_w + dx``, in input pixels — the point the op reads
    bilinearly. float64 offsets give float64, every other dtype float32.
    """
    geometry = _geometry(SAMPLING_OP, kernel_size, stride, padding, dilation)
    return _with_locations(SAMPLING_OP, offset, geometry, lambda xp, locations: locations)


def _with_locations(op: str, offset, geometry, reduce):
    """Validate ``offset``, compute its sampling locations where it lives and return
    ``reduce(xp, locations)`` in the caller's array type."""
    kernel, stride, padding, dilation = geometry

    def prepare(native) -> Prepared:
        dtype_name = check_float_dtypes(op, native)
        _offset_groups(op, "offset", native["offset"], kernel[0] * kernel[1], kernel)
        return Prepared(dtype_name, {})

    def compute(xp, launcher, offset, dtype_name):
        locations = _locations(
            xp, offset, _compute_dtype(xp, dtype_name), kernel, stride, padding, dilation
        )
        return reduce(xp, locations)

    return dispatch(
        op,
        {"offset": offset},
        required=("offset",),
        prepare=prepare,
        backends=Backends.array_api(compute),
    )


def effective_dilation(offset, *, kernel_size, stride=1, padding=0, dilation=1):
    """The DCN paper's effective dilation of every output position.

    For each output position and offset group: the mean, over all pairs of horizontally
    and vertically adjacent taps of the ``kh x kw`` grid (taps ``(i, j)``-``(i, j + 1)``
    and ``(i, j)``-``(i + 1, j)``; ``kh * (kw - 1) + (kh - 1) * kw`` pairs), of the
    Euclidean distance between their sampling locations (:func:`sampling_locations`), in
    input pixels. With zero offsets and dilation ``d`` it is ``d``; with ``(d_h, d_w)`` it
    is the pair-count-weighted mean of ``d_h`` and ``d_w``. Stride does not enter.

    Arguments as :func:`sampling_locations`; the kernel needs at least two taps.
    Returns ``[N, G, H_out, W_out]`` (average it over an object mask or the whole map).
    """
    kernel, stride, padding, dilation = _geometry(
        DILATION_OP, kernel_size, stride, padding, dilation
    )
    if kernel == (1, 1):
        raise value_error(
            DILATION_OP, "kernel_size must have at least two taps (adjacent pairs); got (1, 1)"
        )
    return _with_locations(
        DILATION_OP,
        offset,
        (kernel, stride, padding, dilation),
        lambda xp, locations: _adjacent_mean_distance(xp, locations, kernel),
    )


def _per_layer(op: str, name: str, value, layers: int) -> list:
    """One value per layer: a list gives them; anything else (an int, an (h, w) tuple)
    applies to every layer."""
    if isinstance(value, list):
        if len(value) != layers:
            raise value_error(
                op, f"{name} is a list of {len(value)} entries; expected one per layer ({layers})"
            )
        return list(value)
    return [value] * layers


def _read_field(xp, field, ys, xs, interpolation):
    """field [N, C, H, W] read at fractional grid positions ys, xs [N, M] -> [N, M, C].

    Positions are clamped into the grid first (so the field is extended by its border
    values); bilinear blends the 4 neighbours, nearest takes floor(p + 0.5).
    """
    n, channels, height, width = field.shape
    flat = xp.ascontiguousarray(field.reshape(n, channels, height * width).transpose(0, 2, 1))
    ys = xp.clip(ys, 0, height - 1)
    xs = xp.clip(xs, 0, width - 1)

    def gather(iy, ix):
        index = (iy * width + ix)[:, :, None]
        return xp.take_along_axis(flat, index, axis=1)

    if interpolation == "nearest":
        iy = xp.floor(ys + 0.5).astype(xp.int64)
        ix = xp.floor(xs + 0.5).astype(xp.int64)
        return gather(xp.minimum(iy, height - 1), xp.minimum(ix, width - 1))
    fy0 = xp.minimum(xp.floor(ys), max(height - 2, 0))
    fx0 = xp.minimum(xp.floor(xs), max(width - 2, 0))
    wy = (ys - fy0)[:, :, None]
    wx = (xs - fx0)[:, :, None]
    y0, x0 = fy0.astype(xp.int64), fx0.astype(xp.int64)
    y1 = xp.minimum(y0 + 1, height - 1)
    x1 = xp.minimum(x0 + 1, width - 1)
    return (1 - wy) * ((1 - wx) * gather(y0, x0) + wx * gather(y0, x1)) + wy * (
        (1 - wx) * gather(y1, x0) + wx * gather(y1, x1)
    )


def stacked_sampling_locations(
    offsets: Sequence,
    points,
    *,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    masks: Sequence | None = None,
    offset_group=0,
    interpolation: str = "bilinear",
) -> StackedSampling:
    """Sampling points in the input image of a stack of deformable layers.

    ``offsets`` lists the offset arrays of ``L`` stacked layers, the layer next to the
    image first: layer ``l`` reads layer ``l - 1``'s output grid, so its offsets are
    ``[N, 2 * G_l * K_l, H_l, W_l]`` with ``H_l`` the conv output size of ``H_{l-1}``
    (checked). ``points`` ``[P, 2]`` are ``(oy, ox)`` positions in the last layer's output
    grid (ints, or fractional ones), shared by the ``N`` images: a list, or an array of
    the offsets' library.

    Composition: a position ``q`` of layer ``l``'s output grid samples layer ``l``'s input
    grid at ``q * stride - pad + (i * dil_h, j * dil_w) + offset_l(q)``; each of those
    (fractional) positions is a position of layer ``l - 1``'s output grid and is expanded
    the same way, down to the image. ``offset_l(q)`` is read from the offset field by
    ``interpolation``: "bilinear" (default) blends the 4 neighbouring output positions,
    "nearest" takes the nearest one; positions outside the grid (a tap in layer ``l``'s
    zero padding) are clamped to it, i.e. the offsets are extended by their border values,
    while the regular-grid part stays exact. With zero offsets the result is the regular
    receptive field exactly.

    ``kernel_size``, ``stride``, ``padding``, ``dilation``: an int or an ``(h, w)`` tuple
    for every layer, or a list with one entry per layer (likewise ``offset_group``, which
    picks the offset group followed in each layer). ``masks``: None, or a list of ``L``
    DCNv2 masks ``[N, G_l * K_l, H_l, W_l]`` (or None entries), read like the offsets; the
    weight of a point is the product of the masks along its path.

    Returns ``StackedSampling(locations [N, P, T, 2], weights [N, P, T] or None)``, ``(y, x)``
    in image pixels, ``T = K_1 * ... * K_L`` (9^L for 3 x 3 layers), the last layer's tap
    the most significant index.
    """
    op = STACKED_OP
    if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Sequence) or len(offsets) == 0:
        raise type_error(
            op,
            "offsets must be a non-empty list of offset arrays, one per layer; got "
            f"{type(offsets).__name__}",
        )
    layers = len(offsets)
    if interpolation not in INTERPOLATIONS:
        raise value_error(
            op, f"interpolation must be one of {INTERPOLATIONS}; got {interpolation!r}"
        )
    if masks is None:
        masks = [None] * layers
    elif isinstance(masks, (str, bytes)) or not isinstance(masks, Sequence) or len(masks) != layers:
        raise value_error(
            op, f"masks must be None or a list of {layers} entries (arrays or None), one per layer"
        )
    geometry = []
    for values in zip(
        _per_layer(op, "kernel_size", kernel_size, layers),
        _per_layer(op, "stride", stride, layers),
        _per_layer(op, "padding", padding, layers),
        _per_layer(op, "dilation", dilation, layers),
    ):
        geometry.append(_geometry(op, *values))
    groups_followed = _per_layer(op, "offset_group", offset_group, layers)

    arrays = {f"offsets[{l}]": o for l, o in enumerate(offsets)}
    arrays.update({f"masks[{l}]": m for l, m in enumerate(masks) if m is not None})
    points_is_array = not isinstance(points, (list, tuple))
    if points_is_array:
        arrays["points"] = points
    else:
        points = _points_from_sequence(op, points)
    return dispatch(
        op,
        arrays,
        required=tuple(arrays),  # every offset, every given mask, array points
        prepare=partial(
            _prepare_stacked, op, geometry, groups_followed, layers, interpolation=interpolation
        ),
        check_values=_check_points,
        backends=Backends.array_api(partial(_compose_stacked, None if points_is_array else points)),
    )


def _points_from_sequence(op: str, points) -> np.ndarray:
    """``points`` given as a list or tuple of (oy, ox) rows, as a float64 NumPy array."""
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise type_error(
            op, f"points must be [P, 2] (oy, ox) numbers; got {points!r:.80}: {exc}"
        ) from None
    if array.ndim != 2 or array.shape[1] != 2:
        raise value_error(op, f"points must have shape [P, 2] ((oy, ox) rows); got {array.shape}")
    if not np.isfinite(array).all():  # None converts to NaN
        raise value_error(op, "points must be finite")
    return array


@dataclass(frozen=True)
class _StackedPlan:
    op: str
    dtype_name: str
    geometry: tuple
    groups_followed: tuple
    batch: int
    interpolation: str
    names: tuple  # the call's array names in dispatch order


def _prepare_stacked(
    op, geometry, groups_followed, layers, native, *, interpolation="bilinear"
) -> Prepared:
    """Every check of a stacked_sampling_locations call that reads no data."""
    dtype_name = check_float_dtypes(op, {k: v for k, v in native.items() if k != "points"})

    batch = None
    previous_size = None
    for l, (kernel, l_stride, l_padding, l_dilation) in enumerate(geometry):
        name = f"offsets[{l}]"
        offset = native[name]
        taps = kernel[0] * kernel[1]
        groups = _offset_groups(op, name, offset, taps, kernel)
        n, _, out_h, out_w = shape_of(offset)
        if batch is None:
            batch = n
        elif n != batch:
            raise value_error(op, f"{name} has batch {n}; expected {batch} like offsets[0]")
        if previous_size is not None:
            expected = tuple(
                conv_output_size(size, k, stride=s, padding=p, dilation=d)
                for size, p, d, k, s in zip(previous_size, l_padding, l_dilation, kernel, l_stride)
            )
            if (out_h, out_w) != expected:
                raise value_error(
                    op,
                    f"{name} has output size {out_h} x {out_w}; layer {l} reads layer {l - 1}'s "
                    f"{previous_size[0]} x {previous_size[1]} output, so expected "
                    f"{expected[0]} x {expected[1]} (kernel {kernel}, stride {l_stride}, "
                    f"padding {l_padding}, dilation {l_dilation})",
                )
        previous_size = (out_h, out_w)
        group = groups_followed[l]
        if not is_int(group):
            raise type_error(
                op, f"offset_group for layer {l} must be an int in [0, {groups}); got {group!r}"
            )
        if not 0 <= operator.index(group) < groups:
            raise value_error(
                op, f"offset_group for layer {l} must be an int in [0, {groups}); got {group!r}"
            )
        mask_name = f"masks[{l}]"
        if mask_name in native:
            expected_mask = (n, groups * taps, out_h, out_w)
            if shape_of(native[mask_name]) != expected_mask:
                raise value_error(
                    op,
                    f"{mask_name} has shape {shape_of(native[mask_name])}; expected {expected_mask}",
                )
    points = native.get("points")
    if points is not None:
        if not (dtype_info(points.dtype) is not None or points.dtype.kind in "iu"):
            raise type_error(
                op,
                f"points has dtype {points.dtype}; expected a floating or "
                f"integer dtype ((oy, ox) numbers)",
            )
        if points.ndim != 2 or int(points.shape[1]) != 2:
            raise value_error(
                op, f"points must have shape [P, 2] ((oy, ox) rows); got {shape_of(points)}"
            )
    groups_followed = tuple(operator.index(g) for g in groups_followed)
    plan = _StackedPlan(
        op, dtype_name, tuple(geometry), tuple(groups_followed), batch, interpolation, tuple(native)
    )
    return Prepared(plan, {})


def _check_points(xp, native, plan: _StackedPlan) -> None:
    """Array ``points`` are finite (reads them: on the arrays' device and stream)."""
    points = native.get("points")
    if points is not None and not bool(xp.all(xp.isfinite(points))):
        raise value_error(plan.op, "points must be finite")


def _compose_stacked(points_given, xp, launcher, *args) -> StackedSampling:
    """The composition itself (see stacked_sampling_locations) on ``xp`` arrays:
    ``args`` are the call's arrays in ``plan.names`` order, then the plan. Points given
    as a list (``points_given``, a NumPy array) are moved to ``xp``."""
    *arrays, plan = args
    native = dict(zip(plan.names, arrays))
    geometry, groups_followed, batch = plan.geometry, plan.groups_followed, plan.batch
    interpolation, layers = plan.interpolation, len(plan.geometry)
    dtype = _compute_dtype(xp, plan.dtype_name)
    points_native = native["points"] if points_given is None else xp.asarray(points_given)
    points_native = points_native.astype(dtype)
    if points_given is not None and not bool(xp.all(xp.isfinite(points_native))):
        raise value_error(plan.op, "points must be finite")
    # positions [N, M, 2] in the current layer's output grid, from the last layer down.
    positions = xp.broadcast_to(points_native[None], (batch,) + points_native.shape).copy()
    weights = None
    for l in reversed(range(layers)):
        kernel, l_stride, l_padding, l_dilation = geometry[l]
        taps = kernel[0] * kernel[1]
        offset = native[f"offsets[{l}]"]
        group = groups_followed[l]
        field = offset[:, group * 2 * taps : (group + 1) * 2 * taps].astype(dtype)
        ys, xs = positions[..., 0], positions[..., 1]
        read = _read_field(xp, field, ys, xs, interpolation)  # [N, M, 2K]
        m = positions.shape[1]
        read = read.reshape(batch, m, taps, 2)
        taps_yx = _tap_grid(xp, kernel, l_dilation, dtype)
        base = positions * xp.asarray([l_stride[0], l_stride[1]], dtype=dtype) - xp.asarray(
            [l_padding[0], l_padding[1]], dtype=dtype
        )
        new_positions = base[:, :, None, :] + taps_yx[None, None] + read  # [N, M, K, 2]
        mask = native.get(f"masks[{l}]")
        if mask is not None:
            mfield = mask[:, group * taps : (group + 1) * taps].astype(dtype)
            mread = _read_field(xp, mfield, ys, xs, interpolation)  # [N, M, K]
            previous = xp.ones((batch, m), dtype=dtype) if weights is None else weights
            weights = (previous[:, :, None] * mread).reshape(batch, m * taps)
        elif weights is not None:
            weights = xp.repeat(weights, taps, axis=1)
        positions = new_positions.reshape(batch, m * taps, 2)

    p = int(points_native.shape[0])
    total = math.prod(kernel[0] * kernel[1] for kernel, _, _, _ in geometry)
    locations = positions.reshape(batch, p, total, 2)
    if weights is not None:
        weights = weights.reshape(batch, p, total)
    return StackedSampling(locations, weights)
