"""The CuPy implementation of :class:`~cupydcn.cuda.launch.KernelLauncher`.

One compiled module per (device, source file, dtype, index width), memoised; kernels
launch on CuPy's current stream (set by :func:`cupydcn.core.arrays.compute_scope`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from cupydcn.core.errors import CupydcnRuntimeError
from cupydcn.cuda.kernel_source import (
    NVRTC_OPTIONS,
    SOURCE_OF_KERNEL,
    module_source,
    name_expression,
    name_expressions,
)
from cupydcn.cuda.launch import launch_config

_INDEX_SCALARS = {32: np.int32, 64: np.int64}


@functools.lru_cache(maxsize=None)
def _module(device_id: int, source_file: str, dtype_name: str, index_bits: int):
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(
            code=module_source(source_file),
            options=NVRTC_OPTIONS,
            name_expressions=name_expressions(source_file, dtype_name, index_bits),
        )


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
        import cupy

        index_scalar = _INDEX_SCALARS[index_bits]
        packed = tuple(
            np.uint64(0) if a is None else index_scalar(a) if isinstance(a, int) else a
            for a in args
        )
        expression = name_expression(kernel, dtype_name, index_bits)
        try:
            module = _module(cupy.cuda.Device().id, SOURCE_OF_KERNEL[kernel], dtype_name,
                             index_bits)
            function = module.get_function(expression)
            blocks, threads = launch_config(total)
            function((blocks,), (threads,), packed)
        except (cupy.cuda.driver.CUDADriverError, cupy.cuda.runtime.CUDARuntimeError,
                cupy.cuda.compiler.CompileException) as exc:
            raise CupydcnRuntimeError(
                f"launching {expression} over {total} items failed: {exc}"
            ) from exc


@functools.lru_cache(maxsize=1)
def cupy_launcher() -> CupyLauncher:
    return CupyLauncher()
