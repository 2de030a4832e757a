"""Public deform_psroi_pool forward and backward: validate, dispatch, convert back.

Deformable position-sensitive RoI pooling (R-FCN; MSRA's DeformablePSROIPooling), with
the semantics of SEMANTICS.md section 3. Every argument is checked before any kernel
runs; errors name the argument, the expected and the actual value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from . import _arrays
from ._dtypes import INT32_LIMIT
from ._errors import value_error
from ._roi_common import check_rois
from ._validation import (
    check_float_dtypes,
    check_positive,
    finite_scalar,
    shape_of,
    wanted_gradients,
)

OP = "deform_psroi_pool"
BACKWARD_OP = "deform_psroi_pool_backward"
GRADIENT_NAMES = ("input", "offset")


class PSRoiPoolGrads(NamedTuple):
    """Gradients of deform_psroi_pool; an entry is None when it was not requested (or,
    for grad_offset, when the call had no offset).

    grad_input [N, output_dim * group_size**2, H, W], grad_offset [K, 2 * num_classes,
    part_size, part_size]. There is no gradient for rois.
    """

    grad_input: object
    grad_offset: object


@dataclass(frozen=True)
class PSRoiPoolGeometry:
    """Sizes and scalars of one deform_psroi_pool call; every backend computes from this.

    input  [batch, channels, height, width], channels = output_dim * group_size**2
    rois   [num_rois, 5]
    offset [num_rois, 2 * num_classes, part_size, part_size] (if has_offset; else
           num_classes is 1)
    output, count [num_rois, output_dim, pooled_size, pooled_size]
    """

    batch: int
    channels: int
    height: int
    width: int
    num_rois: int
    output_dim: int
    group_size: int
    pooled_size: int
    part_size: int
    sample_per_part: int
    num_classes: int
    has_offset: bool
    spatial_scale: float
    trans_std: float

    @property
    def channels_per_class(self) -> int:
        """Output channels that share one class's offsets: output_dim / num_classes."""
        return self.output_dim // self.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.height, self.width)

    @property
    def offset_shape(self) -> tuple[int, int, int, int]:
        return (self.num_rois, 2 * self.num_classes, self.part_size, self.part_size)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.num_rois, self.output_dim, self.pooled_size, self.pooled_size)


# The kernels multiply two of pooled_size, part_size, group_size and sample_per_part
# (and add one more) in 32-bit ints: each is at most isqrt(2^31 - 1).
MAX_AXIS_SIZE = math.isqrt(INT32_LIMIT)


def _check_sizes(op: str, *, output_dim, group_size, pooled_size, part_size,
                 sample_per_part) -> tuple[int, int, int, int, int]:
    output_dim = check_positive(op, "output_dim", output_dim)
    sizes = {"group_size": group_size, "pooled_size": pooled_size,
             "part_size": pooled_size if part_size is None else part_size,
             "sample_per_part": sample_per_part}
    for name, value in sizes.items():
        check_positive(op, name, value)
        if value > MAX_AXIS_SIZE:
            raise value_error(op, f"{name} must be at most {MAX_AXIS_SIZE}; got {value}")
    return (output_dim, sizes["group_size"], sizes["pooled_size"], sizes["part_size"],
            sizes["sample_per_part"])


def psroi_pool_geometry(
    op: str,
    xp,
    input,
    rois,
    offset,
    *,
    output_dim,
    group_size,
    pooled_size,
    part_size,
    sample_per_part,
    spatial_scale,
    trans_std,
) -> PSRoiPoolGeometry:
    """Check every shape, size, scalar and the values of ``rois`` (which reads them: on a
    GPU one small reduction and copy); return the call's geometry."""
    output_dim, group_size, pooled_size, part_size, sample_per_part = _check_sizes(
        op, output_dim=output_dim, group_size=group_size, pooled_size=pooled_size,
        part_size=part_size, sample_per_part=sample_per_part,
    )
    spatial_scale = finite_scalar(op, "spatial_scale", spatial_scale, positive=True)
    trans_std = finite_scalar(op, "trans_std", trans_std)

    if len(shape_of(input)) != 4:
        raise value_error(op, f"input must be 4-D [N, C, H, W]; got shape {shape_of(input)}")
    batch, channels, height, width = shape_of(input)
    expected_channels = output_dim * group_size**2
    if channels != expected_channels:
        raise value_error(
            op, f"input has {channels} channels (shape {shape_of(input)}); expected "
            f"output_dim * group_size**2 = {output_dim} * {group_size}**2 = {expected_channels}"
        )
    if not 1 <= height <= INT32_LIMIT or not 1 <= width <= INT32_LIMIT:
        raise value_error(
            op, f"input must have a height and width in [1, {INT32_LIMIT}]; got shape "
            f"{shape_of(input)}"
        )

    num_rois = check_rois(op, xp, rois, batch)

    num_classes = 1
    if offset is not None:
        offset_shape = shape_of(offset)
        if len(offset_shape) != 4:
            raise value_error(
                op, f"offset must be 4-D [K, 2 * num_classes, part_size, part_size]; got "
                f"shape {offset_shape}"
            )
        offset_channels = offset_shape[1]
        if offset_channels < 2 or offset_channels % 2 != 0:
            raise value_error(
                op, f"offset.shape[1] = {offset_channels} must be 2 * num_classes, a positive "
                f"even number (offset shape {offset_shape})"
            )
        num_classes = offset_channels // 2
        if output_dim % num_classes != 0:
            raise value_error(
                op, f"output_dim = {output_dim} must be divisible by num_classes = "
                f"{num_classes} (offset.shape[1] {offset_channels} / 2)"
            )
        expected_offset = (num_rois, offset_channels, part_size, part_size)
        if offset_shape != expected_offset:
            raise value_error(
                op, f"offset has shape {offset_shape}; expected {expected_offset} "
                f"(K = {num_rois} RoIs, part_size = {part_size})"
            )

    return PSRoiPoolGeometry(
        batch=batch, channels=channels, height=height, width=width, num_rois=num_rois,
        output_dim=output_dim, group_size=group_size, pooled_size=pooled_size,
        part_size=part_size, sample_per_part=sample_per_part, num_classes=num_classes,
        has_offset=offset is not None, spatial_scale=spatial_scale, trans_std=trans_std,
    )


def _prepare(op: str, arrays: dict[str, object], options: dict[str, object]):
    """Placement, native arrays, dtype name and geometry of one call (no kernel runs)."""
    placement, native = _arrays.natives(op, arrays)
    dtype_name = check_float_dtypes(
        op, {name: a for name, a in native.items() if a is not None and name != "rois"}
    )
    with _arrays.compute_scope(placement):
        geom = psroi_pool_geometry(
            op, _arrays.array_module(placement), native["input"], native["rois"], native["offset"],
            **options,
        )
    return placement, native, dtype_name, geom



def deform_psroi_pool(
    input,
    rois,
    offset=None,
    *,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int | None = None,
    sample_per_part: int = 4,
    spatial_scale: float = 1.0,
    trans_std: float = 0.1,
):
    """Deformable position-sensitive RoI pooling (R-FCN; MSRA DeformablePSROIPooling).

    Any DLPack arrays; computed where they live and returned in the caller's array type.

    Shapes:
        input  [N, output_dim * group_size**2, H, W]
        rois   [K, 5] rows (batch_index, x1, y1, x2, y2) in image coordinates, any
               floating dtype; batch_index an integer in [0, N)
        offset [K, 2 * num_classes, part_size, part_size] or None (no_trans). Output
               channel d uses class d // (output_dim // num_classes): channel 2 * class
               moves the bins in x, 2 * class + 1 in y, in units of trans_std * RoI size.
        returns (output [K, output_dim, P, P], count [K, output_dim, P, P]) with
        P = pooled_size; count (int32) = the samples of each bin inside the map, whose
        mean the output is (0 where none).

    ``part_size`` defaults to ``pooled_size``; bin (i, j) moves with offset cell
    (floor(i * part_size / P), floor(j * part_size / P)). Each bin averages
    ``sample_per_part``**2 bilinear samples of its position-sensitive input channel.
    """
    placement, native, dtype_name, geom = _prepare(
        OP, {"input": input, "rois": rois, "offset": offset},
        dict(output_dim=output_dim, group_size=group_size, pooled_size=pooled_size,
             part_size=part_size, sample_per_part=sample_per_part,
             spatial_scale=spatial_scale, trans_std=trans_std),
    )
    with _arrays.compute_scope(placement):
        if placement.on_cuda:
            from ._psroi_pool_kernels import psroi_pool_forward

            output, count = psroi_pool_forward(
                _arrays.kernel_launcher(placement), native["input"], native["rois"],
                native["offset"], geom, dtype_name=dtype_name,
            )
        else:
            from ._numpy_psroi_pool import psroi_pool_forward

            output, count = psroi_pool_forward(
                native["input"], native["rois"], native["offset"], geom
            )
        return _arrays.to_caller(placement, output), _arrays.to_caller(placement, count)


def deform_psroi_pool_backward(
    grad_output,
    input,
    rois,
    offset=None,
    *,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int | None = None,
    sample_per_part: int = 4,
    spatial_scale: float = 1.0,
    trans_std: float = 0.1,
    wrt: Iterable[str] | None = None,
) -> PSRoiPoolGrads:
    """Gradients of :func:`deform_psroi_pool` given ``grad_output`` [K, output_dim, P, P].

    Takes the forward's arguments (not its ``count``: the sample counts are recomputed,
    which costs only coordinate arithmetic). Returns ``PSRoiPoolGrads(grad_input,
    grad_offset)`` with the shapes of input and offset. ``wrt`` names the gradients to
    compute, a subset of ("input", "offset"); the others are None and cost nothing.
    Default: both (grad_offset only when ``offset`` is given).

    At the kinks it follows MSRA's backward: the count of a bin is a constant, and the
    derivative of a sample along x (y) is 0 where its clamped coordinate is an integer
    (MSRA's floor and ceil corners coincide), which includes every clamped sample.
    """
    placement, native, dtype_name, geom = _prepare(
        BACKWARD_OP,
        {"input": input, "rois": rois, "offset": offset, "grad_output": grad_output},
        dict(output_dim=output_dim, group_size=group_size, pooled_size=pooled_size,
             part_size=part_size, sample_per_part=sample_per_part,
             spatial_scale=spatial_scale, trans_std=trans_std),
    )
    grad_shape = shape_of(native["grad_output"])
    if grad_shape != geom.output_shape:
        raise value_error(
            BACKWARD_OP,
            f"grad_output has shape {grad_shape}; expected the output shape {geom.output_shape}",
        )
    wanted = wanted_gradients(BACKWARD_OP, wrt, {"input": True, "offset": geom.has_offset})
    with _arrays.compute_scope(placement):
        if placement.on_cuda:
            from ._psroi_pool_kernels import psroi_pool_backward

            grads = psroi_pool_backward(
                _arrays.kernel_launcher(placement), native["grad_output"], native["input"],
                native["rois"], native["offset"], geom, dtype_name=dtype_name, wrt=wanted,
            )
        else:
            from ._numpy_psroi_pool import psroi_pool_backward

            grads = psroi_pool_backward(
                native["grad_output"], native["input"], native["rois"], native["offset"],
                geom, wrt=wanted,
            )
        return PSRoiPoolGrads(*(_arrays.to_caller(placement, g) for g in grads))
