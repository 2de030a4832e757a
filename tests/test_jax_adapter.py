"""cupydcn.jax on the CPU: the ops as jax.custom_vjp functions, eagerly and under jax.jit.

Forward results and gradients against cupydcn's functional API and against finite
differences (float64), jax.test_util.check_grads, jax.vmap, the gradients JAX asks for
being the only ones computed, zero-copy eager results, trace-time validation, half
types, and the lowering of the CUDA branch (buffer_callback), checked without a GPU.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import cupydcn  # noqa: E402
import cupydcn.jax as cj  # noqa: E402
from cupydcn.deform_conv import numpy_backend as _numpy_conv
from cupydcn.psroi_pool import numpy_backend as _numpy_psroi_pool
from cupydcn.roi_pool import numpy_backend as _numpy_roi_pool  # noqa: E402

MODES = ["eager", "jit"]


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _maybe_jit(fn, mode):
    return jax.jit(fn) if mode == "jit" else fn


# ---------------------------------------------------------------------------- problems
# Each problem: the differentiable arrays (float64 NumPy), the fixed arrays (rois), and
# the op as functions of (differentiable..., fixed...) for cupydcn.jax and for cupydcn's
# functional API with its backward.


def _conv_problem(config: str, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    if config == "dcnv2":
        n, c, h, w, c_out, groups, offset_groups = 2, 4, 6, 5, 4, 2, 2
        options = dict(padding=1)
        out_h, out_w = h, w
    else:  # DCNv1 without bias, strided and dilated
        n, c, h, w, c_out, groups, offset_groups = 2, 3, 7, 8, 2, 1, 1
        options = dict(stride=2, padding=(1, 2), dilation=(1, 2))
        out_h, out_w = 4, 4
    arrays = {
        "input": rng.standard_normal((n, c, h, w)),
        "offset": 1.5 * rng.standard_normal((n, 2 * offset_groups * 9, out_h, out_w)),
        "weight": rng.standard_normal((c_out, c // groups, 3, 3)),
    }
    if config == "dcnv2":
        arrays["bias"] = rng.standard_normal((c_out,))
        arrays["mask"] = rng.uniform(size=(n, offset_groups * 9, out_h, out_w))
    arrays = {k: v.astype(dtype) for k, v in arrays.items()}

    def op(input, offset, weight, bias=None, mask=None):
        return cj.deform_conv2d(input, offset, weight, bias, mask=mask, **options)

    def reference(input, offset, weight, bias=None, mask=None):
        return cupydcn.deform_conv2d(input, offset, weight, bias, mask=mask, **options)

    def reference_grads(grad_output, input, offset, weight, bias=None, mask=None):
        g = cupydcn.deform_conv2d_backward(grad_output, input, offset, weight, mask, **options)
        return {
            "input": g.grad_input,
            "offset": g.grad_offset,
            "weight": g.grad_weight,
            "bias": g.grad_bias,
            "mask": g.grad_mask,
        }

    return arrays, {}, op, reference, reference_grads


ROIS = np.array([[0, 1.5, 2.0, 9.0, 8.5], [1, 0.5, 3.0, 12.0, 10.0], [1, 4.0, 1.0, 8.0, 11.0]])


def _roi_problem(config: str, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"input": rng.standard_normal((2, 3, 12, 14))}
    if config == "modulated":
        arrays["offset"] = 0.4 * rng.standard_normal((3, 2, 3, 3))
        arrays["mask"] = rng.uniform(size=(3, 1, 3, 3))
    arrays = {k: v.astype(dtype) for k, v in arrays.items()}
    options = dict(output_size=3, spatial_scale=0.9, sampling_ratio=2, gamma=0.2)

    def op(input, offset=None, mask=None, *, rois):
        return cj.deform_roi_pool(input, rois, offset, mask, **options)

    def reference(input, offset=None, mask=None, *, rois):
        return cupydcn.deform_roi_pool(input, rois, offset, mask, **options)

    def reference_grads(grad_output, input, offset=None, mask=None, *, rois):
        g = cupydcn.deform_roi_pool_backward(grad_output, input, rois, offset, mask, **options)
        return {"input": g.grad_input, "offset": g.grad_offset, "mask": g.grad_mask}

    return arrays, {"rois": ROIS.astype(dtype)}, op, reference, reference_grads


def _psroi_problem(config: str, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"input": rng.standard_normal((2, 4 * 9, 12, 14))}
    if config == "deformable":
        arrays["offset"] = 0.4 * rng.standard_normal((3, 2 * 2, 2, 2))  # 2 classes
    arrays = {k: v.astype(dtype) for k, v in arrays.items()}
    options = dict(
        output_dim=4,
        group_size=3,
        pooled_size=3,
        part_size=2,
        sample_per_part=2,
        spatial_scale=0.9,
        trans_std=0.2,
    )

    def op(input, offset=None, *, rois):
        return cj.deform_psroi_pool(input, rois, offset, **options)[0]

    def reference(input, offset=None, *, rois):
        return cupydcn.deform_psroi_pool(input, rois, offset, **options)[0]

    def reference_grads(grad_output, input, offset=None, *, rois):
        g = cupydcn.deform_psroi_pool_backward(grad_output, input, rois, offset, **options)
        return {"input": g.grad_input, "offset": g.grad_offset}

    return arrays, {"rois": ROIS.astype(dtype)}, op, reference, reference_grads


PROBLEMS = {
    "conv-dcnv2": lambda **kw: _conv_problem("dcnv2", **kw),
    "conv-dcnv1-strided": lambda **kw: _conv_problem("dcnv1", **kw),
    "roi-modulated": lambda **kw: _roi_problem("modulated", **kw),
    "roi-plain": lambda **kw: _roi_problem("plain", **kw),
    "psroi-deformable": lambda **kw: _psroi_problem("deformable", **kw),
    "psroi-plain": lambda **kw: _psroi_problem("plain", **kw),
}


def _jax_loss(op, names, fixed, weights):
    """sum(op(...) * weights) as a function of the differentiable arrays, in order."""

    def loss(*values):
        return jnp.sum(op(**dict(zip(names, values)), **fixed) * weights)

    return loss


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_forward_matches_functional_api(problem, mode, x64):
    arrays, fixed, op, reference, _ = PROBLEMS[problem]()
    expected = reference(**arrays, **fixed)
    names = list(arrays)

    def run(*values, **fixed):
        return op(**dict(zip(names, values)), **fixed)

    out = _maybe_jit(run, mode)(
        *(jnp.asarray(a) for a in arrays.values()), **{k: jnp.asarray(v) for k, v in fixed.items()}
    )
    assert isinstance(out, jax.Array) and out.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(out), expected)


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_grad_matches_backward_and_finite_differences(problem, mode, x64):
    arrays, fixed, op, reference, reference_grads = PROBLEMS[problem]()
    names = list(arrays)
    rng = np.random.default_rng(1)
    out_shape = reference(**arrays, **fixed).shape
    weights = rng.standard_normal(out_shape)
    loss = _jax_loss(op, names, {k: jnp.asarray(v) for k, v in fixed.items()}, jnp.asarray(weights))
    grad_fn = _maybe_jit(jax.grad(loss, argnums=tuple(range(len(names)))), mode)
    grads = dict(zip(names, grad_fn(*(jnp.asarray(a) for a in arrays.values()))))

    # exactly cupydcn's backward
    expected = reference_grads(weights, **arrays, **fixed)
    for name in names:
        assert grads[name].dtype == jnp.float64 and grads[name].shape == arrays[name].shape
        np.testing.assert_array_equal(np.asarray(grads[name]), expected[name], err_msg=name)

    # and the derivative of the forward: central differences along random directions
    def reference_loss(values):
        return float(np.sum(reference(**values, **fixed) * weights))

    eps = 1e-6
    for name in names:
        for _ in range(2):
            direction = rng.standard_normal(arrays[name].shape)
            plus = {**arrays, name: arrays[name] + eps * direction}
            minus = {**arrays, name: arrays[name] - eps * direction}
            numeric = (reference_loss(plus) - reference_loss(minus)) / (2 * eps)
            analytic = float(np.sum(np.asarray(grads[name]) * direction))
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("problem", ["conv-dcnv2", "roi-modulated", "psroi-deformable"])
def test_check_grads(problem, mode, x64):
    from jax.test_util import check_grads

    arrays, fixed, op, _, _ = PROBLEMS[problem]()
    names = list(arrays)
    fixed = {k: jnp.asarray(v) for k, v in fixed.items()}

    def f(*values):
        return op(**dict(zip(names, values)), **fixed)

    # Reverse mode only: custom_vjp has no forward-mode rule. A small step keeps the
    # finite differences clear of the kinks of bilinear sampling.
    check_grads(
        _maybe_jit(f, mode),
        tuple(jnp.asarray(a) for a in arrays.values()),
        order=1,
        modes=["rev"],
        eps=1e-6,
        atol=1e-6,
        rtol=1e-6,
    )


@pytest.mark.parametrize("mode", MODES)
def test_rois_get_zero_gradient_and_count_no_cotangent(mode, x64):
    arrays, fixed, _, _, _ = PROBLEMS["roi-modulated"]()
    feat = jnp.asarray(arrays["input"])
    rois = jnp.asarray(fixed["rois"])
    options = dict(output_size=3, sampling_ratio=2)

    def roi_loss(rois):
        return jnp.sum(cj.deform_roi_pool(feat, rois, **options) ** 2)

    def psroi_loss(rois):
        output, count = cj.deform_psroi_pool(feat, rois, output_dim=3, group_size=1, pooled_size=2)
        assert count.dtype == jnp.int32
        return jnp.sum(output**2) + jnp.sum(count).astype(output.dtype)

    for loss in (roi_loss, psroi_loss):
        grad = _maybe_jit(jax.grad(loss), mode)(rois)
        assert grad.shape == rois.shape
        np.testing.assert_array_equal(np.asarray(grad), 0.0)


# ---------------------------------------------------------------------------- wrt
@pytest.mark.parametrize("mode", MODES)
def test_only_the_gradients_jax_asks_for_are_computed(mode, monkeypatch):
    arrays, _, op, _, _ = PROBLEMS["conv-dcnv2"](dtype=np.float32)
    names = list(arrays)
    calls = []
    backward = cupydcn.deform_conv2d_backward

    def spy(*args, wrt=None, **kwargs):
        calls.append(tuple(sorted(wrt)))
        return backward(*args, wrt=wrt, **kwargs)

    monkeypatch.setattr(cupydcn, "deform_conv2d_backward", spy)
    values = [jnp.asarray(a) for a in arrays.values()]
    loss = _jax_loss(op, names, {}, 1.0)
    for argnums, expected in (
        ((1,), ("offset",)),
        ((0, 2), ("input", "weight")),
        ((3, 4), ("bias", "mask")),
    ):
        calls.clear()
        grads = _maybe_jit(jax.grad(loss, argnums=argnums), mode)(*values)
        assert calls == [expected]
        assert all(g.shape == values[i].shape for g, i in zip(grads, argnums))


# ---------------------------------------------------------------------------- vmap
@pytest.mark.parametrize("mode", MODES)
def test_vmap_conv_forward_and_grad(mode, x64):
    arrays, _, op, _, _ = PROBLEMS["conv-dcnv2"](seed=3)
    batch = 3
    rng = np.random.default_rng(4)
    # a leading vmapped axis on input and offset; weight, bias and mask shared
    inputs = jnp.asarray(rng.standard_normal((batch,) + arrays["input"].shape))
    offsets = jnp.asarray(rng.standard_normal((batch,) + arrays["offset"].shape))
    weight, bias, mask = (jnp.asarray(arrays[k]) for k in ("weight", "bias", "mask"))

    def f(x, o, w):
        return op(x, o, w, bias, mask)

    def loss(x, o, w):
        return jnp.sum(f(x, o, w) ** 2)

    out = _maybe_jit(jax.vmap(f, in_axes=(0, 0, None)), mode)(inputs, offsets, weight)
    grads = _maybe_jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, 0, None)), mode)(
        inputs, offsets, weight
    )
    for b in range(batch):
        np.testing.assert_array_equal(
            np.asarray(out[b]), np.asarray(f(inputs[b], offsets[b], weight))
        )
        expected = jax.grad(loss, argnums=(0, 1, 2))(inputs[b], offsets[b], weight)
        for got, want in zip(grads, expected):
            np.testing.assert_array_equal(np.asarray(got[b]), np.asarray(want))


def test_vmap_roi_pool_under_jit(x64):
    arrays, fixed, op, reference, _ = PROBLEMS["roi-modulated"]()
    stacked = {k: np.stack([v, 2 * v]) for k, v in arrays.items()}
    out = jax.jit(jax.vmap(lambda a, o, m: op(a, o, m, rois=jnp.asarray(fixed["rois"]))))(
        *(jnp.asarray(v) for v in stacked.values())
    )
    for b in range(2):
        np.testing.assert_array_equal(
            np.asarray(out[b]), reference(**{k: v[b] for k, v in stacked.items()}, **fixed)
        )


# ---------------------------------------------------------------------------- zero copy
def _aligned_copy(array: np.ndarray) -> np.ndarray:
    """``array`` in a 64-byte-aligned buffer: JAX imports CPU buffers through DLPack
    without a copy only at that alignment, which NumPy's allocator does not promise."""
    raw = np.empty(array.nbytes + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


@pytest.fixture
def backend_results(monkeypatch):
    """Records the arrays the NumPy backends return, moved to 64-byte-aligned buffers."""
    record = []

    def spy(function):
        def wrapper(*args, **kwargs):
            result = function(*args, **kwargs)
            if isinstance(result, tuple):
                moved = [None if r is None else _aligned_copy(r) for r in result]
                result = type(result)(*moved) if hasattr(result, "_fields") else tuple(moved)
                record.extend(r for r in result if r is not None)
            else:
                result = _aligned_copy(result)
                record.append(result)
            return result

        return wrapper

    for module, names in (
        (_numpy_conv, ("conv_forward", "conv_backward")),
        (_numpy_roi_pool, ("roi_pool_forward", "roi_pool_backward")),
        (_numpy_psroi_pool, ("psroi_pool_forward", "psroi_pool_backward")),
    ):
        for name in names:
            monkeypatch.setattr(module, name, spy(getattr(module, name)))
    return record


def _pointer(array: jax.Array) -> int:
    return array.unsafe_buffer_pointer()


@pytest.mark.parametrize("problem", ["conv-dcnv2", "roi-modulated", "psroi-deformable"])
def test_eager_results_are_the_buffers_the_backend_wrote(problem, backend_results):
    arrays, fixed, op, _, _ = PROBLEMS[problem](dtype=np.float32)
    values = [jnp.asarray(a) for a in arrays.values()]
    fixed = {k: jnp.asarray(v) for k, v in fixed.items()}
    names = list(arrays)
    out, vjp = jax.vjp(lambda *v: op(**dict(zip(names, v)), **fixed), *values)
    assert _pointer(out) == backend_results[0].ctypes.data, "the forward output was copied"
    backend_results.clear()
    grads = vjp(jnp.ones_like(out))
    assert len(grads) == len(backend_results)
    assert {_pointer(g) for g in grads} == {r.ctypes.data for r in backend_results}


def test_eager_psroi_count_is_zero_copy(backend_results):
    arrays, fixed, _, _, _ = PROBLEMS["psroi-deformable"](dtype=np.float32)
    output, count = cj.deform_psroi_pool(
        jnp.asarray(arrays["input"]),
        jnp.asarray(fixed["rois"]),
        jnp.asarray(arrays["offset"]),
        output_dim=4,
        group_size=3,
        pooled_size=3,
        part_size=2,
        sample_per_part=2,
    )
    assert [_pointer(output), _pointer(count)] == [r.ctypes.data for r in backend_results]


# ---------------------------------------------------------------------------- validation
def test_shape_errors_are_raised_at_trace_time():
    x = jnp.zeros((1, 4, 6, 6))
    w = jnp.zeros((2, 4, 3, 3))
    with pytest.raises(cupydcn.CupydcnValueError, match="offset has shape"):
        jax.jit(lambda x, o, w: cj.deform_conv2d(x, o, w, padding=1)).trace(
            x, jnp.zeros((1, 18, 5, 6)), w
        )
    with pytest.raises(cupydcn.CupydcnTypeError, match="weight has dtype"):
        jax.jit(lambda x, o, w: cj.deform_conv2d(x, o, w)).trace(
            x, jnp.zeros((1, 18, 4, 4)), w.astype(jnp.bfloat16)
        )
    with pytest.raises(cupydcn.CupydcnValueError, match="rois must have shape"):
        jax.jit(lambda x, r: cj.deform_roi_pool(x, r, output_size=2)).trace(x, jnp.zeros((3, 4)))
    with pytest.raises(cupydcn.CupydcnValueError, match="output_dim"):
        jax.jit(
            lambda x, r: cj.deform_psroi_pool(x, r, output_dim=3, group_size=2, pooled_size=2)
        ).trace(x, jnp.zeros((3, 5)))


def test_bad_roi_values_raise():
    x = jnp.zeros((2, 4, 6, 6))
    rois = jnp.asarray([[5.0, 0.0, 0.0, 3.0, 3.0]])
    with pytest.raises(cupydcn.CupydcnValueError, match="outside the batch range"):
        cj.deform_roi_pool(x, rois, output_size=2)
    # Under jit the values are only known inside the callback: a runtime error.
    with pytest.raises(Exception, match="outside the batch range"):
        jax.jit(lambda x, r: cj.deform_roi_pool(x, r, output_size=2))(x, rois).block_until_ready()


@pytest.mark.parametrize(
    "options, name",
    [
        ("cupydcn.deform_conv.spec.ConvOptions", "deform_conv2d"),
        ("cupydcn.roi_pool.spec.RoiPoolOptions", "deform_roi_pool"),
        ("cupydcn.psroi_pool.spec.PSRoiPoolOptions", "deform_psroi_pool"),
    ],
)
def test_signatures_take_every_option_with_its_declared_default(options, name):
    """The options dataclass is the one declaration: cupydcn.jax's functions and the
    functional API take each of its fields, with its default, and nothing else static."""
    import dataclasses
    import importlib
    import inspect

    module, cls = options.rsplit(".", 1)
    fields = dataclasses.fields(getattr(importlib.import_module(module), cls))
    declared = {
        f.name: inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        for f in fields
    }
    for function in (getattr(cj, name), getattr(cupydcn, name)):
        parameters = inspect.signature(function).parameters
        options_taken = {n: p.default for n, p in parameters.items() if n in declared}
        assert options_taken == declared, function
    arrays = set(inspect.signature(cj.__dict__[name]).parameters) - set(declared)
    assert arrays <= {"input", "offset", "weight", "bias", "mask", "rois"}


def test_options_reach_the_functional_api(monkeypatch):
    seen = []
    original = cupydcn.deform_conv2d

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(cupydcn, "deform_conv2d", spy)
    x, w = jnp.zeros((1, 2, 5, 5)), jnp.zeros((3, 2, 3, 3))
    cj.deform_conv2d(
        x,
        jnp.zeros((1, 18, 3, 5)),
        w,
        padding=(0, 1),
        padding_mode="border",
        workspace_bytes=4096,
        algorithm="im2col",
    )
    assert seen == [
        dict(
            mask=None,
            stride=1,
            padding=(0, 1),
            dilation=1,
            padding_mode="border",
            workspace_bytes=4096,
            algorithm="im2col",
        )
    ]


# ---------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", MODES)
def test_half_and_single_precision(dtype, mode):
    pytest.importorskip("ml_dtypes")
    arrays, _, op, reference, reference_grads = PROBLEMS["conv-dcnv2"]()
    names = list(arrays)
    values = [jnp.asarray(a).astype(dtype) for a in arrays.values()]
    native = [np.asarray(v) for v in values]
    out = _maybe_jit(op, mode)(*values)
    assert out.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(out), reference(*native))
    grads = _maybe_jit(jax.grad(_jax_loss(op, names, {}, 1.0), argnums=(0, 1, 2, 3, 4)), mode)(
        *values
    )
    expected = reference_grads(np.ones(out.shape, dtype=native[0].dtype), *native)
    for name, grad in zip(names, grads):
        assert grad.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(grad), expected[name], err_msg=name)


# ---------------------------------------------------------------------------- lowering
def _custom_calls(fn, args, platform: str) -> set[str]:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return set(re.findall(r"custom_call @(\w+)", text))


@pytest.mark.parametrize("problem", ["conv-dcnv2", "roi-modulated", "psroi-deformable"])
def test_lowering_cpu_pure_callback_cuda_buffer_callback(problem):
    """Lowered for CUDA (no GPU needed to lower), every op call is a buffer_callback,
    which runs on XLA's stream over device buffers: no host callback, no transfer."""
    arrays, fixed, op, _, _ = PROBLEMS[problem](dtype=np.float32)
    names = list(arrays)
    values = [jnp.asarray(a) for a in arrays.values()]
    fixed = {k: jnp.asarray(v) for k, v in fixed.items()}
    loss = _jax_loss(op, names, fixed, 1.0)
    grad = jax.grad(loss, argnums=tuple(range(len(names))))
    batched = jax.vmap(grad, in_axes=(0,) + (None,) * (len(names) - 1))
    for fn, args in ((loss, values), (grad, values), (batched, [values[0][None]] + values[1:])):
        assert _custom_calls(fn, args, "cuda") == {"xla_buffer_python_gpu_callback"}
        assert _custom_calls(fn, args, "cpu") == {"xla_ffi_python_cpu_callback"}


def test_import_cupydcn_does_not_import_jax():
    code = "import sys, cupydcn; assert 'jax' not in sys.modules, 'jax was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("mode", MODES)
def test_padding_modes_pass_through(mode, x64):
    from cupydcn import PADDING_MODES

    arrays, _, _, _, _ = PROBLEMS["conv-dcnv2"]()
    names = list(arrays)
    values = [jnp.asarray(a) for a in arrays.values()]
    weights = np.random.default_rng(7).standard_normal((2, 4, 6, 5))
    for padding_mode in PADDING_MODES:
        options = dict(padding=1, padding_mode=padding_mode)

        def loss(input, offset, weight, bias, mask, options=options):
            out = cj.deform_conv2d(input, offset, weight, bias, mask=mask, **options)
            return jnp.sum(out * weights)

        grads = _maybe_jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), mode)(*values)
        expected = cupydcn.deform_conv2d_backward(
            weights, arrays["input"], arrays["offset"], arrays["weight"], arrays["mask"], **options
        )
        for name, grad in zip(names, grads):
            np.testing.assert_array_equal(
                np.asarray(grad),
                getattr(expected, f"grad_{name}"),
                err_msg=f"{padding_mode}: {name}",
            )
