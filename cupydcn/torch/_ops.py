"""cupydcn's ops as PyTorch custom operators (namespace ``cupydcn``).

Every op and its explicit backward is a ``torch.library.custom_op``:

    cupydcn::deform_conv2d            cupydcn::deform_conv2d_backward
    cupydcn::deform_roi_pool          cupydcn::deform_roi_pool_backward
    cupydcn::deform_psroi_pool        cupydcn::deform_psroi_pool_backward

Each forward has a fake (meta) implementation for shape inference, an autograd formula
that calls its backward op (asking only for the gradients autograd needs, from
``ctx.needs_input_grad``), and autocast rules for CPU and CUDA. The real implementations
call cupydcn's functional API on the tensors themselves: CPU tensors are computed by the
NumPy backend, CUDA tensors by the CUDA kernels on PyTorch's current stream of their
device, both through zero-copy DLPack views, and the results come back as tensors that
own the buffers the backend wrote.

An op's schema is its tensors followed by one argument per field of the op's options
dataclass (``ConvOptions``, ``RoiPoolOptions``, ``PSRoiPoolOptions``, declared in the op's
``spec``), typed from the field's annotation (:class:`_OptionArgs`); the implementations,
fakes and autograd formulas take the options as ``*options`` in that order. Tuning
options (``workspace_bytes``) are not part of the schemas: the ops run with the default.

A backward op returns its gradients as a list holding only the requested ones, in the
order of its ``output_mask`` (a ``Tensor[]``; custom ops cannot return ``Tensor?``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import cupydcn
from cupydcn.core.checks import (
    check_positive,
    conv_output_size,
    finite_scalar,
    int_pair,
)
from cupydcn.core.errors import type_error, value_error
from cupydcn.core.options import IntPair, Options
from cupydcn.deform_conv.spec import GRADIENT_NAMES as _CONV_GRADS
from cupydcn.deform_conv.spec import ConvOptions
from cupydcn.psroi_pool.spec import GRADIENT_NAMES as _PSROI_GRADS
from cupydcn.psroi_pool.spec import MAX_AXIS_SIZE, MAX_SAMPLE_PER_PART, PSRoiPoolOptions
from cupydcn.roi_pool.spec import GRADIENT_NAMES as _ROI_GRADS
from cupydcn.roi_pool.spec import MAX_SAMPLING_RATIO, RoiPoolOptions

NAMESPACE = "cupydcn"
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
# Not capturable in a CUDA graph: on CUDA the results come from CuPy's memory pool, not
# from PyTorch's allocator, and the RoI ops read the RoIs back to the host to check them.
# Tagged, the ops stay outside the graphs of torch.compile(mode="reduce-overhead").
_TAGS = tuple(tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),) if tag is not None)


# ============================================================================ options
# The schema type of an option's annotation; ``X | None`` is ``X?``.
_SCHEMA_TYPES: Mapping[Any, str] = {
    IntPair: "SymInt[]",
    int: "SymInt",
    float: "float",
    str: "str",
    bool: "bool",
}


def _schema_type(hint) -> str:
    members = typing.get_args(hint)
    if type(None) in members:
        present = tuple(m for m in members if m is not type(None))
        return _schema_type(typing.Union[present]) + "?"  # noqa: UP007 (built at run time)
    return _SCHEMA_TYPES[hint]


class _OptionArgs:
    """The custom-op arguments of an op's options dataclass: their schema, and the
    conversions between the op's positional option values and the options.

    Computed once at import: the public functions run under torch.compile's tracing,
    which does not trace dataclass machinery on a class (``dataclasses.fields``)."""

    def __init__(self, options: type[Options]) -> None:
        self.options = options
        types = options.field_types(tuning=False)
        self.names = tuple(types)
        self.schema = ", ".join(f"{_schema_type(t)} {name}" for name, t in types.items())
        self.defaults = {
            f.name: f.default
            for f in dataclasses.fields(options)
            if f.default is not dataclasses.MISSING
        }

    def values(self, arguments: Mapping[str, Any], **checked) -> tuple:
        """The op's positional option values from a public function's ``arguments`` (its
        ``locals()``), ``checked`` (normalised values) taking precedence; an option the
        function does not take has its default."""
        arguments = {**arguments, **checked}
        return tuple(
            arguments[name] if name in arguments else self.defaults[name] for name in self.names
        )

    def kwargs(self, values: Sequence) -> dict[str, Any]:
        """The op's positional option values as keyword arguments of the functional API."""
        return dict(zip(self.names, values))

    def of(self, values: Sequence) -> Options:
        """The op's positional option values as the options dataclass (for the fakes)."""
        return self.options(**self.kwargs(values))


_CONV = _OptionArgs(ConvOptions)
_ROI = _OptionArgs(RoiPoolOptions)
_PSROI = _OptionArgs(PSRoiPoolOptions)


def _custom_op(
    name: str, tensors: str, options: _OptionArgs, returns: str, *, backward: bool = False
):
    """``torch.library.custom_op("cupydcn::<name>")`` with the schema ``(<tensors>,
    <options>[, bool[] output_mask]) -> <returns>``."""
    mask = ", bool[] output_mask" if backward else ""
    return torch.library.custom_op(
        f"{NAMESPACE}::{name}",
        mutates_args=(),
        tags=_TAGS,
        schema=f"({tensors}, {options.schema}{mask}) -> {returns}",
    )


# ============================================================================ helpers
def _result(tensor: Tensor) -> Tensor:
    """A backend result as an op output. The backends write fresh, contiguous buffers,
    which are returned as they are; only an unexpectedly strided result is made
    contiguous (so that it matches the fake implementation's layout)."""
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _pick(grads: Sequence[Tensor], output_mask: Sequence[bool]) -> list:
    """Expand a backward op's list of requested gradients to one entry (or None) per
    gradient name."""
    it = iter(grads)
    return [next(it) if wanted else None for wanted in output_mask]


def _backward_impl(
    function: Callable[..., tuple],
    names: Sequence[str],
    arrays: tuple,
    options: _OptionArgs,
    values: tuple,
) -> list[Tensor]:
    """A backward op's implementation: ``function`` (cupydcn's explicit backward) on the
    op's ``arrays``, for the gradients of ``names`` that the op's ``output_mask`` (the last
    of ``values``, after the options) asks for."""
    *option_values, output_mask = values
    wrt = [name for name, wanted in zip(names, output_mask) if wanted]
    if not wrt:
        return []
    # torch.use_deterministic_algorithms(True) makes the CUDA backward deterministic
    # (no float atomics); otherwise cupydcn's own setting decides (cupydcn.set_deterministic).
    deterministic = True if torch.are_deterministic_algorithms_enabled() else None
    with cupydcn.allow_tf32(torch_allows_tf32()):  # float32 GEMMs follow PyTorch's setting
        grads = function(
            *arrays, wrt=wrt, deterministic=deterministic, **options.kwargs(option_values)
        )
    return [_result(g) for g in grads if g is not None]


def _fake_grads(output_mask: Sequence[bool], like: Sequence[Tensor | None]) -> list[Tensor]:
    """A backward op's fake result: a contiguous tensor like each requested gradient's
    argument."""
    return [
        torch.empty_like(t, memory_format=torch.contiguous_format)
        for wanted, t in zip(output_mask, like)
        if wanted
    ]


def _check_dims(op: str, **tensors) -> None:
    """Fake implementations: the ranks the shape formulas need (the real ops check all)."""
    for name, (tensor, ndim) in tensors.items():
        message = f"{op}: {name} must be {ndim}-D; got {tensor.dim()}-D"
        torch._check(tensor.dim() == ndim, lambda message=message: message)


def _check_tensors(op: str, tensors: Mapping[str, object], *required: str) -> None:
    """Every argument in ``tensors`` is a torch.Tensor (the optional ones may be None).
    Checked before the op, whose dispatcher would otherwise print a NumPy array whole."""
    for name, value in tensors.items():
        if isinstance(value, Tensor) or (value is None and name not in required):
            continue
        kind = "None" if value is None else _type_name(value)
        hint = (
            ""
            if value is None
            else f" (for arrays of other libraries: cupydcn.{op}, not differentiable)"
        )
        raise type_error(f"cupydcn.torch.{op}", f"{name} must be a torch.Tensor; got {kind}{hint}")


def rois_tensor(op: str, rois):
    """``rois`` [K, 5] as it is, or torchvision's boxes form, a list (or tuple) of [L, 4]
    tensors (x1, y1, x2, y2), one per image, as the [K, 5] rows (image index, x1, y1, x2,
    y2) that torchvision's ``convert_boxes_to_roi_format`` makes."""
    if not isinstance(rois, (list, tuple)):
        return rois
    name = f"cupydcn.torch.{op}"
    if not rois:
        raise value_error(
            name,
            "rois is an empty list; expected a [K, 5] tensor or one [L, 4] "
            "tensor of boxes per image",
        )
    for i, boxes in enumerate(rois):
        if not isinstance(boxes, Tensor):
            raise type_error(
                name, f"rois[{i}] must be a torch.Tensor of boxes [L, 4]; got {_type_name(boxes)}"
            )
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise value_error(
                name,
                f"rois[{i}] has shape {tuple(boxes.shape)}; expected [L, 4] "
                f"boxes (x1, y1, x2, y2) of image {i}",
            )
        if boxes.dtype != rois[0].dtype or boxes.device != rois[0].device:
            raise type_error(
                name,
                f"rois[{i}] is a {boxes.dtype} tensor on {boxes.device} but "
                f"rois[0] a {rois[0].dtype} tensor on {rois[0].device}",
            )
    ids = torch.cat([torch.full_like(boxes[:, :1], i) for i, boxes in enumerate(rois)])
    return torch.cat([ids, torch.cat(list(rois))], dim=1)


def _type_name(value) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _symbolic(value) -> bool:
    """A SymInt (torch.compile with dynamic shapes), alone or in a pair."""
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.SymInt) for v in value)
    return isinstance(value, torch.SymInt)


# The option checks before the op, so that the fake implementations under torch.compile
# never see nonsense; they are cupydcn/core/checks.py's, except for what torch.compile
# traces symbolically, which core's checks would specialise (operator.index, float and
# comparisons guard on the symbol) or cannot read: that is passed on, and the op checks it
# when it runs.
def _pair(op: str, name: str, value, *, minimum: int) -> tuple:
    """An int or a pair of ints as the (h, w) pair a ``SymInt[]`` argument takes
    (:func:`~cupydcn.core.checks.int_pair`; SymInts passed on)."""
    if isinstance(value, torch.SymInt):
        return (value, value)
    if _symbolic(value):
        return tuple(value)
    return int_pair(op, name, value, minimum=minimum)


def _int(op: str, name: str, value, **limits):
    """An int option (:func:`~cupydcn.core.checks.check_positive`; a SymInt passed on)."""
    return value if _symbolic(value) else check_positive(op, name, value, **limits)


def _real(op: str, name: str, value, **limits):
    """A real option (:func:`~cupydcn.core.checks.finite_scalar`), unchecked under
    torch.compile: with dynamic=True a float is traced as a symbolic float, whose
    finiteness only the op can check. No fake shape depends on it."""
    if torch.compiler.is_compiling():
        return value
    return finite_scalar(op, name, value, **limits)


def conv_pairs(op: str, *, stride, padding, dilation) -> dict[str, tuple]:
    """The checked (h, w) pairs of deform_conv2d's stride, padding and dilation (also the
    layers' constructor checks)."""
    return {
        "stride": _pair(op, "stride", stride, minimum=1),
        "padding": _pair(op, "padding", padding, minimum=0),
        "dilation": _pair(op, "dilation", dilation, minimum=1),
    }


def roi_pool_options(
    op: str, *, output_size, spatial_scale, sampling_ratio, gamma
) -> dict[str, Any]:
    """The checked options of deform_roi_pool (also the RoI layers' constructor checks)."""
    return {
        "output_size": _pair(op, "output_size", output_size, minimum=1),
        "spatial_scale": _real(op, "spatial_scale", spatial_scale),
        "sampling_ratio": _int(
            op, "sampling_ratio", sampling_ratio, minimum=0, maximum=MAX_SAMPLING_RATIO
        ),
        "gamma": _real(op, "gamma", gamma),
    }


def psroi_pool_options(
    op: str,
    *,
    output_dim,
    group_size,
    pooled_size,
    part_size,
    sample_per_part,
    spatial_scale,
    trans_std,
) -> dict[str, Any]:
    """The checked options of deform_psroi_pool (also the layer's constructor checks)."""
    sizes = {
        "output_dim": output_dim,
        "group_size": group_size,
        "pooled_size": pooled_size,
        "part_size": part_size,
        "sample_per_part": sample_per_part,
    }
    checked = {
        name: _int(
            op,
            name,
            value,
            maximum=MAX_SAMPLE_PER_PART if name == "sample_per_part" else MAX_AXIS_SIZE,
        )
        for name, value in sizes.items()
        if value is not None
    }
    return {
        **sizes,
        **checked,
        "spatial_scale": _real(op, "spatial_scale", spatial_scale, positive=True),
        "trans_std": _real(op, "trans_std", trans_std),
    }


# ============================================================================ deform_conv2d
_CONV_TENSORS = "Tensor input, Tensor offset, Tensor weight, Tensor? bias, Tensor? mask"


def torch_allows_tf32() -> bool:
    """Whether PyTorch lets float32 matmuls use TF32 now:
    ``torch.backends.cuda.matmul.allow_tf32`` or a ``torch.get_float32_matmul_precision()``
    other than "highest". cupydcn.torch's ops follow it (:func:`cupydcn.allow_tf32`)."""
    return bool(torch.backends.cuda.matmul.allow_tf32) or (
        torch.get_float32_matmul_precision() != "highest"
    )


@_custom_op("deform_conv2d", _CONV_TENSORS, _CONV, "Tensor")
def _deform_conv2d(input, offset, weight, bias, mask, *options) -> Tensor:
    with cupydcn.allow_tf32(torch_allows_tf32()):
        return _result(
            cupydcn.deform_conv2d(input, offset, weight, bias, mask=mask, **_CONV.kwargs(options))
        )


@_deform_conv2d.register_fake
def _(input, offset, weight, bias, mask, *options):
    op, o = "deform_conv2d", _CONV.of(options)
    _check_dims(op, input=(input, 4), weight=(weight, 4))
    n, _, h, w = input.shape
    out_channels, _, kh, kw = weight.shape
    out_h = conv_output_size(
        h, kh, stride=o.stride[0], padding=o.padding[0], dilation=o.dilation[0]
    )
    out_w = conv_output_size(
        w, kw, stride=o.stride[1], padding=o.padding[1], dilation=o.dilation[1]
    )
    for out in (out_h, out_w):
        torch._check(out >= 1, lambda: f"{op}: the output size would be {out} (< 1)")  # noqa: B023
    return input.new_empty((n, out_channels, out_h, out_w))


@_custom_op(
    "deform_conv2d_backward",
    "Tensor grad_output, Tensor input, Tensor offset, Tensor weight, Tensor? mask",
    _CONV,
    "Tensor[]",
    backward=True,
)
def _deform_conv2d_backward(grad_output, input, offset, weight, mask, *options_and_mask):
    """Requested gradients of deform_conv2d, in the order (input, offset, weight, mask,
    bias) filtered by ``output_mask``."""
    return _backward_impl(
        cupydcn.deform_conv2d_backward,
        _CONV_GRADS,
        (grad_output, input, offset, weight, mask),
        _CONV,
        options_and_mask,
    )


@_deform_conv2d_backward.register_fake
def _(grad_output, input, offset, weight, mask, *options_and_mask):
    return _fake_grads(
        options_and_mask[-1], (input, offset, weight, mask, weight.new_empty((weight.shape[0],)))
    )


# ---------------------------------------------------------------------------- double backward
# The backward op's own autograd formula (docs in _conv_backward_backward).
_SECOND_ORDER_TERMS = ("grad_output", "input", "offset", "weight", "mask")


@_custom_op(
    "deform_conv2d_offset_second_order",
    "Tensor grad_output, Tensor input, Tensor offset, Tensor weight, Tensor? mask, "
    "Tensor offset_tangent",
    _CONV,
    "Tensor[]",
    backward=True,
)
def _deform_conv2d_offset_second_order(
    grad_output, input, offset, weight, mask, offset_tangent, *options_and_mask
):
    """The derivatives of <grad_offset, offset_tangent> with respect to (grad_output,
    input, offset, weight, mask) filtered by ``output_mask``
    (cupydcn/deform_conv/second_order.py; CUDA tensors on its kernels,
    cupydcn/deform_conv/second_order_cuda.py)."""
    from cupydcn.deform_conv.second_order import offset_second_order

    *option_values, output_mask = options_and_mask
    wrt = [name for name, wanted in zip(_SECOND_ORDER_TERMS, output_mask) if wanted]
    tensors = (grad_output, input, offset, weight, mask, offset_tangent)
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        terms = offset_second_order(
            *(None if t is None else t.detach() for t in tensors),
            **_CONV.kwargs(option_values),
            wrt=wrt,
        )
        return [terms[name] for name in wrt]
    arrays = [None if t is None else t.detach().numpy() for t in tensors]
    terms = offset_second_order(*arrays, **_CONV.kwargs(option_values), wrt=wrt)
    return [torch.from_numpy(terms[name]) for name in wrt]


@_deform_conv2d_offset_second_order.register_fake
def _(grad_output, input, offset, weight, mask, offset_tangent, *options_and_mask):
    return _fake_grads(options_and_mask[-1], (grad_output, input, offset, weight, mask))


def _refuse_third_order(ctx, grads):
    raise value_error(
        "cupydcn.torch.deform_conv2d",
        "third derivatives that go through the second "
        "derivatives along the offsets are not supported (deform_conv2d is twice "
        "differentiable)",
    )


_deform_conv2d_offset_second_order.register_autograd(
    _refuse_third_order, setup_context=lambda ctx, inputs, output: None
)


def _conv_backward_setup_context(ctx, inputs, output):
    grad_output, input, offset, weight, mask, *options_and_mask = inputs
    ctx.save_for_backward(grad_output, input, offset, weight, mask)
    ctx.options = tuple(options_and_mask[:-1])
    ctx.output_mask = tuple(options_and_mask[-1])
    # An output the loss does not use gets None, not zeros: its terms are skipped (and
    # the terms along the offsets, which have their limits, run only when needed).
    ctx.set_materialize_grads(False)


def _sum(terms):
    terms = [t for t in terms if t is not None]
    if not terms:
        return None
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _conv_backward_backward(ctx, grads):
    """Autograd formula of ``deform_conv2d_backward`` (double backward).

    The backward ``(gx, go, gW, gm, gb) = B(gy; x, o, W, m)`` is linear in gy, x, W and m
    separately, so with the cotangents ``(vx, vo, vW, vm, vb)`` of its outputs every term
    but those of ``vo`` is a deform_conv2d forward or backward again (f = the forward
    without bias):

        d/d gy  f(vx, o, W, m) + f(x, o, vW, m) + f(x, o, W, mask=vm) + vb + [vo]
        d/d x   B_x(gy; o, vW, m) + B_x(gy; o, W, mask=vm) + [vo]
        d/d o   B_o(gy; x, o, vW, m) + B_o(gy; vx, o, W, m) + B_o(gy; x, o, W, mask=vm) + [vo]
        d/d W   B_W(gy; vx, o, m) + B_W(gy; x, o, mask=vm) + [vo]
        d/d m   B_m(gy; x, o, vW) + B_m(gy; vx, o, W) + [vo]

    The ``[vo]`` terms need second derivatives of bilinear sampling:
    ``cupydcn::deform_conv2d_offset_second_order`` (NumPy on CPU tensors, CUDA kernels on
    CUDA tensors; padding_mode "zeros", a CupydcnValueError otherwise). Those ops have no
    autograd formula of their own, so a third derivative that goes through them raises
    torch's error."""
    gy, x, o, w, m = ctx.saved_tensors
    options, ops = ctx.options, torch.ops.cupydcn
    need = ctx.needs_input_grad
    need_gy, need_x, need_o, need_w = need[0], need[1], need[2], need[3]
    need_m = m is not None and need[4]
    vx, vo, vw, vm, vb = _pick(list(grads), ctx.output_mask)
    if m is None:
        vm = None

    def forward(input, weight, mask):
        return ops.deform_conv2d(input, o, weight, None, mask, *options)

    def backward(input, weight, mask, wanted):
        output_mask = [wanted.get(name, False) for name in _CONV_GRADS]
        if not any(output_mask):
            return dict.fromkeys(_CONV_GRADS)
        return dict(
            zip(
                _CONV_GRADS,
                _pick(
                    ops.deform_conv2d_backward(gy, input, o, weight, mask, *options, output_mask),
                    output_mask,
                ),
            )
        )

    none = dict.fromkeys(_CONV_GRADS)
    by_vw = (
        backward(x, vw, m, {"input": need_x, "offset": need_o, "mask": need_m})
        if vw is not None
        else none
    )
    by_vx = (
        backward(vx, w, m, {"offset": need_o, "weight": need_w, "mask": need_m})
        if vx is not None
        else none
    )
    by_vm = (
        backward(x, w, vm, {"input": need_x, "offset": need_o, "weight": need_w})
        if vm is not None
        else none
    )
    by_vo = dict.fromkeys(_SECOND_ORDER_TERMS)
    if vo is not None:
        wanted = [need_gy, need_x, need_o, need_w, need_m]
        if any(wanted):
            by_vo = dict(
                zip(
                    _SECOND_ORDER_TERMS,
                    _pick(
                        ops.deform_conv2d_offset_second_order(gy, x, o, w, m, vo, *options, wanted),
                        wanted,
                    ),
                )
            )

    grad_gy = None
    if need_gy:
        grad_gy = _sum(
            [
                forward(vx, w, m) if vx is not None else None,
                forward(x, vw, m) if vw is not None else None,
                forward(x, w, vm) if vm is not None else None,
                vb[None, :, None, None].expand_as(gy) if vb is not None else None,
                by_vo["grad_output"],
            ]
        )
    grad_x = _sum([by_vw["input"], by_vm["input"], by_vo["input"]]) if need_x else None
    grad_o = (
        _sum([by_vw["offset"], by_vx["offset"], by_vm["offset"], by_vo["offset"]])
        if need_o
        else None
    )
    grad_w = _sum([by_vx["weight"], by_vm["weight"], by_vo["weight"]]) if need_w else None
    grad_m = _sum([by_vw["mask"], by_vx["mask"], by_vo["mask"]]) if need_m else None
    return (grad_gy, grad_x, grad_o, grad_w, grad_m) + (None,) * (len(ctx.options) + 1)


_deform_conv2d_backward.register_autograd(
    _conv_backward_backward, setup_context=_conv_backward_setup_context
)


def _conv_setup_context(ctx, inputs, output):
    input, offset, weight, bias, mask, *options = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.options = tuple(options)
    ctx.has_bias = bias is not None
    ctx.has_mask = mask is not None


def _conv_backward(ctx, grad_output):
    input, offset, weight, mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [need[0], need[1], need[2], ctx.has_mask and need[4], ctx.has_bias and need[3]]
    grads = _pick(
        torch.ops.cupydcn.deform_conv2d_backward(
            grad_output, input, offset, weight, mask, *ctx.options, output_mask
        ),
        output_mask,
    )
    grad_input, grad_offset, grad_weight, grad_mask, grad_bias = grads
    return (grad_input, grad_offset, grad_weight, grad_bias, grad_mask) + (None,) * len(ctx.options)


_deform_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    mask: Tensor | None = None,
    *,
    padding_mode: str = "zeros",
) -> Tensor:
    """Differentiable deformable convolution (DCNv1; modulated DCNv2 with ``mask``).

    Same arguments and conventions as ``torchvision.ops.deform_conv2d`` and
    :func:`cupydcn.deform_conv2d`: input [N, C, H, W], offset [N, 2*G*kh*kw, H_out, W_out]
    ((dy, dx) pairs), weight [C_out, C/groups, kh, kw], bias [C_out] or None, mask
    [N, G*kh*kw, H_out, W_out] or None. Calls the custom op ``cupydcn::deform_conv2d``
    (autograd, torch.compile, autocast).
    """
    op = "deform_conv2d"
    _check_tensors(
        op,
        {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask},
        "input",
        "offset",
        "weight",
    )
    values = _CONV.values(
        locals(), **conv_pairs(op, stride=stride, padding=padding, dilation=dilation)
    )
    if torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export():
        # torch.onnx.export(..., dynamo=True): the standard ONNX DeformConv node itself
        # (cupydcn/torch/onnx.py), so that no translation table is needed; None where
        # DeformConv cannot express the call (then the custom op, which fails to export).
        from .onnx import deform_conv2d_onnx_symbolic

        node = deform_conv2d_onnx_symbolic(
            input, offset, weight, bias, mask, **_CONV.kwargs(values)
        )
        if node is not None:
            return node
    return torch.ops.cupydcn.deform_conv2d(input, offset, weight, bias, mask, *values)


def _warn_onnx_export(op: str) -> None:
    """Under torch.onnx.export(..., dynamo=True): say why the RoI pools will not export
    (cupydcn/torch/onnx.py; the exporter's own error then names the custom op)."""
    if torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export():
        import warnings

        from .onnx import refusal

        warnings.warn(refusal(op), UserWarning, stacklevel=3)


# ============================================================================ deform_roi_pool
@_custom_op(
    "deform_roi_pool", "Tensor input, Tensor rois, Tensor? offset, Tensor? mask", _ROI, "Tensor"
)
def _deform_roi_pool(input, rois, offset, mask, *options) -> Tensor:
    return _result(cupydcn.deform_roi_pool(input, rois, offset, mask, **_ROI.kwargs(options)))


@_deform_roi_pool.register_fake
def _(input, rois, offset, mask, *options):
    _check_dims("deform_roi_pool", input=(input, 4), rois=(rois, 2))
    output_size = _ROI.of(options).output_size
    return input.new_empty((rois.shape[0], input.shape[1], output_size[0], output_size[1]))


@_custom_op(
    "deform_roi_pool_backward",
    "Tensor grad_output, Tensor input, Tensor rois, Tensor? offset, Tensor? mask",
    _ROI,
    "Tensor[]",
    backward=True,
)
def _deform_roi_pool_backward(grad_output, input, rois, offset, mask, *options_and_mask):
    """Requested gradients of deform_roi_pool, in the order (input, offset, mask)
    filtered by ``output_mask``."""
    return _backward_impl(
        cupydcn.deform_roi_pool_backward,
        _ROI_GRADS,
        (grad_output, input, rois, offset, mask),
        _ROI,
        options_and_mask,
    )


@_deform_roi_pool_backward.register_fake
def _(grad_output, input, rois, offset, mask, *options_and_mask):
    return _fake_grads(options_and_mask[-1], (input, offset, mask))


def _roi_setup_context(ctx, inputs, output):
    input, rois, offset, mask, *options = inputs
    ctx.save_for_backward(input, rois, offset, mask)
    ctx.options = tuple(options)
    ctx.has = (True, offset is not None, mask is not None)


def _roi_backward(ctx, grad_output):
    input, rois, offset, mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [need[0] and ctx.has[0], need[2] and ctx.has[1], need[3] and ctx.has[2]]
    grad_input, grad_offset, grad_mask = _pick(
        torch.ops.cupydcn.deform_roi_pool_backward(
            grad_output, input, rois, offset, mask, *ctx.options, output_mask
        ),
        output_mask,
    )
    return (grad_input, None, grad_offset, grad_mask) + (None,) * len(ctx.options)


_deform_roi_pool.register_autograd(_roi_backward, setup_context=_roi_setup_context)


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    """Differentiable deformable RoI pooling (mmcv DeformRoIPool; modulated with
    ``mask``), as :func:`cupydcn.deform_roi_pool`: input [N, C, H, W], rois [K, 5]
    (batch index, x1, y1, x2, y2) or, as torchvision's ``roi_align`` takes them, a list of
    [L, 4] box tensors, one per image; offset [K, 2, ph, pw] (x, y; normalised by the RoI
    size), mask [K, 1, ph, pw]; returns [K, C, ph, pw]. Gradients flow to input, offset and
    mask, not to rois."""
    op = "deform_roi_pool"
    _warn_onnx_export(op)
    rois = rois_tensor(op, rois)
    _check_tensors(
        op, {"input": input, "rois": rois, "offset": offset, "mask": mask}, "input", "rois"
    )
    return torch.ops.cupydcn.deform_roi_pool(
        input,
        rois,
        offset,
        mask,
        *_ROI.values(
            locals(),
            **roi_pool_options(
                op,
                output_size=output_size,
                spatial_scale=spatial_scale,
                sampling_ratio=sampling_ratio,
                gamma=gamma,
            ),
        ),
    )


# ============================================================================ deform_psroi_pool
@_custom_op(
    "deform_psroi_pool", "Tensor input, Tensor rois, Tensor? offset", _PSROI, "(Tensor, Tensor)"
)
def _deform_psroi_pool(input, rois, offset, *options) -> tuple[Tensor, Tensor]:
    output, count = cupydcn.deform_psroi_pool(input, rois, offset, **_PSROI.kwargs(options))
    return _result(output), _result(count)


@_deform_psroi_pool.register_fake
def _(input, rois, offset, *options):
    _check_dims("deform_psroi_pool", input=(input, 4), rois=(rois, 2))
    o = _PSROI.of(options)
    shape = (rois.shape[0], o.output_dim, o.pooled_size, o.pooled_size)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int32)


@_custom_op(
    "deform_psroi_pool_backward",
    "Tensor grad_output, Tensor input, Tensor rois, Tensor? offset",
    _PSROI,
    "Tensor[]",
    backward=True,
)
def _deform_psroi_pool_backward(grad_output, input, rois, offset, *options_and_mask):
    """Requested gradients of deform_psroi_pool, in the order (input, offset) filtered by
    ``output_mask``."""
    return _backward_impl(
        cupydcn.deform_psroi_pool_backward,
        _PSROI_GRADS,
        (grad_output, input, rois, offset),
        _PSROI,
        options_and_mask,
    )


@_deform_psroi_pool_backward.register_fake
def _(grad_output, input, rois, offset, *options_and_mask):
    return _fake_grads(options_and_mask[-1], (input, offset))


def _psroi_setup_context(ctx, inputs, output):
    input, rois, offset, *options = inputs
    ctx.save_for_backward(input, rois, offset)
    ctx.options = tuple(options)
    ctx.has_offset = offset is not None
    ctx.mark_non_differentiable(output[1])


def _psroi_backward(ctx, grad_output, _grad_count):
    input, rois, offset = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [need[0], need[2] and ctx.has_offset]
    grad_input, grad_offset = _pick(
        torch.ops.cupydcn.deform_psroi_pool_backward(
            grad_output, input, rois, offset, *ctx.options, output_mask
        ),
        output_mask,
    )
    return (grad_input, None, grad_offset) + (None,) * len(ctx.options)


_deform_psroi_pool.register_autograd(_psroi_backward, setup_context=_psroi_setup_context)


def deform_psroi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None = None,
    *,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int | None = None,
    sample_per_part: int = 4,
    spatial_scale: float = 1.0,
    trans_std: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Differentiable deformable position-sensitive RoI pooling, as
    :func:`cupydcn.deform_psroi_pool`: returns ``(output, count)``, both
    [K, output_dim, P, P] (count int32, not differentiable). ``rois``: [K, 5] or a list of
    [L, 4] box tensors, one per image (torchvision's form). Gradients flow to input and
    offset, not to rois."""
    op = "deform_psroi_pool"
    _warn_onnx_export(op)
    rois = rois_tensor(op, rois)
    _check_tensors(op, {"input": input, "rois": rois, "offset": offset}, "input", "rois")
    return torch.ops.cupydcn.deform_psroi_pool(
        input,
        rois,
        offset,
        *_PSROI.values(
            locals(),
            **psroi_pool_options(
                op,
                output_dim=output_dim,
                group_size=group_size,
                pooled_size=pooled_size,
                part_size=part_size,
                sample_per_part=sample_per_part,
                spatial_scale=spatial_scale,
                trans_std=trans_std,
            ),
        ),
    )


# ============================================================================ autocast
# Under torch.autocast an op runs in the autocast dtype of its device (float16 or
# bfloat16, whichever the autocast region asks for), the way aten's lower-precision ops
# do: floating tensors other than float64 are cast to it, RoIs are left as they are
# (coordinates keep their precision; the ops accept any floating dtype for them). The
# backends load half types into float32, accumulate in float32 and round once.
# torch.library.register_autocast fixes one dtype per device at registration time, so
# the kernels are registered here directly.

_AUTOCAST_TENSOR_ARGS = {
    # op name: positions of the floating tensor arguments that follow the autocast dtype
    "deform_conv2d": (0, 1, 2, 3, 4),
    "deform_roi_pool": (0, 2, 3),
    "deform_psroi_pool": (0, 2),
}

_autocast_library = torch.library.Library(NAMESPACE, "FRAGMENT")


def _autocast_kernel(op, device_type: str, positions: tuple[int, ...]):
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def cast(value):
        if (
            isinstance(value, Tensor)
            and value.is_floating_point()
            and value.device.type == device_type
            and value.dtype is not torch.float64
        ):
            return value.to(torch.get_autocast_dtype(device_type))
        return value

    def kernel(_keyset, *args):
        args = [cast(a) if i in positions else a for i, a in enumerate(args)]
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args)

    return key, kernel


for _name, _positions in _AUTOCAST_TENSOR_ARGS.items():
    for _device_type in _AUTOCAST_DEVICE_TYPES:
        _key, _kernel = _autocast_kernel(
            getattr(torch.ops.cupydcn, _name).default, _device_type, _positions
        )
        _autocast_library.impl(_name, _kernel, _key, with_keyset=True)
