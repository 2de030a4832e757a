"""Vectorised NumPy backend of deform_conv2d (DCNv1 / modulated DCNv2) for CPU arrays.

Computes the function of ``cupydcn/cuda/kernels/deform_conv.cu`` (docs/semantics.md §1), with the
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

The workspace bound (:func:`_plan`). The work is split into blocks whose temporaries stay
within ``workspace_bytes``: chunks of whole images while one image fits (the common case:
one block per chunk, the layouts above), otherwise blocks of ``pixels`` consecutive output
pixels (row-major) of one image, every tap and offset group. When the bordered planes of one
image exceed half the budget they are never built whole: the bordered map is cut into tiles
of cells (bands of full rows when two rows fit, else squares), each block's points are
grouped by the tile of their cell, and each tile touched is built (and, for the input
gradient, scattered into and added to the gradient) on its own; a block reads only the tiles
its points fall in, so the memory never scales with the input when few points are read.
An image is split only when its working set exceeds ``max(workspace_bytes,
MIN_BLOCK_BYTES)`` (4 MiB), and then into blocks of that size. Peak temporary memory,
besides the arguments and the returned arrays, is then at most ``workspace_bytes +
WORKSPACE_SLACK_BYTES`` (5 MiB) provided a block can hold one output pixel's working set
(about ``70 * C * kh * kw`` bytes in float32) and one tile of 2 x 2 corners (``8 * C * 4``
bytes): below that a block is one pixel and a tile 1 x 1 cell. Not counted either, as they are the
size of the results: the weight and its gradient in the accumulation dtype, and for half
dtypes one image's float32 input-gradient accumulator when an image is split. Split blocks
sum the weight and bias gradients (and tiles the input gradient) in a different order, so
those differ from the unsplit results by rounding only; everything else is bitwise equal.

BLAS threads: a call's blocks run under :func:`cupydcn.core.threads.blas_threads_for` with
the size of one of its products (:func:`_gemm_flops`), which gives small products one BLAS
thread (see that module for the policy, its measurements and its setting).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from cupydcn.core.dtypes import dtype_info, numpy_dtype
from cupydcn.core.errors import type_error, value_error
from cupydcn.core.threads import blas_threads_for
from cupydcn.deform_conv.padding import cell_floor, map_coordinates
from cupydcn.deform_conv.spec import OP, ConvGeometry, ConvGrads

GRADIENT_NAMES = frozenset({"input", "offset", "weight", "mask", "bias"})

# Zero border around each input plane: the corners of points in (-2, size + 1) lie in
# [-2, size + 1], at most 2 pixels outside the map.
_MARGIN = 2

_INDEX_BYTES = np.dtype(np.intp).itemsize

# An image is cut into blocks only when its working set exceeds max(workspace_bytes,
# MIN_BLOCK_BYTES), and then into blocks of that size: small images always run whole (and
# bitwise as with any budget), and a tiny budget never means one-pixel blocks.
MIN_BLOCK_BYTES = 4 << 20
# The documented constant of the bound: peak temporaries <= workspace_bytes +
# WORKSPACE_SLACK_BYTES (MIN_BLOCK_BYTES, and 1 MiB for what a block does not count:
# NumPy's own buffers, the estimates' rounding).
WORKSPACE_SLACK_BYTES = MIN_BLOCK_BYTES + (1 << 20)


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
    algorithm: str | None = None,
) -> np.ndarray:
    """Deformable convolution forward on NumPy arrays.

    Shapes are those of ``geom`` (see :class:`ConvGeometry`):
    input [N, C, H, W], offset [N, 2*G*K, out_h, out_w], weight [C_out, C/groups, kh, kw],
    bias [C_out] or None, mask [N, G*K, out_h, out_w] or None.
    Returns the output [N, C_out, out_h, out_w] in the input dtype (a new array).

    The work is split into blocks whose temporaries stay within ``workspace_bytes`` (see
    the module docstring: chunks of images, or pixels of one image). Inputs are never
    written to. ``algorithm`` (the CUDA path's choice) is accepted and ignored: the NumPy
    backend has one.
    """
    dtype, acc = _dtypes_of(input, geom)
    weight_by_group = _weight_by_group(weight, geom, acc)
    output = np.empty(geom.output_shape, dtype=dtype)
    plan = _plan(geom, acc, workspace_bytes, backward=False)
    with np.errstate(invalid="ignore", over="ignore"), blas_threads_for(_gemm_flops(geom, plan)):
        for images, pixels in plan.blocks(geom):
            n = images.stop - images.start
            count = pixels.stop - pixels.start
            points = _sample_points(offset[images], pixels, geom, acc)
            tiles = plan.tiles_of(points, geom)
            samples = _samples(input[images], points, tiles, geom, acc)
            del points
            columns = _columns(samples, _flat_mask(mask, images, pixels, geom, acc), geom, n, dtype)
            del samples
            result = np.matmul(weight_by_group, columns)  # [n, groups, C_out/groups, P]
            del columns
            result = result.reshape(n, geom.out_channels, count)
            if bias is not None:
                result += np.asarray(bias, dtype=acc)[:, None]
            _pixels_of(output, images, pixels, geom)[...] = result
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
    algorithm: str | None = None,
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

    plan = _plan(geom, acc, workspace_bytes, backward=True)
    # When an image is split, its input gradient is summed over blocks (and tiles) in
    # ``input_sum``: grad_input itself, or one image in float32 for the half dtypes.
    input_sum = None
    with np.errstate(invalid="ignore", over="ignore"), blas_threads_for(_gemm_flops(geom, plan)):
        for images, pixels in plan.blocks(geom):
            n = images.stop - images.start
            count = pixels.stop - pixels.start
            # [n, groups, C_out/groups, P]
            grad_result = np.asarray(
                _pixels_of(grad_output, images, pixels, geom), dtype=acc
            ).reshape(n, geom.groups, geom.out_channels // geom.groups, count)
            if grad_bias_sum is not None:
                grad_bias_sum += grad_result.sum(axis=(0, 3)).reshape(geom.out_channels)
            if not needs_points:
                continue
            points = _sample_points(offset[images], pixels, geom, acc)
            tiles = plan.tiles_of(points, geom)
            # the whole-map planes are built once per block, tiles once per use
            cache = {} if plan.whole_map and needs_planes else None
            flat_mask = _flat_mask(mask, images, pixels, geom, acc)
            if grad_weight_sum is not None:
                columns = _columns(
                    _samples(input[images], points, tiles, geom, acc, cache),
                    flat_mask,
                    geom,
                    n,
                    dtype,
                )
                for image in range(n):  # one weight-sized product at a time
                    grad_weight_sum += np.matmul(
                        grad_result[image], columns[image].swapaxes(-1, -2)
                    )
                del columns
            if not needs_grad_columns:
                continue
            grad_columns = np.matmul(weight_by_group.swapaxes(-1, -2), grad_result)
            grad_samples = _channel_major(grad_columns, geom)  # d loss / d columns, [C/G, M]
            del grad_columns
            if grad_offset is not None or grad_mask is not None:
                value_sum, d_dy_sum, d_dx_sum = _coordinate_sums(
                    input[images], points, tiles, grad_samples, geom, acc, cache
                )
                if grad_mask is not None:
                    _pixels_of(grad_mask, images, pixels, geom)[...] = value_sum.reshape(
                        n, geom.offset_groups * geom.taps, count
                    )
                if grad_offset is not None:
                    if flat_mask is not None:
                        d_dy_sum *= flat_mask
                        d_dx_sum *= flat_mask
                    _pixels_of(grad_offset, images, pixels, geom)[...] = _interleave_dy_dx(
                        d_dy_sum, d_dx_sum, n, count, geom
                    )
                del value_sum, d_dy_sum, d_dx_sum
            if grad_input is not None:
                if flat_mask is not None:
                    grad_samples *= flat_mask
                if plan.whole_images:
                    grad_input[images] = _scatter_to_input(grad_samples, points, tiles, n, geom)
                else:
                    if pixels.start == 0:
                        input_sum = (
                            grad_input[images]
                            if acc == dtype
                            else np.empty((1,) + geom.input_shape[1:], dtype=acc)
                        )
                        input_sum[...] = 0
                    _scatter_to_input(grad_samples, points, tiles, n, geom, into=input_sum)
                    if pixels.stop == geom.out_h * geom.out_w and acc != dtype:
                        grad_input[images] = input_sum  # rounded once
            del grad_samples, points, cache

    grad_weight = (
        None
        if grad_weight_sum is None
        else grad_weight_sum.reshape(geom.weight_shape).astype(dtype)
    )
    grad_bias = None if grad_bias_sum is None else grad_bias_sum.astype(dtype)
    return ConvGrads(grad_input, grad_offset, grad_weight, grad_mask, grad_bias)


def _gemm_flops(geom: ConvGeometry, plan: _Plan) -> int:
    """Floating-point operations of one BLAS product of a block: every product (forward,
    input and weight gradients, per image and weight group) is
    ``2 * (C_out/groups) * (C/groups * K) * pixels``. The BLAS threading policy
    (cupydcn/core/threads.py) is applied once around a call's blocks from this size."""
    return 2 * (geom.out_channels // geom.groups) * (geom.column_rows // geom.groups) * plan.pixels


def _pixels_of(array: np.ndarray, images: slice, pixels: slice, geom: ConvGeometry) -> np.ndarray:
    """The block's part of a per-pixel array [N, channels, out_h, out_w], as a view
    [n, channels, pixels] (array is C-contiguous, or only read)."""
    part = array[images]
    return part.reshape(part.shape[0], part.shape[1], geom.out_h * geom.out_w)[..., pixels]


# ---------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class _Tile:
    """Corner rows [row0, row0 + rows) and columns [col0, col0 + cols) of the bordered map
    (bordered coordinates: input row r is bordered row r + _MARGIN)."""

    row0: int
    rows: int
    col0: int
    cols: int


@dataclass(frozen=True)
class _Plan:
    """How a call is split (see the module docstring).

    ``whole_images``: blocks of ``images`` whole images, read from the whole bordered map.
    Else blocks of ``pixels`` output pixels of one image, read from tiles of at most
    ``tile_corners`` corners per plane: a block's bounding box, or the grid of
    ``tile_rows`` x ``tile_cols`` cells.
    """

    images: int
    pixels: int
    tile_rows: int
    tile_cols: int
    tile_corners: int
    whole_images: bool

    @property
    def whole_map(self) -> bool:
        return self.whole_images

    def blocks(self, geom: ConvGeometry) -> Iterator[tuple[slice, slice]]:
        """(images, pixels) of every block, in order."""
        total = geom.out_h * geom.out_w
        if self.whole_images:
            for start in range(0, geom.batch, self.images):
                yield slice(start, min(start + self.images, geom.batch)), slice(0, total)
            return
        for image in range(geom.batch):
            for start in range(0, total, self.pixels):
                yield slice(image, image + 1), slice(start, min(start + self.pixels, total))

    def tiles_of(self, points: _SamplePoints, geom: ConvGeometry) -> list:
        """[(tile, indices of its points, or None: every point)] of a block's points.

        Whole images: the whole bordered map. Split images: the bounding box of the points'
        cells when it fits in a tile's budget (``tile_corners``), with the points of cell
        (0, 0) (those that read only the zero border: far and NaN points) on a tile of
        their own; else the fixed grid of ``tile_rows`` x ``tile_cols`` cells.
        """
        bordered_h, bordered_w = geom.height + 2 * _MARGIN, geom.width + 2 * _MARGIN
        if self.whole_images:
            return [(_Tile(0, bordered_h, 0, bordered_w), None)]
        at_origin = (points.cell_y == 0) & (points.cell_x == 0)
        inside = np.flatnonzero(~at_origin)
        tiles = []
        if inside.shape[0]:
            cell_y, cell_x = points.cell_y[inside], points.cell_x[inside]
            row0, col0 = int(cell_y.min()), int(cell_x.min())
            rows, cols = int(cell_y.max()) - row0 + 2, int(cell_x.max()) - col0 + 2
            if rows * cols <= self.tile_corners:
                every = inside.shape[0] == points.cell_y.shape[0]
                tiles.append((_Tile(row0, rows, col0, cols), None if every else inside))
            else:
                return self._grid_tiles(points, geom)
        if inside.shape[0] < points.cell_y.shape[0]:
            tiles.append((_Tile(0, 2, 0, 2), np.flatnonzero(at_origin)))
        return tiles

    def _grid_tiles(self, points: _SamplePoints, geom: ConvGeometry) -> list:
        bordered_h, bordered_w = geom.height + 2 * _MARGIN, geom.width + 2 * _MARGIN
        columns_of_tiles = -(-(bordered_w - 1) // self.tile_cols)
        tile_ids = (points.cell_y // self.tile_rows) * columns_of_tiles + (
            points.cell_x // self.tile_cols
        )
        order = np.argsort(tile_ids, kind="stable")
        sorted_ids = tile_ids[order]
        starts = np.flatnonzero(np.diff(sorted_ids)) + 1
        bounds = np.concatenate(([0], starts, [sorted_ids.shape[0]]))
        tiles = []
        for begin, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            tile_row, tile_col = divmod(int(sorted_ids[begin]), columns_of_tiles)
            row0, col0 = tile_row * self.tile_rows, tile_col * self.tile_cols
            tile = _Tile(
                row0,
                min(self.tile_rows + 1, bordered_h - row0),
                col0,
                min(self.tile_cols + 1, bordered_w - col0),
            )
            tiles.append((tile, order[begin:end]))
        return tiles


def _block_costs(geom: ConvGeometry, acc: np.dtype, *, backward: bool) -> tuple[int, int]:
    """(bytes per output pixel of a block, bytes per corner of the bordered map), upper
    estimates of the temporaries (the returned arrays are not counted).

    Per pixel, sampling: the samples, one gathered corner (and one blended), the transposed
    columns ([C*K] each); the points' coordinates, indices, fractions, slopes, corner
    weights and tile grouping ([G*K] each); the GEMM result or grad_output. Scattering the
    input gradient: the grad columns and their channel-major copy, one corner's values and
    flat indices ([C*K] each). Per corner: the bordered planes, and for the backward the
    gradient planes as well.
    """
    item = acc.itemsize
    columns = geom.column_rows
    points = geom.offset_groups * geom.taps
    output = geom.out_channels
    per_point = points * (4 * _INDEX_BYTES + 14 * item)
    sampling = item * (3 * columns + output) + per_point
    per_corner = item * geom.in_channels * (2 if backward else 1)
    if not backward:
        return sampling, per_corner
    scattering = item * (2 * columns + output) + _INDEX_BYTES * columns + per_point
    return max(sampling + item * output, scattering), per_corner


def _working_bytes_per_image(geom: ConvGeometry, acc: np.dtype, *, backward: bool) -> int:
    """Estimated peak bytes of the temporaries of one whole image (:func:`_block_costs`)."""
    per_pixel, per_corner = _block_costs(geom, acc, backward=backward)
    bordered = (geom.height + 2 * _MARGIN) * (geom.width + 2 * _MARGIN)
    return per_pixel * geom.out_h * geom.out_w + per_corner * bordered


def _images_per_chunk(
    geom: ConvGeometry, acc: np.dtype, workspace_bytes: int, *, backward: bool
) -> int:
    """Whole images per chunk so the working set stays within workspace_bytes (at least 1;
    an image that does not fit in ``max(workspace_bytes, MIN_BLOCK_BYTES)`` is split,
    :func:`_plan`)."""
    per_image = _working_bytes_per_image(geom, acc, backward=backward)
    return max(1, min(geom.batch, int(workspace_bytes) // max(per_image, 1)))


def _plan(geom: ConvGeometry, acc: np.dtype, workspace_bytes: int, *, backward: bool) -> _Plan:
    """The blocks of a call whose temporaries stay within ``workspace_bytes``, or within
    MIN_BLOCK_BYTES when that is larger (an image is never cut into blocks smaller than
    that)."""
    total = geom.out_h * geom.out_w
    bordered_h, bordered_w = geom.height + 2 * _MARGIN, geom.width + 2 * _MARGIN
    budget = max(int(workspace_bytes), MIN_BLOCK_BYTES)
    if _working_bytes_per_image(geom, acc, backward=backward) <= budget:
        images = _images_per_chunk(geom, acc, workspace_bytes, backward=backward)
        return _Plan(images, total, bordered_h - 1, bordered_w - 1, bordered_h * bordered_w, True)
    per_pixel, per_corner = _block_costs(geom, acc, backward=backward)
    corners = max(4, (budget // 2) // per_corner)  # half the budget for the tiles
    if 2 * bordered_w <= corners:  # grid of bands of full rows
        rows, cols = min(bordered_h, corners // bordered_w) - 1, bordered_w - 1
    else:  # grid of squares
        side = max(2, int(np.sqrt(corners)))
        rows, cols = side - 1, min(side - 1, bordered_w - 1)
    pixels = max(1, min(total, (budget - per_corner * corners) // per_pixel))
    return _Plan(1, pixels, rows, cols, corners, False)


# ---------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class _SamplePoints:
    """The M sampling points of a block, located in the bordered map.

    Arrays have shape [M], M = n * G * K * pixels in (image, offset group, tap, pixel)
    order. ``plane`` is the point's (image, offset group) plane, ``b * G + g``;
    ``cell_y`` / ``cell_x`` the bordered coordinates of its cell's top-left corner
    (floor(p') + _MARGIN, p' the point after the padding mode's mapping; points that read
    nothing are at cell (0, 0), whose corners are all in the zero border);
    ``frac_y`` / ``frac_x`` are p' minus that corner, NaN where a coordinate of p' is NaN.
    ``slope_y`` / ``slope_x`` are dp'/dp (None for padding_mode "zeros", where it is 1).
    """

    plane: np.ndarray
    cell_y: np.ndarray
    cell_x: np.ndarray
    frac_y: np.ndarray
    frac_x: np.ndarray
    slope_y: np.ndarray | None = None
    slope_x: np.ndarray | None = None

    def subset(self, indices: np.ndarray | None) -> _SamplePoints:
        if indices is None:
            return self
        return _SamplePoints(
            *(
                None if a is None else a[indices]
                for a in (
                    self.plane,
                    self.cell_y,
                    self.cell_x,
                    self.frac_y,
                    self.frac_x,
                    self.slope_y,
                    self.slope_x,
                )
            )
        )

    def top_left(self, tile: _Tile) -> np.ndarray:
        """Column of each cell's top-left corner in a row of the tile's planes
        ``[C/G, n * G * tile.rows * tile.cols]``."""
        top_left = self.plane * (tile.rows * tile.cols)
        top_left += (self.cell_y - tile.row0) * tile.cols
        top_left += self.cell_x - tile.col0
        return top_left

    def corners(self, tile: _Tile) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """The four corners as ``(shift, weight, d weight / d py, d weight / d px)``; the
        corner's column in the tile's planes is ``top_left + shift``.

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
                yield row * tile.cols + column, wy * wx, dwy * wx, wy * dwx


def _sample_points(
    offset: np.ndarray, pixels: slice, geom: ConvGeometry, acc: np.dtype
) -> _SamplePoints:
    """The sampling points of the output ``pixels`` of offset [n, 2*G*K, out_h, out_w]
    (see :class:`_SamplePoints`)."""
    n = offset.shape[0]
    count = pixels.stop - pixels.start
    # [n, G, K, 2, pixels]: (dy, dx) interleaved per tap
    offset = np.asarray(offset, dtype=acc).reshape(
        n, geom.offset_groups, geom.taps, 2, geom.out_h * geom.out_w
    )[..., pixels]
    base_y, base_x = _tap_grid(geom, acc, pixels)
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
    del py, px, near, is_nan
    cell_y = floor_y.astype(np.intp)
    cell_y += _MARGIN
    cell_x = floor_x.astype(np.intp)
    cell_x += _MARGIN
    del floor_y, floor_x
    # plane (image b, offset group g) = b*G + g; K*pixels points each
    plane = np.repeat(np.arange(n * geom.offset_groups, dtype=np.intp), geom.taps * count)
    return _SamplePoints(plane, cell_y, cell_x, frac_y, frac_x, slope_y, slope_x)


def _tap_grid(geom: ConvGeometry, acc: np.dtype, pixels: slice) -> tuple[np.ndarray, np.ndarray]:
    """Undeformed sample coordinates ``oy*stride_h - pad_h + i*dil_h`` (and x) of the
    output ``pixels`` (flat, row-major), [K, pixels]."""
    flat = np.arange(pixels.start, pixels.stop)
    rows = (flat // geom.out_w) * geom.stride_h - geom.pad_h
    cols = (flat % geom.out_w) * geom.stride_w - geom.pad_w
    tap_rows = np.repeat(np.arange(geom.kernel_h) * geom.dil_h, geom.kernel_w)
    tap_cols = np.tile(np.arange(geom.kernel_w) * geom.dil_w, geom.kernel_h)
    base_y = (tap_rows[:, None] + rows[None, :]).astype(acc)
    base_x = (tap_cols[:, None] + cols[None, :]).astype(acc)
    return base_y, base_x


def _tile_planes(input: np.ndarray, tile: _Tile, geom: ConvGeometry, acc: np.dtype) -> np.ndarray:
    """The tile of input [n, C, H, W] with its zero border, channel-major:
    [C/G, n * G * tile.rows * tile.cols] (every plane whole for the whole-map tile)."""
    n = input.shape[0]
    channels_per_group = geom.in_channels // geom.offset_groups
    planes = np.zeros((channels_per_group, n, geom.offset_groups, tile.rows, tile.cols), dtype=acc)
    top, bottom = max(tile.row0, _MARGIN), min(tile.row0 + tile.rows, geom.height + _MARGIN)
    left, right = max(tile.col0, _MARGIN), min(tile.col0 + tile.cols, geom.width + _MARGIN)
    if top < bottom and left < right:
        planes[..., top - tile.row0 : bottom - tile.row0, left - tile.col0 : right - tile.col0] = (
            input.reshape(n, geom.offset_groups, channels_per_group, geom.height, geom.width)[
                ..., top - _MARGIN : bottom - _MARGIN, left - _MARGIN : right - _MARGIN
            ].transpose(2, 0, 1, 3, 4)
        )
    return planes.reshape(channels_per_group, -1)


def _gather(planes: np.ndarray, top_left: np.ndarray, shift: int) -> np.ndarray:
    """Every channel at the corner ``top_left + shift`` of every point, [C/G, m]."""
    # The columns are in range by construction (the border holds every corner), so the
    # unchecked mode "wrap" never wraps; it is the fastest mode of np.take.
    return np.take(planes, top_left + shift, axis=1, mode="wrap")


def _planes_of(
    input: np.ndarray, tile: _Tile, geom: ConvGeometry, acc: np.dtype, cache: dict | None
) -> np.ndarray:
    """:func:`_tile_planes`, kept in ``cache`` (when given) for the block's next use."""
    if cache is None:
        return _tile_planes(input, tile, geom, acc)
    if tile not in cache:
        cache[tile] = _tile_planes(input, tile, geom, acc)
    return cache[tile]


def _samples(
    input: np.ndarray,
    points: _SamplePoints,
    tiles: list,
    geom: ConvGeometry,
    acc: np.dtype,
    cache: dict | None = None,
) -> np.ndarray:
    """The input [n, C, H, W] sampled bilinearly at every point, [C/G, M]."""
    channels_per_group = geom.in_channels // geom.offset_groups
    samples = np.zeros((channels_per_group, points.cell_y.shape[0]), dtype=acc)
    for tile, indices in tiles:
        planes = _planes_of(input, tile, geom, acc, cache)
        part_points = points.subset(indices)
        top_left = part_points.top_left(tile)
        part = (
            samples
            if indices is None
            else np.zeros((channels_per_group, top_left.shape[0]), dtype=acc)
        )
        for shift, weight, _, _ in part_points.corners(tile):
            corner = _gather(planes, top_left, shift)
            corner *= weight
            part += corner
            del corner
        del planes
        if indices is not None:
            samples[:, indices] = part
    return samples


def _coordinate_sums(
    input: np.ndarray,
    points: _SamplePoints,
    tiles: list,
    grad_samples: np.ndarray,
    geom: ConvGeometry,
    acc: np.dtype,
    cache: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every point m, the sums over the channels c' of its offset group of
    ``grad_samples[c', m]`` times the sample, times d sample / d py and times
    d sample / d px: three arrays [M] (the mask gradient and, times the mask, the offset
    gradient).

    grad_samples [C/G, M] is d loss / d columns, without the mask factor. The channel sum
    of each corner is formed first and blended afterwards (the corner weights do not
    depend on the channel).
    """
    total = points.cell_y.shape[0]
    every = len(tiles) == 1 and tiles[0][1] is None
    sums = None if every else [np.zeros(total, dtype=acc) for _ in range(3)]
    for tile, indices in tiles:
        planes = _planes_of(input, tile, geom, acc, cache)
        part_points = points.subset(indices)
        top_left = part_points.top_left(tile)
        part_grad = grad_samples if indices is None else grad_samples[:, indices]
        value_sum = d_dy_sum = d_dx_sum = 0
        for shift, weight, d_weight_dy, d_weight_dx in part_points.corners(tile):
            corner_sum = np.einsum("cm,cm->m", _gather(planes, top_left, shift), part_grad)
            value_sum = value_sum + weight * corner_sum
            d_dy_sum = d_dy_sum + d_weight_dy * corner_sum
            d_dx_sum = d_dx_sum + d_weight_dx * corner_sum
        del planes, part_grad
        if sums is None:
            return value_sum, d_dy_sum, d_dx_sum
        for whole, part in zip(sums, (value_sum, d_dy_sum, d_dx_sum)):
            whole[indices] = part
    return tuple(sums)


def _scatter_to_input(
    grad_samples: np.ndarray,
    points: _SamplePoints,
    tiles: list,
    n: int,
    geom: ConvGeometry,
    *,
    into: np.ndarray | None = None,
) -> np.ndarray | None:
    """Gradient of the input [n, C, H, W] from grad_samples [C/G, M] (mask already
    applied): each sample spreads its gradient over its corners bilinearly.

    Without ``into``: returns it (a view; the whole-map tile). With ``into`` [n, C, H, W]:
    adds it there, tile by tile. Accumulates in the dtype of grad_samples; corners outside
    the map (and NaN points) land in the zero border, which is cropped.
    """
    channels_per_group = grad_samples.shape[0]
    for tile, indices in tiles:
        part_points = points.subset(indices)
        part_grad = grad_samples if indices is None else grad_samples[:, indices]
        row_length = n * geom.offset_groups * tile.rows * tile.cols
        # flat position of every (channel, point) top-left corner in the tile's planes
        top_left = part_points.top_left(tile)
        flat = np.arange(channels_per_group, dtype=np.intp)[:, None] * row_length
        flat = (flat + top_left).reshape(-1)
        del top_left
        bordered = np.zeros(channels_per_group * row_length, dtype=grad_samples.dtype)
        for shift, weight, _, _ in part_points.corners(tile):
            np.add.at(bordered[shift:], flat, (part_grad * weight).reshape(-1))
        del flat, part_grad
        bordered = bordered.reshape(channels_per_group, n, geom.offset_groups, tile.rows, tile.cols)
        top, bottom = max(tile.row0, _MARGIN), min(tile.row0 + tile.rows, geom.height + _MARGIN)
        left, right = max(tile.col0, _MARGIN), min(tile.col0 + tile.cols, geom.width + _MARGIN)
        cropped = bordered[
            ..., top - tile.row0 : bottom - tile.row0, left - tile.col0 : right - tile.col0
        ].transpose(1, 2, 0, 3, 4)
        if into is None:
            return cropped.reshape(n, geom.in_channels, geom.height, geom.width)
        if top < bottom and left < right:
            target = into.reshape(
                n, geom.offset_groups, channels_per_group, geom.height, geom.width
            )
            target[..., top - _MARGIN : bottom - _MARGIN, left - _MARGIN : right - _MARGIN] += (
                cropped
            )
        del bordered, cropped
    return None


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
    return np.asarray(weight, dtype=acc).reshape(geom.groups, geom.out_channels // geom.groups, -1)


def _flat_mask(
    mask: np.ndarray | None, images: slice, pixels: slice, geom: ConvGeometry, acc: np.dtype
) -> np.ndarray | None:
    """The block's mask [n, G*K, pixels] flattened to the points' order, [M], or None."""
    if mask is None:
        return None
    return np.asarray(_pixels_of(mask, images, pixels, geom), dtype=acc).reshape(-1)


def _columns(
    samples: np.ndarray,
    flat_mask: np.ndarray | None,
    geom: ConvGeometry,
    n: int,
    element_dtype: np.dtype,
) -> np.ndarray:
    """The GEMM operand ``mask * samples`` as [n, groups, (C/groups)*K, pixels] (row
    c*K + k within a weight group; the memory of [n, C*K, pixels]) from samples [C/G, M],
    which is scaled by the mask in place. For half types each column value is rounded
    once to ``element_dtype`` (docs/semantics.md §6.1: the columns are GEMM operands in
    the element dtype) and carried on in the accumulation dtype."""
    if flat_mask is not None:
        samples *= flat_mask
    if element_dtype != samples.dtype:
        samples[...] = samples.astype(element_dtype)
    channels_per_group = samples.shape[0]
    pixels = samples.shape[1] // (n * geom.offset_groups * geom.taps)
    by_image = samples.reshape(channels_per_group, n, geom.offset_groups, geom.taps * pixels)
    return np.ascontiguousarray(by_image.transpose(1, 2, 0, 3)).reshape(n, geom.groups, -1, pixels)


def _channel_major(grad_columns: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Inverse layout of :func:`_columns`: [n, groups, (C/groups)*K, pixels] -> [C/G, M]."""
    n, pixels = grad_columns.shape[0], grad_columns.shape[-1]
    channels_per_group = geom.in_channels // geom.offset_groups
    by_group = grad_columns.reshape(n, geom.offset_groups, channels_per_group, geom.taps * pixels)
    return np.ascontiguousarray(by_group.transpose(2, 0, 1, 3)).reshape(channels_per_group, -1)


def _interleave_dy_dx(
    d_dy: np.ndarray, d_dx: np.ndarray, n: int, pixels: int, geom: ConvGeometry
) -> np.ndarray:
    """[M] pair -> offset layout [n, 2*G*K, pixels], (dy, dx) per tap."""
    shape = (n, geom.offset_groups, geom.taps, pixels)
    pairs = np.stack((d_dy.reshape(shape), d_dx.reshape(shape)), axis=3)
    return pairs.reshape(n, 2 * geom.offset_groups * geom.taps, pixels)
