"""The GEMM operation of the launcher protocol: its NumPy reference
(``cupydcn.cuda.launch.gemm_reference``), the operand checks, TF32 rounding, and the
translation of a row-major batched GEMM into one column-major cuBLAS call
(``cupydcn.cuda.cupy_launcher.cublas_gemm_arguments``), checked without a GPU by
executing the cuBLAS call's arguments on the operands' flat buffers as cuBLAS
documents them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cupydcn.core.dtypes import numpy_dtype
from cupydcn.cuda import cupy_launcher as cl
from cupydcn.cuda.launch import check_gemm_operands, gemm_reference, round_to_tf32


def _operands(rng, batch, m, n, k, transpose_a, transpose_b, dtype, *, broadcast_a=False):
    a_shape = (k, m) if transpose_a else (m, k)
    b_shape = (n, k) if transpose_b else (k, n)
    a = rng.standard_normal((1 if broadcast_a else batch, *a_shape)).astype(dtype)
    if broadcast_a:
        a = np.broadcast_to(a, (batch, *a_shape))
    b = rng.standard_normal((batch, *b_shape)).astype(dtype)
    return a, b


def _float64_product(a, b, transpose_a, transpose_b):
    left = a.astype(np.float64)
    right = b.astype(np.float64)
    if transpose_a:
        left = left.swapaxes(1, 2)
    if transpose_b:
        right = right.swapaxes(1, 2)
    return left @ right


@pytest.mark.parametrize(
    "transpose_a, transpose_b", list(itertools.product([False, True], repeat=2))
)
@pytest.mark.parametrize("broadcast_a", [False, True])
def test_reference_is_the_product_in_every_transpose_combination(
    transpose_a, transpose_b, broadcast_a
):
    rng = np.random.default_rng(1)
    a, b = _operands(rng, 3, 5, 7, 4, transpose_a, transpose_b, np.float64, broadcast_a=broadcast_a)
    out = rng.standard_normal((3, 5, 7))
    before = out.copy()
    gemm_reference(
        np, a, b, out, transpose_a=transpose_a, transpose_b=transpose_b, alpha=2.0, beta=0.5
    )
    expected = 2.0 * _float64_product(a, b, transpose_a, transpose_b) + 0.5 * before
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("out_half", [False, True])
def test_half_operands_accumulate_in_float32_and_round_once(dtype_name, out_half):
    rng = np.random.default_rng(2)
    dtype = numpy_dtype(dtype_name)
    a, b = _operands(rng, 2, 6, 5, 64, False, True, dtype)
    out = np.zeros((2, 6, 5), dtype=dtype if out_half else np.float32)
    gemm_reference(np, a, b, out, transpose_b=True)
    exact = _float64_product(a, b, False, True)
    # float32 accumulation over k = 64 terms, then (for half outputs) one rounding
    bound = (
        64 * 2.0**-24 * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)).swapaxes(1, 2))
    )
    if out_half:
        bound = bound + np.abs(exact) * {"float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype_name]
    assert np.all(np.abs(out.astype(np.float64) - exact) <= bound + 1e-30)
    if out_half:  # rounded once: exactly the float32 result rounded
        f32 = np.zeros((2, 6, 5), np.float32)
        gemm_reference(np, a, b, f32, transpose_b=True)
        np.testing.assert_array_equal(out, f32.astype(dtype))


def test_tf32_rounding_and_its_error_bound():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(10000).astype(np.float32) * 1e3
    r = round_to_tf32(np, x)
    bits = r.view(np.uint32)
    assert np.all(bits & 0x1FFF == 0)  # 10 explicit significand bits remain
    assert np.all(np.abs(r.astype(np.float64) - x) <= np.abs(x.astype(np.float64)) * 2.0**-11)
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], np.float32)
    np.testing.assert_array_equal(
        round_to_tf32(np, special).view(np.uint32)[:2], special.view(np.uint32)[:2]
    )
    assert np.isnan(round_to_tf32(np, special)[2])

    a, b = _operands(rng, 2, 8, 8, 256, False, False, np.float32)
    exact = _float64_product(a, b, False, False)
    out = np.zeros((2, 8, 8), np.float32)
    gemm_reference(np, a, b, out, tf32=True)
    magnitude = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
    error = np.abs(out - exact)
    # each product carries at most two TF32 roundings (2 * 2^-11), plus float32 summation
    assert np.all(error <= magnitude * (2 * 2.0**-11 + 256 * 2.0**-24))
    strict = np.zeros_like(out)
    gemm_reference(np, a, b, strict)
    assert np.max(np.abs(strict - exact)) < np.max(error)  # TF32 really is coarser


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a, b, o: (a[:, :, ::2], b, o), ValueError, "unit element stride"),
        (
            lambda a, b, o: (a, b, o.swapaxes(1, 2).copy().swapaxes(1, 2)),
            ValueError,
            "unit element stride",
        ),
        (lambda a, b, o: (a.astype(np.float64), b, o), TypeError, "share a dtype"),
        (lambda a, b, o: (a, b, o.astype(np.float64)), TypeError, "out must have dtype"),
        (lambda a, b, o: (a, b, o[:, :2]), ValueError, "does not give out"),
        (lambda a, b, o: (a[0], b, o), ValueError, "must be 3-D"),
        (
            lambda a, b, o: (a, b, np.broadcast_to(o[:1], o.shape)),
            ValueError,
            "cannot broadcast",
        ),
    ],
)
def test_bad_operands_are_refused(change, error, match):
    a = np.zeros((2, 3, 4), np.float32)
    b = np.zeros((2, 4, 5), np.float32)
    out = np.zeros((2, 3, 5), np.float32)
    a, b, out = change(a, b, out)
    with pytest.raises(error, match=match):
        check_gemm_operands(a, b, out, transpose_a=False, transpose_b=False)


# ---------------------------------------------------------------- the cuBLAS translation


def _column_major(flat: np.ndarray, offset: int, rows: int, cols: int, ld: int) -> np.ndarray:
    """The column-major rows x cols matrix with leading dimension ld at flat[offset:]."""
    index = offset + np.arange(rows)[:, None] + ld * np.arange(cols)[None, :]
    return flat[index]


def _run_cublas_call(call: cl.CublasGemm, a, b, out, alpha, beta):
    """Executes cublasGemmStridedBatchedEx(call) as cuBLAS defines it, on the flat element
    buffers of the operands (A' = our b, B' = our a, C' = our out), in float64."""
    flats = {}
    for name, array in (("a", a), ("b", b), ("out", out)):
        base = array
        while base.base is not None and isinstance(base.base, np.ndarray):
            base = base.base
        flat = np.ascontiguousarray(base).reshape(-1).astype(np.float64)
        start = (
            array.__array_interface__["data"][0] - base.__array_interface__["data"][0]
        ) // array.itemsize
        flats[name] = (flat, start)
    a_rows, a_cols = (call.m, call.k) if call.transa == cl.CUBLAS_OP_N else (call.k, call.m)
    b_rows, b_cols = (call.k, call.n) if call.transb == cl.CUBLAS_OP_N else (call.n, call.k)
    result = np.empty((call.batch, call.n, call.m))  # out[i] is C'[i]^T
    for i in range(call.batch):
        flat, start = flats["b"]
        op_a = _column_major(flat, start + i * call.stride_a, a_rows, a_cols, call.lda)
        if call.transa == cl.CUBLAS_OP_T:
            op_a = op_a.T
        flat, start = flats["a"]
        op_b = _column_major(flat, start + i * call.stride_b, b_rows, b_cols, call.ldb)
        if call.transb == cl.CUBLAS_OP_T:
            op_b = op_b.T
        flat, start = flats["out"]
        c = _column_major(flat, start + i * call.stride_c, call.m, call.n, call.ldc)
        result[i] = (alpha * (op_a @ op_b) + beta * c).T
    return result


@pytest.mark.parametrize(
    "transpose_a, transpose_b", list(itertools.product([False, True], repeat=2))
)
@pytest.mark.parametrize("broadcast_a", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 7, 4), (1, 1, 6, 3), (2, 4, 1, 1)])
def test_cublas_call_computes_the_row_major_product(transpose_a, transpose_b, broadcast_a, shape):
    rng = np.random.default_rng(4)
    batch, m, n, k = shape
    a, b = _operands(
        rng, batch, m, n, k, transpose_a, transpose_b, np.float64, broadcast_a=broadcast_a
    )
    # out as a slice of a bigger buffer: batch stride larger than one matrix, rows
    # further apart than their length (a leading dimension > n)
    big = rng.standard_normal((batch, m + 2, n + 3))
    out = big[:, 1 : m + 1, 2 : n + 2]
    b = np.ascontiguousarray(b)
    wide = np.zeros((batch, b.shape[1], b.shape[2] + 5))
    wide[:, :, : b.shape[2]] = b
    b = wide[:, :, : b.shape[2]]  # rows 5 elements apart beyond their length
    call = cl.cublas_gemm_arguments(
        a, b, out, transpose_a=transpose_a, transpose_b=transpose_b, tf32=False
    )
    assert call.compute_type == cl.CUBLAS_COMPUTE_64F
    got = _run_cublas_call(call, a, b, out, 1.5, -0.5)
    expected = 1.5 * _float64_product(a, b, transpose_a, transpose_b) - 0.5 * out
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    if broadcast_a and batch > 1:
        assert call.stride_b == 0  # our a is cuBLAS's B'


@pytest.mark.parametrize(
    "dtype_name, out_name, tf32, compute",
    [
        ("float16", "float16", False, cl.CUBLAS_COMPUTE_32F),
        ("float16", "float32", False, cl.CUBLAS_COMPUTE_32F),
        ("bfloat16", "float32", True, cl.CUBLAS_COMPUTE_32F),  # TF32 only touches float32
        ("float32", "float32", False, cl.CUBLAS_COMPUTE_32F),
        ("float32", "float32", True, cl.CUBLAS_COMPUTE_32F_FAST_TF32),
        ("float64", "float64", True, cl.CUBLAS_COMPUTE_64F),
    ],
)
def test_cublas_types_and_compute(dtype_name, out_name, tf32, compute):
    dtype = numpy_dtype(dtype_name)
    a = np.zeros((2, 3, 4), dtype)
    b = np.zeros((2, 4, 5), dtype)
    out = np.zeros((2, 3, 5), numpy_dtype(out_name))
    call = cl.cublas_gemm_arguments(a, b, out, transpose_a=False, transpose_b=False, tf32=tf32)
    assert call.compute_type == compute
    assert call.a_type == call.b_type == cl.CUDA_DATA_TYPES[dtype_name]
    assert call.c_type == cl.CUDA_DATA_TYPES[out_name]


def test_empty_products_make_no_call():
    a = np.zeros((2, 0, 4), np.float32)
    b = np.zeros((2, 4, 5), np.float32)
    out = np.zeros((2, 0, 5), np.float32)
    assert (
        cl.cublas_gemm_arguments(a, b, out, transpose_a=False, transpose_b=False, tf32=False)
        is None
    )
