"""Validation shared by the RoI pooling ops: the ``rois`` array and positive sizes.

``rois [K, 5]`` rows are ``[batch_index, x1, y1, x2, y2]`` in input-image coordinates, of
any floating dtype; batch_index must be an integer value in [0, N). Value checks read the
array (on a GPU: one small reduction and a device-to-host copy), before any kernel runs.
"""

from __future__ import annotations

from ._dtypes import dtype_info
from ._errors import type_error, value_error
from ._validation import shape_of



def check_rois(op: str, xp, rois, batch: int) -> int:
    """Check shape, dtype and values of ``rois`` against a batch of ``batch`` images;
    return K, the number of RoIs."""
    if len(shape_of(rois)) != 2 or shape_of(rois)[1] != 5:
        raise value_error(
            op, f"rois must have shape [K, 5] (batch_index, x1, y1, x2, y2); got {shape_of(rois)}"
        )
    if dtype_info(rois.dtype) is None:
        raise type_error(
            op, f"rois has dtype {rois.dtype}; expected a floating dtype (float64, float32, "
            "float16, bfloat16)"
        )
    count = shape_of(rois)[0]
    if count == 0:
        return 0
    values = rois.astype(xp.float64)
    finite = xp.isfinite(values).all(axis=1)
    index = values[:, 0]
    integral = index == xp.floor(index)
    in_range = (index >= 0) & (index < batch)
    # One device-to-host transfer for the three counts.
    counts = xp.stack([(~finite).sum(), (~integral).sum(), (~in_range).sum()])
    bad_finite, bad_integral, bad_range = (int(x) for x in counts.tolist())
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
    return count


def _row(values, row: int) -> list[float]:
    return [float(v) for v in values[row].tolist()]
