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

A backward op returns its gradients as a list holding only the requested ones, in the
order of its ``output_mask`` (a ``Tensor[]``; custom ops cannot return ``Tensor?``).
"""

from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch
from torch import Tensor

import cupydcn

from cupydcn.core.errors import type_error, value_error
from cupydcn.core.checks import check_positive, finite_scalar

NAMESPACE = "cupydcn"
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
# Not capturable in a CUDA graph: on CUDA the results come from CuPy's memory pool, not
# from PyTorch's allocator, and the RoI ops read the RoIs back to the host to check them.
# Tagged, the ops stay outside the graphs of torch.compile(mode="reduce-overhead").
_TAGS = tuple(tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),) if tag is not None)


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


def _as_int(value):
    """An int (a SymInt under torch.compile stays one), or None for anything else."""
    if isinstance(value, bool) or isinstance(value, Tensor):
        return None
    if isinstance(value, (int, torch.SymInt)):
        return value
    if hasattr(value, "__index__"):
        return operator.index(value)
    return None


def _pair(op: str, name: str, value, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints as a pair, each >= ``minimum``. Checked here, before the
    op, so that the fake implementations under torch.compile never see nonsense."""
    if _as_int(value) is not None:
        pair = (_as_int(value),) * 2
    elif (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
          and all(_as_int(v) is not None for v in value)):
        pair = (_as_int(value[0]), _as_int(value[1]))
    else:
        raise type_error(op, f"{name} must be an int or a pair (h, w) of ints; got {value!r}")
    if any(isinstance(v, int) and v < minimum for v in pair):
        raise value_error(op, f"{name} must be >= {minimum} in both dimensions; got {pair}")
    return pair


# ============================================================================ deform_conv2d
_CONV_GRADS = ("input", "offset", "weight", "mask", "bias")


@torch.library.custom_op(f"{NAMESPACE}::deform_conv2d", mutates_args=(), tags=_TAGS)
def _deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    mask: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    padding_mode: str,
) -> Tensor:
    return _result(cupydcn.deform_conv2d(
        input, offset, weight, bias, tuple(stride), tuple(padding), tuple(dilation), mask,
        padding_mode=padding_mode))


def _check_dims(op: str, **tensors) -> None:
    """Fake implementations: the ranks the shape formulas need (the real ops check all)."""
    for name, (tensor, ndim) in tensors.items():
        torch._check(tensor.dim() == ndim,
                     lambda: f"{op}: {name} must be {ndim}-D; got {tensor.dim()}-D")


def _conv_out_size(op, size, pad, dil, kernel, stride):
    out = (size + 2 * pad - (dil * (kernel - 1) + 1)) // stride + 1
    torch._check(out >= 1, lambda: f"{op}: the output size would be {out} (< 1)")
    return out


@_deform_conv2d.register_fake
def _(input, offset, weight, bias, mask, stride, padding, dilation, padding_mode):
    _check_dims("deform_conv2d", input=(input, 4), weight=(weight, 4))
    n, _, h, w = input.shape
    out_channels, _, kh, kw = weight.shape
    out_h = _conv_out_size("deform_conv2d", h, padding[0], dilation[0], kh, stride[0])
    out_w = _conv_out_size("deform_conv2d", w, padding[1], dilation[1], kw, stride[1])
    return input.new_empty((n, out_channels, out_h, out_w))


@torch.library.custom_op(f"{NAMESPACE}::deform_conv2d_backward", mutates_args=(), tags=_TAGS)
def _deform_conv2d_backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    mask: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    padding_mode: str,
    output_mask: Sequence[bool],
) -> list[Tensor]:
    """Requested gradients of deform_conv2d, in the order (input, offset, weight, mask,
    bias) filtered by ``output_mask``."""
    wrt = [name for name, wanted in zip(_CONV_GRADS, output_mask) if wanted]
    if not wrt:
        return []
    grads = cupydcn.deform_conv2d_backward(
        grad_output, input, offset, weight, mask, stride=tuple(stride), padding=tuple(padding),
        dilation=tuple(dilation), padding_mode=padding_mode, wrt=wrt)
    return [_result(g) for g in grads if g is not None]


@_deform_conv2d_backward.register_fake
def _(grad_output, input, offset, weight, mask, stride, padding, dilation, padding_mode,
      output_mask):
    like = (input, offset, weight, mask, None)
    out = []
    for wanted, tensor in zip(output_mask, like):
        if wanted:
            out.append(torch.empty_like(tensor, memory_format=torch.contiguous_format)
                       if tensor is not None else weight.new_empty((weight.shape[0],)))
    return out


def _conv_setup_context(ctx, inputs, output):
    input, offset, weight, bias, mask, stride, padding, dilation, padding_mode = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.options = (stride, padding, dilation, padding_mode)
    ctx.has_bias = bias is not None
    ctx.has_mask = mask is not None


def _conv_backward(ctx, grad_output):
    input, offset, weight, mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [need[0], need[1], need[2], ctx.has_mask and need[4],
                   ctx.has_bias and need[3]]
    grads = _pick(torch.ops.cupydcn.deform_conv2d_backward(
        grad_output, input, offset, weight, mask, *ctx.options, output_mask), output_mask)
    grad_input, grad_offset, grad_weight, grad_mask, grad_bias = grads
    return grad_input, grad_offset, grad_weight, grad_bias, grad_mask, None, None, None, None


_deform_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    mask: Optional[Tensor] = None,
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
    return torch.ops.cupydcn.deform_conv2d(
        input, offset, weight, bias, mask,
        _pair(op, "stride", stride, minimum=1), _pair(op, "padding", padding, minimum=0),
        _pair(op, "dilation", dilation, minimum=1), padding_mode)


# ============================================================================ deform_roi_pool
_ROI_GRADS = ("input", "offset", "mask")


@torch.library.custom_op(f"{NAMESPACE}::deform_roi_pool", mutates_args=(), tags=_TAGS)
def _deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Optional[Tensor],
    mask: Optional[Tensor],
    output_size: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
) -> Tensor:
    return _result(cupydcn.deform_roi_pool(
        input, rois, offset, mask, output_size=tuple(output_size), spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio, gamma=gamma))


@_deform_roi_pool.register_fake
def _(input, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma):
    _check_dims("deform_roi_pool", input=(input, 4), rois=(rois, 2))
    return input.new_empty((rois.shape[0], input.shape[1], output_size[0], output_size[1]))


@torch.library.custom_op(f"{NAMESPACE}::deform_roi_pool_backward", mutates_args=(), tags=_TAGS)
def _deform_roi_pool_backward(
    grad_output: Tensor,
    input: Tensor,
    rois: Tensor,
    offset: Optional[Tensor],
    mask: Optional[Tensor],
    output_size: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    output_mask: Sequence[bool],
) -> list[Tensor]:
    """Requested gradients of deform_roi_pool, in the order (input, offset, mask)
    filtered by ``output_mask``."""
    wrt = [name for name, wanted in zip(_ROI_GRADS, output_mask) if wanted]
    if not wrt:
        return []
    grads = cupydcn.deform_roi_pool_backward(
        grad_output, input, rois, offset, mask, output_size=tuple(output_size),
        spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, gamma=gamma, wrt=wrt)
    return [_result(g) for g in grads if g is not None]


@_deform_roi_pool_backward.register_fake
def _(grad_output, input, rois, offset, mask, output_size, spatial_scale, sampling_ratio,
      gamma, output_mask):
    return [torch.empty_like(t, memory_format=torch.contiguous_format)
            for wanted, t in zip(output_mask, (input, offset, mask)) if wanted]


def _roi_setup_context(ctx, inputs, output):
    input, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma = inputs
    ctx.save_for_backward(input, rois, offset, mask)
    ctx.options = (output_size, spatial_scale, sampling_ratio, gamma)
    ctx.has = (True, offset is not None, mask is not None)


def _roi_backward(ctx, grad_output):
    input, rois, offset, mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [need[0] and ctx.has[0], need[2] and ctx.has[1], need[3] and ctx.has[2]]
    grad_input, grad_offset, grad_mask = _pick(torch.ops.cupydcn.deform_roi_pool_backward(
        grad_output, input, rois, offset, mask, *ctx.options, output_mask), output_mask)
    return grad_input, None, grad_offset, grad_mask, None, None, None, None


_deform_roi_pool.register_autograd(_roi_backward, setup_context=_roi_setup_context)


def _output_size(op: str, output_size) -> tuple[int, int]:
    return _pair(op, "output_size", output_size, minimum=1)


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    """Differentiable deformable RoI pooling (mmcv DeformRoIPool; modulated with
    ``mask``), as :func:`cupydcn.deform_roi_pool`: input [N, C, H, W], rois [K, 5],
    offset [K, 2, ph, pw] (x, y; normalised by the RoI size), mask [K, 1, ph, pw];
    returns [K, C, ph, pw]. Gradients flow to input, offset and mask, not to rois."""
    op = "deform_roi_pool"
    if not torch.compiler.is_compiling():  # traced, they may be symbolic; the op checks them
        spatial_scale = finite_scalar(op, "spatial_scale", spatial_scale)
        sampling_ratio = check_positive(op, "sampling_ratio", sampling_ratio, minimum=0)
        gamma = finite_scalar(op, "gamma", gamma)
    return torch.ops.cupydcn.deform_roi_pool(
        input, rois, offset, mask, _output_size(op, output_size), spatial_scale,
        sampling_ratio, gamma)


# ============================================================================ deform_psroi_pool
_PSROI_GRADS = ("input", "offset")


@torch.library.custom_op(f"{NAMESPACE}::deform_psroi_pool", mutates_args=(), tags=_TAGS)
def _deform_psroi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Optional[Tensor],
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int,
    sample_per_part: int,
    spatial_scale: float,
    trans_std: float,
) -> tuple[Tensor, Tensor]:
    output, count = cupydcn.deform_psroi_pool(
        input, rois, offset, output_dim=output_dim, group_size=group_size,
        pooled_size=pooled_size, part_size=part_size, sample_per_part=sample_per_part,
        spatial_scale=spatial_scale, trans_std=trans_std)
    return _result(output), _result(count)


@_deform_psroi_pool.register_fake
def _(input, rois, offset, output_dim, group_size, pooled_size, part_size, sample_per_part,
      spatial_scale, trans_std):
    _check_dims("deform_psroi_pool", input=(input, 4), rois=(rois, 2))
    shape = (rois.shape[0], output_dim, pooled_size, pooled_size)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op(f"{NAMESPACE}::deform_psroi_pool_backward", mutates_args=(), tags=_TAGS)
def _deform_psroi_pool_backward(
    grad_output: Tensor,
    input: Tensor,
    rois: Tensor,
    offset: Optional[Tensor],
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int,
    sample_per_part: int,
    spatial_scale: float,
    trans_std: float,
    output_mask: Sequence[bool],
) -> list[Tensor]:
    """Requested gradients of deform_psroi_pool, in the order (input, offset) filtered by
    ``output_mask``."""
    wrt = [name for name, wanted in zip(_PSROI_GRADS, output_mask) if wanted]
    if not wrt:
        return []
    grads = cupydcn.deform_psroi_pool_backward(
        grad_output, input, rois, offset, output_dim=output_dim, group_size=group_size,
        pooled_size=pooled_size, part_size=part_size, sample_per_part=sample_per_part,
        spatial_scale=spatial_scale, trans_std=trans_std, wrt=wrt)
    return [_result(g) for g in grads if g is not None]


@_deform_psroi_pool_backward.register_fake
def _(grad_output, input, rois, offset, output_dim, group_size, pooled_size, part_size,
      sample_per_part, spatial_scale, trans_std, output_mask):
    return [torch.empty_like(t, memory_format=torch.contiguous_format)
            for wanted, t in zip(output_mask, (input, offset)) if wanted]


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
    grad_input, grad_offset = _pick(torch.ops.cupydcn.deform_psroi_pool_backward(
        grad_output, input, rois, offset, *ctx.options, output_mask), output_mask)
    return (grad_input, None, grad_offset) + (None,) * len(ctx.options)


_deform_psroi_pool.register_autograd(_psroi_backward, setup_context=_psroi_setup_context)


def deform_psroi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Optional[Tensor] = None,
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
    [K, output_dim, P, P] (count int32, not differentiable). Gradients flow to input and
    offset, not to rois."""
    op = "deform_psroi_pool"
    for name, value in (("output_dim", output_dim), ("group_size", group_size),
                        ("pooled_size", pooled_size), ("sample_per_part", sample_per_part),
                        ("part_size", pooled_size if part_size is None else part_size)):
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
            raise type_error(op, f"{name} must be an int; got {value!r}")
        if isinstance(value, int) and value < 1:
            raise value_error(op, f"{name} must be >= 1; got {value}")
    if not torch.compiler.is_compiling():  # traced, they may be symbolic; the op checks them
        spatial_scale = finite_scalar(op, "spatial_scale", spatial_scale, positive=True)
        trans_std = finite_scalar(op, "trans_std", trans_std)
    return torch.ops.cupydcn.deform_psroi_pool(
        input, rois, offset, output_dim, group_size, pooled_size,
        pooled_size if part_size is None else part_size, sample_per_part,
        spatial_scale, trans_std)


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
        if (isinstance(value, Tensor) and value.is_floating_point()
                and value.device.type == device_type and value.dtype is not torch.float64):
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
            getattr(torch.ops.cupydcn, _name).default, _device_type, _positions)
        _autocast_library.impl(_name, _kernel, _key, with_keyset=True)
