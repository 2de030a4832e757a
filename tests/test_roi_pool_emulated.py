"""deform_roi_pool's CUDA kernels and their orchestration, run on the CPU by the emulator
and, with the ``launcher`` fixture's ``cupy`` variant, on a GPU.

``cupydcn.roi_pool.cuda_backend.roi_pool_forward / roi_pool_backward`` drive the real
``cupydcn/cuda/kernels/deform_roi_pool.cu`` through :class:`HostLauncher` (tests/emulator, checked
mode: guard pages around every argument, NaN-filled ``empty``) for every dtype and both
index widths, and are compared with the NumPy backend on the same (quantised) inputs.

Tolerances (tests/support.py), elementwise, with scale = the largest |NumPy result| of the
tensor. The two implementations do the same arithmetic in the same dtype; they differ only
in the order of the sums (atomics, channel sums), and for the half types in the one final
rounding of nearly equal float32 values. On the emulator the forward is compared bit for
bit (see ``_compare_with_numpy``; a GPU contracts FMAs, so there it gets the gradients'
bound); the gradients within 2 * rounding * |ref| + of_max * scale:

    float64   1e-12 * scale
    float32   1e-5 * scale
    float16   2**-10 * |ref| + 1e-5 * scale   (one half ulp either way)
    bfloat16  2**-7 * |ref| + 1e-5 * scale
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from cupydcn.core import arrays as _arrays
from cupydcn.roi_pool import cuda_backend as _roi_pool_kernels
from cupydcn.roi_pool import numpy_backend as _numpy_roi_pool
from cupydcn.roi_pool.spec import OP, roi_pool_geometry
from emulator.host_launcher import HostLauncher
from reference_roi_pool import ROI_KINDS, RoiCase
from support import DTYPE_NAMES, assert_close, dtype_of, is_exact, on_device, seeded, to_numpy

# Tests taking ``launcher`` are marked ``emulated`` (or ``gpu``) by its parameter.
INDEX_BITS = (32, 64)
GRADIENTS = frozenset({"input", "offset", "mask"})

CASES = {
    "every_kind_adaptive": RoiCase(roi_kinds=ROI_KINDS, rois_per_kind=1, output_size=(3, 2)),
    "ratio2_far_offsets": RoiCase(
        sampling_ratio=2,
        offset_scale=4.0,
        gamma=0.2,
        roi_kinds=("inside", "partly_outside", "reversed"),
    ),
    "roi_align_1x1_map": RoiCase(
        height=1,
        width=1,
        with_offset=False,
        with_mask=False,
        roi_kinds=("inside", "large"),
        output_size=(2, 1),
    ),
}


def _problem(case: RoiCase, dtype_name: str, seed) -> dict:
    """Arrays of the case in the dtype (rois in float32 below float64), plus grad_output."""
    rng = seeded(seed)
    dtype = dtype_of(dtype_name)
    rois_dtype = np.float64 if dtype_name == "float64" else np.float32
    arrays = {
        name: None if v is None else v.astype(rois_dtype if name == "rois" else dtype)
        for name, v in case.arrays(rng).items()
    }
    ph, pw = case.output_size
    shape = (arrays["rois"].shape[0], case.channels, ph, pw)
    arrays["grad_output"] = rng.normal(size=shape).astype(dtype)
    return arrays


def _geometry(arrays: dict, case: RoiCase):
    _, native = _arrays.natives(OP, arrays)
    return roi_pool_geometry(OP, native, **case.options)


def _assert_close(actual, expected, dtype_name: str, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert_close(actual, expected, dtype_name, what, zero_scale=1e-300)


@contextlib.contextmanager
def _per_sample_numpy_forward():
    """The NumPy backend's forward on its per-sample path (the kernels' summation order)."""
    saved = _numpy_roi_pool.FACTORISED_FORWARD
    _numpy_roi_pool.FACTORISED_FORWARD = False
    try:
        yield
    finally:
        _numpy_roi_pool.FACTORISED_FORWARD = saved


def _compare_with_numpy(launcher, arrays, case, dtype_name, index_bits, *, wrt=GRADIENTS):
    geom = _geometry(arrays, case)
    inputs = (arrays["input"], arrays["rois"], arrays["offset"], arrays["mask"])
    device = on_device(launcher, *inputs)
    output = to_numpy(
        _roi_pool_kernels.roi_pool_forward(launcher, *device, geom, index_bits=index_bits)
    )
    # The backend's per-sample forward sums the samples in the kernels' order with the
    # same operations (the host build does not contract into FMAs): equal to the last bit,
    # NaNs included. Its default (factorised) forward sums per bin row and column: equal to
    # rounding.
    expected_output = _numpy_roi_pool.roi_pool_forward(*inputs, geom)
    assert output.dtype == expected_output.dtype
    if is_exact(launcher):
        with _per_sample_numpy_forward():
            np.testing.assert_array_equal(output, _numpy_roi_pool.roi_pool_forward(*inputs, geom))
    _assert_close(output, expected_output, dtype_name, "output")
    grads = _roi_pool_kernels.roi_pool_backward(
        launcher,
        on_device(launcher, arrays["grad_output"]),
        *device,
        geom,
        wrt=wrt,
        index_bits=index_bits,
    )
    grads = type(grads)(*(to_numpy(g) for g in grads))
    expected = _numpy_roi_pool.roi_pool_backward(arrays["grad_output"], *inputs, geom, wrt=wrt)
    for label, actual, wanted in zip(("input", "offset", "mask"), grads, expected):
        if wanted is None:
            assert actual is None, label
        else:
            _assert_close(actual, wanted, dtype_name, f"grad_{label}")
    return output, grads


@pytest.mark.parametrize("index_bits", INDEX_BITS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("name", CASES)
def test_kernels_match_numpy_backend(launcher, name, dtype_name, index_bits):
    case = CASES[name]
    arrays = _problem(case, dtype_name, (name, dtype_name))
    first = len(launcher.launches)
    _compare_with_numpy(launcher, arrays, case, dtype_name, index_bits)
    launched = launcher.launches[first:]
    assert {r.index_bits for r in launched} == {index_bits}
    kernels = {r.kernel for r in launched}
    assert {"deform_roi_pool_forward", "deform_roi_pool_backward_input"} <= kernels
    assert ("deform_roi_pool_backward_coord" in kernels) == (case.with_offset or case.with_mask)
    assert ("round_to_output" in kernels) == (dtype_name in ("float16", "bfloat16"))


@pytest.mark.parametrize("wrt", [("input",), ("offset",), ("mask",)])
def test_wrt_subsets_launch_only_what_they_need(launcher, wrt):
    case = CASES["every_kind_adaptive"]
    arrays = _problem(case, "float32", "wrt")
    geom = _geometry(arrays, case)
    first = len(launcher.launches)
    grads = _roi_pool_kernels.roi_pool_backward(
        launcher,
        *on_device(
            launcher,
            arrays["grad_output"],
            arrays["input"],
            arrays["rois"],
            arrays["offset"],
            arrays["mask"],
        ),
        geom,
        wrt=frozenset(wrt),
    )
    kernels = [r.kernel for r in launcher.launches[first:]]
    expected_kernel = (
        "deform_roi_pool_backward_input" if wrt == ("input",) else "deform_roi_pool_backward_coord"
    )
    assert kernels == [expected_kernel]
    for label, grad in zip(("input", "offset", "mask"), grads):
        assert (grad is None) == (label not in wrt)


@pytest.mark.emulated
def test_reverse_thread_order_and_tiny_grids_agree(host_launcher):
    """Blocks and threads run last to first, with 3 threads per block and at most 2
    blocks (grid-stride loops of several rounds): the same results within the atomics'
    rounding."""
    case = CASES["every_kind_adaptive"]
    arrays = _problem(case, "float64", "reverse")
    odd = HostLauncher(reverse=True, config=lambda total: (min(2, max(1, total)), 3))
    _compare_with_numpy(odd, arrays, case, "float64", 32)


def test_kink_points_and_nan_offsets_follow_the_numpy_conventions(launcher):
    """Samples exactly on -1, 0, H - 1, H and beyond (the kernels' and the backend's
    coordinates are computed identically, so both see the same kinks), and a NaN offset."""
    height, width = 4, 5
    plane = 10 * np.arange(height, dtype=np.float64)[:, None] ** 2 + np.arange(width)
    points = [
        (y, x)
        for y in (-1.5, -1.0, -0.5, 0.0, 1.0, 3.0, 3.5, 4.0, 4.25)
        for x in (-1.0, 0.0, 2.25, 4.0, 5.0)
    ]
    rois = np.array([[0, x - 0.5, y - 0.5, x + 1.5, y + 1.5] for y, x in points])
    case = RoiCase(
        batch=1,
        channels=1,
        height=height,
        width=width,
        output_size=(1, 1),
        sampling_ratio=1,
        gamma=0.5,
        with_mask=True,
    )
    offset = np.zeros((len(rois), 2, 1, 1))
    offset[-1, 0] = np.nan
    arrays = {
        "input": plane[None, None],
        "rois": rois,
        "offset": offset,
        "mask": np.full((len(rois), 1, 1, 1), 0.75),
        "grad_output": np.ones((len(rois), 1, 1, 1)),
    }
    output, grads = _compare_with_numpy(launcher, arrays, case, "float64", 32)
    assert np.isnan(output[-1]).all() and np.isnan(grads.grad_offset[-1]).all()
    assert np.isfinite(grads.grad_input).all()


def test_no_rois_and_no_channels(launcher):
    case = CASES["ratio2_far_offsets"]
    arrays = _problem(case, "float32", "empty")
    empty = {name: v[:0] if name != "input" else v for name, v in arrays.items()}
    first = len(launcher.launches)
    output, grads = _compare_with_numpy(launcher, empty, case, "float32", 32)
    assert output.shape == (0, case.channels, *case.output_size)
    assert not np.any(grads.grad_input)
    assert all(r.total == 0 for r in launcher.launches[first:])

    no_channels = dict(
        arrays, input=arrays["input"][:, :0], grad_output=arrays["grad_output"][:, :0]
    )
    output, grads = _compare_with_numpy(launcher, no_channels, case, "float32", 32)
    assert output.size == 0 and not np.any(grads.grad_offset) and not np.any(grads.grad_mask)


def test_overflowing_boxes_sample_nothing(launcher):
    """Finite rois whose scaled corners overflow float32 (roi size inf - inf = NaN) get
    an empty sampling grid, not an undefined float -> int conversion (run with
    CUPYDCN_EMULATOR_SANITIZE=undefined to check the latter)."""
    case = RoiCase(
        batch=1, channels=2, output_size=(2, 2), spatial_scale=10.0, roi_kinds=("inside",)
    )
    arrays = _problem(case, "float32", "overflow")
    arrays["rois"][0, 1:] = [3e38, 3e38, 3e38, 3e38]
    arrays["rois"] = arrays["rois"][:1]
    for name in ("offset", "mask", "grad_output"):
        arrays[name] = arrays[name][:1]
    output, grads = _compare_with_numpy(launcher, arrays, case, "float32", 32)
    assert not np.any(output) and not np.any(grads.grad_input)
