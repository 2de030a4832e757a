"""deform_conv2d on the CUDA kernels: buffers, batch chunking, GEMMs and launches.

Written once against a :class:`~cupydcn.cuda.launch.KernelLauncher`: on a GPU with CuPy, in
the tests with the CPU harness that runs the same kernels on the host (``xp`` = NumPy).

Forward, per chunk of ``n`` images::

    columns [n, C*K, P]  <- deform_conv_im2col(input, offset, mask)         (acc dtype)
    output  [n, groups, Co/g, P] = weight [groups, Co/g, Cg*K] @ columns     (batched GEMM)

Backward, per chunk::

    grad_columns [n, groups, Cg*K, P] = weight^T @ grad_output
    grad_input  += deform_conv_col2im_input(grad_columns)                     (atomics)
                   or, with deterministic=True, deform_conv_col2im_input_slots twice, a
                   stable sort and segment_sum (cupydcn.cuda.deterministic: no atomics,
                   bitwise reproducible; 2 more kernel launches per chunk, a prefix sum,
                   a sort, two gathers and one synchronising read, and per column element
                   up to 12 + 4 * (2 * (I + A) + 8) bytes, counted in the workspace)
    grad_offset, grad_mask = deform_conv_col2im_coord(grad_columns, input)
    grad_weight += sum_n grad_output @ columns^T                              (columns recomputed)

Half types (float16, bfloat16) are widened to float32 for the GEMMs and every result is
rounded once; column buffers are in the accumulation dtype.
"""

from __future__ import annotations

from typing import NamedTuple

from cupydcn.core.dtypes import DTYPES
from cupydcn.cuda.deterministic import (
    bytes_per_contribution,
    bytes_per_item,
    deterministic_scatter,
)
from cupydcn.cuda.launch import (
    KernelLauncher,
    contiguous,
    index_bits_for_sizes,
    kernel_arguments,
    launch_kernel,
    round_to_dtype,
    widen_to_acc,
)
from cupydcn.deform_conv.padding import PADDING_MODE_CODES
from cupydcn.deform_conv.spec import ConvGeometry, ConvGrads


def images_per_chunk(geom: ConvGeometry, bytes_per_image: int, workspace_bytes: int) -> int:
    """How many images' buffers fit in ``workspace_bytes`` (at least one, at most N)."""
    fitting = workspace_bytes // max(bytes_per_image, 1)
    return int(max(1, min(geom.batch, fitting)))


def index_bits_for(geom: ConvGeometry, chunk: int) -> int:
    """32 when every tensor and buffer a kernel indexes fits 32-bit grid-stride indexing."""
    return index_bits_for_sizes(
        geom.batch * geom.in_channels * geom.height * geom.width,
        geom.batch * 2 * geom.offset_groups * geom.taps * geom.out_h * geom.out_w,
        geom.batch * geom.out_channels * geom.out_h * geom.out_w,
        chunk * geom.column_rows * geom.out_h * geom.out_w,
    )


class _Plan(NamedTuple):
    dtype_name: str
    acc_dtype: object  # xp dtype
    needs_widening: bool
    chunk: int
    index_bits: int


def _plan(
    launcher: KernelLauncher,
    dtype_name: str,
    geom: ConvGeometry,
    per_image_elements: int,
    workspace_bytes: int,
    index_bits: int | None,
) -> _Plan:
    xp = launcher.xp
    info = DTYPES[dtype_name]
    acc_dtype = xp.dtype(info.acc_name)
    chunk = images_per_chunk(geom, per_image_elements * acc_dtype.itemsize, workspace_bytes)
    bits = index_bits if index_bits is not None else index_bits_for(geom, chunk)
    return _Plan(dtype_name, acc_dtype, info.acc_name != info.name, chunk, bits)


# Contributions of one column element to grad_input: the four corners of its sample.
_MAX_CONTRIBUTIONS = 4


def _sizes(geom: ConvGeometry, images: int) -> dict[str, int]:
    """The size overrides of a conv kernel over a chunk of ``images`` images."""
    return dict(
        batch=images,
        channels=geom.in_channels,
        padding_mode=PADDING_MODE_CODES[geom.padding_mode],
    )


def _launch(
    launcher: KernelLauncher,
    plan: _Plan,
    geom: ConvGeometry,
    kernel: str,
    images: int,
    total: int,
    **arrays,
) -> None:
    """One conv kernel over ``total`` items of a chunk of ``images`` images: ``arrays`` by
    parameter name; the sizes are the geometry's (padding_mode as its code, a runtime
    argument of the index type, PADDING_* in cupydcn/cuda/kernels/padding_modes.cuh)."""
    launch_kernel(
        launcher,
        kernel,
        plan.dtype_name,
        plan.index_bits,
        total,
        geom,
        sizes=_sizes(geom, images),
        **arrays,
    )


def _im2col(
    launcher: KernelLauncher,
    plan: _Plan,
    geom: ConvGeometry,
    input,
    offset,
    mask,
    columns,
    start: int,
    stop: int,
):
    """The columns of images [start, stop) in ``columns[:stop - start]``, returned."""
    n = stop - start
    _launch(
        launcher,
        plan,
        geom,
        "deform_conv_im2col",
        n,
        n * geom.in_channels * geom.out_h * geom.out_w,
        input=input[start:stop],
        offset=offset[start:stop],
        mask=None if mask is None else mask[start:stop],
        columns=columns[:n],
    )
    return columns[:n]


def _widen(launcher: KernelLauncher, plan: _Plan, array, out=None):
    return widen_to_acc(launcher, plan.dtype_name, plan.index_bits, array, out)


def _round(launcher: KernelLauncher, plan: _Plan, acc_array, dtype):
    return round_to_dtype(launcher, plan.dtype_name, plan.index_bits, acc_array, dtype)


def conv_forward(
    launcher: KernelLauncher,
    input,
    offset,
    weight,
    bias,
    mask,
    geom: ConvGeometry,
    *,
    workspace_bytes: int,
    dtype_name: str | None = None,
    index_bits: int | None = None,
):
    """Output [N, C_out, H_out, W_out] of deform_conv2d (arrays of ``launcher.xp``).
    ``dtype_name`` defaults to the geometry's; ``index_bits`` forces an index width."""
    dtype_name = dtype_name or geom.dtype_name
    xp = launcher.xp
    input, offset, weight, bias, mask = (
        contiguous(xp, a) for a in (input, offset, weight, bias, mask)
    )
    output = xp.empty(geom.output_shape, dtype=input.dtype)
    if geom.batch == 0:
        return output

    pixels = geom.out_h * geom.out_w
    per_image = geom.column_rows * pixels
    plan = _plan(
        launcher,
        dtype_name,
        geom,
        per_image
        + (geom.out_channels * pixels if DTYPES[dtype_name].acc_name != dtype_name else 0),
        workspace_bytes,
        index_bits,
    )
    groups = geom.groups
    out_per_group = geom.out_channels // groups
    rows_per_group = geom.column_rows // groups

    weight_acc = _widen(launcher, plan, weight).reshape(1, groups, out_per_group, rows_per_group)
    bias_acc = (
        None if bias is None else _widen(launcher, plan, bias).reshape(1, groups, out_per_group, 1)
    )
    columns = xp.empty((plan.chunk, geom.column_rows, pixels), dtype=plan.acc_dtype)
    chunk_output_acc = (
        xp.empty((plan.chunk, geom.out_channels, pixels), dtype=plan.acc_dtype)
        if plan.needs_widening
        else None
    )

    for start in range(0, geom.batch, plan.chunk):
        stop = min(start + plan.chunk, geom.batch)
        n = stop - start
        chunk_columns = _im2col(launcher, plan, geom, input, offset, mask, columns, start, stop)
        target = output[start:stop] if chunk_output_acc is None else chunk_output_acc[:n]
        target = target.reshape(n, groups, out_per_group, pixels)
        xp.matmul(weight_acc, chunk_columns.reshape(n, groups, rows_per_group, pixels), out=target)
        if bias_acc is not None:
            target += bias_acc
        if chunk_output_acc is not None:
            launcher.launch(
                "round_to_output",
                dtype_name,
                plan.index_bits,
                target.size,
                kernel_arguments(
                    "round_to_output", input=target, output=output[start:stop], total=target.size
                ),
            )
    return output


def conv_backward(
    launcher: KernelLauncher,
    grad_output,
    input,
    offset,
    weight,
    mask,
    geom: ConvGeometry,
    *,
    wrt: frozenset[str],
    workspace_bytes: int,
    dtype_name: str | None = None,
    index_bits: int | None = None,
    deterministic: bool = False,
) -> ConvGrads:
    """Gradients of deform_conv2d for the names in ``wrt`` (see :class:`ConvGrads`).
    ``deterministic``: grad_input without floating-point atomics, bitwise reproducible
    (:mod:`cupydcn.cuda.deterministic`; its buffers count against ``workspace_bytes``)."""
    dtype_name = dtype_name or geom.dtype_name
    xp = launcher.xp
    grad_output, input, offset, weight, mask = (
        contiguous(xp, a) for a in (grad_output, input, offset, weight, mask)
    )
    want_input = "input" in wrt
    want_offset = "offset" in wrt
    want_mask = "mask" in wrt and mask is not None
    want_weight = "weight" in wrt
    want_bias = "bias" in wrt
    want_columns_grad = want_input or want_offset or want_mask

    dtype = input.dtype
    pixels = geom.out_h * geom.out_w
    groups = geom.groups
    out_per_group = geom.out_channels // groups
    rows_per_group = geom.column_rows // groups
    widening = DTYPES[dtype_name].acc_name != dtype_name
    per_image = (
        geom.column_rows * pixels * (int(want_columns_grad) + int(want_weight))
        + (geom.out_channels * pixels if widening else 0)
        + (geom.out_channels * rows_per_group if want_weight else 0)
    )
    if deterministic and want_input:
        # Slots of the deterministic scatter, at most 4 per column element, sized for
        # 64-bit indices (an upper bound), in units of the accumulation dtype.
        acc_size = xp.dtype(DTYPES[dtype_name].acc_name).itemsize
        slot_bytes = bytes_per_item(64) + _MAX_CONTRIBUTIONS * bytes_per_contribution(
            64, acc_size
        )
        per_image += geom.column_rows * pixels * -(-slot_bytes // acc_size)
    plan = _plan(launcher, dtype_name, geom, per_image, workspace_bytes, index_bits)

    grad_input_acc = xp.zeros(geom.input_shape, dtype=plan.acc_dtype) if want_input else None
    grad_offset = xp.empty(geom.offset_shape, dtype=dtype) if want_offset else None
    grad_mask = xp.empty(geom.mask_shape, dtype=dtype) if want_mask else None
    grad_weight_acc = (
        xp.zeros((groups, out_per_group, rows_per_group), dtype=plan.acc_dtype)
        if want_weight
        else None
    )
    grad_bias_acc = xp.zeros((geom.out_channels,), dtype=plan.acc_dtype) if want_bias else None

    if geom.batch > 0 and (want_columns_grad or want_weight or want_bias):
        weight_acc = _widen(launcher, plan, weight).reshape(groups, out_per_group, rows_per_group)
        weight_t = xp.swapaxes(weight_acc, 1, 2)[None]  # [1, groups, Cg*K, Co/g]
        grad_columns = (
            xp.empty((plan.chunk, geom.column_rows, pixels), dtype=plan.acc_dtype)
            if want_columns_grad
            else None
        )
        columns = (
            xp.empty((plan.chunk, geom.column_rows, pixels), dtype=plan.acc_dtype)
            if want_weight
            else None
        )
        grad_output_acc = (
            xp.empty((plan.chunk, geom.out_channels, pixels), dtype=plan.acc_dtype)
            if widening
            else None
        )
        for start in range(0, geom.batch, plan.chunk):
            stop = min(start + plan.chunk, geom.batch)
            n = stop - start
            chunk_mask = None if mask is None else mask[start:stop]
            go = grad_output[start:stop].reshape(n, geom.out_channels, pixels)
            if grad_output_acc is not None:
                go = _widen(launcher, plan, go, out=grad_output_acc[:n])
            go_grouped = go.reshape(n, groups, out_per_group, pixels)
            if want_bias:
                grad_bias_acc += go.sum(axis=(0, 2))
            if want_columns_grad:
                chunk_grad_columns = grad_columns[:n]
                xp.matmul(
                    weight_t,
                    go_grouped,
                    out=chunk_grad_columns.reshape(n, groups, rows_per_group, pixels),
                )
                if want_input and deterministic:
                    deterministic_scatter(
                        launcher,
                        "deform_conv_col2im_input_slots",
                        plan.dtype_name,
                        plan.index_bits,
                        n * geom.column_rows * pixels,
                        geom,
                        grad_input_acc[start:stop],
                        sizes=_sizes(geom, n),
                        grad_columns=chunk_grad_columns,
                        offset=offset[start:stop],
                        mask=chunk_mask,
                    )
                elif want_input:
                    _launch(
                        launcher,
                        plan,
                        geom,
                        "deform_conv_col2im_input",
                        n,
                        n * geom.column_rows * pixels,
                        grad_columns=chunk_grad_columns,
                        offset=offset[start:stop],
                        mask=chunk_mask,
                        grad_input=grad_input_acc[start:stop],
                    )
                if want_offset or want_mask:
                    _launch(
                        launcher,
                        plan,
                        geom,
                        "deform_conv_col2im_coord",
                        n,
                        n * geom.offset_groups * geom.taps * pixels,
                        grad_columns=chunk_grad_columns,
                        input=input[start:stop],
                        offset=offset[start:stop],
                        mask=chunk_mask,
                        grad_offset=None if grad_offset is None else grad_offset[start:stop],
                        grad_mask=None if grad_mask is None else grad_mask[start:stop],
                    )
            if want_weight:
                chunk_columns = _im2col(
                    launcher, plan, geom, input, offset, mask, columns, start, stop
                )
                per_image_grad = xp.matmul(
                    go_grouped,
                    xp.swapaxes(chunk_columns.reshape(n, groups, rows_per_group, pixels), 2, 3),
                )
                grad_weight_acc += per_image_grad.sum(axis=0)

    return ConvGrads(
        grad_input=None
        if grad_input_acc is None
        else _round(launcher, plan, grad_input_acc, dtype),
        grad_offset=grad_offset,
        grad_weight=None
        if grad_weight_acc is None
        else _round(launcher, plan, grad_weight_acc, dtype).reshape(geom.weight_shape),
        grad_mask=grad_mask,
        grad_bias=None if grad_bias_acc is None else _round(launcher, plan, grad_bias_acc, dtype),
    )
