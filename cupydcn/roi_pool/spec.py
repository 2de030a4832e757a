"""What deform_roi_pool computes from: geometry, options, gradient names and checks.

Deformable RoI pooling as mmcv's ``DeformRoIPool`` (docs/semantics.md §2), plus a native
modulation mask.
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
    int_pair,
    shape_of,
    wanted_gradients,
)
from cupydcn.core.dispatch import Prepared
from cupydcn.core.dtypes import DTYPES
from cupydcn.core.errors import value_error
from cupydcn.core.options import IntPair, Options
from cupydcn.core.rois import MAX_SAMPLES_PER_BIN, check_roi_values, check_rois_shape

OP = "deform_roi_pool"
BACKWARD_OP = "deform_roi_pool_backward"
GRADIENT_NAMES = ("input", "offset", "mask")


class RoiPoolGrads(NamedTuple):
    """Gradients of deform_roi_pool; an entry is None when it was not requested or its
    argument was None. There is no gradient with respect to ``rois``.

    grad_input [N, C, H, W], grad_offset [K, 2, ph, pw], grad_mask [K, 1, ph, pw].
    """

    grad_input: object
    grad_offset: object
    grad_mask: object


@dataclass(frozen=True)
class RoiPoolOptions(Options):
    """The options of deform_roi_pool and its backward (cupydcn/core/options.py: every API
    derives from this declaration). Kept as given; ``prepare`` checks them.

    output_size: int or (ph, pw) pair, >= 1 — the bins per RoI (required).
    spatial_scale: finite float — maps RoI coordinates onto the input map.
    sampling_ratio: int in [0, MAX_SAMPLING_RATIO] — samples per bin along each axis; 0:
        ceil(RoI size / output size) per RoI.
    gamma: finite float — the scale of the offsets, in units of the RoI size.
    """

    output_size: IntPair
    spatial_scale: float = 1.0
    sampling_ratio: int = 0
    gamma: float = 0.1


@dataclass(frozen=True)
class RoiPoolGeometry:
    """Sizes and options of one deform_roi_pool call; every backend computes from this.

    input  [batch, channels, height, width]
    rois   [num_rois, 5]
    offset [num_rois, 2, pooled_h, pooled_w] (if has_offset)
    mask   [num_rois, 1, pooled_h, pooled_w] (if has_mask)
    output [num_rois, channels, pooled_h, pooled_w]
    """

    batch: int
    channels: int
    height: int
    width: int
    num_rois: int
    pooled_h: int
    pooled_w: int
    sampling_ratio: int
    spatial_scale: float
    gamma: float
    has_offset: bool
    has_mask: bool
    dtype_name: str

    @property
    def bins(self) -> int:
        return self.pooled_h * self.pooled_w

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.height, self.width)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.num_rois, self.channels, self.pooled_h, self.pooled_w)

    @property
    def offset_shape(self) -> tuple[int, int, int, int]:
        return (self.num_rois, 2, self.pooled_h, self.pooled_w)

    @property
    def mask_shape(self) -> tuple[int, int, int, int]:
        return (self.num_rois, 1, self.pooled_h, self.pooled_w)


# ---------------------------------------------------------------------------- validation


def roi_pool_geometry(
    op: str,
    native: Mapping[str, object],
    *,
    output_size,
    spatial_scale,
    sampling_ratio,
    gamma,
) -> RoiPoolGeometry:
    """Check every argument of a call that needs no data (``native`` holds input, rois,
    offset, mask and, for the backward, grad_output); return its geometry. Raises
    ValueError / TypeError naming the argument, what was expected and what was got. The
    values of ``rois`` are checked by :func:`check_values`."""
    floats = {
        name: native[name]
        for name in ("input", "offset", "mask", "grad_output")
        if native.get(name) is not None
    }
    dtype_name = check_float_dtypes(op, floats)
    input = native["input"]
    if len(shape_of(input)) != 4:
        raise value_error(op, f"input must be 4-D [N, C, H, W]; got shape {shape_of(input)}")
    batch, channels, height, width = shape_of(input)
    if height < 1 or width < 1:
        raise value_error(
            op, f"input must have a spatial size of at least 1 x 1; got shape {shape_of(input)}"
        )
    pooled_h, pooled_w = int_pair(op, "output_size", output_size, minimum=1)
    sampling_ratio = check_positive(
        op, "sampling_ratio", sampling_ratio, minimum=0, maximum=MAX_SAMPLING_RATIO
    )
    scale = finite_scalar(op, "spatial_scale", spatial_scale)
    gamma = finite_scalar(op, "gamma", gamma)

    num_rois = check_rois_shape(op, native["rois"])
    for name, channels_expected in (("offset", 2), ("mask", 1)):
        array = native[name]
        expected = (num_rois, channels_expected, pooled_h, pooled_w)
        if array is not None and shape_of(array) != expected:
            raise value_error(
                op,
                f"{name} has shape {shape_of(array)}; expected {expected} (K = {num_rois} "
                f"RoIs, {channels_expected} channel{'s' if channels_expected > 1 else ''}, "
                f"output size {pooled_h} x {pooled_w})",
            )
    geom = RoiPoolGeometry(
        batch=batch,
        channels=channels,
        height=height,
        width=width,
        num_rois=num_rois,
        pooled_h=pooled_h,
        pooled_w=pooled_w,
        sampling_ratio=sampling_ratio,
        spatial_scale=scale,
        gamma=gamma,
        has_offset=native["offset"] is not None,
        has_mask=native["mask"] is not None,
        dtype_name=dtype_name,
    )
    grad_output = native.get("grad_output")
    if grad_output is not None and shape_of(grad_output) != geom.output_shape:
        raise value_error(
            op,
            f"grad_output has shape {shape_of(grad_output)}; expected the output shape "
            f"{geom.output_shape}",
        )
    return geom


# sampling_ratio**2 samples per bin at most MAX_SAMPLES_PER_BIN.
MAX_SAMPLING_RATIO = math.isqrt(MAX_SAMPLES_PER_BIN)


def check_values(op: str, xp, native: Mapping[str, object], geom: RoiPoolGeometry) -> None:
    """The checks that read ``rois``: finite rows, batch indices in range, and (adaptive
    grid) at most MAX_SAMPLES_PER_BIN samples per bin. Runs on the arrays' stream."""
    samples = None
    if geom.sampling_ratio == 0:

        def samples(values):
            # The kernels' grid, with their arithmetic (in the accumulation dtype, so the
            # check and the kernels agree on every RoI): ceil(roi_size / pooled) per axis,
            # RoI size unclamped; NaN (inf - inf) means no samples.
            acc = xp.dtype(DTYPES[geom.dtype_name].acc_name)
            v = values.astype(acc)
            scale, half = acc.type(geom.spatial_scale), acc.type(0.5)
            roi_w = (v[:, 3] * scale - half) - (v[:, 1] * scale - half)
            roi_h = (v[:, 4] * scale - half) - (v[:, 2] * scale - half)
            grid_w = xp.maximum(xp.ceil(roi_w / acc.type(geom.pooled_w)), 0)
            grid_h = xp.maximum(xp.ceil(roi_h / acc.type(geom.pooled_h)), 0)
            return grid_h.astype(xp.float64) * grid_w.astype(xp.float64)

    check_roi_values(op, xp, native["rois"], geom.batch, samples_per_bin=samples)


def prepare_forward(native, options: RoiPoolOptions) -> Prepared:
    return Prepared(roi_pool_geometry(OP, native, **options.as_kwargs()), {})


def prepare_backward(
    native, options: RoiPoolOptions, *, wrt: Iterable[str] | str | None
) -> Prepared:
    geom = roi_pool_geometry(BACKWARD_OP, native, **options.as_kwargs())
    wanted = wanted_gradients(
        BACKWARD_OP, wrt, {"input": True, "offset": geom.has_offset, "mask": geom.has_mask}
    )
    return Prepared(geom, {"wrt": wanted})
