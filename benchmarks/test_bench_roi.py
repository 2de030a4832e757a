"""deform_roi_pool (R1: cupydcn with and without the modulation mask, torchvision
roi_align(aligned=True) as the speed of light (no mask: its rows "-" stand for both), mmcv) and deform_psroi_pool (R2: cupydcn,
torchvision ps_roi_align as the speed of light), × float32/float16/bfloat16 ×
forward/backward/forward+backward."""

from __future__ import annotations

import pytest

import shapes

SMOKE = {
    ("R1", "mask", "float32", "forward", "cupydcn"),
    ("R1", "mask", "float32", "backward", "cupydcn"),
    ("R1", "-", "float32", "forward", "roi_align"),
    ("R1", "nomask", "float32", "forward", "mmcv"),
    ("R2", "-", "float32", "forward", "cupydcn"),
    ("R2", "-", "float32", "backward", "cupydcn"),
    ("R2", "-", "float32", "forward", "ps_roi_align"),
}


def _cases(op, ids):
    return [
        pytest.param(*case, id="-".join(case), marks=[pytest.mark.smoke] if case in SMOKE else [])
        for case in shapes.cases(op, ids)
    ]


ROI_CASES = _cases("deform_roi_pool", shapes.ROI_IDS)
PSROI_CASES = _cases("deform_psroi_pool", shapes.PSROI_IDS)
assert SMOKE <= {p.values for p in ROI_CASES + PSROI_CASES}


@pytest.mark.parametrize("shape_id, variant, dtype, pass_, provider", ROI_CASES)
def test_deform_roi_pool(bench, benchmark, shape_id, variant, dtype, pass_, provider):
    bench.run(benchmark, "deform_roi_pool", shape_id, variant, dtype, pass_, provider)


@pytest.mark.parametrize("shape_id, variant, dtype, pass_, provider", PSROI_CASES)
def test_deform_psroi_pool(bench, benchmark, shape_id, variant, dtype, pass_, provider):
    bench.run(benchmark, "deform_psroi_pool", shape_id, variant, dtype, pass_, provider)
