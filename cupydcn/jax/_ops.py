"""The cupydcn ops as ``jax.custom_vjp`` functions.

Each public function collects its options into the op's options dataclass (``ConvOptions``
and friends, declared once in the op's ``spec``), validates them and the arrays' shapes and
dtypes with the op's own ``prepare`` (at trace time under ``jax.jit``), then calls a
``custom_vjp`` function of its present arrays (None arguments are left out; the options are
closed over, so they are static). Forward and backward run cupydcn's explicit functions
through :func:`cupydcn.jax._bridge.run`.

The custom_vjp rules use ``symbolic_zeros``: the forward rule learns which arguments are
differentiated (``perturbed``) and the backward call asks cupydcn for those gradients
alone (its ``wrt``); the others, and ``rois`` always, get no cotangent (zero).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

import cupydcn
from cupydcn.deform_conv import spec as _conv
from cupydcn.jax import _bridge
from cupydcn.psroi_pool import spec as _psroi
from cupydcn.roi_pool import spec as _roi


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


def _plan(prepare, names: Sequence[str], arrays: Mapping[str, object], options):
    """The op's plan from ``prepare(native, options)`` (cupydcn's checks on shapes, dtypes
    and options; at trace time under ``jax.jit``), the absent arrays as None."""
    return prepare({name: arrays.get(name) for name in names}, options).plan


def _apply(
    arrays: dict[str, object],
    out_types: tuple[jax.ShapeDtypeStruct, ...],
    forward: Callable[..., tuple],
    backward: Callable[..., object],
    *,
    differentiable: Sequence[str],
    backward_inputs: Sequence[str],
    differentiable_backward: Callable[..., Mapping[str, object]] | None = None,
) -> tuple:
    """Call ``forward(**arrays)`` through a custom_vjp of ``arrays``' values.

    ``forward(**arrays)`` returns the outputs (a tuple matching ``out_types``; the first
    is the differentiable output). ``backward(grad_output, wrt, **inputs)``, with
    ``inputs`` the arrays named in ``backward_inputs``, returns a cupydcn gradients tuple
    with a field ``grad_<name>`` for each name of ``wrt``. Arrays not in
    ``differentiable`` get a zero cotangent. With ``differentiable_backward(grad_output,
    wrt, **inputs)`` (a dict of the gradients of ``wrt``, computed by differentiable JAX
    functions), the backward rule calls it instead, so that the gradients can be
    differentiated again.
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
        # The output through ``op`` itself, not the callback: differentiating the backward
        # again (grad of grad) differentiates this rule too, and a callback has no JVP.
        return op(values), (values, _Wrt(wrt))

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

        if differentiable_backward is not None:
            grads = differentiable_backward(
                grad_output, wrt.names, **dict(zip(input_names, inputs))
            )
            return (tuple(grads.get(n) for n in names),)

        grad_types = tuple(_type_of(by_name[n]) for n in wrt.names)
        grads = dict(
            zip(wrt.names, _bridge.run(compute_backward, grad_types, (grad_output, *inputs)))
        )
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
    algorithm: str | None = None,
):
    """:func:`cupydcn.deform_conv2d` for JAX, differentiable (``jax.custom_vjp``) and
    usable under ``jax.jit`` and ``jax.vmap``.

    Same arguments, shapes and semantics as :func:`cupydcn.deform_conv2d`; ``input``,
    ``offset``, ``weight``, ``bias`` and ``mask`` are arrays (``bias`` and ``mask`` may be
    None), every other argument is static. Gradients flow to every array argument.
    """
    options = _conv.ConvOptions.of(locals())
    arrays = _present(
        {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    )
    geom = _plan(
        _conv.prepare_forward, ("input", "offset", "weight", "bias", "mask"), arrays, options
    )
    kwargs = options.as_kwargs()

    def forward(input, offset, weight, bias=None, mask=None):
        return (cupydcn.deform_conv2d(input, offset, weight, bias, mask=mask, **kwargs),)

    def backward(grad_output, wrt, input, offset, weight, mask=None):
        return cupydcn.deform_conv2d_backward(
            grad_output, input, offset, weight, mask, wrt=wrt, **kwargs
        )

    def differentiable_backward(grad_output, wrt, input, offset, weight, mask=None):
        return dict(zip(wrt, _conv_backward(kwargs, wrt, grad_output, input, offset, weight, mask)))

    out_type = jax.ShapeDtypeStruct(geom.output_shape, arrays["input"].dtype)
    (output,) = _apply(
        arrays,
        (out_type,),
        forward,
        backward,
        differentiable=tuple(arrays),
        backward_inputs=("input", "offset", "weight", "mask"),
        differentiable_backward=differentiable_backward,
    )
    return output


_CONV_TERMS = ("grad_output", "input", "offset", "weight", "mask")


def _conv_backward(kwargs, wrt: tuple[str, ...], grad_output, input, offset, weight, mask):
    """``cupydcn.deform_conv2d_backward`` for the gradients ``wrt`` (of input, offset,
    weight, mask, bias), as a differentiable JAX function (``jax.custom_vjp``): its own
    backward is the double backward of deform_conv2d.

    The backward ``(gx, go, gW, gm) = B(gy; x, o, W, m)`` is linear in gy, x, W and m
    separately, so with the cotangents ``(vx, vo, vW, vm)`` of its outputs every term but
    those of ``vo`` is a deform_conv2d forward or backward again (f = the forward without
    bias; both differentiable, so higher orders follow):

        d/d gy  f(vx, o, W, m) + f(x, o, vW, m) + f(x, o, W, mask=vm) + vb + [vo]
        d/d x   B_x(gy; o, vW, m) + B_x(gy; o, W, mask=vm) + [vo]
        d/d o   B_o(gy; x, o, vW, m) + B_o(gy; vx, o, W, m) + B_o(gy; x, o, W, mask=vm) + [vo]
        d/d W   B_W(gy; vx, o, m) + B_W(gy; x, o, mask=vm) + [vo]
        d/d m   B_m(gy; x, o, vW) + B_m(gy; vx, o, W) + [vo]

    The ``[vo]`` terms need second derivatives of bilinear sampling
    (cupydcn/deform_conv/second_order.py: NumPy on the CPU, its CUDA kernels on a GPU;
    padding_mode "zeros", with another one it raises). They run in a callback that JAX
    cannot differentiate, so a third derivative through them raises JAX's error.
    """
    arrays = {"grad_output": grad_output, "input": input, "offset": offset, "weight": weight}
    if mask is not None:
        arrays["mask"] = mask
    names = tuple(arrays)
    bias_type = jax.ShapeDtypeStruct((weight.shape[0],), weight.dtype)
    types = tuple(bias_type if n == "bias" else _type_of(arrays[n]) for n in wrt)

    def compute(*values):
        by_name = dict(zip(names, values))
        grads = cupydcn.deform_conv2d_backward(
            by_name["grad_output"],
            by_name["input"],
            by_name["offset"],
            by_name["weight"],
            by_name.get("mask"),
            wrt=wrt,
            **kwargs,
        )
        return tuple(getattr(grads, f"grad_{n}") for n in wrt)

    @jax.custom_vjp
    def backward(values):
        return _bridge.run(compute, types, values)

    def backward_fwd(primals):
        values = tuple(p.value for p in primals)
        return backward(values), values

    def backward_bwd(values, cotangents):
        gy, x, o, w, *rest = values
        m = rest[0] if rest else None
        # An unused gradient has a symbolic zero cotangent: its terms are skipped (and the
        # terms along the offsets, which have their limits, run only when needed).
        v = {n: ct for n, ct in zip(wrt, cotangents) if not isinstance(ct, SymbolicZero)}
        vx, vo, vw, vm, vb = (v.get(n) for n in ("input", "offset", "weight", "mask", "bias"))
        options = {
            k: kwargs[k]
            for k in ("stride", "padding", "dilation", "padding_mode", "workspace_bytes")
        }

        def f(input, weight, mask):
            return deform_conv2d(input, o, weight, None, mask=mask, **options)

        def b(input, weight, mask, wanted):
            return dict(zip(wanted, _conv_backward(kwargs, wanted, gy, input, o, weight, mask)))

        with_mask = ("mask",) if m is not None else ()
        terms = {n: [] for n in _CONV_TERMS}
        if vx is not None:
            terms["grad_output"].append(f(vx, w, m))
            for n, g in b(vx, w, m, ("offset", "weight") + with_mask).items():
                terms[n].append(g)
        if vw is not None:
            terms["grad_output"].append(f(x, vw, m))
            for n, g in b(x, vw, m, ("input", "offset") + with_mask).items():
                terms[n].append(g)
        if vm is not None:
            terms["grad_output"].append(f(x, w, vm))
            for n, g in b(x, w, vm, ("input", "offset", "weight")).items():
                terms[n].append(g)
        if vb is not None:
            terms["grad_output"].append(jnp.broadcast_to(vb[None, :, None, None], gy.shape))
        if vo is not None:
            so_names = _CONV_TERMS if m is not None else _CONV_TERMS[:-1]
            for n, g in zip(so_names, _offset_second_order(kwargs, so_names, gy, x, o, w, m, vo)):
                terms[n].append(g)
        return (tuple(sum(terms[n][1:], terms[n][0]) if terms[n] else None for n in names),)

    backward.defvjp(backward_fwd, backward_bwd, symbolic_zeros=True)
    return backward(tuple(arrays.values()))


def _offset_second_order(kwargs, wrt, grad_output, input, offset, weight, mask, tangent):
    """cupydcn/deform_conv/second_order.py's terms through :func:`_bridge.run` (not
    differentiable)."""
    from cupydcn.deform_conv.second_order import offset_second_order

    arrays = {
        "grad_output": grad_output,
        "input": input,
        "offset": offset,
        "weight": weight,
        "mask": mask,
        "offset_tangent": tangent,
    }
    present = tuple(n for n, a in arrays.items() if a is not None)
    options = {k: kwargs[k] for k in ("stride", "padding", "dilation", "padding_mode")}

    def compute(*values):
        by_name = dict(zip(present, values))
        terms = offset_second_order(*(by_name.get(n) for n in arrays), wrt=wrt, **options)
        return tuple(terms[n] for n in wrt)

    return _bridge.run(
        compute, tuple(_type_of(arrays[n]) for n in wrt), tuple(arrays[n] for n in present)
    )


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
    options = _roi.RoiPoolOptions.of(locals())
    arrays = _present({"input": input, "rois": rois, "offset": offset, "mask": mask})
    geom = _plan(_roi.prepare_forward, ("input", "rois", "offset", "mask"), arrays, options)
    kwargs = options.as_kwargs()

    def forward(input, rois, offset=None, mask=None):
        return (cupydcn.deform_roi_pool(input, rois, offset, mask, **kwargs),)

    def backward(grad_output, wrt, input, rois, offset=None, mask=None):
        return cupydcn.deform_roi_pool_backward(
            grad_output, input, rois, offset, mask, wrt=wrt, **kwargs
        )

    out_type = jax.ShapeDtypeStruct(geom.output_shape, arrays["input"].dtype)
    (output,) = _apply(
        arrays,
        (out_type,),
        forward,
        backward,
        differentiable=("input", "offset", "mask"),
        backward_inputs=("input", "rois", "offset", "mask"),
    )
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
    options = _psroi.PSRoiPoolOptions.of(locals())
    arrays = _present({"input": input, "rois": rois, "offset": offset})
    geom = _plan(_psroi.prepare_forward, ("input", "rois", "offset"), arrays, options)
    kwargs = options.as_kwargs()

    def forward(input, rois, offset=None):
        return cupydcn.deform_psroi_pool(input, rois, offset, **kwargs)

    def backward(grad_output, wrt, input, rois, offset=None):
        return cupydcn.deform_psroi_pool_backward(
            grad_output, input, rois, offset, wrt=wrt, **kwargs
        )

    out_types = (
        jax.ShapeDtypeStruct(geom.output_shape, arrays["input"].dtype),
        jax.ShapeDtypeStruct(geom.output_shape, np.int32),
    )
    output, count = _apply(
        arrays,
        out_types,
        forward,
        backward,
        differentiable=("input", "offset"),
        backward_inputs=("input", "rois", "offset"),
    )
    return output, count
