"""ONNX export of cupydcn's custom ops: ``cupydcn::deform_conv2d`` as the standard ONNX
``DeformConv`` (opset 19; opset 22 for bfloat16).

ONNX's ``DeformConv`` takes the inputs ``X, W, offset, B, mask`` (ours: input, offset,
weight, bias, mask) and the attributes ``dilations, group, kernel_shape, offset_group,
pads, strides``; its offsets are interleaved (dy, dx) per tap, offset group major, and
its mask is [N, offset_group * kh * kw, H_out, W_out], as ours. ``group`` and
``offset_group`` are read from the static channel sizes (C / weight.shape[1] and
offset.shape[1] / (2 * kh * kw)).

* ``torch.onnx.export(..., dynamo=True)`` (the exporter torch recommends) works as it
  is: while it traces ``cupydcn.torch.deform_conv2d`` (and the layers, which call it),
  that function returns the ``DeformConv`` node itself (``torch.onnx.ops.symbolic``).
  A graph that already holds the custom op (an ``ExportedProgram`` from
  ``torch.export.export``, given to ``torch.onnx.export``) needs
  :func:`onnx_translation_table` as ``custom_translation_table``; :func:`export_onnx`
  passes it always. Without it the exporter stops with "No ONNX function found for
  cupydcn.deform_conv2d".
* The TorchScript exporter (``dynamo=False``, deprecated by torch): a symbolic for
  ``cupydcn::deform_conv2d`` is registered for opset 19 when this module is imported
  (by ``import cupydcn.torch``), so it exports the same ``DeformConv`` node; an opset
  below 19 has no ``DeformConv`` and fails with torch's "unsupported operator" error.
* What the standard op cannot express is refused: ``padding_mode`` other than "zeros"
  (DeformConv reads zeros outside the map) and the RoI pools (``deform_roi_pool``,
  ``deform_psroi_pool``: no standard ONNX op; not exported to a custom domain). With the
  table (:func:`export_onnx`) and with the TorchScript exporter a
  :class:`~cupydcn.core.errors.CupydcnValueError` names the reason; plain
  ``torch.onnx.export`` warns with that reason (an error raised while it traces would
  only make it retry another capture strategy) and then fails naming the custom op.
  bfloat16 needs ``opset_version=22`` (DeformConv-22); below, the ONNX version
  converter refuses the node.
* Only the channel sizes and the kernel must be static (they give ``group``,
  ``offset_group`` and ``kernel_shape``); batch, height and width may be dynamic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from cupydcn.core.errors import value_error

ONNX_OPSET = 19  # DeformConv since opset 19 (float16, float, double)
ONNX_BFLOAT16_OPSET = 22  # DeformConv-22 adds bfloat16
_EXPORT = "cupydcn.torch ONNX export"


def deform_conv_attributes(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    offset_shape: Sequence[int],
    stride,
    padding,
    dilation,
    padding_mode: str,
) -> dict[str, Any]:
    """The ONNX ``DeformConv`` attributes of a ``deform_conv2d`` call (static sizes).

    Raises CupydcnValueError for what the standard op cannot express."""
    if padding_mode != "zeros":
        raise value_error(
            _EXPORT,
            f"deform_conv2d with padding_mode={padding_mode!r} cannot be exported: "
            "ONNX DeformConv reads zeros outside the input (padding_mode='zeros' "
            "only)",
        )
    channels, (kh, kw) = int(input_shape[1]), (int(weight_shape[2]), int(weight_shape[3]))
    pad_h, pad_w = (int(p) for p in padding)
    return {
        "dilations": [int(d) for d in dilation],
        "group": channels // int(weight_shape[1]),
        "kernel_shape": [kh, kw],
        "offset_group": int(offset_shape[1]) // (2 * kh * kw),
        "pads": [pad_h, pad_w, pad_h, pad_w],
        "strides": [int(s) for s in stride],
    }


def _static(shape, what: str) -> list[int]:
    dims = list(shape)
    if any(not isinstance(d, int) for d in dims):
        raise value_error(
            _EXPORT,
            f"deform_conv2d needs a static {what} shape for DeformConv's "
            f"group and offset_group attributes; got {dims}",
        )
    return dims


# ---------------------------------------------------------------------------- dynamo exporter
def deform_conv2d_onnx_symbolic(
    input, offset, weight, bias, mask, *, stride, padding, dilation, padding_mode
):
    """The ONNX ``DeformConv`` node of a ``cupydcn.torch.deform_conv2d`` call traced by
    ``torch.onnx.export(..., dynamo=True)`` (``torch.onnx.ops.symbolic``): what that
    function returns while the exporter traces it, so that plain ``torch.onnx.export``
    needs no translation table.

    Where DeformConv cannot express the call (padding_mode other than "zeros") it warns
    and returns None: raising here would only make the exporter retry with another
    capture strategy and lose the message; the call then stays the custom op, which has
    no translation of its own (:func:`export_onnx` and :func:`onnx_translation_table`
    give the clear error)."""
    import warnings

    from cupydcn.core.checks import conv_output_size

    try:
        attributes = deform_conv_attributes(
            input.shape, weight.shape, offset.shape, stride, padding, dilation, padding_mode
        )
    except ValueError as e:
        warnings.warn(str(e), UserWarning, stacklevel=3)
        return None
    (kh, kw), n = attributes["kernel_shape"], input.shape[0]
    out_h = conv_output_size(
        input.shape[2], kh, stride=stride[0], padding=padding[0], dilation=dilation[0]
    )
    out_w = conv_output_size(
        input.shape[3], kw, stride=stride[1], padding=padding[1], dilation=dilation[1]
    )
    version = ONNX_BFLOAT16_OPSET if input.dtype == torch.bfloat16 else ONNX_OPSET
    return torch.onnx.ops.symbolic(
        "DeformConv",
        [input, weight, offset, bias, mask],
        attributes,
        dtype=input.dtype,
        shape=(n, weight.shape[0], out_h, out_w),
        version=version,
    )


def _deform_conv2d_onnx(input, offset, weight, bias, mask, stride, padding, dilation, padding_mode):
    """onnxscript translation of ``cupydcn::deform_conv2d`` (torch.onnx.export, dynamo)."""
    import onnx_ir
    from onnxscript import opset19, opset22

    # Only the channel sizes and the kernel need to be static (any other size may be
    # dynamic: batch, height, width).
    attributes = deform_conv_attributes(
        [0] + _static(list(input.shape)[1:2], "input channel"),
        _static(weight.shape, "weight"),
        [0] + _static(list(offset.shape)[1:2], "offset channel"),
        stride,
        padding,
        dilation,
        padding_mode,
    )
    opset = opset22 if input.dtype == onnx_ir.DataType.BFLOAT16 else opset19
    return opset.DeformConv(input, weight, offset, bias, mask, **attributes)


def refusal(op: str) -> str:
    """Why ``op`` (a RoI pool) is not exported."""
    return (
        f"{_EXPORT}: {op} has no standard ONNX operator and cupydcn does not export it "
        f"to a custom domain; keep the RoI pooling outside the exported model"
    )


def _refuse(op: str) -> Callable[..., Any]:
    def translation(*args, **kwargs):
        raise value_error(_EXPORT, refusal(op).split(": ", 1)[1])

    translation.__name__ = f"_{op}_onnx"
    return translation


def onnx_translation_table() -> dict[Callable, Callable]:
    """The ``custom_translation_table`` of ``torch.onnx.export(..., dynamo=True)`` for
    cupydcn's ops: ``cupydcn::deform_conv2d`` becomes ONNX ``DeformConv``; the RoI pools
    raise a CupydcnValueError (no standard op). Needs ``onnxscript``."""
    ops = torch.ops.cupydcn
    return {
        ops.deform_conv2d.default: _deform_conv2d_onnx,
        ops.deform_roi_pool.default: _refuse("deform_roi_pool"),
        ops.deform_psroi_pool.default: _refuse("deform_psroi_pool"),
    }


def export_onnx(
    model,
    args=(),
    f=None,
    *,
    opset_version: int = ONNX_OPSET,
    custom_translation_table=None,
    **kwargs,
):
    """``torch.onnx.export(model, args, f, dynamo=True, opset_version=19, ...)`` with
    cupydcn's translations (:func:`onnx_translation_table`; entries of
    ``custom_translation_table`` are added to them). Returns the ``ONNXProgram``."""
    table = {**onnx_translation_table(), **(custom_translation_table or {})}
    return torch.onnx.export(
        model,
        args,
        f,
        dynamo=True,
        opset_version=opset_version,
        custom_translation_table=table,
        **kwargs,
    )


# ---------------------------------------------------------------------------- TorchScript exporter
def _deform_conv2d_symbolic(
    g, input, offset, weight, bias, mask, stride, padding, dilation, padding_mode
):
    """TorchScript-exporter symbolic of ``cupydcn::deform_conv2d`` (opset 19)."""
    from torch.onnx import symbolic_helper as sh

    def sizes(value, what, dims):
        shape = sh._get_tensor_sizes(value)
        if shape is None or any(shape[d] is None for d in dims):
            raise value_error(_EXPORT, f"deform_conv2d needs a static {what} shape; got {shape}")
        return shape

    attributes = deform_conv_attributes(
        sizes(input, "input channel", [1]),
        sizes(weight, "weight", range(4)),
        sizes(offset, "offset channel", [1]),
        sh._maybe_get_const(stride, "is"),
        sh._maybe_get_const(padding, "is"),
        sh._maybe_get_const(dilation, "is"),
        sh._maybe_get_const(padding_mode, "s"),
    )
    if sh._is_none(bias):
        bias = sh._optional_input_placeholder_tensor(g)
    inputs = [input, weight, offset, bias] + ([] if sh._is_none(mask) else [mask])
    # Every attribute is an int or a list of ints: the "_i" suffix of g.op.
    return g.op("DeformConv", *inputs, **{f"{name}_i": value for name, value in attributes.items()})


def _refuse_symbolic(op: str):
    refuse = _refuse(op)

    def symbolic(g, *args):
        refuse()

    return symbolic


def register_torchscript_symbolics() -> None:
    """Register the TorchScript exporter's symbolics (done by ``import cupydcn.torch``)."""
    from torch.onnx import register_custom_op_symbolic

    register_custom_op_symbolic("cupydcn::deform_conv2d", _deform_conv2d_symbolic, ONNX_OPSET)
    for op in ("deform_roi_pool", "deform_psroi_pool"):
        register_custom_op_symbolic(f"cupydcn::{op}", _refuse_symbolic(op), ONNX_OPSET)
