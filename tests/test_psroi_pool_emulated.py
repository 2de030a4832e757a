"""deform_psroi_pool's CUDA kernels and their orchestration, run on the CPU by the emulator
and, with the ``launcher`` fixture's ``cupy`` variant, on a GPU.

``cupydcn.psroi_pool.cuda_backend`` drives the real ``cupydcn/cuda/kernels/deform_psroi_pool.cu`` through
:class:`HostLauncher` (tests/emulator); results are compared with the NumPy backend,
which test_psroi_pool.py checks against the float64 loop reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from cupydcn.psroi_pool import cuda_backend as _psroi_pool_kernels
from cupydcn.psroi_pool import numpy_backend as _numpy_psroi_pool
from cupydcn.psroi_pool.spec import psroi_pool_geometry
from emulator.host_launcher import HostLauncher
from reference_psroi_pool import CONFIGS, options, problem
from support import DTYPE_NAMES, assert_relative, on_device, strided_copy, to_numpy

# Tests taking ``launcher`` are marked ``emulated`` (or ``gpu``) by its parameter; the
# others carry the mark themselves.
BOTH = frozenset({"input", "offset"})


def geometry(cfg, input, rois, offset):
    return psroi_pool_geometry("test", input, rois, offset, **options(cfg))


def run_kernels(launcher, cfg, input, rois, offset, grad_output, *, wrt=BOTH, index_bits=None):
    """(output, count, grad_input, grad_offset) through the kernels."""
    geom = geometry(cfg, to_numpy(input), to_numpy(rois), to_numpy(offset))
    dtype_name = input.dtype.name
    input, rois, offset, grad_output = on_device(launcher, input, rois, offset, grad_output)
    output, count = _psroi_pool_kernels.psroi_pool_forward(
        launcher, input, rois, offset, geom, dtype_name=dtype_name, index_bits=index_bits
    )
    grads = _psroi_pool_kernels.psroi_pool_backward(
        launcher,
        grad_output,
        input,
        rois,
        offset,
        geom,
        dtype_name=dtype_name,
        wrt=wrt,
        index_bits=index_bits,
    )
    return tuple(to_numpy(a) for a in (output, count, *grads))


def run_numpy(cfg, input, rois, offset, grad_output, *, wrt=BOTH):
    geom = geometry(cfg, input, rois, offset)
    output, count = _numpy_psroi_pool.psroi_pool_forward(input, rois, offset, geom)
    grads = _numpy_psroi_pool.psroi_pool_backward(grad_output, input, rois, offset, geom, wrt=wrt)
    return (output, count, *grads)


def assert_agree(got, expected, dtype_name):
    """Counts exactly; values within the dtype's tolerance (the NumPy backend sums
    grad_input in float64, the kernels in the accumulation dtype with atomics)."""
    names = ("output", "count", "grad_input", "grad_offset")
    for name, g, e in zip(names, got, expected):
        if e is None:
            assert g is None, name
            continue
        assert g.shape == e.shape and g.dtype == e.dtype, name
        if name == "count":
            np.testing.assert_array_equal(g, e)
            continue
        assert_relative(g, e, dtype_name, name)


@pytest.mark.parametrize("index_bits", [32, 64])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kernels_match_numpy_backend(launcher, name, dtype_name, index_bits):
    cfg = CONFIGS[name]
    arrays = problem(cfg, dtype_name, seed=7)
    before = [None if a is None else a.copy() for a in arrays]
    start = len(launcher.launches)
    got = run_kernels(launcher, cfg, *arrays, index_bits=index_bits)
    assert_agree(got, run_numpy(cfg, *arrays), dtype_name)
    assert {r.index_bits for r in launcher.launches[start:]} == {index_bits}
    for a, b in zip(arrays, before):  # inputs untouched
        assert a is None or a.tobytes() == b.tobytes()


def test_small_problems_use_32_bit_indices(launcher):
    cfg = CONFIGS["basic"]
    start = len(launcher.launches)
    run_kernels(launcher, cfg, *problem(cfg))
    assert {r.index_bits for r in launcher.launches[start:]} == {32}


@pytest.mark.emulated
def test_grid_stride_loop_and_thread_order(host_launcher):
    launcher = host_launcher
    """Few blocks (each thread loops many times) and reversed thread order give the
    default configuration's results; grad_offset, written without atomics, bit for bit."""
    cfg = CONFIGS["parts_coarser"]
    arrays = problem(cfg)
    expected = run_kernels(launcher, cfg, *arrays)
    for other in (HostLauncher(config=lambda total: (3, 7)), HostLauncher(reverse=True)):
        output, count, grad_input, grad_offset = run_kernels(other, cfg, *arrays)
        np.testing.assert_array_equal(output, expected[0])
        np.testing.assert_array_equal(count, expected[1])
        np.testing.assert_allclose(grad_input, expected[2], rtol=1e-13, atol=1e-13)
        np.testing.assert_array_equal(grad_offset, expected[3])


@pytest.mark.parametrize(
    "wrt",
    [frozenset(), frozenset({"input"}), frozenset({"offset"}), BOTH],
    ids=["none", "input", "offset", "both"],
)
def test_wrt_launches_only_what_is_needed(launcher, wrt):
    cfg = CONFIGS["basic"]
    arrays = problem(cfg, "float32")
    start = len(launcher.launches)
    got = run_kernels(launcher, cfg, *arrays, wrt=wrt)
    assert_agree(got, run_numpy(cfg, *arrays, wrt=wrt), "float32")
    kernel_of = {
        "input": "deform_psroi_pool_backward_input",
        "offset": "deform_psroi_pool_backward_offset",
    }
    launched = {r.kernel for r in launcher.launches[start:]}
    assert launched == {"deform_psroi_pool_forward"} | {kernel_of[n] for n in wrt}


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_empty_rois_launch_nothing(launcher, dtype_name):
    cfg = CONFIGS["basic"]
    input, _, _, _ = problem(cfg, dtype_name)
    rois = np.zeros((0, 5))
    offset = np.zeros((0, 4, 3, 3), dtype=input.dtype)
    grad_output = np.zeros((0, 4, 3, 3), dtype=input.dtype)
    start = len(launcher.launches)
    output, count, grad_input, grad_offset = run_kernels(
        launcher, cfg, input, rois, offset, grad_output
    )
    assert output.shape == count.shape == (0, 4, 3, 3) and count.dtype == np.int32
    assert grad_input.shape == input.shape and grad_input.dtype == input.dtype
    assert not grad_input.astype(np.float64).any()
    assert grad_offset.shape == (0, 4, 3, 3)
    assert all(not r.kernel.startswith("deform") for r in launcher.launches[start:])


def test_non_contiguous_inputs(launcher):
    cfg = CONFIGS["three_classes"]
    arrays = problem(cfg)
    expected = run_numpy(cfg, *arrays)
    views = [strided_copy(launcher.xp, a) for a in arrays]
    assert not views[0].flags.c_contiguous
    assert_agree(run_kernels(launcher, cfg, *views), expected, "float64")


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_nan_offset(launcher, dtype_name):
    cfg = CONFIGS["basic"]
    input, rois, offset, grad_output = problem(cfg, dtype_name)
    offset[0, 0, 1, 2] = np.nan
    got = run_kernels(launcher, cfg, input, rois, offset, grad_output)
    assert np.isnan(got[0].astype(np.float64)).sum() == 2  # output channels 0, 1 of class 0
    assert_agree(got, run_numpy(cfg, input, rois, offset, grad_output), dtype_name)


def test_samples_on_the_pixel_grid(launcher):
    """Zero offsets with power-of-two bins: samples exactly on integers and clamps take
    MSRA's zero derivative in the kernels as in the NumPy backend."""
    cfg = dict(CONFIGS["parts_coarser"], spatial_scale=1.0, sample_per_part=4)
    input, rois, offset, grad_output = problem(
        cfg, rois=[[0, 0, 0, 7, 7], [1, 2, 0, 9, 7], [0, -4, -4, 3, 3]]
    )
    offset[...] = 0
    assert_agree(
        run_kernels(launcher, cfg, input, rois, offset, grad_output),
        run_numpy(cfg, input, rois, offset, grad_output),
        "float64",
    )


@pytest.mark.emulated
def test_undefined_behaviour_sanitizer():
    """Both index widths under UBSan (integer overflow, float->int overflow, ...), with
    RoIs and offsets far off the map."""
    sanitized = HostLauncher(sanitize="undefined")
    cfg = CONFIGS["offsets_off_map"]
    input, rois, offset, grad_output = problem(cfg, "float32")
    offset[0, 0, 0, 0] = 3e38
    offset[1, 1, 1, 1] = -np.inf
    rois = np.concatenate([rois, [[0, -1e30, 1e30, 1e30, -1e30]]])
    offset = np.concatenate([offset, offset[:1]])
    grad_output = np.concatenate([grad_output, grad_output[:1]])
    for bits in (32, 64):
        got = run_kernels(sanitized, cfg, input, rois, offset, grad_output, index_bits=bits)
        assert_agree(got, run_numpy(cfg, input, rois, offset, grad_output), "float32")
