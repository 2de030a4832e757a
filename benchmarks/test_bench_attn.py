"""The deformable-attention family: multi_scale_deformable_attn (A1 Deformable DETR
encoder, Lq = S; A2 decoder, 300 queries), dcnv3 (D3) and dcnv4 (D4) on an
InternImage-T-like layer, × float32/float16/bfloat16 × forward/backward/forward+backward
× cupydcn, the upstream pure-PyTorch references ("grid_sample": mmcv's
multi_scale_deformable_attn_pytorch and InternImage's dcnv3_core_pytorch math, written in
``cupydcn/cli/bench/calls.py``) and mmcv's CUDA multi-scale deformable attention (listed
as not run where it cannot be imported).

The shapes are ``cupydcn.cli.bench.ATTN_SHAPES`` (full size) and ``ATTN_SHAPES_CPU``
(scaled down: the CPU runs the NumPy backend, and the grid_sample references on PyTorch's
CPU with ``--bench-cpu-peers``). None of these ops has a mask / no-mask choice: every
row's variant is "-".
"""

from __future__ import annotations

import pytest

import shapes
from cupydcn.cli import bench as _bench

MSDA_IDS = tuple(i for i, s in _bench.ATTN_SHAPES.items() if s.op == "multi_scale_deformable_attn")
DCNV3_IDS = tuple(i for i, s in _bench.ATTN_SHAPES.items() if s.op == "dcnv3")
DCNV4_IDS = tuple(i for i, s in _bench.ATTN_SHAPES.items() if s.op == "dcnv4")

# Smoke cases (CI's CPU run, tests/test_bench_smoke.py): none yet — that test counts the
# cupydcn smoke records against its SMOKE_ROWS, so a case marked here needs its row there
# too, e.g. ("A2", "-", "float32", "forward", "cupydcn") and
# ("A2", "-", "float32", "forward", "grid_sample") here with
# "multi_scale_deformable_attn": [("A2", "-", "float32", "forward")] there.
SMOKE: set[tuple[str, str, str, str, str]] = {
    ("A2", "-", "float32", "forward", "cupydcn"),
    ("A2", "-", "float32", "forward", "grid_sample"),
}


def _cases(op, ids):
    return [
        pytest.param(*case, id="-".join(case), marks=[pytest.mark.smoke] if case in SMOKE else [])
        for case in shapes.cases(op, ids)
    ]


MSDA_CASES = _cases("multi_scale_deformable_attn", MSDA_IDS)
DCNV3_CASES = _cases("dcnv3", DCNV3_IDS)
DCNV4_CASES = _cases("dcnv4", DCNV4_IDS)
assert SMOKE <= {p.values for p in MSDA_CASES + DCNV3_CASES + DCNV4_CASES}


@pytest.mark.parametrize("shape_id, variant, dtype, pass_, provider", MSDA_CASES)
def test_multi_scale_deformable_attn(bench, benchmark, shape_id, variant, dtype, pass_, provider):
    bench.run(benchmark, "multi_scale_deformable_attn", shape_id, variant, dtype, pass_, provider)


@pytest.mark.parametrize("shape_id, variant, dtype, pass_, provider", DCNV3_CASES)
def test_dcnv3(bench, benchmark, shape_id, variant, dtype, pass_, provider):
    bench.run(benchmark, "dcnv3", shape_id, variant, dtype, pass_, provider)


@pytest.mark.parametrize("shape_id, variant, dtype, pass_, provider", DCNV4_CASES)
def test_dcnv4(bench, benchmark, shape_id, variant, dtype, pass_, provider):
    bench.run(benchmark, "dcnv4", shape_id, variant, dtype, pass_, provider)
