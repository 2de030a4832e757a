"""offset_l2_penalty / offset_l2_penalty_backward: values, gradients, array libraries,
validation; the CUDA path's conversions through the emulator and on a GPU.

penalty = weight * reduce(offset ** 2), reduce = mean | sum | none, computed in the
accumulation dtype (float32 for the half types) and rounded once.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cupydcn import CupydcnTypeError, CupydcnValueError
from cupydcn.deform_conv.offset_penalty import (
    PenaltyPlan,
    offset_l2_penalty,
    offset_l2_penalty_backward,
    penalty_backward,
    penalty_forward,
)
from support import DTYPE_NAMES, TOLERANCE, dtype_of, is_exact, on_device, seeded, to_numpy

REDUCTIONS = ("mean", "sum", "none")
SHAPES = {
    "conv": (2, 18, 5, 6),  # [N, 2*G*kh*kw, H_out, W_out]
    "roi": (7, 2, 3, 3),  # [K, 2, ph, pw]
    "psroi": (4, 6, 2, 2),  # [K, 2*num_classes, part, part]
    "vector": (5,),
    "scalar": (),
    "empty": (0, 2, 3, 3),
}
# |got - exact| <= RTOL * |exact| (sums of positive terms: no cancellation) + FLOOR: the
# ``relative`` and ``floor`` bounds of tests/support.py (the half types are rounded once
# from float32: 2u; FLOOR is half the spacing of float16's subnormals, as results below
# 2^-14 lose relative precision).
RTOL = {name: TOLERANCE[name].relative for name in DTYPE_NAMES}
FLOOR = {name: TOLERANCE[name].floor for name in DTYPE_NAMES}


def exact_penalty(offset: np.ndarray, weight: float, reduction: str) -> np.ndarray:
    """float64 (math.fsum) penalty of the values of ``offset``."""
    squares = offset.astype(np.float64) ** 2
    if reduction == "none":
        return weight * squares
    total = math.fsum(squares.ravel())
    if reduction == "mean":
        total = total / squares.size if squares.size else 0.0
    return np.asarray(weight * total)


def random_offset(shape, dtype_name, *key):
    rng = seeded(shape, dtype_name, *key)
    return (rng.normal(scale=2.0, size=shape)).astype(dtype_of(dtype_name))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=list(SHAPES))
def test_values(shape, dtype_name, reduction):
    offset = random_offset(shape, dtype_name)
    saved = offset.copy()
    weight = 0.37
    result = offset_l2_penalty(offset, weight=weight, reduction=reduction)
    assert isinstance(result, np.ndarray) and result.dtype == offset.dtype
    assert result.shape == (shape if reduction == "none" else ())
    expected = exact_penalty(offset, weight, reduction)
    np.testing.assert_allclose(
        result.astype(np.float64), expected, rtol=RTOL[dtype_name], atol=FLOOR[dtype_name]
    )
    assert offset.tobytes() == saved.tobytes()


def test_default_is_mean_with_weight_one():
    offset = np.array([[1.0, -2.0], [3.0, 0.5]])
    assert offset_l2_penalty(offset) == pytest.approx((1 + 4 + 9 + 0.25) / 4)
    assert offset_l2_penalty(offset, weight=0) == 0.0
    assert offset_l2_penalty(offset, weight=-2, reduction="sum") == pytest.approx(-28.5)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_half_types_accumulate_in_float32(dtype_name):
    """Squares of 128 sum far past float16's range (and bfloat16's precision); the mean
    is exact in float32 and representable, so it comes back exactly."""
    offset = np.full((3, 100), 128.0).astype(dtype_of(dtype_name))
    assert float(offset_l2_penalty(offset)) == 16384.0
    assert float(offset_l2_penalty(offset, weight=0.5)) == 8192.0
    assert float(offset_l2_penalty(offset[:, :1], reduction="sum")) == 3 * 16384.0


def test_empty_offset():
    offset = np.zeros((0, 2, 3, 3), np.float32)
    assert offset_l2_penalty(offset).shape == () and float(offset_l2_penalty(offset)) == 0.0
    assert float(offset_l2_penalty(offset, reduction="sum")) == 0.0
    assert offset_l2_penalty(offset, reduction="none").shape == (0, 2, 3, 3)
    grad = offset_l2_penalty_backward(np.ones((), np.float32), offset)
    assert grad.shape == offset.shape and grad.dtype == np.float32


def test_noncontiguous_offset():
    base = random_offset((4, 6, 5), "float32")
    view = base[:, ::2, ::-1].transpose(2, 0, 1)
    for reduction in REDUCTIONS:
        np.testing.assert_allclose(
            offset_l2_penalty(view, reduction=reduction),
            offset_l2_penalty(np.ascontiguousarray(view), reduction=reduction),
            rtol=1e-6,
        )
    grad = offset_l2_penalty_backward(np.ones((), np.float32), view, reduction="sum")
    np.testing.assert_array_equal(grad, 2 * view)


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "shape", [SHAPES["roi"], SHAPES["vector"], SHAPES["scalar"]], ids=["roi", "vector", "scalar"]
)
def test_gradient_matches_central_differences(shape, reduction):
    """float64; the penalty is quadratic, so central differences are exact up to rounding."""
    rng = seeded("fd", shape, reduction)
    offset = rng.normal(size=shape)
    weight = 1.7
    upstream = rng.normal(size=shape if reduction == "none" else ())

    def loss():
        return float(
            np.sum(upstream * offset_l2_penalty(offset, weight=weight, reduction=reduction))
        )

    expected = np.empty(shape)
    step = 1e-6
    for index in np.ndindex(shape):
        original = offset[index]
        offset[index] = original + step
        plus = loss()
        offset[index] = original - step
        minus = loss()
        offset[index] = original
        expected[index] = (plus - minus) / (2 * step)
    grad = offset_l2_penalty_backward(upstream, offset, weight=weight, reduction=reduction)
    assert grad.shape == shape and grad.dtype == np.float64
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-8)
    # and the closed form
    scale = 2 * weight * upstream / (offset.size if reduction == "mean" else 1)
    np.testing.assert_allclose(grad, scale * offset, rtol=1e-15)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
def test_low_precision_gradient(dtype_name, reduction):
    shape = SHAPES["conv"]
    offset = random_offset(shape, dtype_name, "grad")
    rng = seeded("upstream", dtype_name, reduction)
    upstream = rng.normal(size=shape if reduction == "none" else ()).astype(offset.dtype)
    grad = offset_l2_penalty_backward(upstream, offset, weight=0.8, reduction=reduction)
    assert grad.dtype == offset.dtype and grad.shape == shape
    expected = (
        2
        * 0.8
        * upstream.astype(np.float64)
        * offset.astype(np.float64)
        / (offset.size if reduction == "mean" else 1)
    )
    np.testing.assert_allclose(
        grad.astype(np.float64), expected, rtol=RTOL[dtype_name], atol=FLOOR[dtype_name]
    )


# ---------------------------------------------------------------------------- libraries


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype_name", ["float64", "float32", "bfloat16"])
def test_torch_round_trip_and_autograd(dtype_name, reduction):
    torch = pytest.importorskip("torch")
    offset = random_offset(SHAPES["roi"], "float64", "torch")
    torch_dtype = getattr(torch, dtype_name)
    tensor = torch.tensor(offset, dtype=torch_dtype, requires_grad=True)
    with torch.no_grad():  # tensors requiring grad are refused under grad mode
        result = offset_l2_penalty(tensor, weight=0.5, reduction=reduction)
    assert isinstance(result, torch.Tensor) and result.dtype == torch_dtype
    assert tuple(result.shape) == (tensor.shape if reduction == "none" else ())

    # torch's own computation in float64 on the same (rounded) values
    exact = tensor.detach().to(torch.float64).requires_grad_(True)
    squares = 0.5 * exact**2
    reference = {"mean": squares.mean(), "sum": squares.sum(), "none": squares}[reduction]
    upstream = torch.ones_like(reference)
    reference.backward(upstream)
    rtol = RTOL[dtype_name]
    np.testing.assert_allclose(
        result.to(torch.float64).numpy(), reference.detach().numpy(), rtol=rtol
    )
    with torch.no_grad():
        grad = offset_l2_penalty_backward(
            upstream.to(torch_dtype), tensor, weight=0.5, reduction=reduction
        )
    assert isinstance(grad, torch.Tensor) and grad.dtype == torch_dtype
    np.testing.assert_allclose(grad.to(torch.float64).numpy(), exact.grad.numpy(), rtol=rtol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jax_round_trip_and_grad(reduction):
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    offset = jnp.asarray(random_offset(SHAPES["conv"], "float32", "jax"))
    result = offset_l2_penalty(offset, weight=2.0, reduction=reduction)
    assert isinstance(result, jax.Array) and result.dtype == jnp.float32
    reduce = {"mean": jnp.mean, "sum": jnp.sum, "none": lambda v: v}[reduction]

    def penalty(v):
        return 2.0 * reduce(v**2)

    np.testing.assert_allclose(np.asarray(result), np.asarray(penalty(offset)), rtol=1e-5)
    upstream = jnp.ones(result.shape, jnp.float32)
    _, vjp = jax.vjp(penalty, offset)
    (expected,) = vjp(upstream)
    grad = offset_l2_penalty_backward(upstream, offset, weight=2.0, reduction=reduction)
    assert isinstance(grad, jax.Array) and grad.shape == offset.shape
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-6)


def test_numpy_scalar_grad():
    offset = np.array([1.0, -3.0], np.float32)
    grad = offset_l2_penalty_backward(np.float32(2.0), offset, reduction="sum")
    np.testing.assert_array_equal(grad, [4.0, -12.0])


# ---------------------------------------------------------------------------- validation


def _message(exc_type, call):
    with pytest.raises(exc_type) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("bad", ["max", "MEAN", None, 1])
def test_invalid_reduction(bad):
    offset = np.ones((2, 2), np.float32)
    message = _message(CupydcnValueError, lambda: offset_l2_penalty(offset, reduction=bad))
    assert message == (
        f"offset_l2_penalty: reduction must be one of ('mean', 'sum', 'none'); got {bad!r}"
    )
    message = _message(
        CupydcnValueError,
        lambda: offset_l2_penalty_backward(np.ones((), np.float32), offset, reduction=bad),
    )
    assert message.startswith("offset_l2_penalty_backward: reduction must be one of")


@pytest.mark.parametrize(
    "bad, exc, fragment",
    [
        (True, CupydcnTypeError, "weight must be a real number"),
        ("1", CupydcnTypeError, "weight must be a real number"),
        (np.inf, CupydcnValueError, "weight must be finite"),
        (np.nan, CupydcnValueError, "weight must be finite"),
    ],
)
def test_invalid_weight(bad, exc, fragment):
    message = _message(exc, lambda: offset_l2_penalty(np.ones(3), weight=bad))
    assert message.startswith("offset_l2_penalty: ") and fragment in message


def test_invalid_offset():
    message = _message(CupydcnTypeError, lambda: offset_l2_penalty([1.0, 2.0]))
    assert message.startswith("offset_l2_penalty: offset must be an array supporting DLPack")
    message = _message(CupydcnTypeError, lambda: offset_l2_penalty(np.ones(3, np.int64)))
    assert message.startswith("offset_l2_penalty: offset has dtype int64; expected one of")


def test_invalid_grad():
    offset = np.ones((2, 3), np.float32)
    message = _message(
        CupydcnValueError,
        lambda: offset_l2_penalty_backward(np.ones((1,), np.float32), offset, reduction="sum"),
    )
    assert message == (
        "offset_l2_penalty_backward: grad has shape (1,); expected () "
        "(a 0-d array for reduction='sum')"
    )
    message = _message(
        CupydcnValueError,
        lambda: offset_l2_penalty_backward(np.ones((3, 2), np.float32), offset, reduction="none"),
    )
    assert "grad has shape (3, 2); expected (2, 3) (offset's shape" in message
    message = _message(
        CupydcnTypeError, lambda: offset_l2_penalty_backward(np.ones((), np.float64), offset)
    )
    assert "grad has dtype float64; expected float32 like offset" in message
    torch = pytest.importorskip("torch")
    message = _message(CupydcnTypeError, lambda: offset_l2_penalty_backward(torch.ones(()), offset))
    assert "one library" in message


# ---------------------------------------------------------------------------- CUDA path


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_cuda_path_conversions(launcher, dtype_name, reduction):
    """The GPU code path (half types widened and rounded by cupydcn/cuda/kernels/convert.cu)
    with the ``launcher`` (the CPU emulator's: against the CPU path bit for bit; CuPy's on
    a device: within the dtype's relative bound, its sums being CuPy's)."""
    start = len(launcher.launches)  # the launcher is shared: look only at this test's launches
    offset = random_offset(SHAPES["conv"], dtype_name, "emulated")[:, ::2]  # strided
    upstream = np.ones(offset.shape if reduction == "none" else (), offset.dtype)
    plan = PenaltyPlan(dtype_name, 0.3, reduction)
    compare = (
        np.testing.assert_array_equal
        if is_exact(launcher)
        else lambda got, want: np.testing.assert_allclose(
            got.astype(np.float64),
            want.astype(np.float64),
            rtol=RTOL[dtype_name],
            atol=FLOOR[dtype_name],
        )
    )
    device_offset = on_device(launcher, offset)
    got = to_numpy(penalty_forward(launcher.xp, launcher, device_offset, plan))
    want = penalty_forward(np, None, offset, plan)
    assert got.dtype == want.dtype and got.shape == want.shape
    compare(got, want)
    got = to_numpy(
        penalty_backward(launcher.xp, launcher, on_device(launcher, upstream), device_offset, plan)
    )
    want = penalty_backward(np, None, upstream, offset, plan)
    compare(got, want)
    assert any(r.kernel == "widen_to_acc" for r in launcher.launches[start:]) == (
        dtype_name in ("float16", "bfloat16")
    )
