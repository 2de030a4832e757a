"""deform_psroi_pool on the CUDA kernels (cupydcn/cuda/kernels/deform_psroi_pool.cu): buffers and launches.

Written once against a :class:`~cupydcn.cuda.launch.KernelLauncher`: on a GPU with CuPy, in
the tests with the CPU harness that runs the same kernels on the host (``xp`` = NumPy).

Forward: one launch, one thread per output element, writing output (T) and count (int32).

Backward:
    grad_input_acc  <- deform_psroi_pool_backward_input   (thread per output element,
                                                            atomics, acc dtype), rounded once;
                       or, with deterministic=True, deform_psroi_pool_backward_input_slots
                       twice, a stable sort and segment_sum (cupydcn.cuda.deterministic: no
                       atomics, bitwise reproducible; 2 more kernel launches, a prefix
                       sum, a sort, two gathers, one synchronising read; I + 8 bytes per
                       output element and 2 * (I + A) + 8 per contribution, up to 4 per
                       kept sample)
    grad_offset     <- deform_psroi_pool_backward_offset  (thread per offset cell, no
                                                            atomics, written in T)

The sample counts are recomputed by the backward kernels (coordinate arithmetic only).
``rois`` and the two float scalars (spatial_scale, trans_std) travel as small arrays in
the accumulation dtype: launch arguments other than arrays are index-typed ints.
"""

from __future__ import annotations

from cupydcn.cuda.deterministic import deterministic_scatter
from cupydcn.cuda.launch import (
    KernelLauncher,
    KernelTypes,
    contiguous,
    index_bits_for_sizes,
    kernel_types,
    launch_kernel,
    round_to_dtype,
)
from cupydcn.psroi_pool.spec import PSRoiPoolGeometry, PSRoiPoolGrads


def index_bits_for(geom: PSRoiPoolGeometry) -> int:
    """32 when every tensor a kernel indexes fits 32-bit grid-stride indexing."""
    return index_bits_for_sizes(
        geom.batch * geom.channels * geom.height * geom.width,
        geom.num_rois * geom.output_dim * geom.pooled_size**2,
        geom.num_rois * 2 * geom.num_classes * geom.part_size**2,
        geom.num_rois * 5,
    )


def _plan(
    launcher: KernelLauncher, dtype_name: str, geom: PSRoiPoolGeometry, index_bits: int | None
) -> KernelTypes:
    bits = index_bits if index_bits is not None else index_bits_for(geom)
    return kernel_types(launcher, dtype_name, bits)


def _kernel_inputs(launcher: KernelLauncher, plan: KernelTypes, rois, geom: PSRoiPoolGeometry):
    """rois [K, 5] and scalars [2] = (spatial_scale, trans_std), C-contiguous in the
    accumulation dtype."""
    xp = launcher.xp
    rois_acc = xp.ascontiguousarray(rois.astype(plan.acc_dtype, copy=False))
    scalars = xp.asarray([geom.spatial_scale, geom.trans_std], dtype=plan.acc_dtype)
    return rois_acc, scalars


def psroi_pool_forward(
    launcher: KernelLauncher,
    input,
    rois,
    offset,
    geom: PSRoiPoolGeometry,
    *,
    dtype_name: str | None = None,
    index_bits: int | None = None,
):
    """(output [K, output_dim, P, P] of the input dtype, count [K, output_dim, P, P]
    int32), arrays of ``launcher.xp``. ``index_bits`` forces the kernels' index width."""
    xp = launcher.xp
    output = xp.empty(geom.output_shape, dtype=input.dtype)
    count = xp.empty(geom.output_shape, dtype=xp.int32)
    if geom.num_rois == 0:
        return output, count
    dtype_name = dtype_name or geom.dtype_name
    plan = _plan(launcher, dtype_name, geom, index_bits)
    rois_acc, scalars = _kernel_inputs(launcher, plan, rois, geom)
    launch_kernel(
        launcher,
        "deform_psroi_pool_forward",
        dtype_name,
        plan.index_bits,
        output.size,
        geom,
        input=contiguous(xp, input),
        rois=rois_acc,
        offset=contiguous(xp, offset),
        scalars=scalars,
        output=output,
        count=count,
    )
    return output, count


def psroi_pool_backward(
    launcher: KernelLauncher,
    grad_output,
    input,
    rois,
    offset,
    geom: PSRoiPoolGeometry,
    *,
    wrt: frozenset[str],
    dtype_name: str | None = None,
    index_bits: int | None = None,
    deterministic: bool = False,
):
    """(grad_input [N, C, H, W] or None, grad_offset [K, 2 * num_classes, S, S] or None)
    for the names in ``wrt`` ("input", "offset"; the latter only with an offset).
    ``deterministic``: grad_input without floating-point atomics
    (:mod:`cupydcn.cuda.deterministic`)."""
    xp = launcher.xp
    dtype_name = dtype_name or geom.dtype_name
    plan = _plan(launcher, dtype_name, geom, index_bits)
    grad_output, offset = contiguous(xp, grad_output), contiguous(xp, offset)
    want_offset = "offset" in wrt and offset is not None
    grad_input_acc = xp.zeros(geom.input_shape, dtype=plan.acc_dtype) if "input" in wrt else None
    grad_offset = xp.empty(geom.offset_shape, dtype=input.dtype) if want_offset else None

    if geom.num_rois > 0:
        rois_acc, scalars = _kernel_inputs(launcher, plan, rois, geom)
        if grad_input_acc is not None and deterministic:
            deterministic_scatter(
                launcher,
                "deform_psroi_pool_backward_input_slots",
                dtype_name,
                plan.index_bits,
                grad_output.size,
                geom,
                grad_input_acc,
                grad_output=grad_output,
                rois=rois_acc,
                offset=offset,
                scalars=scalars,
            )
        elif grad_input_acc is not None:
            launch_kernel(
                launcher,
                "deform_psroi_pool_backward_input",
                dtype_name,
                plan.index_bits,
                grad_output.size,
                geom,
                grad_output=grad_output,
                rois=rois_acc,
                offset=offset,
                scalars=scalars,
                grad_input=grad_input_acc,
            )
        if grad_offset is not None:
            launch_kernel(
                launcher,
                "deform_psroi_pool_backward_offset",
                dtype_name,
                plan.index_bits,
                grad_offset.size // 2,
                geom,
                grad_output=grad_output,
                input=contiguous(xp, input),
                rois=rois_acc,
                offset=offset,
                scalars=scalars,
                grad_offset=grad_offset,
            )
    grad_input = (
        None
        if grad_input_acc is None
        else round_to_dtype(launcher, dtype_name, plan.index_bits, grad_input_acc, input.dtype)
    )
    return PSRoiPoolGrads(grad_input, grad_offset)
