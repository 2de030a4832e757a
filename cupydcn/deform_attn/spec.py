"""What the deformable-attention ops compute from: geometry, options, gradient names and
checks (docs/semantics.md §8).

Three ops share one sampling core (bilinear, zeros outside, channels last):

* multi_scale_deformable_attn (Deformable DETR / mmcv MultiScaleDeformableAttention),
* dcnv3 (InternImage's DCNv3 core), dcnv4 (DCNv4's packed offset_mask layout).

Every check here needs no array data, except :func:`msda_check_values`, which reads
``spatial_shapes`` / ``level_start_index`` when they are arrays of the caller's library
(inside the dispatch, on the arrays' device and stream).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from cupydcn.core.checks import (
    MAX_OPTION_VALUE,
    check_float_dtypes,
    check_positive,
    conv_output_size,
    finite_scalar,
    int_pair,
    is_int,
    shape_of,
    wanted_gradients,
)
from cupydcn.core.dispatch import Prepared
from cupydcn.core.errors import type_error, value_error
from cupydcn.core.options import IntPair, Options

MSDA_OP = "multi_scale_deformable_attn"
MSDA_BACKWARD_OP = "multi_scale_deformable_attn_backward"
DCNV3_OP = "dcnv3"
DCNV3_BACKWARD_OP = "dcnv3_backward"
DCNV4_OP = "dcnv4"
DCNV4_BACKWARD_OP = "dcnv4_backward"

MSDA_GRADIENT_NAMES = ("value", "sampling_locations", "attention_weights")
DCNV3_GRADIENT_NAMES = ("input", "offset", "mask")
DCNV4_GRADIENT_NAMES = ("input", "offset_mask")


# ---------------------------------------------------------------------------- results


class MsdaGrads(NamedTuple):
    """Gradients of multi_scale_deformable_attn; an entry is None when not requested.

    grad_value [N, S, M, D], grad_sampling_locations [N, Lq, M, L, P, 2] ((x, y), in the
    normalised units of the locations), grad_attention_weights [N, Lq, M, L, P].
    """

    grad_value: object
    grad_sampling_locations: object
    grad_attention_weights: object


class Dcnv3Grads(NamedTuple):
    """Gradients of dcnv3; an entry is None when not requested.

    grad_input [N, H, W, G * Cg], grad_offset [N, H_out, W_out, G * P * 2],
    grad_mask [N, H_out, W_out, G * P].
    """

    grad_input: object
    grad_offset: object
    grad_mask: object


class Dcnv4Grads(NamedTuple):
    """Gradients of dcnv4; an entry is None when not requested.

    grad_input [N, H, W, G * Cg], grad_offset_mask [N, H_out, W_out, D_om] (the layout of
    offset_mask; its padding beyond G * 3P gets 0).
    """

    grad_input: object
    grad_offset_mask: object


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True)
class MsdaOptions(Options):
    """multi_scale_deformable_attn has no options: every argument is an array (or, for
    spatial_shapes / level_start_index, a sequence of ints)."""


@dataclass(frozen=True)
class Dcnv3Options(Options):
    """The options of dcnv3 / dcnv4 and their backward (cupydcn/core/options.py). Kept as
    given; ``prepare`` checks them. The required options come first (a custom-op schema
    takes them positionally); the public functions take every option by keyword.

    kernel_size: int or (kh, kw) pair, >= 1 (required).
    group: int >= 1 — the groups G (InternImage's ``group``) (required).
    group_channels: int >= 1 — channels per group Cg; G * Cg must be the input's channels
        (required).
    stride: int or (h, w) pair, >= 1.
    padding: int or (pad_h, pad_w) pair, >= 0 — pads H by pad_h and W by pad_w (as
        InternImage's CUDA kernel; its pure-PyTorch reference swaps them).
    dilation: int or (h, w) pair, >= 1.
    offset_scale: finite float — multiplies the dilation grid and the offsets.
    remove_center: bool — drop the centre tap (kw // 2, kh // 2); odd kernel sizes only.
    """

    kernel_size: IntPair
    group: int
    group_channels: int
    stride: IntPair = 1
    padding: IntPair = 0
    dilation: IntPair = 1
    offset_scale: float = 1.0
    remove_center: bool = False


@dataclass(frozen=True)
class Dcnv4Options(Dcnv3Options):
    """The options of dcnv4 and its backward: exactly those of dcnv3."""


# ---------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class MsdaGeometry:
    """Sizes of one multi_scale_deformable_attn call; every backend computes from this.

    value               [batch, num_keys, heads, head_dim]
    sampling_locations  [batch, num_queries, heads, levels, points, 2]
    attention_weights   [batch, num_queries, heads, levels, points]
    output              [batch, num_queries, heads * head_dim]

    level_shapes: the (H_l, W_l) of every level when spatial_shapes was given on the host
    (a sequence or a NumPy array), else None: the backend reads the spatial_shapes array
    (checked by :func:`msda_check_values`), see :func:`level_shapes_of`.
    """

    batch: int
    num_keys: int
    heads: int
    head_dim: int
    num_queries: int
    levels: int
    points: int
    dtype_name: str
    level_shapes: tuple[tuple[int, int], ...] | None

    @property
    def value_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.num_keys, self.heads, self.head_dim)

    @property
    def locations_shape(self) -> tuple[int, ...]:
        return (self.batch, self.num_queries, self.heads, self.levels, self.points, 2)

    @property
    def weights_shape(self) -> tuple[int, ...]:
        return (self.batch, self.num_queries, self.heads, self.levels, self.points)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (self.batch, self.num_queries, self.heads * self.head_dim)


@dataclass(frozen=True)
class DcnGeometry:
    """Sizes and options of one dcnv3 / dcnv4 call; every backend computes from this.

    input   [batch, height, width, group * group_channels]
    offset  [batch, out_h, out_w, group * points * 2]        (dcnv3)
    mask    [batch, out_h, out_w, group * points]            (dcnv3)
    offset_mask [batch, out_h, out_w, packed_dim]            (dcnv4, packed_dim >= group * 3P)
    output  [batch, out_h, out_w, group * group_channels]

    points = kernel_h * kernel_w - remove_center; taps are numbered x-major,
    k = iw * kernel_h + ih (the centre tap skipped when remove_center).
    """

    batch: int
    height: int
    width: int
    group: int
    group_channels: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dil_h: int
    dil_w: int
    out_h: int
    out_w: int
    offset_scale: float
    remove_center: bool
    dtype_name: str
    packed_dim: int = 0  # dcnv4: the last dimension of offset_mask (0 for dcnv3)

    @property
    def channels(self) -> int:
        return self.group * self.group_channels

    @property
    def points(self) -> int:
        return self.kernel_h * self.kernel_w - int(self.remove_center)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.height, self.width, self.channels)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_h, self.out_w, self.channels)

    @property
    def offset_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_h, self.out_w, self.group * self.points * 2)

    @property
    def mask_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_h, self.out_w, self.group * self.points)

    @property
    def offset_mask_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_h, self.out_w, self.packed_dim)

    def taps(self) -> list[tuple[int, int]]:
        """(iw, ih) of every point, in the order of the offset / mask channels: x-major
        (iw outer, ih inner), the centre (kw // 2, kh // 2) skipped when remove_center."""
        centre = (self.kernel_w // 2, self.kernel_h // 2)
        return [
            (iw, ih)
            for iw in range(self.kernel_w)
            for ih in range(self.kernel_h)
            if not (self.remove_center and (iw, ih) == centre)
        ]


# ---------------------------------------------------------------------------- MSDA checks


def is_array(value) -> bool:
    """An array of some library (anything with a shape and a dtype, or a DLPack
    producer), as opposed to a sequence of Python ints."""
    return (hasattr(value, "shape") and hasattr(value, "dtype")) or hasattr(value, "__dlpack__")


def host_ints(op: str, name: str, value, ndim: int) -> tuple | None:
    """``value`` as nested tuples of Python ints when it lives on the host as a sequence
    (list / tuple of ints or of pairs) or a NumPy array; None for an array of another
    library (read later, in :func:`msda_check_values`). Checks the nesting and the int
    type; ``ndim`` is 2 for spatial_shapes ([L, 2]), 1 for level_start_index ([L])."""
    expected = "[L, 2] of ints (H_l, W_l)" if ndim == 2 else "[L] of ints"
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            raise type_error(
                op, f"{name} must be an integer array {expected}; got dtype {value.dtype}"
            )
        if value.ndim != ndim or (ndim == 2 and value.shape[1] != 2):
            raise value_error(
                op, f"{name} must have shape {expected}; got shape {tuple(value.shape)}"
            )
        return (
            tuple(tuple(int(v) for v in row) for row in value.tolist())
            if ndim == 2
            else tuple(int(v) for v in value.tolist())
        )
    if is_array(value):
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise type_error(
            op,
            f"{name} must be an integer array or a sequence {expected}; got {type(value).__name__}",
        )
    if ndim == 1:
        if not all(is_int(v) for v in value):
            raise type_error(op, f"{name} must be a sequence of ints; got {list(value)!r}")
        return tuple(operator.index(v) for v in value)
    rows = []
    for index, row in enumerate(value):
        if (
            is_array(row)
            or isinstance(row, (str, bytes))
            or not isinstance(row, Sequence)
            or len(row) != 2
            or not all(is_int(v) for v in row)
        ):
            raise type_error(op, f"{name}[{index}] must be a pair (H_l, W_l) of ints; got {row!r}")
        rows.append((operator.index(row[0]), operator.index(row[1])))
    return tuple(rows)


def _device_int_array(op: str, name: str, array, ndim: int) -> int:
    """Shape / dtype checks of a spatial_shapes / level_start_index array of the caller's
    library (native view); returns its length L."""
    shape = shape_of(array)
    expected = "[L, 2]" if ndim == 2 else "[L]"
    if np.dtype(array.dtype).kind not in "iu":
        raise type_error(op, f"{name} must be an integer array {expected}; got dtype {array.dtype}")
    if len(shape) != ndim or (ndim == 2 and shape[1] != 2):
        raise value_error(op, f"{name} must have shape {expected}; got shape {shape}")
    return shape[0]


def check_level_values(op: str, shapes: Sequence[tuple[int, int]], starts, num_keys: int) -> None:
    """The level sizes are >= 1, sum to S = value.shape[1], and ``starts`` (when given) is
    their exclusive prefix sum."""
    for index, (h, w) in enumerate(shapes):
        if not (1 <= h <= MAX_OPTION_VALUE and 1 <= w <= MAX_OPTION_VALUE):
            raise value_error(
                op,
                f"spatial_shapes[{index}] = ({h}, {w}); each level must be "
                f"at least 1 x 1 (and at most 2**31 - 1 per side)",
            )
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != num_keys:
        raise value_error(
            op,
            f"spatial_shapes {[tuple(s) for s in shapes]} has "
            f"sum(H_l * W_l) = {sum(sizes)}; expected value.shape[1] = S = "
            f"{num_keys}",
        )
    if starts is not None:
        expected = [0]
        for size in sizes[:-1]:
            expected.append(expected[-1] + size)
        if list(starts) != expected:
            raise value_error(
                op,
                f"level_start_index is {list(starts)}; expected {expected} "
                f"(the exclusive prefix sums of H_l * W_l of spatial_shapes)",
            )


def msda_geometry(
    op: str, native: Mapping[str, object], *, shapes_host, starts_host
) -> MsdaGeometry:
    """Check every argument of a call that needs no device data (``native``: value,
    spatial_shapes / level_start_index arrays or None, sampling_locations,
    attention_weights and, for the backward, grad_output). ``shapes_host`` /
    ``starts_host``: the host forms (tuples) of spatial_shapes / level_start_index, or
    None when they are arrays in ``native``."""
    floats = {
        name: native[name]
        for name in ("value", "sampling_locations", "attention_weights", "grad_output")
        if native.get(name) is not None
    }
    dtype_name = check_float_dtypes(op, floats)
    value = native["value"]
    value_shape = shape_of(value)
    if len(value_shape) != 4:
        raise value_error(op, f"value must be 4-D [N, S, M, D]; got shape {value_shape}")
    batch, num_keys, heads, head_dim = value_shape

    if shapes_host is not None:
        levels = len(shapes_host)
    else:
        levels = _device_int_array(op, "spatial_shapes", native["spatial_shapes"], 2)
    if levels < 1:
        raise value_error(op, "spatial_shapes must have at least one level; got 0")
    if starts_host is not None:
        starts_len = len(starts_host)
    elif native.get("level_start_index") is not None:
        starts_len = _device_int_array(op, "level_start_index", native["level_start_index"], 1)
    else:
        starts_len = levels
    if starts_len != levels:
        raise value_error(
            op,
            f"level_start_index has {starts_len} entries; expected one per "
            f"level of spatial_shapes ({levels})",
        )
    if shapes_host is not None and (
        starts_host is not None or native.get("level_start_index") is None
    ):
        check_level_values(op, shapes_host, starts_host, num_keys)

    locations = native["sampling_locations"]
    loc_shape = shape_of(locations)
    if len(loc_shape) != 6:
        raise value_error(
            op, f"sampling_locations must be 6-D [N, Lq, M, L, P, 2]; got shape {loc_shape}"
        )
    if loc_shape[-1] != 2:
        raise value_error(
            op, f"sampling_locations must have a last dimension of 2 (x, y); got shape {loc_shape}"
        )
    num_queries, points = loc_shape[1], loc_shape[4]
    expected = (batch, num_queries, heads, levels, points, 2)
    if loc_shape != expected:
        raise value_error(
            op,
            f"sampling_locations has shape {loc_shape}; expected {expected} "
            f"(N = {batch} and M = {heads} of value, L = {levels} levels of "
            f"spatial_shapes)",
        )
    weights_shape = shape_of(native["attention_weights"])
    if weights_shape != expected[:5]:
        raise value_error(
            op,
            f"attention_weights has shape {weights_shape}; expected "
            f"{expected[:5]} (the first five dimensions of "
            f"sampling_locations)",
        )
    geom = MsdaGeometry(
        batch=batch,
        num_keys=num_keys,
        heads=heads,
        head_dim=head_dim,
        num_queries=num_queries,
        levels=levels,
        points=points,
        dtype_name=dtype_name,
        level_shapes=shapes_host,
    )
    grad_output = native.get("grad_output")
    if grad_output is not None and shape_of(grad_output) != geom.output_shape:
        raise value_error(
            op,
            f"grad_output has shape {shape_of(grad_output)}; expected the "
            f"output shape {geom.output_shape}",
        )
    return geom


def _to_host(xp, array) -> np.ndarray:
    return np.asarray(array) if xp is np else xp.asnumpy(array)


def msda_check_values(
    op: str, xp, native: Mapping[str, object], geom: MsdaGeometry, *, starts_host
) -> None:
    """The checks that read spatial_shapes / level_start_index arrays of the caller's
    library (one small device-to-host copy on a GPU)."""
    shapes = geom.level_shapes
    starts = starts_host
    if shapes is not None and (starts is not None or native.get("level_start_index") is None):
        return  # checked in msda_geometry
    if shapes is None:
        shapes = [
            tuple(int(v) for v in row) for row in _to_host(xp, native["spatial_shapes"]).tolist()
        ]
    if starts is None and native.get("level_start_index") is not None:
        starts = [int(v) for v in _to_host(xp, native["level_start_index"]).tolist()]
    check_level_values(op, shapes, starts, geom.num_keys)


def level_shapes_of(geom: MsdaGeometry, spatial_shapes) -> tuple[tuple[int, int], ...]:
    """The (H_l, W_l) of every level: from the plan, else from the (checked) native
    spatial_shapes array (NumPy here)."""
    if geom.level_shapes is not None:
        return geom.level_shapes
    return tuple((int(h), int(w)) for h, w in np.asarray(spatial_shapes).tolist())


def prepare_msda_forward(native, *, shapes_host, starts_host) -> Prepared:
    return Prepared(
        msda_geometry(MSDA_OP, native, shapes_host=shapes_host, starts_host=starts_host), {}
    )


def prepare_msda_backward(native, *, shapes_host, starts_host, wrt) -> Prepared:
    geom = msda_geometry(MSDA_BACKWARD_OP, native, shapes_host=shapes_host, starts_host=starts_host)
    wanted = wanted_gradients(MSDA_BACKWARD_OP, wrt, {name: True for name in MSDA_GRADIENT_NAMES})
    return Prepared(geom, {"wrt": wanted})


# ---------------------------------------------------------------------------- DCN checks


def _check_bool(op: str, name: str, value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if is_int(value) and operator.index(value) in (0, 1):  # upstream passes 0 / 1
        return bool(operator.index(value))
    raise type_error(op, f"{name} must be a bool; got {value!r}")


def dcn_geometry(
    op: str, native: Mapping[str, object], options: Dcnv3Options, *, packed: bool
) -> DcnGeometry:
    """Check every argument of a dcnv3 (``packed`` False: offset, mask) or dcnv4
    (``packed``: offset_mask) call; return its geometry."""
    names = ("input", "offset_mask") if packed else ("input", "offset", "mask")
    floats = {
        name: native[name] for name in (*names, "grad_output") if native.get(name) is not None
    }
    dtype_name = check_float_dtypes(op, floats)
    kernel_h, kernel_w = int_pair(op, "kernel_size", options.kernel_size, minimum=1)
    stride_h, stride_w = int_pair(op, "stride", options.stride, minimum=1)
    pad_h, pad_w = int_pair(op, "padding", options.padding, minimum=0)
    dil_h, dil_w = int_pair(op, "dilation", options.dilation, minimum=1)
    group = check_positive(op, "group", options.group)
    group_channels = check_positive(op, "group_channels", options.group_channels)
    offset_scale = finite_scalar(op, "offset_scale", options.offset_scale)
    remove_center = _check_bool(op, "remove_center", options.remove_center)
    if remove_center and (kernel_h % 2 == 0 or kernel_w % 2 == 0):
        raise value_error(
            op, f"remove_center needs odd kernel sizes; got kernel_size {(kernel_h, kernel_w)}"
        )

    input_shape = shape_of(native["input"])
    if len(input_shape) != 4:
        raise value_error(
            op, f"input must be 4-D [N, H, W, C] (channels last); got shape {input_shape}"
        )
    batch, height, width, channels = input_shape
    if height < 1 or width < 1:
        raise value_error(
            op, f"input must have a spatial size of at least 1 x 1; got shape {input_shape}"
        )
    if channels != group * group_channels:
        raise value_error(
            op,
            f"input has {channels} channels (shape {input_shape}); expected "
            f"group * group_channels = {group} * {group_channels} = "
            f"{group * group_channels}",
        )
    out_h = conv_output_size(height, kernel_h, stride=stride_h, padding=pad_h, dilation=dil_h)
    out_w = conv_output_size(width, kernel_w, stride=stride_w, padding=pad_w, dilation=dil_w)
    if out_h < 1 or out_w < 1:
        raise value_error(
            op,
            f"the output size would be {out_h} x {out_w} (input {height} x {width}, "
            f"kernel_size {(kernel_h, kernel_w)}, stride {(stride_h, stride_w)}, padding "
            f"{(pad_h, pad_w)}, dilation {(dil_h, dil_w)}); it must be at least 1 x 1",
        )
    points = kernel_h * kernel_w - int(remove_center)
    packed_dim = 0
    if packed:
        om_shape = shape_of(native["offset_mask"])
        need = group * 3 * points
        if len(om_shape) != 4 or om_shape[:3] != (batch, out_h, out_w) or om_shape[3] < need:
            raise value_error(
                op,
                f"offset_mask has shape {om_shape}; expected ({batch}, {out_h}, {out_w}, "
                f"D) with D >= group * 3 * P = {group} * 3 * {points} = {need} (output size "
                f"{out_h} x {out_w}, P = kh * kw - remove_center)",
            )
        packed_dim = om_shape[3]
    geom = DcnGeometry(
        batch=batch,
        height=height,
        width=width,
        group=group,
        group_channels=group_channels,
        kernel_h=kernel_h,
        kernel_w=kernel_w,
        stride_h=stride_h,
        stride_w=stride_w,
        pad_h=pad_h,
        pad_w=pad_w,
        dil_h=dil_h,
        dil_w=dil_w,
        out_h=out_h,
        out_w=out_w,
        offset_scale=offset_scale,
        remove_center=remove_center,
        dtype_name=dtype_name,
        packed_dim=packed_dim,
    )
    if not packed:
        for name, expected, what in (
            ("offset", geom.offset_shape, f"group * P * 2 = {group} * {points} * 2"),
            ("mask", geom.mask_shape, f"group * P = {group} * {points}"),
        ):
            got = shape_of(native[name])
            if got != expected:
                raise value_error(
                    op,
                    f"{name} has shape {got}; expected {expected} ({what} "
                    f"channels at the output size {out_h} x {out_w})",
                )
    grad_output = native.get("grad_output")
    if grad_output is not None and shape_of(grad_output) != geom.output_shape:
        raise value_error(
            op,
            f"grad_output has shape {shape_of(grad_output)}; expected the "
            f"output shape {geom.output_shape}",
        )
    return geom


def prepare_dcnv3_forward(native, options: Dcnv3Options) -> Prepared:
    return Prepared(dcn_geometry(DCNV3_OP, native, options, packed=False), {})


def prepare_dcnv3_backward(
    native, options: Dcnv3Options, *, wrt: Iterable[str] | str | None
) -> Prepared:
    geom = dcn_geometry(DCNV3_BACKWARD_OP, native, options, packed=False)
    wanted = wanted_gradients(DCNV3_BACKWARD_OP, wrt, {name: True for name in DCNV3_GRADIENT_NAMES})
    return Prepared(geom, {"wrt": wanted})


def prepare_dcnv4_forward(native, options: Dcnv4Options) -> Prepared:
    return Prepared(dcn_geometry(DCNV4_OP, native, options, packed=True), {})


def prepare_dcnv4_backward(
    native, options: Dcnv4Options, *, wrt: Iterable[str] | str | None
) -> Prepared:
    geom = dcn_geometry(DCNV4_BACKWARD_OP, native, options, packed=True)
    wanted = wanted_gradients(DCNV4_BACKWARD_OP, wrt, {name: True for name in DCNV4_GRADIENT_NAMES})
    return Prepared(geom, {"wrt": wanted})
