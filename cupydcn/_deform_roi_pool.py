"""Public deform_roi_pool forward and backward: validate, dispatch, convert back.

Deformable RoI pooling as mmcv's ``DeformRoIPool`` (SEMANTICS.md section 2), plus a
native modulation mask: each bin of each RoI is the RoIAlign average of a grid of
bilinear samples, the bin shifted by ``gamma * roi_size * offset`` and its average
multiplied by ``mask``. With ``offset=None`` and ``mask=None`` it equals
``torchvision.ops.roi_align(..., aligned=True)``.

Every check runs before any kernel: shapes, dtypes and options here, the values of
``rois`` in :func:`cupydcn._roi_common.check_rois` (one small device-to-host transfer on a
GPU).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

from . import _arrays
from ._errors import type_error, value_error
from ._roi_common import check_rois
from ._validation import (
    check_float_dtypes,
    check_positive,
    finite_scalar,
    shape_of,
    wanted_gradients,
)

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



def _is_int(value) -> bool:
    return not isinstance(value, bool) and hasattr(value, "__index__")


def _output_size(op: str, output_size) -> tuple[int, int]:
    """(ph, pw) from an int or a pair of ints, each >= 1."""
    if _is_int(output_size):
        size = check_positive(op, "output_size", operator.index(output_size))
        return size, size
    if (isinstance(output_size, Sequence) and not isinstance(output_size, str)
            and len(output_size) == 2 and all(_is_int(v) for v in output_size)):
        return (check_positive(op, "output_size[0]", operator.index(output_size[0])),
                check_positive(op, "output_size[1]", operator.index(output_size[1])))
    raise type_error(op, f"output_size must be an int or a pair (ph, pw) of ints; got "
                         f"{output_size!r}")


def roi_pool_geometry(
    op: str,
    placement: _arrays.Placement,
    native: dict[str, object],
    *,
    output_size,
    spatial_scale,
    sampling_ratio,
    gamma,
) -> RoiPoolGeometry:
    """Check every argument of a call (``native`` holds input, rois, offset, mask and, for
    the backward, grad_output); return its geometry. Raises ValueError / TypeError naming
    the argument, what was expected and what was got."""
    floats = {name: native[name] for name in ("input", "offset", "mask", "grad_output")
              if native.get(name) is not None}
    dtype_name = check_float_dtypes(op, floats)
    input = native["input"]
    if len(shape_of(input)) != 4:
        raise value_error(op, f"input must be 4-D [N, C, H, W]; got shape {shape_of(input)}")
    batch, channels, height, width = shape_of(input)
    if height < 1 or width < 1:
        raise value_error(
            op, f"input must have a spatial size of at least 1 x 1; got shape {shape_of(input)}")
    pooled_h, pooled_w = _output_size(op, output_size)
    if not _is_int(sampling_ratio):
        raise type_error(op, f"sampling_ratio must be an int; got {sampling_ratio!r}")
    sampling_ratio = check_positive(op, "sampling_ratio", operator.index(sampling_ratio),
                                    minimum=0)
    scale = finite_scalar(op, "spatial_scale", spatial_scale)
    gamma = finite_scalar(op, "gamma", gamma)

    num_rois = check_rois(op, _arrays.array_module(placement), native["rois"], batch)
    for name, channels_expected in (("offset", 2), ("mask", 1)):
        array = native[name]
        expected = (num_rois, channels_expected, pooled_h, pooled_w)
        if array is not None and shape_of(array) != expected:
            raise value_error(
                op, f"{name} has shape {shape_of(array)}; expected {expected} (K = {num_rois} "
                f"RoIs, {channels_expected} channel{'s' if channels_expected > 1 else ''}, "
                f"output size {pooled_h} x {pooled_w})")
    geom = RoiPoolGeometry(
        batch=batch, channels=channels, height=height, width=width, num_rois=num_rois,
        pooled_h=pooled_h, pooled_w=pooled_w, sampling_ratio=sampling_ratio,
        spatial_scale=scale, gamma=gamma, has_offset=native["offset"] is not None,
        has_mask=native["mask"] is not None, dtype_name=dtype_name,
    )
    grad_output = native.get("grad_output")
    if grad_output is not None and shape_of(grad_output) != geom.output_shape:
        raise value_error(
            op, f"grad_output has shape {shape_of(grad_output)}; expected the output shape "
            f"{geom.output_shape}")
    return geom



def deform_roi_pool(
    input,
    rois,
    offset=None,
    mask=None,
    *,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
):
    """Deformable RoI pooling (mmcv DeformRoIPool; modulated when ``mask`` is given).

    Any DLPack array library; computed where the arrays live (CUDA kernels or the NumPy
    backend) and returned in the caller's array type.

    Shapes:
        input  [N, C, H, W]
        rois   [K, 5] rows (batch_index, x1, y1, x2, y2) in input-image coordinates, any
               floating dtype; batch_index an integer value in [0, N)
        offset [K, 2, ph, pw] or None — channel 0 shifts x, channel 1 shifts y, in units
               of gamma * RoI width / height
        mask   [K, 1, ph, pw] or None — multiplies each bin's average
        returns [K, C, ph, pw] in the dtype of input

    ``output_size``: int or (ph, pw). ``spatial_scale`` maps RoI coordinates onto the
    input map. ``sampling_ratio``: samples per bin along each axis; 0 means
    ceil(RoI size / output size) per RoI. Half types compute in float32 and round once.
    """
    arrays = {"input": input, "rois": rois, "offset": offset, "mask": mask}
    placement, native = _arrays.natives(OP, arrays)
    geom = roi_pool_geometry(OP, placement, native, output_size=output_size,
                             spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                             gamma=gamma)
    with _arrays.compute_scope(placement):
        if placement.on_cuda:
            from ._roi_pool_kernels import roi_pool_forward

            output = roi_pool_forward(
                _arrays.kernel_launcher(placement), native["input"], native["rois"],
                native["offset"], native["mask"], geom)
        else:
            from ._numpy_roi_pool import roi_pool_forward

            output = roi_pool_forward(native["input"], native["rois"], native["offset"],
                                      native["mask"], geom)
        return _arrays.to_caller(placement, output)


def deform_roi_pool_backward(
    grad_output,
    input,
    rois,
    offset=None,
    mask=None,
    *,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    wrt: Iterable[str] | str | None = None,
) -> RoiPoolGrads:
    """Gradients of :func:`deform_roi_pool` given ``grad_output`` [K, C, ph, pw].

    Returns ``RoiPoolGrads(grad_input [N, C, H, W], grad_offset [K, 2, ph, pw],
    grad_mask [K, 1, ph, pw])``. ``wrt`` names the gradients to compute, a subset of
    ("input", "offset", "mask"); the others are None and cost nothing. Default: input,
    plus offset and mask when they are given. There is no gradient for ``rois``.

    Where a sample is not differentiable the derivative is taken as: 0 along a
    coordinate that is clamped (in [-1, 0), or at / beyond the last row or column) and
    for samples outside [-1, H] x [-1, W]; one-sided from the right at integer
    coordinates (see kernels/roi_common.cuh).
    """
    arrays = {"input": input, "rois": rois, "offset": offset, "mask": mask,
              "grad_output": grad_output}
    placement, native = _arrays.natives(BACKWARD_OP, arrays)
    geom = roi_pool_geometry(BACKWARD_OP, placement, native, output_size=output_size,
                             spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                             gamma=gamma)
    wanted = wanted_gradients(
        BACKWARD_OP, wrt, {"input": True, "offset": geom.has_offset, "mask": geom.has_mask})
    with _arrays.compute_scope(placement):
        if placement.on_cuda:
            from ._roi_pool_kernels import roi_pool_backward

            grads = roi_pool_backward(
                _arrays.kernel_launcher(placement), native["grad_output"], native["input"],
                native["rois"], native["offset"], native["mask"], geom, wrt=wanted)
        else:
            from ._numpy_roi_pool import roi_pool_backward

            grads = roi_pool_backward(native["grad_output"], native["input"], native["rois"],
                                      native["offset"], native["mask"], geom, wrt=wanted)
        return RoiPoolGrads(*(_arrays.to_caller(placement, g) for g in grads))
