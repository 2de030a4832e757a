"""Double backward of deform_conv2d: the backward is itself differentiable.

* cupydcn/deform_conv/second_order.py (the second derivatives along the offsets) against
  central differences of cupydcn's own backward;
* cupydcn.torch: ``torch.autograd.gradgradcheck`` in float64 (every argument, mask and
  bias, groups, offset groups, stride / padding / dilation differing in H and W; DCNv1
  without bias; subsets of the arguments); a gradient penalty; the documented limits
  (padding_mode other than "zeros" along the offsets, third derivatives along the
  offsets) raise CupydcnValueError;
* cupydcn.jax: ``check_grads(order=2, modes=["rev"])`` eagerly and under ``jax.jit``, the
  Hessian by ``jax.jacrev(jax.jacrev(...))`` (symmetric, and its products equal to
  torch's double backward), and ``jax.hessian`` (forward over reverse) refused by JAX's
  custom_vjp.
"""

from __future__ import annotations

import numpy as np
import pytest

import cupydcn
from cupydcn.core.errors import CupydcnValueError
from cupydcn.deform_conv.second_order import TERM_NAMES, offset_second_order


def _out(size, k, s, p, d):
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


CONFIGS = {
    # DCNv2 with bias, 2 groups, 2 offset groups, geometric options differing in H and W
    "dcnv2": dict(
        n=1,
        c=4,
        h=4,
        w=4,
        c_out=4,
        k=(2, 3),
        groups=2,
        offset_groups=2,
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        mask=True,
        bias=True,
    ),
    # DCNv1 without bias, two images
    "dcnv1": dict(
        n=2,
        c=2,
        h=4,
        w=4,
        c_out=2,
        k=(3, 2),
        groups=1,
        offset_groups=1,
        stride=(1, 2),
        padding=(1, 0),
        dilation=(1, 1),
        mask=False,
        bias=False,
    ),
}


def problem(name: str, seed: int = 0) -> dict:
    """NumPy float64 arguments. Offsets are an integer plus a fraction in [0.2, 0.8]
    (either sign): no sample point is near an integer, where bilinear sampling has kinks,
    so central differences are exact to rounding there."""
    cfg = CONFIGS[name]
    r = np.random.default_rng(seed)
    kh, kw = cfg["k"]
    oh = _out(cfg["h"], kh, cfg["stride"][0], cfg["padding"][0], cfg["dilation"][0])
    ow = _out(cfg["w"], kw, cfg["stride"][1], cfg["padding"][1], cfg["dilation"][1])
    taps = cfg["offset_groups"] * kh * kw
    shape = (cfg["n"], 2 * taps, oh, ow)
    offset = r.integers(-2, 2, shape) + np.where(r.random(shape) < 0.5, -1, 1) * r.uniform(
        0.2, 0.8, shape
    )
    return dict(
        input=r.standard_normal((cfg["n"], cfg["c"], cfg["h"], cfg["w"])),
        offset=offset,
        weight=r.standard_normal((cfg["c_out"], cfg["c"] // cfg["groups"], kh, kw)),
        bias=r.standard_normal(cfg["c_out"]) if cfg["bias"] else None,
        mask=r.uniform(0.2, 1.0, (cfg["n"], taps, oh, ow)) if cfg["mask"] else None,
    )


def options(name: str) -> dict:
    return {k: CONFIGS[name][k] for k in ("stride", "padding", "dilation")}


# ---------------------------------------------------------------------------- NumPy terms
@pytest.mark.parametrize("name", list(CONFIGS))
def test_offset_second_order_matches_finite_differences(name):
    """d<grad_offset, v>/d(each argument) against central differences of cupydcn's
    backward along random directions."""
    args, opts = problem(name), options(name)
    r = np.random.default_rng(1)
    out_shape = cupydcn.deform_conv2d(
        args["input"], args["offset"], args["weight"], mask=args["mask"], **opts
    ).shape
    arrays = {
        "grad_output": r.standard_normal(out_shape),
        "input": args["input"],
        "offset": args["offset"],
        "weight": args["weight"],
        "mask": args["mask"],
    }
    tangent = r.standard_normal(args["offset"].shape)

    def inner(values):
        grads = cupydcn.deform_conv2d_backward(
            values["grad_output"],
            values["input"],
            values["offset"],
            values["weight"],
            values["mask"],
            wrt=["offset"],
            **opts,
        )
        return float(np.sum(grads.grad_offset * tangent))

    terms = offset_second_order(*arrays.values(), tangent, **opts)
    eps = 1e-6
    for term in TERM_NAMES:
        if arrays[term] is None:
            assert term not in terms
            continue
        assert terms[term].shape == arrays[term].shape
        direction = r.standard_normal(arrays[term].shape)
        plus = inner({**arrays, term: arrays[term] + eps * direction})
        minus = inner({**arrays, term: arrays[term] - eps * direction})
        numeric = (plus - minus) / (2 * eps)
        assert float(np.sum(terms[term] * direction)) == pytest.approx(
            numeric, rel=1e-6, abs=1e-7
        ), term


def test_offset_second_order_refuses_what_it_lacks():
    args, opts = problem("dcnv1"), options("dcnv1")
    grad = np.ones(
        cupydcn.deform_conv2d(args["input"], args["offset"], args["weight"], **opts).shape
    )
    call = (grad, args["input"], args["offset"], args["weight"], None, args["offset"])
    with pytest.raises(CupydcnValueError, match="padding_mode='zeros' only"):
        offset_second_order(*call, **opts, padding_mode="border")
    with pytest.raises(CupydcnValueError, match="offset_tangent has shape"):
        offset_second_order(*call[:-1], args["offset"][:, :2], **opts)


# ---------------------------------------------------------------------------- torch
torch_cases = pytest.mark.parametrize("name", list(CONFIGS))


def _torch_args(name, requires_grad=("input", "offset", "weight", "bias", "mask")):
    torch = pytest.importorskip("torch")
    args = problem(name)
    tensors = {
        k: None if v is None else torch.from_numpy(v).requires_grad_(k in requires_grad)
        for k, v in args.items()
    }
    return tensors


def _torch_fn(name, fixed, order):
    import cupydcn.torch as ct

    def fn(*values):
        args = {**fixed, **dict(zip(order, values))}
        return ct.deform_conv2d(
            args["input"],
            args["offset"],
            args["weight"],
            args["bias"],
            mask=args["mask"],
            **options(name),
        )

    return fn


@torch_cases
def test_torch_gradgradcheck(name):
    torch = pytest.importorskip("torch")
    tensors = _torch_args(name)
    order = [k for k, v in tensors.items() if v is not None]
    fn = _torch_fn(name, tensors, order)
    inputs = tuple(tensors[k] for k in order)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize(
    "wrt", [("input", "weight"), ("offset",), ("weight", "mask"), ("input", "offset", "mask")]
)
def test_torch_gradgradcheck_subsets(wrt):
    """Only some arguments require grad: the backward op computes (and the double
    backward differentiates) only those."""
    torch = pytest.importorskip("torch")
    tensors = _torch_args("dcnv2", requires_grad=wrt)
    fn = _torch_fn("dcnv2", tensors, wrt)
    assert torch.autograd.gradgradcheck(fn, tuple(tensors[k] for k in wrt), fast_mode=True)


def test_torch_gradient_penalty_step():
    """A gradient penalty on the input (WGAN-GP style) trains the layer's weight and
    offsets: its gradient equals central differences of the penalty."""
    torch = pytest.importorskip("torch")
    import cupydcn.torch as ct

    tensors = _torch_args("dcnv2", requires_grad=("input", "offset", "weight"))
    x, o, w, b, m = (tensors[k] for k in ("input", "offset", "weight", "bias", "mask"))

    def penalty(o, w):
        y = ct.deform_conv2d(x, o, w, b, mask=m, **options("dcnv2"))
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return g.square().sum()

    grad_o, grad_w = torch.autograd.grad(penalty(o, w), (o, w))
    eps = 1e-6
    with torch.enable_grad():
        for value, grad, other in ((o, grad_o, "o"), (w, grad_w, "w")):
            direction = torch.randn(
                value.shape, dtype=value.dtype, generator=torch.Generator().manual_seed(3)
            )

            def at(t, value=value, direction=direction, other=other):
                moved = (value + t * direction).detach().requires_grad_()
                return float((penalty(moved, w) if other == "o" else penalty(o, moved)).detach())

            numeric = (at(eps) - at(-eps)) / (2 * eps)
            assert float((grad * direction).sum()) == pytest.approx(numeric, rel=1e-6)


def test_torch_limits_are_errors():
    torch = pytest.importorskip("torch")
    import cupydcn.torch as ct

    tensors = _torch_args("dcnv1", requires_grad=("input", "offset", "weight"))
    x, o, w = tensors["input"], tensors["offset"], tensors["weight"]
    # padding_mode "border": the terms along the offsets are missing ...
    y = ct.deform_conv2d(x, o, w, padding_mode="border", **options("dcnv1"))
    (g_o,) = torch.autograd.grad(y.square().sum(), o, create_graph=True)
    with pytest.raises(CupydcnValueError, match="padding_mode='zeros' only"):
        torch.autograd.grad(g_o.square().sum(), o)
    # ... the others are there (only grad_input is used: no term along the offsets)
    y = ct.deform_conv2d(x, o, w, padding_mode="border", **options("dcnv1"))
    (g_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert torch.autograd.grad(g_x.square().sum(), w)[0].shape == w.shape
    # third derivatives through the terms along the offsets
    y = ct.deform_conv2d(x, o, w, **options("dcnv1"))
    (g_o,) = torch.autograd.grad(y.square().sum(), o, create_graph=True)
    (h_o,) = torch.autograd.grad(g_o.square().sum(), o, create_graph=True)
    with pytest.raises(CupydcnValueError, match="third derivatives"):
        torch.autograd.grad(h_o.sum(), o)


# ---------------------------------------------------------------------------- JAX
@pytest.fixture
def x64():
    jax = pytest.importorskip("jax")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", previous)


def _jax_fn(name):
    import cupydcn.jax as cj

    cfg = CONFIGS[name]

    def fn(*values):
        it = iter(values)
        x, o, w = next(it), next(it), next(it)
        b = next(it) if cfg["bias"] else None
        m = next(it) if cfg["mask"] else None
        return cj.deform_conv2d(x, o, w, b, mask=m, **options(name))

    return fn


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_jax_check_grads_order2(name, jit, x64):
    jax = x64
    from jax.test_util import check_grads

    args = tuple(a for a in problem(name).values() if a is not None)
    fn = _jax_fn(name)
    check_grads(jax.jit(fn) if jit else fn, args, order=2, modes=["rev"], eps=1e-5)


def test_jax_hessian_by_reverse_over_reverse(x64):
    """The Hessian of a scalar loss in the offsets by jax.jacrev(jax.jacrev(...)):
    symmetric, and its product with a vector equals torch's double backward."""
    jax = x64
    import jax.numpy as jnp

    torch = pytest.importorskip("torch")
    args = problem("dcnv1")
    args["offset"] = args["offset"][:1, :, :2, :2].copy()  # a small Hessian
    args["input"] = args["input"][:1]
    opts = {"stride": (1, 2), "padding": (1, 0), "dilation": (1, 1)}
    args["input"] = args["input"][:, :, :2, :]
    import cupydcn.jax as cj
    import cupydcn.torch as ct

    def loss(o):
        return jnp.sum(cj.deform_conv2d(args["input"], o, args["weight"], **opts) ** 2)

    hessian = np.asarray(jax.jacrev(jax.jacrev(loss))(args["offset"]))
    size = args["offset"].size
    flat = hessian.reshape(size, size)
    np.testing.assert_allclose(flat, flat.T, rtol=1e-12, atol=1e-12)

    v = np.random.default_rng(4).standard_normal(args["offset"].shape)
    o = torch.from_numpy(args["offset"]).requires_grad_()
    y = ct.deform_conv2d(
        torch.from_numpy(args["input"]), o, torch.from_numpy(args["weight"]), **opts
    )
    (g,) = torch.autograd.grad(y.square().sum(), o, create_graph=True)
    (hv,) = torch.autograd.grad(g, o, torch.from_numpy(v))
    np.testing.assert_allclose(
        (flat @ v.ravel()).reshape(v.shape), hv.numpy(), rtol=1e-10, atol=1e-10
    )

    with pytest.raises(TypeError, match="forward-mode"):
        jax.hessian(loss)(args["offset"])


def test_jax_padding_mode_limit(x64):
    jax = x64
    import cupydcn.jax as cj

    args = problem("dcnv1")
    opts = options("dcnv1")

    def grad_norm(o, wrt):
        def loss(x, o):
            return (
                cj.deform_conv2d(x, o, args["weight"], padding_mode="border", **opts) ** 2
            ).sum()

        return (jax.grad(loss, argnums=wrt)(args["input"], o) ** 2).sum()

    # grad wrt the input alone: no term along the offsets, differentiable in the offsets
    assert jax.grad(grad_norm)(args["offset"], 0).shape == args["offset"].shape
    with pytest.raises(Exception, match="padding_mode='zeros' only"):
        jax.grad(grad_norm)(args["offset"], 1)


# torch >= 2.14's opcheck reads .grad of non-leaf clones of requires_grad inputs, a warning
# torch itself silences through warnings.showwarning (which never runs when warnings are
# errors); see tests/test_torch_adapter.py's TORCH_OPCHECK_NON_LEAF_GRAD.
@pytest.mark.filterwarnings(
    r"ignore:The \.grad attribute of a Tensor that is not a leaf "
    r"Tensor is being accessed:UserWarning"
)
def test_torch_opcheck_backward_ops():
    """opcheck of the backward op with inputs that require grad (its autograd formula:
    the double backward) and of the second-order op (schema, fake, autograd
    registration)."""
    torch = pytest.importorskip("torch")
    import cupydcn.torch as ct

    t = _torch_args("dcnv2", requires_grad=())
    opts = options("dcnv2")
    option_args = [list(opts["stride"]), list(opts["padding"]), list(opts["dilation"]), "zeros"]
    out = ct.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **opts)
    gy = torch.randn_like(out)
    leaves = [
        a.clone().requires_grad_() for a in (gy, t["input"], t["offset"], t["weight"], t["mask"])
    ]
    torch.library.opcheck(
        torch.ops.cupydcn.deform_conv2d_backward.default,
        (*leaves, *option_args, [True, True, True, True, True]),
    )
    torch.library.opcheck(
        torch.ops.cupydcn.deform_conv2d_offset_second_order.default,
        (
            gy,
            t["input"],
            t["offset"],
            t["weight"],
            t["mask"],
            torch.randn_like(t["offset"]),
            *option_args,
            [True, True, True, True, True],
        ),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
