"""Launches of deform_conv2d's sampling kernels (cupydcn/cuda/kernels/deform_conv.cu): the
specialisation, launch shape and arguments of each, so the orchestration
(:mod:`cupydcn.deform_conv.cuda_backend`) only says what to compute.

Layouts are those of deform_conv.cu (n = ``images``, K taps, S = pixels of the launch's
range ``pixels`` = (start, count), default the whole image).
"""

from __future__ import annotations

from cupydcn.core.dtypes import numpy_dtype
from cupydcn.cuda.launch import KernelLauncher, KernelTypes, launch_kernel
from cupydcn.deform_conv.padding import PADDING_MODE_CODES
from cupydcn.deform_conv.spec import ConvGeometry


def column_dtype(launcher: KernelLauncher, types: KernelTypes):
    """The dtype of the column buffer deform_conv_im2col writes: the element dtype (for
    half types each value is computed in float32 and rounded once), so the GEMMs take
    columns, weight and grad_output as they are."""
    return numpy_dtype(types.dtype_name)


def _sizes(geom: ConvGeometry, images: int, pixels: tuple[int, int] | None) -> dict[str, int]:
    start, count = (0, geom.out_h * geom.out_w) if pixels is None else pixels
    return dict(
        batch=images,
        channels=geom.in_channels,
        padding_mode=PADDING_MODE_CODES[geom.padding_mode],
        pixel_start=start,
        pixel_count=count,
    )


def _count(geom: ConvGeometry, pixels: tuple[int, int] | None) -> int:
    return geom.out_h * geom.out_w if pixels is None else pixels[1]


def launch_im2col(
    launcher: KernelLauncher,
    types: KernelTypes,
    geom: ConvGeometry,
    *,
    input,
    offset,
    mask,
    columns,
    images: int,
    pixels: tuple[int, int] | None = None,
) -> None:
    """columns [images, C*K, S] (dtype :func:`column_dtype`) of input [images, C, H, W],
    offset and mask (None for DCNv1) of the same images."""
    launch_kernel(
        launcher,
        "deform_conv_im2col",
        types.dtype_name,
        types.index_bits,
        images * geom.in_channels * _count(geom, pixels),
        geom,
        _sizes(geom, images, pixels),
        input=input,
        offset=offset,
        mask=mask,
        columns=columns,
    )


def launch_col2im_input(
    launcher: KernelLauncher,
    types: KernelTypes,
    geom: ConvGeometry,
    *,
    grad_columns,
    offset,
    mask,
    grad_input,
    images: int,
    pixels: tuple[int, int] | None = None,
) -> None:
    """grad_input [images, C, H, W] (accumulation dtype) += the bilinear scatter of
    grad_columns [images, C*K, S] (accumulation dtype) times the mask."""
    launch_kernel(
        launcher,
        "deform_conv_col2im_input",
        types.dtype_name,
        types.index_bits,
        images * geom.column_rows * _count(geom, pixels),
        geom,
        _sizes(geom, images, pixels),
        grad_columns=grad_columns,
        offset=offset,
        mask=mask,
        grad_input=grad_input,
    )


def launch_col2im_coord(
    launcher: KernelLauncher,
    types: KernelTypes,
    geom: ConvGeometry,
    *,
    grad_columns,
    input,
    offset,
    mask,
    grad_offset,
    grad_mask,
    images: int,
    pixels: tuple[int, int] | None = None,
) -> None:
    """grad_offset [images, G*2K, out_h, out_w] and grad_mask [images, G*K, out_h, out_w]
    (element dtype; either None when not wanted; only the range's pixels written) from
    grad_columns [images, C*K, S] and the input."""
    launch_kernel(
        launcher,
        "deform_conv_col2im_coord",
        types.dtype_name,
        types.index_bits,
        images * geom.offset_groups * geom.taps * _count(geom, pixels),
        geom,
        _sizes(geom, images, pixels),
        grad_columns=grad_columns,
        input=input,
        offset=offset,
        mask=mask,
        grad_offset=grad_offset,
        grad_mask=grad_mask,
    )
