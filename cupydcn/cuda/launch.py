"""What the kernel orchestration needs from a device: an array module and a launcher.

The orchestration in the ``cuda_backend`` modules (buffers, chunking, GEMMs, kernel
launches) is written once against :class:`KernelLauncher`. On a GPU the launcher is CuPy's
(:mod:`cupydcn.cuda.cupy_launcher`) and ``xp`` is CuPy; the CPU test harness in ``tests/emulator``
provides a launcher that runs the same ``cupydcn/cuda/kernels/`` sources compiled for the host, with
``xp`` = NumPy. So the emulated tests exercise the real launch code, not a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import NamedTuple, Protocol

from cupydcn.core.dtypes import DTYPES
from cupydcn.cuda.kernel_source import kernel_parameters

BLOCK_SIZE = 256
# Grid-stride kernels need no more blocks than this to fill any current GPU.
MAX_BLOCKS = 65536


class KernelLauncher(Protocol):
    """Runs one specialisation of a kernel template over ``total`` work items.

    ``args`` are passed in the kernel's parameter order: arrays of ``xp`` (their data
    pointer is passed; views are fine, they must be C-contiguous), ``None`` for a null
    pointer, and integers (Python or NumPy), which become the index type (int32 or int64).
    :func:`kernel_arguments` builds such a list from the parameters' names.

    A launcher may also have ``stable_argsort(keys)`` (the indices that sort a 1-D integer
    array of ``xp`` stably), which the deterministic backward uses
    (:mod:`cupydcn.cuda.deterministic`); without it ``xp.argsort`` is used.
    """

    xp: ModuleType

    def launch(
        self,
        kernel: str,
        dtype_name: str,
        index_bits: int,
        total: int,
        args: Sequence[object],
    ) -> None: ...


def kernel_arguments(kernel: str, **values: object) -> list[object]:
    """The argument list of ``kernel`` from its parameters' names (KERNEL_PARAMETERS of
    :mod:`cupydcn.cuda.kernel_source`), in the kernel's order; every parameter must be
    named exactly once."""
    names = [p.name for p in kernel_parameters(kernel)]
    missing = [n for n in names if n not in values]
    unknown = sorted(set(values) - set(names))
    if missing or unknown:
        raise TypeError(
            f"{kernel}: missing arguments {missing}, unknown arguments {unknown}; "
            f"its parameters are {names}"
        )
    return [values[n] for n in names]


def size_arguments(kernel: str, geometry: object, **overrides: int) -> dict[str, int]:
    """The size (index-type) arguments of ``kernel`` by name: each one given in
    ``overrides``, else the attribute of that name of ``geometry``."""
    names = [p.name for p in kernel_parameters(kernel) if not p.pointer]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"{kernel}: {unknown} are not size parameters; those are {names}")
    return {n: overrides[n] if n in overrides else getattr(geometry, n) for n in names}


def launch_kernel(
    launcher: KernelLauncher,
    kernel: str,
    dtype_name: str,
    index_bits: int,
    total: int,
    geometry: object,
    sizes: dict[str, int] | None = None,
    **arrays: object,
) -> None:
    """Launches ``kernel`` over ``total`` items with its pointer arguments by name
    (``arrays``) and its size arguments from ``geometry`` (:func:`size_arguments`, with
    ``sizes`` as the overrides)."""
    size_values = size_arguments(kernel, geometry, **(sizes or {}))
    launcher.launch(
        kernel, dtype_name, index_bits, total, kernel_arguments(kernel, **arrays, **size_values)
    )


def launch_config(total: int) -> tuple[int, int]:
    """(blocks, threads per block) for a grid-stride kernel over ``total`` items."""
    blocks = max(1, min(MAX_BLOCKS, -(-total // BLOCK_SIZE)))
    return blocks, BLOCK_SIZE


# Grid-stride loops add blockDim * gridDim to an index that may already be near the end:
# 32-bit indices are used only while that sum cannot overflow.
INT32_INDEX_LIMIT = 2**31 - 1 - MAX_BLOCKS * BLOCK_SIZE


def index_bits_for_sizes(*sizes: int) -> int:
    """32 when every array or loop a kernel indexes stays below the 32-bit limit, else 64."""
    return 32 if max(sizes, default=0) <= INT32_INDEX_LIMIT else 64


def contiguous(xp: ModuleType, array):
    """A C-contiguous version of ``array`` (no copy when it is already); None stays None."""
    return None if array is None else xp.ascontiguousarray(array)


def widen_to_acc(launcher: KernelLauncher, dtype_name: str, index_bits: int, array, out=None):
    """``array`` (C-contiguous, element dtype ``dtype_name``) in its accumulation dtype;
    returned as is when the two coincide (float32, float64)."""
    info = DTYPES[dtype_name]
    if info.acc_name == info.name:
        return array
    if out is None:
        out = launcher.xp.empty(array.shape, dtype=launcher.xp.dtype(info.acc_name))
    launcher.launch(
        "widen_to_acc",
        dtype_name,
        index_bits,
        array.size,
        kernel_arguments("widen_to_acc", input=array, output=out, total=array.size),
    )
    return out


def round_to_dtype(launcher: KernelLauncher, dtype_name: str, index_bits: int, acc_array, dtype):
    """``acc_array`` rounded once to the element ``dtype``; returned as is when the
    accumulation dtype is the element dtype."""
    info = DTYPES[dtype_name]
    if info.acc_name == info.name:
        return acc_array
    out = launcher.xp.empty(acc_array.shape, dtype=dtype)
    launcher.launch(
        "round_to_output",
        dtype_name,
        index_bits,
        acc_array.size,
        kernel_arguments("round_to_output", input=acc_array, output=out, total=acc_array.size),
    )
    return out


class KernelTypes(NamedTuple):
    """The template arguments of one call's kernels and the dtype they accumulate in."""

    dtype_name: str
    acc_dtype: object  # a dtype of launcher.xp
    index_bits: int


def kernel_types(launcher: KernelLauncher, dtype_name: str, index_bits: int) -> KernelTypes:
    return KernelTypes(dtype_name, launcher.xp.dtype(DTYPES[dtype_name].acc_name), index_bits)
