"""The one way through every op: arrays in, checks, backend, results out.

Every public function of every op family calls :func:`dispatch`::

    caller's arrays ──natives──> zero-copy NumPy / CuPy views (placement resolved once)
                    ──prepare──> the call's plan (pure: shapes, dtypes, options; raises
                                 CupydcnValueError / CupydcnTypeError naming the argument)
    compute scope (the arrays' device and stream):
                    ──check_values──> checks that read data (RoI contents), on that stream
                    ──backend──> NumPy backend on the CPU, CUDA backend on a GPU
                    ──to_caller──> results in the caller's array type (tuples kept)

A backend pair has uniform signatures: the NumPy function takes the native arrays in the
order of the call's ``arrays`` mapping, then the plan, then keyword options; the CUDA
function takes a :class:`~cupydcn.cuda.launch.KernelLauncher` first and otherwise the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from cupydcn.core import arrays as _arrays
from cupydcn.core.checks import require_arrays


@dataclass(frozen=True)
class Backends:
    """The NumPy and CUDA implementations of one op direction (forward or backward).

    numpy(*arrays, plan, **options) and cuda(launcher, *arrays, plan, **options).
    """

    numpy: Callable[..., Any]
    cuda: Callable[..., Any]

    @classmethod
    def of_modules(cls, numpy_module: ModuleType, cuda_module: ModuleType, name: str) -> Backends:
        """The function ``name`` of each backend module (every backend module of an op
        family defines the same names), looked up at each call."""

        def on_numpy(*args, **options):
            return getattr(numpy_module, name)(*args, **options)

        def on_cuda(*args, **options):
            return getattr(cuda_module, name)(*args, **options)

        return cls(numpy=on_numpy, cuda=on_cuda)

    @classmethod
    def array_api(cls, function: Callable[..., Any]) -> Backends:
        """One function written against an array module for both backends:
        ``function(xp, launcher, *arrays, plan, **options)`` with ``xp`` NumPy and
        ``launcher`` None on the CPU, CuPy and the CUDA launcher on a GPU."""

        def on_numpy(*args, **options):
            return function(np, None, *args, **options)

        def on_cuda(launcher, *args, **options):
            return function(launcher.xp, launcher, *args, **options)

        return cls(numpy=on_numpy, cuda=on_cuda)


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` returns: the plan every backend computes from (a geometry) and
    the keyword options passed on to the backend (e.g. the requested gradients)."""

    plan: Any
    options: Mapping[str, Any]


def dispatch(
    op: str,
    arrays: Mapping[str, object],
    *,
    required: tuple[str, ...] = (),
    prepare: Callable[[Mapping[str, object]], Prepared],
    backends: Backends,
    check_values: Callable[[ModuleType, Mapping[str, object], Any], None] | None = None,
):
    """Run one op call end to end; see the module docstring for the steps.

    ``arrays``: the call's array arguments by name, in the backend's parameter order
    (None for an absent optional array); ``required`` names those that must not be None.
    ``prepare(native)``: every check that needs no data, returning the plan. ``check_values(xp, native, plan)``: checks that read array
    contents, run on the arrays' device and stream before any kernel.
    """
    require_arrays(op, arrays, *required)
    placement, native = _arrays.natives(op, arrays)
    prepared = prepare(native)
    with _arrays.compute_scope(placement):
        if check_values is not None:
            check_values(_arrays.array_module(placement), native, prepared.plan)
        args = tuple(native.values())
        if placement.on_cuda:
            result = backends.cuda(
                _arrays.kernel_launcher(placement), *args, prepared.plan, **prepared.options
            )
        else:
            result = backends.numpy(*args, prepared.plan, **prepared.options)
        return _results_to_caller(placement, result)


def _results_to_caller(placement: _arrays.Placement, result):
    """A backend result (an array, a tuple or a NamedTuple of arrays) in the caller's
    array type, its structure kept."""
    if isinstance(result, tuple):
        converted = [_arrays.to_caller(placement, r) for r in result]
        return type(result)(*converted) if hasattr(result, "_fields") else tuple(converted)
    return _arrays.to_caller(placement, result)
