"""deform_psroi_pool on a real CUDA device (marker ``gpu``; skipped without one).

CuPy arrays through the public functions, every dtype against the NumPy backend in
float64 on the same (rounded) inputs, and PyTorch CUDA tensors on a side stream.
"""

from __future__ import annotations

import numpy as np
import pytest

from cupydcn.psroi_pool import deform_psroi_pool, deform_psroi_pool_backward
from cupydcn.core.dtypes import numpy_dtype
from test_psroi_pool import CONFIGS, options, problem, relative_error

pytestmark = pytest.mark.gpu

# The GPU contracts a * b + c into FMAs, so sample positions differ from the CPU's by an
# ulp: a little more room than the emulated comparison, for float32 in particular.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 2.0**-10, "bfloat16": 2.0**-7}


@pytest.mark.parametrize("dtype_name", list(TOLERANCE))
@pytest.mark.parametrize("name", ["basic", "parts_coarser", "parts_finer", "no_trans",
                                  "offsets_off_map"])
def test_cupy_matches_numpy_float64(name, dtype_name):
    import cupy

    cfg = CONFIGS[name]
    input, rois, offset, grad_output = problem(cfg, dtype_name, seed=2)
    as64 = [None if a is None else a.astype(np.float64) for a in (input, offset, grad_output)]
    expected_output, expected_count = deform_psroi_pool(as64[0], rois, as64[1], **options(cfg))
    expected = deform_psroi_pool_backward(as64[2], as64[0], rois, as64[1], **options(cfg))

    device = [None if a is None else cupy.asarray(a) for a in (input, rois, offset, grad_output)]
    output, count = deform_psroi_pool(*device[:3], **options(cfg))
    assert isinstance(output, cupy.ndarray) and output.dtype == numpy_dtype(dtype_name)
    assert count.dtype == np.int32
    np.testing.assert_array_equal(cupy.asnumpy(count), expected_count)
    tolerance = TOLERANCE[dtype_name]
    assert relative_error(cupy.asnumpy(output), expected_output) <= tolerance
    grads = deform_psroi_pool_backward(device[3], *device[:3], **options(cfg))
    assert relative_error(cupy.asnumpy(grads.grad_input), expected.grad_input) <= tolerance
    if offset is None:
        assert grads.grad_offset is None
    else:
        assert relative_error(cupy.asnumpy(grads.grad_offset), expected.grad_offset) <= tolerance


def test_torch_cuda_on_a_side_stream():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA")
    cfg = CONFIGS["three_classes"]
    input, rois, offset, grad_output = problem(cfg, "float32")
    expected_output, _ = deform_psroi_pool(input, rois, offset, **options(cfg))
    expected = deform_psroi_pool_backward(grad_output, input, rois, offset, **options(cfg))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        t = [torch.from_numpy(a).cuda() for a in (input, rois, offset, grad_output)]
        output, count = deform_psroi_pool(*t[:3], **options(cfg))
        grads = deform_psroi_pool_backward(t[3], *t[:3], **options(cfg))
    stream.synchronize()
    assert output.is_cuda and count.dtype == torch.int32
    assert relative_error(output.cpu().numpy(), expected_output.astype(np.float64)) <= 1e-5
    assert relative_error(grads.grad_input.cpu().numpy(),
                          expected.grad_input.astype(np.float64)) <= 1e-5
    assert relative_error(grads.grad_offset.cpu().numpy(),
                          expected.grad_offset.astype(np.float64)) <= 1e-5
