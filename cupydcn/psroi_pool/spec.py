"""What deform_psroi_pool computes from: geometry, options, gradient names and checks.

Deformable position-sensitive RoI pooling (R-FCN; MSRA's DeformablePSROIPooling), with
the semantics of docs/semantics.md §3.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from cupydcn.core.checks import (
    check_float_dtypes,
    check_positive,
    finite_scalar,
    shape_of,
    wanted_gradients,
)
from cupydcn.core.dispatch import Prepared
from cupydcn.core.dtypes import INT32_LIMIT
from cupydcn.core.errors import value_error
from cupydcn.core.options import Options
from cupydcn.core.rois import MAX_SAMPLES_PER_BIN, check_roi_values, check_rois_shape

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
class PSRoiPoolOptions(Options):
    """The options of deform_psroi_pool and its backward (cupydcn/core/options.py: every
    API derives from this declaration). Kept as given; ``prepare`` checks them.

    output_dim: int >= 1 — output channels (input channels = output_dim * group_size**2).
    group_size: int >= 1 — the position-sensitive grid of channel groups per axis.
    pooled_size: int >= 1 — the bins per RoI along each axis, P.
    part_size: int >= 1 or None (pooled_size) — the offset cells per axis.
    sample_per_part: int in [1, MAX_SAMPLE_PER_PART] — samples per bin along each axis.
    spatial_scale: finite float > 0 — maps RoI coordinates onto the input map.
    trans_std: finite float — the scale of the offsets, in units of the RoI size.
    """

    output_dim: int
    group_size: int
    pooled_size: int
    part_size: int | None = None
    sample_per_part: int = 4
    spatial_scale: float = 1.0
    trans_std: float = 0.1


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
    dtype_name: str = "float32"  # the element dtype of input, offset and grad_output

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
# sample_per_part**2 samples per bin at most MAX_SAMPLES_PER_BIN (the work of one thread).
MAX_SAMPLE_PER_PART = math.isqrt(MAX_SAMPLES_PER_BIN)


def _check_sizes(
    op: str, *, output_dim, group_size, pooled_size, part_size, sample_per_part
) -> tuple[int, int, int, int, int]:
    output_dim = check_positive(op, "output_dim", output_dim)
    sizes = {
        "group_size": group_size,
        "pooled_size": pooled_size,
        "part_size": pooled_size if part_size is None else part_size,
        "sample_per_part": sample_per_part,
    }
    for name, value in sizes.items():
        limit = MAX_SAMPLE_PER_PART if name == "sample_per_part" else MAX_AXIS_SIZE
        sizes[name] = check_positive(op, name, value, maximum=limit)
    return (
        output_dim,
        sizes["group_size"],
        sizes["pooled_size"],
        sizes["part_size"],
        sizes["sample_per_part"],
    )


def psroi_pool_geometry(
    op: str,
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
    grad_output=None,
) -> PSRoiPoolGeometry:
    """Check every shape, dtype, size and scalar of a call (no data is read: the values
    of ``rois`` are checked by :func:`check_values`); return the call's geometry.
    ``grad_output`` (backward only) joins the dtype check."""
    floats = {"input": input, "offset": offset, "grad_output": grad_output}
    dtype_name = check_float_dtypes(op, {k: v for k, v in floats.items() if v is not None})
    output_dim, group_size, pooled_size, part_size, sample_per_part = _check_sizes(
        op,
        output_dim=output_dim,
        group_size=group_size,
        pooled_size=pooled_size,
        part_size=part_size,
        sample_per_part=sample_per_part,
    )
    spatial_scale = finite_scalar(op, "spatial_scale", spatial_scale, positive=True)
    trans_std = finite_scalar(op, "trans_std", trans_std)

    if len(shape_of(input)) != 4:
        raise value_error(op, f"input must be 4-D [N, C, H, W]; got shape {shape_of(input)}")
    batch, channels, height, width = shape_of(input)
    expected_channels = output_dim * group_size**2
    if channels != expected_channels:
        raise value_error(
            op,
            f"input has {channels} channels (shape {shape_of(input)}); expected "
            f"output_dim * group_size**2 = {output_dim} * {group_size}**2 = {expected_channels}",
        )
    if not 1 <= height <= INT32_LIMIT or not 1 <= width <= INT32_LIMIT:
        raise value_error(
            op,
            f"input must have a height and width in [1, {INT32_LIMIT}]; got shape "
            f"{shape_of(input)}",
        )

    num_rois = check_rois_shape(op, rois)

    num_classes = 1
    if offset is not None:
        offset_shape = shape_of(offset)
        if len(offset_shape) != 4:
            raise value_error(
                op,
                f"offset must be 4-D [K, 2 * num_classes, part_size, part_size]; got "
                f"shape {offset_shape}",
            )
        offset_channels = offset_shape[1]
        if offset_channels < 2 or offset_channels % 2 != 0:
            raise value_error(
                op,
                f"offset.shape[1] = {offset_channels} must be 2 * num_classes, a positive "
                f"even number (offset shape {offset_shape})",
            )
        num_classes = offset_channels // 2
        if output_dim % num_classes != 0:
            raise value_error(
                op,
                f"output_dim = {output_dim} must be divisible by num_classes = "
                f"{num_classes} (offset.shape[1] {offset_channels} / 2)",
            )
        expected_offset = (num_rois, offset_channels, part_size, part_size)
        if offset_shape != expected_offset:
            raise value_error(
                op,
                f"offset has shape {offset_shape}; expected {expected_offset} "
                f"(K = {num_rois} RoIs, part_size = {part_size})",
            )

    return PSRoiPoolGeometry(
        batch=batch,
        channels=channels,
        height=height,
        width=width,
        num_rois=num_rois,
        output_dim=output_dim,
        group_size=group_size,
        pooled_size=pooled_size,
        part_size=part_size,
        sample_per_part=sample_per_part,
        num_classes=num_classes,
        has_offset=offset is not None,
        spatial_scale=spatial_scale,
        trans_std=trans_std,
        dtype_name=dtype_name,
    )


def check_values(op: str, xp, native: Mapping[str, object], geom: PSRoiPoolGeometry) -> None:
    """The checks that read ``rois`` (finite rows, batch indices in range), on the arrays'
    device and stream."""
    check_roi_values(op, xp, native["rois"], geom.batch)


def prepare_forward(native, options: PSRoiPoolOptions) -> Prepared:
    return Prepared(
        psroi_pool_geometry(
            OP, native["input"], native["rois"], native["offset"], **options.as_kwargs()
        ),
        {},
    )


def prepare_backward(
    native, options: PSRoiPoolOptions, *, wrt: Iterable[str] | str | None
) -> Prepared:
    geom = psroi_pool_geometry(
        BACKWARD_OP,
        native["input"],
        native["rois"],
        native["offset"],
        grad_output=native["grad_output"],
        **options.as_kwargs(),
    )
    grad_shape = shape_of(native["grad_output"])
    if grad_shape != geom.output_shape:
        raise value_error(
            BACKWARD_OP,
            f"grad_output has shape {grad_shape}; expected the output shape {geom.output_shape}",
        )
    wanted = wanted_gradients(BACKWARD_OP, wrt, {"input": True, "offset": geom.has_offset})
    return Prepared(geom, {"wrt": wanted})
