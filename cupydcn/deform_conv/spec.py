"""Validation of deform_conv2d arguments and the geometry every backend works from.

All checks run on shapes and dtypes only, before any array is converted or any kernel
is launched. Errors name the argument, the expected and the actual value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from cupydcn.core.checks import (
    check_float_dtypes,
    conv_output_size,
    int_pair,
    is_int,
    shape_of,
    wanted_gradients,
)
from cupydcn.core.dispatch import Prepared
from cupydcn.core.errors import type_error, value_error
from cupydcn.core.options import TUNING, IntPair, Options
from cupydcn.deform_conv.algorithm import check_algorithm
from cupydcn.deform_conv.padding import check_padding_mode

OP = "deform_conv2d"
BACKWARD_OP = "deform_conv2d_backward"
GRADIENT_NAMES = ("input", "offset", "weight", "mask", "bias")
DEFAULT_WORKSPACE_BYTES = 512 * 2**20


class ConvGrads(NamedTuple):
    """Gradients of deform_conv2d; an entry is None when it was not requested (or, for
    grad_mask, when the call had no mask).

    grad_input [N, C, H, W], grad_offset [N, 2*G*kh*kw, H_out, W_out],
    grad_weight [C_out, C/groups, kh, kw], grad_mask [N, G*kh*kw, H_out, W_out],
    grad_bias [C_out].
    """

    grad_input: object
    grad_offset: object
    grad_weight: object
    grad_mask: object
    grad_bias: object


@dataclass(frozen=True)
class ConvOptions(Options):
    """The options of deform_conv2d and its backward (cupydcn/core/options.py: every API
    derives from this declaration). Kept as given; ``prepare`` checks them.

    stride: int or (h, w) pair, >= 1 — the step of the kernel window.
    padding: int or (h, w) pair, >= 0 — implicit rows / columns added on each side.
    dilation: int or (h, w) pair, >= 1 — the spacing of the kernel taps.
    padding_mode: "zeros", "border" or "reflection" — how a sample point outside the map
        is read (PADDING_MODES, cupydcn/deform_conv/padding.py).
    workspace_bytes: int > 0 or None (DEFAULT_WORKSPACE_BYTES) — the budget of the
        intermediate column buffers (the batch is processed in chunks that fit); tuning.
    algorithm: None, or one of cupydcn.deform_conv.algorithm.ALGORITHMS — how the CUDA
        path computes (None: the current setting, cupydcn.set_conv_algorithm); ignored on
        the CPU; tuning.
    """

    stride: IntPair = 1
    padding: IntPair = 0
    dilation: IntPair = 1
    padding_mode: str = "zeros"
    workspace_bytes: int | None = field(default=None, metadata=TUNING)
    algorithm: str | None = field(default=None, metadata=TUNING)


@dataclass(frozen=True)
class ConvGeometry:
    """Sizes of one deform_conv2d call; every backend computes from this alone.

    input  [batch, in_channels, height, width]
    offset [batch, 2 * offset_groups * kernel_h * kernel_w, out_h, out_w]
    mask   [batch, offset_groups * kernel_h * kernel_w, out_h, out_w] (if has_mask)
    weight [out_channels, in_channels // groups, kernel_h, kernel_w]
    output [batch, out_channels, out_h, out_w]
    """

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    groups: int
    offset_groups: int
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
    has_mask: bool
    has_bias: bool
    padding_mode: str = "zeros"  # one of PADDING_MODES (cupydcn/deform_conv/padding.py)
    dtype_name: str = "float32"  # the element dtype of every floating array of the call

    @property
    def taps(self) -> int:
        return self.kernel_h * self.kernel_w

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.height, self.width)

    @property
    def offset_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 2 * self.offset_groups * self.taps, self.out_h, self.out_w)

    @property
    def mask_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.offset_groups * self.taps, self.out_h, self.out_w)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, self.kernel_h, self.kernel_w)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_channels, self.out_h, self.out_w)

    @property
    def column_rows(self) -> int:
        """Rows of the sampled-column matrix of one image: in_channels * kh * kw."""
        return self.in_channels * self.taps


def conv_geometry(
    input,
    offset,
    weight,
    bias,
    mask,
    *,
    stride,
    padding,
    dilation,
    padding_mode: str = "zeros",
    op: str = OP,
    grad_output=None,
) -> ConvGeometry:
    """Check every shape, dtype and option of a deform_conv2d call (and, for the backward,
    ``grad_output``'s dtype); return its geometry."""
    check_padding_mode(op, padding_mode)
    stride_h, stride_w = int_pair(op, "stride", stride, minimum=1)
    pad_h, pad_w = int_pair(op, "padding", padding, minimum=0)
    dil_h, dil_w = int_pair(op, "dilation", dilation, minimum=1)
    floats = {
        "input": input,
        "offset": offset,
        "weight": weight,
        "bias": bias,
        "mask": mask,
        **({} if grad_output is None else {"grad_output": grad_output}),
    }
    dtype_name = check_float_dtypes(op, {k: v for k, v in floats.items() if v is not None})

    for name, array, ndim in (("input", input, 4), ("offset", offset, 4), ("weight", weight, 4)):
        if len(shape_of(array)) != ndim:
            raise value_error(op, f"{name} must be {ndim}-D; got shape {shape_of(array)}")
    batch, in_channels, height, width = shape_of(input)
    out_channels, weight_in, kernel_h, kernel_w = shape_of(weight)
    if kernel_h < 1 or kernel_w < 1:
        raise value_error(
            op, f"weight must have a kernel of at least 1 x 1; got {shape_of(weight)}"
        )
    if in_channels < 1:
        raise value_error(op, f"input must have at least one channel; got shape {shape_of(input)}")
    if weight_in < 1 or in_channels % weight_in != 0:
        raise value_error(
            op,
            f"weight.shape[1] = {weight_in} must divide the input channels {in_channels} "
            f"(weight {shape_of(weight)}, input {shape_of(input)})",
        )
    groups = in_channels // weight_in
    if out_channels % groups != 0:
        raise value_error(
            op,
            f"weight.shape[0] = {out_channels} must be divisible by groups = {groups} "
            f"(= input channels {in_channels} / weight.shape[1] {weight_in})",
        )

    if out_channels < 1:
        raise value_error(
            op, f"weight must have at least one output channel; got shape {shape_of(weight)}"
        )
    out_h = conv_output_size(height, kernel_h, stride=stride_h, padding=pad_h, dilation=dil_h)
    out_w = conv_output_size(width, kernel_w, stride=stride_w, padding=pad_w, dilation=dil_w)
    if out_h < 1 or out_w < 1:
        raise value_error(
            op,
            f"the output size would be {out_h} x {out_w} (input {height} x {width}, kernel "
            f"{kernel_h} x {kernel_w}, stride {(stride_h, stride_w)}, padding {(pad_h, pad_w)}, "
            f"dilation {(dil_h, dil_w)}); it must be at least 1 x 1",
        )

    taps = kernel_h * kernel_w
    offset_shape = shape_of(offset)
    offset_channels = offset_shape[1]
    if offset_channels < 2 * taps or offset_channels % (2 * taps) != 0:
        raise value_error(
            op,
            f"offset.shape[1] = {offset_channels} must be a positive multiple of "
            f"2 * kh * kw = {2 * taps}",
        )
    offset_groups = offset_channels // (2 * taps)
    if in_channels % offset_groups != 0:
        raise value_error(
            op,
            f"offset groups = {offset_groups} (offset.shape[1] {offset_channels} / "
            f"{2 * taps}) must divide the input channels {in_channels}",
        )
    expected_offset = (batch, offset_channels, out_h, out_w)
    if offset_shape != expected_offset:
        raise value_error(
            op,
            f"offset has shape {offset_shape}; expected {expected_offset} "
            f"(batch {batch}, output size {out_h} x {out_w})",
        )

    if mask is not None:
        expected_mask = (batch, offset_groups * taps, out_h, out_w)
        if shape_of(mask) != expected_mask:
            raise value_error(
                op,
                f"mask has shape {shape_of(mask)}; expected {expected_mask} "
                f"(offset_groups * kh * kw = {offset_groups} * {kernel_h} * {kernel_w} "
                f"channels at the output size {out_h} x {out_w})",
            )
    if bias is not None and shape_of(bias) != (out_channels,):
        raise value_error(op, f"bias has shape {shape_of(bias)}; expected ({out_channels},)")

    return ConvGeometry(
        batch=batch,
        in_channels=in_channels,
        height=height,
        width=width,
        out_channels=out_channels,
        groups=groups,
        offset_groups=offset_groups,
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
        has_mask=mask is not None,
        has_bias=bias is not None,
        padding_mode=padding_mode,
        dtype_name=dtype_name,
    )


def workspace_budget(op: str, workspace_bytes: int | None) -> int:
    """The column-buffer budget of a call: ``workspace_bytes`` or the default."""
    if workspace_bytes is None:
        return DEFAULT_WORKSPACE_BYTES
    if isinstance(workspace_bytes, bool) or not is_int(workspace_bytes):
        raise type_error(op, f"workspace_bytes must be an int or None; got {workspace_bytes!r}")
    workspace_bytes = int(workspace_bytes)
    if workspace_bytes < 1:
        raise value_error(op, f"workspace_bytes must be positive; got {workspace_bytes}")
    return workspace_bytes


def prepare_forward(native, options: ConvOptions) -> Prepared:
    """The plan of a forward call from its native arrays (shape and option checks)."""
    geom = conv_geometry(
        native["input"],
        native["offset"],
        native["weight"],
        native["bias"],
        native["mask"],
        **options.as_kwargs(tuning=False),
    )
    return Prepared(
        geom,
        {
            "workspace_bytes": workspace_budget(OP, options.workspace_bytes),
            "algorithm": _algorithm(OP, options.algorithm),
        },
    )


def _algorithm(op: str, algorithm: object) -> str | None:
    """``algorithm`` checked: None (the setting decides at launch) or a known name."""
    return None if algorithm is None else check_algorithm(algorithm, op)


def prepare_backward(native, options: ConvOptions, *, wrt) -> Prepared:
    """The plan of a backward call: the forward's checks, grad_output's shape and dtype,
    the requested gradients."""
    geom = conv_geometry(
        native["input"],
        native["offset"],
        native["weight"],
        None,
        native["mask"],
        **options.as_kwargs(tuning=False),
        op=BACKWARD_OP,
        grad_output=native["grad_output"],
    )
    grad_shape = shape_of(native["grad_output"])
    if grad_shape != geom.output_shape:
        raise value_error(
            BACKWARD_OP,
            f"grad_output has shape {grad_shape}; expected the output shape {geom.output_shape}",
        )
    wanted = wanted_gradients(
        BACKWARD_OP, wrt, {name: name != "mask" or geom.has_mask for name in GRADIENT_NAMES}
    )
    return Prepared(
        geom,
        {
            "wrt": wanted,
            "workspace_bytes": workspace_budget(BACKWARD_OP, options.workspace_bytes),
            "algorithm": _algorithm(BACKWARD_OP, options.algorithm),
        },
    )
