"""The CuPy implementation of :class:`~cupydcn.cuda.launch.KernelLauncher`.

One compiled module per (device, source file, dtype, index width, template arguments) and
one kernel function per (device, specialisation), memoised; kernels and GEMMs run on
CuPy's current stream (set by :func:`cupydcn.core.arrays.compute_scope`). GEMMs are one
cuBLAS ``cublasGemmStridedBatchedEx`` call each (:func:`cublas_gemm_arguments`: the
row-major operands handed to column-major cuBLAS as their transposes, transpose flags
instead of copies, float32 compute for half types so float16 / bfloat16 run on tensor
cores, TF32 only when asked). Arguments are checked against the kernel's
declared parameters (KERNEL_PARAMETERS of :mod:`cupydcn.cuda.kernel_source`) before a
launch, as the CPU emulator's checked mode does: a wrong argument is an error naming the
kernel and the argument, not a kernel reading garbage.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from cupydcn.core.errors import CupydcnRuntimeError, CupydcnTypeError, CupydcnValueError
from cupydcn.cuda.kernel_source import (
    NVRTC_OPTIONS,
    SOURCE_OF_KERNEL,
    check_template_args,
    kernel_parameters,
    module_source,
    name_expression,
    name_expressions,
)
from cupydcn.cuda.launch import (
    GemmCall,
    check_gemm_operands,
    check_launch_shape,
    dtype_name_of,
    launch_config,
    report_gemm,
    report_launch,
)

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
            if dtype_name_of(arg.dtype) != expected:
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


def raw_module_arguments(
    source_file: str, dtype_name: str, index_bits: int, template_args: tuple[int, ...] = ()
) -> dict:
    """The ``cupy.RawModule`` keyword arguments of one module (source file, dtype, index
    width and specialisation): the source string, the options and the name expressions
    CuPy compiles (and keys its disk cache) with. ``cupydcn.precompile`` builds from the
    same."""
    return dict(
        code=module_source(source_file),
        options=tuple(NVRTC_OPTIONS),
        name_expressions=name_expressions(source_file, dtype_name, index_bits, template_args),
    )


def raw_module(
    source_file: str, dtype_name: str, index_bits: int, template_args: tuple[int, ...] = ()
):
    """The ``cupy.RawModule`` of one module (compiled by CuPy on first use, through its
    disk cache: what ``cupydcn.precompile`` fills)."""
    import cupy

    return cupy.RawModule(
        **raw_module_arguments(source_file, dtype_name, index_bits, template_args)
    )


@functools.cache
def _module(
    device_id: int,
    source_file: str,
    dtype_name: str,
    index_bits: int,
    template_args: tuple[int, ...],
):
    import cupy

    with cupy.cuda.Device(device_id):
        return raw_module(source_file, dtype_name, index_bits, template_args)


@functools.cache
def _function(
    device_id: int, kernel: str, dtype_name: str, index_bits: int, template_args: tuple[int, ...]
):
    """The kernel function of one specialisation on one device (compiling its module on
    first use)."""
    module = _module(device_id, SOURCE_OF_KERNEL[kernel], dtype_name, index_bits, template_args)
    return module.get_function(name_expression(kernel, dtype_name, index_bits, template_args))


# cuBLAS / CUDA library constants (cublas_api.h, library_types.h).
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_64F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 70, 77
CUBLAS_GEMM_DEFAULT = -1
CUDA_DATA_TYPES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 14}
_INT32_MAX = 2**31 - 1


class CublasGemm(NamedTuple):
    """The arguments of one ``cublasGemmStridedBatchedEx`` call, in cuBLAS's column-major
    terms: C' (m x n) = op'(A') (m x k) @ op'(B') (k x n), where A' is our ``b``, B' our
    ``a`` and C' our ``out`` (a row-major matrix is the column-major view of its
    transpose, so out^T = op(b)^T @ op(a)^T). Strides and leading dimensions in elements;
    the compute dtype ("float32" / "float64") and cuBLAS's enum of it."""

    transa: int
    transb: int
    m: int
    n: int
    k: int
    a_type: int
    lda: int
    stride_a: int
    b_type: int
    ldb: int
    stride_b: int
    c_type: int
    ldc: int
    stride_c: int
    batch: int
    compute_type: int
    compute: str


def cublas_gemm_arguments(
    a, b, out, *, transpose_a: bool, transpose_b: bool, tf32: bool
) -> CublasGemm | None:
    """The cuBLAS call computing ``out[i] = op(a[i]) @ op(b[i])`` for row-major operands
    (:func:`~cupydcn.cuda.launch.check_gemm_operands`), or None when ``out`` is empty.
    Sizes past cuBLAS's 32-bit ``int`` are refused."""
    batch, m, n, k = check_gemm_operands(
        a, b, out, transpose_a=transpose_a, transpose_b=transpose_b
    )
    if batch == 0 or m == 0 or n == 0:
        return None
    for name, value in (("batch", batch), ("m", m), ("n", n), ("k", k)):
        if value > _INT32_MAX:
            raise CupydcnValueError(f"gemm: {name} = {value} exceeds cuBLAS's 32-bit int")
    a_name, b_name, out_name = (dtype_name_of(x.dtype) for x in (a, b, out))
    compute = "float64" if a_name == "float64" else "float32"
    if compute == "float64":
        compute_type = CUBLAS_COMPUTE_64F
    elif tf32 and a_name == "float32":
        compute_type = CUBLAS_COMPUTE_32F_FAST_TF32
    else:
        compute_type = CUBLAS_COMPUTE_32F

    def stride(array) -> int:
        return array.strides[0] // array.itemsize if array.shape[0] > 1 else 0

    def leading(array) -> int:  # the row stride in elements (the row length when 1 row)
        rows, cols = array.shape[1:]
        return max(1, cols, array.strides[1] // array.itemsize if rows > 1 else cols)

    return CublasGemm(
        transa=CUBLAS_OP_T if transpose_b else CUBLAS_OP_N,
        transb=CUBLAS_OP_T if transpose_a else CUBLAS_OP_N,
        m=n,
        n=m,
        k=k,
        a_type=CUDA_DATA_TYPES[b_name],
        lda=leading(b),
        stride_a=stride(b),
        b_type=CUDA_DATA_TYPES[a_name],
        ldb=leading(a),
        stride_b=stride(a),
        c_type=CUDA_DATA_TYPES[out_name],
        ldc=leading(out),
        stride_c=stride(out),
        batch=batch,
        compute_type=compute_type,
        compute=compute,
    )


@functools.cache
def _device_description(device_id: int) -> str:
    import cupy

    properties = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = properties["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return f"{device_id}:{name}:sm_{properties['major']}{properties['minor']}"


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
        *,
        template_args: tuple[int, ...] = (),
        grid: tuple[int, int, int] | None = None,
        block: tuple[int, int, int] | None = None,
    ) -> None:
        template_args = check_template_args(kernel, template_args)
        where = name_expression(kernel, dtype_name, index_bits, template_args)
        shape = check_launch_shape(where, grid, block)
        if total == 0:
            return
        cupy = self.xp
        packed = pack_arguments(kernel, dtype_name, index_bits, args, cupy.ndarray)
        if shape is None:
            blocks, threads = launch_config(total)
            shape = ((blocks, 1, 1), (threads, 1, 1))
        try:
            function = _function(
                _current_device_id(), kernel, dtype_name, index_bits, template_args
            )
            function(shape[0], shape[1], packed)
        except (
            cupy.cuda.driver.CUDADriverError,
            cupy.cuda.runtime.CUDARuntimeError,
            cupy.cuda.compiler.CompileException,
        ) as exc:
            raise CupydcnRuntimeError(
                f"launching {where} over {total} items (grid {shape[0]}, block {shape[1]}) "
                f"failed: {exc}"
            ) from exc
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
        """``out = alpha * op(a) @ op(b) + beta * out`` (see KernelLauncher): one cuBLAS
        strided-batched call on the current stream."""
        cupy = self.xp
        for name, array in (("a", a), ("b", b), ("out", out)):
            if not isinstance(array, cupy.ndarray):
                raise CupydcnTypeError(f"gemm: {name} must be a cupy.ndarray; got {type(array)}")
        call = cublas_gemm_arguments(
            a, b, out, transpose_a=transpose_a, transpose_b=transpose_b, tf32=tf32
        )
        if call is None:  # nothing to multiply
            return
        if call.k == 0:  # op(a) @ op(b) is zero: out = beta * out
            out *= beta
            return
        from cupy_backends.cuda.libs import cublas

        scale = np.float64 if call.compute == "float64" else np.float32
        alpha_host = np.array(alpha, dtype=scale)
        beta_host = np.array(beta, dtype=scale)
        try:
            cublas.gemmStridedBatchedEx(
                cupy.cuda.device.get_cublas_handle(),
                call.transa,
                call.transb,
                call.m,
                call.n,
                call.k,
                alpha_host.ctypes.data,
                b.data.ptr,
                call.a_type,
                call.lda,
                call.stride_a,
                a.data.ptr,
                call.b_type,
                call.ldb,
                call.stride_b,
                beta_host.ctypes.data,
                out.data.ptr,
                call.c_type,
                call.ldc,
                call.stride_c,
                call.batch,
                call.compute_type,
                CUBLAS_GEMM_DEFAULT,
            )
        except Exception as exc:  # cuBLAS status errors have no common base class
            raise CupydcnRuntimeError(f"cuBLAS GEMM {call} failed: {exc}") from exc
        report_gemm(
            GemmCall(
                call.batch,
                call.n,
                call.m,
                call.k,
                dtype_name_of(a.dtype),
                dtype_name_of(out.dtype),
                tf32,
            )
        )

    def time_call(self, fn, *, repeats: int = 3) -> float:
        """Seconds per call of ``fn`` on the current stream: one warm-up call (it may
        compile), then CUDA events around ``repeats`` calls (the autotuner's timer,
        :mod:`cupydcn.deform_conv.autotune`)."""
        cupy = self.xp
        fn()
        stream = cupy.cuda.get_current_stream()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        for _ in range(repeats):
            fn()
        stop.record(stream)
        stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop) / 1000.0 / repeats

    def compute_capability(self) -> int:
        """The current device's compute capability as an int (90 for sm_90)."""
        return int(self.xp.cuda.Device().compute_capability)

    def device_key(self) -> str:
        """The current device as the autotuner keys its choices: id, name and compute
        capability."""
        return _device_description(_current_device_id())

    def stable_argsort(self, keys):
        """The indices that sort the 1-D ``keys`` stably (the deterministic backward's
        sort, :mod:`cupydcn.cuda.deterministic`): CuPy's argsort, a stable radix sort."""
        return self.xp.argsort(keys)


@functools.lru_cache(maxsize=1)
def cupy_launcher() -> CupyLauncher:
    return CupyLauncher()
