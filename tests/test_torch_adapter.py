"""cupydcn.torch on the CPU: the custom operators under autograd (gradcheck in float64 for
every op and every differentiable input), torch.library.opcheck, torch.compile (no graph
break; aot_eager for the bulk, one inductor run), autocast, the zero-copy path of the
results, and the layers (torchvision / mmcv parameter names, initialisation and
state_dicts)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import cupydcn  # noqa: E402
import cupydcn.torch as ct  # noqa: E402
from cupydcn.deform_conv import numpy_backend as _numpy_conv
from cupydcn.deform_conv.spec import ConvOptions
from cupydcn.psroi_pool import numpy_backend as _numpy_psroi_pool
from cupydcn.psroi_pool.spec import PSRoiPoolOptions
from cupydcn.roi_pool import numpy_backend as _numpy_roi_pool  # noqa: E402
from cupydcn.roi_pool.spec import RoiPoolOptions

F64 = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- problems
CONV_CONFIGS = {
    # DCNv2 with bias, two groups and two offset groups, "same" padding
    "dcnv2-groups": dict(
        n=2,
        c=4,
        h=4,
        w=5,
        c_out=2,
        k=(3, 3),
        groups=2,
        offset_groups=2,
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        mask=True,
        bias=True,
    ),
    # DCNv1 without bias, strided, dilated, non-square kernel
    "dcnv1-strided": dict(
        n=1,
        c=3,
        h=7,
        w=6,
        c_out=2,
        k=(2, 3),
        groups=1,
        offset_groups=1,
        stride=(2, 1),
        padding=(1, 2),
        dilation=(2, 1),
        mask=False,
        bias=False,
    ),
}


def _conv_out(size, k, s, p, d):
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


def conv_problem(cfg: dict, dtype=F64, seed: int = 0) -> dict:
    """Arguments of one deform_conv2d call. Offsets are an integer plus a fraction in
    [0.2, 0.8] (either sign), so no sample point is within 0.2 of an integer, where the
    bilinear weights have kinks: finite differences are exact there."""
    g = _generator(seed)
    kh, kw = cfg["k"]
    out_h = _conv_out(cfg["h"], kh, cfg["stride"][0], cfg["padding"][0], cfg["dilation"][0])
    out_w = _conv_out(cfg["w"], kw, cfg["stride"][1], cfg["padding"][1], cfg["dilation"][1])
    taps = cfg["offset_groups"] * kh * kw
    offset_shape = (cfg["n"], 2 * taps, out_h, out_w)
    whole = torch.randint(-2, 2, offset_shape, generator=g).to(F64)
    fraction = 0.2 + 0.6 * torch.rand(offset_shape, generator=g, dtype=F64)
    sign = torch.where(torch.rand(offset_shape, generator=g) < 0.5, -1.0, 1.0).to(F64)
    args = dict(
        input=torch.randn(cfg["n"], cfg["c"], cfg["h"], cfg["w"], generator=g, dtype=F64),
        offset=whole + sign * fraction,
        weight=torch.randn(cfg["c_out"], cfg["c"] // cfg["groups"], kh, kw, generator=g, dtype=F64),
        bias=torch.randn(cfg["c_out"], generator=g, dtype=F64) if cfg["bias"] else None,
        mask=(0.2 + 0.8 * torch.rand(cfg["n"], taps, out_h, out_w, generator=g, dtype=F64))
        if cfg["mask"]
        else None,
    )
    return {k: None if v is None else v.to(dtype) for k, v in args.items()}


def conv_options(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("stride", "padding", "dilation")}


# RoIs well inside a 9 x 10 map (at spatial_scale 0.5 on image coordinates): every
# sample stays inside it, so no sample is clamped and the counts are constant.
ROIS = [[0, 4.3, 3.1, 13.7, 12.9], [1, 2.6, 5.2, 9.1, 14.3], [0, 6.2, 2.4, 16.8, 8.9]]
ROI_OPTIONS = dict(output_size=(2, 3), spatial_scale=0.5, sampling_ratio=2, gamma=0.1)
PSROI_OPTIONS = dict(
    output_dim=4,
    group_size=2,
    pooled_size=2,
    part_size=2,
    sample_per_part=2,
    spatial_scale=0.5,
    trans_std=0.1,
)


def roi_problem(dtype=F64, seed: int = 0, offset=True, mask=True) -> dict:
    g = _generator(seed)
    k = len(ROIS)
    ph, pw = ROI_OPTIONS["output_size"]
    args = dict(
        input=torch.randn(2, 3, 9, 10, generator=g, dtype=F64),
        rois=torch.tensor(ROIS, dtype=F64),
        offset=0.3 * torch.randn(k, 2, ph, pw, generator=g, dtype=F64) if offset else None,
        mask=0.2 + 0.8 * torch.rand(k, 1, ph, pw, generator=g, dtype=F64) if mask else None,
    )
    return {k: None if v is None else v.to(dtype) for k, v in args.items()}


def psroi_problem(dtype=F64, seed: int = 0, offset=True) -> dict:
    g = _generator(seed)
    k, p = len(ROIS), PSROI_OPTIONS["part_size"]
    channels = PSROI_OPTIONS["output_dim"] * PSROI_OPTIONS["group_size"] ** 2
    args = dict(
        input=torch.randn(2, channels, 9, 10, generator=g, dtype=F64),
        rois=torch.tensor(ROIS, dtype=F64),
        # two classes: output channels 0-1 move with offset channels 0-1, 2-3 with 2-3
        offset=0.5 * torch.randn(k, 4, p, p, generator=g, dtype=F64) if offset else None,
    )
    return {k: None if v is None else v.to(dtype) for k, v in args.items()}


def _leaves(args: dict, names) -> dict:
    return {
        k: v.clone().requires_grad_(k in names) if v is not None else None for k, v in args.items()
    }


# ---------------------------------------------------------------------------- registration
def test_public_names():
    assert set(ct.__all__) == {
        "deform_conv2d",
        "deform_roi_pool",
        "deform_psroi_pool",
        "DeformConv2d",
        "DeformConv2dPack",
        "ModulatedDeformConv2dPack",
        "DeformRoIPool",
        "DeformRoIPoolPack",
        "ModulatedDeformRoIPoolPack",
        "DeformPSRoIPool",
        "multi_scale_deformable_attn",
        "dcnv3",
        "dcnv4",
        "MultiScaleDeformableAttention",
        "DCNv3",
        "DCNv4",
    }
    for name in ct.__all__:
        assert getattr(ct, name).__doc__


def test_import_cupydcn_does_not_import_torch():
    code = "import sys, cupydcn; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_schemas():
    ops = torch.ops.cupydcn
    schemas = {
        name: str(getattr(ops, name).default._schema)
        for name in (
            "deform_conv2d",
            "deform_conv2d_backward",
            "deform_roi_pool",
            "deform_roi_pool_backward",
            "deform_psroi_pool",
            "deform_psroi_pool_backward",
        )
    }
    assert "Tensor? bias, Tensor? mask" in schemas["deform_conv2d"]
    assert "Tensor? offset, Tensor? mask" in schemas["deform_roi_pool"]
    assert "Tensor? offset" in schemas["deform_psroi_pool"]
    assert schemas["deform_psroi_pool"].endswith("-> (Tensor, Tensor)")
    for name in (
        "deform_conv2d_backward",
        "deform_roi_pool_backward",
        "deform_psroi_pool_backward",
    ):
        assert "bool[] output_mask" in schemas[name] and schemas[name].endswith("-> Tensor[]")


OPTIONS_OF = {  # op: its options dataclass
    "deform_conv2d": ConvOptions,
    "deform_roi_pool": RoiPoolOptions,
    "deform_psroi_pool": PSRoiPoolOptions,
}


@pytest.mark.parametrize("name", list(OPTIONS_OF))
def test_op_schemas_and_signatures_follow_the_options(name):
    """One declaration per op: the custom ops' option arguments are the options
    dataclass's fields (tuning ones left out), in order, and every public function that
    takes an option has its declared default."""
    import dataclasses
    import inspect

    options = OPTIONS_OF[name]
    fields = dataclasses.fields(options)
    in_schema = [f.name for f in fields if not f.metadata.get("tuning")]
    for op_name in (name, f"{name}_backward"):
        arguments = getattr(torch.ops.cupydcn, op_name).default._schema.arguments
        names = [a.name for a in arguments if "Tensor" not in str(a.type)]
        assert names == in_schema + (["output_mask"] if op_name.endswith("_backward") else [])
    assert "workspace_bytes" not in str(torch.ops.cupydcn.deform_conv2d.default._schema)
    for function in (
        getattr(cupydcn, name),
        getattr(cupydcn, f"{name}_backward"),
        getattr(ct, name),
    ):
        parameters = inspect.signature(function).parameters
        for f in fields:
            if f.name in parameters:
                assert parameters[f.name].default == (
                    inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
                ), (function, f.name)
    functional = set(inspect.signature(getattr(cupydcn, name)).parameters)
    assert {f.name for f in fields} <= functional


# ---------------------------------------------------------------------------- gradcheck
def _conv_fn(cfg, names, args):
    def fn(*tensors):
        a = dict(args, **dict(zip(names, tensors)))
        return ct.deform_conv2d(
            a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **conv_options(cfg)
        )

    return fn


# gradcheck's fast mode compares a random projection of the whole Jacobian of every
# (output, input) pair, numerically against analytically, in a few evaluations; the full
# Jacobian is checked element by element on one problem small enough for it.
TINY_CONV = dict(
    n=1,
    c=2,
    h=3,
    w=3,
    c_out=2,
    k=(2, 2),
    groups=1,
    offset_groups=1,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    mask=True,
    bias=True,
)


def test_conv_gradcheck_full_jacobian():
    args = conv_problem(TINY_CONV)
    names = list(args)
    leaves = [args[k].clone().requires_grad_(True) for k in names]
    assert torch.autograd.gradcheck(_conv_fn(TINY_CONV, names, args), leaves)


@pytest.mark.parametrize("cfg_name", list(CONV_CONFIGS))
def test_conv_gradcheck(cfg_name):
    cfg = CONV_CONFIGS[cfg_name]
    args = conv_problem(cfg)
    names = [k for k, v in args.items() if v is not None]
    leaves = [args[k].clone().requires_grad_(True) for k in names]
    assert torch.autograd.gradcheck(_conv_fn(cfg, names, args), leaves, fast_mode=True)


@pytest.mark.parametrize("names", [("offset",), ("input", "mask"), ("weight", "bias")])
def test_conv_gradcheck_subsets(names):
    """Only some inputs require gradients: the backward asks for those alone."""
    cfg = CONV_CONFIGS["dcnv2-groups"]
    args = conv_problem(cfg, seed=1)
    leaves = [args[k].clone().requires_grad_(True) for k in names]
    assert torch.autograd.gradcheck(_conv_fn(cfg, names, args), leaves, fast_mode=True)


@pytest.mark.parametrize(
    "present",
    [("offset", "mask"), ("offset",), ("mask",), ()],
    ids=["offset-mask", "offset", "mask", "plain"],
)
def test_roi_pool_gradcheck(present):
    args = roi_problem(offset="offset" in present, mask="mask" in present)
    names = ["input", *present]

    def fn(*tensors):
        a = dict(args, **dict(zip(names, tensors)))
        return ct.deform_roi_pool(a["input"], a["rois"], a["offset"], a["mask"], **ROI_OPTIONS)

    leaves = [args[k].clone().requires_grad_(True) for k in names]
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("with_offset", [True, False], ids=["offset", "no-offset"])
def test_psroi_pool_gradcheck(with_offset):
    args = psroi_problem(offset=with_offset)
    names = ["input", "offset"] if with_offset else ["input"]

    def fn(*tensors):
        a = dict(args, **dict(zip(names, tensors)))
        output, count = ct.deform_psroi_pool(a["input"], a["rois"], a["offset"], **PSROI_OPTIONS)
        assert not count.requires_grad and count.dtype == torch.int32
        return output

    leaves = [args[k].clone().requires_grad_(True) for k in names]
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


def test_rois_get_no_gradient():
    args = roi_problem()
    rois = args["rois"].clone().requires_grad_(True)
    x = args["input"].clone().requires_grad_(True)
    out = ct.deform_roi_pool(x, rois, args["offset"], args["mask"], **ROI_OPTIONS)
    out.sum().backward()
    assert rois.grad is None and x.grad is not None


# ---------------------------------------------------------------------------- selective backward
@pytest.fixture
def requested(monkeypatch):
    """Records the ``wrt`` of every explicit backward call."""
    record = []
    for name in (
        "deform_conv2d_backward",
        "deform_roi_pool_backward",
        "deform_psroi_pool_backward",
    ):
        original = getattr(cupydcn, name)

        def spy(*args, _original=original, **kwargs):
            record.append(sorted(kwargs["wrt"]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cupydcn, name, spy)
    return record


@pytest.mark.parametrize(
    "names",
    [
        ("offset",),
        ("input", "mask"),
        ("weight", "bias"),
        ("input", "offset", "weight", "mask", "bias"),
    ],
)
def test_conv_backward_computes_only_what_autograd_needs(requested, names):
    cfg = CONV_CONFIGS["dcnv2-groups"]
    a = _leaves(conv_problem(cfg, dtype=torch.float32), names)
    out = ct.deform_conv2d(
        a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **conv_options(cfg)
    )
    out.sum().backward()
    assert requested == [sorted(names)]
    for k, v in a.items():
        assert (v.grad is not None) == (k in names), k


@pytest.mark.parametrize("names", [("offset",), ("input",), ("mask", "offset")])
def test_roi_pool_backward_computes_only_what_autograd_needs(requested, names):
    a = _leaves(roi_problem(dtype=torch.float32), names)
    out = ct.deform_roi_pool(a["input"], a["rois"], a["offset"], a["mask"], **ROI_OPTIONS)
    out.sum().backward()
    assert requested == [sorted(names)]


@pytest.mark.parametrize("names", [("offset",), ("input",), ("input", "offset")])
def test_psroi_pool_backward_computes_only_what_autograd_needs(requested, names):
    a = _leaves(psroi_problem(dtype=torch.float32), names)
    out, _ = ct.deform_psroi_pool(a["input"], a["rois"], a["offset"], **PSROI_OPTIONS)
    out.sum().backward()
    assert requested == [sorted(names)]


def test_no_graph_without_requires_grad(requested):
    cfg = CONV_CONFIGS["dcnv2-groups"]
    a = conv_problem(cfg, dtype=torch.float32)
    out = ct.deform_conv2d(
        a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **conv_options(cfg)
    )
    assert out.grad_fn is None and not out.requires_grad
    leaves = _leaves(a, ("weight",))
    with torch.no_grad():
        out = ct.deform_conv2d(
            leaves["input"],
            leaves["offset"],
            leaves["weight"],
            leaves["bias"],
            mask=leaves["mask"],
            **conv_options(cfg),
        )
    assert out.grad_fn is None and requested == []


# ---------------------------------------------------------------------------- same numbers
def test_conv_matches_functional_api_bitwise():
    cfg = CONV_CONFIGS["dcnv2-groups"]
    a = conv_problem(cfg, dtype=torch.float32)
    expected = cupydcn.deform_conv2d(
        a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **conv_options(cfg)
    )
    grad = torch.randn(expected.shape, generator=_generator(3))
    expected_grads = cupydcn.deform_conv2d_backward(
        grad, a["input"], a["offset"], a["weight"], a["mask"], **conv_options(cfg)
    )
    leaves = _leaves(a, ("input", "offset", "weight", "bias", "mask"))
    out = ct.deform_conv2d(
        leaves["input"],
        leaves["offset"],
        leaves["weight"],
        leaves["bias"],
        mask=leaves["mask"],
        **conv_options(cfg),
    )
    out.backward(grad)
    assert torch.equal(out.detach(), expected)
    for name in ("input", "offset", "weight", "mask", "bias"):
        assert torch.equal(leaves[name].grad, getattr(expected_grads, "grad_" + name)), name


def test_roi_pools_match_functional_api_bitwise():
    a = roi_problem(dtype=torch.float32)
    expected = cupydcn.deform_roi_pool(a["input"], a["rois"], a["offset"], a["mask"], **ROI_OPTIONS)
    assert torch.equal(
        ct.deform_roi_pool(a["input"], a["rois"], a["offset"], a["mask"], **ROI_OPTIONS), expected
    )
    p = psroi_problem(dtype=torch.float32)
    expected = cupydcn.deform_psroi_pool(p["input"], p["rois"], p["offset"], **PSROI_OPTIONS)
    got = ct.deform_psroi_pool(p["input"], p["rois"], p["offset"], **PSROI_OPTIONS)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ---------------------------------------------------------------------------- zero copy
@pytest.fixture
def written(monkeypatch):
    """The buffers the NumPy backends return (forward outputs and gradients), by address."""
    record = []

    def spy(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            results = result if isinstance(result, tuple) else (result,)
            record.extend(r.ctypes.data for r in results if r is not None)
            return result

        monkeypatch.setattr(module, name, wrapper)

    for module, prefix in (
        (_numpy_conv, "conv"),
        (_numpy_roi_pool, "roi_pool"),
        (_numpy_psroi_pool, "psroi_pool"),
    ):
        spy(module, prefix + "_forward")
        spy(module, prefix + "_backward")
    return record


def test_results_are_the_buffers_the_backend_wrote(written):
    """Forward outputs, autograd gradients (torch.autograd.grad) and accumulated .grad are
    the arrays the NumPy backend returned: no copy on the way back to PyTorch."""
    cfg = CONV_CONFIGS["dcnv2-groups"]
    a = _leaves(
        conv_problem(cfg, dtype=torch.float32), ("input", "offset", "weight", "mask", "bias")
    )
    out = ct.deform_conv2d(
        a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **conv_options(cfg)
    )
    assert out.data_ptr() in written
    names = ("input", "offset", "weight", "mask", "bias")
    grads = torch.autograd.grad(out, [a[k] for k in names], torch.ones_like(out))
    for name, grad in zip(names, grads):
        assert grad.data_ptr() in written, name
    written.clear()
    ct.deform_conv2d(
        a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **conv_options(cfg)
    ).backward(torch.ones_like(out))
    for name in names:
        assert a[name].grad.data_ptr() in written, name

    r = _leaves(roi_problem(dtype=torch.float32), ("input", "offset", "mask"))
    out = ct.deform_roi_pool(r["input"], r["rois"], r["offset"], r["mask"], **ROI_OPTIONS)
    grads = torch.autograd.grad(out, [r["input"], r["offset"], r["mask"]], torch.ones_like(out))
    assert all(t.data_ptr() in written for t in (out, *grads))

    p = _leaves(psroi_problem(dtype=torch.float32), ("input", "offset"))
    out, count = ct.deform_psroi_pool(p["input"], p["rois"], p["offset"], **PSROI_OPTIONS)
    grads = torch.autograd.grad(out, [p["input"], p["offset"]], torch.ones_like(out))
    assert all(t.data_ptr() in written for t in (out, count, *grads))


# ---------------------------------------------------------------------------- errors
def test_errors_pass_through_the_operator():
    cfg = CONV_CONFIGS["dcnv2-groups"]
    a = conv_problem(cfg, dtype=torch.float32)
    with pytest.raises(cupydcn.CupydcnValueError, match="offset has shape"):
        ct.deform_conv2d(
            a["input"],
            a["offset"][:, :, :-1],
            a["weight"],
            a["bias"],
            mask=a["mask"],
            **conv_options(cfg),
        )
    with pytest.raises(cupydcn.CupydcnValueError, match="stride must be >= 1"):
        ct.deform_conv2d(a["input"], a["offset"], a["weight"], stride=0)
    with pytest.raises(cupydcn.CupydcnTypeError, match="padding must be an int or a pair"):
        ct.deform_conv2d(a["input"], a["offset"], a["weight"], padding=(1, 1, 1))
    with pytest.raises(cupydcn.CupydcnTypeError, match="dtype"):
        ct.deform_conv2d(a["input"], a["offset"].double(), a["weight"], padding=1)
    r = roi_problem(dtype=torch.float32)
    with pytest.raises(cupydcn.CupydcnValueError, match="output_size"):
        ct.deform_roi_pool(r["input"], r["rois"], output_size=0)
    with pytest.raises(cupydcn.CupydcnValueError, match="rois"):
        ct.deform_roi_pool(r["input"], r["rois"][:, :4], output_size=2)
    p = psroi_problem(dtype=torch.float32)
    with pytest.raises(cupydcn.CupydcnValueError, match="group_size"):
        ct.deform_psroi_pool(p["input"], p["rois"], output_dim=4, group_size=0, pooled_size=2)
    with pytest.raises(cupydcn.CupydcnValueError, match="spatial_scale must be > 0"):
        ct.deform_psroi_pool(
            p["input"], p["rois"], output_dim=4, group_size=2, pooled_size=2, spatial_scale=0.0
        )
    with pytest.raises(cupydcn.CupydcnTypeError, match="sampling_ratio must be an int"):
        ct.deform_roi_pool(r["input"], r["rois"], output_size=2, sampling_ratio=1.5)


# ---------------------------------------------------------------------------- first contact
def _functional_calls():
    """(name, call(arrays)) of every functional op, with arrays of test problems."""
    cfg = CONV_CONFIGS["dcnv2-groups"]
    conv = conv_problem(cfg, dtype=torch.float32)
    roi = roi_problem(dtype=torch.float32)
    ps = psroi_problem(dtype=torch.float32)
    return {
        "deform_conv2d": (
            conv,
            lambda a: cupydcn.deform_conv2d(
                a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **conv_options(cfg)
            ),
        ),
        "deform_conv2d_backward": (
            conv,
            lambda a: cupydcn.deform_conv2d_backward(
                torch.ones(2, 2, 4, 5),
                a["input"],
                a["offset"],
                a["weight"],
                a["mask"],
                **conv_options(cfg),
            ),
        ),
        "deform_roi_pool": (
            roi,
            lambda a: cupydcn.deform_roi_pool(
                a["input"], a["rois"], a["offset"], a["mask"], **ROI_OPTIONS
            ),
        ),
        "deform_psroi_pool": (
            ps,
            lambda a: cupydcn.deform_psroi_pool(
                a["input"], a["rois"], a["offset"], **PSROI_OPTIONS
            ),
        ),
        "offset_l2_penalty": (conv, lambda a: cupydcn.offset_l2_penalty(a["offset"])),
    }


@pytest.mark.parametrize("name", list(_functional_calls()))
def test_functional_api_refuses_tensors_that_require_grad(name):
    arrays, call = _functional_calls()[name]
    arrays = dict(arrays, offset=arrays["offset"].clone().requires_grad_(True))
    forward = name.removesuffix("_backward")
    alternative = (
        f"use cupydcn.torch.{forward}" if hasattr(ct, forward) else "call it under torch.no_grad"
    )
    with pytest.raises(
        cupydcn.CupydcnTypeError,
        match=rf"offset requires grad, .*not differentiable.*{alternative}",
    ):
        call(arrays)
    with torch.no_grad():  # no graph is being built: fine
        call(arrays)
    call(dict(arrays, offset=arrays["offset"].detach()))


def test_torch_functions_refuse_other_arrays_briefly():
    np = pytest.importorskip("numpy")
    cfg = CONV_CONFIGS["dcnv2-groups"]
    a = conv_problem(cfg, dtype=torch.float32)
    big = np.zeros((2, 4, 40, 50), dtype=np.float32)
    with pytest.raises(cupydcn.CupydcnTypeError) as info:
        ct.deform_conv2d(big, a["offset"], a["weight"])
    message = str(info.value)
    assert (
        message.startswith(
            "cupydcn.torch.deform_conv2d: input must be a torch.Tensor; got numpy.ndarray"
        )
        and len(message) < 200
    ), message
    with pytest.raises(cupydcn.CupydcnTypeError, match="mask must be a torch.Tensor"):
        ct.deform_conv2d(a["input"], a["offset"], a["weight"], mask=a["mask"].numpy())
    with pytest.raises(cupydcn.CupydcnTypeError, match="weight must be a torch.Tensor; got None"):
        ct.deform_conv2d(a["input"], a["offset"], None)
    r = roi_problem(dtype=torch.float32)
    with pytest.raises(cupydcn.CupydcnTypeError, match="rois must be a torch.Tensor"):
        ct.deform_roi_pool(r["input"], r["rois"].numpy(), output_size=2)
    p = psroi_problem(dtype=torch.float32)
    with pytest.raises(cupydcn.CupydcnTypeError, match="offset must be a torch.Tensor"):
        ct.deform_psroi_pool(p["input"], p["rois"], p["offset"].numpy(), **PSROI_OPTIONS)


BAD_LAYERS = [
    # (layer, args, kwargs, error, message)
    ("DeformConv2d", (4, 4, 0), {}, "Value", "kernel_size must be >= 1"),
    ("DeformConv2d", (4, 4, 3), dict(padding=-1), "Value", "padding must be >= 0"),
    ("DeformConv2d", (4, 4, 3), dict(stride=0), "Value", "stride must be >= 1"),
    ("DeformConv2d", (4, 4, 3), dict(dilation=(1, 2, 3)), "Type", "dilation must be an int"),
    (
        "DeformConv2d",
        (3, 4, 3),
        dict(groups=2),
        "Value",
        r"in_channels \(3\) must be divisible by groups \(2\)",
    ),
    (
        "DeformConv2d",
        (4, 3, 3),
        dict(groups=2),
        "Value",
        r"out_channels \(3\) must be divisible by groups",
    ),
    ("DeformConv2d", (4, 4, 3), dict(groups=0), "Value", "groups must be >= 1"),
    ("DeformConv2d", (0, 4, 3), {}, "Value", "in_channels must be >= 1"),
    ("DeformConv2d", (4, 4.0, 3), {}, "Type", "out_channels must be an int"),
    ("DeformConv2d", (4, 4, 3), dict(padding_mode="circular"), "Value", "padding_mode"),
    (
        "DeformConv2dPack",
        (4, 4, 3),
        dict(deform_groups=3),
        "Value",
        r"in_channels \(4\) must be divisible by deform_groups \(3\)",
    ),
    (
        "ModulatedDeformConv2dPack",
        (4, 4, 3),
        dict(padding=(1, -1)),
        "Value",
        "padding must be >= 0",
    ),
    (
        "ModulatedDeformConv2dPack",
        (4, 4, 3),
        dict(deform_groups=0),
        "Value",
        "deform_groups must be >= 1",
    ),
    ("DeformRoIPool", (0,), {}, "Value", "output_size must be >= 1"),
    ("DeformRoIPool", (2,), dict(sampling_ratio=-1), "Value", "sampling_ratio must be >= 0"),
    ("DeformRoIPool", (2,), dict(sampling_ratio=1.5), "Type", "sampling_ratio must be an int"),
    (
        "DeformRoIPool",
        (2,),
        dict(spatial_scale=float("inf")),
        "Value",
        "spatial_scale must be finite",
    ),
    ("DeformRoIPoolPack", (2, 0), {}, "Value", "output_channels must be >= 1"),
    (
        "ModulatedDeformRoIPoolPack",
        (2, 4),
        dict(deform_fc_channels=0),
        "Value",
        "deform_fc_channels must be >= 1",
    ),
    ("DeformPSRoIPool", (4, 0, 2), {}, "Value", "group_size must be >= 1"),
    ("DeformPSRoIPool", (4, 2, 2), dict(spatial_scale=0.0), "Value", "spatial_scale must be > 0"),
    ("DeformPSRoIPool", (4, 2, 2), dict(part_size=2.5), "Type", "part_size must be an int"),
]


@pytest.mark.parametrize(
    "layer, args, kwargs, error, message",
    BAD_LAYERS,
    ids=[f"{b[0]}-{b[4][:24]}" for b in BAD_LAYERS],
)
def test_layer_constructors_check_their_arguments(layer, args, kwargs, error, message):
    with pytest.raises(getattr(cupydcn, f"Cupydcn{error}Error"), match=f"{layer}: {message}"):
        getattr(ct, layer)(*args, **kwargs)


def _boxes_per_image(rois: torch.Tensor, batch: int) -> list:
    return [rois[rois[:, 0] == i, 1:] for i in range(batch)]


def test_roi_pools_take_torchvisions_list_of_boxes():
    r = roi_problem(dtype=torch.float32)
    order = torch.argsort(r["rois"][:, 0], stable=True)  # the list form is image-major
    rois = r["rois"][order]
    offset, mask = r["offset"][order], r["mask"][order]
    boxes = _boxes_per_image(rois, 2)
    x = r["input"].clone().requires_grad_(True)
    expected = ct.deform_roi_pool(x, rois, offset, mask, **ROI_OPTIONS)
    for form in (boxes, tuple(boxes)):
        got = ct.deform_roi_pool(x, form, offset, mask, **ROI_OPTIONS)
        assert torch.equal(got, expected)
    (grad,) = torch.autograd.grad(ct.deform_roi_pool(x, boxes, **ROI_OPTIONS).sum(), x)
    (expected_grad,) = torch.autograd.grad(ct.deform_roi_pool(x, rois, **ROI_OPTIONS).sum(), x)
    assert torch.equal(grad, expected_grad)

    opts = {k: ROI_OPTIONS[k] for k in ("spatial_scale", "sampling_ratio", "gamma")}
    for layer in (
        ct.DeformRoIPool(ROI_OPTIONS["output_size"], **opts),
        ct.DeformRoIPoolPack(ROI_OPTIONS["output_size"], 3, 8, **opts),
        ct.ModulatedDeformRoIPoolPack(ROI_OPTIONS["output_size"], 3, 8, **opts),
    ):
        assert torch.equal(layer(r["input"], boxes), layer(r["input"], rois)), layer

    p = psroi_problem(dtype=torch.float32)
    ps_rois = p["rois"][order]
    ps_boxes = _boxes_per_image(ps_rois, 2)
    out, count = ct.deform_psroi_pool(p["input"], ps_boxes, p["offset"][order], **PSROI_OPTIONS)
    expected_out, expected_count = ct.deform_psroi_pool(
        p["input"], ps_rois, p["offset"][order], **PSROI_OPTIONS
    )
    assert torch.equal(out, expected_out) and torch.equal(count, expected_count)
    layer = ct.DeformPSRoIPool(**PSROI_OPTIONS)
    assert torch.equal(layer(p["input"], ps_boxes), layer(p["input"], ps_rois))

    with pytest.raises(cupydcn.CupydcnValueError, match=r"rois\[1\] has shape \(1, 5\)"):
        ct.deform_roi_pool(r["input"], [boxes[0], rois[:1]], **ROI_OPTIONS)
    with pytest.raises(cupydcn.CupydcnValueError, match="rois is an empty list"):
        ct.deform_roi_pool(r["input"], [], **ROI_OPTIONS)
    with pytest.raises(cupydcn.CupydcnTypeError, match=r"rois\[0\] must be a torch.Tensor"):
        ct.deform_roi_pool(r["input"], [boxes[0].numpy()], **ROI_OPTIONS)
    with pytest.raises(cupydcn.CupydcnTypeError, match=r"rois\[1\] is a torch.float64"):
        ct.deform_roi_pool(r["input"], [boxes[0], boxes[1].double()], **ROI_OPTIONS)


# ---------------------------------------------------------------------------- opcheck
# Not ours: torch >= 2.14's opcheck (optests/aot_autograd.py, _clone_input_for_aot_autograd)
# clones every input before handing it to AOTAutograd (torch 2.13 cloned inside the
# traced function), so a requires_grad input arrives as a non-leaf clone; fakeifying it
# (meta_utils.safe_grad) reads its .grad, and torch silences that warning by hooking
# warnings.showwarning, which never runs when warnings are errors. opcheck of
# torch.ops.aten.sin.default on a requires_grad tensor fails the same way.
TORCH_OPCHECK_NON_LEAF_GRAD = pytest.mark.filterwarnings(
    r"ignore:The \.grad attribute of a Tensor that is not a leaf Tensor is being "
    r"accessed:UserWarning"
)


def _conv_op_args(cfg, a):
    return (
        a["input"],
        a["offset"],
        a["weight"],
        a["bias"],
        a["mask"],
        list(cfg["stride"]),
        list(cfg["padding"]),
        list(cfg["dilation"]),
        "zeros",
    )


@TORCH_OPCHECK_NON_LEAF_GRAD
@pytest.mark.parametrize("cfg_name", ["dcnv2-groups"])
def test_opcheck_deform_conv2d(cfg_name):
    cfg = CONV_CONFIGS[cfg_name]
    a = _leaves(
        conv_problem(cfg, dtype=torch.float32), ("input", "offset", "weight", "bias", "mask")
    )
    torch.library.opcheck(torch.ops.cupydcn.deform_conv2d.default, _conv_op_args(cfg, a))
    out = ct.deform_conv2d(
        a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **conv_options(cfg)
    ).detach()
    output_mask = [True, False, True, cfg["mask"], cfg["bias"]]
    plain = {k: None if v is None else v.detach() for k, v in a.items()}
    args = (
        torch.randn_like(out),
        *_conv_op_args(cfg, plain)[:3],
        plain["mask"],
        *_conv_op_args(cfg, plain)[5:],
        output_mask,
    )
    torch.library.opcheck(torch.ops.cupydcn.deform_conv2d_backward.default, args)


@TORCH_OPCHECK_NON_LEAF_GRAD
def test_opcheck_roi_pools():
    opts = ROI_OPTIONS
    for offset, mask in ((True, True), (False, False)):
        names = ["input"] + ["offset"] * offset + ["mask"] * mask
        a = _leaves(roi_problem(dtype=torch.float32, offset=offset, mask=mask), names)
        torch.library.opcheck(
            torch.ops.cupydcn.deform_roi_pool.default,
            (
                a["input"],
                a["rois"],
                a["offset"],
                a["mask"],
                list(opts["output_size"]),
                opts["spatial_scale"],
                opts["sampling_ratio"],
                opts["gamma"],
            ),
        )
    b = roi_problem(dtype=torch.float32)
    grad = torch.randn(len(ROIS), 3, *opts["output_size"], generator=_generator(5))
    torch.library.opcheck(
        torch.ops.cupydcn.deform_roi_pool_backward.default,
        (
            grad,
            b["input"],
            b["rois"],
            b["offset"],
            b["mask"],
            list(opts["output_size"]),
            opts["spatial_scale"],
            opts["sampling_ratio"],
            opts["gamma"],
            [False, True, True],
        ),
    )

    o = PSROI_OPTIONS
    sizes = [
        o[k] for k in ("output_dim", "group_size", "pooled_size", "part_size", "sample_per_part")
    ]
    p = _leaves(psroi_problem(dtype=torch.float32), ("input", "offset"))
    torch.library.opcheck(
        torch.ops.cupydcn.deform_psroi_pool.default,
        (p["input"], p["rois"], p["offset"], *sizes, o["spatial_scale"], o["trans_std"]),
    )
    q = psroi_problem(dtype=torch.float32)
    grad = torch.randn(
        len(ROIS), o["output_dim"], o["pooled_size"], o["pooled_size"], generator=_generator(6)
    )
    torch.library.opcheck(
        torch.ops.cupydcn.deform_psroi_pool_backward.default,
        (
            grad,
            q["input"],
            q["rois"],
            q["offset"],
            *sizes,
            o["spatial_scale"],
            o["trans_std"],
            [True, True],
        ),
    )


# ---------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_runs_in_the_autocast_dtype(dtype):
    pytest.importorskip("ml_dtypes")  # bfloat16 arrays on the NumPy backend
    cfg = CONV_CONFIGS["dcnv2-groups"]
    a64 = conv_problem(cfg)
    expected = cupydcn.deform_conv2d(
        a64["input"],
        a64["offset"],
        a64["weight"],
        a64["bias"],
        mask=a64["mask"],
        **conv_options(cfg),
    )
    a = _leaves(conv_problem(cfg, dtype=torch.float32), ("weight", "bias", "offset"))
    with torch.autocast("cpu", dtype=dtype):
        out = ct.deform_conv2d(
            a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **conv_options(cfg)
        )
    assert out.dtype == dtype  # not upcast to float32
    tolerance = 2e-2 if dtype == torch.bfloat16 else 3e-3
    scale = expected.abs().max()
    assert (out.double() - expected).abs().max() <= tolerance * scale
    out.float().sum().backward()
    for name in ("weight", "bias", "offset"):  # gradients arrive in the leaves' dtype
        assert a[name].grad.dtype == torch.float32 and a[name].grad.abs().sum() > 0

    r = roi_problem(dtype=torch.float32)
    rois = r["rois"]  # float64 RoIs: coordinates keep their precision under autocast
    with torch.autocast("cpu", dtype=dtype):
        pooled = ct.deform_roi_pool(r["input"], rois, r["offset"], r["mask"], **ROI_OPTIONS)
        ps, count = ct.deform_psroi_pool(
            psroi_problem(dtype=torch.float32)["input"], rois, **PSROI_OPTIONS
        )
    assert pooled.dtype == dtype and ps.dtype == dtype and count.dtype == torch.int32


def test_autocast_leaves_float64_alone():
    cfg = CONV_CONFIGS["dcnv1-strided"]
    a = conv_problem(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ct.deform_conv2d(a["input"], a["offset"], a["weight"], **conv_options(cfg))
    assert out.dtype == F64


def test_bfloat16_tensors():
    pytest.importorskip("ml_dtypes")
    cfg = CONV_CONFIGS["dcnv2-groups"]
    a = _leaves(conv_problem(cfg, dtype=torch.bfloat16), ("input", "offset", "weight"))
    out = ct.deform_conv2d(
        a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **conv_options(cfg)
    )
    assert out.dtype == torch.bfloat16
    out.sum().backward()
    assert a["offset"].grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- layers
def _torchvision_parameters(seed, in_channels, out_channels, kernel_size, groups):
    """The parameters torchvision.ops.DeformConv2d(...).reset_parameters() draws after
    torch.manual_seed(seed): kaiming_uniform_(a=sqrt(5)), then a uniform bias."""
    torch.manual_seed(seed)
    weight = torch.empty(out_channels, in_channels // groups, *kernel_size)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1 / math.sqrt(weight[0].numel())
    bias = torch.empty(out_channels).uniform_(-bound, bound)
    return {"weight": weight, "bias": bias}


def test_deform_conv2d_layer_is_torchvisions():
    state = _torchvision_parameters(11, 4, 6, (3, 2), groups=2)
    torch.manual_seed(11)
    layer = ct.DeformConv2d(4, 6, (3, 2), stride=2, padding=1, dilation=(1, 2), groups=2)
    assert list(layer.state_dict()) == ["weight", "bias"]
    for name, value in state.items():  # same initialisation, draw for draw
        assert torch.equal(layer.state_dict()[name], value), name
    assert ct.DeformConv2d(4, 6, 3, bias=False).bias is None
    assert "groups=2" in repr(layer)


def test_layers_pass_the_padding_mode_on():
    from cupydcn import PADDING_MODES

    g = _generator(12)
    x = torch.randn(1, 2, 5, 4, generator=g)
    offset = 3 * torch.randn(1, 18, 5, 4, generator=g)
    for mode in PADDING_MODES:
        layer = ct.DeformConv2d(2, 3, 3, padding=1, padding_mode=mode)
        expected = cupydcn.deform_conv2d(
            x, offset, layer.weight.detach(), layer.bias.detach(), padding=1, padding_mode=mode
        )
        assert torch.equal(layer(x, offset).detach(), expected), mode
        pack = ct.ModulatedDeformConv2dPack(2, 3, 3, padding=1, padding_mode=mode)
        assert pack.padding_mode == mode
    with pytest.raises(cupydcn.CupydcnValueError, match="padding_mode"):
        ct.DeformConv2d(2, 3, 3, padding_mode="no-such-mode")(x, offset[:, :, :3, :2])


def test_torchvision_state_dict_loads_and_gives_identical_outputs():
    # The state_dict a torchvision DeformConv2d(4, 6, 3, padding=1, groups=2) has.
    state = _torchvision_parameters(5, 4, 6, (3, 3), groups=2)
    layer = ct.DeformConv2d(4, 6, 3, padding=1, groups=2)
    layer.load_state_dict(state)  # strict: same keys, same shapes
    g = _generator(8)
    x = torch.randn(2, 4, 7, 5, generator=g)
    offset = torch.randn(2, 2 * 2 * 9, 7, 5, generator=g)
    mask = torch.rand(2, 2 * 9, 7, 5, generator=g)
    for m in (None, mask):
        expected = cupydcn.deform_conv2d(
            x, offset, state["weight"], state["bias"], padding=1, mask=m
        )
        assert torch.equal(layer(x, offset, m), expected)


def test_matches_real_torchvision():
    torchvision_ops = pytest.importorskip("torchvision.ops")
    torch.manual_seed(3)
    theirs = torchvision_ops.DeformConv2d(4, 6, 3, stride=1, padding=1, groups=2).double()
    ours = ct.DeformConv2d(4, 6, 3, stride=1, padding=1, groups=2).double()
    ours.load_state_dict(theirs.state_dict())
    g = _generator(9)
    x = torch.randn(2, 4, 7, 5, generator=g, dtype=F64)
    offset = torch.randn(2, 36, 7, 5, generator=g, dtype=F64)
    mask = torch.rand(2, 18, 7, 5, generator=g, dtype=F64)
    torch.testing.assert_close(ours(x, offset, mask), theirs(x, offset, mask))
    torch.manual_seed(3)
    fresh = ct.DeformConv2d(4, 6, 3, stride=1, padding=1, groups=2).double()
    for name, value in theirs.state_dict().items():  # same initialisation
        assert torch.equal(fresh.state_dict()[name], value), name


def test_deform_conv2d_pack_starts_as_a_plain_convolution():
    torch.manual_seed(0)
    layer = ct.DeformConv2dPack(4, 6, 3, stride=2, padding=1, groups=2, deform_groups=2)
    assert set(layer.state_dict()) == {"weight", "conv_offset.weight", "conv_offset.bias"}
    assert layer.conv_offset.out_channels == 2 * 2 * 9
    assert not layer.conv_offset.weight.any() and not layer.conv_offset.bias.any()
    # mmcv's initialisation of the weight: kaiming_uniform_(nonlinearity="relu")
    torch.manual_seed(0)
    weight = nn.init.kaiming_uniform_(torch.empty(6, 2, 3, 3), nonlinearity="relu")
    assert torch.equal(layer.weight.detach(), weight)
    x = torch.randn(2, 4, 9, 8, generator=_generator(1))
    torch.testing.assert_close(layer(x), nn.functional.conv2d(x, layer.weight, None, 2, 1, 1, 2))
    layer(x).square().sum().backward()
    assert layer.conv_offset.weight.grad.abs().sum() > 0  # the offsets learn
    assert ct.DeformConv2dPack(4, 6, 3, bias=True).bias is not None


def test_modulated_deform_conv2d_pack_starts_as_half_a_convolution():
    torch.manual_seed(0)
    layer = ct.ModulatedDeformConv2dPack(4, 6, 3, padding=1, deform_groups=2)
    assert set(layer.state_dict()) == {"weight", "bias", "conv_offset.weight", "conv_offset.bias"}
    assert layer.conv_offset.out_channels == 3 * 2 * 9
    stdv = 1 / math.sqrt(4 * 9)  # mmcv: uniform in +-1/sqrt(in_channels * kh * kw)
    assert layer.weight.abs().max() <= stdv and not layer.bias.any()
    with torch.no_grad():
        layer.bias.uniform_(-1, 1)
    x = torch.randn(2, 4, 6, 7, generator=_generator(2))
    expected = 0.5 * nn.functional.conv2d(x, layer.weight, None, 1, 1) + layer.bias[:, None, None]
    torch.testing.assert_close(layer(x), expected)  # zero offsets, mask sigmoid(0) = 0.5
    layer(x).square().sum().backward()
    grad = layer.conv_offset.weight.grad.view(3, 2 * 9, -1)
    assert grad[:2].abs().sum() > 0 and grad[2].abs().sum() > 0  # offsets and mask learn


def test_deform_roi_pool_layers():
    torch.manual_seed(0)
    a = roi_problem(dtype=torch.float32)
    opts = dict(spatial_scale=0.5, sampling_ratio=2, gamma=0.1)
    plain = ct.deform_roi_pool(a["input"], a["rois"], output_size=(2, 3), **opts)
    pool = ct.DeformRoIPool((2, 3), **opts)
    assert torch.equal(
        pool(a["input"], a["rois"], a["offset"], a["mask"]),
        ct.deform_roi_pool(
            a["input"], a["rois"], a["offset"], a["mask"], output_size=(2, 3), **opts
        ),
    )

    pack = ct.DeformRoIPoolPack((2, 3), 3, deform_fc_channels=16, **opts)
    assert list(pack.state_dict()) == [
        f"offset_fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")
    ]  # mmcv's names
    x = a["input"].clone().requires_grad_(True)
    out = pack(x, a["rois"])
    torch.testing.assert_close(out, plain)  # the last FC layer starts at zero
    out.square().sum().backward()
    assert pack.offset_fc[4].weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0

    mpack = ct.ModulatedDeformRoIPoolPack((2, 3), 3, deform_fc_channels=16, **opts)
    assert set(mpack.state_dict()) == set(pack.state_dict()) | {
        f"mask_fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")
    }
    out = mpack(a["input"], a["rois"])
    torch.testing.assert_close(out, 0.5 * plain)  # sigmoid(0) = 0.5
    out.square().sum().backward()
    assert mpack.mask_fc[2].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="output_channels"):
        mpack(a["input"][:, :2], a["rois"])


def test_deform_psroi_pool_layer():
    p = psroi_problem(dtype=torch.float32)
    layer = ct.DeformPSRoIPool(**PSROI_OPTIONS)
    expected, _ = ct.deform_psroi_pool(p["input"], p["rois"], p["offset"], **PSROI_OPTIONS)
    assert torch.equal(layer(p["input"], p["rois"], p["offset"]), expected)
    assert "group_size=2" in repr(layer)


# ---------------------------------------------------------------------------- torch.compile
class _Detector(nn.Module):
    """A small model using every layer."""

    def __init__(self):
        super().__init__()
        self.stem = ct.ModulatedDeformConv2dPack(3, 8, 3, padding=1)
        self.down = ct.DeformConv2dPack(8, 8, 3, stride=2, padding=1)
        self.offset = nn.Conv2d(8, 18, 3, padding=1)
        self.conv = ct.DeformConv2d(8, 8, 3, padding=1)
        self.pool = ct.DeformRoIPoolPack(
            3, 8, deform_fc_channels=8, spatial_scale=0.5, sampling_ratio=2
        )
        self.mpool = ct.ModulatedDeformRoIPoolPack(
            3, 8, deform_fc_channels=8, spatial_scale=0.5, sampling_ratio=2
        )
        self.psroi = ct.DeformPSRoIPool(2, 2, 2, spatial_scale=0.5)
        self.psroi_offset = nn.Linear(8 * 9, 2 * 2 * 2)

    def forward(self, x, rois):
        y = torch.relu(self.down(torch.relu(self.stem(x))))
        y = torch.relu(self.conv(y, self.offset(y)))
        pooled = self.pool(y, rois) + self.mpool(y, rois)
        offset = self.psroi_offset(pooled.flatten(1)).view(-1, 2, 2, 2)
        return pooled.square().mean() + self.psroi(y, rois, offset).square().mean()


def _perturbed(model):
    """Non-zero offset predictors, so that the deformable paths are exercised."""
    g = _generator(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _run(model, x, rois):
    model.zero_grad()
    loss = model(x, rois)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _inputs(batch=2):
    g = _generator(7)
    x = torch.randn(batch, 3, 12, 12, generator=g)
    rois = torch.tensor([[0, 2.0, 3.0, 17.5, 20.0], [batch - 1, 5.0, 1.0, 21.0, 15.5]])
    return x, rois  # two RoIs whatever the batch


def test_compile_aot_eager_matches_eager_without_graph_breaks():
    torch.manual_seed(0)
    model = _perturbed(_Detector())
    x, rois = _inputs()
    expected_loss, expected_grads = _run(model, x, rois)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # breaks would raise
    loss, grads = _run(compiled, x, rois)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
    for got, expected in zip(grads, expected_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_compile_dynamic_shapes_compiles_once():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = _perturbed(_Detector())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    for batch in (3, 4):  # not 2: a batch equal to the number of RoIs would be duck-sized
        x, rois = _inputs(batch)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, rois), model(x, rois))
    assert len([graph for graph in counter.graphs if len(graph.graph.nodes) > 0]) == 1


def test_compile_under_autocast():
    pytest.importorskip("ml_dtypes")
    torch.manual_seed(0)
    layer = ct.ModulatedDeformConv2dPack(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6, generator=_generator(1))

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, f(x))


# torch.utils.mkldnn, imported by inductor's pre-grad passes, warns that
# torch.jit.script_method is deprecated (PyTorch's own code, nothing we call); harmless here.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_inductor():
    torch.manual_seed(0)
    layer = ct.DeformConv2d(2, 3, 3, padding=1)
    g = _generator(2)
    x = torch.randn(1, 2, 5, 5, generator=g)
    offset = torch.randn(1, 18, 5, 5, generator=g, requires_grad=True)
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    results = []
    for module in (layer, compiled):
        out = module(x, offset)
        results.append(
            (
                out.detach(),
                *torch.autograd.grad(out, [offset, layer.weight, layer.bias], torch.ones_like(out)),
            )
        )
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected)
