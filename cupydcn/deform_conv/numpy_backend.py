"""Vectorised NumPy backend of deform_conv2d (DCNv1 / modulated DCNv2) for CPU arrays.

Computes the function of ``cupydcn/cuda/kernels/deform_conv.cu`` (SEMANTICS.md section 1), with the
kernels' conventions:

* sample point of output pixel (oy, ox), tap (i, j): ``py = oy*stride_h - pad_h + i*dil_h
  + dy`` (likewise px), computed in the accumulation dtype;
* value = bilinear blend of the 4 corners ``floor(p) + {0, 1}^2``, corners outside the map
  read 0; derivative with respect to (py, px) from the same 4 corners (so at ``py == -1``
  exactly it is the one-sided derivative from inside the map, torchvision's convention);
* a NaN coordinate samples NaN and has a NaN offset gradient, and adds nothing to the
  input gradient; coordinates beyond ``(-2, size + 1)`` (infinities included) sample 0;
* ``padding_mode`` "border" / "reflection": each coordinate is first mapped into the map by
  :func:`cupydcn.deform_conv.padding.map_coordinates` (the kernels' ``map_coordinate``), which also
  gives ``dp'/dp`` (1, 0 or -1), the factor of the coordinate derivatives; the bilinear
  cell of ``p' == size - 1`` is ``[size - 2, size - 1]`` (:func:`cupydcn.deform_conv.padding.cell_floor`)
  so the derivative at the last row is the one from inside the map. Infinite coordinates
  clamp (border) or sample NaN (reflection).

How it is vectorised. Every input plane is copied once per chunk of images into a buffer
with a zero border of ``_MARGIN`` = 2 pixels, which holds every corner that a point inside
``(-2, size + 1)`` can have: corners outside the map read the zeros of the border, and
gradients scattered to them land in the border and are cropped away, so no per-corner
validity masks are needed. Points outside ``(-2, size + 1)`` and NaN points are moved to
the top-left of the border. The bordered planes are stored channel-major,
``[C/G, n * G * (H+4) * (W+4)]`` (row c' holds channel c' of every offset group of every
image), so one ``np.take`` per corner gathers all channels of all sampling points, and one
``np.add.at`` per corner scatters the input gradient (accumulating in the accumulation
dtype, as the kernels' atomics do).

Layouts of one chunk of ``n`` images (``G`` offset groups, ``K`` = kernel_h * kernel_w
taps, ``P`` = out_h * out_w pixels, ``M`` = n * G * K * P sampling points):

    planes         [C/G, n * G * (H+4) * (W+4)]   zero-bordered input, channel-major
    points         [M]                            flattened (image, offset group, tap, pixel)
    samples        [C/G, M]                       input sampled at every point
    columns        [n, groups, (C/groups) * K, P] == [n, C*K, P], row c*K + k: the im2col
                                                  matrix, mask * samples, for the GEMM

Half types (float16, bfloat16) are computed and accumulated in float32 and every returned
array is rounded once to the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from cupydcn.deform_conv.spec import OP, ConvGeometry, ConvGrads
from cupydcn.core.dtypes import dtype_info, numpy_dtype
from cupydcn.core.errors import type_error, value_error
from cupydcn.deform_conv.padding import cell_floor, map_coordinates

GRADIENT_NAMES = frozenset({"input", "offset", "weight", "mask", "bias"})

# Zero border around each input plane: the corners of points in (-2, size + 1) lie in
# [-2, size + 1], at most 2 pixels outside the map.
_MARGIN = 2

_INDEX_BYTES = np.dtype(np.intp).itemsize


# ---------------------------------------------------------------------------- public


def conv_forward(
    input: np.ndarray,
    offset: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    mask: np.ndarray | None,
    geom: ConvGeometry,
    *,
    workspace_bytes: int,
) -> np.ndarray:
    """Deformable convolution forward on NumPy arrays.

    Shapes are those of ``geom`` (see :class:`ConvGeometry`):
    input [N, C, H, W], offset [N, 2*G*K, out_h, out_w], weight [C_out, C/groups, kh, kw],
    bias [C_out] or None, mask [N, G*K, out_h, out_w] or None.
    Returns the output [N, C_out, out_h, out_w] in the input dtype (a new array).

    The batch is processed in chunks whose working set stays within ``workspace_bytes``
    (at least one image per chunk). Inputs are never written to.
    """
    dtype, acc = _dtypes_of(input, geom)
    weight_by_group = _weight_by_group(weight, geom, acc)
    output = np.empty(geom.output_shape, dtype=dtype)
    chunk = _images_per_chunk(geom, acc, workspace_bytes, backward=False)
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, geom.batch, chunk):
            images = slice(start, min(start + chunk, geom.batch))
            points = _sample_points(offset[images], geom, acc)
            planes = _bordered_planes(input[images], geom, acc)
            columns = _columns(_samples(planes, points), _flat_mask(mask, images, acc), geom)
            result = np.matmul(weight_by_group, columns)  # [n, groups, C_out/groups, P]
            result = result.reshape(result.shape[0], geom.out_channels, geom.out_h, geom.out_w)
            if bias is not None:
                result += np.asarray(bias, dtype=acc)[:, None, None]
            output[images] = result
    return output


def conv_backward(
    grad_output: np.ndarray,
    input: np.ndarray,
    offset: np.ndarray,
    weight: np.ndarray,
    mask: np.ndarray | None,
    geom: ConvGeometry,
    *,
    wrt: frozenset[str],
    workspace_bytes: int,
) -> ConvGrads:
    """Gradients of deformable convolution on NumPy arrays.

    grad_output [N, C_out, out_h, out_w]; the other arguments as in :func:`conv_forward`.
    ``wrt`` names the gradients wanted, a subset of
    {"input", "offset", "weight", "mask", "bias"}; the others come back as None, and so
    does grad_mask when ``mask`` is None.

    Returns ``(grad_input [N, C, H, W], grad_offset [N, 2*G*K, out_h, out_w],
    grad_weight [C_out, C/groups, kh, kw], grad_mask [N, G*K, out_h, out_w],
    grad_bias [C_out])``, each a new array in the input dtype (or None).
    """
    unknown = set(wrt) - GRADIENT_NAMES
    if unknown:
        raise value_error(
            OP, f"wrt may only name {sorted(GRADIENT_NAMES)}; got unknown {sorted(unknown)}"
        )
    if mask is None:
        wrt = wrt - {"mask"}
    dtype, acc = _dtypes_of(input, geom)
    weight_by_group = _weight_by_group(weight, geom, acc)
    needs_points = bool(wrt & {"input", "offset", "weight", "mask"})
    needs_planes = bool(wrt & {"offset", "weight", "mask"})
    needs_grad_columns = bool(wrt & {"input", "offset", "mask"})

    grad_input = np.empty(geom.input_shape, dtype=dtype) if "input" in wrt else None
    grad_offset = np.empty(geom.offset_shape, dtype=dtype) if "offset" in wrt else None
    grad_mask = np.empty(geom.mask_shape, dtype=dtype) if "mask" in wrt else None
    grad_weight_sum = np.zeros(weight_by_group.shape, dtype=acc) if "weight" in wrt else None
    grad_bias_sum = np.zeros(geom.out_channels, dtype=acc) if "bias" in wrt else None

    chunk = _images_per_chunk(geom, acc, workspace_bytes, backward=True)
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, geom.batch, chunk):
            images = slice(start, min(start + chunk, geom.batch))
            n = images.stop - images.start
            # [n, groups, C_out/groups, P]
            grad_result = np.asarray(grad_output[images], dtype=acc).reshape(
                n, geom.groups, geom.out_channels // geom.groups, geom.out_h * geom.out_w
            )
            if grad_bias_sum is not None:
                grad_bias_sum += grad_result.sum(axis=(0, 3)).reshape(geom.out_channels)
            if not needs_points:
                continue
            points = _sample_points(offset[images], geom, acc)
            flat_mask = _flat_mask(mask, images, acc)
            planes = _bordered_planes(input[images], geom, acc) if needs_planes else None
            if grad_weight_sum is not None:
                columns = _columns(_samples(planes, points), flat_mask, geom)
                for image in range(n):  # one weight-sized product at a time
                    grad_weight_sum += np.matmul(
                        grad_result[image], columns[image].swapaxes(-1, -2)
                    )
                del columns
            if not needs_grad_columns:
                continue
            grad_samples = _channel_major(
                np.matmul(weight_by_group.swapaxes(-1, -2), grad_result), geom
            )  # d loss / d columns, [C/G, M]
            if grad_offset is not None or grad_mask is not None:
                value_sum, d_dy_sum, d_dx_sum = _coordinate_sums(planes, points, grad_samples)
                if grad_mask is not None:
                    grad_mask[images] = value_sum.reshape(grad_mask[images].shape)
                if grad_offset is not None:
                    if flat_mask is not None:
                        d_dy_sum *= flat_mask
                        d_dx_sum *= flat_mask
                    grad_offset[images] = _interleave_dy_dx(d_dy_sum, d_dx_sum, n, geom)
            if grad_input is not None:
                if flat_mask is not None:
                    grad_samples *= flat_mask
                grad_input[images] = _scatter_to_input(grad_samples, points, n, geom)

    grad_weight = (
        None if grad_weight_sum is None
        else grad_weight_sum.reshape(geom.weight_shape).astype(dtype)
    )
    grad_bias = None if grad_bias_sum is None else grad_bias_sum.astype(dtype)
    return ConvGrads(grad_input, grad_offset, grad_weight, grad_mask, grad_bias)


# ---------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class _SamplePoints:
    """The M sampling points of a chunk, located in the channel-major bordered planes.

    Arrays have shape [M], M = n * G * K * P in (image, offset group, tap, pixel) order.
    ``top_left`` is the column of the cell's top-left corner (floor(p'), p' the point
    after the padding mode's mapping) in a row of the planes ``[C/G, n * G * (H+4) * (W+4)]``;
    ``frac_y`` / ``frac_x`` are p' minus that corner, NaN where a coordinate of p' is NaN.
    ``slope_y`` / ``slope_x`` are dp'/dp (None for padding_mode "zeros", where it is 1).
    """

    top_left: np.ndarray
    frac_y: np.ndarray
    frac_x: np.ndarray
    bordered_width: int
    slope_y: np.ndarray | None = None
    slope_x: np.ndarray | None = None

    def corners(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """The four corners as ``(shift, weight, d weight / d py, d weight / d px)``; the
        corner's column is ``top_left + shift``.

        The value at p is ``sum(weight * plane[corner])`` and its derivatives are the same
        sums with the weight derivatives: bilinear interpolation and the kernels'
        gradient convention in one table. The derivatives are with respect to p (the
        padding mode's dp'/dp included).
        """
        fy, fx = self.frac_y, self.frac_x
        gy, gx = 1 - fy, 1 - fx
        one = np.ones((), dtype=fy.dtype)
        dy_sign = (-one, one) if self.slope_y is None else (-self.slope_y, self.slope_y)
        dx_sign = (-one, one) if self.slope_x is None else (-self.slope_x, self.slope_x)
        for row, wy, dwy in ((0, gy, dy_sign[0]), (1, fy, dy_sign[1])):
            for column, wx, dwx in ((0, gx, dx_sign[0]), (1, fx, dx_sign[1])):
                yield row * self.bordered_width + column, wy * wx, dwy * wx, wy * dwx


def _sample_points(offset: np.ndarray, geom: ConvGeometry, acc: np.dtype) -> _SamplePoints:
    """The sampling points of offset [n, 2*G*K, out_h, out_w] (see :class:`_SamplePoints`)."""
    n = offset.shape[0]
    # [n, G, K, 2, P]: (dy, dx) interleaved per tap
    offset = np.asarray(offset, dtype=acc).reshape(
        n, geom.offset_groups, geom.taps, 2, geom.out_h * geom.out_w
    )
    base_y, base_x = _tap_grid(geom, acc)
    py = (base_y + offset[:, :, :, 0]).reshape(-1)
    px = (base_x + offset[:, :, :, 1]).reshape(-1)
    mode = geom.padding_mode
    slope_y = slope_x = None
    if mode != "zeros":  # p -> p' in [0, size - 1] (or NaN), and dp'/dp
        py, slope_y = map_coordinates(np, py, geom.height, mode)
        px, slope_x = map_coordinates(np, px, geom.width, mode)
    # Beyond (-2, size + 1) no corner is inside; such points (and NaN points, for which
    # every comparison is false) go to the top-left of the border, which reads zeros.
    near = (py > -2) & (py < geom.height + 1) & (px > -2) & (px < geom.width + 1)
    floor_y = np.where(near, cell_floor(np, py, geom.height, mode), -_MARGIN)
    floor_x = np.where(near, cell_floor(np, px, geom.width, mode), -_MARGIN)
    frac_y = np.where(near, py - floor_y, 0).astype(acc, copy=False)
    frac_x = np.where(near, px - floor_x, 0).astype(acc, copy=False)
    is_nan = np.isnan(py) | np.isnan(px)
    frac_y[is_nan] = np.nan
    frac_x[is_nan] = np.nan

    bordered_width = geom.width + 2 * _MARGIN
    plane_size = (geom.height + 2 * _MARGIN) * bordered_width
    # plane (image b, offset group g) starts at (b*G + g) * plane_size; K*P points each
    plane_starts = np.repeat(
        np.arange(n * geom.offset_groups, dtype=np.intp) * plane_size,
        geom.taps * geom.out_h * geom.out_w,
    )
    top_left = plane_starts + (floor_y.astype(np.intp) + _MARGIN) * bordered_width + (
        floor_x.astype(np.intp) + _MARGIN
    )
    return _SamplePoints(top_left, frac_y, frac_x, bordered_width, slope_y, slope_x)


def _tap_grid(geom: ConvGeometry, acc: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Undeformed sample coordinates ``oy*stride_h - pad_h + i*dil_h`` (and x), [K, P]."""
    rows = np.arange(geom.out_h) * geom.stride_h - geom.pad_h
    cols = np.arange(geom.out_w) * geom.stride_w - geom.pad_w
    tap_rows = np.arange(geom.kernel_h) * geom.dil_h
    tap_cols = np.arange(geom.kernel_w) * geom.dil_w
    shape = (geom.kernel_h, geom.kernel_w, geom.out_h, geom.out_w)
    base_y = np.broadcast_to(tap_rows[:, None, None, None] + rows[None, None, :, None], shape)
    base_x = np.broadcast_to(tap_cols[None, :, None, None] + cols[None, None, None, :], shape)
    flat = (geom.taps, geom.out_h * geom.out_w)
    return base_y.reshape(flat).astype(acc), base_x.reshape(flat).astype(acc)


def _bordered_planes(input: np.ndarray, geom: ConvGeometry, acc: np.dtype) -> np.ndarray:
    """input [n, C, H, W] copied into zero-bordered channel-major planes
    [C/G, n * G * (H+4) * (W+4)]."""
    n = input.shape[0]
    channels_per_group = geom.in_channels // geom.offset_groups
    planes = np.zeros(
        (channels_per_group, n, geom.offset_groups,
         geom.height + 2 * _MARGIN, geom.width + 2 * _MARGIN),
        dtype=acc,
    )
    planes[..., _MARGIN:-_MARGIN, _MARGIN:-_MARGIN] = input.reshape(
        n, geom.offset_groups, channels_per_group, geom.height, geom.width
    ).transpose(2, 0, 1, 3, 4)
    return planes.reshape(channels_per_group, -1)


def _gather(planes: np.ndarray, points: _SamplePoints, shift: int) -> np.ndarray:
    """Every channel at the corner ``top_left + shift`` of every point, [C/G, M]."""
    # The columns are in range by construction (the border holds every corner), so the
    # unchecked mode "wrap" never wraps; it is the fastest mode of np.take.
    return np.take(planes, points.top_left + shift, axis=1, mode="wrap")


def _samples(planes: np.ndarray, points: _SamplePoints) -> np.ndarray:
    """The input sampled bilinearly at every point, [C/G, M]."""
    samples = np.zeros((planes.shape[0], points.top_left.shape[0]), dtype=planes.dtype)
    for shift, weight, _, _ in points.corners():
        corner = _gather(planes, points, shift)
        corner *= weight
        samples += corner
    return samples


def _coordinate_sums(
    planes: np.ndarray, points: _SamplePoints, grad_samples: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every point m, the sums over the channels c' of its offset group of
    ``grad_samples[c', m]`` times the sample, times d sample / d py and times
    d sample / d px: three arrays [M] (the mask gradient and, times the mask, the offset
    gradient).

    grad_samples [C/G, M] is d loss / d columns, without the mask factor. The channel sum
    of each corner is formed first and blended afterwards (the corner weights do not
    depend on the channel).
    """
    value_sum = d_dy_sum = d_dx_sum = 0
    for shift, weight, d_weight_dy, d_weight_dx in points.corners():
        corner_sum = np.einsum("cm,cm->m", _gather(planes, points, shift), grad_samples)
        value_sum = value_sum + weight * corner_sum
        d_dy_sum = d_dy_sum + d_weight_dy * corner_sum
        d_dx_sum = d_dx_sum + d_weight_dx * corner_sum
    return value_sum, d_dy_sum, d_dx_sum


def _scatter_to_input(
    grad_samples: np.ndarray, points: _SamplePoints, n: int, geom: ConvGeometry
) -> np.ndarray:
    """Gradient of the input, [n, C, H, W] (a view), from grad_samples [C/G, M] (mask
    already applied): each sample spreads its gradient over its corners bilinearly.

    Accumulates in the dtype of grad_samples; corners outside the map (and NaN points)
    land in the zero border, which is cropped.
    """
    channels_per_group = grad_samples.shape[0]
    bordered_h, bordered_w = geom.height + 2 * _MARGIN, geom.width + 2 * _MARGIN
    row_length = n * geom.offset_groups * bordered_h * bordered_w
    # flat position of every (channel, point) top-left corner in the planes
    top_left = (
        np.arange(channels_per_group, dtype=np.intp)[:, None] * row_length + points.top_left
    ).reshape(-1)
    bordered = np.zeros(channels_per_group * row_length, dtype=grad_samples.dtype)
    for shift, weight, _, _ in points.corners():
        np.add.at(bordered[shift:], top_left, (grad_samples * weight).reshape(-1))
    bordered = bordered.reshape(channels_per_group, n, geom.offset_groups, bordered_h, bordered_w)
    cropped = bordered[..., _MARGIN:-_MARGIN, _MARGIN:-_MARGIN]
    return cropped.transpose(1, 2, 0, 3, 4).reshape(n, geom.in_channels, geom.height, geom.width)


# ---------------------------------------------------------------------------- layouts


def _dtypes_of(input: np.ndarray, geom: ConvGeometry) -> tuple[np.dtype, np.dtype]:
    """(the input dtype, the dtype computations accumulate in)."""
    info = dtype_info(input.dtype)
    if info is None:
        raise type_error(
            OP, f"input has dtype {input.dtype}; expected float64, float32, float16 or bfloat16"
        )
    return input.dtype, numpy_dtype(info.acc_name)


def _weight_by_group(weight: np.ndarray, geom: ConvGeometry, acc: np.dtype) -> np.ndarray:
    """weight [C_out, C/groups, kh, kw] as [groups, C_out/groups, (C/groups)*K] in acc."""
    return np.asarray(weight, dtype=acc).reshape(
        geom.groups, geom.out_channels // geom.groups, -1
    )


def _flat_mask(mask: np.ndarray | None, images: slice, acc: np.dtype) -> np.ndarray | None:
    """mask[images] [n, G*K, out_h, out_w] flattened to the points' order, [M], or None."""
    if mask is None:
        return None
    return np.asarray(mask[images], dtype=acc).reshape(-1)


def _columns(samples: np.ndarray, flat_mask: np.ndarray | None, geom: ConvGeometry) -> np.ndarray:
    """The GEMM operand ``mask * samples`` as [n, groups, (C/groups)*K, P] (row c*K + k
    within a weight group; the memory of [n, C*K, P]) from samples [C/G, M], which is
    scaled by the mask in place."""
    if flat_mask is not None:
        samples *= flat_mask
    channels_per_group = samples.shape[0]
    pixels = geom.out_h * geom.out_w
    by_image = samples.reshape(channels_per_group, -1, geom.offset_groups, geom.taps * pixels)
    n = by_image.shape[1]
    return np.ascontiguousarray(by_image.transpose(1, 2, 0, 3)).reshape(
        n, geom.groups, -1, pixels
    )


def _channel_major(grad_columns: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Inverse layout of :func:`_columns`: [n, groups, (C/groups)*K, P] -> [C/G, M]."""
    n = grad_columns.shape[0]
    channels_per_group = geom.in_channels // geom.offset_groups
    by_group = grad_columns.reshape(
        n, geom.offset_groups, channels_per_group, geom.taps * geom.out_h * geom.out_w
    )
    return np.ascontiguousarray(by_group.transpose(2, 0, 1, 3)).reshape(channels_per_group, -1)


def _interleave_dy_dx(
    d_dy: np.ndarray, d_dx: np.ndarray, n: int, geom: ConvGeometry
) -> np.ndarray:
    """[M] pair -> offset layout [n, 2*G*K, out_h, out_w], (dy, dx) per tap."""
    shape = (n, geom.offset_groups, geom.taps, geom.out_h * geom.out_w)
    pairs = np.stack((d_dy.reshape(shape), d_dx.reshape(shape)), axis=3)
    return pairs.reshape(n, 2 * geom.offset_groups * geom.taps, geom.out_h, geom.out_w)


def _working_bytes_per_image(geom: ConvGeometry, acc: np.dtype, *, backward: bool) -> int:
    """Estimated peak bytes of the temporaries per image of a chunk (the returned arrays
    are not counted).

    Sampling (forward, and the weight gradient): the bordered planes; the samples, one
    gathered corner and the transposed columns ([C*K*P] each); the points' coordinates,
    indices, fractions, slopes, corner weights and channel sums ([G*K*P] each); the GEMM result
    or grad_output.
    Scattering the input gradient: the bordered planes and the gradient planes, the
    channel-major grad columns and one corner's values and flat indices ([C*K*P] each).
    """
    item = acc.itemsize
    bordered_plane = geom.in_channels * (geom.height + 2 * _MARGIN) * (geom.width + 2 * _MARGIN)
    columns = geom.column_rows * geom.out_h * geom.out_w
    points = geom.offset_groups * geom.taps * geom.out_h * geom.out_w
    output = geom.out_channels * geom.out_h * geom.out_w
    per_point = points * (4 * _INDEX_BYTES + 14 * item)
    sampling = item * (bordered_plane + 3 * columns + output) + per_point
    if not backward:
        return sampling
    scattering = item * (2 * bordered_plane + 2 * columns + output) + _INDEX_BYTES * columns
    return max(sampling + item * output, scattering + per_point)


def _images_per_chunk(
    geom: ConvGeometry, acc: np.dtype, workspace_bytes: int, *, backward: bool
) -> int:
    """Images per chunk so the working set stays within workspace_bytes (at least 1)."""
    per_image = _working_bytes_per_image(geom, acc, backward=backward)
    return max(1, min(geom.batch, int(workspace_bytes) // max(per_image, 1)))
