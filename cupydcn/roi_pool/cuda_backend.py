"""deform_roi_pool on the CUDA kernels (cupydcn/cuda/kernels/deform_roi_pool.cu): buffers and launches.

Written once against a :class:`~cupydcn.cuda.launch.KernelLauncher`, like the conv op: on a
GPU with CuPy, in the tests with the CPU harness that runs the same kernels on the host.

Forward::

    output [K, C, ph, pw]      <- deform_roi_pool_forward           (one thread per element)

Backward::

    grad_input_acc [N, C, H, W] <- deform_roi_pool_backward_input    (atomics, acc dtype)
                                   or, with deterministic=True, deform_roi_pool_backward_
                                   input_slots twice, a stable sort and segment_sum
                                   (cupydcn.cuda.deterministic: no atomics, bitwise
                                   reproducible; 2 more kernel launches, a prefix sum, a
                                   sort, two gathers, one synchronising read; I + 8 bytes
                                   per grad_output element and 2 * (I + A) + 8 per
                                   contribution, up to 4 per sample of a bin)
    grad_input = grad_input_acc rounded once to the element dtype
    grad_offset, grad_mask     <- deform_roi_pool_backward_coord    (one thread per bin,
                                                                     summing over channels)

The kernels read ``rois`` in the accumulation dtype (float64 for float64 inputs, else
float32) and take ``spatial_scale`` and ``gamma`` as a two-element array of that dtype:
launch arguments are arrays or index-type ints only. Half types compute in float32 inside
the kernels and every result is rounded once.
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
from cupydcn.roi_pool.spec import RoiPoolGeometry, RoiPoolGrads


def index_bits_for(geom: RoiPoolGeometry) -> int:
    """32 when every array a kernel indexes fits 32-bit grid-stride indexing, else 64."""
    return index_bits_for_sizes(
        geom.batch * geom.channels * geom.height * geom.width,
        geom.num_rois * geom.channels * geom.bins,
        geom.num_rois * 5,
        geom.num_rois * 2 * geom.bins,
    )


def _plan(launcher: KernelLauncher, geom: RoiPoolGeometry, index_bits: int | None) -> KernelTypes:
    bits = index_bits if index_bits is not None else index_bits_for(geom)
    return kernel_types(launcher, geom.dtype_name, bits)


def _roi_arguments(launcher: KernelLauncher, plan: KernelTypes, geom: RoiPoolGeometry, rois):
    """(rois [K, 5], (spatial_scale, gamma) [2]), C-contiguous in the accumulation dtype."""
    xp = launcher.xp
    rois_acc = xp.ascontiguousarray(rois, dtype=plan.acc_dtype)
    scale_and_gamma = xp.asarray([geom.spatial_scale, geom.gamma], dtype=plan.acc_dtype)
    return rois_acc, scale_and_gamma


def roi_pool_forward(
    launcher: KernelLauncher,
    input,
    rois,
    offset,
    mask,
    geom: RoiPoolGeometry,
    *,
    index_bits: int | None = None,
):
    """Output [K, C, ph, pw] of deform_roi_pool (arrays of ``launcher.xp``; ``index_bits``
    forces the kernels' index width, else the narrowest that fits)."""
    xp = launcher.xp
    plan = _plan(launcher, geom, index_bits)
    output = xp.empty(geom.output_shape, dtype=input.dtype)
    if output.size == 0:
        return output
    rois_acc, scale_and_gamma = _roi_arguments(launcher, plan, geom, rois)
    launch_kernel(
        launcher,
        "deform_roi_pool_forward",
        plan.dtype_name,
        plan.index_bits,
        output.size,
        geom,
        input=contiguous(xp, input),
        rois=rois_acc,
        offset=contiguous(xp, offset),
        mask=contiguous(xp, mask),
        scale_and_gamma=scale_and_gamma,
        output=output,
    )
    return output


def roi_pool_backward(
    launcher: KernelLauncher,
    grad_output,
    input,
    rois,
    offset,
    mask,
    geom: RoiPoolGeometry,
    *,
    wrt: frozenset[str],
    index_bits: int | None = None,
    deterministic: bool = False,
) -> RoiPoolGrads:
    """Gradients of deform_roi_pool for the names in ``wrt`` (see :class:`RoiPoolGrads`);
    grad_offset / grad_mask are None when offset / mask is None. ``deterministic``:
    grad_input without floating-point atomics (:mod:`cupydcn.cuda.deterministic`)."""
    xp = launcher.xp
    plan = _plan(launcher, geom, index_bits)
    dtype = input.dtype
    want_input = "input" in wrt
    want_offset = "offset" in wrt and offset is not None
    want_mask = "mask" in wrt and mask is not None

    grad_input_acc = xp.zeros(geom.input_shape, dtype=plan.acc_dtype) if want_input else None
    grad_offset = xp.empty(geom.offset_shape, dtype=dtype) if want_offset else None
    grad_mask = xp.empty(geom.mask_shape, dtype=dtype) if want_mask else None

    bins_total = geom.num_rois * geom.bins
    if bins_total > 0 and (want_input or want_offset or want_mask):
        rois_acc, scale_and_gamma = _roi_arguments(launcher, plan, geom, rois)
        grad_output, offset, mask = (contiguous(xp, a) for a in (grad_output, offset, mask))
        if want_input and deterministic:
            deterministic_scatter(
                launcher,
                "deform_roi_pool_backward_input_slots",
                plan.dtype_name,
                plan.index_bits,
                bins_total * geom.channels,
                geom,
                grad_input_acc,
                grad_output=grad_output,
                rois=rois_acc,
                offset=offset,
                mask=mask,
                scale_and_gamma=scale_and_gamma,
            )
        elif want_input:
            launch_kernel(
                launcher,
                "deform_roi_pool_backward_input",
                plan.dtype_name,
                plan.index_bits,
                bins_total * geom.channels,
                geom,
                grad_output=grad_output,
                rois=rois_acc,
                offset=offset,
                mask=mask,
                scale_and_gamma=scale_and_gamma,
                grad_input=grad_input_acc,
            )
        if want_offset or want_mask:
            launch_kernel(
                launcher,
                "deform_roi_pool_backward_coord",
                plan.dtype_name,
                plan.index_bits,
                bins_total,
                geom,
                grad_output=grad_output,
                input=contiguous(xp, input),
                rois=rois_acc,
                offset=offset,
                mask=mask,
                scale_and_gamma=scale_and_gamma,
                grad_offset=grad_offset,
                grad_mask=grad_mask,
            )

    return RoiPoolGrads(
        grad_input=None
        if grad_input_acc is None
        else round_to_dtype(launcher, plan.dtype_name, plan.index_bits, grad_input_acc, dtype),
        grad_offset=grad_offset,
        grad_mask=grad_mask,
    )
