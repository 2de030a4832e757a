"""The double backward's terms along an offset direction on the CUDA kernels
(cupydcn/cuda/kernels/deform_conv_second_order.cu, orchestrated by
cupydcn/deform_conv/second_order_cuda.py), run by the emulator and, with the ``launcher``
fixture's ``cupy`` variant, on a GPU, against the NumPy version
(cupydcn/deform_conv/second_order.py, itself checked against finite differences in
tests/test_double_backward.py).

Every dtype and both index widths (64-bit forced), sample points on kinks (integer
coordinates), on the map's edges, outside it, far away, NaN and infinite; groups, offset
groups, mask or none, stride / padding / dilation differing in H and W; batch 0; subsets
of the terms; and the public function's dispatch of non-NumPy arrays.

Tolerance (tests/support.py): elementwise ``assert_close``, |got - expected| <= 2 *
rounding * |expected| + of_max * max |expected| (the NumPy side computes in float64 and
rounds once, the kernels in the accumulation dtype and round once: float64 1e-12,
float32 and the half types 1e-5 of the tensor's largest value, plus 2u for the half
types). Both sides read the same dtype-rounded arrays, and the offsets are multiples of
2^-10 below 64 in magnitude, so every sample point is exact in the accumulation dtype and
both sides pick the same cells.
"""

from __future__ import annotations

import numpy as np
import pytest

from cupydcn.deform_conv import second_order_cuda
from cupydcn.deform_conv.second_order import TERM_NAMES, offset_second_order
from cupydcn.deform_conv.spec import conv_geometry
from support import DTYPE_NAMES, assert_close, dtype_of, on_device, seeded, to_numpy

SECOND_ORDER_KERNELS = {
    "deform_conv_second_order_columns",
    "deform_conv_second_order_coord",
    "deform_conv_second_order_input",
}


def _out(size, k, s, p, d):
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


CONFIGS = {
    # DCNv2: 2 groups, 2 offset groups, geometric options differing in H and W
    "dcnv2": dict(
        n=2,
        c=4,
        h=5,
        w=6,
        c_out=6,
        k=(2, 3),
        groups=2,
        offset_groups=2,
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        mask=True,
    ),
    # DCNv1, one group, 3 channels per offset group
    "dcnv1": dict(
        n=1,
        c=3,
        h=4,
        w=5,
        c_out=2,
        k=(3, 2),
        groups=1,
        offset_groups=1,
        stride=(1, 2),
        padding=(2, 0),
        dilation=(2, 1),
        mask=False,
    ),
    # 1x1 kernel, 4 offset groups of one channel, mask
    "pointwise": dict(
        n=1,
        c=4,
        h=3,
        w=3,
        c_out=4,
        k=(1, 1),
        groups=4,
        offset_groups=4,
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        mask=True,
    ),
}


def _offsets(r, cfg, shape):
    """Offsets [n, G*2K, oh, ow]: a mix of fractions (multiples of 2^-10), integers
    (points on kinks), points exactly on the map's edges (-1, 0, size - 1, size) and
    half a pixel outside, far outside, NaN and infinite."""
    n, two_taps, oh, ow = shape
    kh, kw = cfg["k"]
    taps = kh * kw
    base = np.empty(shape)
    tap = np.arange(two_taps) // 2 % taps
    for axis, (_size_name, s, p, d, ki) in enumerate(
        (
            ("h", cfg["stride"][0], cfg["padding"][0], cfg["dilation"][0], tap // kw),
            ("w", cfg["stride"][1], cfg["padding"][1], cfg["dilation"][1], tap % kw),
        )
    ):
        out = np.arange(oh if axis == 0 else ow) * s - p
        grid = out[:, None] if axis == 0 else out[None, :]
        rows = (np.arange(two_taps) % 2) == axis
        base[:, rows] = grid[None, None] + (ki[rows] * d)[None, :, None, None]
    size = np.where((np.arange(two_taps) % 2) == 0, cfg["h"], cfg["w"])[None, :, None, None]
    kind = r.integers(0, 10, shape)
    fraction = r.integers(-2, 2, shape) + r.integers(1, 1024, shape) / 1024.0
    edge_target = np.choose(
        r.integers(0, 6, shape),
        [
            -1.0,
            0.0,
            size - 1.0 + 0 * base,
            size + 0.0 * base,
            -0.5 + 0 * base,
            size - 0.5 + 0 * base,
        ],
    )
    offset = np.select(
        [kind < 4, kind == 4, kind == 5, kind == 6, kind == 7, kind == 8],
        [
            fraction,
            r.integers(-2, 3, shape).astype(float),
            edge_target - base,
            r.choice([-40.0, -3.0, 8.0, 50.0], shape),
            np.full(shape, np.nan),
            r.choice([-np.inf, np.inf], shape),
        ],
        default=fraction,
    )
    return offset


def problem(name: str, dtype_name: str, *, batch=None) -> tuple[dict, dict]:
    """Arguments (NumPy, in the dtype) and options of a configuration."""
    cfg = CONFIGS[name]
    r = seeded("second_order", name, dtype_name)
    n = cfg["n"] if batch is None else batch
    kh, kw = cfg["k"]
    oh = _out(cfg["h"], kh, cfg["stride"][0], cfg["padding"][0], cfg["dilation"][0])
    ow = _out(cfg["w"], kw, cfg["stride"][1], cfg["padding"][1], cfg["dilation"][1])
    taps = cfg["offset_groups"] * kh * kw
    offset_shape = (n, 2 * taps, oh, ow)
    dtype = dtype_of(dtype_name)
    arrays = dict(
        grad_output=r.standard_normal((n, cfg["c_out"], oh, ow)),
        input=r.standard_normal((n, cfg["c"], cfg["h"], cfg["w"])),
        offset=_offsets(r, cfg, offset_shape),
        weight=r.standard_normal((cfg["c_out"], cfg["c"] // cfg["groups"], kh, kw)),
        mask=r.uniform(0.2, 1.0, (n, taps, oh, ow)) if cfg["mask"] else None,
        offset_tangent=r.standard_normal(offset_shape),
    )
    arrays = {k: None if v is None else v.astype(dtype) for k, v in arrays.items()}
    return arrays, {k: cfg[k] for k in ("stride", "padding", "dilation")}


def _compare(got: dict, expected: dict, dtype_name: str, what: str) -> None:
    assert list(got) == list(expected), what
    for term, value in expected.items():
        actual = to_numpy(got[term])
        assert actual.dtype == value.dtype, f"{what} {term}: dtype {actual.dtype}"
        assert np.isfinite(actual).all(), f"{what} {term}: not finite"
        assert_close(actual, value, dtype_name, f"{what} {term}")


@pytest.mark.parametrize("index_bits", [None, 64])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernels_match_numpy(launcher, name, dtype_name, index_bits):
    arrays, opts = problem(name, dtype_name)
    expected = offset_second_order(*arrays.values(), **opts)
    assert set(expected) == set(TERM_NAMES) - ({"mask"} if arrays["mask"] is None else set())
    for term, value in expected.items():  # the problem reaches every term
        assert np.abs(value.astype(np.float64)).max() > 0, term
    device = on_device(launcher, *arrays.values())
    start = len(getattr(launcher, "launches", []))
    got = second_order_cuda.offset_second_order(launcher, *device, **opts, index_bits=index_bits)
    _compare(got, expected, dtype_name, f"{name}")
    launches = getattr(launcher, "launches", [])[start:]
    ours = [rec for rec in launches if rec.kernel in SECOND_ORDER_KERNELS]
    assert {rec.kernel for rec in ours} == SECOND_ORDER_KERNELS
    if index_bits is not None:
        assert {rec.index_bits for rec in launches} == {index_bits}
    else:
        assert {rec.index_bits for rec in launches} == {32}


@pytest.mark.parametrize(
    "wrt",
    [
        ("grad_output",),
        ("weight",),
        ("input",),
        ("offset",),
        ("mask",),
        ("offset", "mask"),
        ("grad_output", "input", "weight"),
    ],
)
def test_subsets_of_terms(launcher, wrt):
    arrays, opts = problem("dcnv2", "float32")
    expected = offset_second_order(*arrays.values(), **opts, wrt=wrt)
    start = len(getattr(launcher, "launches", []))
    got = second_order_cuda.offset_second_order(
        launcher, *on_device(launcher, *arrays.values()), **opts, wrt=wrt
    )
    _compare(got, expected, "float32", f"wrt={wrt}")
    launched = {rec.kernel for rec in getattr(launcher, "launches", [])[start:]}
    needed = {
        "deform_conv_second_order_columns": {"grad_output", "weight"},
        "deform_conv_second_order_coord": {"offset", "mask"},
        "deform_conv_second_order_input": {"input"},
    }
    assert launched & SECOND_ORDER_KERNELS == {k for k, names in needed.items() if names & set(wrt)}


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_batch_zero(launcher, dtype_name):
    arrays, opts = problem("dcnv2", dtype_name, batch=0)
    expected = offset_second_order(*arrays.values(), **opts)
    got = second_order_cuda.offset_second_order(
        launcher, *on_device(launcher, *arrays.values()), **opts
    )
    assert list(got) == list(expected)
    for term, value in expected.items():
        actual = to_numpy(got[term])
        assert actual.shape == value.shape and actual.dtype == value.dtype, term
        np.testing.assert_array_equal(actual, value, err_msg=term)


def test_points_all_invalid_contribute_nothing(launcher):
    """NaN, infinite and far sample points only: every term is zero."""
    arrays, opts = problem("dcnv1", "float32")
    offset = arrays["offset"]
    offset[...] = np.resize(
        np.array([np.nan, np.inf, -np.inf, 1e30, -60.0], np.float32), offset.shape
    )
    expected = offset_second_order(*arrays.values(), **opts)
    got = second_order_cuda.offset_second_order(
        launcher, *on_device(launcher, *arrays.values()), **opts
    )
    for term, value in expected.items():
        assert not np.any(value), term
        np.testing.assert_array_equal(to_numpy(got[term]), value, err_msg=term)


def test_refusals_are_numpys(launcher):
    arrays, opts = problem("dcnv1", "float32")
    device = on_device(launcher, *arrays.values())
    with pytest.raises(ValueError, match="padding_mode='zeros' only"):
        second_order_cuda.offset_second_order(launcher, *device, **opts, padding_mode="border")
    with pytest.raises(ValueError, match="offset_tangent has shape"):
        second_order_cuda.offset_second_order(launcher, *device[:-1], device[-1][:, :2], **opts)


# ---------------------------------------------------------------------------- dispatch
def test_public_function_dispatches_non_numpy_arrays_on_the_cpu():
    """torch CPU tensors go through the dispatch to the NumPy code, results in torch."""
    torch = pytest.importorskip("torch")
    arrays, opts = problem("dcnv2", "float64")
    expected = offset_second_order(*arrays.values(), **opts)
    tensors = [None if a is None else torch.from_numpy(a) for a in arrays.values()]
    got = offset_second_order(*tensors, **opts, wrt=("input", "mask", "weight"))
    assert list(got) == ["input", "weight", "mask"]
    for term, value in got.items():
        assert isinstance(value, torch.Tensor)
        np.testing.assert_array_equal(value.numpy(), expected[term], err_msg=term)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["float64", "float16"])
def test_public_function_runs_cupy_arrays_on_the_kernels(dtype_name):
    cupy = pytest.importorskip("cupy")
    arrays, opts = problem("dcnv2", dtype_name)
    expected = offset_second_order(*arrays.values(), **opts)
    got = offset_second_order(
        *(None if a is None else cupy.asarray(a) for a in arrays.values()), **opts
    )
    assert all(isinstance(v, cupy.ndarray) for v in got.values())
    _compare(got, expected, dtype_name, "cupy")


@pytest.mark.gpu
def test_torch_op_runs_on_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    import cupydcn.torch  # noqa: F401  (registers the ops)

    arrays, opts = problem("dcnv2", "float32")
    expected = offset_second_order(*arrays.values(), **opts)
    tensors = [torch.from_numpy(a).cuda() for a in arrays.values()]
    option_args = [list(opts["stride"]), list(opts["padding"]), list(opts["dilation"]), "zeros"]
    got = torch.ops.cupydcn.deform_conv2d_offset_second_order(*tensors, *option_args, [True] * 5)
    _compare(dict(zip(TERM_NAMES, got)), expected, "float32", "torch cuda")


def test_geometry_of_problems_is_valid():
    for name in CONFIGS:
        arrays, opts = problem(name, "float32")
        conv_geometry(
            arrays["input"],
            arrays["offset"],
            arrays["weight"],
            None,
            arrays["mask"],
            **opts,
            grad_output=arrays["grad_output"],
        )
