"""The array boundary: every array library in, the same library out, zero-copy, inputs
untouched, clear errors for mixed libraries and devices."""

from __future__ import annotations

import numpy as np
import pytest

import cupydcn
from cupydcn.deform_conv import numpy_backend as _numpy_conv


def _problem(dtype=np.float32, n=3, seed=0):
    rng = np.random.default_rng(seed)
    c, h, w, c_out, kh, kw = 4, 6, 5, 6, 3, 3
    out_h, out_w = h, w  # padding 1
    return dict(
        input=rng.standard_normal((n, c, h, w)).astype(dtype),
        offset=(2 * rng.standard_normal((n, 2 * 2 * kh * kw, out_h, out_w))).astype(dtype),
        weight=rng.standard_normal((c_out, c // 2, kh, kw)).astype(dtype),
        bias=rng.standard_normal((c_out,)).astype(dtype),
        mask=rng.uniform(size=(n, 2 * kh * kw, out_h, out_w)).astype(dtype),
    )


def _forward(p, **kw):
    return cupydcn.deform_conv2d(
        p["input"], p["offset"], p["weight"], p["bias"], padding=1, mask=p["mask"], **kw
    )


def _backward(grad_output, p, **kw):
    return cupydcn.deform_conv2d_backward(
        grad_output, p["input"], p["offset"], p["weight"], p["mask"], padding=1, **kw
    )


@pytest.fixture
def captured(monkeypatch):
    """Records the arrays the NumPy backend returns, to check results are not copied."""
    record = []
    forward, backward = _numpy_conv.conv_forward, _numpy_conv.conv_backward

    def forward_spy(*a, **k):
        out = forward(*a, **k)
        record.append(out)
        return out

    def backward_spy(*a, **k):
        out = backward(*a, **k)
        record.extend(out)
        return out

    monkeypatch.setattr(_numpy_conv, "conv_forward", forward_spy)
    monkeypatch.setattr(_numpy_conv, "conv_backward", backward_spy)
    return record


def test_numpy_in_numpy_out_inputs_untouched(captured):
    p = _problem()
    before = {k: v.copy() for k, v in p.items()}
    out = _forward(p)
    assert type(out) is np.ndarray and out.dtype == np.float32 and out.shape == (3, 6, 6, 5)
    assert out is captured[0]
    grads = _backward(np.ones_like(out), p)
    assert isinstance(grads, cupydcn.ConvGrads)
    for name, grad in zip(("input", "offset", "weight", "mask"), grads[:4]):
        assert grad.shape == p[name].shape and grad.dtype == np.float32
    assert grads.grad_bias.shape == (6,)
    for k in p:
        np.testing.assert_array_equal(p[k], before[k])


def test_torch_cpu_roundtrip_is_zero_copy(captured):
    torch = pytest.importorskip("torch")
    p = _problem()
    expected = _forward(p)
    tp = {k: torch.from_numpy(v.copy()) for k, v in p.items()}
    tp["weight"].requires_grad_(True)  # refused under grad mode; fine under no_grad
    captured.clear()
    with torch.no_grad():
        out = _forward(tp)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.data_ptr() == captured[0].ctypes.data, "the result was copied on the way back"
    np.testing.assert_array_equal(out.numpy(), expected)
    with torch.no_grad():
        grads = _backward(torch.ones_like(out), tp)
    assert all(isinstance(g, torch.Tensor) for g in grads)
    np.testing.assert_array_equal(
        grads.grad_offset.numpy(), _backward(np.ones_like(expected), p).grad_offset
    )


def test_torch_cpu_bfloat16():
    torch = pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    p = _problem()
    tp = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in p.items()}
    out = _forward(tp)
    assert out.dtype == torch.bfloat16
    reference = _forward({k: v.to(torch.float64).numpy() for k, v in tp.items()})
    np.testing.assert_allclose(out.to(torch.float64).numpy(), reference, rtol=2e-2, atol=5e-2)
    grads = _backward(torch.ones_like(out), tp)
    assert grads.grad_input.dtype == torch.bfloat16


def test_torch_non_contiguous():
    torch = pytest.importorskip("torch")
    p = _problem()
    expected = _forward(p)
    # channels-last storage and a transposed weight view: same values, other strides
    tp = {k: torch.from_numpy(v) for k, v in p.items()}
    tp["input"] = tp["input"].to(memory_format=torch.channels_last)
    tp["weight"] = tp["weight"].transpose(2, 3).contiguous().transpose(2, 3)
    assert not tp["input"].is_contiguous() and not tp["weight"].is_contiguous()
    np.testing.assert_allclose(_forward(tp).numpy(), expected, rtol=1e-5, atol=1e-5)


class _FakeDLPack:
    """A DLPack producer that claims a given device (wraps a NumPy array)."""

    def __init__(self, array, device):
        self._array, self._device = array, device

    @property
    def shape(self):
        return self._array.shape

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._device


def test_generic_dlpack_producer_on_cpu():
    p = _problem()
    expected = _forward(p)
    out = _forward({k: _FakeDLPack(v, (1, 0)) for k, v in p.items()})
    np.testing.assert_array_equal(out, expected)


def test_mixed_devices():
    p = _problem()
    wrapped = {k: _FakeDLPack(v, (1, 0)) for k, v in p.items()}
    wrapped["mask"] = _FakeDLPack(p["mask"], (2, 0))
    with pytest.raises(ValueError, match="input is on the CPU but mask is on CUDA device 0"):
        _forward(wrapped)


def test_unsupported_device_type():
    p = _problem()
    wrapped = {k: _FakeDLPack(v, (4, 0)) for k, v in p.items()}
    with pytest.raises(TypeError, match="DLPack device type 4"):
        _forward(wrapped)


def test_jax_cpu_bfloat16():
    jax = pytest.importorskip("jax")
    pytest.importorskip("ml_dtypes")
    p = _problem()
    jp = {k: jax.numpy.asarray(v, dtype=jax.numpy.bfloat16) for k, v in p.items()}
    out = _forward(jp)
    assert isinstance(out, jax.Array) and out.dtype == jax.numpy.bfloat16
    reference = _forward({k: np.asarray(v, dtype=np.float64) for k, v in jp.items()})
    np.testing.assert_allclose(np.asarray(out, dtype=np.float64), reference, rtol=2e-2, atol=5e-2)
