"""The deformable-attention family as PyTorch custom operators (namespace ``cupydcn``).

    cupydcn::multi_scale_deformable_attn   cupydcn::multi_scale_deformable_attn_backward
    cupydcn::dcnv3                         cupydcn::dcnv3_backward
    cupydcn::dcnv4                         cupydcn::dcnv4_backward

The pattern of :mod:`cupydcn.torch._ops` (whose helpers this module uses): each forward
has a fake implementation, an autograd formula that calls its backward op for the
gradients autograd needs (``ctx.needs_input_grad``), and autocast rules for CPU and
CUDA; the real implementations call cupydcn's functional API (docs/semantics.md §8) on
the tensors themselves. A backward op returns the requested gradients as a list, in the
order of its ``output_mask``.

Schemas:

* multi_scale_deformable_attn: ``(Tensor value, SymInt[] spatial_shapes, Tensor?
  level_start_index, Tensor sampling_locations, Tensor attention_weights) -> Tensor``.
  ``spatial_shapes`` is static, flattened to ``[H_0, W_0, H_1, W_1, ...]`` (the shape
  formulas of the fakes need no data); ``level_start_index``, when a tensor, is checked by
  the op against ``spatial_shapes`` when it runs (it carries no other information). The
  backward op takes neither.
* dcnv3 / dcnv4: the tensors, then one argument per field of ``Dcnv3Options`` /
  ``Dcnv4Options`` (cupydcn/deform_attn/spec.py) in declaration order.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

import cupydcn
from cupydcn.core.checks import conv_output_size, is_int
from cupydcn.core.errors import type_error, value_error
from cupydcn.deform_attn.spec import (
    DCNV3_GRADIENT_NAMES,
    DCNV4_GRADIENT_NAMES,
    MSDA_GRADIENT_NAMES,
    Dcnv3Options,
    Dcnv4Options,
    check_level_values,
    host_ints,
)

from ._ops import (
    _AUTOCAST_DEVICE_TYPES,
    _TAGS,
    NAMESPACE,
    _autocast_kernel,
    _check_dims,
    _check_tensors,
    _custom_op,
    _fake_grads,
    _int,
    _OptionArgs,
    _pair,
    _pick,
    _real,
    _result,
    _symbolic,
)

_DCNV3 = _OptionArgs(Dcnv3Options)
_DCNV4 = _OptionArgs(Dcnv4Options)

_MSDA_OP = "multi_scale_deformable_attn"


# ============================================================================ levels
def level_shapes(op: str, spatial_shapes) -> tuple[tuple, ...]:
    """``spatial_shapes`` as a tuple of (H_l, W_l) pairs: from an integer tensor [L, 2]
    (read on the host: one small copy, so not under torch.compile), a NumPy array, or a
    sequence of pairs (ints, or SymInts under torch.compile with dynamic shapes)."""
    if isinstance(spatial_shapes, Tensor):
        if torch.compiler.is_compiling():
            raise type_error(
                op,
                "spatial_shapes must be static under torch.compile: pass a "
                "tuple of (H_l, W_l) pairs, not a tensor",
            )
        return host_ints(op, "spatial_shapes", spatial_shapes.detach().cpu().numpy(), 2)
    if spatial_shapes is None:
        raise type_error(
            op,
            "spatial_shapes must be an integer tensor [L, 2] or a sequence "
            "of (H_l, W_l) pairs; got None",
        )
    if isinstance(spatial_shapes, (tuple, list)) and (
        torch.compiler.is_compiling() or any(_symbolic(row) for row in spatial_shapes)
    ):
        # traced (ints or SymInts): only the structure is checked here, the values by the op
        rows = []
        for index, row in enumerate(spatial_shapes):
            if not isinstance(row, Sequence) or len(row) != 2:
                raise type_error(
                    op, f"spatial_shapes[{index}] must be a pair (H_l, W_l); got {row!r}"
                )
            rows.append(tuple(v if _symbolic(v) else operator.index(v) for v in row))
        return tuple(rows)
    return host_ints(op, "spatial_shapes", spatial_shapes, 2)


def _flat(shapes: Sequence[tuple]) -> list:
    return [v for row in shapes for v in row]


def _rows(flat: Sequence[int]) -> tuple[tuple[int, int], ...]:
    return tuple((int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2))


# ============================================================================ MSDA
@torch.library.custom_op(
    f"{NAMESPACE}::multi_scale_deformable_attn",
    mutates_args=(),
    tags=_TAGS,
    schema="(Tensor value, SymInt[] spatial_shapes, Tensor? level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights) -> Tensor",
)
def _msda(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
) -> Tensor:
    return _result(
        cupydcn.multi_scale_deformable_attn(
            value, _rows(spatial_shapes), level_start_index, sampling_locations, attention_weights
        )
    )


@_msda.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _check_dims(_MSDA_OP, value=(value, 4), sampling_locations=(sampling_locations, 6))
    n, _, heads, head_dim = value.shape
    return value.new_empty((n, sampling_locations.shape[1], heads * head_dim))


@torch.library.custom_op(
    f"{NAMESPACE}::multi_scale_deformable_attn_backward",
    mutates_args=(),
    tags=_TAGS,
    schema="(Tensor grad_output, Tensor value, SymInt[] spatial_shapes, "
    "Tensor sampling_locations, Tensor attention_weights, bool[] output_mask) "
    "-> Tensor[]",
)
def _msda_backward(
    grad_output, value, spatial_shapes, sampling_locations, attention_weights, output_mask
) -> list[Tensor]:
    """Requested gradients of multi_scale_deformable_attn, in the order (value,
    sampling_locations, attention_weights) filtered by ``output_mask``."""
    wrt = [name for name, wanted in zip(MSDA_GRADIENT_NAMES, output_mask) if wanted]
    if not wrt:
        return []
    grads = cupydcn.multi_scale_deformable_attn_backward(
        grad_output,
        value,
        _rows(spatial_shapes),
        None,
        sampling_locations,
        attention_weights,
        wrt=wrt,
    )
    return [_result(g) for g in grads if g is not None]


@_msda_backward.register_fake
def _(grad_output, value, spatial_shapes, sampling_locations, attention_weights, output_mask):
    return _fake_grads(output_mask, (value, sampling_locations, attention_weights))


def _msda_setup_context(ctx, inputs, output):
    value, spatial_shapes, _level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, sampling_locations, attention_weights)
    ctx.spatial_shapes = list(spatial_shapes)


def _msda_autograd(ctx, grad_output):
    value, sampling_locations, attention_weights = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [need[0], need[3], need[4]]
    grad_value, grad_locations, grad_weights = _pick(
        torch.ops.cupydcn.multi_scale_deformable_attn_backward(
            grad_output,
            value,
            ctx.spatial_shapes,
            sampling_locations,
            attention_weights,
            output_mask,
        ),
        output_mask,
    )
    return grad_value, None, None, grad_locations, grad_weights


_msda.register_autograd(_msda_autograd, setup_context=_msda_setup_context)


def multi_scale_deformable_attn(
    value: Tensor,
    spatial_shapes,
    level_start_index,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Differentiable multi-scale deformable attention (mmcv's
    ``MultiScaleDeformableAttnFunction``), as :func:`cupydcn.multi_scale_deformable_attn`:
    value [N, S, M, D], sampling_locations [N, Lq, M, L, P, 2] (normalised x, y),
    attention_weights [N, Lq, M, L, P]; returns [N, Lq, M * D].

    ``spatial_shapes``: an integer tensor [L, 2] of (H_l, W_l) rows (read on the host: not
    under torch.compile) or a sequence of pairs (under torch.compile: a tuple).
    ``level_start_index``: None, a sequence (checked now) or an integer tensor (checked
    by the op). Gradients flow to value, sampling_locations and attention_weights. Calls
    the custom op ``cupydcn::multi_scale_deformable_attn``.
    """
    op = _MSDA_OP
    starts = level_start_index
    _check_tensors(
        op,
        {
            "value": value,
            "sampling_locations": sampling_locations,
            "attention_weights": attention_weights,
        },
        "value",
        "sampling_locations",
        "attention_weights",
    )
    shapes = level_shapes(op, spatial_shapes)
    if starts is not None and not isinstance(starts, Tensor):
        # a host sequence / NumPy array: checked now (it carries no other information)
        if torch.compiler.is_compiling() and isinstance(starts, (tuple, list)):
            starts = tuple(starts)  # traced: plain ints are checked below, SymInts by no one
        else:
            starts = host_ints(op, "level_start_index", starts, 1)
        if len(starts) != len(shapes):
            raise value_error(
                op,
                f"level_start_index has {len(starts)} entries; expected "
                f"one per level of spatial_shapes ({len(shapes)})",
            )
        plain = all(type(v) is int for v in (*_flat(shapes), *starts))
        if value.dim() == 4 and plain and not _symbolic(value.shape[1]):
            check_level_values(op, shapes, starts, value.shape[1])
        starts = None
    return torch.ops.cupydcn.multi_scale_deformable_attn(
        value, _flat(shapes), starts, sampling_locations, attention_weights
    )


# ============================================================================ DCNv3 / DCNv4
def _requested(
    function, names: Sequence[str], arrays: tuple, options: _OptionArgs, values: tuple
) -> list[Tensor]:
    """A dcnv3 / dcnv4 backward op's implementation: ``function`` (cupydcn's explicit
    backward) for the gradients of ``names`` that ``output_mask`` (the last of
    ``values``, after the options) asks for."""
    *option_values, output_mask = values
    wrt = [name for name, wanted in zip(names, output_mask) if wanted]
    if not wrt:
        return []
    grads = function(*arrays, wrt=wrt, **options.kwargs(option_values))
    return [_result(g) for g in grads if g is not None]


def _dcn_fake_output(op: str, input: Tensor, options: Dcnv3Options) -> Tensor:
    _check_dims(op, input=(input, 4))
    n, h, w, channels = input.shape
    (kh, kw), (sh, sw) = options.kernel_size, options.stride
    (ph, pw), (dh, dw) = options.padding, options.dilation
    out_h = conv_output_size(h, kh, stride=sh, padding=ph, dilation=dh)
    out_w = conv_output_size(w, kw, stride=sw, padding=pw, dilation=dw)
    for out in (out_h, out_w):
        torch._check(out >= 1, lambda out=out: f"{op}: the output size would be {out} (< 1)")
    return input.new_empty((n, out_h, out_w, channels))


def dcn_options(
    op: str,
    *,
    kernel_size,
    stride,
    padding,
    dilation,
    group,
    group_channels,
    offset_scale,
    remove_center,
) -> dict:
    """The checked options of dcnv3 / dcnv4 (also the layers' constructor checks); what
    torch.compile traces symbolically is passed on for the op to check."""
    if not isinstance(remove_center, (bool, np.bool_)) and not (
        is_int(remove_center) and operator.index(remove_center) in (0, 1)
    ):
        raise type_error(op, f"remove_center must be a bool; got {remove_center!r}")
    return {
        "kernel_size": _pair(op, "kernel_size", kernel_size, minimum=1),
        "stride": _pair(op, "stride", stride, minimum=1),
        "padding": _pair(op, "padding", padding, minimum=0),
        "dilation": _pair(op, "dilation", dilation, minimum=1),
        "group": _int(op, "group", group),
        "group_channels": _int(op, "group_channels", group_channels),
        "offset_scale": _real(op, "offset_scale", offset_scale),
        "remove_center": bool(remove_center),
    }


@_custom_op("dcnv3", "Tensor input, Tensor offset, Tensor mask", _DCNV3, "Tensor")
def _dcnv3(input, offset, mask, *options) -> Tensor:
    return _result(cupydcn.dcnv3(input, offset, mask, **_DCNV3.kwargs(options)))


@_dcnv3.register_fake
def _(input, offset, mask, *options):
    return _dcn_fake_output("dcnv3", input, _DCNV3.of(options))


@_custom_op(
    "dcnv3_backward",
    "Tensor grad_output, Tensor input, Tensor offset, Tensor mask",
    _DCNV3,
    "Tensor[]",
    backward=True,
)
def _dcnv3_backward(grad_output, input, offset, mask, *options_and_mask) -> list[Tensor]:
    """Requested gradients of dcnv3, in the order (input, offset, mask) filtered by
    ``output_mask``."""
    return _requested(
        cupydcn.dcnv3_backward,
        DCNV3_GRADIENT_NAMES,
        (grad_output, input, offset, mask),
        _DCNV3,
        options_and_mask,
    )


@_dcnv3_backward.register_fake
def _(grad_output, input, offset, mask, *options_and_mask):
    return _fake_grads(options_and_mask[-1], (input, offset, mask))


def _dcnv3_setup_context(ctx, inputs, output):
    input, offset, mask, *options = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.options = tuple(options)


def _dcnv3_autograd(ctx, grad_output):
    input, offset, mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [need[0], need[1], need[2]]
    grads = _pick(
        torch.ops.cupydcn.dcnv3_backward(
            grad_output, input, offset, mask, *ctx.options, output_mask
        ),
        output_mask,
    )
    return (*grads, *(None,) * len(ctx.options))


_dcnv3.register_autograd(_dcnv3_autograd, setup_context=_dcnv3_setup_context)


def dcnv3(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    *,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
) -> Tensor:
    """Differentiable DCNv3 core (InternImage's ``DCNv3Function``), as
    :func:`cupydcn.dcnv3`: channels last, input [N, H, W, G * Cg], offset
    [N, H_out, W_out, G * P * 2] ((x, y) pairs, taps x-major), mask [N, H_out, W_out, G * P]
    (no softmax inside); returns [N, H_out, W_out, G * Cg]. Gradients flow to input, offset
    and mask. Calls the custom op ``cupydcn::dcnv3``."""
    op = "dcnv3"
    _check_tensors(op, {"input": input, "offset": offset, "mask": mask}, "input", "offset", "mask")
    checked = dcn_options(
        op,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        group=group,
        group_channels=group_channels,
        offset_scale=offset_scale,
        remove_center=remove_center,
    )
    return torch.ops.cupydcn.dcnv3(input, offset, mask, *_DCNV3.values(locals(), **checked))


@_custom_op("dcnv4", "Tensor input, Tensor offset_mask", _DCNV4, "Tensor")
def _dcnv4(input, offset_mask, *options) -> Tensor:
    return _result(cupydcn.dcnv4(input, offset_mask, **_DCNV4.kwargs(options)))


@_dcnv4.register_fake
def _(input, offset_mask, *options):
    return _dcn_fake_output("dcnv4", input, _DCNV4.of(options))


@_custom_op(
    "dcnv4_backward",
    "Tensor grad_output, Tensor input, Tensor offset_mask",
    _DCNV4,
    "Tensor[]",
    backward=True,
)
def _dcnv4_backward(grad_output, input, offset_mask, *options_and_mask) -> list[Tensor]:
    """Requested gradients of dcnv4, in the order (input, offset_mask) filtered by
    ``output_mask``."""
    return _requested(
        cupydcn.dcnv4_backward,
        DCNV4_GRADIENT_NAMES,
        (grad_output, input, offset_mask),
        _DCNV4,
        options_and_mask,
    )


@_dcnv4_backward.register_fake
def _(grad_output, input, offset_mask, *options_and_mask):
    return _fake_grads(options_and_mask[-1], (input, offset_mask))


def _dcnv4_setup_context(ctx, inputs, output):
    input, offset_mask, *options = inputs
    ctx.save_for_backward(input, offset_mask)
    ctx.options = tuple(options)


def _dcnv4_autograd(ctx, grad_output):
    input, offset_mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [need[0], need[1]]
    grads = _pick(
        torch.ops.cupydcn.dcnv4_backward(
            grad_output, input, offset_mask, *ctx.options, output_mask
        ),
        output_mask,
    )
    return (*grads, *(None,) * len(ctx.options))


_dcnv4.register_autograd(_dcnv4_autograd, setup_context=_dcnv4_setup_context)


def dcnv4(
    input: Tensor,
    offset_mask: Tensor,
    *,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
) -> Tensor:
    """Differentiable DCNv4 core (``DCNv4Function`` without softmax), as
    :func:`cupydcn.dcnv4`: input [N, H, W, G * Cg], offset_mask [N, H_out, W_out, D] with
    D >= G * 3P (per group 2P offsets as (x, y) pairs, then P mask values; the rest is
    padding, never read, gradient 0); returns [N, H_out, W_out, G * Cg]. Gradients flow to
    input and offset_mask. Calls the custom op ``cupydcn::dcnv4``."""
    op = "dcnv4"
    _check_tensors(op, {"input": input, "offset_mask": offset_mask}, "input", "offset_mask")
    checked = dcn_options(
        op,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        group=group,
        group_channels=group_channels,
        offset_scale=offset_scale,
        remove_center=remove_center,
    )
    return torch.ops.cupydcn.dcnv4(input, offset_mask, *_DCNV4.values(locals(), **checked))


# ============================================================================ autocast
# As the other ops (cupydcn/torch/_ops.py): under torch.autocast every floating tensor
# argument but float64 runs in the autocast dtype of its device (the ops need one dtype
# for all their floating arguments; the backends accumulate half types in float32).
_AUTOCAST_TENSOR_ARGS = {
    "multi_scale_deformable_attn": (0, 3, 4),
    "dcnv3": (0, 1, 2),
    "dcnv4": (0, 1),
}

_autocast_library = torch.library.Library(NAMESPACE, "FRAGMENT")

for _name, _positions in _AUTOCAST_TENSOR_ARGS.items():
    for _device_type in _AUTOCAST_DEVICE_TYPES:
        _key, _kernel = _autocast_kernel(
            getattr(torch.ops.cupydcn, _name).default, _device_type, _positions
        )
        _autocast_library.impl(_name, _kernel, _key, with_keyset=True)
