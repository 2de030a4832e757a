"""The workspace bound inside one image on the CUDA path (cupydcn/deform_conv/cuda_backend.py).

When one image's buffers exceed ``max(workspace_bytes, MIN_SLICE_BYTES)``, the images run
one at a time, split into ranges of output pixels (the conv kernels' ``pixel_start`` /
``pixel_count``). Here, with the ``launcher`` fixture (the emulator in CI, CuPy on a GPU):
the split gives the whole-image results (bitwise for what is not a sum over the ranges:
the columns, grad_offset and grad_mask from given column gradients; within the
tests/support.py bounds of the float64 reference for everything), with a ragged last
range, H/W-specific stride, padding and dilation, groups and offset groups, with and
without mask, every dtype, both index widths, every ``wrt`` subset and the deterministic
backward. The plans' sizes are pinned for shapes far above the budget, and on CuPy the
memory pool's high-water mark is held to the bound.

``MIN_SLICE_BYTES`` (4 MiB: images below it always run whole) is patched to 0 in the
emulated tests so that images of a few hundred bytes are split.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from cupydcn.deform_conv import cuda_backend as backend
from cupydcn.deform_conv import cuda_kernels as kernels
from cupydcn.deform_conv.spec import ConvGeometry
from support import DTYPE_NAMES, GRADS, on_device, to_numpy
from test_conv_emulated import CASES, Problem, assert_close, check_all, run_backward, run_forward

# The column path (im2col, GEMMs, col2im), not the depthwise kernels "auto" would pick
# for some of these small grouped cases.
pytestmark = pytest.mark.usefixtures("im2col_only")

# "grouped": 36 output pixels (4 x 9) in ranges of 7: 7, 7, 7, 7, 7, 1.
SPLIT_CASES = {
    "grouped": {**CASES["grouped"], "batch": 2, "with_bias": True},
    # 9 x 6 output pixels: ranges 7 x 7 and 5
    "dcnv1": {**CASES["dcnv1"], "batch": 2, "size": (13, 10)},
}
RANGE = 7
# grad_input's atomic kernels: shared-memory tiles, or grid-stride where a tile's window
# does not fit (cupydcn/deform_conv/cuda_kernels.py: col2im_tiling)
COL2IM_INPUT = {"deform_conv_col2im_input_tiled", "deform_conv_col2im_input"}


@pytest.fixture
def no_floor(monkeypatch):
    monkeypatch.setattr(backend, "MIN_SLICE_BYTES", 0)


def _forward_workspace(geom, dtype_name, pixels=RANGE):
    costs = backend.forward_costs(geom, dtype_name)
    return costs.per_range + pixels * costs.per_pixel


def _backward_workspace(geom, dtype_name, wrt=frozenset(GRADS), deterministic=False, pixels=RANGE):
    costs = backend.backward_costs(geom, dtype_name, frozenset(wrt), deterministic)
    return costs.per_range + pixels * costs.per_pixel


def _ranges(geom, width=RANGE):
    pixels = geom.out_h * geom.out_w
    return [min(width, pixels - s) for s in range(0, pixels, width)]


def test_costs_pinned():
    """The byte counts of the "grouped" case (C*K = 36 column rows, Co = 4, groups 2)."""
    geom = Problem("float32", **SPLIT_CASES["grouped"]).geom
    assert (geom.column_rows, geom.out_channels, geom.out_h * geom.out_w) == (36, 4, 36)
    # forward: the columns alone, in the element dtype (the GEMM writes the output, or a
    # range of it, in place)
    assert backend.forward_costs(geom, "float32") == (36 * 36 * 4, 36 * 4, 0)
    assert backend.forward_costs(geom, "float16") == (36 * 36 * 2, 36 * 2, 0)
    assert backend.forward_costs(geom, "float64").per_pixel == 36 * 8
    # backward: grad_columns (A) + the recomputed columns (element dtype) per pixel; the
    # GEMMs read grad_output in place and accumulate grad_weight into its result
    assert backend.backward_costs(geom, "float32", frozenset(GRADS), False)[1:] == (36 * 8, 0)
    assert backend.backward_costs(geom, "bfloat16", frozenset(GRADS), False)[1:] == (36 * 6, 0)
    # deterministic: 36 accumulation elements of slots per column element (16 bytes per
    # item + 4 contributions of 2 * (8 + 4) + 8 bytes = 144 bytes), and one image's
    # grad_input (6 * 7 * 9 floats) per range
    assert backend.backward_costs(geom, "float32", frozenset(GRADS), True)[1:] == (
        36 * (37 * 4 + 4),
        6 * 7 * 9 * 4,
    )


def _big_geometry(**overrides) -> ConvGeometry:
    base = dict(
        batch=2,
        in_channels=256,
        height=128,
        width=128,
        out_channels=256,
        groups=1,
        offset_groups=1,
        kernel_h=3,
        kernel_w=3,
        stride_h=1,
        stride_w=1,
        pad_h=1,
        pad_w=1,
        dil_h=1,
        dil_w=1,
        out_h=128,
        out_w=128,
        has_mask=True,
        has_bias=True,
    )
    base.update(overrides)
    return ConvGeometry(**base)


@pytest.mark.parametrize(
    "dtype_name, backward, deterministic, expected",
    [
        # 151 MB of columns per image (C*K = 2304, 16384 pixels) against 64 MiB: ranges of
        # 2^26 // (2304 * 4) = 7281 pixels (3 per image)
        ("float32", False, False, (7281, 7281 * 2304 * 4)),
        ("float16", False, False, (14563, 14563 * 2304 * 2)),
        # grad_columns and columns: 8 bytes per column element
        ("float32", True, False, (3640, 3640 * 2304 * 8)),
        # + 37 slot elements of 4 bytes, and 256 * 128 * 128 floats per range
        ("float32", True, True, (143, 2**24 + 143 * 2304 * 152)),
        # float64: 176 slot bytes = 22 elements, 8 bytes each; 2^25 bytes per range
        ("float64", True, True, (75, 2**25 + 75 * 2304 * 192)),
    ],
)
def test_plans_of_a_large_image_stay_within_budget(
    dtype_name, backward, deterministic, expected, host_launcher
):
    geom = dataclasses.replace(_big_geometry(), dtype_name=dtype_name)
    budget = 2**26
    if backward:
        plan = backend.backward_plan(
            host_launcher,
            geom,
            wrt=frozenset(GRADS),
            workspace_bytes=budget,
            deterministic=deterministic,
        )
    else:
        plan = backend.forward_plan(host_launcher, geom, workspace_bytes=budget)
    assert plan.split and plan.chunk == 1
    assert (plan.slice_pixels, plan.workspace_peak_bytes) == expected
    assert plan.workspace_peak_bytes <= budget
    assert plan.index_bits == 32


def test_issue_example_a_huge_image_is_split(host_launcher):
    """An image whose columns are 14.5 GiB (float32, C*K = 576, 2.6e7 pixels... here
    5120 x 5120 output pixels of 64 channels, 3x3): ranges within 2**26 bytes."""
    geom = _big_geometry(
        batch=1, in_channels=64, out_channels=64, height=5120, width=5120, out_h=5120, out_w=5120
    )
    whole = backend.forward_costs(geom, "float32").per_image
    assert whole == 576 * 5120 * 5120 * 4 > 14 * 2**30
    plan = backend.forward_plan(host_launcher, geom, workspace_bytes=2**26)
    assert plan.split and plan.slice_pixels == 2**26 // (576 * 4) == 29127
    assert plan.workspace_peak_bytes <= 2**26
    # 64-bit indices for the whole-image columns, but a range fits 32-bit ones
    assert backend.index_bits_for(geom, 1) == 64 and plan.index_bits == 32


def test_small_images_run_whole(host_launcher):
    """Below MIN_SLICE_BYTES an image is never split, whatever the workspace (the
    common case, as before the split existed); above it, ranges of that size."""
    geom = _big_geometry(
        batch=3, in_channels=16, height=32, width=32, out_h=32, out_w=32, out_channels=16
    )
    assert backend.forward_costs(geom, "float32").per_image < backend.MIN_SLICE_BYTES
    plan = backend.forward_plan(host_launcher, geom, workspace_bytes=1)
    assert not plan.split and plan.chunk == 1 and plan.slice_pixels == 1024
    geom = _big_geometry(batch=3, in_channels=128, height=64, width=64, out_h=64, out_w=64)
    plan = backend.forward_plan(host_launcher, geom, workspace_bytes=1)
    assert plan.split and plan.workspace_peak_bytes <= backend.MIN_SLICE_BYTES
    assert plan.slice_pixels == backend.MIN_SLICE_BYTES // (1152 * 4) == 910


@pytest.mark.parametrize("index_bits", [None, 64], ids=["auto-index", "index64"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_split_matches_reference(launcher, no_floor, case, dtype_name, index_bits):
    problem = Problem(dtype_name, **SPLIT_CASES[case])
    geom = problem.geom
    expected = problem.expected()
    start = len(launcher.launches)
    output = run_forward(
        launcher,
        problem,
        index_bits=index_bits,
        workspace_bytes=_forward_workspace(geom, dtype_name),
    )
    im2col = [r.total for r in launcher.launches[start:] if r.kernel == "deform_conv_im2col"]
    assert im2col == [geom.in_channels * p for p in _ranges(geom)] * geom.batch
    start = len(launcher.launches)
    grads = run_backward(
        launcher,
        problem,
        index_bits=index_bits,
        workspace_bytes=_backward_workspace(geom, dtype_name),
    )
    launched = launcher.launches[start:]
    coord = [r.total for r in launched if r.kernel == "deform_conv_col2im_coord"]
    per_pixel = geom.offset_groups * geom.taps
    assert coord == [per_pixel * p for p in _ranges(geom)] * geom.batch
    col2im = [r.total for r in launched if r.kernel in COL2IM_INPUT]
    assert col2im == [geom.column_rows * p for p in _ranges(geom)] * geom.batch
    assert {r.index_bits for r in launched} == {index_bits or 32}
    check_all(problem, output, grads, expected)


@pytest.mark.parametrize("dtype_name", ["float64", "float32", "bfloat16"])
def test_split_kernels_bitwise_whole(launcher, dtype_name):
    """The kernels over ranges of pixels write what the whole-image launch writes, bit
    for bit: columns (im2col), grad_offset and grad_mask (col2im_coord) from the same
    grad_columns. (Only grad_input's atomics and the GEMMs' sums change order.)"""
    problem = Problem(dtype_name, **SPLIT_CASES["grouped"])
    geom = problem.geom
    xp = launcher.xp
    pixels = geom.out_h * geom.out_w
    plan = backend.forward_plan(launcher, geom, workspace_bytes=1 << 30)
    input, offset, _, _, mask = on_device(launcher, *problem.arrays())
    acc = plan.acc_dtype
    whole = xp.empty((geom.batch, geom.column_rows, pixels), dtype=plan.column_dtype)
    kernels.launch_im2col(
        launcher,
        plan.types,
        geom,
        input=input,
        offset=offset,
        mask=mask,
        columns=whole,
        images=geom.batch,
    )
    rng = np.random.default_rng(5)
    grad_columns = xp.asarray(rng.standard_normal(whole.shape).astype(acc))
    grad_offset = xp.empty(geom.offset_shape, dtype=input.dtype)
    grad_mask = xp.empty(geom.mask_shape, dtype=input.dtype)
    kernels.launch_col2im_coord(
        launcher,
        plan.types,
        geom,
        grad_columns=grad_columns,
        input=input,
        offset=offset,
        mask=mask,
        grad_offset=grad_offset,
        grad_mask=grad_mask,
        images=geom.batch,
    )
    split_offset = xp.full(geom.offset_shape, np.nan, dtype=input.dtype)
    split_mask = xp.full(geom.mask_shape, np.nan, dtype=input.dtype)
    for b, first in itertools.product(range(geom.batch), range(0, pixels, RANGE)):
        count = min(RANGE, pixels - first)
        part = xp.empty((1, geom.column_rows, count), dtype=plan.column_dtype)
        kernels.launch_im2col(
            launcher,
            plan.types,
            geom,
            input=input[b : b + 1],
            offset=offset[b : b + 1],
            mask=mask[b : b + 1],
            columns=part,
            images=1,
            pixels=(first, count),
        )
        np.testing.assert_array_equal(
            to_numpy(part)[0], to_numpy(whole)[b, :, first : first + count]
        )
        part_grad = xp.ascontiguousarray(grad_columns[b : b + 1, :, first : first + count])
        kernels.launch_col2im_coord(
            launcher,
            plan.types,
            geom,
            grad_columns=part_grad,
            input=input[b : b + 1],
            offset=offset[b : b + 1],
            mask=mask[b : b + 1],
            grad_offset=split_offset[b : b + 1],
            grad_mask=split_mask[b : b + 1],
            images=1,
            pixels=(first, count),
        )
    for got, want in ((split_offset, grad_offset), (split_mask, grad_mask)):
        got, want = to_numpy(got), to_numpy(want)
        assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_split_forward_equals_whole(launcher, no_floor, dtype_name):
    """Forward over ranges against the whole image: within the reference bound, and bit
    for bit on the emulator (NumPy's matmul sums each output in the same order)."""
    problem = Problem(dtype_name, **SPLIT_CASES["grouped"])
    whole = run_forward(launcher, problem)
    split = run_forward(
        launcher, problem, workspace_bytes=_forward_workspace(problem.geom, dtype_name)
    )
    _check_one(problem, "output", split, problem.expected())
    if launcher.xp is np:
        assert split.tobytes() == whole.tobytes()


@pytest.mark.parametrize("with_mask", [True, False])
def test_split_wrt_subsets(launcher, no_floor, with_mask):
    problem = Problem("float32", **{**SPLIT_CASES["grouped"], "with_mask": with_mask})
    expected = problem.expected()
    subsets = [frozenset(s) for r in (1, 2) for s in itertools.combinations(GRADS, r)]
    for wrt in subsets:
        workspace = _backward_workspace(problem.geom, "float32", wrt)
        plan = backend.backward_plan(launcher, problem.geom, wrt=wrt, workspace_bytes=workspace)
        # wrt={bias} (or {mask} without one) needs no buffers: nothing to split
        needs_buffers = backend.backward_costs(problem.geom, "float32", wrt, False).per_image
        assert plan.split == (needs_buffers > 0)
        assert plan.slice_pixels == (RANGE if needs_buffers else 36)
        grads = run_backward(launcher, problem, wrt=wrt, workspace_bytes=workspace)
        for name, got in zip(GRADS, grads):
            if name in wrt and expected[name] is not None:
                _check_one(problem, name, got, expected)
            else:
                assert got is None, (wrt, name)


def _check_one(problem, name, got, expected):
    assert_close(got, expected[name], problem.dtype_name, name)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_split_deterministic_backward(launcher, no_floor, dtype_name):
    """deterministic=True over ranges: the reference's values, the same bits on every
    run, no atomics launched; the slot passes run per range."""
    problem = Problem(dtype_name, **SPLIT_CASES["grouped"])
    geom = problem.geom
    workspace = _backward_workspace(geom, dtype_name, deterministic=True)
    plan = backend.backward_plan(
        launcher, geom, wrt=frozenset(GRADS), workspace_bytes=workspace, deterministic=True
    )
    assert plan.split and plan.slice_pixels == RANGE

    def run():
        arrays = on_device(
            launcher,
            problem.grad_output,
            problem.input,
            problem.offset,
            problem.weight,
            problem.mask,
        )
        start = len(launcher.launches)
        grads = backend.conv_backward(
            launcher,
            *arrays,
            geom,
            wrt=frozenset(GRADS),
            workspace_bytes=workspace,
            deterministic=True,
        )
        kernels = [r.kernel for r in launcher.launches[start:]]
        return tuple(to_numpy(g) for g in grads), kernels

    first, kernels = run()
    second, _ = run()
    assert not COL2IM_INPUT & set(kernels)
    assert kernels.count("deform_conv_col2im_input_slots") == 2 * len(_ranges(geom)) * geom.batch
    expected = problem.expected()
    for name, got, again in zip(GRADS, first, second):
        assert got.tobytes() == again.tobytes(), name
        _check_one(problem, name, got, expected)


# ---------------------------------------------------------------- on a GPU: the pool's peak


def _pool_peak(cupy, call):
    """Bytes a fresh memory pool holds at its peak during ``call()`` (the pool keeps
    every block it allocated, so after the call total_bytes is the high-water mark of
    what was live at once, up to block rounding), less what the arguments held."""
    pool = cupy.cuda.MemoryPool()
    with cupy.cuda.using_allocator(pool.malloc):
        args = call(None)
        cupy.cuda.Device().synchronize()
        before = pool.total_bytes()
        result = call(args)
        cupy.cuda.Device().synchronize()
        peak = pool.total_bytes() - before
        del result
    return peak


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_pool_high_water_mark_within_bound(dtype_name, backward):
    """64 channels, 3x3, 96 x 96: 21 MiB of float32 columns per image against a workspace
    of 4 MiB (= MIN_SLICE_BYTES)."""
    import cupy

    from cupydcn.cuda.cupy_launcher import cupy_launcher

    launcher = cupy_launcher()
    problem = Problem(
        dtype_name, batch=2, channels=64, size=(96, 96), out_channels=64, kernel=(3, 3), padding=1
    )
    geom = problem.geom
    budget = 4 << 20
    results = 0
    if backward:
        plan = backend.backward_plan(launcher, geom, wrt=frozenset(GRADS), workspace_bytes=budget)
        acc = 4
        item = np.dtype(problem.input.dtype).itemsize
        results = (
            sum(
                int(np.prod(s))
                for s in (geom.input_shape, geom.offset_shape, geom.mask_shape, geom.weight_shape)
            )
            * item
            + (int(np.prod(geom.input_shape)) + int(np.prod(geom.weight_shape)) + geom.out_channels)
            * acc
            * 2
        )
    else:
        plan = backend.forward_plan(launcher, geom, workspace_bytes=budget)
        results = int(np.prod(geom.output_shape)) * np.dtype(problem.input.dtype).itemsize
    assert plan.split
    widened = (int(np.prod(geom.weight_shape)) + geom.out_channels) * 4

    def call(args):
        if args is None:
            return [
                None if a is None else cupy.asarray(a)
                for a in (
                    problem.input,
                    problem.offset,
                    problem.weight,
                    problem.bias,
                    problem.mask,
                    problem.grad_output,
                )
            ]
        input, offset, weight, bias, mask, grad_output = args
        if backward:
            return backend.conv_backward(
                launcher,
                grad_output,
                input,
                offset,
                weight,
                mask,
                geom,
                wrt=frozenset(GRADS),
                workspace_bytes=budget,
            )
        return backend.conv_forward(
            launcher, input, offset, weight, bias, mask, geom, workspace_bytes=budget
        )

    peak = _pool_peak(cupy, call)
    assert peak <= plan.workspace_peak_bytes + results + widened + backend.WORKSPACE_CONSTANT
