"""What the kernel orchestration needs from a device: an array module and a launcher.

The orchestration in ``_conv_kernels`` (buffers, chunking, GEMMs, kernel launches) is
written once against :class:`KernelLauncher`. On a GPU the launcher is CuPy's
(``_cupy_launcher``) and ``xp`` is CuPy; the CPU test harness in ``tests/emulator``
provides a launcher that runs the same ``kernels/`` sources compiled for the host, with
``xp`` = NumPy. So the emulated tests exercise the real launch code, not a copy.
"""

from __future__ import annotations

from types import ModuleType
from typing import Protocol, Sequence

BLOCK_SIZE = 256
# Grid-stride kernels need no more blocks than this to fill any current GPU.
MAX_BLOCKS = 65536


class KernelLauncher(Protocol):
    """Runs one specialisation of a kernel template over ``total`` work items.

    ``args`` are passed in the kernel's parameter order: arrays of ``xp`` (their data
    pointer is passed; views are fine, they must be C-contiguous), ``None`` for a null
    pointer, and Python ints, which become the index type (int32 or int64).
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


def launch_config(total: int) -> tuple[int, int]:
    """(blocks, threads per block) for a grid-stride kernel over ``total`` items."""
    blocks = max(1, min(MAX_BLOCKS, -(-total // BLOCK_SIZE)))
    return blocks, BLOCK_SIZE
