"""deform_conv2d's orchestration on the fused kernels (algorithm="fused"): forward and every
gradient against the column path on the same launcher (the emulator in CI, CuPy on a
GPU). The kernels themselves are tested in tests/test_conv_fused_emulated.py and
tests/test_conv_fused_backward_emulated.py; this checks the wiring: which kernels run,
the accumulators, the roundings, grad_bias, DCNv1 and wrt subsets."""

from __future__ import annotations

import numpy as np
import pytest

from cupydcn.core.dtypes import numpy_dtype
from cupydcn.deform_conv import cuda_backend
from cupydcn.deform_conv.spec import GRADIENT_NAMES, conv_geometry
from support import on_device, seeded, to_numpy


def _problem(dtype_name: str, with_mask: bool):
    rng = seeded("fused-path", dtype_name, with_mask)
    dtype = numpy_dtype(dtype_name)
    n, c, co, h, w = 2, 16, 24, 7, 6
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    offset = (rng.standard_normal((n, 2 * 9, h, w)) * 1.5).astype(dtype)
    weight = (rng.standard_normal((co, c, 3, 3)) * 0.2).astype(dtype)
    bias = rng.standard_normal(co).astype(dtype)
    mask = rng.uniform(0, 1, (n, 9, h, w)).astype(dtype) if with_mask else None
    grad_output = rng.standard_normal((n, co, h, w)).astype(dtype)
    geom = conv_geometry(x, offset, weight, bias, mask, stride=1, padding=1, dilation=1)
    return geom, (x, offset, weight, bias, mask), grad_output


def _close(got, want, dtype_name, what):
    got = to_numpy(got).astype(np.float64)
    want = to_numpy(want).astype(np.float64)
    scale = max(float(np.max(np.abs(want))), 1e-30)
    u = {"float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype_name]
    # both round once to the element dtype; float32 sums in different orders
    bound = 2 * u * np.abs(want) + 1e-4 * scale
    assert np.all(np.abs(got - want) <= bound), what


@pytest.mark.parametrize("with_mask", [True, False], ids=["dcnv2", "dcnv1"])
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_fused_matches_the_column_path(launcher, dtype_name, with_mask):
    geom, arrays, grad_output = _problem(dtype_name, with_mask)
    device = on_device(launcher, *arrays)
    outputs = {
        a: cuda_backend.conv_forward(launcher, *device, geom, workspace_bytes=1 << 24, algorithm=a)
        for a in ("fused", "im2col")
    }
    _close(outputs["fused"], outputs["im2col"], dtype_name, "output")
    x, offset, weight, _, mask = device
    go = on_device(launcher, grad_output)
    wrt = frozenset(GRADIENT_NAMES) if with_mask else frozenset(GRADIENT_NAMES) - {"mask"}
    start = len(launcher.launches)
    grads = {
        a: cuda_backend.conv_backward(
            launcher,
            go,
            x,
            offset,
            weight,
            mask,
            geom,
            wrt=wrt,
            workspace_bytes=1 << 24,
            algorithm=a,
        )
        for a in ("fused", "im2col")
    }
    kernels = {r.kernel for r in launcher.launches[start:]}
    assert {"deform_conv_fused_backward_data", "deform_conv_fused_grad_weight"} <= kernels
    for name, got, want in zip(grads["fused"]._fields, grads["fused"], grads["im2col"]):
        if want is None:
            assert got is None, name
        else:
            _close(got, want, dtype_name, name)


def test_fused_wrt_subsets(launcher):
    geom, arrays, grad_output = _problem("float16", True)
    x, offset, weight, _, mask = on_device(launcher, *arrays)
    go = on_device(launcher, grad_output)
    for wrt, kernels in (
        ({"weight"}, {"deform_conv_fused_grad_weight"}),
        ({"offset", "mask"}, {"deform_conv_fused_backward_data"}),
        ({"bias"}, set()),
    ):
        start = len(launcher.launches)
        grads = cuda_backend.conv_backward(
            launcher,
            go,
            x,
            offset,
            weight,
            mask,
            geom,
            wrt=frozenset(wrt),
            workspace_bytes=1 << 24,
            algorithm="fused",
        )
        launched = {r.kernel for r in launcher.launches[start:]} - {"round_to_output"}
        assert launched == kernels, wrt
        present = {
            n for n, g in zip(("input", "offset", "weight", "mask", "bias"), grads) if g is not None
        }
        assert present == wrt
