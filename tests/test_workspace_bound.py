"""The workspace bound inside one image (NumPy deform_conv2d backend).

When one image's temporaries exceed ``max(workspace_bytes, MIN_BLOCK_BYTES)`` the backend
cuts it into blocks of output pixels read from tiles of the bordered map
(cupydcn/deform_conv/numpy_backend.py). Here: the split gives the unsplit results (every
padding mode, non-finite offsets, groups, half dtypes, partial ``wrt``), each kind of tile
is used, and tracemalloc pins the peak of the temporaries to ``workspace_bytes +
WORKSPACE_SLACK_BYTES`` for shapes whose column buffer is far above the budget.
"""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest

from cupydcn.deform_conv import numpy_backend as backend
from cupydcn.deform_conv.spec import conv_geometry

# The column path (im2col, GEMMs, col2im), not the depthwise kernels "auto" would pick
# for some of these small grouped cases.
pytestmark = pytest.mark.usefixtures("im2col_only")

ALL = frozenset(backend.GRADIENT_NAMES)
BIG = 1 << 34
FLOAT64 = np.dtype(np.float64)


def make(
    rng,
    *,
    n=2,
    c=4,
    c_out=3,
    h=9,
    w=11,
    k=(3, 3),
    stride=1,
    padding=1,
    dilation=1,
    groups=1,
    offset_groups=1,
    mask=True,
    bias=True,
    spread=3.0,
    dtype=np.float64,
):
    kh, kw = k
    (sh, sw), (ph, pw), (dh, dw) = (
        v if isinstance(v, tuple) else (v, v) for v in (stride, padding, dilation)
    )
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    taps = kh * kw
    arrays = {
        "input": rng.standard_normal((n, c, h, w)),
        "offset": spread * rng.standard_normal((n, 2 * offset_groups * taps, out_h, out_w)),
        "weight": rng.standard_normal((c_out, c // groups, kh, kw)),
        "bias": rng.standard_normal(c_out) if bias else None,
        "mask": rng.random((n, offset_groups * taps, out_h, out_w)) if mask else None,
    }
    arrays = {key: None if a is None else a.astype(dtype) for key, a in arrays.items()}
    options = dict(stride=stride, padding=padding, dilation=dilation)
    return arrays, options


def geometry(arrays, options, padding_mode="zeros"):
    return conv_geometry(
        arrays["input"],
        arrays["offset"],
        arrays["weight"],
        arrays["bias"],
        arrays["mask"],
        padding_mode=padding_mode,
        **options,
    )


def forward(arrays, geom, workspace_bytes):
    return backend.conv_forward(
        arrays["input"],
        arrays["offset"],
        arrays["weight"],
        arrays["bias"],
        arrays["mask"],
        geom,
        workspace_bytes=workspace_bytes,
    )


def backward(grad_output, arrays, geom, workspace_bytes, wrt=ALL):
    return backend.conv_backward(
        grad_output,
        arrays["input"],
        arrays["offset"],
        arrays["weight"],
        arrays["mask"],
        geom,
        wrt=wrt,
        workspace_bytes=workspace_bytes,
    )


@pytest.fixture
def no_minimum(monkeypatch):
    """Let tiny budgets split tiny images (the backend never cuts below MIN_BLOCK_BYTES)."""
    monkeypatch.setattr(backend, "MIN_BLOCK_BYTES", 0)


def budgets_for(geom, acc=FLOAT64):
    """Budgets that give: a few blocks per image, blocks of a few pixels (bounding-box
    tiles), and tiles too small for a block's footprint (the grid: bands, squares)."""
    per_image = backend._working_bytes_per_image(geom, acc, backward=True)
    per_pixel, per_corner = backend._block_costs(geom, acc, backward=True)
    bordered_w = geom.width + 2 * backend._MARGIN
    return sorted(
        {
            per_image // 3,
            8 * per_pixel + 2 * per_corner * 3 * bordered_w,  # bands of 2 cell rows
            4 * per_pixel + 2 * per_corner * 9,  # squares of 2 x 2 cells
            1,  # one pixel, 1 x 1 cells
        }
    )


def assert_same(split, whole, rtol=1e-12):
    np.testing.assert_allclose(split, whole, rtol=rtol, atol=rtol, equal_nan=True)


@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("case", ["plain", "strided_grouped", "no_mask_no_bias", "far"])
def test_split_matches_whole(no_minimum, padding_mode, case):
    rng = np.random.default_rng(abs(hash((padding_mode, case))) % 2**32)
    kwargs = {
        "plain": {},
        "strided_grouped": dict(
            c=6,
            c_out=4,
            k=(2, 3),
            stride=(2, 1),
            padding=(1, 2),
            dilation=(1, 2),
            groups=2,
            offset_groups=3,
        ),
        "no_mask_no_bias": dict(mask=False, bias=False, n=1),
        "far": dict(spread=20.0),
    }[case]
    arrays, options = make(rng, **kwargs)
    geom = geometry(arrays, options, padding_mode)
    grad_output = rng.standard_normal(geom.output_shape)
    whole_out = forward(arrays, geom, BIG)
    whole_grads = backward(grad_output, arrays, geom, BIG)
    assert backend._plan(geom, np.dtype(np.float64), BIG, backward=True).whole_images
    for budget in budgets_for(geom):
        assert not backend._plan(geom, np.dtype(np.float64), budget, backward=True).whole_images
        assert_same(forward(arrays, geom, budget), whole_out)
        for split, whole in zip(backward(grad_output, arrays, geom, budget), whole_grads):
            assert (split is None) == (whole is None)
            if whole is not None:
                assert_same(split, whole)


def test_split_nonfinite_offsets(no_minimum):
    """NaN points sample NaN and have NaN offset gradients, infinite ones sample 0; the
    input gradient stays finite (their gradients land in the cropped border)."""
    rng = np.random.default_rng(5)
    arrays, options = make(rng, n=1)
    offset = arrays["offset"]
    offset[0, 0, 0, 0] = np.inf
    offset[0, 3, 1, 1] = -np.inf
    offset[0, 4, 2, 2] = np.nan
    offset[0, 7, 4, 5] = 1e9
    geom = geometry(arrays, options)
    grad_output = rng.standard_normal(geom.output_shape)
    whole_out = forward(arrays, geom, BIG)
    whole_grads = backward(grad_output, arrays, geom, BIG)
    assert np.isnan(whole_out[0, :, 2, 2]).all()
    for budget in budgets_for(geom):
        assert_same(forward(arrays, geom, budget), whole_out)
        grads = backward(grad_output, arrays, geom, budget)
        assert np.isfinite(grads.grad_input).all()
        for split, whole in zip(grads, whole_grads):
            if whole is not None:
                assert_same(split, whole)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_split_low_precision(no_minimum, dtype):
    """float32 and float16 (computed in float32; the split sums one image's input gradient
    in a float32 accumulator and rounds it once)."""
    rng = np.random.default_rng(7)
    arrays, options = make(rng, n=2, dtype=dtype)
    geom = geometry(arrays, options)
    grad_output = rng.standard_normal(geom.output_shape).astype(dtype)
    whole_out = forward(arrays, geom, BIG)
    whole_grads = backward(grad_output, arrays, geom, BIG)
    tol = 1e-5 if dtype == np.float32 else 4e-3
    for budget in budgets_for(geom, np.dtype(np.float32)):
        out = forward(arrays, geom, budget)
        assert out.dtype == dtype
        np.testing.assert_allclose(
            out.astype(np.float64),
            whole_out.astype(np.float64),
            rtol=tol,
            atol=tol * np.abs(whole_out).max(),
        )
        for split, whole in zip(backward(grad_output, arrays, geom, budget), whole_grads):
            if whole is not None:
                assert split.dtype == dtype
                scale = max(float(np.abs(whole.astype(np.float64)).max()), 1.0)
                np.testing.assert_allclose(
                    split.astype(np.float64), whole.astype(np.float64), rtol=tol, atol=tol * scale
                )


@pytest.mark.parametrize("wrt", [{"input"}, {"weight"}, {"offset", "mask"}, {"bias"}])
def test_split_partial_gradients(no_minimum, wrt):
    rng = np.random.default_rng(11)
    arrays, options = make(rng)
    geom = geometry(arrays, options)
    grad_output = rng.standard_normal(geom.output_shape)
    whole = backward(grad_output, arrays, geom, BIG, frozenset(wrt))
    for budget in budgets_for(geom):
        split = backward(grad_output, arrays, geom, budget, frozenset(wrt))
        for name, a, b in zip(("input", "offset", "weight", "mask", "bias"), split, whole):
            assert (a is None) == (b is None) == (name not in wrt)
            if b is not None:
                assert_same(a, b)


def test_tile_kinds(no_minimum):
    """A split block reads its bounding box (and the origin tile for points that read only
    the border) when it fits, else the grid."""
    rng = np.random.default_rng(3)
    arrays, options = make(rng, n=1, h=30, w=30, spread=0.5)
    arrays["offset"][0, 0, 0, :4] = -50.0  # a few far points
    geom = geometry(arrays, options)
    acc = np.dtype(np.float64)
    per_pixel, per_corner = backend._block_costs(geom, acc, backward=False)
    plan = backend._plan(geom, acc, 40 * per_pixel + 2 * per_corner * 8 * 34, backward=False)
    assert not plan.whole_images and plan.pixels < 40
    points = backend._sample_points(arrays["offset"][0:1], slice(0, plan.pixels), geom, acc)
    tiles = plan.tiles_of(points, geom)
    assert tiles[-1][0] == backend._Tile(0, 2, 0, 2)  # the far points
    assert tiles[0][0].rows * tiles[0][0].cols <= plan.tile_corners
    spread = backend._sample_points(100 * arrays["offset"][0:1], slice(0, plan.pixels), geom, acc)
    plan = dataclasses.replace(plan, tile_rows=3, tile_cols=5, tile_corners=24)
    grid = plan.tiles_of(spread, geom)
    assert len(grid) > 2
    assert all(t.rows <= plan.tile_rows + 1 and t.cols <= plan.tile_cols + 1 for t, _ in grid)
    assert sorted(np.concatenate([i for _, i in grid]).tolist()) == list(
        range(spread.cell_y.shape[0])
    )


def test_small_images_never_split():
    """Below MIN_BLOCK_BYTES an image runs whole whatever the budget (bitwise as before)."""
    rng = np.random.default_rng(1)
    arrays, options = make(rng)
    geom = geometry(arrays, options)
    for backward_pass in (False, True):
        plan = backend._plan(geom, np.dtype(np.float64), 1, backward=backward_pass)
        assert plan.whole_images and plan.images == 1


# ---------------------------------------------------------------------------- peaks


def peak_extra_bytes(function) -> tuple[int, object]:
    """Peak traced bytes during ``function()`` above those before it, less its results."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = function()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    arrays = result if isinstance(result, tuple) else (result,)
    results = sum(a.nbytes for a in arrays if a is not None)
    return peak - before - results, result


def float32_problem(*, c, c_out, h, w, stride=1, padding=1, spread=2.0, mask=True):
    rng = np.random.default_rng(0)
    arrays, options = make(
        rng,
        n=1,
        c=c,
        c_out=c_out,
        h=h,
        w=w,
        stride=stride,
        padding=padding,
        spread=spread,
        mask=mask,
        dtype=np.float32,
    )
    return arrays, options, geometry(arrays, options)


def test_peak_one_large_image():
    """One image whose column buffer is 256 MiB, with workspace_bytes = 4 MiB: forward and
    backward temporaries stay within workspace_bytes + WORKSPACE_SLACK_BYTES (without the
    split they are about 400 MiB). Few output channels keep the GEMMs cheap."""
    arrays, options, geom = float32_problem(c=64, c_out=2, h=341, w=341)
    columns = geom.column_rows * geom.out_h * geom.out_w * 4
    assert columns >= 255 * 2**20
    budget = 2**22
    bound = budget + backend.WORKSPACE_SLACK_BYTES
    peak, output = peak_extra_bytes(lambda: forward(arrays, geom, budget))
    assert peak <= bound, (peak, bound)
    grad_output = np.ones(geom.output_shape, np.float32)
    peak, grads = peak_extra_bytes(
        lambda: backward(
            grad_output, arrays, geom, budget, frozenset({"input", "offset", "mask", "weight"})
        )
    )
    assert peak <= bound, (peak, bound)
    assert np.isfinite(output).all() and np.isfinite(grads.grad_input).all()


def test_peak_sparse_reads_of_a_large_input():
    """A 3000 x 3000 input read at 10 x 10 output pixels (stride 300): the temporaries are
    bounded by the budget, not by the input's 34 MiB of bordered planes."""
    arrays, options, geom = float32_problem(
        c=1, c_out=1, h=3000, w=3000, stride=300, padding=1, mask=False
    )
    assert (geom.out_h, geom.out_w) == (10, 10)
    budget = 2**20
    bound = budget + backend.WORKSPACE_SLACK_BYTES
    input_bytes = arrays["input"].nbytes
    peak, output = peak_extra_bytes(lambda: forward(arrays, geom, budget))
    assert peak <= bound and peak < input_bytes / 4, (peak, bound)
    whole = forward(arrays, geom, BIG)
    np.testing.assert_allclose(output, whole, rtol=1e-6, atol=1e-6)
    grad_output = np.ones(geom.output_shape, np.float32)
    peak, _ = peak_extra_bytes(
        lambda: backward(grad_output, arrays, geom, budget, frozenset({"offset", "weight"}))
    )
    assert peak <= bound and peak < input_bytes / 4, (peak, bound)
