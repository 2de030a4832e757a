"""Argument checks shared by every op: dtypes, scalars, sizes, requested gradients.

Each raises a CupydcnValueError / CupydcnTypeError whose message starts with the op and
names the argument, what was expected and what was got.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Mapping

from ._dtypes import dtype_info
from ._errors import type_error, value_error


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


def check_positive(op: str, name: str, value, *, minimum: int = 1) -> int:
    """An int >= ``minimum`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise type_error(op, f"{name} must be an int; got {value!r}")
    value = int(value)
    if value < minimum:
        raise value_error(op, f"{name} must be >= {minimum}; got {value}")
    return value


def finite_scalar(op: str, name: str, value, *, positive: bool = False) -> float:
    """A finite real number (and > 0 when ``positive``) as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise type_error(op, f"{name} must be a real number; got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise value_error(op, f"{name} must be finite; got {value!r}")
    if positive and value <= 0:
        raise value_error(op, f"{name} must be > 0; got {value!r}")
    return value


def wanted_gradients(op: str, wrt: Iterable[str] | str | None,
                     available: Mapping[str, bool]) -> frozenset[str]:
    """The gradients a backward call computes.

    ``available`` maps every gradient name of the op, in order, to whether it can be
    computed (an optional input that was None cannot). ``wrt=None`` means all available;
    naming an unknown or unavailable gradient is an error.
    """
    if wrt is None:
        return frozenset(name for name, present in available.items() if present)
    wanted = frozenset((wrt,) if isinstance(wrt, str) else wrt)
    unknown = sorted(wanted - set(available))
    if unknown:
        raise value_error(op, f"wrt names {unknown}; expected a subset of {list(available)}")
    for name in sorted(wanted):
        if not available[name]:
            raise value_error(op, f"wrt names {name!r} but {name} is None")
    return wanted
