"""cupydcn.jax's deformable-attention ops on the CPU: forward against the functional API,
gradients against cupydcn's backward and finite differences (float64), eagerly and under
jax.jit, jax.vmap, only the differentiated gradients computed, static level arguments,
and half types."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import cupydcn  # noqa: E402
import cupydcn.jax as cj  # noqa: E402

MODES = ["eager", "jit"]
SHAPES = ((3, 4), (2, 2))


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _maybe_jit(fn, mode):
    return jax.jit(fn) if mode == "jit" else fn


def _fractional(rng, base):
    """Integers plus a fraction in [0.2, 0.8]: no sample near a kink of the bilinear
    weights, so central differences are exact there."""
    return base + rng.uniform(0.2, 0.8, size=base.shape)


# ---------------------------------------------------------------------------- problems
def msda_problem(seed=0, n=2, heads=2, dim=3, queries=3, points=2):
    rng = np.random.default_rng(seed)
    levels, keys = len(SHAPES), sum(h * w for h, w in SHAPES)
    size = np.array([[w, h] for h, w in SHAPES], dtype=np.float64).reshape(1, 1, 1, levels, 1, 2)
    loc_shape = (n, queries, heads, levels, points, 2)
    base = np.floor(rng.uniform(size=loc_shape) * (size + 1)) - 1
    arrays = {
        "value": rng.standard_normal((n, keys, heads, dim)),
        "sampling_locations": (_fractional(rng, base) + 0.5) / size,
        "attention_weights": rng.uniform(size=loc_shape[:-1]),
    }

    def op(value, sampling_locations, attention_weights):
        return cj.multi_scale_deformable_attn(
            value, SHAPES, (0, 12), sampling_locations, attention_weights
        )

    def reference(value, sampling_locations, attention_weights):
        return cupydcn.multi_scale_deformable_attn(
            value, SHAPES, None, sampling_locations, attention_weights
        )

    def reference_grads(grad, **a):
        g = cupydcn.multi_scale_deformable_attn_backward(
            grad, a["value"], SHAPES, None, a["sampling_locations"], a["attention_weights"]
        )
        return dict(zip(arrays, g))

    return arrays, op, reference, reference_grads


DCN_OPTIONS = dict(
    kernel_size=(2, 3),
    stride=(2, 1),
    padding=(1, 0),
    dilation=(1, 2),
    offset_scale=0.5,
    group=2,
    group_channels=2,
)
RC_OPTIONS = dict(kernel_size=3, padding=1, group=1, group_channels=3, remove_center=True)


def _dcn_arrays(rng, options, n=2, h=4, w=5):
    kh, kw = np.broadcast_to(options["kernel_size"], 2)
    sh, sw = np.broadcast_to(options.get("stride", 1), 2)
    ph, pw = np.broadcast_to(options.get("padding", 0), 2)
    dh, dw = np.broadcast_to(options.get("dilation", 1), 2)
    out_h = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    out_w = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    g, points = options["group"], kh * kw - int(options.get("remove_center", False))
    return {
        "input": rng.standard_normal((n, h, w, g * options["group_channels"])),
        "offset": _fractional(
            rng, rng.integers(-2, 2, (n, out_h, out_w, g * points * 2)).astype(np.float64)
        ),
        "mask": rng.uniform(0.2, 1.0, (n, out_h, out_w, g * points)),
    }, points


def dcnv3_problem(seed=0, options=DCN_OPTIONS):
    arrays, _ = _dcn_arrays(np.random.default_rng(seed), options)

    def op(input, offset, mask):
        return cj.dcnv3(input, offset, mask, **options)

    def reference(input, offset, mask):
        return cupydcn.dcnv3(input, offset, mask, **options)

    def reference_grads(grad, **a):
        return dict(zip(arrays, cupydcn.dcnv3_backward(grad, *a.values(), **options)))

    return arrays, op, reference, reference_grads


def dcnv4_problem(seed=0, options=RC_OPTIONS):
    arrays, points = _dcn_arrays(np.random.default_rng(seed), options)
    n, ho, wo, _ = arrays["mask"].shape
    g = options["group"]
    packed = np.concatenate(
        [arrays["offset"].reshape(n, ho, wo, g, -1), arrays["mask"].reshape(n, ho, wo, g, -1)], -1
    ).reshape(n, ho, wo, -1)
    offset_mask = np.concatenate([packed, np.full((n, ho, wo, 3), 5.0)], -1)  # padding
    arrays = {"input": arrays["input"], "offset_mask": offset_mask}

    def op(input, offset_mask):
        return cj.dcnv4(input, offset_mask, **options)

    def reference(input, offset_mask):
        return cupydcn.dcnv4(input, offset_mask, **options)

    def reference_grads(grad, **a):
        return dict(zip(arrays, cupydcn.dcnv4_backward(grad, *a.values(), **options)))

    return arrays, op, reference, reference_grads


PROBLEMS = {
    "msda": msda_problem,
    "dcnv3": dcnv3_problem,
    "dcnv3-remove-center": lambda: dcnv3_problem(options=RC_OPTIONS),
    "dcnv4": dcnv4_problem,
}


# ---------------------------------------------------------------------------- forward
def test_exported():
    for name in ("multi_scale_deformable_attn", "dcnv3", "dcnv4"):
        assert name in cj.__all__ and getattr(cj, name).__doc__


@pytest.mark.parametrize("name", ["dcnv3", "dcnv4"])
def test_signatures_take_every_option_with_its_declared_default(name):
    import dataclasses
    import inspect

    from cupydcn.deform_attn.spec import Dcnv3Options, Dcnv4Options

    fields = dataclasses.fields(Dcnv3Options if name == "dcnv3" else Dcnv4Options)
    declared = {
        f.name: inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        for f in fields
    }
    for function in (getattr(cj, name), getattr(cupydcn, name)):
        parameters = inspect.signature(function).parameters
        assert {n: p.default for n, p in parameters.items() if n in declared} == declared


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_forward_matches_functional_api(problem, mode, x64):
    arrays, op, reference, _ = PROBLEMS[problem]()
    out = _maybe_jit(op, mode)(*(jnp.asarray(a) for a in arrays.values()))
    assert isinstance(out, jax.Array) and out.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(out), reference(*arrays.values()))


# ---------------------------------------------------------------------------- gradients
def _central_difference(f, arrays, name, index, eps=1e-6):
    plus = {k: v.copy() for k, v in arrays.items()}
    minus = {k: v.copy() for k, v in arrays.items()}
    plus[name][index] += eps
    minus[name][index] -= eps
    return (f(**plus) - f(**minus)) / (2 * eps)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_grad_matches_backward_and_finite_differences(problem, mode, x64):
    arrays, op, reference, reference_grads = PROBLEMS[problem]()
    rng = np.random.default_rng(1)
    cot = rng.standard_normal(np.shape(reference(*arrays.values())))

    def loss(*xs):
        return jnp.sum(op(*xs) * cot)

    grads = _maybe_jit(jax.grad(loss, argnums=tuple(range(len(arrays)))), mode)(
        *(jnp.asarray(a) for a in arrays.values())
    )
    expected = reference_grads(cot, **arrays)
    for (name, a), g in zip(arrays.items(), grads):
        np.testing.assert_allclose(np.asarray(g), expected[name], rtol=1e-12, atol=1e-12)

        def numeric(**xs):
            return float(np.sum(reference(*xs.values()) * cot))

        flat = rng.choice(a.size, size=min(a.size, 12), replace=False)
        for i in flat:
            index = np.unravel_index(i, a.shape)
            np.testing.assert_allclose(
                np.asarray(g)[index],
                _central_difference(numeric, arrays, name, index),
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{name}{index}",
            )


def test_check_grads(x64):
    from jax.test_util import check_grads

    for problem in ("msda", "dcnv4"):
        arrays, op, _, _ = PROBLEMS[problem]()
        check_grads(
            jax.jit(op),
            tuple(jnp.asarray(a) for a in arrays.values()),
            order=1,
            modes=("rev",),
            eps=1e-6,
        )


def test_dcnv4_padding_gets_zero_gradient(x64):
    arrays, op, _, _ = dcnv4_problem()
    g = jax.grad(lambda om: jnp.sum(op(jnp.asarray(arrays["input"]), om) ** 2))(
        jnp.asarray(arrays["offset_mask"])
    )
    assert not np.any(np.asarray(g)[..., -3:])


def _recording(monkeypatch, name):
    calls = []
    original = getattr(cupydcn, name)

    def record(*args, wrt, **kwargs):
        calls.append(tuple(wrt))
        return original(*args, wrt=wrt, **kwargs)

    monkeypatch.setattr(cupydcn, name, record)
    return calls


@pytest.mark.parametrize("mode", MODES)
def test_only_the_differentiated_gradients_are_computed(monkeypatch, mode, x64):
    for problem, backward, argnums, expected in (
        ("msda", "multi_scale_deformable_attn_backward", (1,), ("sampling_locations",)),
        ("dcnv3", "dcnv3_backward", (0, 2), ("input", "mask")),
        ("dcnv4", "dcnv4_backward", (1,), ("offset_mask",)),
    ):
        calls = _recording(monkeypatch, backward)
        arrays, op, _, _ = PROBLEMS[problem]()
        _maybe_jit(jax.grad(lambda *xs, op=op: jnp.sum(op(*xs)), argnums=argnums), mode)(
            *(jnp.asarray(a) for a in arrays.values())
        )
        assert calls == [expected], problem


# ---------------------------------------------------------------------------- vmap
@pytest.mark.parametrize("mode", MODES)
def test_vmap_forward_and_grad(mode, x64):
    batches = [msda_problem(seed=s)[0] for s in range(3)]
    _, op, reference, reference_grads = msda_problem()
    values = jnp.stack([jnp.asarray(b["value"]) for b in batches])
    locations = jnp.asarray(batches[0]["sampling_locations"])
    weights = jnp.asarray(batches[0]["attention_weights"])
    out = _maybe_jit(jax.vmap(op, in_axes=(0, None, None)), mode)(values, locations, weights)
    for i, b in enumerate(batches):
        np.testing.assert_array_equal(
            np.asarray(out[i]),
            reference(
                b["value"], batches[0]["sampling_locations"], batches[0]["attention_weights"]
            ),
        )

    def loss(v, loc, w):
        return jnp.sum(op(v, loc, w) ** 2)

    grads = _maybe_jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None, None)), mode)(
        values, locations, weights
    )
    for i, b in enumerate(batches):
        out_i = reference(
            b["value"], batches[0]["sampling_locations"], batches[0]["attention_weights"]
        )
        expected = reference_grads(
            2 * out_i,
            value=b["value"],
            sampling_locations=batches[0]["sampling_locations"],
            attention_weights=batches[0]["attention_weights"],
        )
        np.testing.assert_allclose(
            np.asarray(grads[0][i]), expected["value"], rtol=1e-12, atol=1e-12
        )
        np.testing.assert_allclose(
            np.asarray(grads[1][i]), expected["sampling_locations"], rtol=1e-12, atol=1e-12
        )


def test_vmap_dcn_under_jit(x64):
    arrays, op, reference, _ = dcnv3_problem()
    inputs = np.stack([arrays["input"], 2 * arrays["input"]])
    out = jax.jit(jax.vmap(op, in_axes=(0, None, None)))(
        jnp.asarray(inputs), jnp.asarray(arrays["offset"]), jnp.asarray(arrays["mask"])
    )
    for i in range(2):
        np.testing.assert_array_equal(
            np.asarray(out[i]), reference(inputs[i], arrays["offset"], arrays["mask"])
        )


# ---------------------------------------------------------------------------- static levels
def test_level_arguments_are_static_and_checked(x64):
    arrays, _, reference, _ = msda_problem()
    v, loc, w = (jnp.asarray(a) for a in arrays.values())
    expected = reference(*arrays.values())
    for shapes, starts in (
        (np.array(SHAPES), np.array([0, 12])),
        (jnp.asarray(SHAPES), None),
        ([list(s) for s in SHAPES], [0, 12]),
    ):
        np.testing.assert_array_equal(
            np.asarray(cj.multi_scale_deformable_attn(v, shapes, starts, loc, w)), expected
        )
    with pytest.raises(cupydcn.CupydcnValueError, match="level_start_index is"):
        jax.jit(lambda *a: cj.multi_scale_deformable_attn(a[0], SHAPES, (0, 11), *a[1:]))(v, loc, w)
    with pytest.raises(cupydcn.CupydcnValueError, match="sum"):
        cj.multi_scale_deformable_attn(v, ((3, 4), (2, 3)), None, loc, w)
    with pytest.raises(cupydcn.CupydcnTypeError, match="must be static"):
        jax.jit(lambda s, *a: cj.multi_scale_deformable_attn(a[0], s, None, *a[1:]))(
            jnp.asarray(SHAPES), v, loc, w
        )
    with pytest.raises(cupydcn.CupydcnTypeError, match="spatial_shapes"):
        cj.multi_scale_deformable_attn(v, None, None, loc, w)


def test_bad_dcn_input_is_refused_at_trace_time(x64):
    arrays, _, _, _ = dcnv3_problem()
    with pytest.raises(cupydcn.CupydcnValueError, match="offset has shape"):
        jax.jit(lambda x, o, m: cj.dcnv3(x, o[..., :-2], m, **DCN_OPTIONS))(
            *(jnp.asarray(a) for a in arrays.values())
        )


# ---------------------------------------------------------------------------- half types
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_half_types(dtype):
    arrays, op, reference, _ = dcnv4_problem()
    cast = [jnp.asarray(a, dtype=dtype) for a in arrays.values()]
    out = jax.jit(op)(*cast)
    assert out.dtype == dtype
    np.testing.assert_array_equal(
        np.asarray(out.astype(jnp.float32)),
        np.asarray(reference(*(np.asarray(c) for c in cast)), dtype=np.float32),
    )
    g = jax.grad(lambda x, om: jnp.sum(op(x, om).astype(jnp.float32)))(*cast)
    assert g.dtype == dtype
