"""The CuPy implementation of :class:`~cupydcn.cuda.launch.KernelLauncher`.

One compiled module per (device, source file, dtype, index width) and one kernel function
per (device, specialisation), memoised; kernels launch on CuPy's current stream (set by
:func:`cupydcn.core.arrays.compute_scope`). Arguments are checked against the kernel's
declared parameters (KERNEL_PARAMETERS of :mod:`cupydcn.cuda.kernel_source`) before a
launch, as the CPU emulator's checked mode does: a wrong argument is an error naming the
kernel and the argument, not a kernel reading garbage.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from cupydcn.core.errors import CupydcnRuntimeError, CupydcnTypeError, CupydcnValueError
from cupydcn.cuda.kernel_source import (
    NVRTC_OPTIONS,
    SOURCE_OF_KERNEL,
    kernel_parameters,
    module_source,
    name_expression,
    name_expressions,
)
from cupydcn.cuda.launch import launch_config

_INDEX_SCALARS = {32: np.int32, 64: np.int64}
_NULL = np.uint64(0)


def pack_arguments(
    kernel: str, dtype_name: str, index_bits: int, args: Sequence[object], array_type: type
) -> tuple:
    """The launch arguments of one specialisation: arrays (instances of ``array_type``,
    C-contiguous, of the parameter's dtype) as they are, ``None`` as a null pointer, and
    integral scalars (Python or NumPy ints, not bools) as the index type. Anything else,
    a wrong count or an int outside the index type's range raises a
    :class:`~cupydcn.core.errors.CupydcnTypeError` / ``CupydcnValueError`` naming the
    kernel and the argument's position."""
    where = name_expression(kernel, dtype_name, index_bits)
    parameters = kernel_parameters(kernel)
    if len(args) != len(parameters):
        raise CupydcnTypeError(
            f"{where}: takes {len(parameters)} arguments "
            f"({', '.join(map(str, parameters))}); got {len(args)}"
        )
    index_scalar = _INDEX_SCALARS[index_bits]
    low, high = int(np.iinfo(index_scalar).min), int(np.iinfo(index_scalar).max)
    packed = []
    for position, (parameter, arg) in enumerate(zip(parameters, args)):
        what = f"{where}: argument {position} ({parameter})"
        expected = parameter.dtype_name(dtype_name, index_bits)
        if parameter.pointer:
            if arg is None:
                packed.append(_NULL)
                continue
            if not isinstance(arg, array_type):
                raise CupydcnTypeError(
                    f"{what} must be a {array_type.__module__}."
                    f"{array_type.__name__} or None; got "
                    f"{type(arg).__module__}.{type(arg).__name__}"
                )
            if arg.dtype.name != expected:
                raise CupydcnTypeError(f"{what} must have dtype {expected}; got {arg.dtype.name}")
            if not arg.flags.c_contiguous:
                raise CupydcnValueError(f"{what} of shape {arg.shape} is not C-contiguous")
            packed.append(arg)
        else:
            if isinstance(arg, (bool, np.bool_)) or not isinstance(arg, (int, np.integer)):
                raise CupydcnTypeError(
                    f"{what} must be an integer; got {type(arg).__name__} {arg!r}"
                )
            if not low <= int(arg) <= high:
                raise CupydcnValueError(f"{what} = {int(arg)} does not fit {expected}")
            packed.append(index_scalar(int(arg)))
    return tuple(packed)


def raw_module_arguments(source_file: str, dtype_name: str, index_bits: int) -> dict:
    """The ``cupy.RawModule`` keyword arguments of one source file for one dtype and index
    width: the source string, the options and the name expressions CuPy compiles (and
    keys its disk cache) with. ``cupydcn.precompile`` builds from the same."""
    return dict(
        code=module_source(source_file),
        options=tuple(NVRTC_OPTIONS),
        name_expressions=name_expressions(source_file, dtype_name, index_bits),
    )


def raw_module(source_file: str, dtype_name: str, index_bits: int):
    """The ``cupy.RawModule`` of one source file for one dtype and index width (compiled
    by CuPy on first use, through its disk cache: what ``cupydcn.precompile`` fills)."""
    import cupy

    return cupy.RawModule(**raw_module_arguments(source_file, dtype_name, index_bits))


@functools.cache
def _module(device_id: int, source_file: str, dtype_name: str, index_bits: int):
    import cupy

    with cupy.cuda.Device(device_id):
        return raw_module(source_file, dtype_name, index_bits)


@functools.cache
def _function(device_id: int, kernel: str, dtype_name: str, index_bits: int):
    """The kernel function of one specialisation on one device (compiling its module on
    first use)."""
    module = _module(device_id, SOURCE_OF_KERNEL[kernel], dtype_name, index_bits)
    return module.get_function(name_expression(kernel, dtype_name, index_bits))


def _current_device_id() -> int:
    import cupy

    return cupy.cuda.Device().id


class CupyLauncher:
    """Launches ``cupydcn/cuda/kernels/`` specialisations with CuPy on the current device and stream."""

    def __init__(self) -> None:
        import cupy

        self.xp = cupy

    def launch(
        self,
        kernel: str,
        dtype_name: str,
        index_bits: int,
        total: int,
        args: Sequence[object],
    ) -> None:
        if total == 0:
            return
        cupy = self.xp
        packed = pack_arguments(kernel, dtype_name, index_bits, args, cupy.ndarray)
        try:
            function = _function(_current_device_id(), kernel, dtype_name, index_bits)
            blocks, threads = launch_config(total)
            function((blocks,), (threads,), packed)
        except (
            cupy.cuda.driver.CUDADriverError,
            cupy.cuda.runtime.CUDARuntimeError,
            cupy.cuda.compiler.CompileException,
        ) as exc:
            raise CupydcnRuntimeError(
                f"launching {name_expression(kernel, dtype_name, index_bits)} over {total} "
                f"items failed: {exc}"
            ) from exc

    def stable_argsort(self, keys):
        """The indices that sort the 1-D ``keys`` stably (the deterministic backward's
        sort, :mod:`cupydcn.cuda.deterministic`): CuPy's argsort, a stable radix sort."""
        return self.xp.argsort(keys)


@functools.lru_cache(maxsize=1)
def cupy_launcher() -> CupyLauncher:
    return CupyLauncher()
