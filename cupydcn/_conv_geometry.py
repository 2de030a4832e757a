"""Validation of deform_conv2d arguments and the geometry every backend works from.

All checks run on shapes and dtypes only, before any array is converted or any kernel
is launched. Errors name the argument, the expected and the actual value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ._errors import type_error, value_error
from ._padding import check_padding_mode
from ._validation import shape_of

OP = "deform_conv2d"


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
    padding_mode: str = "zeros"  # one of PADDING_MODES (cupydcn/_padding.py)

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


def _pair(op: str, name: str, value, *, minimum: int) -> tuple[int, int]:
    if isinstance(value, bool):
        raise type_error(op, f"{name} must be an int or a pair of ints; got {value!r}")
    if isinstance(value, int) or hasattr(value, "__index__") and not isinstance(value, Sequence):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise type_error(op, f"{name} must be an int or a pair (h, w) of ints; got {value!r}")
    if min(pair) < minimum:
        raise value_error(op, f"{name} must be >= {minimum} in both dimensions; got {pair}")
    return pair



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
) -> ConvGeometry:
    """Check every shape, dtype and option of a deform_conv2d call; return its geometry."""
    check_padding_mode(op, padding_mode)
    stride_h, stride_w = _pair(op, "stride", stride, minimum=1)
    pad_h, pad_w = _pair(op, "padding", padding, minimum=0)
    dil_h, dil_w = _pair(op, "dilation", dilation, minimum=1)

    for name, array, ndim in (("input", input, 4), ("offset", offset, 4), ("weight", weight, 4)):
        if len(shape_of(array)) != ndim:
            raise value_error(
                op, f"{name} must be {ndim}-D; got shape {shape_of(array)}"
            )
    batch, in_channels, height, width = shape_of(input)
    out_channels, weight_in, kernel_h, kernel_w = shape_of(weight)
    if kernel_h < 1 or kernel_w < 1:
        raise value_error(op, f"weight must have a kernel of at least 1 x 1; got {shape_of(weight)}")
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

    out_h = (height + 2 * pad_h - (dil_h * (kernel_h - 1) + 1)) // stride_h + 1
    out_w = (width + 2 * pad_w - (dil_w * (kernel_w - 1) + 1)) // stride_w + 1
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
        raise value_error(
            op, f"bias has shape {shape_of(bias)}; expected ({out_channels},)"
        )

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
    )
