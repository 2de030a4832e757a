"""The second-order terms of deform_conv2d along an offset direction on the CUDA kernels
(``cupydcn/cuda/kernels/deform_conv_second_order.cu``): the CUDA version of
:mod:`cupydcn.deform_conv.second_order`, same arguments and results, written against a
:class:`~cupydcn.cuda.launch.KernelLauncher` (CuPy on a GPU, the CPU emulator in the tests).

With ``T = dS/dp . vo``, ``colgrad = W^T gy`` and ``m`` the mask (ones without one), over
the whole batch at once (acc = the accumulation dtype, float32 for the half types)::

    columns  [N, C*K, P] <- deform_conv_second_order_columns: m T                   (acc)
    grad_output  = W @ columns                                 (batched GEMM, rounded once)
    weight       = sum_n gy @ columns^T                        (batched GEMM, rounded once)
    colgrad  [N, C*K, P] = W^T @ gy                            (batched GEMM)
    offset, mask <- deform_conv_second_order_coord(colgrad)    (one thread per tap and pixel)
    input       += deform_conv_second_order_input(colgrad)     (atomics in acc, rounded once)
"""

from __future__ import annotations

from cupydcn.core.dtypes import DTYPES
from cupydcn.cuda.launch import (
    KernelLauncher,
    contiguous,
    launch_kernel,
    round_to_dtype,
    widen_to_acc,
)
from cupydcn.cuda.tf32 import is_tf32_allowed
from cupydcn.deform_conv.cuda_backend import grouped_gemm, index_bits_for
from cupydcn.deform_conv.padding import PADDING_MODE_CODES
from cupydcn.deform_conv.second_order import TERM_NAMES, checked_geometry
from cupydcn.deform_conv.spec import ConvGeometry

_RESULT_ORDER = ("grad_output", "weight", "mask", "offset", "input")


def offset_second_order(
    launcher: KernelLauncher,
    grad_output,
    input,
    offset,
    weight,
    mask,
    offset_tangent,
    *,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode: str = "zeros",
    wrt=TERM_NAMES,
    index_bits: int | None = None,
) -> dict:
    """:func:`cupydcn.deform_conv.second_order.offset_second_order` on ``launcher``'s
    arrays (``launcher.xp``); ``index_bits`` forces an index width (32 or 64)."""
    geom = checked_geometry(
        grad_output,
        input,
        offset,
        weight,
        mask,
        offset_tangent,
        stride=stride,
        padding=padding,
        dilation=dilation,
        padding_mode=padding_mode,
        wrt=wrt,
    )
    return offset_second_order_terms(
        launcher,
        grad_output,
        input,
        offset,
        weight,
        mask,
        offset_tangent,
        geom,
        wrt,
        index_bits=index_bits,
    )


def offset_second_order_terms(
    launcher: KernelLauncher,
    grad_output,
    input,
    offset,
    weight,
    mask,
    offset_tangent,
    geom: ConvGeometry,
    wrt,
    *,
    index_bits: int | None = None,
) -> dict:
    """The terms ``wrt`` of checked arguments (``geom`` from ``checked_geometry``)."""
    xp = launcher.xp
    dtype_name = geom.dtype_name
    dtype = input.dtype
    acc_dtype = xp.dtype(DTYPES[dtype_name].acc_name)
    grad_output, input, offset, weight, mask = (
        contiguous(xp, a) for a in (grad_output, input, offset, weight, mask)
    )
    offset_tangent = contiguous(xp, offset_tangent.astype(dtype, copy=False))
    bits = index_bits if index_bits is not None else index_bits_for(geom, geom.batch)

    n, c = geom.batch, geom.in_channels
    k, pixels = geom.taps, geom.out_h * geom.out_w
    groups, c_out = geom.groups, geom.out_channels
    cout, rows = c_out // groups, geom.column_rows // groups
    want = set(wrt)
    want_mask = "mask" in want and mask is not None
    # Whole images: the columns hold every output pixel (pixel range [0, P)).
    sizes = dict(
        batch=n,
        channels=c,
        padding_mode=PADDING_MODE_CODES["zeros"],
        pixel_start=0,
        pixel_count=pixels,
    )

    def launch(kernel, total, **arrays):
        launch_kernel(launcher, kernel, dtype_name, bits, total, geom, sizes=sizes, **arrays)

    def rounded(acc_array, shape):
        return round_to_dtype(launcher, dtype_name, bits, acc_array, dtype).reshape(shape)

    out = {}
    if n == 0:  # nothing sampled: empty terms, and zeros for the weight's
        arrays = dict(grad_output=grad_output, weight=weight, mask=mask, offset=offset, input=input)
        for name in _RESULT_ORDER:
            array = arrays[name]
            if name in want and array is not None:
                out[name] = (
                    rounded(xp.zeros(array.shape, acc_dtype), array.shape)
                    if name == "weight"
                    else xp.empty(array.shape, dtype)
                )
        return out

    tf32 = is_tf32_allowed()
    weight_acc = widen_to_acc(launcher, dtype_name, bits, weight).reshape(groups, cout, rows)
    gy = widen_to_acc(launcher, dtype_name, bits, grad_output).reshape(n, groups, cout, pixels)

    if {"grad_output", "weight"} & want:
        columns = xp.empty((n, geom.column_rows, pixels), dtype=acc_dtype)
        launch(
            "deform_conv_second_order_columns",
            n * c * pixels,
            input=input,
            offset=offset,
            mask=mask,
            offset_tangent=offset_tangent,
            columns=columns,
        )
        grouped = columns.reshape(n, groups, rows, pixels)
        if "grad_output" in want:  # weight @ columns, per image and group
            product = xp.empty((n, groups, cout, pixels), dtype=acc_dtype)
            grouped_gemm(
                launcher, weight_acc, grouped, product, transpose_weight=False, beta=0.0, tf32=tf32
            )
            out["grad_output"] = rounded(product, grad_output.shape)
        if "weight" in want:  # sum over images of gy @ columns^T
            grad_weight = xp.empty((groups, cout, rows), dtype=acc_dtype)
            for i in range(n):
                launcher.gemm(
                    gy[i], grouped[i], grad_weight, transpose_b=True, beta=float(i > 0), tf32=tf32
                )
            out["weight"] = rounded(grad_weight, weight.shape)

    if not ({"input", "offset"} & want or want_mask):
        return out
    colgrad = xp.empty((n, groups, rows, pixels), dtype=acc_dtype)  # weight^T @ gy
    grouped_gemm(launcher, weight_acc, gy, colgrad, transpose_weight=True, beta=0.0, tf32=tf32)
    colgrad = colgrad.reshape(n, geom.column_rows, pixels)
    if "offset" in want or want_mask:
        grad_offset = xp.empty(offset.shape, dtype) if "offset" in want else None
        grad_mask = xp.empty(mask.shape, dtype) if want_mask else None
        launch(
            "deform_conv_second_order_coord",
            n * geom.offset_groups * k * pixels,
            grad_columns=colgrad,
            input=input,
            offset=offset,
            mask=mask,
            offset_tangent=offset_tangent,
            grad_offset=grad_offset,
            grad_mask=grad_mask,
        )
        if grad_offset is not None:
            out["offset"] = grad_offset
        if grad_mask is not None:
            out["mask"] = grad_mask
    if "input" in want:
        grad_input = xp.zeros(input.shape, dtype=acc_dtype)
        launch(
            "deform_conv_second_order_input",
            n * geom.column_rows * pixels,
            grad_columns=colgrad,
            offset=offset,
            mask=mask,
            offset_tangent=offset_tangent,
            grad_input=grad_input,
        )
        out["input"] = rounded(grad_input, input.shape)
    # In the NumPy version's order.
    return {name: out[name] for name in _RESULT_ORDER if name in out}
