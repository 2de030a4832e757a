"""What the kernel orchestration needs from a device: an array module and a launcher.

The orchestration in the ``cuda_backend`` modules (buffers, chunking, GEMMs, kernel
launches) is written once against :class:`KernelLauncher`. On a GPU the launcher is CuPy's
(:mod:`cupydcn.cuda.cupy_launcher`) and ``xp`` is CuPy; the CPU test harness in ``tests/emulator``
provides a launcher that runs the same ``cupydcn/cuda/kernels/`` sources compiled for the host, with
``xp`` = NumPy. So the emulated tests exercise the real launch code, not a copy.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import NamedTuple, Protocol

from cupydcn.core.dtypes import DTYPES
from cupydcn.cuda.kernel_source import kernel_parameters

BLOCK_SIZE = 256
# Grid-stride kernels need no more blocks than this to fill any current GPU.
MAX_BLOCKS = 65536


class KernelLauncher(Protocol):
    """Runs kernels and GEMMs on one device; the orchestration's only view of it.

    ``launch`` runs one specialisation of a kernel template over ``total`` work items.
    ``args`` are passed in the kernel's parameter order: arrays of ``xp`` (their data
    pointer is passed; views are fine, they must be C-contiguous), ``None`` for a null
    pointer, and integers (Python or NumPy), which become the index type (int32 or int64).
    :func:`kernel_arguments` builds such a list from the parameters' names.

    - ``template_args``: the compile-time integers after ``<T, I>`` of kernels whose source
      file declares template parameters (``FILE_TEMPLATE_PARAMETERS`` of
      :mod:`cupydcn.cuda.kernel_source`); one of that file's ``FILE_SPECIALISATIONS``.
    - ``grid`` / ``block``: an explicit (x, y, z) launch shape for block-cooperative
      kernels (shared memory, barriers, warp shuffles), both or neither; without them the
      launch is the 1-D grid-stride configuration :func:`launch_config` of ``total``.
      ``total == 0`` launches nothing either way.

    ``gemm`` is :func:`gemm_reference`'s contract: ``out = alpha * op(a) @ op(b) + beta *
    out`` over a batch, computed in the compute dtype (float64 for float64 operands, else
    float32; ``tf32=True`` rounds float32 operands to TF32 first) and rounded once to
    ``out.dtype``. On a GPU: one cuBLAS strided-batched call with transpose flags, no copy.

    Every launch and GEMM is reported to :func:`record_calls` recorders (the launchers call
    :func:`report_launch` / :func:`report_gemm`).

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
        *,
        template_args: tuple[int, ...] = (),
        grid: tuple[int, int, int] | None = None,
        block: tuple[int, int, int] | None = None,
    ) -> None: ...

    def gemm(
        self,
        a,
        b,
        out,
        *,
        transpose_a: bool = False,
        transpose_b: bool = False,
        alpha: float = 1.0,
        beta: float = 0.0,
        tf32: bool = False,
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
    *,
    template_args: tuple[int, ...] = (),
    grid: tuple[int, int, int] | None = None,
    block: tuple[int, int, int] | None = None,
    **arrays: object,
) -> None:
    """Launches ``kernel`` over ``total`` items with its pointer arguments by name
    (``arrays``) and its size arguments from ``geometry`` (:func:`size_arguments`, with
    ``sizes`` as the overrides); ``template_args``, ``grid`` and ``block`` as
    :meth:`KernelLauncher.launch` takes them."""
    size_values = size_arguments(kernel, geometry, **(sizes or {}))
    extra = {} if grid is None and block is None else {"grid": grid, "block": block}
    if template_args:
        extra["template_args"] = tuple(template_args)
    launcher.launch(
        kernel,
        dtype_name,
        index_bits,
        total,
        kernel_arguments(kernel, **arrays, **size_values),
        **extra,
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


# ------------------------------------------------------------------ launch shapes


MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_THREADS_PER_BLOCK = 1024


def check_launch_shape(
    where: str, grid: tuple[int, int, int] | None, block: tuple[int, int, int] | None
) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """``(grid, block)`` as 3-tuples of ints within CUDA's limits (x < 2^31, y and z <
    65536, at most 1024 threads per block), or None for a grid-stride launch; a
    ``ValueError`` naming ``where`` otherwise."""
    if grid is None and block is None:
        return None
    if grid is None or block is None:
        raise ValueError(f"{where}: grid and block go together; got grid={grid}, block={block}")
    try:
        grid3 = tuple(int(v) for v in grid)
        block3 = tuple(int(v) for v in block)
    except TypeError:
        raise ValueError(
            f"{where}: grid and block must be (x, y, z); got {grid}, {block}"
        ) from None
    if len(grid3) != 3 or len(block3) != 3:
        raise ValueError(f"{where}: grid and block must be (x, y, z); got {grid}, {block}")
    if not all(1 <= g <= m for g, m in zip(grid3, MAX_GRID)):
        raise ValueError(f"{where}: grid {grid3} outside 1..{MAX_GRID}")
    threads = block3[0] * block3[1] * block3[2]
    if min(block3) < 1 or block3[2] > 64 or threads > MAX_THREADS_PER_BLOCK:
        raise ValueError(
            f"{where}: block {block3} must have 1..{MAX_THREADS_PER_BLOCK} threads (z <= 64)"
        )
    return grid3, block3


# ------------------------------------------------------------------ GEMMs


def check_gemm_operands(a, b, out, *, transpose_a: bool, transpose_b: bool) -> tuple[int, ...]:
    """``(batch, m, n, k)`` of a batched GEMM ``out[i] (m x n) = op(a[i]) (m x k) @ op(b[i])
    (k x n)`` after checking the operands: 3-D arrays whose matrices have unit element
    stride and a row stride (the leading dimension) of at least the row length, any batch
    stride for ``a`` and ``b`` (0 broadcasts one matrix over the batch) and a nonzero one
    for ``out``; ``a`` and ``b`` of one dtype; ``out`` of that dtype or its accumulation
    dtype."""
    for name, array in (("a", a), ("b", b), ("out", out)):
        if array.ndim != 3:
            raise ValueError(f"gemm: {name} must be 3-D (batch, rows, cols); got {array.shape}")
        rows, cols = array.shape[1:]
        item = array.itemsize
        if array.size and (
            (cols > 1 and array.strides[2] != item)
            or (rows > 1 and (array.strides[1] < cols * item or array.strides[1] % item))
        ):
            raise ValueError(
                f"gemm: the matrices of {name} need unit element stride and rows at least "
                f"their length apart; got strides {array.strides} for shape {array.shape}"
            )
        if array.strides[0] < 0 or array.strides[0] % item:
            raise ValueError(f"gemm: {name} has a bad batch stride {array.strides[0]}")
    if a.dtype != b.dtype:
        raise TypeError(f"gemm: a and b must share a dtype; got {a.dtype.name}, {b.dtype.name}")
    if out.dtype != a.dtype:
        element = dtype_name_of(a.dtype)
        allowed = {element, DTYPES[element].acc_name}
        if dtype_name_of(out.dtype) not in allowed:
            raise TypeError(f"gemm: out must have dtype {sorted(allowed)}; got {out.dtype.name}")
    batch = out.shape[0]
    if batch > 1 and out.size and out.strides[0] == 0:
        raise ValueError("gemm: out cannot broadcast over the batch")
    m, n = out.shape[1:]
    k = a.shape[1] if transpose_a else a.shape[2]
    a_rows = a.shape[2] if transpose_a else a.shape[1]
    b_rows, b_cols = (b.shape[2], b.shape[1]) if transpose_b else b.shape[1:]
    if a.shape[0] != batch or b.shape[0] != batch or a_rows != m or b_rows != k or b_cols != n:
        raise ValueError(
            f"gemm: op(a) {a.shape}{'^T' if transpose_a else ''} @ op(b) "
            f"{b.shape}{'^T' if transpose_b else ''} does not give out {out.shape}"
        )
    return batch, m, n, k


@functools.lru_cache(maxsize=64)
def dtype_name_of(dtype) -> str:
    """``dtype.name``, memoised per dtype object (NumPy computes the name on every access,
    a few microseconds: the per-call host overhead counts)."""
    return dtype.name


def gemm_compute_dtype(dtype_name: str) -> str:
    """The dtype a GEMM of ``dtype_name`` operands computes in: its accumulation dtype."""
    return DTYPES[dtype_name].acc_name


def round_to_tf32(xp: ModuleType, array):
    """float32 ``array`` with its significands rounded to TF32's 10 explicit bits (round to
    nearest, ties away from zero, as ``cvt.rna.tf32.f32``); the relative error of each
    element is at most 2^-11."""
    bits = xp.ascontiguousarray(array, dtype=xp.float32).view(xp.uint32)
    finite = (bits & xp.uint32(0x7F800000)) != xp.uint32(0x7F800000)
    rounded = (bits + xp.uint32(0x1000)) & xp.uint32(0xFFFFE000)
    return xp.where(finite, rounded, bits).view(xp.float32)


def gemm_reference(
    xp: ModuleType,
    a,
    b,
    out,
    *,
    transpose_a: bool = False,
    transpose_b: bool = False,
    alpha: float = 1.0,
    beta: float = 0.0,
    tf32: bool = False,
) -> None:
    """The GEMM of :class:`KernelLauncher` written with ``xp.matmul``: ``out[i] = alpha *
    op(a[i]) @ op(b[i]) + beta * out[i]`` (op = transpose when asked), the operands
    converted to the compute dtype (float64 for float64, else float32, TF32-rounded with
    ``tf32`` for float32 operands), the result rounded once to ``out.dtype``. Operands as
    :func:`check_gemm_operands` requires."""
    check_gemm_operands(a, b, out, transpose_a=transpose_a, transpose_b=transpose_b)
    compute = xp.dtype(gemm_compute_dtype(a.dtype.name))
    left = a.astype(compute)
    right = b.astype(compute)
    if tf32 and a.dtype.name == "float32":
        left, right = round_to_tf32(xp, left), round_to_tf32(xp, right)
    if transpose_a:
        left = xp.swapaxes(left, 1, 2)
    if transpose_b:
        right = xp.swapaxes(right, 1, 2)
    result = xp.matmul(left, right)
    if alpha != 1.0:
        result *= compute.type(alpha)
    if beta != 0.0:
        result += compute.type(beta) * out.astype(compute)
    out[...] = result.astype(out.dtype)


# ------------------------------------------------------------------ what a call did


class GemmCall(NamedTuple):
    """One GEMM: ``batch`` products of (m x k) @ (k x n), operands and result dtypes."""

    batch: int
    m: int
    n: int
    k: int
    dtype_name: str
    out_dtype_name: str
    tf32: bool

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.n * self.k


@dataclass
class CallRecord:
    """What the orchestration launched and allocated while a :func:`record_calls` block
    ran: kernel launches by kernel name (``launches``; array-library operations that
    launch device work as ``xp.<name>``) and in order (``sequence``, with template
    arguments and launch shape), GEMM calls, and workspace allocations (bytes of each
    buffer the orchestration sized, results excluded)."""

    launches: Counter = field(default_factory=Counter)
    sequence: list = field(default_factory=list)
    gemms: list = field(default_factory=list)
    workspace: list = field(default_factory=list)

    @property
    def launch_count(self) -> int:
        return sum(self.launches.values())

    @property
    def gemm_count(self) -> int:
        return len(self.gemms)

    @property
    def workspace_bytes(self) -> int:
        return sum(self.workspace)


_RECORDERS: contextvars.ContextVar[tuple[CallRecord, ...]] = contextvars.ContextVar(
    "cupydcn_call_recorders", default=()
)


@contextlib.contextmanager
def record_calls() -> Iterator[CallRecord]:
    """Collects what kernels, GEMMs and workspace the CUDA orchestration uses inside the
    block (nested blocks each see everything of theirs)::

        with record_calls() as calls:
            cupydcn.deform_conv2d(x, offset, weight)
        calls.launches, calls.gemm_count, calls.workspace_bytes
    """
    record = CallRecord()
    token = _RECORDERS.set((*_RECORDERS.get(), record))
    try:
        yield record
    finally:
        _RECORDERS.reset(token)


def report_launch(
    kernel: str,
    template_args: tuple[int, ...],
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
) -> None:
    """Called by launchers for every launch they make."""
    for record in _RECORDERS.get():
        record.launches[kernel] += 1
        record.sequence.append((kernel, tuple(template_args), tuple(grid), tuple(block)))


def report_array_operation(name: str) -> None:
    """Called by the orchestration for each array-library operation that launches device
    work (a fill, a reduction, a copy): recorded among the launches as ``xp.<name>``."""
    for record in _RECORDERS.get():
        record.launches[f"xp.{name}"] += 1
        record.sequence.append((f"xp.{name}", (), None, None))


def report_gemm(call: GemmCall) -> None:
    """Called by launchers for every GEMM they run."""
    for record in _RECORDERS.get():
        record.gemms.append(call)


def workspace_empty(launcher: KernelLauncher, shape, dtype):
    """``launcher.xp.empty(shape, dtype)`` for a buffer the orchestration sizes (columns,
    widened copies, slots), reported to :func:`record_calls` recorders as workspace."""
    array = launcher.xp.empty(shape, dtype=dtype)
    for record in _RECORDERS.get():
        record.workspace.append(int(array.nbytes))
    return array


class NullLauncher:
    """A :class:`KernelLauncher` on NumPy that runs nothing: every launch and GEMM is
    checked for shape (GEMM operands) and reported to :func:`record_calls` recorders as a
    real launcher would, but no kernel runs and results stay uninitialised. For counting
    what the orchestration launches and allocates without a device, and for measuring the
    host overhead of a call (``benchmarks/host_overhead.py``)."""

    def __init__(self) -> None:
        import numpy

        self.xp = numpy

    def launch(
        self,
        kernel: str,
        dtype_name: str,
        index_bits: int,
        total: int,
        args: Sequence[object],
        *,
        template_args: tuple[int, ...] = (),
        grid: tuple[int, int, int] | None = None,
        block: tuple[int, int, int] | None = None,
    ) -> None:
        from cupydcn.cuda.kernel_source import check_template_args

        template_args = check_template_args(kernel, template_args)
        shape = check_launch_shape(kernel, grid, block)
        parameters = kernel_parameters(kernel)
        if len(args) != len(parameters):
            raise TypeError(f"{kernel}: takes {len(parameters)} arguments; got {len(args)}")
        if total == 0:
            return
        if shape is None:
            blocks, threads = launch_config(total)
            shape = ((blocks, 1, 1), (threads, 1, 1))
        report_launch(kernel, template_args, *shape)

    def gemm(
        self,
        a,
        b,
        out,
        *,
        transpose_a: bool = False,
        transpose_b: bool = False,
        alpha: float = 1.0,
        beta: float = 0.0,
        tf32: bool = False,
    ) -> None:
        batch, m, n, k = check_gemm_operands(
            a, b, out, transpose_a=transpose_a, transpose_b=transpose_b
        )
        report_gemm(
            GemmCall(batch, m, n, k, dtype_name_of(a.dtype), dtype_name_of(out.dtype), tf32)
        )
