"""deform_conv2d on a real CUDA device (marker ``gpu``; skipped without one).

The same comparisons the emulated tests make, on hardware: every dtype against the NumPy
backend in float64, PyTorch CUDA tensors on a non-default stream, and agreement with
torchvision.ops.deform_conv2d when torchvision is importable.
"""

from __future__ import annotations

import numpy as np
import pytest

import cupydcn

pytestmark = pytest.mark.gpu

TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
CONFIGS = {
    "3x3-p1": dict(n=3, c=8, h=11, w=9, c_out=6, kh=3, kw=3, groups=2, offset_groups=2,
                   stride=(1, 1), padding=(1, 1), dilation=(1, 1)),
    "2x3-mixed": dict(n=2, c=6, h=10, w=13, c_out=4, kh=2, kw=3, groups=2, offset_groups=3,
                      stride=(2, 1), padding=(0, 2), dilation=(1, 2)),
}


def _problem(cfg, seed=0):
    rng = np.random.default_rng(seed)
    out_h = (cfg["h"] + 2 * cfg["padding"][0] - (cfg["dilation"][0] * (cfg["kh"] - 1) + 1)) // cfg["stride"][0] + 1
    out_w = (cfg["w"] + 2 * cfg["padding"][1] - (cfg["dilation"][1] * (cfg["kw"] - 1) + 1)) // cfg["stride"][1] + 1
    taps = cfg["kh"] * cfg["kw"]
    return {
        "input": rng.standard_normal((cfg["n"], cfg["c"], cfg["h"], cfg["w"])),
        "offset": 2.5 * rng.standard_normal((cfg["n"], 2 * cfg["offset_groups"] * taps, out_h, out_w)),
        "weight": rng.standard_normal((cfg["c_out"], cfg["c"] // cfg["groups"], cfg["kh"], cfg["kw"])),
        "bias": rng.standard_normal((cfg["c_out"],)),
        "mask": rng.uniform(size=(cfg["n"], cfg["offset_groups"] * taps, out_h, out_w)),
    }


def _options(cfg):
    return {k: cfg[k] for k in ("stride", "padding", "dilation")}


def _rel_error(actual, expected):
    actual = np.asarray(actual, dtype=np.float64)
    return np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30)


@pytest.mark.parametrize("dtype_name", list(TOLERANCE))
@pytest.mark.parametrize("with_mask", [True, False], ids=["dcnv2", "dcnv1"])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_cupy_matches_numpy_float64(cfg_name, with_mask, dtype_name):
    import cupy

    from cupydcn.core.dtypes import numpy_dtype

    cfg = CONFIGS[cfg_name]
    a = _problem(cfg)
    if not with_mask:
        a["mask"] = None
    dtype = numpy_dtype(dtype_name)
    # The reference sees the same rounded inputs: the offset gradient jumps where a sample
    # point crosses an integer, so unrounded inputs would measure quantisation, not arithmetic.
    a = {k: None if v is None else v.astype(dtype).astype(np.float64) for k, v in a.items()}
    ref = cupydcn.deform_conv2d(a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **_options(cfg))
    grad_output = np.random.default_rng(1).standard_normal(ref.shape).astype(dtype).astype(np.float64)
    ref_grads = cupydcn.deform_conv2d_backward(grad_output, a["input"], a["offset"], a["weight"], a["mask"], **_options(cfg))

    d = {k: None if v is None else cupy.asarray(v.astype(dtype)) for k, v in a.items()}
    out = cupydcn.deform_conv2d(d["input"], d["offset"], d["weight"], d["bias"], mask=d["mask"], **_options(cfg))
    assert isinstance(out, cupy.ndarray) and out.dtype == dtype
    grads = cupydcn.deform_conv2d_backward(cupy.asarray(grad_output.astype(dtype)), d["input"], d["offset"], d["weight"], d["mask"], **_options(cfg))
    tol = TOLERANCE[dtype_name]
    assert _rel_error(out.get().astype(np.float64), ref) < tol
    for name in ("grad_input", "grad_offset", "grad_weight", "grad_mask", "grad_bias"):
        expected = getattr(ref_grads, name)
        if expected is None:
            assert getattr(grads, name) is None
            continue
        assert _rel_error(getattr(grads, name).get().astype(np.float64), expected) < tol, name


def test_64bit_index_path_matches():
    import cupy

    from cupydcn.deform_conv.spec import conv_geometry
    from cupydcn.deform_conv.cuda_backend import conv_backward, conv_forward
    from cupydcn.cuda.cupy_launcher import cupy_launcher

    cfg = CONFIGS["2x3-mixed"]
    a = {k: cupy.asarray(v.astype(np.float32)) for k, v in _problem(cfg).items()}
    geom = conv_geometry(a["input"], a["offset"], a["weight"], a["bias"], a["mask"], padding_mode="zeros", **_options(cfg))
    results = []
    for bits in (32, 64):
        out = conv_forward(cupy_launcher(), a["input"], a["offset"], a["weight"], a["bias"], a["mask"], geom,
                           dtype_name="float32", workspace_bytes=1 << 30, index_bits=bits)
        grads = conv_backward(cupy_launcher(), cupy.ones_like(out), a["input"], a["offset"], a["weight"], a["mask"], geom,
                              dtype_name="float32", wrt=frozenset({"input", "offset", "weight", "mask", "bias"}),
                              workspace_bytes=1 << 30, index_bits=bits)
        results.append([out.get()] + [g.get() for g in grads])
    for r32, r64 in zip(*results):
        np.testing.assert_allclose(r32, r64, rtol=1e-5, atol=1e-5)


def test_torch_cuda_on_non_default_stream():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    cfg = CONFIGS["3x3-p1"]
    a = _problem(cfg)
    ref = cupydcn.deform_conv2d(a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **_options(cfg))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        t = {k: torch.as_tensor(v, dtype=torch.float32, device="cuda") for k, v in a.items()}
        # Long PyTorch work queued on the same stream first: a call on another stream would
        # read t["input"] before this in-place update finished.
        t["input"].mul_(1.0)
        for _ in range(20):
            t["input"].add_(0.0)
        out = cupydcn.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **_options(cfg))
        out = out * 1.0  # consumed on the same stream without synchronising
    stream.synchronize()
    assert isinstance(out, torch.Tensor) and out.is_cuda
    assert _rel_error(out.cpu().numpy(), ref) < 1e-4


def test_matches_torchvision():
    torch = pytest.importorskip("torch")
    torchvision_ops = pytest.importorskip("torchvision.ops")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    cfg = CONFIGS["2x3-mixed"]
    a = {k: torch.as_tensor(v, device="cuda") for k, v in _problem(cfg).items()}
    # Zero offsets with padding put taps exactly on -1: the kink convention is compared too.
    a["offset"][:, :4] = 0
    leaves = {k: v.clone().requires_grad_(True) for k, v in a.items()}
    expected = torchvision_ops.deform_conv2d(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"],
                                             mask=leaves["mask"], **_options(cfg))
    grad_output = torch.randn_like(expected)
    expected.backward(grad_output)
    out = cupydcn.deform_conv2d(a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **_options(cfg))
    grads = cupydcn.deform_conv2d_backward(grad_output, a["input"], a["offset"], a["weight"], a["mask"], **_options(cfg))
    torch.testing.assert_close(out, expected.detach(), rtol=1e-9, atol=1e-9)
    for name in ("input", "offset", "weight", "mask", "bias"):
        torch.testing.assert_close(getattr(grads, "grad_" + name), leaves[name].grad, rtol=1e-9, atol=1e-9)
