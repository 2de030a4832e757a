"""deform_conv2d on the CUDA kernels: buffers, batch chunking, GEMMs and launches.

Written once against a :class:`~cupydcn.cuda.launch.KernelLauncher`: on a GPU with CuPy
(kernels by NVRTC, GEMMs by cuBLAS), in the tests with the CPU harness that runs the same
kernels on the host and the GEMMs with NumPy (``xp`` = NumPy).

Forward, per chunk of ``n`` images (E = element dtype, A = accumulation dtype)::

    columns [n, C*K, P]  E  <- deform_conv_im2col(input, offset, mask)
    output  [n, groups, Co/g, P] E = weight [groups, Co/g, Cg*K] E @ columns
                                   (+ bias: the output is filled with it, then beta = 1)

Backward, per chunk::

    grad_columns [n, groups, Cg*K, P] A = weight^T @ grad_output     (transpose flag, no copy)
    grad_input  += deform_conv_col2im_input(grad_columns)            (A accumulator)
                   or, with deterministic=True, deform_conv_col2im_input_slots twice, a
                   stable sort and segment_sum (cupydcn.cuda.deterministic: no atomics,
                   bitwise reproducible; 2 more kernel launches per chunk, a prefix sum,
                   a sort, two gathers and one synchronising read, and per column element
                   up to 12 + 4 * (2 * (I + A) + 8) bytes, counted in the workspace)
    grad_offset, grad_mask = deform_conv_col2im_coord(grad_columns, input)
    grad_weight += grad_output[i] @ columns[i]^T for each image i     (columns recomputed;
                   beta = 1 into one A accumulator, transpose flag, no copy)
    grad_bias    = sum of grad_output over images and pixels           (one A reduction)

The GEMMs are :meth:`KernelLauncher.gemm` calls (cuBLAS strided-batched, float32 compute
for half types so float16 / bfloat16 run on tensor cores; TF32 for float32 only with
:func:`cupydcn.set_allow_tf32`). Their operands are the arrays themselves: the weight and
grad_output in the element dtype, the columns in the dtype
:func:`~cupydcn.deform_conv.cuda_kernels.column_dtype` gives (the element dtype: for half
types each column value is computed in float32 and rounded once, docs/semantics.md
§6.1). A group's products are one batched call over the chunk's images, and groups > 1
take min(images, groups) calls (one per image batched over the groups, or one per group
batched over the images). Results accumulated in A (grad_input, grad_weight, grad_bias)
are rounded once at the end.

A depthwise / many-groups convolution (:func:`~cupydcn.deform_conv.depthwise_cuda.depthwise_applies`)
takes the direct kernels of :mod:`cupydcn.deform_conv.depthwise_cuda` instead: no column
buffer, no GEMM (its deterministic backward stays on this path).

The workspace bound. The buffers above are sized per chunk of whole images, as many as
fit in ``workspace_bytes`` (at least one). When one image's buffers exceed
``max(workspace_bytes, MIN_SLICE_BYTES)``, the images run one at a time, each split into
ranges of S output pixels (the kernels' ``pixel_start`` / ``pixel_count``), S as large as
fits that budget (:func:`slice_plan`), and per range::

    columns [1, C*K, S]; output[b, :, range] = weight @ columns written in place (the
    GEMM's leading dimension is the image's row of P pixels: no copy);
    backward: grad_columns = weight^T @ grad_output[b, :, range] (read in place),
    col2im_input / col2im_coord over the range, grad_weight += grad_output[b, :, range]
    @ columns^T.

With deterministic=True, a split image's grad_input contributions are reduced per range
into a buffer of one image (C*H*W in A, counted in the plan) and added to grad_input.

Peak extra memory of a call is then at most ``max(workspace_bytes, MIN_SLICE_BYTES)``
(the plan's ``workspace_peak_bytes``) plus ``WORKSPACE_CONSTANT``: what is allocated
besides the plan's buffers is the results (output; the gradients, with grad_input,
grad_weight and grad_bias in A until rounded once), the deterministic sort's temporaries
(a copy of the keys and thrust's), and cuBLAS's own workspace; WORKSPACE_CONSTANT is the
slack for the small ones (allocator rounding). The bound needs one range of one pixel to
fit MIN_SLICE_BYTES (backward_costs: per_range + per_pixel, about (1 + 36) * C*K A
elements per pixel in deterministic mode, plus C*H*W per range); past that a range is
one pixel.

What a call launched, ran and allocated is reported to
:func:`cupydcn.cuda.launch.record_calls` (kernel launches, array operations, GEMMs,
workspace buffers): the tests pin these per shape.
"""

from __future__ import annotations

from typing import NamedTuple

from cupydcn.core.dtypes import DTYPES
from cupydcn.core.errors import CupydcnValueError
from cupydcn.cuda.deterministic import (
    bytes_per_contribution,
    bytes_per_item,
    deterministic_scatter,
)
from cupydcn.cuda.launch import (
    KernelLauncher,
    KernelTypes,
    contiguous,
    index_bits_for_sizes,
    kernel_types,
    report_array_operation,
    round_to_dtype,
    workspace_empty,
)
from cupydcn.cuda.tf32 import is_tf32_allowed
from cupydcn.deform_conv import (
    autotune,
    cuda_kernels,
    depthwise_cuda,
    fused_backward_cuda,
    fused_cuda,
)
from cupydcn.deform_conv.algorithm import check_algorithm, current_conv_algorithm
from cupydcn.deform_conv.spec import ConvGeometry, ConvGrads

# An image is split into ranges of output pixels only when its buffers exceed
# max(workspace_bytes, MIN_SLICE_BYTES), and then into ranges whose buffers fit that:
# smaller images always run whole (the common case), and no launch is split finer than
# this many bytes of buffers.
MIN_SLICE_BYTES = 4 << 20
# Extra memory of a call besides the plan's workspace_peak_bytes and the results (module
# docstring): 1 MiB of slack for the allocator's rounding and the sort's temporaries.
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
    column_dtype: object  # xp dtype of the columns (the GEMM operand)
    chunk: int  # images per chunk (1 when split)
    index_bits: int
    slice_pixels: int  # output pixels per launch: all of them, or a range when split
    workspace_peak_bytes: int  # the bytes of the buffers this plan sizes
    split: bool  # one image at a time, in ranges of slice_pixels output pixels

    @property
    def types(self) -> KernelTypes:
        return KernelTypes(self.dtype_name, self.acc_dtype, self.index_bits)


class _Costs(NamedTuple):
    """Buffer bytes of one image: whole (per image, as chunked), and split (per output
    pixel of a range, and per range)."""

    per_image: int
    per_pixel: int
    per_range: int


_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
# Contributions of one column element to grad_input: the four corners of its sample.
_MAX_CONTRIBUTIONS = 4


def _plan(
    launcher: KernelLauncher,
    dtype_name: str,
    geom: ConvGeometry,
    costs: _Costs,
    workspace_bytes: int,
    index_bits: int | None,
) -> _Plan:
    xp = launcher.xp
    acc_dtype = xp.dtype(DTYPES[dtype_name].acc_name)
    column_dtype = xp.dtype(
        cuda_kernels.column_dtype(launcher, KernelTypes(dtype_name, acc_dtype, 32))
    )
    pixels = geom.out_h * geom.out_w
    chunk = images_per_chunk(geom, costs.per_image, workspace_bytes)
    if chunk == 1 and costs.per_image > max(int(workspace_bytes), MIN_SLICE_BYTES):
        slice_pixels = slice_plan(pixels, costs.per_pixel, costs.per_range, workspace_bytes)
        bits = index_bits if index_bits is not None else index_bits_for(geom, 1, slice_pixels)
        peak = costs.per_range + slice_pixels * costs.per_pixel
        return _Plan(dtype_name, acc_dtype, column_dtype, 1, bits, slice_pixels, peak, True)
    bits = index_bits if index_bits is not None else index_bits_for(geom, chunk)
    peak = chunk * costs.per_image
    return _Plan(dtype_name, acc_dtype, column_dtype, chunk, bits, pixels, peak, False)


def forward_costs(geom: ConvGeometry, dtype_name: str) -> _Costs:
    """The forward's buffer bytes (see :class:`_Costs`): the columns, in the element
    dtype (the output is written in place by the GEMM)."""
    column = _ITEMSIZE[dtype_name]
    pixels = geom.out_h * geom.out_w
    return _Costs(geom.column_rows * pixels * column, geom.column_rows * column, 0)


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
    costs = forward_costs(geom, dtype_name)
    return _plan(launcher, dtype_name, geom, costs, workspace_bytes, index_bits)


def _fill_bias(launcher: KernelLauncher, target, bias, groups: int) -> None:
    """target [n, groups, Co/g, S] (a view) = bias broadcast over images and pixels."""
    target[...] = bias.reshape(1, groups, -1, 1)
    report_array_operation("fill_bias")


def grouped_gemm(
    launcher: KernelLauncher,
    weight,
    operand,
    out,
    *,
    transpose_weight: bool,
    beta: float,
    tf32: bool,
) -> None:
    """out[i, g] = op(weight[g]) @ operand[i, g] for every image i and group g:
    weight [groups, X, Y], operand [n, groups, r, S] and out [n, groups, r', S] (views
    with C-contiguous matrices, rows of any stride). min(n, groups) GEMM calls."""
    xp = launcher.xp
    n, groups = operand.shape[0], operand.shape[1]
    if groups == 1 or n < groups:
        for i in range(n) if groups > 1 else [None]:
            if i is None:  # one group: one call batched over the images, weight broadcast
                a = xp.broadcast_to(weight[0:1], (n, *weight.shape[1:]))
                b, c = operand[:, 0], out[:, 0]
            else:  # one call per image, batched over the groups
                a, b, c = weight, operand[i], out[i]
            launcher.gemm(a, b, c, transpose_a=transpose_weight, beta=beta, tf32=tf32)
        return
    for g in range(groups):  # one call per group, batched over the images
        a = xp.broadcast_to(weight[g : g + 1], (n, *weight.shape[1:]))
        launcher.gemm(
            a, operand[:, g], out[:, g], transpose_a=transpose_weight, beta=beta, tf32=tf32
        )


def _weight_operand(weight, geom: ConvGeometry):
    """weight [Co, Cg, kh, kw] as the GEMMs' [groups, Co/g, Cg*K] operand (a view)."""
    return weight.reshape(geom.groups, geom.out_channels // geom.groups, -1)


def _depthwise_types(launcher: KernelLauncher, geom: ConvGeometry, dtype_name, index_bits):
    bits = index_bits if index_bits is not None else depthwise_cuda.depthwise_index_bits(geom)
    return kernel_types(launcher, dtype_name, bits)


def candidates(
    geom: ConvGeometry,
    dtype_name: str,
    *,
    deterministic: bool = False,
    backward: bool = False,
    compute_capability: int = 80,
) -> dict:
    """The algorithms of :data:`~cupydcn.deform_conv.algorithm.ALGORITHMS` that can compute
    ``geom``: name -> None when it applies, else why not (the deterministic backward has
    the column path only: the others add with atomics)."""
    why = {"im2col": None, "fused": _fused_refusal(geom, dtype_name, backward, compute_capability)}
    if deterministic:
        why["fused"] = "the deterministic backward takes the column path"
    if deterministic:
        why["depthwise"] = "the deterministic backward takes the column path"
    elif not depthwise_cuda.depthwise_applies(geom):
        why["depthwise"] = (
            f"{geom.in_channels // geom.groups} input and {geom.out_channels // geom.groups} "
            "output channels per group (the depthwise kernels take C / groups == 1, or at "
            "most 4 of each)"
        )
    else:
        why["depthwise"] = None
    return why


def _fused_refusal(
    geom: ConvGeometry, dtype_name: str, backward: bool, compute_capability: int
) -> str | None:
    """Why the fused tensor-core kernels do not take ``geom`` (None when they do)."""
    if not fused_cuda.fused_supported(compute_capability):
        return f"the fused kernels need sm_80 or later; the device is sm_{compute_capability}"
    if not fused_cuda.fused_applies(geom, dtype_name):
        return (
            "the fused kernels take float16 / bfloat16 with at least 8 input and 16 output "
            f"channels per group (cupydcn.deform_conv.fused_cuda.fused_applies); got "
            f"{dtype_name}, {geom.in_channels // geom.groups} and "
            f"{geom.out_channels // geom.groups}"
        )
    if backward and not fused_backward_cuda.fused_data_applies(geom, dtype_name):
        return (
            "the fused data-gradient kernel does not apply "
            "(cupydcn.deform_conv.fused_backward_cuda.fused_data_applies)"
        )
    return None


def _compute_capability(launcher: KernelLauncher) -> int:
    """The device's compute capability as an int (80 for sm_80); 80 for launchers without
    a device (the CPU emulator runs the tensor-core primitives, the null launcher
    nothing)."""
    query = getattr(launcher, "compute_capability", None)
    return 80 if query is None else int(query())


def _resolve(
    launcher, algorithm, geom, dtype_name, pass_name, run, *, deterministic=False, backward=False
):
    """The algorithm a call runs: the one asked for (checked to apply), or for "auto" /
    "heuristic" the autotuned / heuristic choice among those that apply."""
    name = (
        current_conv_algorithm()
        if algorithm is None
        else check_algorithm(algorithm, "deform_conv2d")
    )
    why = candidates(
        geom,
        dtype_name,
        deterministic=deterministic,
        backward=backward,
        compute_capability=_compute_capability(launcher),
    )
    usable = [c for c, reason in why.items() if reason is None]
    if name == "heuristic":
        return autotune.heuristic_choice(usable)
    if name == "auto":
        key = autotune.problem_key(
            _device_key(launcher), pass_name, dtype_name, deterministic, geom
        )
        return autotune.choose(launcher, key, usable, run)
    if why[name] is not None:
        raise CupydcnValueError(f"deform_conv2d: algorithm={name!r} does not apply: {why[name]}")
    return name


def _device_key(launcher: KernelLauncher) -> str:
    describe = getattr(launcher, "device_key", None)
    return describe() if describe is not None else type(launcher).__name__


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
    algorithm: str | None = None,
):
    """Output [N, C_out, H_out, W_out] of deform_conv2d (arrays of ``launcher.xp``).
    ``dtype_name`` defaults to the geometry's; ``index_bits`` forces an index width;
    ``algorithm``: one of :data:`~cupydcn.deform_conv.algorithm.ALGORITHMS` (None: the
    current setting; "auto" times the candidates once per problem,
    :mod:`cupydcn.deform_conv.autotune`)."""
    dtype_name = dtype_name or geom.dtype_name
    xp = launcher.xp
    input, offset, weight, bias, mask = (
        contiguous(xp, a) for a in (input, offset, weight, bias, mask)
    )
    if geom.batch == 0:
        return xp.empty(geom.output_shape, dtype=input.dtype)

    def run(name: str):
        if name == "depthwise":
            types = _depthwise_types(launcher, geom, dtype_name, index_bits)
            return depthwise_cuda.depthwise_forward(
                launcher, types, geom, input, offset, weight, bias, mask
            )
        if name == "fused":
            bits = index_bits if index_bits is not None else fused_cuda.fused_index_bits(geom)
            output = xp.empty(geom.output_shape, dtype=input.dtype)
            fused_cuda.launch_fused_forward(
                launcher,
                kernel_types(launcher, dtype_name, bits),
                geom,
                input=input,
                offset=offset,
                weight=weight,
                bias=bias,
                mask=mask,
                output=output,
            )
            return output
        return _forward_im2col(
            launcher,
            input,
            offset,
            weight,
            bias,
            mask,
            geom,
            workspace_bytes,
            dtype_name,
            index_bits,
        )

    chosen = _resolve(launcher, algorithm, geom, dtype_name, f"forward:{workspace_bytes}", run)
    return run(chosen)


def _forward_im2col(
    launcher, input, offset, weight, bias, mask, geom, workspace_bytes, dtype_name, index_bits
):
    """The forward on the column path (columns + GEMMs), in chunks of the workspace."""
    xp = launcher.xp
    output = xp.empty(geom.output_shape, dtype=input.dtype)
    plan = forward_plan(
        launcher,
        geom,
        workspace_bytes=workspace_bytes,
        dtype_name=dtype_name,
        index_bits=index_bits,
    )
    groups = geom.groups
    rows_per_group = geom.column_rows // groups
    pixels = geom.out_h * geom.out_w
    tf32 = is_tf32_allowed()
    weight_operand = _weight_operand(weight, geom)
    width = plan.slice_pixels
    columns = workspace_empty(
        launcher,
        (plan.chunk * geom.column_rows * width,),
        plan.column_dtype,
    )
    grouped_output = output.reshape(geom.batch, groups, -1, pixels)
    beta = 0.0 if bias is None else 1.0
    for start, stop, first, count in _blocks(geom, plan):
        n = stop - start
        cols = _front(columns, n, geom.column_rows, count)
        cuda_kernels.launch_im2col(
            launcher,
            plan.types,
            geom,
            input=input[start:stop],
            offset=offset[start:stop],
            mask=None if mask is None else mask[start:stop],
            columns=cols,
            images=n,
            pixels=None if not plan.split else (first, count),
        )
        target = grouped_output[start:stop, :, :, first : first + count]
        if bias is not None:
            _fill_bias(launcher, target, bias, groups)
        grouped_gemm(
            launcher,
            weight_operand,
            cols.reshape(n, groups, rows_per_group, count),
            target,
            transpose_weight=False,
            beta=beta,
            tf32=tf32,
        )
    return output


def _blocks(geom: ConvGeometry, plan: _Plan):
    """(first image, stop image, first pixel, pixel count) of each launch block: chunks of
    whole images, or one image at a time in ranges of plan.slice_pixels pixels."""
    pixels = geom.out_h * geom.out_w
    if not plan.split:
        for start in range(0, geom.batch, plan.chunk):
            yield start, min(start + plan.chunk, geom.batch), 0, pixels
        return
    for b in range(geom.batch):
        for first in range(0, pixels, plan.slice_pixels):
            yield b, b + 1, first, min(plan.slice_pixels, pixels - first)


def _front(buffer, *shape):
    """The first elements of a contiguous ``buffer`` as a contiguous array of ``shape``
    (the ragged last chunk or range uses the front of the buffers)."""
    size = 1
    for extent in shape:
        size *= extent
    return buffer.reshape(-1)[:size].reshape(shape)


def backward_costs(
    geom: ConvGeometry, dtype_name: str, wrt: frozenset[str], deterministic: bool
) -> _Costs:
    """The backward's buffer bytes (see :class:`_Costs`) for the gradients ``wrt``:
    grad_columns (A), the recomputed columns (element dtype), the deterministic slots,
    and per range the deterministic mode's one-image grad_input buffer."""
    info = DTYPES[dtype_name]
    acc = _ITEMSIZE[info.acc_name]
    column = _ITEMSIZE[dtype_name]
    want_input = "input" in wrt
    want_columns_grad = want_input or "offset" in wrt or ("mask" in wrt and geom.has_mask)
    want_weight = "weight" in wrt
    pixels = geom.out_h * geom.out_w
    slot_elements = 0
    if deterministic and want_input:
        # Slots of the deterministic scatter, at most 4 per column element, sized for
        # 64-bit indices (an upper bound), in units of the accumulation dtype.
        slot_bytes = bytes_per_item(64) + _MAX_CONTRIBUTIONS * bytes_per_contribution(64, acc)
        slot_elements = -(-slot_bytes // acc)
    per_pixel = geom.column_rows * (
        (int(want_columns_grad) + slot_elements) * acc + int(want_weight) * column
    )
    per_range = (
        geom.in_channels * geom.height * geom.width * acc if deterministic and want_input else 0
    )
    return _Costs(pixels * per_pixel, per_pixel, per_range)


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
    costs = backward_costs(geom, dtype_name, frozenset(wrt), deterministic)
    return _plan(launcher, dtype_name, geom, costs, workspace_bytes, index_bits)


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
    algorithm: str | None = None,
) -> ConvGrads:
    """Gradients of deform_conv2d for the names in ``wrt`` (see :class:`ConvGrads`).
    ``deterministic``: grad_input without floating-point atomics, bitwise reproducible
    (:mod:`cupydcn.cuda.deterministic`; its buffers count against ``workspace_bytes``).
    ``algorithm`` as for :func:`conv_forward`."""
    dtype_name = dtype_name or geom.dtype_name
    xp = launcher.xp
    grad_output, input, offset, weight, mask = (
        contiguous(xp, a) for a in (grad_output, input, offset, weight, mask)
    )
    wrt = frozenset(wrt)

    def run(name: str) -> ConvGrads:
        if name == "depthwise":
            types = _depthwise_types(launcher, geom, dtype_name, index_bits)
            return depthwise_cuda.depthwise_backward(
                launcher, types, geom, grad_output, input, offset, weight, mask, wrt=wrt
            )
        if name == "fused":
            return _backward_fused(
                launcher,
                grad_output,
                input,
                offset,
                weight,
                mask,
                geom,
                wrt,
                dtype_name,
                index_bits,
            )
        return _backward_im2col(
            launcher,
            grad_output,
            input,
            offset,
            weight,
            mask,
            geom,
            wrt,
            workspace_bytes,
            dtype_name,
            index_bits,
            deterministic,
        )

    chosen = _resolve(
        launcher,
        algorithm,
        geom,
        dtype_name,
        f"backward:{','.join(sorted(wrt))}:{workspace_bytes}",
        run,
        deterministic=deterministic,
        backward=True,
    )
    return run(chosen)


def _backward_fused(
    launcher, grad_output, input, offset, weight, mask, geom, wrt, dtype_name, index_bits
) -> ConvGrads:
    """The backward on the fused kernels: grad_input, grad_offset and grad_mask from one
    kernel that forms grad_columns tile by tile with MMAs and spends them at once, and
    grad_weight from the fused implicit GEMM over pixels (split-K, float32 atomics); no
    column buffer. grad_bias: one sum of grad_output."""
    xp = launcher.xp
    dtype = input.dtype
    acc = xp.dtype("float32")
    want_input = "input" in wrt
    want_offset = "offset" in wrt
    want_mask = "mask" in wrt and mask is not None
    grad_input_acc = grad_offset = grad_mask = grad_weight_acc = grad_bias = None
    if want_input or want_offset or want_mask:
        bits = (
            index_bits
            if index_bits is not None
            else fused_backward_cuda.fused_data_index_bits(geom)
        )
        if want_input:
            grad_input_acc = xp.zeros(geom.input_shape, dtype=acc)
            report_array_operation("zeros")
        grad_offset = xp.empty(geom.offset_shape, dtype=dtype) if want_offset else None
        grad_mask = xp.empty(geom.mask_shape, dtype=dtype) if want_mask else None
        fused_backward_cuda.launch_fused_data_backward(
            launcher,
            kernel_types(launcher, dtype_name, bits),
            geom,
            grad_output=grad_output,
            input=input,
            offset=offset,
            weight=weight,
            mask=mask,
            grad_input_acc=grad_input_acc,
            grad_offset=grad_offset,
            grad_mask=grad_mask,
        )
    types = kernel_types(
        launcher,
        dtype_name,
        index_bits if index_bits is not None else fused_cuda.fused_index_bits(geom),
    )
    if "weight" in wrt:
        grad_weight_acc = xp.zeros(
            (geom.groups, geom.out_channels // geom.groups, geom.column_rows // geom.groups),
            dtype=acc,
        )
        report_array_operation("zeros")
        fused_cuda.launch_fused_grad_weight(
            launcher,
            types,
            geom,
            grad_output=grad_output,
            input=input,
            offset=offset,
            mask=mask,
            grad_weight_acc=grad_weight_acc,
        )
    if "bias" in wrt:
        grad_bias = grad_output.sum(axis=(0, 2, 3), dtype=acc)
        report_array_operation("sum")

    def rounded(array):
        return round_to_dtype(launcher, dtype_name, types.index_bits, array, dtype)

    return ConvGrads(
        grad_input=None if grad_input_acc is None else rounded(grad_input_acc),
        grad_offset=grad_offset,
        grad_weight=None
        if grad_weight_acc is None
        else rounded(grad_weight_acc).reshape(geom.weight_shape),
        grad_mask=grad_mask,
        grad_bias=None if grad_bias is None else rounded(grad_bias),
    )


def _backward_im2col(
    launcher,
    grad_output,
    input,
    offset,
    weight,
    mask,
    geom,
    wrt,
    workspace_bytes,
    dtype_name,
    index_bits,
    deterministic,
) -> ConvGrads:
    """The backward on the column path (grad_columns, col2im, recomputed columns)."""
    xp = launcher.xp
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
    plan = backward_plan(
        launcher,
        geom,
        wrt=wrt,
        workspace_bytes=workspace_bytes,
        dtype_name=dtype_name,
        index_bits=index_bits,
        deterministic=deterministic,
    )
    types = plan.types
    tf32 = is_tf32_allowed()

    grad_input_acc = xp.zeros(geom.input_shape, dtype=plan.acc_dtype) if want_input else None
    if want_input:
        report_array_operation("zeros")
    grad_offset = xp.empty(geom.offset_shape, dtype=dtype) if want_offset else None
    grad_mask = xp.empty(geom.mask_shape, dtype=dtype) if want_mask else None
    grad_weight_acc = (
        xp.empty((groups, out_per_group, rows_per_group), dtype=plan.acc_dtype)
        if want_weight
        else None
    )
    grad_bias = None
    if want_bias:
        grad_bias_acc = grad_output.sum(axis=(0, 2, 3), dtype=plan.acc_dtype)
        report_array_operation("sum")
        grad_bias = _round(launcher, plan, grad_bias_acc, dtype)
    if want_weight and geom.batch == 0:
        grad_weight_acc[...] = 0
        report_array_operation("zeros")

    if geom.batch > 0 and (want_columns_grad or want_weight):
        weight_operand = _weight_operand(weight, geom)
        grouped_grad_output = grad_output.reshape(geom.batch, groups, out_per_group, pixels)
        width = plan.slice_pixels
        grad_columns = (
            workspace_empty(launcher, (plan.chunk * geom.column_rows * width,), plan.acc_dtype)
            if want_columns_grad
            else None
        )
        columns = (
            workspace_empty(launcher, (plan.chunk * geom.column_rows * width,), plan.column_dtype)
            if want_weight
            else None
        )
        image_grad_input = (
            workspace_empty(launcher, (1, *geom.input_shape[1:]), plan.acc_dtype)
            if want_input and deterministic and plan.split
            else None
        )
        weight_beta = 0.0  # the first product initialises grad_weight
        for start, stop, first, count in _blocks(geom, plan):
            n = stop - start
            pixel_range = None if not plan.split else (first, count)
            chunk_mask = None if mask is None else mask[start:stop]
            go = grouped_grad_output[start:stop, :, :, first : first + count]
            if want_columns_grad:
                chunk_grad_columns = _front(grad_columns, n, geom.column_rows, count)
                grouped_gemm(
                    launcher,
                    weight_operand,
                    go,
                    chunk_grad_columns.reshape(n, groups, rows_per_group, count),
                    transpose_weight=True,
                    beta=0.0,
                    tf32=tf32,
                )
                if want_input and deterministic:
                    target = (
                        grad_input_acc[start:stop] if image_grad_input is None else image_grad_input
                    )
                    deterministic_scatter(
                        launcher,
                        "deform_conv_col2im_input_slots",
                        plan.dtype_name,
                        plan.index_bits,
                        n * geom.column_rows * count,
                        geom,
                        target,
                        sizes=cuda_kernels.conv_sizes(geom, n, (first, count)),
                        grad_columns=chunk_grad_columns,
                        offset=offset[start:stop],
                        mask=chunk_mask,
                    )
                    if image_grad_input is not None:
                        grad_input_acc[start:stop] += image_grad_input
                        report_array_operation("add")
                elif want_input:
                    cuda_kernels.launch_col2im_input(
                        launcher,
                        types,
                        geom,
                        grad_columns=chunk_grad_columns,
                        offset=offset[start:stop],
                        mask=chunk_mask,
                        grad_input=grad_input_acc[start:stop],
                        images=n,
                        pixels=pixel_range,
                    )
                if want_offset or want_mask:
                    cuda_kernels.launch_col2im_coord(
                        launcher,
                        types,
                        geom,
                        grad_columns=chunk_grad_columns,
                        input=input[start:stop],
                        offset=offset[start:stop],
                        mask=chunk_mask,
                        grad_offset=None if grad_offset is None else grad_offset[start:stop],
                        grad_mask=None if grad_mask is None else grad_mask[start:stop],
                        images=n,
                        pixels=pixel_range,
                    )
            if want_weight:
                cols = _front(columns, n, geom.column_rows, count)
                cuda_kernels.launch_im2col(
                    launcher,
                    types,
                    geom,
                    input=input[start:stop],
                    offset=offset[start:stop],
                    mask=chunk_mask,
                    columns=cols,
                    images=n,
                    pixels=pixel_range,
                )
                grouped_cols = cols.reshape(n, groups, rows_per_group, count)
                for i in range(n):  # grad_weight[g] += go[i, g] @ cols[i, g]^T
                    launcher.gemm(
                        go[i],
                        grouped_cols[i],
                        grad_weight_acc,
                        transpose_b=True,
                        beta=weight_beta,
                        tf32=tf32,
                    )
                    weight_beta = 1.0

    return ConvGrads(
        grad_input=None
        if grad_input_acc is None
        else _round(launcher, plan, grad_input_acc, dtype),
        grad_offset=grad_offset,
        grad_weight=None
        if grad_weight_acc is None
        else _round(launcher, plan, grad_weight_acc, dtype).reshape(geom.weight_shape),
        grad_mask=grad_mask,
        grad_bias=grad_bias,
    )


def _round(launcher: KernelLauncher, plan: _Plan, acc_array, dtype):
    return round_to_dtype(launcher, plan.dtype_name, plan.index_bits, acc_array, dtype)
