"""The deformable-attention ops as ``jax.custom_vjp`` functions (the pattern of
:mod:`cupydcn.jax._ops`, whose helpers this module uses).

Each function validates its arguments with the op's own ``prepare`` (at trace time under
``jax.jit``), then calls a custom_vjp function of its arrays through
:func:`cupydcn.jax._ops._apply`: forward and backward run cupydcn's explicit functions
through :func:`cupydcn.jax._bridge.run`, and the backward asks cupydcn for the
gradients JAX differentiates (``symbolic_zeros``) alone.

``spatial_shapes`` and ``level_start_index`` of :func:`multi_scale_deformable_attn` are
static: sequences of ints / pairs, NumPy arrays, or concrete (not traced) JAX arrays,
read on the host when the function is called (under ``jax.jit``: at trace time, so pass
them as Python sequences, closed over or marked static). The options of
:func:`dcnv3` / :func:`dcnv4` are static too.
"""

from __future__ import annotations

import jax
import numpy as np

import cupydcn
from cupydcn.core.errors import type_error
from cupydcn.deform_attn import spec as _spec
from cupydcn.jax._ops import _apply, _plan, _present

__all__ = ["dcnv3", "dcnv4", "multi_scale_deformable_attn"]


def _static_ints(op: str, name: str, value, ndim: int):
    """A static spatial_shapes / level_start_index as nested tuples of ints (None stays
    None); a traced JAX array is refused."""
    if value is None:
        return None
    if isinstance(value, jax.core.Tracer):
        raise type_error(
            op,
            f"{name} must be static (a sequence of ints, a NumPy array or a "
            f"concrete array), not a traced array: under jax.jit pass it as "
            f"a Python sequence closed over by the function or marked static",
        )
    if isinstance(value, jax.Array):
        value = np.asarray(value)
    return _spec.host_ints(op, name, value, ndim)


# ---------------------------------------------------------------------------- MSDA
def multi_scale_deformable_attn(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """:func:`cupydcn.multi_scale_deformable_attn` for JAX, differentiable
    (``jax.custom_vjp``) and usable under ``jax.jit`` and ``jax.vmap``.

    value [N, S, M, D], sampling_locations [N, Lq, M, L, P, 2] (normalised x, y),
    attention_weights [N, Lq, M, L, P]; returns [N, Lq, M * D]. ``spatial_shapes`` [L, 2]
    ((H_l, W_l) rows) and ``level_start_index`` [L] (or None) are static (module
    docstring); level_start_index is checked against spatial_shapes. Gradients flow to
    value, sampling_locations and attention_weights.
    """
    op = _spec.MSDA_OP
    shapes = _static_ints(op, "spatial_shapes", spatial_shapes, 2)
    if shapes is None:
        raise type_error(
            op,
            "spatial_shapes must be a sequence of (H_l, W_l) pairs or an "
            "integer array [L, 2]; got None",
        )
    starts = _static_ints(op, "level_start_index", level_start_index, 1)
    arrays = _present(
        {
            "value": value,
            "sampling_locations": sampling_locations,
            "attention_weights": attention_weights,
        }
    )
    geom = _spec.prepare_msda_forward(
        {
            "value": arrays["value"],
            "spatial_shapes": None,
            "level_start_index": None,
            "sampling_locations": arrays["sampling_locations"],
            "attention_weights": arrays["attention_weights"],
        },
        shapes_host=shapes,
        starts_host=starts,
    ).plan

    def forward(value, sampling_locations, attention_weights):
        return (
            cupydcn.multi_scale_deformable_attn(
                value, shapes, None, sampling_locations, attention_weights
            ),
        )

    def backward(grad_output, wrt, value, sampling_locations, attention_weights):
        return cupydcn.multi_scale_deformable_attn_backward(
            grad_output, value, shapes, None, sampling_locations, attention_weights, wrt=wrt
        )

    out_type = jax.ShapeDtypeStruct(geom.output_shape, arrays["value"].dtype)
    (output,) = _apply(
        arrays,
        (out_type,),
        forward,
        backward,
        differentiable=_spec.MSDA_GRADIENT_NAMES,
        backward_inputs=_spec.MSDA_GRADIENT_NAMES,
    )
    return output


# ---------------------------------------------------------------------------- DCNv3 / DCNv4
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
    """:func:`cupydcn.dcnv3` for JAX, differentiable (``jax.custom_vjp``) and usable under
    ``jax.jit`` and ``jax.vmap``.

    Channels last: input [N, H, W, G * Cg], offset [N, H_out, W_out, G * P * 2] ((x, y)
    pairs, taps x-major), mask [N, H_out, W_out, G * P] (no softmax inside); returns
    [N, H_out, W_out, G * Cg]. Options static, as :func:`cupydcn.dcnv3`. Gradients flow
    to input, offset and mask.
    """
    options = _spec.Dcnv3Options.of(locals())
    arrays = _present({"input": input, "offset": offset, "mask": mask})
    geom = _plan(_spec.prepare_dcnv3_forward, _spec.DCNV3_GRADIENT_NAMES, arrays, options)
    kwargs = options.as_kwargs()

    def forward(input, offset, mask):
        return (cupydcn.dcnv3(input, offset, mask, **kwargs),)

    def backward(grad_output, wrt, input, offset, mask):
        return cupydcn.dcnv3_backward(grad_output, input, offset, mask, wrt=wrt, **kwargs)

    out_type = jax.ShapeDtypeStruct(geom.output_shape, arrays["input"].dtype)
    (output,) = _apply(
        arrays,
        (out_type,),
        forward,
        backward,
        differentiable=_spec.DCNV3_GRADIENT_NAMES,
        backward_inputs=_spec.DCNV3_GRADIENT_NAMES,
    )
    return output


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
    """:func:`cupydcn.dcnv4` for JAX, differentiable (``jax.custom_vjp``) and usable under
    ``jax.jit`` and ``jax.vmap``.

    input [N, H, W, G * Cg], offset_mask [N, H_out, W_out, D] with D >= G * 3P (per group
    2P offsets as (x, y) pairs, then P mask values; the rest is padding, never read, with
    gradient 0); returns [N, H_out, W_out, G * Cg]. Options static, as
    :func:`cupydcn.dcnv4`. Gradients flow to input and offset_mask.
    """
    options = _spec.Dcnv4Options.of(locals())
    arrays = _present({"input": input, "offset_mask": offset_mask})
    geom = _plan(_spec.prepare_dcnv4_forward, _spec.DCNV4_GRADIENT_NAMES, arrays, options)
    kwargs = options.as_kwargs()

    def forward(input, offset_mask):
        return (cupydcn.dcnv4(input, offset_mask, **kwargs),)

    def backward(grad_output, wrt, input, offset_mask):
        return cupydcn.dcnv4_backward(grad_output, input, offset_mask, wrt=wrt, **kwargs)

    out_type = jax.ShapeDtypeStruct(geom.output_shape, arrays["input"].dtype)
    (output,) = _apply(
        arrays,
        (out_type,),
        forward,
        backward,
        differentiable=_spec.DCNV4_GRADIENT_NAMES,
        backward_inputs=_spec.DCNV4_GRADIENT_NAMES,
    )
    return output
