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

The workspace bound. The buffers above are sized per chunk of whole images, as many as
fit in ``workspace_bytes`` (at least one). When one image's buffers exceed
``max(workspace_bytes, MIN_SLICE_BYTES)``, the images run one at a time, each split into
ranges of S output pixels (the kernels' ``pixel_start`` / ``pixel_count``), S as large as
fits that budget (:func:`slice_plan`), and per range::

    columns [1, C*K, S], output_slice [1, Co, S] = weight @ columns, copied (and for half
    types rounded) into output[b, :, range];
    backward: grad_output[b, :, range] copied (and widened) to [1, Co, S], grad_columns,
    col2im_input / col2im_coord over the range, grad_weight += grad_output_slice @ columns^T.

The output slice copy moves Co * S elements per range, once per output element in all
(against C*K*S column elements computed per range). With deterministic=True, a split
image's grad_input contributions are reduced per range into a buffer of one image
(C*H*W in the accumulation dtype, counted in the plan) and added to grad_input.

Peak extra memory of a call is then at most ``max(workspace_bytes, MIN_SLICE_BYTES)``
(the plan's ``workspace_peak_bytes``) plus ``WORKSPACE_CONSTANT``: what is allocated
besides the plan's buffers is the results (output; the gradients, with grad_input,
grad_weight and grad_bias in the accumulation dtype until rounded once), the weight and
bias widened for half types (and the copy of the transposed weight a GEMM library may
make: Co * C/groups * K accumulation elements), the deterministic sort's temporaries (a
copy of the keys and thrust's), and BLAS workspace; WORKSPACE_CONSTANT is the slack for
the small ones (allocator rounding, the per-range grad_bias sum). The bound needs one
range of one pixel to fit MIN_SLICE_BYTES (backward_costs: per_range + per_pixel, about
(2 + 36) * C*K + Co float32 elements per pixel in deterministic mode, plus Co * C/groups
* K and C*H*W per range); past that a range is one pixel.
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

# An image is split into ranges of output pixels only when its buffers exceed
# max(workspace_bytes, MIN_SLICE_BYTES), and then into ranges whose buffers fit that:
# smaller images always run whole (the common case, unchanged), and no launch is split
# finer than this many bytes of buffers.
MIN_SLICE_BYTES = 4 << 20
# Extra memory of a call: at most max(workspace_bytes, MIN_SLICE_BYTES) (the plan's
# workspace_peak_bytes) + WORKSPACE_CONSTANT besides the results, their accumulation-dtype
# versions and the widened weight and bias (module docstring): 1 MiB of slack for the
# allocator's rounding, the GEMMs' and the sort's temporaries.
WORKSPACE_CONSTANT = 1 << 20


def images_per_chunk(geom: ConvGeometry, bytes_per_image: int, workspace_bytes: int) -> int:
    """How many images' buffers fit in ``workspace_bytes`` (at least one, at most N)."""
    fitting = workspace_bytes // max(bytes_per_image, 1)
    return int(max(1, min(geom.batch, fitting)))


def index_bits_for(geom: ConvGeometry, chunk: int, pixels: int | None = None) -> int:
    """32 when every tensor and buffer a kernel indexes fits 32-bit grid-stride indexing
    (column buffers of ``chunk`` images of ``pixels`` output pixels, default all)."""
    all_pixels = geom.out_h * geom.out_w
    return index_bits_for_sizes(
        geom.batch * geom.in_channels * geom.height * geom.width,
        geom.batch * 2 * geom.offset_groups * geom.taps * all_pixels,
        geom.batch * geom.out_channels * all_pixels,
        chunk * geom.column_rows * (all_pixels if pixels is None else pixels),
    )


def slice_plan(pixels: int, bytes_per_pixel: int, fixed_bytes: int, workspace_bytes: int) -> int:
    """Output pixels per range of a split image: as many as fit ``max(workspace_bytes,
    MIN_SLICE_BYTES)`` with ``fixed_bytes`` per range besides ``bytes_per_pixel`` per
    pixel (at least 1, at most ``pixels``)."""
    budget = max(int(workspace_bytes), MIN_SLICE_BYTES)
    fitting = (budget - fixed_bytes) // max(bytes_per_pixel, 1)
    return int(max(1, min(pixels, fitting)))


class _Plan(NamedTuple):
    dtype_name: str
    acc_dtype: object  # xp dtype
    needs_widening: bool
    chunk: int  # images per chunk (1 when split)
    index_bits: int
    slice_pixels: int  # output pixels per launch: all of them, or a range when split
    workspace_peak_bytes: int  # the bytes of the buffers this plan sizes
    split: bool  # one image at a time, in ranges of slice_pixels output pixels


class _Costs(NamedTuple):
    """Buffer bytes of one image: whole (per image, as chunked), and split (per output
    pixel of a range, and per range)."""

    per_image: int
    per_pixel: int
    per_range: int


def _plan(
    launcher: KernelLauncher,
    dtype_name: str,
    geom: ConvGeometry,
    costs: _Costs,
    workspace_bytes: int,
    index_bits: int | None,
) -> _Plan:
    xp = launcher.xp
    info = DTYPES[dtype_name]
    acc_dtype = xp.dtype(info.acc_name)
    widening = info.acc_name != info.name
    pixels = geom.out_h * geom.out_w
    chunk = images_per_chunk(geom, costs.per_image, workspace_bytes)
    if chunk == 1 and costs.per_image > max(int(workspace_bytes), MIN_SLICE_BYTES):
        slice_pixels = slice_plan(pixels, costs.per_pixel, costs.per_range, workspace_bytes)
        bits = index_bits if index_bits is not None else index_bits_for(geom, 1, slice_pixels)
        return _Plan(
            dtype_name,
            acc_dtype,
            widening,
            1,
            bits,
            slice_pixels,
            costs.per_range + slice_pixels * costs.per_pixel,
            True,
        )
    bits = index_bits if index_bits is not None else index_bits_for(geom, chunk)
    return _Plan(
        dtype_name, acc_dtype, widening, chunk, bits, pixels, chunk * costs.per_image, False
    )


# Contributions of one column element to grad_input: the four corners of its sample.
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
_MAX_CONTRIBUTIONS = 4


def _sizes(
    geom: ConvGeometry, images: int, pixel_start: int = 0, pixel_count: int | None = None
) -> dict[str, int]:
    """The size overrides of a conv kernel over a chunk of ``images`` images and the
    output pixels [pixel_start, pixel_start + pixel_count) (default: all)."""
    return dict(
        batch=images,
        channels=geom.in_channels,
        padding_mode=PADDING_MODE_CODES[geom.padding_mode],
        pixel_start=pixel_start,
        pixel_count=geom.out_h * geom.out_w if pixel_count is None else pixel_count,
    )


def _launch(
    launcher: KernelLauncher,
    plan: _Plan,
    geom: ConvGeometry,
    kernel: str,
    images: int,
    total: int,
    pixels: tuple[int, int] | None = None,
    **arrays,
) -> None:
    """One conv kernel over ``total`` items of a chunk of ``images`` images (and the
    output pixel range ``pixels`` = (start, count), default all): ``arrays`` by
    parameter name; the sizes are the geometry's (padding_mode as its code, a runtime
    argument of the index type, PADDING_* in cupydcn/cuda/kernels/padding_modes.cuh)."""
    launch_kernel(
        launcher,
        kernel,
        plan.dtype_name,
        plan.index_bits,
        total,
        geom,
        sizes=_sizes(geom, images, *(pixels or ())),
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
    pixels: tuple[int, int] | None = None,
):
    """The columns of images [start, stop) (of the output pixel range ``pixels``, default
    all) in ``columns[:stop - start]``, returned."""
    n = stop - start
    count = geom.out_h * geom.out_w if pixels is None else pixels[1]
    _launch(
        launcher,
        plan,
        geom,
        "deform_conv_im2col",
        n,
        n * geom.in_channels * count,
        pixels,
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


def _ranges(pixels: int, slice_pixels: int):
    """(start, count) of each output pixel range of a split image."""
    for first in range(0, pixels, slice_pixels):
        yield first, min(slice_pixels, pixels - first)


def forward_costs(geom: ConvGeometry, dtype_name: str) -> _Costs:
    """The forward's buffer bytes (see :class:`_Costs`)."""
    info = DTYPES[dtype_name]
    acc = _ITEMSIZE[info.acc_name]
    widening = info.acc_name != info.name
    pixels = geom.out_h * geom.out_w
    per_image = (geom.column_rows * pixels + (geom.out_channels * pixels if widening else 0)) * acc
    # a range: its columns, its output in acc (and rounded, for half types)
    per_pixel = (geom.column_rows + geom.out_channels) * acc + (
        geom.out_channels * _ITEMSIZE[info.name] if widening else 0
    )
    return _Costs(per_image, per_pixel, 0)


def forward_plan(
    launcher: KernelLauncher,
    geom: ConvGeometry,
    *,
    workspace_bytes: int,
    dtype_name: str | None = None,
    index_bits: int | None = None,
) -> _Plan:
    """How :func:`conv_forward` chunks (and splits) the work of ``geom``."""
    dtype_name = dtype_name or geom.dtype_name
    return _plan(
        launcher,
        dtype_name,
        geom,
        forward_costs(geom, dtype_name),
        workspace_bytes,
        index_bits,
    )


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
    plan = forward_plan(
        launcher,
        geom,
        workspace_bytes=workspace_bytes,
        dtype_name=dtype_name,
        index_bits=index_bits,
    )
    groups = geom.groups
    out_per_group = geom.out_channels // groups
    rows_per_group = geom.column_rows // groups

    weight_acc = _widen(launcher, plan, weight).reshape(1, groups, out_per_group, rows_per_group)
    bias_acc = (
        None if bias is None else _widen(launcher, plan, bias).reshape(1, groups, out_per_group, 1)
    )
    if plan.split:
        _forward_split(launcher, plan, geom, input, offset, mask, weight_acc, bias_acc, output)
        return output
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


def _front(buffer, *shape):
    """The first elements of a contiguous ``buffer`` as a contiguous array of ``shape``
    (the ragged last range of a split image uses the front of the range buffers)."""
    size = 1
    for extent in shape:
        size *= extent
    return buffer.reshape(-1)[:size].reshape(shape)


def _forward_split(launcher, plan, geom, input, offset, mask, weight_acc, bias_acc, output):
    """The forward one image at a time, in ranges of plan.slice_pixels output pixels."""
    xp = launcher.xp
    pixels = geom.out_h * geom.out_w
    groups = geom.groups
    out_per_group = geom.out_channels // groups
    rows_per_group = geom.column_rows // groups
    width = plan.slice_pixels
    columns = xp.empty((geom.column_rows * width,), dtype=plan.acc_dtype)
    slice_acc = xp.empty((geom.out_channels * width,), dtype=plan.acc_dtype)
    slice_rounded = (
        xp.empty((geom.out_channels * width,), dtype=output.dtype) if plan.needs_widening else None
    )
    flat_output = output.reshape(geom.batch, geom.out_channels, pixels)
    for b in range(geom.batch):
        for first, count in _ranges(pixels, width):
            cols = _im2col(
                launcher,
                plan,
                geom,
                input,
                offset,
                mask,
                _front(columns, 1, geom.column_rows, count),
                b,
                b + 1,
                (first, count),
            )
            target = _front(slice_acc, 1, groups, out_per_group, count)
            xp.matmul(weight_acc, cols.reshape(1, groups, rows_per_group, count), out=target)
            if bias_acc is not None:
                target += bias_acc
            target = target.reshape(geom.out_channels, count)
            if slice_rounded is not None:
                rounded = _front(slice_rounded, geom.out_channels, count)
                launcher.launch(
                    "round_to_output",
                    plan.dtype_name,
                    plan.index_bits,
                    target.size,
                    kernel_arguments(
                        "round_to_output", input=target, output=rounded, total=target.size
                    ),
                )
                target = rounded
            flat_output[b, :, first : first + count] = target


def backward_costs(
    geom: ConvGeometry, dtype_name: str, wrt: frozenset[str], deterministic: bool
) -> _Costs:
    """The backward's buffer bytes (see :class:`_Costs`) for the gradients ``wrt``."""
    info = DTYPES[dtype_name]
    acc = _ITEMSIZE[info.acc_name]
    widening = info.acc_name != info.name
    want_input = "input" in wrt
    want_columns_grad = want_input or "offset" in wrt or ("mask" in wrt and geom.has_mask)
    want_weight = "weight" in wrt
    pixels = geom.out_h * geom.out_w
    rows_per_group = geom.column_rows // geom.groups
    column_buffers = int(want_columns_grad) + int(want_weight)
    slot_elements = 0
    if deterministic and want_input:
        # Slots of the deterministic scatter, at most 4 per column element, sized for
        # 64-bit indices (an upper bound), in units of the accumulation dtype.
        slot_bytes = bytes_per_item(64) + _MAX_CONTRIBUTIONS * bytes_per_contribution(64, acc)
        slot_elements = -(-slot_bytes // acc)
    per_image = (
        geom.column_rows * pixels * column_buffers
        + (geom.out_channels * pixels if widening else 0)
        + (geom.out_channels * rows_per_group if want_weight else 0)
        + geom.column_rows * pixels * slot_elements
    ) * acc
    # a range: its columns, grad_columns and slots, its grad_output copied (in acc, and in
    # the element type first for half types); per range the grad_weight product and, for
    # the deterministic grad_input, one image's reduction buffer
    per_pixel = (geom.column_rows * (column_buffers + slot_elements) + geom.out_channels) * acc + (
        geom.out_channels * _ITEMSIZE[info.name] if widening else 0
    )
    per_range = (geom.out_channels * rows_per_group if want_weight else 0) * acc + (
        geom.in_channels * geom.height * geom.width * acc if deterministic and want_input else 0
    )
    return _Costs(per_image, per_pixel, per_range)


def backward_plan(
    launcher: KernelLauncher,
    geom: ConvGeometry,
    *,
    wrt: frozenset[str],
    workspace_bytes: int,
    dtype_name: str | None = None,
    index_bits: int | None = None,
    deterministic: bool = False,
) -> _Plan:
    """How :func:`conv_backward` chunks (and splits) the work of ``geom``."""
    dtype_name = dtype_name or geom.dtype_name
    return _plan(
        launcher,
        dtype_name,
        geom,
        backward_costs(geom, dtype_name, frozenset(wrt), deterministic),
        workspace_bytes,
        index_bits,
    )


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
    plan = backward_plan(
        launcher,
        geom,
        wrt=wrt,
        workspace_bytes=workspace_bytes,
        dtype_name=dtype_name,
        index_bits=index_bits,
        deterministic=deterministic,
    )

    grad_input_acc = xp.zeros(geom.input_shape, dtype=plan.acc_dtype) if want_input else None
    grad_offset = xp.empty(geom.offset_shape, dtype=dtype) if want_offset else None
    grad_mask = xp.empty(geom.mask_shape, dtype=dtype) if want_mask else None
    grad_weight_acc = (
        xp.zeros((groups, out_per_group, rows_per_group), dtype=plan.acc_dtype)
        if want_weight
        else None
    )
    grad_bias_acc = xp.zeros((geom.out_channels,), dtype=plan.acc_dtype) if want_bias else None

    work = geom.batch > 0 and (want_columns_grad or want_weight or want_bias)
    if work:
        weight_acc = _widen(launcher, plan, weight).reshape(groups, out_per_group, rows_per_group)
        weight_t = xp.swapaxes(weight_acc, 1, 2)[None]  # [1, groups, Cg*K, Co/g]
    if work and plan.split:
        _backward_split(
            launcher,
            plan,
            geom,
            grad_output,
            input,
            offset,
            mask,
            weight_t,
            want=(want_input, want_offset, want_mask, want_weight, want_bias),
            deterministic=deterministic,
            grads=(grad_input_acc, grad_offset, grad_mask, grad_weight_acc, grad_bias_acc),
        )
    elif work:
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


def _backward_split(
    launcher, plan, geom, grad_output, input, offset, mask, weight_t, *, want, deterministic, grads
):
    """The backward one image at a time, in ranges of plan.slice_pixels output pixels;
    ``grads`` (the accumulation buffers of conv_backward) are accumulated over them."""
    xp = launcher.xp
    want_input, want_offset, want_mask, want_weight, want_bias = want
    grad_input_acc, grad_offset, grad_mask, grad_weight_acc, grad_bias_acc = grads
    want_columns_grad = want_input or want_offset or want_mask
    pixels = geom.out_h * geom.out_w
    groups = geom.groups
    out_per_group = geom.out_channels // groups
    rows_per_group = geom.column_rows // groups
    width = plan.slice_pixels
    flat_grad_output = grad_output.reshape(geom.batch, geom.out_channels, pixels)
    go_acc = xp.empty((geom.out_channels * width,), dtype=plan.acc_dtype)
    go_copy = (
        xp.empty((geom.out_channels * width,), dtype=grad_output.dtype)
        if plan.needs_widening
        else None
    )
    grad_columns = (
        xp.empty((geom.column_rows * width,), dtype=plan.acc_dtype) if want_columns_grad else None
    )
    columns = xp.empty((geom.column_rows * width,), dtype=plan.acc_dtype) if want_weight else None
    image_grad_input = (
        xp.empty((1, *geom.input_shape[1:]), dtype=plan.acc_dtype)
        if want_input and deterministic
        else None
    )
    for b in range(geom.batch):
        chunk_mask = None if mask is None else mask[b : b + 1]
        for first, count in _ranges(pixels, width):
            pixel_range = (first, count)
            view = flat_grad_output[b, :, first : first + count]
            if go_copy is None:
                go = _front(go_acc, geom.out_channels, count)
                go[...] = view
            else:
                copied = _front(go_copy, geom.out_channels, count)
                copied[...] = view
                go = _widen(launcher, plan, copied, out=_front(go_acc, geom.out_channels, count))
            go_grouped = go.reshape(1, groups, out_per_group, count)
            if want_bias:
                grad_bias_acc += go.sum(axis=1)
            if want_columns_grad:
                chunk_grad_columns = _front(grad_columns, 1, geom.column_rows, count)
                xp.matmul(
                    weight_t,
                    go_grouped,
                    out=chunk_grad_columns.reshape(1, groups, rows_per_group, count),
                )
                if want_input and deterministic:
                    deterministic_scatter(
                        launcher,
                        "deform_conv_col2im_input_slots",
                        plan.dtype_name,
                        plan.index_bits,
                        geom.column_rows * count,
                        geom,
                        image_grad_input,
                        sizes=_sizes(geom, 1, first, count),
                        grad_columns=chunk_grad_columns,
                        offset=offset[b : b + 1],
                        mask=chunk_mask,
                    )
                    grad_input_acc[b : b + 1] += image_grad_input
                elif want_input:
                    _launch(
                        launcher,
                        plan,
                        geom,
                        "deform_conv_col2im_input",
                        1,
                        geom.column_rows * count,
                        pixel_range,
                        grad_columns=chunk_grad_columns,
                        offset=offset[b : b + 1],
                        mask=chunk_mask,
                        grad_input=grad_input_acc[b : b + 1],
                    )
                if want_offset or want_mask:
                    _launch(
                        launcher,
                        plan,
                        geom,
                        "deform_conv_col2im_coord",
                        1,
                        geom.offset_groups * geom.taps * count,
                        pixel_range,
                        grad_columns=chunk_grad_columns,
                        input=input[b : b + 1],
                        offset=offset[b : b + 1],
                        mask=chunk_mask,
                        grad_offset=None if grad_offset is None else grad_offset[b : b + 1],
                        grad_mask=None if grad_mask is None else grad_mask[b : b + 1],
                    )
            if want_weight:
                cols = _im2col(
                    launcher,
                    plan,
                    geom,
                    input,
                    offset,
                    mask,
                    _front(columns, 1, geom.column_rows, count),
                    b,
                    b + 1,
                    pixel_range,
                )
                grad_weight_acc += xp.matmul(
                    go_grouped,
                    xp.swapaxes(cols.reshape(1, groups, rows_per_group, count), 2, 3),
                )[0]
