"""cupydcn.torch on CUDA devices (marker ``gpu``; skipped without one): the custom ops
against the CPU, ordering with PyTorch work on a non-default stream (forward and the
autograd backward), tensors on a second device, torch.compile, autocast in float16, and
results that are the buffers the kernels wrote."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

import cupydcn.torch as ct  # noqa: E402
from test_torch_adapter import (  # noqa: E402
    CONV_CONFIGS,
    PSROI_OPTIONS,
    ROI_OPTIONS,
    _Detector,
    _inputs,
    _perturbed,
    conv_options,
    conv_problem,
    psroi_problem,
    roi_problem,
)


@pytest.fixture(autouse=True)
def _torch_cuda():
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch build has no CUDA")


CONV = CONV_CONFIGS["dcnv2-groups"]


def _all_ops(a: dict, r: dict, p: dict):
    """Outputs of the three ops and autograd gradients of a fixed projection of them."""
    out = ct.deform_conv2d(
        a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **conv_options(CONV)
    )
    pooled = ct.deform_roi_pool(r["input"], r["rois"], r["offset"], r["mask"], **ROI_OPTIONS)
    ps, count = ct.deform_psroi_pool(p["input"], p["rois"], p["offset"], **PSROI_OPTIONS)
    loss = sum(
        (t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype, device=t.device).view(t.shape)).sum()
        for t in (out, pooled, ps)
    )
    leaves = [t for d in (a, r, p) for t in d.values() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, leaves)
    return [out, pooled, ps, count, *grads]


def _problems(dtype, device):
    def leaves(args):
        return {
            k: None if v is None else v.to(device).requires_grad_(k != "rois")
            for k, v in args.items()
        }

    return (
        leaves(conv_problem(CONV, dtype=dtype)),
        leaves(roi_problem(dtype=dtype)),
        leaves(psroi_problem(dtype=dtype)),
    )


def _assert_close(got, expected, dtype):
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-4}[dtype]
    for g, e in zip(got, expected):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu(), e, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cuda_matches_cpu(dtype):
    expected = [t.detach() for t in _all_ops(*_problems(dtype, "cpu"))]
    _assert_close(_all_ops(*_problems(dtype, "cuda")), expected, dtype)


def test_ordered_with_pytorch_work_on_a_non_default_stream():
    """Inputs written on a side stream behind a long sleep: kernels on any other stream
    would read them too early, in the forward or in the autograd backward."""
    expected = [t.detach() for t in _all_ops(*_problems(torch.float32, "cpu"))]
    sources = _problems(torch.float32, "cuda")
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        problems = []
        for source in sources:
            copies = {}
            for name, value in source.items():
                if value is None:
                    copies[name] = None
                    continue
                target = torch.zeros_like(value.detach())
                torch.cuda._sleep(20_000_000)  # keeps the stream busy before the copy
                target.copy_(value.detach())
                copies[name] = target.requires_grad_(name != "rois")
            problems.append(copies)
        results = [t * 1 for t in _all_ops(*problems)]  # consumed on the same stream
    stream.synchronize()
    _assert_close(results, expected, torch.float32)


def _second_device_results(dtype):
    problems = [
        {
            k: None if v is None else v.detach().to("cuda:1").requires_grad_(k != "rois")
            for k, v in d.items()
        }
        for d in _problems(dtype, "cpu")
    ]
    return _all_ops(*problems)


def test_second_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    expected = [t.detach() for t in _all_ops(*_problems(torch.float32, "cpu"))]
    with torch.cuda.device(0):  # the current device is another one
        results = _second_device_results(torch.float32)
    assert all(t.device == torch.device("cuda:1") for t in results)
    _assert_close(results, expected, torch.float32)
    with torch.cuda.stream(torch.cuda.Stream(device=1)):
        results = _second_device_results(torch.float32)
        results = [t * 1 for t in results]
    torch.cuda.synchronize(1)
    _assert_close(results, expected, torch.float32)


def test_compile_on_cuda_matches_eager():
    torch.manual_seed(0)
    model = _perturbed(_Detector()).cuda()
    x, rois = (t.cuda() for t in _inputs())
    expected = model(x, rois)
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(x, rois)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    for p, e in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-5)


def test_autocast_float16_on_cuda():
    a = {k: None if v is None else v.cuda() for k, v in conv_problem(CONV).items()}
    expected = ct.deform_conv2d(
        a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **conv_options(CONV)
    )
    f = {k: None if v is None else v.float().requires_grad_(True) for k, v in a.items()}
    with torch.autocast("cuda", dtype=torch.float16):
        out = ct.deform_conv2d(
            f["input"], f["offset"], f["weight"], f["bias"], mask=f["mask"], **conv_options(CONV)
        )
    assert out.dtype == torch.float16
    assert (out.double() - expected).abs().max() <= 3e-3 * expected.abs().max()
    out.float().sum().backward()
    assert f["weight"].grad.dtype == torch.float32


def test_results_are_the_buffers_the_kernels_wrote(monkeypatch):
    from cupydcn.deform_conv import cuda_backend as _conv_kernels

    written = []
    for name in ("conv_forward", "conv_backward"):
        original = getattr(_conv_kernels, name)

        def spy(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            results = result if isinstance(result, tuple) else (result,)
            written.extend(r.data.ptr for r in results if r is not None)
            return result

        monkeypatch.setattr(_conv_kernels, name, spy)
    a = {
        k: None if v is None else v.cuda().requires_grad_(True)
        for k, v in conv_problem(CONV, dtype=torch.float32).items()
    }
    out = ct.deform_conv2d(
        a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **conv_options(CONV)
    )
    grads = torch.autograd.grad(out, list(a.values()), torch.ones_like(out))
    assert all(t.data_ptr() in written for t in (out, *grads))
