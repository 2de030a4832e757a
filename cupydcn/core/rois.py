"""Checks shared by the RoI pooling ops: the ``rois`` array and the work per bin.

``rois [K, 5]`` rows are ``[batch_index, x1, y1, x2, y2]`` in input-image coordinates, of
any floating dtype; batch_index must be an integer value in [0, N). The shape and dtype
check is pure (:func:`check_rois_shape`); the value check reads the array
(:func:`check_roi_values`: on a GPU one small reduction and one device-to-host copy) and
runs inside the dispatch, on the arrays' device and stream, before any kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from cupydcn.core.checks import shape_of
from cupydcn.core.dtypes import dtype_info
from cupydcn.core.errors import type_error, value_error

# The most bilinear samples one output bin may average (a 1024 x 1024 grid): a bound on
# the work of one kernel thread, so no RoI makes a kernel run for minutes.
MAX_SAMPLES_PER_BIN = 2**20


def check_rois_shape(op: str, rois) -> int:
    """Check the shape and dtype of ``rois``; return K, the number of RoIs."""
    if len(shape_of(rois)) != 2 or shape_of(rois)[1] != 5:
        raise value_error(
            op, f"rois must have shape [K, 5] (batch_index, x1, y1, x2, y2); got {shape_of(rois)}"
        )
    if dtype_info(rois.dtype) is None:
        raise type_error(
            op,
            f"rois has dtype {rois.dtype}; expected a floating dtype (float64, float32, "
            "float16, bfloat16)",
        )
    return shape_of(rois)[0]


def check_roi_values(
    op: str, xp, rois, batch: int, *, samples_per_bin: Callable[[object], object] | None = None
) -> None:
    """Every row of ``rois`` is finite with an integer batch index in [0, batch); and,
    when ``samples_per_bin(values)`` is given (``values``: rois as float64 [K, 5] of
    ``xp``; returns [K] sample counts), no bin averages more than MAX_SAMPLES_PER_BIN."""
    if shape_of(rois)[0] == 0:
        return
    values = rois.astype(xp.float64)
    finite = xp.isfinite(values).all(axis=1)
    index = values[:, 0]
    integral = index == xp.floor(index)
    in_range = (index >= 0) & (index < batch)
    counts = [(~finite).sum(), (~integral).sum(), (~in_range).sum()]
    if samples_per_bin is not None:
        # Huge coordinates times spatial_scale may overflow to inf (a count over the
        # limit) or, as inf - inf, to NaN (no samples: the kernels' grid is 0 for NaN).
        with np.errstate(over="ignore", invalid="ignore"):
            samples = samples_per_bin(xp.where(finite[:, None], values, 0.0))
            samples = xp.where(samples > 0, samples, 0.0)  # NaN -> 0, so max sees the rest
        counts.append(samples.max())
    # One device-to-host transfer for every count.
    bad_finite, bad_integral, bad_range, *most = (
        float(x) for x in xp.stack([xp.asarray(c, dtype=xp.float64) for c in counts]).tolist()
    )
    if bad_finite:
        row = int(xp.argmin(finite))
        raise value_error(op, f"rois[{row}] = {_row(values, row)} has a non-finite value")
    if bad_integral:
        row = int(xp.argmin(integral))
        raise value_error(
            op, f"rois[{row}, 0] = {float(index[row])!r} is not an integer batch index"
        )
    if bad_range:
        row = int(xp.argmin(in_range))
        raise value_error(
            op, f"rois[{row}, 0] = {int(index[row])} is outside the batch range [0, {batch})"
        )
    if most and most[0] > MAX_SAMPLES_PER_BIN:
        row = int(xp.argmax(samples))
        raise value_error(
            op,
            f"rois[{row}] = {_row(values, row)} needs {_count(most[0])} samples per output "
            f"bin with sampling_ratio=0 (ceil(RoI size * spatial_scale / output size) per "
            f"axis); the limit is {MAX_SAMPLES_PER_BIN}: pass a sampling_ratio, a larger "
            f"output_size or a smaller RoI",
        )


def _count(samples: float) -> str:
    return f"{int(samples)}" if math.isfinite(samples) else "infinitely many"


def _row(values, row: int) -> list[float]:
    return [float(v) for v in values[row].tolist()]
