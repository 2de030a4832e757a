"""Public deform_conv2d forward and backward: validate, dispatch, convert back."""

from __future__ import annotations

from typing import Iterable

from . import _arrays
from ._conv_geometry import OP, conv_geometry
from ._conv_kernels import GRADIENT_NAMES, ConvGrads
from ._errors import type_error, value_error
from ._validation import check_float_dtypes, wanted_gradients

DEFAULT_WORKSPACE_BYTES = 512 * 2**20

BACKWARD_OP = "deform_conv2d_backward"


def _workspace(op: str, workspace_bytes: int | None) -> int:
    if workspace_bytes is None:
        return DEFAULT_WORKSPACE_BYTES
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int):
        raise type_error(op, f"workspace_bytes must be an int or None; got {workspace_bytes!r}")
    if workspace_bytes < 1:
        raise value_error(op, f"workspace_bytes must be positive; got {workspace_bytes}")
    return workspace_bytes


def _to_native(op: str, arrays: dict[str, object]):
    """Placement, zero-copy native arrays and the shared dtype name of one call."""
    placement, native = _arrays.natives(op, arrays)
    dtype_name = check_float_dtypes(op, {k: v for k, v in native.items() if v is not None})
    return placement, native, dtype_name


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
    """Deformable convolution (DCNv1; modulated DCNv2 when ``mask`` is given).

    Drop-in for ``torchvision.ops.deform_conv2d``; any DLPack array library, computed
    where the arrays live, returned in the caller's array type.

    Shapes:
        input  [N, C, H, W]
        offset [N, 2 * G * kh * kw, H_out, W_out] — (dy, dx) pairs per tap, G offset groups
        weight [C_out, C / groups, kh, kw]
        bias   [C_out] or None
        mask   [N, G * kh * kw, H_out, W_out] or None (multiplies each sample; no sigmoid)
        returns [N, C_out, H_out, W_out]
    with H_out = (H + 2 * pad_h - (dil_h * (kh - 1) + 1)) // stride_h + 1 (likewise W_out).

    ``stride``, ``padding``, ``dilation``: an int or an (h, w) pair. ``workspace_bytes``
    bounds the intermediate column buffers (the batch is processed in chunks that fit).

    ``padding_mode`` says how a sample point outside the map is read: "zeros" (default,
    torchvision's: out-of-map pixels are 0), "border" (each coordinate clamped into
    [0, H-1] / [0, W-1]) or "reflection" (mirrored as grid_sample(align_corners=True):
    t = |p| mod 2(H-1), p' = t if t <= H-1 else 2(H-1) - t; p' = 0 when H = 1). Details,
    including the gradients at the kinks, in cupydcn/_padding.py.
    """
    arrays = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    placement, native, dtype_name = _to_native(OP, arrays)
    geom = conv_geometry(
        native["input"], native["offset"], native["weight"], native["bias"], native["mask"],
        stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode,
    )
    workspace = _workspace(OP, workspace_bytes)
    with _arrays.compute_scope(placement):
        if placement.on_cuda:
            from ._conv_kernels import conv_forward

            output = conv_forward(
                _arrays.kernel_launcher(placement), native["input"], native["offset"], native["weight"],
                native["bias"], native["mask"], geom, dtype_name=dtype_name,
                workspace_bytes=workspace,
            )
        else:
            from ._numpy_conv import conv_forward

            output = conv_forward(
                native["input"], native["offset"], native["weight"], native["bias"],
                native["mask"], geom, workspace_bytes=workspace,
            )
        return _arrays.to_caller(placement, output)


def deform_conv2d_backward(
    grad_output,
    input,
    offset,
    weight,
    mask=None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode: str = "zeros",
    wrt: Iterable[str] | None = None,
    workspace_bytes: int | None = None,
) -> ConvGrads:
    """Gradients of :func:`deform_conv2d` given ``grad_output`` [N, C_out, H_out, W_out].

    Returns ``ConvGrads(grad_input, grad_offset, grad_weight, grad_mask, grad_bias)`` with
    the shapes of input, offset, weight, mask and [C_out]. ``wrt`` names the gradients to
    compute, a subset of ("input", "offset", "weight", "mask", "bias"); the others are None
    and cost nothing. Default: all of them (grad_mask only when ``mask`` is given).
    grad_bias is returned whether or not the forward had a bias (it does not depend on it).

    With ``padding_mode`` "border" / "reflection" the gradients follow the coordinate
    mapping: zero through a clamp, sign-flipped through a reflection. At the kinks: a
    sample exactly on the map's edge (p == 0 or p == H-1) gets the one-sided derivative
    from inside the map (like torchvision's convention at p == -1 in "zeros" mode), and
    at reflection points beyond the map the one-sided derivative of the formula's branch
    that is taken (cupydcn/_padding.py).
    """
    arrays = {"input": input, "offset": offset, "weight": weight, "mask": mask,
              "grad_output": grad_output}
    placement, native, dtype_name = _to_native(BACKWARD_OP, arrays)
    geom = conv_geometry(
        native["input"], native["offset"], native["weight"], None, native["mask"],
        stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode,
        op=BACKWARD_OP,
    )
    grad_shape = tuple(int(s) for s in native["grad_output"].shape)
    if grad_shape != geom.output_shape:
        raise value_error(
            BACKWARD_OP,
            f"grad_output has shape {grad_shape}; expected the output shape {geom.output_shape}",
        )
    wanted = wanted_gradients(
        BACKWARD_OP, wrt, {name: name != "mask" or geom.has_mask for name in GRADIENT_NAMES}
    )
    workspace = _workspace(BACKWARD_OP, workspace_bytes)
    with _arrays.compute_scope(placement):
        if placement.on_cuda:
            from ._conv_kernels import conv_backward

            grads = conv_backward(
                _arrays.kernel_launcher(placement), native["grad_output"], native["input"], native["offset"],
                native["weight"], native["mask"], geom, dtype_name=dtype_name, wrt=wanted,
                workspace_bytes=workspace,
            )
        else:
            from ._numpy_conv import conv_backward

            grads = conv_backward(
                native["grad_output"], native["input"], native["offset"], native["weight"],
                native["mask"], geom, wrt=wanted, workspace_bytes=workspace,
            )
        return ConvGrads(*(_arrays.to_caller(placement, g) for g in grads))
