"""Offset regularisation: ``weight * reduce(offset ** 2)`` and its gradient.

An L2 penalty on deformable offsets keeps the sample points near the regular grid
(a common regulariser for DCN offsets). It works for any offset array: the conv
offsets ``[N, 2*G*kh*kw, H_out, W_out]``, the RoI pooling offsets ``[K, 2, ph, pw]``,
the PS-RoI offsets, or any other shape.

    offset_l2_penalty(offset, *, weight=1.0, reduction="mean")
        "mean": weight * sum(offset**2) / offset.size    (0 for an empty offset)
        "sum":  weight * sum(offset**2)
        "none": weight * offset**2, elementwise, the shape of offset
    offset_l2_penalty_backward(grad, offset, *, weight=1.0, reduction="mean")
        d/d offset = 2 * weight * grad * offset (/ offset.size for "mean"); grad is a 0-d
        array for "mean" / "sum" and the shape of offset for "none".

Any DLPack array (NumPy, CuPy, PyTorch, JAX), computed where it lives and returned in the
caller's array type: a 0-d array for "mean" / "sum", in the offset's dtype. Arithmetic is
in the accumulation dtype (float32 for float16 / bfloat16, rounded once at the end), with
NumPy on the CPU and CuPy elementwise operations and reductions on a GPU (half types are
widened and rounded there by the conversion kernels of
``cupydcn/cuda/kernels/convert.cu``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from cupydcn.core.checks import check_float_dtypes, finite_scalar, shape_of
from cupydcn.core.dispatch import Backends, Prepared, dispatch
from cupydcn.core.dtypes import DTYPES
from cupydcn.core.errors import value_error
from cupydcn.cuda.launch import contiguous, index_bits_for_sizes, round_to_dtype, widen_to_acc

OP = "offset_l2_penalty"
BACKWARD_OP = "offset_l2_penalty_backward"
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class PenaltyPlan:
    """What a penalty call computes: the offset's dtype name, weight and reduction."""

    dtype_name: str
    weight: float
    reduction: str


def _check_reduction(op: str, reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise value_error(op, f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    return reduction


def _prepare_forward(native, *, weight, reduction) -> Prepared:
    return Prepared(PenaltyPlan(check_float_dtypes(OP, native), weight, reduction), {})


def _prepare_backward(native, *, weight, reduction) -> Prepared:
    dtype_name = check_float_dtypes(
        BACKWARD_OP, {"offset": native["offset"], "grad": native["grad"]}
    )
    expected = shape_of(native["offset"]) if reduction == "none" else ()
    if shape_of(native["grad"]) != expected:
        what = "offset's shape" if reduction == "none" else "a 0-d array"
        raise value_error(
            BACKWARD_OP,
            f"grad has shape {shape_of(native['grad'])}; expected {expected} ({what} for "
            f"reduction={reduction!r})",
        )
    return Prepared(PenaltyPlan(dtype_name, weight, reduction), {})


class _Converter:
    """Widening to and rounding from the accumulation dtype on one backend: ``astype`` on
    the CPU, the conversion kernels through ``launcher`` on a GPU (or in the emulator)."""

    def __init__(self, xp, launcher, dtype_name: str):
        self.xp = xp
        self.launcher = launcher
        self.dtype_name = dtype_name
        self.acc = xp.dtype(DTYPES[dtype_name].acc_name)

    def widen(self, array):
        if array.dtype == self.acc:
            return array
        if self.launcher is None:
            return array.astype(self.acc)
        array = contiguous(self.xp, array)
        return widen_to_acc(self.launcher, self.dtype_name, index_bits_for_sizes(array.size), array)

    def round(self, acc_array, dtype):
        if acc_array.dtype == dtype:
            return acc_array
        if self.launcher is None:
            return acc_array.astype(dtype)
        return round_to_dtype(
            self.launcher, self.dtype_name, index_bits_for_sizes(acc_array.size), acc_array, dtype
        )


def penalty_forward(xp, launcher, offset, plan: PenaltyPlan):
    """The penalty of a native array ``offset`` (NumPy or CuPy, as ``xp``): an array of
    offset's shape ("none") or a 0-d array, in offset's dtype. ``launcher`` converts half
    types (None: ``astype``)."""
    convert = _Converter(xp, launcher, plan.dtype_name)
    x = convert.widen(offset)
    scale = xp.asarray(plan.weight, dtype=convert.acc)
    reduction = plan.reduction
    if reduction == "none":
        result = xp.asarray(scale * xp.square(x), dtype=convert.acc)
    else:
        total = xp.sum(xp.square(x), dtype=convert.acc)
        if reduction == "mean":
            total = total / x.size if x.size else xp.zeros((), dtype=convert.acc)
        result = xp.asarray(scale * total, dtype=convert.acc).reshape(())
    return convert.round(result, offset.dtype)


def penalty_backward(xp, launcher, grad, offset, plan: PenaltyPlan):
    """d penalty / d offset given ``grad`` (0-d for "mean" / "sum", offset's shape for
    "none"), in offset's dtype and shape; arguments as :func:`penalty_forward`."""
    convert = _Converter(xp, launcher, plan.dtype_name)
    x = convert.widen(offset)
    g = convert.widen(grad)
    factor = g * xp.asarray(2.0 * plan.weight, dtype=convert.acc)
    if plan.reduction == "mean" and x.size:
        factor = factor / x.size
    result = xp.asarray(factor * x, dtype=convert.acc)
    return convert.round(result, offset.dtype)


FORWARD = Backends.array_api(penalty_forward)
BACKWARD = Backends.array_api(penalty_backward)


def offset_l2_penalty(offset, *, weight=1.0, reduction: str = "mean"):
    """``weight * reduce(offset ** 2)``: an L2 penalty on deformable offsets.

    ``offset``: any floating array (float64, float32, float16, bfloat16) of any shape,
    e.g. deform_conv2d's ``[N, 2*G*kh*kw, H_out, W_out]`` or deform_roi_pool's
    ``[K, 2, ph, pw]``. ``weight``: a finite real number. ``reduction``: "mean" (the
    default; 0 for an empty offset), "sum", or "none" (elementwise, offset's shape).

    Returns a 0-d array ("mean", "sum") or an array of offset's shape ("none") of the
    caller's array type and offset's dtype, computed in the accumulation dtype and
    rounded once.
    """
    reduction = _check_reduction(OP, reduction)
    weight = finite_scalar(OP, "weight", weight)
    return dispatch(
        OP,
        {"offset": offset},
        required=("offset",),
        prepare=partial(_prepare_forward, weight=weight, reduction=reduction),
        backends=FORWARD,
    )


def offset_l2_penalty_backward(grad, offset, *, weight=1.0, reduction: str = "mean"):
    """Gradient of :func:`offset_l2_penalty` with respect to ``offset``.

    ``grad``: d loss / d penalty, a 0-d array for "mean" / "sum" and an array of offset's
    shape for "none", of offset's array library, device and dtype (a NumPy scalar is
    taken as a 0-d array). Returns
    ``2 * weight * grad * offset`` (divided by ``offset.size`` for "mean"), of offset's
    shape and dtype, in the caller's array type.
    """
    reduction = _check_reduction(BACKWARD_OP, reduction)
    weight = finite_scalar(BACKWARD_OP, "weight", weight)
    if isinstance(grad, np.generic):  # a NumPy scalar, e.g. np.float32(1.0): a 0-d array
        grad = np.asarray(grad)
    return dispatch(
        BACKWARD_OP,
        {"grad": grad, "offset": offset},
        required=("grad", "offset"),
        prepare=partial(_prepare_backward, weight=weight, reduction=reduction),
        backends=BACKWARD,
    )
