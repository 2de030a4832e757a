"""The fused data gradient of deform_conv2d for the half types
(cupydcn/cuda/kernels/deform_conv_fused_backward.cu through
cupydcn/deform_conv/fused_backward_cuda.py), run by the emulator and, with the
``launcher`` fixture's ``cupy`` variant, on a GPU.

Per case (tile edges: C_out 1, 17, 40 (two MMA steps, ragged); pixels 1, 42, 65; channel
chunks of 32 + 8; groups 2 and 3; offset groups 2, 3 and 4, dividing C / groups or
straddling weight groups; stride, dilation and padding different in H and W; non-square
kernels; every padding mode; DCNv1; offsets far out of the map, infinite and NaN), in
float16 and bfloat16 and both index widths, grad_input (float32 accumulator), grad_offset
and grad_mask against the column path (cuda_backend.conv_backward, algorithm "im2col", on
the same launcher) and against the NumPy backend, within one rounding to the element
dtype plus float32 accumulation; NaN where they have NaN. Emulator only: grad_offset and
grad_mask are bitwise the same in forward, reverse and shuffled thread orders.

Emulator builds: one g++ build of the file per (dtype, index width): 4.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import pytest

import fused_problems
from cupydcn.cuda.launch import NullLauncher, kernel_types, record_calls
from cupydcn.deform_conv import cuda_backend, fused_backward_cuda, numpy_backend
from fused_problems import BIG_WORKSPACE, TYPES, Problem, problems_fixture
from support import on_device, to_numpy

emulated = pytest.mark.emulated

# Unit roundoff of the element dtypes.
EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


# The data gradients have no bias (grad_bias is not theirs): one image unless a case says.
Case = partial(fused_problems.Case, with_bias=False)
SEED = "fused-backward"

CASES = {
    # 42 pixels (one ragged tile), C_out 17 (one ragged MMA step), two images
    "base": Case(16, 17, (6, 7), batch=2),
    # 65 pixels (two tiles, one pixel in the second), C 40 (chunks of 32 and 8), C_out 40
    # (MMA steps of 32 and 8)
    "p65-c40": Case(40, 40, (5, 13), kernel=(1, 1), padding=(0, 0)),
    # one output pixel, C_out 1
    "p1-co1": Case(8, 1, (3, 3), padding=(0, 0)),
    # groups 2 with offset groups 2; non-square kernel, H/W-specific stride, padding and
    # dilation; DCNv1
    "groups2": Case(
        16,
        34,
        (9, 8),
        kernel=(2, 3),
        groups=2,
        offset_groups=2,
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        with_mask=False,
    ),
    # offset groups straddling weight groups (cg 12, cpg 8), and the other way (cg 8,
    # cpg 12), and 4 offset groups in one weight group (kernel 3 x 1)
    "straddle": Case(24, 18, (5, 6), groups=2, offset_groups=3),
    "g3-og2": Case(24, 21, (4, 5), groups=3, offset_groups=2, kernel=(2, 2), padding=(0, 1)),
    "og4": Case(32, 18, (5, 6), offset_groups=4, kernel=(3, 1), padding=(1, 0)),
    "border": Case(8, 17, (6, 7), padding_mode="border", offset_scale=4.0),
    "reflection": Case(8, 17, (6, 7), padding_mode="reflection", offset_scale=4.0),
    "far": Case(8, 17, (7, 8), offset_scale=7.0, edge_points=True),
}
CHECKS = [(name, d, b) for name in sorted(CASES) for d, b in TYPES]
CHECK_IDS = [f"{n}-{d}-i{b}" for n, d, b in CHECKS]


problems = problems_fixture(CASES, SEED)


def _wrt(problem: Problem) -> frozenset[str]:
    return frozenset({"input", "offset"} | ({"mask"} if problem.case.with_mask else set()))


def fused_data(launcher, problem: Problem, index_bits: int, *, launcher_for_arrays=None):
    """(grad_input float32, grad_offset, grad_mask or None) from the fused kernel."""
    geom = problem.geom
    types = kernel_types(launcher, problem.dtype_name, index_bits)
    a = problem.arrays
    xp = launcher.xp
    grad_output, input, offset, weight, mask = on_device(
        launcher, problem.grad_output, a["input"], a["offset"], a["weight"], a["mask"]
    )
    grad_input = xp.zeros(geom.input_shape, dtype=np.float32)
    # NaN-filled: every element must be written
    grad_offset = xp.asarray(np.full(a["offset"].shape, np.nan, a["offset"].dtype))
    grad_mask = (
        None if mask is None else xp.asarray(np.full(a["mask"].shape, np.nan, a["mask"].dtype))
    )
    fused_backward_cuda.launch_fused_data_backward(
        launcher,
        types,
        geom,
        grad_output=grad_output,
        input=input,
        offset=offset,
        weight=weight,
        mask=mask,
        grad_input_acc=grad_input,
        grad_offset=grad_offset,
        grad_mask=grad_mask,
    )
    return (
        to_numpy(grad_input),
        to_numpy(grad_offset),
        None if grad_mask is None else to_numpy(grad_mask),
    )


def column_path_data(launcher, problem: Problem, index_bits: int):
    a = problem.arrays
    arrays = on_device(
        launcher, problem.grad_output, a["input"], a["offset"], a["weight"], a["mask"]
    )
    grads = cuda_backend.conv_backward(
        launcher,
        *arrays,
        problem.geom,
        wrt=_wrt(problem),
        workspace_bytes=BIG_WORKSPACE,
        index_bits=index_bits,
        algorithm="im2col",
    )
    return tuple(
        None if g is None else to_numpy(g)
        for g in (grads.grad_input, grads.grad_offset, grads.grad_mask)
    )


def numpy_data(problem: Problem):
    a = problem.arrays
    grads = numpy_backend.conv_backward(
        problem.grad_output,
        a["input"],
        a["offset"],
        a["weight"],
        a["mask"],
        problem.geom,
        wrt=_wrt(problem),
        workspace_bytes=BIG_WORKSPACE,
    )
    return grads.grad_input, grads.grad_offset, grads.grad_mask


def assert_agrees(got, want, dtype_name: str, what: str, *, slack: float = 1e-3) -> None:
    """|got - want| <= 2 eps_T |want| + slack * max |want| elementwise (one rounding to T
    on either side plus float32 accumulation in different orders), NaN where want is."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN pattern")
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), finite), f"{what}: inf pattern"
    np.testing.assert_array_equal(got[~finite & ~nan], want[~finite & ~nan], err_msg=what)
    g, w = got[finite], want[finite]
    scale = float(np.max(np.abs(w), initial=0.0)) or 1.0
    bound = 2 * EPS[dtype_name] * np.abs(w) + slack * scale
    err = np.abs(g - w)
    worst = int(np.argmax(err - bound)) if err.size else 0
    assert np.all(err <= bound), (
        f"{what}: |error| {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst} "
        f"(got {g[worst]!r}, want {w[worst]!r}, scale {scale:.3g})"
    )


# ---------------------------------------------------------------------------- pure Python


def _geom(case: Case, dtype_name: str = "float16"):
    return Problem(case, dtype_name, SEED).geom


def test_channel_chunks():
    assert fused_backward_cuda.channel_chunks(_geom(CASES["p65-c40"])) == [(0, 0, 32), (0, 32, 8)]
    # cg 12, cpg 8: offset group 1 straddles the weight groups at channel 12
    assert fused_backward_cuda.channel_chunks(_geom(CASES["straddle"])) == [
        (0, 0, 8),
        (1, 8, 4),
        (1, 12, 4),
        (2, 16, 8),
    ]
    # cg 8, cpg 12
    assert fused_backward_cuda.channel_chunks(_geom(CASES["g3-og2"])) == [
        (0, 0, 8),
        (0, 8, 4),
        (1, 12, 4),
        (1, 16, 8),
    ]


def test_applicability_rule():
    fb = fused_backward_cuda
    geom = _geom(Case(64, 64, (8, 8)))
    assert fb.fused_data_applies(geom, "float16") and fb.fused_data_applies(geom, "bfloat16")
    assert not fb.fused_data_applies(geom, "float32")
    assert not fb.fused_data_supports(geom, "float64")
    assert fb.fused_data_supports(_geom(CASES["p1-co1"]), "float16")
    assert not fb.fused_data_applies(_geom(CASES["p1-co1"]), "float16")  # C_out 1 < 16
    # chunks of 4 channels on average (cpg 4): supported, not chosen
    thin = _geom(Case(32, 32, (4, 4), offset_groups=8))
    assert fb.fused_data_supports(thin, "float16") and not fb.fused_data_applies(thin, "float16")
    assert fb.SHARED_BYTES <= 48 * 1024
    assert fb.fused_data_supported(80) and not fb.fused_data_supported(75)


def test_launch_shape():
    geom = _geom(CASES["p65-c40"])
    shape = fused_backward_cuda.backward_data_shape(geom, 1)
    assert shape.grid == (2, 1, 1) and shape.block == (256, 1, 1)
    assert shape.shared_bytes == 27136
    assert shape.sizes == {"batch": 1, "padding_mode": 0}
    base = _geom(CASES["base"])
    assert fused_backward_cuda.backward_data_shape(base, 2).grid == (1, 9, 2)
    big = replace(base, batch=70000)
    assert fused_backward_cuda.backward_data_shape(big, 70000).grid == (1, 9, 65535)


def test_refuses_and_records():
    launcher = NullLauncher()
    problem = Problem(CASES["base"], "float16", SEED)
    a, geom = problem.arrays, problem.geom
    kwargs = dict(
        grad_output=problem.grad_output,
        input=a["input"],
        offset=a["offset"],
        weight=a["weight"],
        mask=a["mask"],
        grad_input_acc=np.zeros(geom.input_shape, np.float32),
        grad_offset=np.empty_like(a["offset"]),
        grad_mask=np.empty_like(a["mask"]),
    )
    with pytest.raises(ValueError, match="float16"):
        fused_backward_cuda.launch_fused_data_backward(
            launcher, kernel_types(launcher, "float32", 32), geom, **kwargs
        )
    with pytest.raises(ValueError, match="DCNv1"):
        fused_backward_cuda.launch_fused_data_backward(
            launcher, kernel_types(launcher, "float16", 32), geom, **{**kwargs, "mask": None}
        )
    with record_calls() as calls:
        fused_backward_cuda.launch_fused_data_backward(
            launcher, kernel_types(launcher, "float16", 32), geom, **kwargs
        )
    shape = fused_backward_cuda.backward_data_shape(geom, 2)
    assert [s[0] for s in calls.sequence] == [fused_backward_cuda.KERNEL]
    assert calls.sequence[0][2:] == (shape.grid, shape.block)
    assert calls.workspace == [] and calls.gemm_count == 0


# ---------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("name, dtype_name, index_bits", CHECKS, ids=CHECK_IDS)
def test_against_column_path_and_numpy(launcher, problems, name, dtype_name, index_bits):
    problem = problems(name, dtype_name)
    got = fused_data(launcher, problem, index_bits)
    column = column_path_data(launcher, problem, index_bits)
    if index_bits == 32:  # the NumPy backend once per dtype
        references = {"column path": column, "numpy": numpy_data(problem)}
    else:
        references = {"column path": column}
    for ref_name, ref in references.items():
        for what, g, w in zip(("grad_input", "grad_offset", "grad_mask"), got, ref, strict=True):
            if w is None:
                assert g is None, what
                continue
            assert_agrees(
                g, w, dtype_name, f"{name} {dtype_name} i{index_bits} {what} vs {ref_name}"
            )


@emulated
@pytest.mark.parametrize("name", ["base", "straddle", "far"])
def test_order_independent(host_launcher, problems, name):
    from emulator.host_launcher import assert_order_independent

    problem = problems(name, "bfloat16")
    grad_inputs = []

    def run(launcher):
        grad_input, grad_offset, grad_mask = fused_data(launcher, problem, 32)
        grad_inputs.append(grad_input)
        return (grad_offset,) if grad_mask is None else (grad_offset, grad_mask)

    assert_order_independent(run)
    for other in grad_inputs[1:]:  # atomics: the same within float32 reordering
        np.testing.assert_allclose(other, grad_inputs[0], rtol=1e-5, atol=1e-5)
