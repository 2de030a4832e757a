"""deform_roi_pool on a real CUDA device (marker ``gpu``; skipped without one).

The comparisons the emulated tests make, on hardware: every dtype against the NumPy
backend in float64 on the same quantised inputs (tolerances of tests/test_roi_pool.py),
both index widths, PyTorch CUDA tensors on a non-default stream, and agreement with
torchvision.ops.roi_align (aligned=True) when torchvision is importable.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference_roi_pool import ROI_KINDS, RoiCase, seeded
from test_roi_pool import TOLERANCE, assert_close

from cupydcn.roi_pool import deform_roi_pool, deform_roi_pool_backward
from cupydcn.core.dtypes import numpy_dtype

pytestmark = pytest.mark.gpu

CASES = {
    "every_kind_adaptive": RoiCase(roi_kinds=ROI_KINDS, rois_per_kind=2, channels=5,
                                   height=11, width=13, output_size=(3, 4)),
    "ratio2_far_offsets": RoiCase(sampling_ratio=2, offset_scale=4.0, gamma=0.2,
                                  spatial_scale=0.5, roi_kinds=("inside", "large", "tiny")),
}


def _problem(case: RoiCase, dtype_name: str, seed) -> tuple[dict, dict]:
    """(arrays in the dtype, their values in float64); rois float32 below float64."""
    rng = seeded(seed)
    dtype = numpy_dtype(dtype_name)
    rois_dtype = np.float64 if dtype_name == "float64" else np.float32
    arrays = {name: None if v is None else v.astype(rois_dtype if name == "rois" else dtype)
              for name, v in case.arrays(rng).items()}
    ph, pw = case.output_size
    arrays["grad_output"] = rng.normal(
        size=(arrays["rois"].shape[0], case.channels, ph, pw)).astype(dtype)
    exact = {name: None if v is None else v.astype(np.float64) for name, v in arrays.items()}
    return arrays, exact


def _run(arrays: dict, case: RoiCase):
    inputs = (arrays["input"], arrays["rois"], arrays["offset"], arrays["mask"])
    output = deform_roi_pool(*inputs, **case.options)
    return output, deform_roi_pool_backward(arrays["grad_output"], *inputs, **case.options)


@pytest.mark.parametrize("dtype_name", list(TOLERANCE))
@pytest.mark.parametrize("name", CASES)
def test_cupy_matches_numpy_float64(name, dtype_name):
    import cupy

    case = CASES[name]
    arrays, exact = _problem(case, dtype_name, (name, dtype_name))
    expected_output, expected_grads = _run(exact, case)
    device = {k: None if v is None else cupy.asarray(v) for k, v in arrays.items()}
    output, grads = _run(device, case)
    assert isinstance(output, cupy.ndarray) and output.dtype == numpy_dtype(dtype_name)
    assert_close(output.get(), expected_output, dtype_name, "output")
    for label, grad, expected in zip(("input", "offset", "mask"), grads, expected_grads):
        assert isinstance(grad, cupy.ndarray) and grad.dtype == numpy_dtype(dtype_name)
        assert_close(grad.get(), expected, dtype_name, f"grad_{label}")


def test_64bit_index_path_matches():
    import cupy

    from cupydcn.core import arrays as _arrays

    from cupydcn.roi_pool import cuda_backend as _roi_pool_kernels
    from cupydcn.cuda.cupy_launcher import cupy_launcher
    from cupydcn.roi_pool.spec import OP, roi_pool_geometry

    case = CASES["every_kind_adaptive"]
    arrays, _ = _problem(case, "float32", "bits")
    device = {k: None if v is None else cupy.asarray(v) for k, v in arrays.items()}
    placement, native = _arrays.natives(OP, device)
    geom = roi_pool_geometry(OP, native, **case.options)
    inputs = (device["input"], device["rois"], device["offset"], device["mask"])
    results = []
    for bits in (32, 64):
        output = _roi_pool_kernels.roi_pool_forward(cupy_launcher(), *inputs, geom,
                                                    index_bits=bits)
        grads = _roi_pool_kernels.roi_pool_backward(
            cupy_launcher(), device["grad_output"], *inputs, geom,
            wrt=frozenset({"input", "offset", "mask"}), index_bits=bits)
        results.append([output.get()] + [g.get() for g in grads])
    for r32, r64 in zip(*results):
        np.testing.assert_allclose(r32, r64, rtol=1e-5, atol=1e-5)


def test_torch_cuda_on_non_default_stream():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    case = CASES["every_kind_adaptive"]
    arrays, exact = _problem(case, "float32", "torch")
    expected, _ = _run(exact, case)
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


def test_matches_torchvision_roi_align():
    torch = pytest.importorskip("torch")
    torchvision_ops = pytest.importorskip("torchvision.ops")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    for name, case in CASES.items():
        arrays, _ = _problem(case, "float64", ("torchvision", name))
        t = {k: None if v is None else torch.as_tensor(v, device="cuda") for k, v in arrays.items()}
        leaf = t["input"].clone().requires_grad_(True)
        expected = torchvision_ops.roi_align(leaf, t["rois"], case.output_size,
                                             case.spatial_scale, case.sampling_ratio,
                                             aligned=True)
        expected.backward(t["grad_output"])
        output = deform_roi_pool(t["input"], t["rois"], **case.options)
        grads = deform_roi_pool_backward(t["grad_output"], t["input"], t["rois"], **case.options)
        torch.testing.assert_close(output, expected.detach(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(grads.grad_input, leaf.grad, rtol=1e-9, atol=1e-9)
