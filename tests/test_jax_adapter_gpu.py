"""cupydcn.jax on a CUDA device (marker ``gpu``; skipped without one, or when JAX has no
CUDA backend): under jax.jit the ops run through jax.experimental.buffer_callback on
XLA's stream; results and gradients against the NumPy backend on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

jax = pytest.importorskip("jax")
jnp = jax.numpy

import cupydcn  # noqa: E402
import cupydcn.jax as cj  # noqa: E402

TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 3e-2}


@pytest.fixture(scope="module")
def gpu():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no CUDA backend (install jax[cuda12] or jax[cuda13])")


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


ROIS = np.array([[0, 1.5, 2.0, 9.0, 8.5], [1, 0.5, 3.0, 12.0, 10.0], [1, 4.0, 1.0, 8.0, 11.0]])


def _conv_arrays(rng):
    return {
        "input": rng.standard_normal((2, 4, 9, 8)),
        "offset": 1.5 * rng.standard_normal((2, 2 * 2 * 9, 9, 8)),
        "weight": rng.standard_normal((6, 2, 3, 3)),
        "bias": rng.standard_normal((6,)),
        "mask": rng.uniform(size=(2, 2 * 9, 9, 8)),
    }


def _conv(input, offset, weight, bias, mask):
    return cj.deform_conv2d(input, offset, weight, bias, padding=1, mask=mask)


def _conv_reference(input, offset, weight, bias, mask):
    return cupydcn.deform_conv2d(input, offset, weight, bias, padding=1, mask=mask)


def _conv_reference_grads(grad, input, offset, weight, bias, mask):
    g = cupydcn.deform_conv2d_backward(grad, input, offset, weight, mask, padding=1)
    return [g.grad_input, g.grad_offset, g.grad_weight, g.grad_bias, g.grad_mask]


def _roi_arrays(rng):
    return {
        "input": rng.standard_normal((2, 3, 12, 14)),
        "offset": 0.4 * rng.standard_normal((3, 2, 3, 3)),
        "mask": rng.uniform(size=(3, 1, 3, 3)),
    }


ROI_OPTIONS = dict(output_size=3, spatial_scale=0.9, sampling_ratio=2, gamma=0.2)
PSROI_OPTIONS = dict(
    output_dim=4,
    group_size=3,
    pooled_size=3,
    part_size=2,
    sample_per_part=2,
    spatial_scale=0.9,
    trans_std=0.2,
)


def _on(device, arrays, dtype):
    return [jax.device_put(jnp.asarray(a.astype(dtype)), device) for a in arrays]


def _close(actual, expected, dtype):
    """Largest error relative to the largest expected magnitude within tolerance."""
    actual = np.asarray(jax.device_get(actual)).astype(np.float64)
    scale = max(np.abs(expected).max(), 1e-30)
    assert np.abs(actual - expected).max() / scale < TOLERANCE[dtype]


def _dtypes():
    return pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])


@_dtypes()
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_conv_forward_and_grad_on_gpu(gpu, dtype, mode, x64):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    arrays = _conv_arrays(np.random.default_rng(0))
    values = _on(gpu, list(arrays.values()), dtype)
    # the float64 reference on the CPU, from the same (rounded) values
    reference_inputs = [np.asarray(jax.device_get(v)).astype(np.float64) for v in values]
    weights = np.random.default_rng(1).standard_normal(_conv_reference(*reference_inputs).shape)

    forward = jax.jit(_conv) if mode == "jit" else _conv
    out = forward(*values)
    assert out.devices() == {gpu} and out.dtype == jnp.dtype(dtype)
    _close(out, _conv_reference(*reference_inputs), dtype)

    def loss(*v):
        return jnp.sum(_conv(*v).astype(jnp.float64) * weights)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    grads = (jax.jit(grad) if mode == "jit" else grad)(*values)
    for got, want in zip(grads, _conv_reference_grads(weights, *reference_inputs)):
        assert got.devices() == {gpu} and got.dtype == jnp.dtype(dtype)
        _close(got, want, dtype)


def test_jit_chain_on_gpu_is_ordered(gpu):
    """Several dependent calls in one jit program: each launch must see the previous
    result on XLA's stream."""
    arrays = _conv_arrays(np.random.default_rng(2))
    x, offset, _, _, mask = _on(gpu, list(arrays.values()), "float32")
    weight = jax.device_put(
        jnp.asarray(np.random.default_rng(3).standard_normal((4, 4, 3, 3), dtype=np.float32)), gpu
    )

    def chain(x):
        for _ in range(4):
            x = jnp.tanh(
                cj.deform_conv2d(x, offset[:, :18], weight, padding=1, mask=mask[:, :9]) * 0.3
            )
        return x

    host = [np.asarray(jax.device_get(a)) for a in (x, offset, weight, mask)]
    expected = host[0]
    for _ in range(4):
        expected = np.tanh(
            cupydcn.deform_conv2d(
                expected, host[1][:, :18], host[2], padding=1, mask=host[3][:, :9]
            )
            * 0.3
        )
    _close(jax.jit(chain)(x), expected, "float32")


def test_vmap_grad_under_jit_on_gpu(gpu):
    arrays = _conv_arrays(np.random.default_rng(4))
    x, offset, weight, bias, mask = _on(gpu, list(arrays.values()), "float32")
    xs = jnp.stack([x, 2 * x])

    def loss(x):
        return jnp.sum(_conv(x, offset, weight, bias, mask) ** 2)

    grads = jax.jit(jax.vmap(jax.grad(loss)))(xs)
    for b in range(2):
        _close(grads[b], np.asarray(jax.device_get(jax.grad(loss)(xs[b]))), "float32")


@pytest.mark.parametrize("op", ["roi", "psroi"])
def test_roi_ops_jit_on_gpu(gpu, op, x64):
    rng = np.random.default_rng(5)
    if op == "roi":
        arrays = _roi_arrays(rng)

        def f(input, offset, mask, rois):
            return cj.deform_roi_pool(input, rois, offset, mask, **ROI_OPTIONS)

        def reference(grad, input, offset, mask, rois):
            out = cupydcn.deform_roi_pool(input, rois, offset, mask, **ROI_OPTIONS)
            g = cupydcn.deform_roi_pool_backward(grad, input, rois, offset, mask, **ROI_OPTIONS)
            return out, [g.grad_input, g.grad_offset, g.grad_mask]
    else:
        arrays = {
            "input": rng.standard_normal((2, 36, 12, 14)),
            "offset": 0.4 * rng.standard_normal((3, 4, 2, 2)),
        }

        def f(input, offset, rois):
            return cj.deform_psroi_pool(input, rois, offset, **PSROI_OPTIONS)[0]

        def reference(grad, input, offset, rois):
            out = cupydcn.deform_psroi_pool(input, rois, offset, **PSROI_OPTIONS)[0]
            g = cupydcn.deform_psroi_pool_backward(grad, input, rois, offset, **PSROI_OPTIONS)
            return out, [g.grad_input, g.grad_offset]

    values = _on(gpu, list(arrays.values()) + [ROIS], "float64")
    out = jax.jit(f)(*values)
    weights = np.random.default_rng(6).standard_normal(out.shape)
    expected_out, expected_grads = reference(weights, *arrays.values(), ROIS)
    _close(out, expected_out, "float64")
    n = len(arrays)
    grads = jax.jit(jax.grad(lambda *v: jnp.sum(f(*v) * weights), argnums=tuple(range(n + 1))))(
        *values
    )
    for got, want in zip(grads[:n], expected_grads):
        _close(got, want, "float64")
    np.testing.assert_array_equal(np.asarray(jax.device_get(grads[n])), 0.0)  # rois
