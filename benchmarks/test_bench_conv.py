"""deform_conv2d: S1–S7 × DCNv2/DCNv1 × float32/float16/bfloat16 × forward/backward/
forward+backward × cupydcn, torchvision, cuDNN conv2d (NCHW and NHWC), mmcv.

cuDNN conv2d has no mask: its rows ("-") are the speed of light of both variants.
"""

from __future__ import annotations

import pytest

import shapes

OP = "deform_conv2d"
SMOKE = {
    *(("S1", "mask", "float32", p, "cupydcn") for p in ("forward", "backward", "forward+backward")),
    ("S1", "mask", "float32", "forward", "torchvision"),
    ("S1", "mask", "float32", "forward", "mmcv"),
    ("S1", "-", "float32", "forward", "cudnn_nchw"),
    ("S1", "-", "float32", "forward", "cudnn_nhwc"),
    ("S1", "-", "float32", "backward", "cudnn_nchw"),
    ("S1", "mask", "bfloat16", "forward", "cupydcn"),
    ("S1", "-", "bfloat16", "forward", "cudnn_nchw"),
    ("S7", "nomask", "float16", "forward", "cupydcn"),
}
CASES = [
    pytest.param(*case, id="-".join(case), marks=[pytest.mark.smoke] if case in SMOKE else [])
    for case in shapes.cases(OP, shapes.CONV_IDS)
]
assert SMOKE <= {p.values for p in CASES}


@pytest.mark.parametrize("shape_id, variant, dtype, pass_, provider", CASES)
def test_deform_conv2d(bench, benchmark, shape_id, variant, dtype, pass_, provider):
    bench.run(benchmark, OP, shape_id, variant, dtype, pass_, provider)
