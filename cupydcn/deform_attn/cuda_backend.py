"""The deformable-attention ops on the CUDA kernels (cupydcn/cuda/kernels/deform_attn.cu):
buffers and launches, written once against a :class:`~cupydcn.cuda.launch.KernelLauncher`
(CuPy on a GPU, the CPU emulator in the tests).

The dispatch looks these functions up by name (:meth:`cupydcn.core.dispatch.Backends.of_modules`);
their signatures are ``numpy_backend``'s with the launcher first, plus ``index_bits`` (the
kernels' index width, forced in the tests; else the narrowest that fits).

MSDA::

    output [N, Lq, M * D]        <- deform_attn_msda_forward   (one thread per (query,
                                                                head, lane of <= 8 channels))
    grad_value_acc,              <- deform_attn_msda_backward  (the same threads; atomics
    grad_sampling_locations_acc,                                in the acc dtype into zeroed
    grad_attention_weights_acc                                  buffers)
    each gradient = its acc buffer rounded once to the element dtype

DCNv3 / DCNv4 (one kernel pair; DCNv4 passes its packed offset_mask as ``offset`` with
``packed_dim`` its last dimension)::

    output                       <- deform_attn_dcn_forward
    grad_input_acc, grad_offset_acc,  <- deform_attn_dcn_backward
    grad_mask_acc / grad_offset_mask_acc

``spatial_shapes`` goes to the kernels as an int32 [L, 2] array (the level starts are its
prefix sums, checked by the dispatch), ``offset_scale`` as a one-element array of the
accumulation dtype: launch arguments are arrays or index-type ints only. Half types compute
in float32 and every result is rounded once.
"""

from __future__ import annotations

import numpy as np

from cupydcn.cuda.launch import (
    KernelLauncher,
    KernelTypes,
    contiguous,
    index_bits_for_sizes,
    kernel_types,
    launch_kernel,
    round_to_dtype,
)
from cupydcn.deform_attn.spec import DcnGeometry, Dcnv3Grads, Dcnv4Grads, MsdaGeometry, MsdaGrads

# Channels per forward thread (kAttnVec of deform_attn.cu).
VECTOR_CHANNELS = 8


def _prod(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _lanes(channels: int) -> int:
    """Threads per (unit, head): lane t owns the channels t, t + lanes, ... (at most
    VECTOR_CHANNELS of them); one lane for no channels."""
    return max(1, -(-channels // VECTOR_CHANNELS))


def _rounded(launcher: KernelLauncher, plan: KernelTypes, acc_array, dtype):
    """An accumulation-dtype result rounded once to the element dtype (None stays None)."""
    if acc_array is None:
        return None
    return round_to_dtype(launcher, plan.dtype_name, plan.index_bits, acc_array, dtype)


# ---------------------------------------------------------------------------- MSDA


def msda_index_bits(geom: MsdaGeometry) -> int:
    """32 when every array and thread loop of the MSDA kernels fits 32-bit indexing."""
    units = geom.batch * geom.num_queries * geom.heads
    return index_bits_for_sizes(
        _prod(geom.value_shape),
        _prod(geom.locations_shape),
        _prod(geom.output_shape),
        units * _lanes(geom.head_dim),
    )


def _msda_plan(launcher: KernelLauncher, geom: MsdaGeometry, index_bits: int | None) -> KernelTypes:
    bits = index_bits if index_bits is not None else msda_index_bits(geom)
    return kernel_types(launcher, geom.dtype_name, bits)


def _spatial_shapes(xp, geom: MsdaGeometry, spatial_shapes):
    """spatial_shapes as a C-contiguous int32 [L, 2] array of ``xp`` (the values were
    checked by the dispatch: 1 <= H_l, W_l <= 2**31 - 1)."""
    if geom.level_shapes is not None:
        return xp.asarray(np.asarray(geom.level_shapes, dtype=np.int32).reshape(-1, 2))
    return xp.ascontiguousarray(xp.asarray(spatial_shapes).reshape(-1, 2), dtype=xp.int32)


def msda_forward(
    launcher: KernelLauncher,
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    geom: MsdaGeometry,
    *,
    index_bits: int | None = None,
):
    """Output [N, Lq, M * D] of multi_scale_deformable_attn (arrays of ``launcher.xp``)."""
    xp = launcher.xp
    plan = _msda_plan(launcher, geom, index_bits)
    output = xp.empty(geom.output_shape, dtype=value.dtype)
    if output.size == 0:
        return output
    launch_kernel(
        launcher,
        "deform_attn_msda_forward",
        plan.dtype_name,
        plan.index_bits,
        geom.batch * geom.num_queries * geom.heads * _lanes(geom.head_dim),
        geom,
        value=contiguous(xp, value),
        spatial_shapes=_spatial_shapes(xp, geom, spatial_shapes),
        sampling_locations=contiguous(xp, sampling_locations),
        attention_weights=contiguous(xp, attention_weights),
        output=output,
    )
    return output


def msda_backward(
    launcher: KernelLauncher,
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    geom: MsdaGeometry,
    *,
    wrt: frozenset[str],
    index_bits: int | None = None,
) -> MsdaGrads:
    """Gradients of multi_scale_deformable_attn for the names in ``wrt`` (see
    :class:`MsdaGrads`), new C-contiguous arrays in the value dtype."""
    xp = launcher.xp
    plan = _msda_plan(launcher, geom, index_bits)
    dtype = value.dtype
    want_value = "value" in wrt
    want_loc = "sampling_locations" in wrt
    want_attn = "attention_weights" in wrt
    acc = plan.acc_dtype
    grad_value = xp.zeros(geom.value_shape, dtype=acc) if want_value else None
    grad_loc = xp.zeros(geom.locations_shape, dtype=acc) if want_loc else None
    grad_attn = xp.zeros(geom.weights_shape, dtype=acc) if want_attn else None
    total = geom.batch * geom.num_queries * geom.heads * _lanes(geom.head_dim)
    if total > 0 and (want_value or want_loc or want_attn):
        launch_kernel(
            launcher,
            "deform_attn_msda_backward",
            plan.dtype_name,
            plan.index_bits,
            total,
            geom,
            grad_output=contiguous(xp, grad_output),
            value=contiguous(xp, value),
            spatial_shapes=_spatial_shapes(xp, geom, spatial_shapes),
            sampling_locations=contiguous(xp, sampling_locations),
            attention_weights=contiguous(xp, attention_weights),
            grad_value=grad_value,
            grad_sampling_locations=grad_loc,
            grad_attention_weights=grad_attn,
        )
    return MsdaGrads(
        *(_rounded(launcher, plan, g, dtype) for g in (grad_value, grad_loc, grad_attn))
    )


# ---------------------------------------------------------------------------- DCNv3 / v4


def dcn_index_bits(geom: DcnGeometry) -> int:
    """32 when every array and thread loop of the DCN kernels fits 32-bit indexing."""
    units = geom.batch * geom.out_h * geom.out_w
    return index_bits_for_sizes(
        _prod(geom.input_shape),
        _prod(geom.output_shape),
        _prod(geom.offset_shape),
        _prod(geom.offset_mask_shape),
        units * geom.group * _lanes(geom.group_channels),
        units * geom.group * 3 * geom.points,
    )


def _dcn_plan(launcher: KernelLauncher, geom: DcnGeometry, index_bits: int | None) -> KernelTypes:
    bits = index_bits if index_bits is not None else dcn_index_bits(geom)
    return kernel_types(launcher, geom.dtype_name, bits)


def _dcn_sizes(geom: DcnGeometry) -> dict[str, int]:
    return {"remove_center": int(geom.remove_center), "packed_dim": int(geom.packed_dim)}


def _dcn_forward(launcher, input, offset, mask, geom: DcnGeometry, index_bits):
    xp = launcher.xp
    plan = _dcn_plan(launcher, geom, index_bits)
    output = xp.empty(geom.output_shape, dtype=input.dtype)
    if output.size == 0:
        return output
    launch_kernel(
        launcher,
        "deform_attn_dcn_forward",
        plan.dtype_name,
        plan.index_bits,
        geom.batch * geom.out_h * geom.out_w * geom.group * _lanes(geom.group_channels),
        geom,
        _dcn_sizes(geom),
        input=contiguous(xp, input),
        offset=contiguous(xp, offset),
        mask=contiguous(xp, mask),
        offset_scale=xp.asarray([geom.offset_scale], dtype=plan.acc_dtype),
        output=output,
    )
    return output


def _dcn_backward(
    launcher,
    grad_output,
    input,
    offset,
    mask,
    geom: DcnGeometry,
    index_bits,
    *,
    want_input: bool,
    offset_shape,
    mask_shape,
):
    """(grad_input, grad_offset, grad_mask) in the element dtype, each None unless its
    shape is given (``want_input``); DCNv4 passes its packed shape as ``offset_shape``."""
    xp = launcher.xp
    plan = _dcn_plan(launcher, geom, index_bits)
    acc = plan.acc_dtype
    grad_input = xp.zeros(geom.input_shape, dtype=acc) if want_input else None
    grad_offset = None if offset_shape is None else xp.zeros(offset_shape, dtype=acc)
    grad_mask = None if mask_shape is None else xp.zeros(mask_shape, dtype=acc)
    total = geom.batch * geom.out_h * geom.out_w * geom.group * _lanes(geom.group_channels)
    if total > 0 and (want_input or grad_offset is not None or grad_mask is not None):
        launch_kernel(
            launcher,
            "deform_attn_dcn_backward",
            plan.dtype_name,
            plan.index_bits,
            total,
            geom,
            _dcn_sizes(geom),
            grad_output=contiguous(xp, grad_output),
            input=contiguous(xp, input),
            offset=contiguous(xp, offset),
            mask=contiguous(xp, mask),
            offset_scale=xp.asarray([geom.offset_scale], dtype=acc),
            grad_input=grad_input,
            grad_offset=grad_offset,
            grad_mask=grad_mask,
        )
    return tuple(
        _rounded(launcher, plan, g, input.dtype) for g in (grad_input, grad_offset, grad_mask)
    )


def dcnv3_forward(
    launcher: KernelLauncher,
    input,
    offset,
    mask,
    geom: DcnGeometry,
    *,
    index_bits: int | None = None,
):
    """Output [N, H_out, W_out, G * Cg] of dcnv3."""
    return _dcn_forward(launcher, input, offset, mask, geom, index_bits)


def dcnv3_backward(
    launcher: KernelLauncher,
    grad_output,
    input,
    offset,
    mask,
    geom: DcnGeometry,
    *,
    wrt: frozenset[str],
    index_bits: int | None = None,
) -> Dcnv3Grads:
    """Gradients of dcnv3 for the names in ``wrt`` (see :class:`Dcnv3Grads`)."""
    return Dcnv3Grads(
        *_dcn_backward(
            launcher,
            grad_output,
            input,
            offset,
            mask,
            geom,
            index_bits,
            want_input="input" in wrt,
            offset_shape=geom.offset_shape if "offset" in wrt else None,
            mask_shape=geom.mask_shape if "mask" in wrt else None,
        )
    )


def dcnv4_forward(
    launcher: KernelLauncher,
    input,
    offset_mask,
    geom: DcnGeometry,
    *,
    index_bits: int | None = None,
):
    """Output [N, H_out, W_out, G * Cg] of dcnv4 (the packed layout: ``mask`` unused)."""
    return _dcn_forward(launcher, input, offset_mask, None, geom, index_bits)


def dcnv4_backward(
    launcher: KernelLauncher,
    grad_output,
    input,
    offset_mask,
    geom: DcnGeometry,
    *,
    wrt: frozenset[str],
    index_bits: int | None = None,
) -> Dcnv4Grads:
    """Gradients of dcnv4 for the names in ``wrt`` (see :class:`Dcnv4Grads`); the padding
    of offset_mask beyond G * 3P gets 0 (the kernel never writes it)."""
    grad_input, grad_packed, _ = _dcn_backward(
        launcher,
        grad_output,
        input,
        offset_mask,
        None,
        geom,
        index_bits,
        want_input="input" in wrt,
        offset_shape=geom.offset_mask_shape if "offset_mask" in wrt else None,
        mask_shape=None,
    )
    return Dcnv4Grads(grad_input, grad_packed)
