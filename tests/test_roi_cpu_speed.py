"""The factorised paths of the NumPy RoI-pooling backends (cupydcn/roi_pool/numpy_backend.py):
structural tests, no timings.

deform_roi_pool's NumPy backend sums each bin as sum_r sum_c Ay[r] * Ax[c] * V[r, c] over
the rows and columns its samples touch (per-axis summed bilinear weights) instead of
blending 4 corners per sample. These tests pin that it computes the per-sample path's
function: equal to rounding on random problems with NaN offsets, RoIs across the edges,
reversed and empty RoIs, every dtype, with and without offset and mask; bit for bit where
the data are not finite (then the per-sample path runs); independent of how the bins are
blocked; and within the workspace for the largest grids.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

import cupydcn
from cupydcn.psroi_pool import numpy_backend as psroi_backend
from cupydcn.roi_pool import numpy_backend
from support import DTYPE_NAMES, assert_close, dtype_of, seeded

SEEDS = range(6)


def _random_problem(rng, dtype_name: str, *, nan_offsets: bool = True) -> dict:
    """A small random deform_roi_pool problem: RoIs inside, across the edges, outside,
    reversed and empty; offsets (some NaN) and a mask or neither."""
    dtype = dtype_of(dtype_name)
    n, c = int(rng.integers(1, 3)), int(rng.integers(1, 5))
    h, w = int(rng.integers(1, 13)), int(rng.integers(1, 13))
    k = int(rng.integers(1, 7))
    ph, pw = (int(v) for v in rng.integers(1, 4, 2))
    scale = float(rng.choice([1.0, 0.5, 1.7]))
    rois = np.empty((k, 5))
    rois[:, 0] = rng.integers(0, n, k)
    rois[:, [1, 3]] = rng.uniform(-4, w / scale + 4, (k, 2))  # any order: reversed too
    rois[:, [2, 4]] = rng.uniform(-4, h / scale + 4, (k, 2))
    rois[0, 3] = rois[0, 1]  # an empty axis
    offset = mask = None
    if rng.uniform() < 0.75:
        offset = (2 * rng.standard_normal((k, 2, ph, pw))).astype(dtype)
        if nan_offsets:
            offset[-1, int(rng.integers(0, 2)), 0, 0] = np.nan
    if rng.uniform() < 0.6:
        mask = rng.uniform(size=(k, 1, ph, pw)).astype(dtype)
    return dict(
        input=rng.standard_normal((n, c, h, w)).astype(dtype),
        rois=rois.astype(np.float64 if dtype_name == "float64" else np.float32),
        offset=offset,
        mask=mask,
        grad_output=rng.standard_normal((k, c, ph, pw)).astype(dtype),
        options=dict(
            output_size=(ph, pw),
            spatial_scale=scale,
            sampling_ratio=int(rng.integers(0, 4)),
            gamma=float(rng.choice([0.1, 0.7])),
        ),
    )


def _run(problem: dict, monkeypatch, *, factorised: bool):
    monkeypatch.setattr(numpy_backend, "FACTORISED", factorised)
    monkeypatch.setattr(numpy_backend, "FACTORISED_FORWARD", factorised)
    args = (problem["input"], problem["rois"], problem["offset"], problem["mask"])
    output = cupydcn.deform_roi_pool(*args, **problem["options"])
    grads = cupydcn.deform_roi_pool_backward(problem["grad_output"], *args, **problem["options"])
    return output, grads


def _pairs(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    yield "output", out_a, out_b
    for name, x, y in zip(("grad_input", "grad_offset", "grad_mask"), grads_a, grads_b):
        assert (x is None) == (y is None), name
        if x is not None:
            yield name, x, y


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_factorised_equals_per_sample(dtype_name, seed, monkeypatch):
    """Random problems (NaN offsets, edges, reversed and empty RoIs, both sampling modes):
    the factorised forward and backward equal the per-sample path to rounding, NaNs in the
    same places."""
    for trial in range(4):
        problem = _random_problem(seeded("factorised", dtype_name, seed, trial), dtype_name)
        fast = _run(problem, monkeypatch, factorised=True)
        slow = _run(problem, monkeypatch, factorised=False)
        for name, x, y in _pairs(fast, slow):
            assert x.dtype == y.dtype == problem["input"].dtype, name
            assert_close(x, y, dtype_name, f"{name} trial {trial} {problem['options']}")


def test_nan_samples_poison_the_bin_and_add_nothing_to_grad_input(monkeypatch):
    """A NaN offset x makes every sample of its bin NaN: output, grad_offset and grad_mask
    of that bin NaN, the other bins finite; grad_input finite and equal to the per-sample
    path's (the bin's samples add nothing)."""
    rng = seeded("nan-bin")
    problem = _random_problem(rng, "float64", nan_offsets=False)
    k, _, ph, pw = problem["grad_output"].shape
    problem["options"]["sampling_ratio"] = 2
    problem["offset"] = rng.standard_normal((k, 2, ph, pw))
    problem["offset"][0, 0, 0, 0] = np.nan
    problem["mask"] = rng.uniform(size=(k, 1, ph, pw))
    problem["rois"][0] = [0, 0.5, 0.5, 6.5, 5.5]
    output, grads = fast = _run(problem, monkeypatch, factorised=True)
    assert np.isnan(output[0, :, 0, 0]).all()
    assert np.isnan(grads.grad_offset[0, :, 0, 0]).all()
    assert np.isnan(grads.grad_mask[0, 0, 0, 0])
    assert np.isfinite(np.delete(output.reshape(k, -1, ph * pw), 0, axis=2)[0]).all()
    assert np.isfinite(grads.grad_input).all()
    for name, x, y in _pairs(fast, _run(problem, monkeypatch, factorised=False)):
        assert_close(x, y, "float64", name)


@pytest.mark.parametrize("where", ["input-nan", "input-inf", "grad-inf", "mask-inf"])
def test_non_finite_data_take_the_per_sample_path(where, monkeypatch):
    """NaN / inf pixels read with weight 0 poison a sample, which a sum of summed weights
    cannot reproduce: with non-finite data the results are the per-sample path's, bit for
    bit."""
    problem = _random_problem(seeded("non-finite", where), "float32")
    problem["options"]["sampling_ratio"] = 3
    n, c, h, w = problem["input"].shape
    k, _, ph, pw = problem["grad_output"].shape
    problem["rois"][:] = [0, -1, -1, w + 1, h + 1]
    if where.startswith("input"):
        problem["input"][0, 0, h // 2, w // 2] = np.nan if where == "input-nan" else np.inf
    elif where == "grad-inf":
        problem["grad_output"][0, 0, 0, 0] = np.inf
    else:
        problem["mask"] = np.ones((k, 1, ph, pw), np.float32)
        problem["mask"][0, 0, 0, 0] = np.inf
    fast = _run(problem, monkeypatch, factorised=True)
    slow = _run(problem, monkeypatch, factorised=False)
    for name, x, y in _pairs(fast, slow):
        if name == "output" and not where.startswith("input"):
            assert_close(x, y, "float32", name)  # finite input: the forward factorises
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize("seed", range(3))
def test_blocking_does_not_change_the_factorised_results(seed, monkeypatch):
    """One bin per block (workspace 1 byte) and one large block give the same forward bit
    for bit (each bin is summed in a fixed order, padding adds exact zeros) and the same
    gradients to rounding."""
    problem = _random_problem(seeded("blocks", seed), "float32")
    results = []
    for budget in (numpy_backend._WORKSPACE_BYTES, 1):
        monkeypatch.setattr(numpy_backend, "_WORKSPACE_BYTES", budget)
        results.append(_run(problem, monkeypatch, factorised=True))
    for name, x, y in _pairs(*results):
        if name == "output":
            np.testing.assert_array_equal(x, y)
        else:
            assert_close(x, y, "float32", name)


@pytest.mark.parametrize("sampling_ratio", [1, 2, 5, 0])
def test_axis_sums_are_the_summed_corner_weights(sampling_ratio):
    """Per axis and bin: the distinct rows touched, each once; their weights sum to the
    number of samples inside [-1, size]; the derivative weights sum to 0."""
    acc = np.dtype(np.float64)
    rng = seeded("axis", sampling_ratio)
    m, size = 50, 9
    start = rng.uniform(-3, size + 2, m)
    bin_size = rng.uniform(-3, 5, m)
    grid = (
        np.full(m, sampling_ratio)
        if sampling_ratio
        else np.maximum(np.ceil(bin_size), 0).astype(np.int64)
    )
    with np.errstate(divide="ignore", invalid="ignore"):  # as the backend calls it
        rows, weights, dweights, nan, used = numpy_backend._axis_sums(
            start, bin_size, grid, size, acc
        )
    assert not nan.any()
    for i in range(m):
        coords = start[i] + ((np.arange(grid[i]) + 0.5) * bin_size[i]) / grid[i]
        inside = (coords >= -1) & (coords <= size)
        assert len(set(rows[i][: used[i]])) == used[i]
        assert (weights[i][used[i] :] == 0).all() and (dweights[i][used[i] :] == 0).all()
        assert (rows[i] >= 0).all() and (rows[i] < size).all()
        np.testing.assert_allclose(weights[i].sum(), inside.sum(), rtol=1e-12)
        np.testing.assert_allclose(dweights[i].sum(), 0, atol=1e-12)


def test_factorised_forward_within_the_workspace(monkeypatch):
    """The largest adaptive grid (1024 x 1024 samples per bin, 1024 px RoIs): the
    factorised forward and backward keep their temporaries within the workspace (besides
    the channels-last planes) and agree with the exact value on a linear ramp."""
    size = 1030
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    input = np.stack([x + y, 2 * x + y])[None]
    rois = np.array([[0, 1, 1, 1025, 1025], [0, 0.5, 4.25, 1024.5, 1028.25]])
    options = dict(output_size=1, spatial_scale=1.0, sampling_ratio=0, gamma=0.1)
    offset = np.zeros((2, 2, 1, 1))
    monkeypatch.setattr(numpy_backend, "FACTORISED_FORWARD", True)
    planes = 2 * input.nbytes + 2**20
    budget = 16 * 2**20
    monkeypatch.setattr(numpy_backend, "_WORKSPACE_BYTES", budget)
    for call in (
        lambda: cupydcn.deform_roi_pool(input, rois, offset, **options),
        lambda: cupydcn.deform_roi_pool_backward(
            np.ones((2, 2, 1, 1)), input, rois, offset, **options
        ),
    ):
        tracemalloc.start()
        start = time.perf_counter()
        try:
            result = call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= 1.25 * budget + 2 * planes, f"peak {peak / 2**20:.0f} MiB"
        assert time.perf_counter() - start < 60
    output = cupydcn.deform_roi_pool(input, rois, offset, **options)
    scaled = rois[:, 1:] - 0.5
    cx, cy = (scaled[:, 0] + scaled[:, 2]) / 2, (scaled[:, 1] + scaled[:, 3]) / 2
    np.testing.assert_allclose(output[:, 0, 0, 0], cx + cy, rtol=1e-9)
    np.testing.assert_allclose(output[:, 1, 0, 0], 2 * cx + cy, rtol=1e-9)
    np.testing.assert_allclose(result.grad_input.sum(axis=(0, 2, 3)), [2.0, 2.0], rtol=1e-9)


# ---------------------------------------------------------------------------- deform_psroi_pool


def _random_psroi_problem(rng, dtype_name: str) -> dict:
    """A small random deform_psroi_pool problem: several classes, parts coarser or finer
    than the bins, RoIs across the edges and reversed, NaN offsets."""
    dtype = dtype_of(dtype_name)
    n, h, w = int(rng.integers(1, 3)), int(rng.integers(1, 12)), int(rng.integers(1, 12))
    output_dim, group = int(rng.integers(1, 5)), int(rng.integers(1, 3))
    pooled = int(rng.integers(1, 4))
    classes = int(rng.choice([c for c in (1, 2, 4) if output_dim % c == 0]))
    parts, spp = int(rng.integers(1, 4)), int(rng.integers(1, 6))
    k = int(rng.integers(1, 6))
    scale = float(rng.choice([1.0, 0.5, 1.7]))
    rois = np.empty((k, 5))
    rois[:, 0] = rng.integers(0, n, k)
    rois[:, [1, 3]] = rng.uniform(-3, w / scale + 3, (k, 2))
    rois[:, [2, 4]] = rng.uniform(-3, h / scale + 3, (k, 2))
    offset = None
    if rng.uniform() < 0.75:
        offset = (2 * rng.standard_normal((k, 2 * classes, parts, parts))).astype(dtype)
        offset[-1, int(rng.integers(0, 2 * classes)), 0, 0] = np.nan
    return dict(
        input=rng.standard_normal((n, output_dim * group * group, h, w)).astype(dtype),
        rois=rois.astype(np.float64 if dtype_name == "float64" else np.float32),
        offset=offset,
        grad_output=rng.standard_normal((k, output_dim, pooled, pooled)).astype(dtype),
        options=dict(
            output_dim=output_dim,
            group_size=group,
            pooled_size=pooled,
            part_size=parts if offset is not None else None,
            sample_per_part=spp,
            spatial_scale=scale,
            trans_std=float(rng.choice([0.1, 0.7])),
        ),
    )


def _run_psroi(problem: dict, monkeypatch, *, factorised: bool):
    monkeypatch.setattr(psroi_backend, "FACTORISED", factorised)
    args = (problem["input"], problem["rois"], problem["offset"])
    output, count = cupydcn.deform_psroi_pool(*args, **problem["options"])
    grads = cupydcn.deform_psroi_pool_backward(problem["grad_output"], *args, **problem["options"])
    return {
        "output": output,
        "count": count,
        "grad_input": grads.grad_input,
        "grad_offset": grads.grad_offset,
    }


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_psroi_factorised_equals_per_sample(dtype_name, seed, monkeypatch):
    """Random PS-RoI problems: counts exactly, values and gradients to rounding, NaNs in
    the same places."""
    for trial in range(4):
        problem = _random_psroi_problem(seeded("psroi", dtype_name, seed, trial), dtype_name)
        fast = _run_psroi(problem, monkeypatch, factorised=True)
        slow = _run_psroi(problem, monkeypatch, factorised=False)
        np.testing.assert_array_equal(fast["count"], slow["count"])
        for name in ("output", "grad_input", "grad_offset"):
            assert (fast[name] is None) == (slow[name] is None), name
            if fast[name] is not None:
                assert fast[name].dtype == slow[name].dtype, name
                assert_close(
                    fast[name], slow[name], dtype_name, f"{name} trial {trial} {problem['options']}"
                )


@pytest.mark.parametrize("where", ["input-nan", "input-inf", "grad-inf"])
def test_psroi_non_finite_data_take_the_per_sample_path(where, monkeypatch):
    """Non-finite input (with an offset, whose gradient reads it) or grad_output: the
    per-sample path's results, bit for bit (the forward factorises when only grad_output
    is not finite)."""
    problem = _random_psroi_problem(seeded("psroi-non-finite", where), "float32")
    _, _, h, w = problem["input"].shape
    k, output_dim, pooled, _ = problem["grad_output"].shape
    if problem["offset"] is None:  # the offset gradient reads the input
        problem["offset"] = np.zeros((k, 2, pooled, pooled), np.float32)
        problem["options"]["part_size"] = pooled
    problem["rois"][:, 1:] = [-1, -1, w + 1, h + 1]
    if where.startswith("input"):
        problem["input"][..., h // 2, w // 2] = np.nan if where == "input-nan" else np.inf
    else:
        problem["grad_output"][0, 0, 0, 0] = np.inf
    fast = _run_psroi(problem, monkeypatch, factorised=True)
    slow = _run_psroi(problem, monkeypatch, factorised=False)
    for name in fast:
        if fast[name] is None:
            assert slow[name] is None
        elif name == "output" and where == "grad-inf":
            assert_close(fast[name], slow[name], "float32", name)
        else:
            np.testing.assert_array_equal(fast[name], slow[name], err_msg=name)


def test_psroi_blocking_does_not_change_the_factorised_results(monkeypatch):
    """One RoI per chunk and one chunk: the forward bit for bit, the gradients to
    rounding."""
    problem = _random_psroi_problem(seeded("psroi-blocks"), "float32")
    results = []
    for budget in (psroi_backend._WORKSPACE_BYTES, 1):
        monkeypatch.setattr(psroi_backend, "_WORKSPACE_BYTES", budget)
        results.append(_run_psroi(problem, monkeypatch, factorised=True))
    np.testing.assert_array_equal(results[0]["output"], results[1]["output"])
    np.testing.assert_array_equal(results[0]["count"], results[1]["count"])
    for name in ("grad_input", "grad_offset"):
        if results[0][name] is not None:
            assert_close(results[0][name], results[1][name], "float32", name)


def test_finite_data_take_the_factorised_paths(monkeypatch):
    """With finite data the per-sample sampling is never entered (so the comparisons above
    compare two different computations): deform_roi_pool's backward (and its forward when
    FACTORISED_FORWARD is set) and both passes of deform_psroi_pool."""

    def refuse(*args, **kwargs):
        raise AssertionError("per-sample path entered")

    problem = _random_problem(seeded("paths"), "float32")
    monkeypatch.setattr(numpy_backend, "_steps", refuse)
    _run(problem, monkeypatch, factorised=True)
    psroi = _random_psroi_problem(seeded("paths-psroi"), "float32")
    monkeypatch.setattr(psroi_backend, "_samples", refuse)
    _run_psroi(psroi, monkeypatch, factorised=True)
