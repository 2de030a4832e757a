"""What only a real CUDA device can test (marker ``gpu``; skipped without one).

The kernel comparisons run on a GPU as the ``cupy`` variant of the ``launcher`` fixture
(tests/conftest.py) in the emulated test files, and CuPy arrays through the public
functions in tests/test_op_properties.py. Here: PyTorch CUDA tensors on non-default
streams (the kernels and the RoI value checks must run on the tensors' stream), and
agreement with torchvision's CUDA ops when torchvision is importable.
"""

from __future__ import annotations

import numpy as np
import pytest

import cupydcn
from cupydcn.psroi_pool import deform_psroi_pool, deform_psroi_pool_backward
from cupydcn.roi_pool import deform_roi_pool, deform_roi_pool_backward
from reference_psroi_pool import CONFIGS as PSROI_CONFIGS
from reference_psroi_pool import options as psroi_options
from reference_psroi_pool import problem as psroi_problem
from reference_roi_pool import ROI_KINDS, RoiCase
from support import assert_close, assert_relative, dtype_of, seeded

pytestmark = pytest.mark.gpu

# ---------------------------------------------------------------------------- problems

CONV_CONFIGS = {
    "3x3-p1": dict(
        n=3,
        c=8,
        h=11,
        w=9,
        c_out=6,
        kh=3,
        kw=3,
        groups=2,
        offset_groups=2,
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
    ),
    "2x3-mixed": dict(
        n=2,
        c=6,
        h=10,
        w=13,
        c_out=4,
        kh=2,
        kw=3,
        groups=2,
        offset_groups=3,
        stride=(2, 1),
        padding=(0, 2),
        dilation=(1, 2),
    ),
}


def _conv_problem(cfg, seed=0):
    rng = np.random.default_rng(seed)
    out_h = (cfg["h"] + 2 * cfg["padding"][0] - (cfg["dilation"][0] * (cfg["kh"] - 1) + 1)) // cfg[
        "stride"
    ][0] + 1
    out_w = (cfg["w"] + 2 * cfg["padding"][1] - (cfg["dilation"][1] * (cfg["kw"] - 1) + 1)) // cfg[
        "stride"
    ][1] + 1
    taps = cfg["kh"] * cfg["kw"]
    return {
        "input": rng.standard_normal((cfg["n"], cfg["c"], cfg["h"], cfg["w"])),
        "offset": 2.5
        * rng.standard_normal((cfg["n"], 2 * cfg["offset_groups"] * taps, out_h, out_w)),
        "weight": rng.standard_normal(
            (cfg["c_out"], cfg["c"] // cfg["groups"], cfg["kh"], cfg["kw"])
        ),
        "bias": rng.standard_normal((cfg["c_out"],)),
        "mask": rng.uniform(size=(cfg["n"], cfg["offset_groups"] * taps, out_h, out_w)),
    }


def _conv_options(cfg):
    return {k: cfg[k] for k in ("stride", "padding", "dilation")}


ROI_CASES = {
    "every_kind_adaptive": RoiCase(
        roi_kinds=ROI_KINDS, rois_per_kind=2, channels=5, height=11, width=13, output_size=(3, 4)
    ),
    "ratio2_far_offsets": RoiCase(
        sampling_ratio=2,
        offset_scale=4.0,
        gamma=0.2,
        spatial_scale=0.5,
        roi_kinds=("inside", "large", "tiny"),
    ),
}


def _roi_problem(case: RoiCase, dtype_name: str, seed) -> tuple[dict, dict]:
    """(arrays in the dtype, their values in float64); rois float32 below float64."""
    rng = seeded(seed)
    dtype = dtype_of(dtype_name)
    rois_dtype = np.float64 if dtype_name == "float64" else np.float32
    arrays = {
        name: None if v is None else v.astype(rois_dtype if name == "rois" else dtype)
        for name, v in case.arrays(rng).items()
    }
    ph, pw = case.output_size
    arrays["grad_output"] = rng.normal(
        size=(arrays["rois"].shape[0], case.channels, ph, pw)
    ).astype(dtype)
    exact = {name: None if v is None else v.astype(np.float64) for name, v in arrays.items()}
    return arrays, exact


def _roi_run(arrays: dict, case: RoiCase):
    inputs = (arrays["input"], arrays["rois"], arrays["offset"], arrays["mask"])
    output = deform_roi_pool(*inputs, **case.options)
    return output, deform_roi_pool_backward(arrays["grad_output"], *inputs, **case.options)


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    return torch


# ---------------------------------------------------------------------------- deform_conv2d


def test_conv_torch_cuda_on_non_default_stream():
    torch = _torch_cuda()
    cfg = CONV_CONFIGS["3x3-p1"]
    a = _conv_problem(cfg)
    ref = cupydcn.deform_conv2d(
        a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **_conv_options(cfg)
    )
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        t = {k: torch.as_tensor(v, dtype=torch.float32, device="cuda") for k, v in a.items()}
        # Long PyTorch work queued on the same stream first: a call on another stream would
        # read t["input"] before this in-place update finished.
        t["input"].mul_(1.0)
        for _ in range(20):
            t["input"].add_(0.0)
        out = cupydcn.deform_conv2d(
            t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **_conv_options(cfg)
        )
        out = out * 1.0  # consumed on the same stream without synchronising
    stream.synchronize()
    assert isinstance(out, torch.Tensor) and out.is_cuda
    assert_relative(out.cpu().numpy(), ref, "float32", "output", bound=1e-4)


def test_conv_matches_torchvision():
    torch = _torch_cuda()
    torchvision_ops = pytest.importorskip("torchvision.ops")
    cfg = CONV_CONFIGS["2x3-mixed"]
    a = {k: torch.as_tensor(v, device="cuda") for k, v in _conv_problem(cfg).items()}
    # Zero offsets with padding put taps exactly on -1: the kink convention is compared too.
    a["offset"][:, :4] = 0
    leaves = {k: v.clone().requires_grad_(True) for k, v in a.items()}
    expected = torchvision_ops.deform_conv2d(
        leaves["input"],
        leaves["offset"],
        leaves["weight"],
        leaves["bias"],
        mask=leaves["mask"],
        **_conv_options(cfg),
    )
    grad_output = torch.randn_like(expected)
    expected.backward(grad_output)
    out = cupydcn.deform_conv2d(
        a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **_conv_options(cfg)
    )
    grads = cupydcn.deform_conv2d_backward(
        grad_output, a["input"], a["offset"], a["weight"], a["mask"], **_conv_options(cfg)
    )
    torch.testing.assert_close(out, expected.detach(), rtol=1e-9, atol=1e-9)
    for name in ("input", "offset", "weight", "mask", "bias"):
        torch.testing.assert_close(
            getattr(grads, "grad_" + name), leaves[name].grad, rtol=1e-9, atol=1e-9
        )


# ---------------------------------------------------------------------------- deform_roi_pool


def test_roi_pool_torch_cuda_on_non_default_stream():
    torch = _torch_cuda()
    case = ROI_CASES["every_kind_adaptive"]
    arrays, exact = _roi_problem(case, "float32", "torch")
    expected, _ = _roi_run(exact, case)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        t = {k: None if v is None else torch.as_tensor(v, device="cuda") for k, v in arrays.items()}
        # PyTorch work queued on the same stream first: a call on another stream would
        # read the input before these in-place updates finished.
        for _ in range(20):
            t["input"].add_(0.0)
        output = deform_roi_pool(t["input"], t["rois"], t["offset"], t["mask"], **case.options)
        output = output * 1.0
    stream.synchronize()
    assert isinstance(output, torch.Tensor) and output.is_cuda
    assert_close(output.cpu().numpy(), expected, "float32", "output")


def test_roi_pool_matches_torchvision_roi_align():
    torch = _torch_cuda()
    torchvision_ops = pytest.importorskip("torchvision.ops")
    for name, case in ROI_CASES.items():
        arrays, _ = _roi_problem(case, "float64", ("torchvision", name))
        t = {k: None if v is None else torch.as_tensor(v, device="cuda") for k, v in arrays.items()}
        leaf = t["input"].clone().requires_grad_(True)
        expected = torchvision_ops.roi_align(
            leaf, t["rois"], case.output_size, case.spatial_scale, case.sampling_ratio, aligned=True
        )
        expected.backward(t["grad_output"])
        output = deform_roi_pool(t["input"], t["rois"], **case.options)
        grads = deform_roi_pool_backward(t["grad_output"], t["input"], t["rois"], **case.options)
        torch.testing.assert_close(output, expected.detach(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(grads.grad_input, leaf.grad, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------- deform_psroi_pool


def test_psroi_pool_torch_cuda_on_a_side_stream():
    torch = _torch_cuda()
    cfg = PSROI_CONFIGS["three_classes"]
    input, rois, offset, grad_output = psroi_problem(cfg, "float32")
    expected_output, _ = deform_psroi_pool(input, rois, offset, **psroi_options(cfg))
    expected = deform_psroi_pool_backward(grad_output, input, rois, offset, **psroi_options(cfg))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        t = [torch.from_numpy(a).cuda() for a in (input, rois, offset, grad_output)]
        output, count = deform_psroi_pool(*t[:3], **psroi_options(cfg))
        grads = deform_psroi_pool_backward(t[3], *t[:3], **psroi_options(cfg))
    stream.synchronize()
    assert output.is_cuda and count.dtype == torch.int32
    bound = 1e-5
    assert_relative(output.cpu().numpy(), expected_output, "float32", "output", bound=bound)
    assert_relative(
        grads.grad_input.cpu().numpy(), expected.grad_input, "float32", "grad_input", bound=bound
    )
    assert_relative(
        grads.grad_offset.cpu().numpy(), expected.grad_offset, "float32", "grad_offset", bound=bound
    )


# ---------------------------------------------------------------------------- RoI value checks


def _rois_valid_only_on_the_side_stream(torch, valid_rois: np.ndarray, batch: int):
    """(side stream, rois tensor): the tensor holds an invalid batch index (``batch``) in
    device memory, and a copy of ``valid_rois`` into it is queued on a non-default PyTorch
    stream behind ~0.1 s of ``torch.cuda._sleep``. Only work ordered after that copy on
    that stream sees valid RoIs; a check on any other stream (CuPy's legacy stream among
    them) reads the invalid ones."""
    valid = torch.as_tensor(valid_rois, device="cuda")
    rois = valid.clone()
    rois[:, 0] = batch  # out of range: [0, batch)
    torch.cuda.synchronize()  # inputs and the invalid RoIs are in memory on every stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(2**27)  # keep the side stream busy (cycles)
        rois.copy_(valid)
    return side, rois


def test_roi_pool_checks_rois_on_the_tensors_stream():
    """deform_roi_pool validated RoI values before entering its compute scope, on CuPy's
    legacy stream, not the tensors' stream: RoIs made valid on a side stream were read
    before the write and rejected. The call on that stream must succeed and match the CPU."""
    torch = _torch_cuda()
    case = ROI_CASES["every_kind_adaptive"]
    arrays, exact = _roi_problem(case, "float32", "stream-checked rois")
    expected_output, expected_grads = _roi_run(exact, case)
    t = {k: None if v is None else torch.as_tensor(v, device="cuda") for k, v in arrays.items()}
    side, rois = _rois_valid_only_on_the_side_stream(torch, arrays["rois"], case.batch)
    with torch.cuda.stream(side):
        output = deform_roi_pool(t["input"], rois, t["offset"], t["mask"], **case.options)
        grads = deform_roi_pool_backward(
            t["grad_output"], t["input"], rois, t["offset"], t["mask"], **case.options
        )
    side.synchronize()
    assert_close(output.cpu().numpy(), expected_output, "float32", "output")
    for label, grad, expected in zip(("input", "offset", "mask"), grads, expected_grads):
        assert_close(grad.cpu().numpy(), expected, "float32", f"grad_{label}")
    # The backward's own check as well: valid again only on a fresh side stream.
    side, rois = _rois_valid_only_on_the_side_stream(torch, arrays["rois"], case.batch)
    with torch.cuda.stream(side):
        grads = deform_roi_pool_backward(
            t["grad_output"], t["input"], rois, t["offset"], t["mask"], **case.options
        )
    side.synchronize()
    assert_close(grads.grad_input.cpu().numpy(), expected_grads[0], "float32", "grad_input")


def test_psroi_pool_checks_rois_on_the_tensors_stream():
    """As for deform_roi_pool: RoI values made valid on a side stream, then
    deform_psroi_pool (and its backward) on that stream must succeed and match the CPU."""
    torch = _torch_cuda()
    cfg = PSROI_CONFIGS["three_classes"]
    input, rois, offset, grad_output = psroi_problem(cfg, "float32")
    expected_output, expected_count = deform_psroi_pool(input, rois, offset, **psroi_options(cfg))
    expected = deform_psroi_pool_backward(grad_output, input, rois, offset, **psroi_options(cfg))
    t = [None if a is None else torch.from_numpy(a).cuda() for a in (input, offset, grad_output)]
    for call in ("forward", "backward"):
        side, device_rois = _rois_valid_only_on_the_side_stream(torch, rois, cfg["batch"])
        with torch.cuda.stream(side):
            if call == "forward":
                output, count = deform_psroi_pool(t[0], device_rois, t[1], **psroi_options(cfg))
            else:
                grads = deform_psroi_pool_backward(
                    t[2], t[0], device_rois, t[1], **psroi_options(cfg)
                )
        side.synchronize()
    np.testing.assert_array_equal(count.cpu().numpy(), expected_count)
    assert_relative(output.cpu().numpy(), expected_output, "float32", "output", bound=1e-5)
    assert_relative(
        grads.grad_input.cpu().numpy(), expected.grad_input, "float32", "grad_input", bound=1e-5
    )
    assert_relative(
        grads.grad_offset.cpu().numpy(), expected.grad_offset, "float32", "grad_offset", bound=1e-5
    )
