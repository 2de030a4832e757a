"""Argument checks shared by every op: dtypes, scalars, sizes, requested gradients.

Each raises a CupydcnValueError / CupydcnTypeError whose message starts with the op and
names the argument, what was expected and what was got.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from cupydcn.core.dtypes import dtype_info
from cupydcn.core.errors import type_error, value_error


def shape_of(array) -> tuple[int, ...]:
    """The shape of any array as a tuple of Python ints (torch.Size, JAX, NumPy, CuPy)."""
    return tuple(int(s) for s in array.shape)


def check_float_dtypes(op: str, named_arrays: Mapping[str, object]) -> str:
    """All arrays share one supported floating dtype; returns its name. The first entry
    is the one the others are compared with."""
    first_name, first = next(iter(named_arrays.items()))
    info = dtype_info(first.dtype)
    if info is None:
        raise type_error(
            op,
            f"{first_name} has dtype {first.dtype}; expected one of float64, float32, "
            "float16, bfloat16",
        )
    for name, array in named_arrays.items():
        other = dtype_info(array.dtype)
        if other is None or other.name != info.name:
            raise type_error(
                op, f"{name} has dtype {array.dtype}; expected {info.name} like {first_name}"
            )
    return info.name


# The largest size or count an option may take: the kernels pass sizes as 32-bit ints
# where the index type allows, and no real layer comes near it.
MAX_OPTION_VALUE = 2**31 - 1


def is_int(value) -> bool:
    """A Python or NumPy integer, or a 0-d integer array (NumPy, PyTorch, JAX: anything
    ``operator.index`` takes); not a bool (Python, NumPy or a bool array), a float, a
    0-d float array or an array with dimensions."""
    if isinstance(value, (bool, np.bool_)) or getattr(value, "ndim", 0) != 0:
        return False
    if isinstance(value, numbers.Integral):
        return True
    if isinstance(value, numbers.Real) or not hasattr(value, "__index__"):
        return False
    if "bool" in str(getattr(value, "dtype", "")):  # torch.tensor(True) has __index__
        return False
    try:
        operator.index(value)  # a 0-d float array has __index__ but refuses it
    except Exception:
        return False
    return True


def require_arrays(op: str, arrays: Mapping[str, object], *names: str) -> None:
    """The named arguments are arrays, not None."""
    for name in names:
        if arrays.get(name) is None:
            raise type_error(op, f"{name} must be an array; got None")


def check_positive(
    op: str, name: str, value, *, minimum: int = 1, maximum: int = MAX_OPTION_VALUE
) -> int:
    """An int in [``minimum``, ``maximum``] (bools and arrays rejected) as a Python int."""
    if not is_int(value):
        raise type_error(op, f"{name} must be an int; got {_short(value)}")
    value = operator.index(value)
    if value < minimum:
        raise value_error(op, f"{name} must be >= {minimum}; got {value}")
    if value > maximum:
        raise value_error(op, f"{name} must be at most {maximum}; got {value}")
    return value


def int_pair(
    op: str, name: str, value, *, minimum: int, maximum: int = MAX_OPTION_VALUE
) -> tuple[int, int]:
    """An int or an (h, w) pair of ints, each in [minimum, maximum], as two Python ints."""
    if is_int(value):
        pair = (operator.index(value), operator.index(value))
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(is_int(v) for v in value)
    ):
        pair = (operator.index(value[0]), operator.index(value[1]))
    else:
        raise type_error(op, f"{name} must be an int or a pair (h, w) of ints; got {_short(value)}")
    for axis, v in enumerate(pair):
        if not minimum <= v <= maximum:
            bound = f">= {minimum}" if v < minimum else f"at most {maximum}"
            where = "" if is_int(value) else f" ({name}[{axis}] = {v})"
            raise value_error(op, f"{name} must be {bound} in both dimensions; got {pair}{where}")
    return pair


def conv_output_size(size: int, kernel: int, *, stride: int, padding: int, dilation: int) -> int:
    """The output length of a convolution along one axis (torchvision's formula):
    (size + 2 padding - (dilation (kernel - 1) + 1)) // stride + 1."""
    return (size + 2 * padding - (dilation * (kernel - 1) + 1)) // stride + 1


def _short(value) -> str:
    """``repr`` of an argument, shortened: an array is described, not printed."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def finite_scalar(op: str, name: str, value, *, positive: bool = False) -> float:
    """A finite real number (and > 0 when ``positive``) as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise type_error(op, f"{name} must be a real number; got {_short(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise value_error(op, f"{name} must be finite; got {value!r}")
    if positive and value <= 0:
        raise value_error(op, f"{name} must be > 0; got {value!r}")
    return value


def wanted_gradients(
    op: str, wrt: Iterable[str] | str | None, available: Mapping[str, bool]
) -> frozenset[str]:
    """The gradients a backward call computes.

    ``available`` maps every gradient name of the op, in order, to whether it can be
    computed (an optional input that was None cannot). ``wrt=None`` means all available;
    naming an unknown or unavailable gradient is an error.
    """
    if wrt is None:
        return frozenset(name for name, present in available.items() if present)
    if isinstance(wrt, str):
        wrt = (wrt,)
    try:
        wanted = frozenset(wrt)
    except TypeError:
        wanted = None
    if wanted is None or not all(isinstance(name, str) for name in wanted):
        raise type_error(
            op,
            f"wrt must be None, a gradient name or an iterable of names "
            f"from {list(available)}; got {_short(wrt)}",
        )
    unknown = sorted(wanted - set(available))
    if unknown:
        raise value_error(op, f"wrt names {unknown}; expected a subset of {list(available)}")
    for name in sorted(wanted):
        if not available[name]:
            raise value_error(op, f"wrt names {name!r} but {name} is None")
    return wanted
