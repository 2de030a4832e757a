"""The deformable-attention family: the public functions (docs/semantics.md §8).

* :func:`multi_scale_deformable_attn` — Deformable DETR's / mmcv's multi-scale
  deformable attention core (``grid_sample(bilinear, zeros, align_corners=False)`` per
  level, weighted sum over levels and points);
* :func:`dcnv3` — InternImage's DCNv3 core (channels last, x-major taps, (x, y) offsets,
  ``offset_scale``, ``remove_center``);
* :func:`dcnv4` — DCNv4's packed ``offset_mask`` layout of the same op;

and their backward. Every check runs before any computation (``spec``; the values of
``spatial_shapes`` / ``level_start_index`` arrays inside the dispatch, on the arrays'
stream). CPU arrays run on the NumPy backend, CUDA arrays on the kernels of
``cupydcn/cuda/kernels/deform_attn.cu`` (``cuda_backend``).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from cupydcn.core.dispatch import Backends, dispatch
from cupydcn.core.errors import type_error
from cupydcn.deform_attn import cuda_backend, numpy_backend
from cupydcn.deform_attn.spec import (
    DCNV3_BACKWARD_OP,
    DCNV3_OP,
    DCNV4_BACKWARD_OP,
    DCNV4_OP,
    MSDA_BACKWARD_OP,
    MSDA_OP,
    Dcnv3Grads,
    Dcnv3Options,
    Dcnv4Grads,
    Dcnv4Options,
    MsdaGrads,
    MsdaOptions,
    host_ints,
    msda_check_values,
    prepare_dcnv3_backward,
    prepare_dcnv3_forward,
    prepare_dcnv4_backward,
    prepare_dcnv4_forward,
    prepare_msda_backward,
    prepare_msda_forward,
)

MSDA_FORWARD = Backends.of_modules(numpy_backend, cuda_backend, "msda_forward")
MSDA_BACKWARD = Backends.of_modules(numpy_backend, cuda_backend, "msda_backward")
DCNV3_FORWARD = Backends.of_modules(numpy_backend, cuda_backend, "dcnv3_forward")
DCNV3_BACKWARD = Backends.of_modules(numpy_backend, cuda_backend, "dcnv3_backward")
DCNV4_FORWARD = Backends.of_modules(numpy_backend, cuda_backend, "dcnv4_forward")
DCNV4_BACKWARD = Backends.of_modules(numpy_backend, cuda_backend, "dcnv4_backward")

__all__ = [
    "Dcnv3Grads",
    "Dcnv3Options",
    "Dcnv4Grads",
    "Dcnv4Options",
    "MsdaGrads",
    "MsdaOptions",
    "dcnv3",
    "dcnv3_backward",
    "dcnv4",
    "dcnv4_backward",
    "multi_scale_deformable_attn",
    "multi_scale_deformable_attn_backward",
]


def _levels(op: str, spatial_shapes, level_start_index):
    """(host spatial_shapes or None, host level_start_index or None, the arrays to
    dispatch): sequences and NumPy arrays are read on the host now; arrays of another
    library travel with the call (same library and device as value) and are read inside
    the dispatch. level_start_index may be None (derived from spatial_shapes)."""
    if spatial_shapes is None:
        raise type_error(
            op,
            "spatial_shapes must be an integer array [L, 2] or a sequence "
            "of (H_l, W_l) pairs; got None",
        )
    shapes_host = host_ints(op, "spatial_shapes", spatial_shapes, 2)
    starts_host = (
        None
        if level_start_index is None
        else host_ints(op, "level_start_index", level_start_index, 1)
    )
    arrays = {
        "spatial_shapes": None if shapes_host is not None else spatial_shapes,
        "level_start_index": (
            None if level_start_index is None or starts_host is not None else level_start_index
        ),
    }
    return shapes_host, starts_host, arrays


def multi_scale_deformable_attn(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """Multi-scale deformable attention (Deformable DETR; mmcv's
    ``multi_scale_deformable_attn_pytorch`` / ``MultiScaleDeformableAttnFunction``).

    Shapes:
        value               [N, S, M, D], S = sum_l H_l * W_l (levels concatenated,
                            each row-major)
        spatial_shapes      [L, 2] rows (H_l, W_l): an integer array, or a sequence of
                            pairs (what JAX needs under jit)
        level_start_index   [L] the first key of each level (checked against
                            spatial_shapes), or None
        sampling_locations  [N, Lq, M, L, P, 2] normalised (x, y) in [0, 1] across each
                            level's map (outside allowed: reads 0)
        attention_weights   [N, Lq, M, L, P] (no softmax inside)
        returns             [N, Lq, M * D]

    Per level the value map is sampled as ``grid_sample(bilinear, padding_mode="zeros",
    align_corners=False)``: pixel ``x * W_l - 0.5``, ``y * H_l - 0.5``, out-of-map corners
    read 0 (docs/semantics.md §8). Half types compute in float32 and round once.
    """
    shapes_host, starts_host, levels = _levels(MSDA_OP, spatial_shapes, level_start_index)
    return dispatch(
        MSDA_OP,
        {
            "value": value,
            **levels,
            "sampling_locations": sampling_locations,
            "attention_weights": attention_weights,
        },
        required=("value", "sampling_locations", "attention_weights"),
        prepare=partial(prepare_msda_forward, shapes_host=shapes_host, starts_host=starts_host),
        check_values=lambda xp, native, geom: msda_check_values(
            MSDA_OP, xp, native, geom, starts_host=starts_host
        ),
        backends=MSDA_FORWARD,
    )


def multi_scale_deformable_attn_backward(
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    *,
    wrt: Iterable[str] | str | None = None,
) -> MsdaGrads:
    """Gradients of :func:`multi_scale_deformable_attn` given ``grad_output``
    [N, Lq, M * D].

    Returns ``MsdaGrads(grad_value [N, S, M, D], grad_sampling_locations
    [N, Lq, M, L, P, 2], grad_attention_weights [N, Lq, M, L, P])``. ``wrt`` names the
    gradients to compute, a subset of ("value", "sampling_locations",
    "attention_weights"); the others are None. Default: all three.

    At a kink the derivative is one-sided from inside the map (deform_conv2d's convention,
    docs/semantics.md §1.8 and §8.4): right-sided at integer pixel coordinates, so a point
    exactly on the outer edge (pixel -1) still gets the slope into the map; 0 for points
    that read nothing; NaN for NaN locations (which add nothing to grad_value).
    """
    shapes_host, starts_host, levels = _levels(MSDA_BACKWARD_OP, spatial_shapes, level_start_index)
    return dispatch(
        MSDA_BACKWARD_OP,
        {
            "grad_output": grad_output,
            "value": value,
            **levels,
            "sampling_locations": sampling_locations,
            "attention_weights": attention_weights,
        },
        required=("grad_output", "value", "sampling_locations", "attention_weights"),
        prepare=partial(
            prepare_msda_backward, shapes_host=shapes_host, starts_host=starts_host, wrt=wrt
        ),
        check_values=lambda xp, native, geom: msda_check_values(
            MSDA_BACKWARD_OP, xp, native, geom, starts_host=starts_host
        ),
        backends=MSDA_BACKWARD,
    )


def dcnv3(
    input,
    offset,
    mask,
    *,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
):
    """InternImage's DCNv3 core (``DCNv3Function`` / ``dcnv3_core_pytorch``), channels last.

    Shapes:
        input   [N, H, W, group * group_channels]
        offset  [N, H_out, W_out, group * P * 2] — (x, y) pairs per point
        mask    [N, H_out, W_out, group * P] — multiplies each sample (no softmax inside)
        returns [N, H_out, W_out, group * group_channels]
    with P = kh * kw - remove_center and H_out = (H + 2 pad_h - (dil_h (kh - 1) + 1)) //
    stride_h + 1 (likewise W_out).

    Point k = iw * kh + ih (x-major) of output pixel (oy, ox), group g, samples
    ``x = ox * stride_w - pad_w + c_w + (iw * dil_w - c_w + dx) * offset_scale`` with
    ``c_w = (dil_w * (kw - 1)) // 2`` (likewise y), bilinearly, zeros outside the map;
    ``remove_center`` drops the tap (kw // 2, kh // 2) and needs odd kernel sizes.
    ``kernel_size``, ``stride``, ``padding`` (pad_h, pad_w), ``dilation``: an int or an
    (h, w) pair. Half types compute in float32 and round once (docs/semantics.md §8).
    """
    options = Dcnv3Options.of(locals())
    return dispatch(
        DCNV3_OP,
        {"input": input, "offset": offset, "mask": mask},
        required=("input", "offset", "mask"),
        prepare=partial(prepare_dcnv3_forward, options=options),
        backends=DCNV3_FORWARD,
    )


def dcnv3_backward(
    grad_output,
    input,
    offset,
    mask,
    *,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    wrt: Iterable[str] | str | None = None,
) -> Dcnv3Grads:
    """Gradients of :func:`dcnv3` given ``grad_output`` [N, H_out, W_out, G * Cg].

    Returns ``Dcnv3Grads(grad_input, grad_offset, grad_mask)`` in the shapes of input,
    offset and mask; ``wrt`` a subset of ("input", "offset", "mask") (default all).
    Derivative conventions as :func:`multi_scale_deformable_attn_backward`.
    """
    options = Dcnv3Options.of(locals())
    return dispatch(
        DCNV3_BACKWARD_OP,
        {"grad_output": grad_output, "input": input, "offset": offset, "mask": mask},
        required=("grad_output", "input", "offset", "mask"),
        prepare=partial(prepare_dcnv3_backward, options=options, wrt=wrt),
        backends=DCNV3_BACKWARD,
    )


def dcnv4(
    input,
    offset_mask,
    *,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
):
    """DCNv4's core (``DCNv4Function`` without softmax): :func:`dcnv3` with the offsets
    and the mask packed in one array.

    Shapes:
        input        [N, H, W, group * group_channels]
        offset_mask  [N, H_out, W_out, D], D >= group * 3P: per group 3P consecutive
                     values, 2P offsets as (x, y) pairs then P mask values; the rest of
                     the last dimension (DCNv4 pads it to a multiple of 8) is never read
        returns      [N, H_out, W_out, group * group_channels]

    Any kernel size and any group_channels; options as :func:`dcnv3`.
    """
    options = Dcnv4Options.of(locals())
    return dispatch(
        DCNV4_OP,
        {"input": input, "offset_mask": offset_mask},
        required=("input", "offset_mask"),
        prepare=partial(prepare_dcnv4_forward, options=options),
        backends=DCNV4_FORWARD,
    )


def dcnv4_backward(
    grad_output,
    input,
    offset_mask,
    *,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    wrt: Iterable[str] | str | None = None,
) -> Dcnv4Grads:
    """Gradients of :func:`dcnv4` given ``grad_output`` [N, H_out, W_out, G * Cg].

    Returns ``Dcnv4Grads(grad_input, grad_offset_mask)``; grad_offset_mask has the shape
    of offset_mask and is 0 in its padding. ``wrt`` a subset of ("input", "offset_mask")
    (default both).
    """
    options = Dcnv4Options.of(locals())
    return dispatch(
        DCNV4_BACKWARD_OP,
        {"grad_output": grad_output, "input": input, "offset_mask": offset_mask},
        required=("grad_output", "input", "offset_mask"),
        prepare=partial(prepare_dcnv4_backward, options=options, wrt=wrt),
        backends=DCNV4_BACKWARD,
    )
