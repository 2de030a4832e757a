"""The cupydcn ops as ``jax.custom_vjp`` functions.

Each public function validates its arguments on shapes and dtypes (at trace time under
``jax.jit``, with cupydcn's own checks), then calls a ``custom_vjp`` function of its
present arrays (None arguments are left out; every non-array option is closed over, so
it is static). Forward and backward run cupydcn's explicit functions through
:func:`cupydcn.jax._bridge.run`.

The custom_vjp rules use ``symbolic_zeros``: the forward rule learns which arguments are
differentiated (``perturbed``) and the backward call asks cupydcn for those gradients
alone (its ``wrt``); the others, and ``rois`` always, get no cotangent (zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

import cupydcn
from cupydcn.deform_conv import spec as _conv
from cupydcn.psroi_pool import spec as _psroi
from cupydcn.roi_pool import spec as _roi

from cupydcn.jax import _bridge

# Trace-time checks of the RoI ops run cupydcn's validation as for NumPy arrays.


@jax.tree_util.register_static
@dataclass(frozen=True)
class _Wrt:
    """The names of the gradients to compute, carried from the forward rule to the
    backward rule as static residual (a pytree node without leaves)."""

    names: tuple[str, ...]


def _type_of(array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(array.shape), array.dtype)


def _present(arrays: Mapping[str, object]) -> dict[str, object]:
    """The non-None arrays as JAX arrays (JAX arrays and tracers pass through unchanged)."""
    return {name: jnp.asarray(a) for name, a in arrays.items() if a is not None}


def _apply(
    arrays: dict[str, object],
    out_types: tuple[jax.ShapeDtypeStruct, ...],
    forward: Callable[..., tuple],
    backward: Callable[..., object],
    *,
    differentiable: Sequence[str],
    backward_inputs: Sequence[str],
) -> tuple:
    """Call ``forward(**arrays)`` through a custom_vjp of ``arrays``' values.

    ``forward(**arrays)`` returns the outputs (a tuple matching ``out_types``; the first
    is the differentiable output). ``backward(grad_output, wrt, **inputs)``, with
    ``inputs`` the arrays named in ``backward_inputs``, returns a cupydcn gradients tuple
    with a field ``grad_<name>`` for each name of ``wrt``. Arrays not in
    ``differentiable`` get a zero cotangent.
    """
    names = tuple(arrays)

    def compute_forward(*values):
        return forward(**dict(zip(names, values)))

    def run_forward(values):
        return _bridge.run(compute_forward, out_types, values)

    @jax.custom_vjp
    def op(values):
        return run_forward(values)

    def op_fwd(primals):
        values = tuple(p.value for p in primals)
        wrt = tuple(n for n, p in zip(names, primals) if p.perturbed and n in differentiable)
        return run_forward(values), (values, _Wrt(wrt))

    def op_bwd(residuals, cotangents):
        values, wrt = residuals
        grad_output = cotangents[0]
        if not wrt.names or isinstance(grad_output, SymbolicZero):
            return (tuple(None for _ in names),)
        by_name = dict(zip(names, values))
        inputs = tuple(by_name[n] for n in backward_inputs if n in by_name)
        input_names = tuple(n for n in backward_inputs if n in by_name)

        def compute_backward(grad, *xs):
            grads = backward(grad, wrt.names, **dict(zip(input_names, xs)))
            return tuple(getattr(grads, f"grad_{n}") for n in wrt.names)

        grad_types = tuple(_type_of(by_name[n]) for n in wrt.names)
        grads = dict(zip(wrt.names, _bridge.run(compute_backward, grad_types,
                                                (grad_output, *inputs))))
        return (tuple(grads.get(n) for n in names),)

    op.defvjp(op_fwd, op_bwd, symbolic_zeros=True)
    return op(tuple(arrays.values()))


# ---------------------------------------------------------------------------- conv
def deform_conv2d(
    input,
    offset,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    mask=None,
    *,
    padding_mode: str = "zeros",
    workspace_bytes: int | None = None,
):
    """:func:`cupydcn.deform_conv2d` for JAX, differentiable (``jax.custom_vjp``) and
    usable under ``jax.jit`` and ``jax.vmap``.

    Same arguments, shapes and semantics as :func:`cupydcn.deform_conv2d`; ``input``,
    ``offset``, ``weight``, ``bias`` and ``mask`` are arrays (``bias`` and ``mask`` may be
    None), every other argument is static. Gradients flow to every array argument.
    """
    arrays = _present({"input": input, "offset": offset, "weight": weight, "bias": bias,
                       "mask": mask})
    geom = _conv.prepare_forward(
        {name: arrays.get(name) for name in ("input", "offset", "weight", "bias", "mask")},
        stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode,
        workspace_bytes=workspace_bytes,
    ).plan
    geometry = dict(stride=stride, padding=padding, dilation=dilation,
                    padding_mode=padding_mode, workspace_bytes=workspace_bytes)

    def forward(input, offset, weight, bias=None, mask=None):
        return (cupydcn.deform_conv2d(input, offset, weight, bias, mask=mask, **geometry),)

    def backward(grad_output, wrt, input, offset, weight, mask=None):
        return cupydcn.deform_conv2d_backward(grad_output, input, offset, weight, mask,
                                              wrt=wrt, **geometry)

    out_type = jax.ShapeDtypeStruct(geom.output_shape, arrays["input"].dtype)
    (output,) = _apply(arrays, (out_type,), forward, backward,
                       differentiable=tuple(arrays),
                       backward_inputs=("input", "offset", "weight", "mask"))
    return output


# ---------------------------------------------------------------------------- RoI pooling
def deform_roi_pool(
    input,
    rois,
    offset=None,
    mask=None,
    *,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
):
    """:func:`cupydcn.deform_roi_pool` for JAX, differentiable (``jax.custom_vjp``) and
    usable under ``jax.jit`` and ``jax.vmap``.

    Same arguments, shapes and semantics as :func:`cupydcn.deform_roi_pool`. Gradients
    flow to ``input``, ``offset`` and ``mask``; the gradient with respect to ``rois`` is
    zero. The values of ``rois`` are checked when the op runs (under ``jax.jit``: inside
    the callback, so a bad RoI raises a runtime error there).
    """
    arrays = _present({"input": input, "rois": rois, "offset": offset, "mask": mask})
    options = dict(output_size=output_size, spatial_scale=spatial_scale,
                   sampling_ratio=sampling_ratio, gamma=gamma)
    geom = _roi.prepare_forward(
        {name: arrays.get(name) for name in ("input", "rois", "offset", "mask")}, **options
    ).plan

    def forward(input, rois, offset=None, mask=None):
        return (cupydcn.deform_roi_pool(input, rois, offset, mask, **options),)

    def backward(grad_output, wrt, input, rois, offset=None, mask=None):
        return cupydcn.deform_roi_pool_backward(grad_output, input, rois, offset, mask,
                                                wrt=wrt, **options)

    out_type = jax.ShapeDtypeStruct(geom.output_shape, arrays["input"].dtype)
    (output,) = _apply(arrays, (out_type,), forward, backward,
                       differentiable=("input", "offset", "mask"),
                       backward_inputs=("input", "rois", "offset", "mask"))
    return output


def deform_psroi_pool(
    input,
    rois,
    offset=None,
    *,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int | None = None,
    sample_per_part: int = 4,
    spatial_scale: float = 1.0,
    trans_std: float = 0.1,
):
    """:func:`cupydcn.deform_psroi_pool` for JAX, differentiable (``jax.custom_vjp``) and
    usable under ``jax.jit`` and ``jax.vmap``.

    Same arguments, shapes and semantics as :func:`cupydcn.deform_psroi_pool`; returns
    ``(output, count)``. Gradients flow from ``output`` to ``input`` and ``offset``;
    ``count`` (int32) has no cotangent and the gradient with respect to ``rois`` is zero.
    The values of ``rois`` are checked when the op runs.
    """
    arrays = _present({"input": input, "rois": rois, "offset": offset})
    options = dict(output_dim=output_dim, group_size=group_size, pooled_size=pooled_size,
                   part_size=part_size, sample_per_part=sample_per_part,
                   spatial_scale=spatial_scale, trans_std=trans_std)
    geom = _psroi.prepare_forward(
        {name: arrays.get(name) for name in ("input", "rois", "offset")}, **options
    ).plan

    def forward(input, rois, offset=None):
        return cupydcn.deform_psroi_pool(input, rois, offset, **options)

    def backward(grad_output, wrt, input, rois, offset=None):
        return cupydcn.deform_psroi_pool_backward(grad_output, input, rois, offset,
                                                  wrt=wrt, **options)

    out_types = (jax.ShapeDtypeStruct(geom.output_shape, arrays["input"].dtype),
                 jax.ShapeDtypeStruct(geom.output_shape, np.int32))
    output, count = _apply(arrays, out_types, forward, backward,
                           differentiable=("input", "offset"),
                           backward_inputs=("input", "rois", "offset"))
    return output, count
