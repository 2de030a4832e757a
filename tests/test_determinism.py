"""The deterministic backward (``deterministic=True``, cupydcn/cuda/deterministic.py).

On the emulator (tests/emulator, checked mode) the CUDA backward of each op runs in
several block and thread orders -- in order, reversed, seeded shuffles of the blocks and
of each block's threads, and a 3 x 7 grid whose threads loop many times -- for every
dtype and both index widths: the deterministic mode gives the same bits every time (all
gradients), agrees with the default (atomic) mode within the dtype's tolerance, and does
not depend on the conv's chunking. The default mode's results do depend on the order
(the atomics add in a different order), which shows the orders differ enough to matter.
The default mode's launches are pinned (unchanged by this mode), and so are the
deterministic mode's. Then the setting: the argument, ``set_deterministic``,
``deterministic_mode``, their checks, the NumPy backend (deterministic in either mode)
and ``cupydcn.torch`` following ``torch.use_deterministic_algorithms``.
"""

from __future__ import annotations

import numpy as np
import pytest

import cupydcn
from cupydcn.core import arrays as _arrays
from cupydcn.core.errors import CupydcnTypeError
from cupydcn.cuda import deterministic as _det
from cupydcn.deform_conv import cuda_backend as _conv
from cupydcn.deform_conv.spec import conv_geometry
from cupydcn.psroi_pool import cuda_backend as _psroi
from cupydcn.psroi_pool.spec import psroi_pool_geometry
from cupydcn.roi_pool import cuda_backend as _roi
from cupydcn.roi_pool.spec import OP as ROI_OP
from cupydcn.roi_pool.spec import roi_pool_geometry
from emulator.host_launcher import HostLauncher
from reference_psroi_pool import CONFIGS as PSROI_CONFIGS
from reference_psroi_pool import options as psroi_options
from reference_psroi_pool import problem as psroi_problem
from reference_roi_pool import ROI_KINDS, RoiCase
from support import DTYPE_NAMES, assert_close, dtype_of, on_device, seeded, to_numpy

# The column path (im2col, GEMMs, col2im), not the depthwise kernels "auto" would pick
# for some of these small grouped cases.
pytestmark = pytest.mark.usefixtures("im2col_only")

INDEX_BITS = (32, 64)
BIG_WORKSPACE = 1 << 30

# Launch orders of the emulator: HostLauncher keyword arguments.
ORDERS = {
    "in_order": {},
    "reversed": {"reverse": True},
    "shuffled_1": {"shuffle": 1},
    "shuffled_2_reversed": {"shuffle": 2, "reverse": True},
    "grid_3x7_shuffled": {"shuffle": 3, "config": lambda total: (min(3, max(1, total)), 7)},
}


@pytest.fixture(scope="module")
def launchers(host_launcher) -> dict[str, HostLauncher]:
    """One emulator launcher per order (``host_launcher`` skips, or fails in CI, without a
    host compiler)."""
    return {name: HostLauncher(**kwargs) for name, kwargs in ORDERS.items()}


# ---------------------------------------------------------------- problems, one per op
def _conv_problem(dtype_name: str):
    rng = seeded("determinism-conv", dtype_name)
    dtype = dtype_of(dtype_name)
    n, c, h, w, co, g, k = 2, 4, 6, 7, 3, 2, 3
    input = rng.normal(size=(n, c, h, w)).astype(dtype)
    # Offsets of a few pixels: many taps of many pixels land on the same input points.
    offset = rng.normal(scale=1.5, size=(n, 2 * g * k * k, h, w)).astype(dtype)
    mask = rng.uniform(0.2, 1.0, size=(n, g * k * k, h, w)).astype(dtype)
    weight = rng.normal(size=(co, c, k, k)).astype(dtype)
    grad_output = rng.normal(size=(n, co, h, w)).astype(dtype)
    geom = conv_geometry(input, offset, weight, None, mask, stride=1, padding=1, dilation=1)
    return (grad_output, input, offset, weight, mask), geom


def _run_conv(launcher, dtype_name, index_bits, deterministic, workspace_bytes=BIG_WORKSPACE):
    arrays, geom = _conv_problem(dtype_name)
    grads = _conv.conv_backward(
        launcher,
        *on_device(launcher, *arrays),
        geom,
        wrt=frozenset({"input", "offset", "weight", "mask", "bias"}),
        workspace_bytes=workspace_bytes,
        index_bits=index_bits,
        deterministic=deterministic,
    )
    return dict(zip(("input", "offset", "weight", "mask", "bias"), map(to_numpy, grads)))


ROI_CASE = RoiCase(roi_kinds=ROI_KINDS, rois_per_kind=2, output_size=(3, 2))


def _roi_problem(dtype_name: str):
    rng = seeded("determinism-roi", dtype_name)
    dtype = dtype_of(dtype_name)
    rois_dtype = np.float64 if dtype_name == "float64" else np.float32
    arrays = {
        name: None if v is None else v.astype(rois_dtype if name == "rois" else dtype)
        for name, v in ROI_CASE.arrays(rng).items()
    }
    ph, pw = ROI_CASE.output_size
    grad_output = rng.normal(size=(arrays["rois"].shape[0], ROI_CASE.channels, ph, pw))
    _, native = _arrays.natives(ROI_OP, arrays)
    geom = roi_pool_geometry(ROI_OP, native, **ROI_CASE.options)
    inputs = (
        grad_output.astype(dtype),
        arrays["input"],
        arrays["rois"],
        arrays["offset"],
        arrays["mask"],
    )
    return inputs, geom


def _run_roi(launcher, dtype_name, index_bits, deterministic):
    arrays, geom = _roi_problem(dtype_name)
    grads = _roi.roi_pool_backward(
        launcher,
        *on_device(launcher, *arrays),
        geom,
        wrt=frozenset({"input", "offset", "mask"}),
        index_bits=index_bits,
        deterministic=deterministic,
    )
    return dict(zip(("input", "offset", "mask"), map(to_numpy, grads)))


PSROI_CFG = PSROI_CONFIGS["basic"]


def _run_psroi(launcher, dtype_name, index_bits, deterministic):
    input, rois, offset, grad_output = psroi_problem(PSROI_CFG, dtype_name, seed=11)
    geom = psroi_pool_geometry("test", input, rois, offset, **psroi_options(PSROI_CFG))
    grads = _psroi.psroi_pool_backward(
        launcher,
        *on_device(launcher, grad_output, input, rois, offset),
        geom,
        dtype_name=dtype_name,
        wrt=frozenset({"input", "offset"}),
        index_bits=index_bits,
        deterministic=deterministic,
    )
    return dict(zip(("input", "offset"), map(to_numpy, grads)))


RUNS = {"deform_conv2d": _run_conv, "deform_roi_pool": _run_roi, "deform_psroi_pool": _run_psroi}


def _bits(grads: dict) -> dict:
    return {
        name: None if g is None else (g.dtype.name, g.shape, g.tobytes())
        for name, g in grads.items()
    }


# ---------------------------------------------------------------- the same bits
@pytest.mark.emulated
@pytest.mark.parametrize("index_bits", INDEX_BITS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("op", list(RUNS))
def test_deterministic_backward_has_the_same_bits_in_every_order(
    launchers, op, dtype_name, index_bits
):
    run = RUNS[op]
    results = {
        name: run(launcher, dtype_name, index_bits, True) for name, launcher in launchers.items()
    }
    first = _bits(results["in_order"])
    for name, grads in results.items():
        assert _bits(grads) == first, f"{op} {dtype_name} int{index_bits}: {name} differs"
    assert results["in_order"]["input"] is not None
    assert np.any(results["in_order"]["input"] != 0)
    # ... and agrees with the default (atomic) mode within the dtype's tolerance.
    default = run(launchers["in_order"], dtype_name, index_bits, False)
    for name, wanted in default.items():
        got = results["in_order"][name]
        if wanted is None:
            assert got is None, name
            continue
        if name != "input":  # the other gradients take no atomics: the same bits
            assert got.tobytes() == wanted.tobytes(), name
        else:
            assert_close(
                got, wanted, dtype_name, f"{op} grad_input", roundings=4, zero_scale=1e-300
            )


@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
@pytest.mark.parametrize("op", list(RUNS))
def test_repeated_runs_give_the_same_bits(launcher, op, dtype_name):
    """Run to run on the ``launcher`` fixture's device (the emulator, or a GPU where the
    default mode's atomics are scheduled differently each time): the same bits."""
    run = RUNS[op]
    first = _bits(run(launcher, dtype_name, 32, True))
    for _ in range(3):
        assert _bits(run(launcher, dtype_name, 32, True)) == first


@pytest.mark.emulated
@pytest.mark.parametrize("op", list(RUNS))
def test_default_mode_depends_on_the_order(launchers, op):
    """The orders differ enough to change atomic sums: the default mode's float32
    grad_input is not the same in every order (which is why the mode above exists)."""
    run = RUNS[op]
    seen = {_bits(run(launcher, "float32", 32, False))["input"] for launcher in launchers.values()}
    assert len(seen) > 1, f"{op}: every order gave the same atomic sums"


@pytest.mark.emulated
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_conv_deterministic_result_does_not_depend_on_chunking(launchers, dtype_name):
    arrays, geom = _conv_problem(dtype_name)
    whole = _run_conv(launchers["shuffled_1"], dtype_name, 32, True)
    one_image = 1  # a workspace too small for two images: a chunk per image
    chunked = _run_conv(launchers["reversed"], dtype_name, 32, True, workspace_bytes=one_image)
    assert _bits(chunked) == _bits(whole)


# ---------------------------------------------------------------- launches
DEFAULT_LAUNCHES = {
    "deform_conv2d": [
        "deform_conv_col2im_input_tiled",
        "deform_conv_col2im_coord",
        "deform_conv_im2col",
    ],
    "deform_roi_pool": ["deform_roi_pool_backward_input", "deform_roi_pool_backward_coord"],
    "deform_psroi_pool": ["deform_psroi_pool_backward_input", "deform_psroi_pool_backward_offset"],
}
DETERMINISTIC_KERNEL = {
    "deform_conv2d": "deform_conv_col2im_input_slots",
    "deform_roi_pool": "deform_roi_pool_backward_input_slots",
    "deform_psroi_pool": "deform_psroi_pool_backward_input_slots",
}


@pytest.mark.emulated
@pytest.mark.parametrize("op", list(RUNS))
def test_launches_are_pinned(host_launcher, op):
    """The default mode launches what it launched before this mode existed (one atomic
    grad_input kernel); the deterministic mode replaces that launch by three: the slot
    kernel twice (count, record) and segment_sum. float32, one chunk."""
    launcher = HostLauncher()
    RUNS[op](launcher, "float32", 32, False)
    assert [r.kernel for r in launcher.launches] == DEFAULT_LAUNCHES[op]
    launcher.launches.clear()
    RUNS[op](launcher, "float32", 32, True)
    slots = DETERMINISTIC_KERNEL[op]
    expected = [slots, slots, "segment_sum"] + DEFAULT_LAUNCHES[op][1:]
    assert [r.kernel for r in launcher.launches] == expected
    count, record, reduce = launcher.launches[:3]
    assert count.total == record.total
    assert reduce.total > 0
    assert launcher.sorts == 1


@pytest.mark.emulated
def test_no_contributions_gives_zeros(host_launcher):
    """grad_output all zero still has contributions (zeros); offsets that push every
    sample off the map leave no slots at all: zeros, and no reduction launched."""
    launcher = HostLauncher()
    arrays, geom = _conv_problem("float32")
    grad_output, input, offset, weight, mask = arrays
    far = np.full_like(offset, 1000.0)
    grads = _conv.conv_backward(
        launcher,
        grad_output,
        input,
        far,
        weight,
        mask,
        geom,
        wrt=frozenset({"input"}),
        workspace_bytes=BIG_WORKSPACE,
        deterministic=True,
    )
    assert grads.grad_input.shape == input.shape and not np.any(grads.grad_input)
    assert "segment_sum" not in [r.kernel for r in launcher.launches]


# ---------------------------------------------------------------- the setting
@pytest.fixture
def restore_setting():
    yield
    cupydcn.set_deterministic(False)


def test_setting_and_scopes(restore_setting):
    assert cupydcn.is_deterministic() is False
    assert _det.resolve_deterministic("op", None) is False
    assert _det.resolve_deterministic("op", True) is True
    cupydcn.set_deterministic(True)
    assert _det.resolve_deterministic("op", None) is True
    assert _det.resolve_deterministic("op", False) is False
    with cupydcn.deterministic_mode(False):
        assert cupydcn.is_deterministic() is False
        with cupydcn.deterministic_mode():
            assert cupydcn.is_deterministic() is True
        assert cupydcn.is_deterministic() is False
    assert cupydcn.is_deterministic() is True
    cupydcn.set_deterministic(False)
    with cupydcn.deterministic_mode():
        assert _det.resolve_deterministic("op", None) is True
    assert _det.resolve_deterministic("op", None) is False


@pytest.mark.parametrize("bad", [1, "yes", np.bool_(True)])
def test_setting_rejects_non_bools(bad):
    with pytest.raises(CupydcnTypeError, match="must be a bool"):
        cupydcn.set_deterministic(bad)
    with pytest.raises(CupydcnTypeError, match="must be a bool"):
        with cupydcn.deterministic_mode(bad):
            pass
    arrays, _ = _conv_problem("float32")
    grad_output, input, offset, weight, mask = arrays
    with pytest.raises(CupydcnTypeError, match="deterministic must be a bool or None"):
        cupydcn.deform_conv2d_backward(
            grad_output, input, offset, weight, mask, padding=1, deterministic=bad
        )


def test_numpy_backend_accepts_and_ignores_it(restore_setting):
    """The NumPy backend is deterministic in either mode: the same bits."""
    (grad_output, input, offset, weight, mask), _ = _conv_problem("float32")
    conv = [
        cupydcn.deform_conv2d_backward(
            grad_output, input, offset, weight, mask, padding=1, deterministic=d
        )
        for d in (None, True, False)
    ]
    roi_inputs, _ = _roi_problem("float32")
    roi = [
        cupydcn.deform_roi_pool_backward(*roi_inputs, deterministic=d, **ROI_CASE.options)
        for d in (None, True, False)
    ]
    input, rois, offset, grad = psroi_problem(PSROI_CFG, "float32", seed=3)
    psroi = [
        cupydcn.deform_psroi_pool_backward(
            grad, input, rois, offset, deterministic=d, **psroi_options(PSROI_CFG)
        )
        for d in (None, True, False)
    ]
    cupydcn.set_deterministic(True)
    (grad_output, input, offset, weight, mask), _ = _conv_problem("float32")
    conv.append(cupydcn.deform_conv2d_backward(grad_output, input, offset, weight, mask, padding=1))
    for results in (conv, roi, psroi):
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert (a is None) == (b is None)
                if a is not None:
                    assert a.tobytes() == b.tobytes()


def test_torch_follows_use_deterministic_algorithms(monkeypatch):
    torch = pytest.importorskip("torch")
    import cupydcn.torch as ct
    from cupydcn import deform_conv as conv_module

    seen = []
    original = conv_module.resolve_deterministic

    def spy(op, deterministic):
        seen.append(deterministic)
        return original(op, deterministic)

    monkeypatch.setattr(conv_module, "resolve_deterministic", spy)
    (grad_output, input, offset, weight, mask), _ = _conv_problem("float32")
    tensors = [torch.tensor(a, requires_grad=True) for a in (input, offset, weight)]

    def backward():
        out = ct.deform_conv2d(*tensors, padding=1, mask=torch.tensor(mask))
        out.backward(torch.tensor(grad_output))

    backward()
    assert seen and seen[-1] is None  # the cupydcn setting decides (off)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert seen[-1] is True
