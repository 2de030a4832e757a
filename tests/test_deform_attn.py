"""The deformable-attention family (cupydcn.deform_attn): multi_scale_deformable_attn,
dcnv3, dcnv4 and their backward on the NumPy backend.

Against the float64 loop references (tests/reference_deform_attn.py, written from
docs/semantics.md §8), central finite differences, every dtype against float64, every
``wrt`` subset, the array boundary (torch, JAX, non-contiguous, never written), an
independent cross-check against ``torch.nn.functional.grid_sample`` (mmcv's pure-PyTorch
MSDA and InternImage's ``dcnv3_core_pytorch``, transcribed from their math), and the
validation table (each bad input refused, the argument named, no backend reached).

Tolerances (tests/support.py), elementwise, scale = the largest |reference| of the
tensor: float64 1e-12 * scale; float32 1e-5 * scale; the half types 2u * |ref| + 1e-5 *
scale (u = 2**-11, 2**-8): they compute in float32 and round once. Low-precision inputs
are quantised first and the reference runs on the quantised values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from cupydcn.core.errors import (
    CupydcnError,
    CupydcnTypeError,
    CupydcnValueError,
)
from cupydcn.deform_attn import (
    Dcnv3Grads,
    Dcnv4Grads,
    MsdaGrads,
    cuda_backend,
    dcnv3,
    dcnv3_backward,
    dcnv4,
    dcnv4_backward,
    multi_scale_deformable_attn,
    multi_scale_deformable_attn_backward,
)
from cupydcn.deform_attn import numpy_backend as _backend
from reference_deform_attn import (
    dcn_options,
    dcn_output_size,
    dcn_taps,
    dcnv3_reference,
    dcnv4_reference,
    msda_reference,
    pack_offset_mask,
)
from support import DTYPE_NAMES, assert_close, dtype_of, seeded, strided_copy

torch = pytest.importorskip("torch")
F = torch.nn.functional

# ---------------------------------------------------------------------------- MSDA problems


@dataclass(frozen=True)
class MsdaCase:
    batch: int = 2
    queries: int = 4
    heads: int = 2
    head_dim: int = 3
    shapes: tuple = ((4, 5), (2, 3), (1, 1))
    points: int = 2
    low: float = -0.3  # sampling locations uniform in [low, high]
    high: float = 1.3
    special: bool = True  # edges, exact pixel kinks, far outside, inf and NaN points

    @property
    def keys(self) -> int:
        return sum(h * w for h, w in self.shapes)

    @property
    def starts(self) -> list[int]:
        return [int(s) for s in np.cumsum([0] + [h * w for h, w in self.shapes])[:-1]]

    def arrays(self, rng) -> dict:
        n, q, m, lv, p = self.batch, self.queries, self.heads, len(self.shapes), self.points
        value = rng.standard_normal((n, self.keys, m, self.head_dim))
        loc = rng.uniform(self.low, self.high, (n, q, m, lv, p, 2))
        weights = rng.standard_normal((n, q, m, lv, p))
        if self.special and loc.size:
            flat = loc.reshape(-1, lv, p, 2)
            h, w = self.shapes[0]
            # pixel = x * W - 0.5: -1 (outer edge), 0, W - 1, W, an interior integer
            specials = [
                (-0.5 / w, 0.5 / h),
                (0.5 / w, -0.5 / h),
                ((w - 0.5) / w, (h - 0.5) / h),
                ((w + 0.5) / w, 0.25),
                (1.5 / w, 1.5 / h),
                (4.0, -3.0),
                (-1e30, 0.5),
                (math.inf, 0.5),
                (0.5, -math.inf),
                (math.nan, 0.5),
            ]
            for i, xy in enumerate(specials[: flat.shape[0] * p]):
                flat[i // p, 0, i % p] = xy
        return {"value": value, "sampling_locations": loc, "attention_weights": weights}


MSDA_CASES = {
    "three_levels": MsdaCase(),
    "one_level": MsdaCase(shapes=((3, 4),), points=3),
    "head_dim_1_odd_batch": MsdaCase(batch=3, head_dim=1, heads=3, queries=2),
    "head_dim_5_four_levels": MsdaCase(
        batch=1, head_dim=5, shapes=((6, 2), (3, 3), (2, 1), (1, 4)), points=1
    ),
    "inside_only": MsdaCase(low=0.0, high=1.0, special=False, points=4),
    "far_outside": MsdaCase(low=-2.0, high=3.0, special=False),
}


def _msda(arrays, case, **kwargs):
    return multi_scale_deformable_attn(
        arrays["value"],
        case.shapes,
        case.starts,
        arrays["sampling_locations"],
        arrays["attention_weights"],
        **kwargs,
    )


def _msda_backward(grad, arrays, case, **kwargs):
    return multi_scale_deformable_attn_backward(
        grad,
        arrays["value"],
        case.shapes,
        case.starts,
        arrays["sampling_locations"],
        arrays["attention_weights"],
        **kwargs,
    )


def _msda_ref(arrays, case, grad=None):
    return msda_reference(
        arrays["value"],
        case.shapes,
        arrays["sampling_locations"],
        arrays["attention_weights"],
        grad_output=grad,
    )


# ---------------------------------------------------------------------------- DCN problems


@dataclass(frozen=True)
class DcnCase:
    batch: int = 2
    height: int = 5
    width: int = 6
    options: dict = field(
        default_factory=lambda: dict(
            kernel_size=3,
            stride=1,
            padding=1,
            dilation=1,
            group=2,
            group_channels=3,
            offset_scale=1.0,
            remove_center=False,
        )
    )
    offset_std: float = 1.5
    special: bool = True  # integer offsets (exact kinks), NaN and inf offsets
    packed_pad: int = 3  # dcnv4: extra padding of the last dimension

    @property
    def points(self) -> int:
        return len(dcn_taps(self.options["kernel_size"], self.options["remove_center"]))

    @property
    def out_size(self):
        o = self.options
        return dcn_output_size(
            self.height, self.width, o["kernel_size"], o["stride"], o["padding"], o["dilation"]
        )

    def arrays(self, rng) -> dict:
        g, cg, p = self.options["group"], self.options["group_channels"], self.points
        ho, wo = self.out_size
        x = rng.standard_normal((self.batch, self.height, self.width, g * cg))
        offset = rng.standard_normal((self.batch, ho, wo, g * p * 2)) * self.offset_std
        mask = rng.uniform(-0.5, 1.5, (self.batch, ho, wo, g * p))
        if self.special and offset.size:
            flat = offset.reshape(-1)
            flat[:12] = np.round(flat[:12])  # integer offsets: samples on pixel kinks
            flat[12:16] = [math.nan, 1e30, -math.inf, 40.0]
        return {"input": x, "offset": offset, "mask": mask}


DCN_CASES = {
    "3x3_pad1": DcnCase(),
    "non_square_hw_options": DcnCase(
        height=7,
        width=6,
        options=dcn_options(
            kernel_size=(3, 2),
            stride=(2, 1),
            padding=(2, 0),
            dilation=(1, 2),
            group=3,
            group_channels=2,
        ),
    ),
    "remove_center_3x5": DcnCase(
        height=6,
        width=7,
        options=dcn_options(
            kernel_size=(3, 5), padding=(1, 2), remove_center=True, group=1, group_channels=4
        ),
    ),
    "offset_scale_half": DcnCase(options=dcn_options(offset_scale=0.5, dilation=2, padding=2)),
    "offset_scale_odd": DcnCase(special=False, options=dcn_options(offset_scale=1.7, stride=2)),
    "1x1_odd_batch": DcnCase(
        batch=3,
        height=3,
        width=4,
        options=dcn_options(kernel_size=1, padding=0, group=4, group_channels=1),
    ),
    "5x5_group_channels_5": DcnCase(
        batch=1,
        height=6,
        width=6,
        options=dcn_options(kernel_size=5, padding=2, group=1, group_channels=5),
    ),
}


def _dcnv3(arrays, case, **kw):
    return dcnv3(arrays["input"], arrays["offset"], arrays["mask"], **case.options, **kw)


def _dcnv3_backward(grad, arrays, case, **kw):
    return dcnv3_backward(
        grad, arrays["input"], arrays["offset"], arrays["mask"], **case.options, **kw
    )


def _packed(arrays, case):
    o = case.options
    dim = o["group"] * 3 * case.points + case.packed_pad
    return pack_offset_mask(arrays["offset"], arrays["mask"], o["group"], case.points, dim)


# ---------------------------------------------------------------------------- vs reference


def _assert_grads(grads, expected, names, dtype_name="float64"):
    for name, actual, wanted in zip(names, grads, expected):
        assert actual is not None, name
        assert actual.dtype == dtype_of(dtype_name) and actual.flags.c_contiguous, name
        assert_close(actual, wanted, dtype_name, f"grad_{name}")


@pytest.mark.parametrize("name", MSDA_CASES)
def test_msda_matches_reference(name):
    case = MSDA_CASES[name]
    rng = seeded("msda", name)
    arrays = case.arrays(rng)
    out = _msda(arrays, case)
    assert out.dtype == np.float64 and out.flags.c_contiguous
    grad = rng.standard_normal(out.shape)
    expected, expected_grads = _msda_ref(arrays, case, grad)
    assert_close(out, expected, "float64", "output")
    grads = _msda_backward(grad, arrays, case)
    assert isinstance(grads, MsdaGrads)
    _assert_grads(grads, expected_grads, ("value", "sampling_locations", "attention_weights"))


@pytest.mark.parametrize("name", DCN_CASES)
def test_dcnv3_and_dcnv4_match_reference(name):
    case = DCN_CASES[name]
    rng = seeded("dcn", name)
    arrays = case.arrays(rng)
    out = _dcnv3(arrays, case)
    grad = rng.standard_normal(out.shape)
    expected, expected_grads = dcnv3_reference(**arrays, **case.options, grad_output=grad)
    assert_close(out, expected, "float64", "dcnv3 output")
    grads = _dcnv3_backward(grad, arrays, case)
    assert isinstance(grads, Dcnv3Grads)
    _assert_grads(grads, expected_grads, ("input", "offset", "mask"))

    clean = _packed(arrays, case)
    packed = clean.copy()
    packed[..., case.options["group"] * 3 * case.points :] = np.nan  # never read
    out4 = dcnv4(arrays["input"], packed, **case.options)
    np.testing.assert_array_equal(out4, out)  # the same function, the same arithmetic
    grads4 = dcnv4_backward(grad, arrays["input"], packed, **case.options)
    assert isinstance(grads4, Dcnv4Grads)
    _, expected4 = dcnv4_reference(arrays["input"], clean, **case.options, grad_output=grad)
    _assert_grads(grads4, expected4, ("input", "offset_mask"))
    assert not np.any(grads4.grad_offset_mask[..., case.options["group"] * 3 * case.points :])


def test_kinks_follow_deform_conv2d_convention():
    """A point exactly on the outer edge (pixel -1) has value 0 and the slope into the map
    (right-sided); at pixel H - 1 the right-sided slope towards the outside; beyond
    (-2, size + 1) and at infinity 0; NaN: NaN coordinate gradients, nothing to value."""
    shapes = ((3, 4),)
    value = np.arange(12, dtype=np.float64).reshape(1, 12, 1, 1) + 1.0
    xs = [(-0.5 / 4, 0.5 / 3), ((4 - 0.5) / 4, (3 - 0.5) / 3), (2.5, 0.5), (math.nan, 0.5)]
    loc = np.array(xs, dtype=np.float64).reshape(1, 1, 1, 1, 4, 2)
    weights = np.ones((1, 1, 1, 1, 4))
    grad = np.ones((1, 1, 1))
    g = multi_scale_deformable_attn_backward(grad, value, shapes, None, loc, weights)
    gl = g.grad_sampling_locations[0, 0, 0, 0]
    plane = value.reshape(3, 4)
    # point 0: pixel (-1, 0): d/dpx = the value at (0, 0) minus the outside 0, times W = 4;
    # d/dpy reads column -1 only (weight 1 - lx = 1): 0
    assert gl[0, 0] == 4 * plane[0, 0] and gl[0, 1] == 0
    # point 1: pixel (W - 1, H - 1) = (3, 2): right-sided, towards the outside
    assert gl[1, 0] == 4 * (0 - plane[2, 3]) and gl[1, 1] == 3 * (0 - plane[2, 3])
    assert np.all(gl[2] == 0)
    assert np.all(np.isnan(gl[3]))
    assert np.isnan(g.grad_attention_weights[0, 0, 0, 0, 3])
    assert np.all(np.isfinite(g.grad_value))
    out = multi_scale_deformable_attn(value, shapes, None, loc[..., :3, :], weights[..., :3])
    assert out[0, 0, 0] == 0 + plane[2, 3] + 0


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("op", ["msda", "dcnv3", "dcnv4"])
def test_every_dtype_against_float64(op, dtype_name):
    dtype = dtype_of(dtype_name)
    rng = seeded("dtype", op, dtype_name)
    if op == "msda":
        case = replace(MSDA_CASES["three_levels"], special=False, head_dim=4)
        arrays = {k: v.astype(dtype) for k, v in case.arrays(rng).items()}
        exact = {k: v.astype(np.float64) for k, v in arrays.items()}
        out = _msda(arrays, case)
        grad = rng.standard_normal(out.shape).astype(dtype)
        grads = _msda_backward(grad, arrays, case)
        expected, expected_grads = _msda_ref(exact, case, grad.astype(np.float64))
        names = ("value", "sampling_locations", "attention_weights")
    else:
        case = replace(DCN_CASES["non_square_hw_options"], special=False)
        arrays = {k: v.astype(dtype) for k, v in case.arrays(rng).items()}
        exact = {k: v.astype(np.float64) for k, v in arrays.items()}
        grad = rng.standard_normal((case.batch, *case.out_size, 6)).astype(dtype)
        if op == "dcnv3":
            out = _dcnv3(arrays, case)
            grads = _dcnv3_backward(grad, arrays, case)
            expected, expected_grads = dcnv3_reference(
                **exact, **case.options, grad_output=grad.astype(np.float64)
            )
            names = ("input", "offset", "mask")
        else:
            packed = _packed(arrays, case)
            out = dcnv4(arrays["input"], packed, **case.options)
            grads = dcnv4_backward(grad, arrays["input"], packed, **case.options)
            expected, expected_grads = dcnv4_reference(
                exact["input"],
                packed.astype(np.float64),
                **case.options,
                grad_output=grad.astype(np.float64),
            )
            names = ("input", "offset_mask")
    assert out.dtype == dtype
    assert_close(out, expected, dtype_name, f"{op} output")
    _assert_grads(grads, expected_grads, names, dtype_name)


# ---------------------------------------------------------------------------- finite differences


def _central_difference(f, array, index, eps):
    plus, minus = array.copy(), array.copy()
    plus[index] += eps
    minus[index] -= eps
    return (f(plus) - f(minus)) / (2 * eps)


def _fd_check(loss_of, arrays, name, analytic, safe=None, eps=1e-6, samples=40, rng=None):
    """Central differences of the scalar ``loss_of(arrays)`` along ``samples`` random
    elements of ``arrays[name]`` (those where ``safe``) against ``analytic``."""
    base = arrays[name]
    candidates = np.argwhere(np.ones(base.shape, bool) if safe is None else safe)
    assert len(candidates) > 0
    picks = candidates[rng.choice(len(candidates), min(samples, len(candidates)), replace=False)]
    for index in map(tuple, picks):
        numeric = _central_difference(lambda a: loss_of({**arrays, name: a}), base, index, eps)
        assert abs(numeric - analytic[index]) <= 1e-6 * (1 + abs(numeric)), (name, index)


def _away_from_integers(pixels, margin=1e-3):
    return np.abs(pixels - np.round(pixels)) > margin


def test_msda_gradients_match_finite_differences():
    case = replace(MSDA_CASES["three_levels"], special=False, batch=1, queries=3)
    rng = seeded("fd-msda")
    arrays = case.arrays(rng)
    grad = rng.standard_normal((case.batch, case.queries, case.heads * case.head_dim))
    grads = _msda_backward(grad, arrays, case)

    def loss(a):
        return float(np.sum(_msda(a, case) * grad))

    sizes = np.array([[w, h] for h, w in case.shapes], dtype=np.float64)  # (x: W, y: H)
    pixels = arrays["sampling_locations"] * sizes[:, None, :] - 0.5
    safe = _away_from_integers(pixels).all(axis=-1, keepdims=True) & np.ones(pixels.shape, bool)
    _fd_check(loss, arrays, "sampling_locations", grads.grad_sampling_locations, safe, rng=rng)
    _fd_check(loss, arrays, "attention_weights", grads.grad_attention_weights, rng=rng)
    _fd_check(loss, arrays, "value", grads.grad_value, rng=rng)


@pytest.mark.parametrize("op", ["dcnv3", "dcnv4"])
def test_dcn_gradients_match_finite_differences(op):
    case = replace(
        DCN_CASES["non_square_hw_options"],
        special=False,
        batch=1,
        options=dcn_options(
            kernel_size=(3, 2),
            stride=(2, 1),
            padding=(2, 0),
            dilation=(1, 2),
            group=3,
            group_channels=2,
            offset_scale=0.8,
        ),
    )
    rng = seeded("fd", op)
    arrays = case.arrays(rng)
    grad = rng.standard_normal((case.batch, *case.out_size, 6))
    if op == "dcnv3":
        grads = _dcnv3_backward(grad, arrays, case)

        def loss(a):
            return float(np.sum(_dcnv3(a, case) * grad))

        checks = (
            ("offset", grads.grad_offset),
            ("mask", grads.grad_mask),
            ("input", grads.grad_input),
        )
        fd_arrays = arrays
    else:
        fd_arrays = {"input": arrays["input"], "offset_mask": _packed(arrays, case)}
        grads = dcnv4_backward(grad, fd_arrays["input"], fd_arrays["offset_mask"], **case.options)

        def loss(a):
            return float(np.sum(dcnv4(a["input"], a["offset_mask"], **case.options) * grad))

        checks = (("offset_mask", grads.grad_offset_mask), ("input", grads.grad_input))
    for name, analytic in checks:
        # offsets move the points by offset_scale * offset: FD steps stay inside one cell
        # for all but a vanishing fraction of random points (their error would show)
        _fd_check(loss, fd_arrays, name, analytic, rng=rng)


# ---------------------------------------------------------------------------- wrt, empties


@pytest.mark.parametrize("op", ["msda", "dcnv3", "dcnv4"])
def test_every_wrt_subset(op):
    import itertools

    rng = seeded("wrt", op)
    if op == "msda":
        case = MSDA_CASES["one_level"]
        arrays = case.arrays(rng)
        grad = rng.standard_normal(_msda(arrays, case).shape)
        names = ("value", "sampling_locations", "attention_weights")

        def call(wrt):
            return _msda_backward(grad, arrays, case, wrt=wrt)
    else:
        case = DCN_CASES["3x3_pad1"]
        arrays = case.arrays(rng)
        grad = rng.standard_normal((case.batch, *case.out_size, 6))
        if op == "dcnv3":
            names = ("input", "offset", "mask")

            def call(wrt):
                return _dcnv3_backward(grad, arrays, case, wrt=wrt)
        else:
            names = ("input", "offset_mask")
            packed = _packed(arrays, case)

            def call(wrt):
                return dcnv4_backward(grad, arrays["input"], packed, **case.options, wrt=wrt)

    full = call(None)
    for size in range(len(names) + 1):
        for subset in itertools.combinations(names, size):
            got = call(subset)
            for name, whole, part in zip(names, full, got):
                if name in subset:
                    np.testing.assert_array_equal(part, whole, err_msg=f"{subset}: {name}")
                else:
                    assert part is None, (subset, name)
    assert call(names[0])[0] is not None  # a single name
    with pytest.raises(CupydcnValueError, match="wrt names"):
        call(("bias",))


def test_empty_batches_queries_and_points():
    case = MsdaCase(batch=0)
    arrays = case.arrays(seeded("empty"))
    assert _msda(arrays, case).shape == (0, 4, 6)
    g = _msda_backward(np.zeros((0, 4, 6)), arrays, case)
    assert g.grad_value.shape == (0, case.keys, 2, 3)
    assert g.grad_sampling_locations.shape == (0, 4, 2, 3, 2, 2)
    for empty in (MsdaCase(queries=0), MsdaCase(points=0)):
        arrays = empty.arrays(seeded("empty", empty.queries))
        out = _msda(arrays, empty)
        assert out.shape == (2, empty.queries, 6) and not out.any()
        g = _msda_backward(np.ones(out.shape), arrays, empty)
        assert g.grad_value.shape == arrays["value"].shape and not g.grad_value.any()
    case = replace(DCN_CASES["3x3_pad1"], batch=0)
    arrays = case.arrays(seeded("empty-dcn"))
    assert _dcnv3(arrays, case).shape == (0, 5, 6, 6)
    g = _dcnv3_backward(np.zeros((0, 5, 6, 6)), arrays, case)
    assert [a.shape for a in g] == [(0, 5, 6, 6), (0, 5, 6, 36), (0, 5, 6, 18)]
    g4 = dcnv4_backward(
        np.zeros((0, 5, 6, 6)), arrays["input"], _packed(arrays, case), **case.options
    )
    assert g4.grad_offset_mask.shape == (0, 5, 6, 57)


def test_chunks_give_the_unchunked_results(monkeypatch):
    """A tiny workspace (one unit per chunk) changes nothing but the chunking."""
    rng = seeded("chunks")
    case = MSDA_CASES["three_levels"]
    arrays = case.arrays(rng)
    grad = rng.standard_normal((2, 4, 6))
    dcase = DCN_CASES["non_square_hw_options"]
    darrays = dcase.arrays(rng)
    dgrad = rng.standard_normal((2, *dcase.out_size, 6))

    def run():
        return (
            _msda(arrays, case),
            _msda_backward(grad, arrays, case),
            _dcnv3(darrays, dcase),
            _dcnv3_backward(dgrad, darrays, dcase),
        )

    whole = run()
    monkeypatch.setattr(_backend, "_WORKSPACE_BYTES", 1)
    assert _backend._units_per_chunk(2, 6, 3, np.dtype(np.float64)) == 1
    chunked = run()
    for a, b in zip(whole, chunked):
        if not isinstance(a, tuple):
            np.testing.assert_array_equal(a, b)
            continue
        # the value / input gradient sums its scatter in a chunk-dependent order
        np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-14 * np.abs(a[0]).max())
        for x, y in zip(a[1:], b[1:]):
            np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------- array boundary


def test_inputs_are_never_written_and_strided_inputs_work():
    rng = seeded("strided")
    case = MSDA_CASES["three_levels"]
    arrays = case.arrays(rng)
    grad = rng.standard_normal((2, 4, 6))
    strided = {k: strided_copy(np, v) for k, v in arrays.items()}
    copies = {k: v.copy() for k, v in strided.items()}
    np.testing.assert_array_equal(_msda(strided, case), _msda(arrays, case))
    for a, b in zip(
        _msda_backward(strided_copy(np, grad), strided, case), _msda_backward(grad, arrays, case)
    ):
        np.testing.assert_array_equal(a, b)
    for k in strided:
        np.testing.assert_array_equal(strided[k], copies[k])

    dcase = DCN_CASES["3x3_pad1"]
    darrays = dcase.arrays(rng)
    dgrad = rng.standard_normal((2, *dcase.out_size, 6))
    dstrided = {k: strided_copy(np, v) for k, v in darrays.items()}
    dcopies = {k: v.copy() for k, v in dstrided.items()}
    np.testing.assert_array_equal(_dcnv3(dstrided, dcase), _dcnv3(darrays, dcase))
    for a, b in zip(
        _dcnv3_backward(strided_copy(np, dgrad), dstrided, dcase),
        _dcnv3_backward(dgrad, darrays, dcase),
    ):
        np.testing.assert_array_equal(a, b)
    packed = _packed(darrays, dcase)
    packed_t = np.asfortranarray(packed)
    before = packed_t.copy()
    np.testing.assert_array_equal(
        dcnv4(dstrided["input"], packed_t, **dcase.options),
        dcnv4(darrays["input"], packed, **dcase.options),
    )
    for a, b in zip(
        dcnv4_backward(dgrad, dstrided["input"], packed_t, **dcase.options),
        dcnv4_backward(dgrad, darrays["input"], packed, **dcase.options),
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(packed_t, before)
    for k in dstrided:
        np.testing.assert_array_equal(dstrided[k], dcopies[k])


def test_torch_round_trip_with_tensor_spatial_shapes():
    rng = seeded("torch")
    case = MSDA_CASES["three_levels"]
    arrays = case.arrays(rng)
    expected = _msda(arrays, case)
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    shapes = torch.tensor(case.shapes, dtype=torch.int64)
    starts = torch.tensor(case.starts, dtype=torch.int64)
    out = multi_scale_deformable_attn(
        t["value"], shapes, starts, t["sampling_locations"], t["attention_weights"]
    )
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), expected)
    grad = torch.from_numpy(rng.standard_normal(tuple(out.shape)))
    grads = multi_scale_deformable_attn_backward(
        grad, t["value"], shapes, starts, t["sampling_locations"], t["attention_weights"]
    )
    assert isinstance(grads, MsdaGrads) and all(isinstance(g, torch.Tensor) for g in grads)
    dcase = DCN_CASES["3x3_pad1"]
    darrays = dcase.arrays(rng)
    td = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in darrays.items()}
    out = dcnv3(td["input"], td["offset"], td["mask"], **dcase.options)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    np_bf16 = {k: v.astype(dtype_of("bfloat16")) for k, v in darrays.items()}
    np.testing.assert_array_equal(out.float().numpy(), _dcnv3(np_bf16, dcase).astype(np.float32))


def test_jax_round_trip():
    jnp = pytest.importorskip("jax.numpy")
    rng = seeded("jax")
    case = MSDA_CASES["three_levels"]
    arrays = {k: v.astype(np.float32) for k, v in case.arrays(rng).items()}
    j = {k: jnp.asarray(v) for k, v in arrays.items()}
    out = multi_scale_deformable_attn(
        j["value"],
        jnp.asarray(case.shapes, dtype=jnp.int32),
        jnp.asarray(case.starts, dtype=jnp.int32),
        j["sampling_locations"],
        j["attention_weights"],
    )
    assert type(out).__module__.startswith("jax")
    np.testing.assert_array_equal(np.asarray(out), _msda(arrays, case))
    dcase = DCN_CASES["3x3_pad1"]
    darrays = {k: v.astype(np.float32) for k, v in dcase.arrays(rng).items()}
    packed = _packed(darrays, dcase)
    out4 = dcnv4(jnp.asarray(darrays["input"]), jnp.asarray(packed), **dcase.options)
    assert type(out4).__module__.startswith("jax")
    np.testing.assert_array_equal(
        np.asarray(out4), dcnv4(darrays["input"], packed, **dcase.options)
    )


# ---------------------------------------------------------------------------- grid_sample


def msda_grid_sample(value, shapes, locations, weights):
    """mmcv's multi_scale_deformable_attn_pytorch, from its math: per level, value as
    [N*M, D, H_l, W_l], grid 2 * loc - 1, grid_sample(bilinear, zeros, align_corners=False),
    times the weights, summed over levels and points."""
    n, _, m, d = value.shape
    _, q, _, lv, p, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = per_level[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [N*M, D, Lq, P]
    a = weights.transpose(1, 2).reshape(n * m, 1, q, lv * p)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * a).sum(-1).view(n, m * d, q)
    return out.transpose(1, 2).contiguous()


def dcnv3_grid_sample(
    input,
    offset,
    mask,
    kernel_h,
    kernel_w,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dilation_h,
    dilation_w,
    group,
    group_channels,
    offset_scale,
    remove_center,
):
    """InternImage's dcnv3_core_pytorch, from its math (in the input's dtype): pad the
    channels-last input (the pads as that reference applies them: W by pad_h, H by
    pad_w), reference points at the centred grid + 0.5 normalised by the padded size, the
    x-major dilation grid, offsets scaled and normalised, grid_sample(align_corners=False)."""
    dtype = input.dtype
    x = F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w])
    n, h_in, w_in, _ = x.shape
    _, h_out, w_out, _ = offset.shape
    ch, cw = (dilation_h * (kernel_h - 1)) // 2, (dilation_w * (kernel_w - 1)) // 2
    ref_y = (ch + 0.5 + torch.arange(h_out, dtype=dtype) * stride_h) / h_in
    ref_x = (cw + 0.5 + torch.arange(w_out, dtype=dtype) * stride_w) / w_in
    ry, rx = torch.meshgrid(ref_y, ref_x, indexing="ij")
    ref = torch.stack((rx, ry), -1).reshape(1, h_out, w_out, 1, 2)
    gx, gy = torch.meshgrid(  # x over the kernel width (outer), y over its height
        (-cw + torch.arange(kernel_w, dtype=dtype) * dilation_w) / w_in,
        (-ch + torch.arange(kernel_h, dtype=dtype) * dilation_h) / h_in,
        indexing="ij",
    )
    taps = torch.stack((gx, gy), -1).reshape(-1, 2)  # k = iw * kh + ih
    if remove_center:
        taps = torch.cat(
            [taps[: (kernel_h * kernel_w) // 2], taps[(kernel_h * kernel_w) // 2 + 1 :]]
        )
    points = taps.shape[0]
    grid = taps.repeat(group, 1).reshape(1, 1, 1, group * points, 2)
    norm = torch.tensor([w_in, h_in], dtype=dtype)
    loc = (ref + grid * offset_scale).expand(n, -1, -1, -1, -1)
    loc = loc + offset.reshape(n, h_out, w_out, group * points, 2) * offset_scale / norm
    grids = 2 * loc - 1
    x_ = (
        x.reshape(n, h_in * w_in, group * group_channels)
        .transpose(1, 2)
        .reshape(n * group, group_channels, h_in, w_in)
    )
    g_ = grids.reshape(n, h_out * w_out, group, points, 2).transpose(1, 2).flatten(0, 1)
    sampled = F.grid_sample(
        x_, g_, mode="bilinear", padding_mode="zeros", align_corners=False
    )  # [N*G, Cg, Ho*Wo, P]
    m = (
        mask.reshape(n, h_out * w_out, group, points)
        .transpose(1, 2)
        .reshape(n * group, 1, h_out * w_out, points)
    )
    out = (sampled * m).sum(-1).view(n, group * group_channels, h_out * w_out)
    return out.transpose(1, 2).reshape(n, h_out, w_out, -1).contiguous()


def _autograd(fn, arrays, grad):
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in arrays.items()}
    out = fn(**leaves)
    out.backward(torch.from_numpy(grad))
    return out.detach().numpy(), {k: t.grad.numpy() for k, t in leaves.items()}


@pytest.mark.parametrize("special", [False, True])
def test_msda_agrees_with_grid_sample(special):
    # level sizes powers of two: grid_sample's unnormalisation ((2x - 1 + 1) W - 1) / 2
    # and x W - 0.5 then agree to the bit on the exact kink points
    case = MsdaCase(shapes=((4, 8), (2, 4), (1, 1)), special=special, points=3)
    rng = seeded("grid_sample", special)
    arrays = case.arrays(rng)
    if special:  # drop NaN / inf: grid_sample's gradient there differs (it clips)
        loc = arrays["sampling_locations"]
        loc[~np.isfinite(loc)] = 0.625
        loc[np.abs(loc) > 10] = -0.75
    out = _msda(arrays, case)
    grad = rng.standard_normal(out.shape)
    expected, grads = _autograd(
        lambda value, sampling_locations, attention_weights: msda_grid_sample(
            value, case.shapes, sampling_locations, attention_weights
        ),
        arrays,
        grad,
    )
    assert_close(out, expected, "float64", "output vs grid_sample")
    ours = _msda_backward(grad, arrays, case)
    for name, got in zip(("value", "sampling_locations", "attention_weights"), ours):
        assert_close(got, grads[name], "float64", f"grad_{name} vs grid_sample")


@pytest.mark.parametrize("name", ["3x3_pad1", "remove_center_3x3", "hw_options"])
def test_dcnv3_agrees_with_internimage_pytorch_reference(name):
    configs = {
        "3x3_pad1": dict(
            kernel_size=3,
            stride=1,
            padding=1,
            dilation=1,
            group=2,
            group_channels=3,
            offset_scale=1.0,
            remove_center=False,
        ),
        "remove_center_3x3": dict(
            kernel_size=3,
            stride=2,
            padding=1,
            dilation=2,
            group=1,
            group_channels=4,
            offset_scale=0.6,
            remove_center=True,
        ),
        # pad_h != pad_w: the PyTorch reference swaps them, so ours with (pad_h, pad_w) is
        # its call with (pad_w, pad_h)
        "hw_options": dict(
            kernel_size=(3, 5),
            stride=(1, 2),
            padding=(2, 1),
            dilation=(2, 1),
            group=3,
            group_channels=2,
            offset_scale=1.3,
            remove_center=False,
        ),
    }
    case = DcnCase(height=6, width=7, options=configs[name], special=False)
    rng = seeded("internimage", name)
    arrays = case.arrays(rng)
    out = _dcnv3(arrays, case)
    grad = rng.standard_normal(out.shape)
    o = case.options
    (kh, kw), (sh, sw) = _pairs(o["kernel_size"]), _pairs(o["stride"])
    (ph, pw), (dh, dw) = _pairs(o["padding"]), _pairs(o["dilation"])
    expected, grads = _autograd(
        lambda input, offset, mask: dcnv3_grid_sample(
            input,
            offset,
            mask,
            kh,
            kw,
            sh,
            sw,
            pw,
            ph,
            dh,
            dw,
            o["group"],
            o["group_channels"],
            o["offset_scale"],
            o["remove_center"],
        ),
        arrays,
        grad,
    )
    assert_close(out, expected, "float64", "output vs InternImage reference")
    for label, got in zip(("input", "offset", "mask"), _dcnv3_backward(grad, arrays, case)):
        assert_close(got, grads[label], "float64", f"grad_{label} vs InternImage reference")


def _pairs(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# ---------------------------------------------------------------------------- validation


@pytest.fixture
def no_backend(monkeypatch):
    """Every backend function fails: a refused call must not reach one."""

    def fail(*args, **kwargs):
        raise AssertionError("bad input reached a backend")

    for module in (_backend, cuda_backend):
        for name in (
            "msda_forward",
            "msda_backward",
            "dcnv3_forward",
            "dcnv3_backward",
            "dcnv4_forward",
            "dcnv4_backward",
        ):
            monkeypatch.setattr(module, name, fail)


def _msda_args():
    case = MsdaCase(special=False)
    args = case.arrays(seeded("bad-msda"))
    return {
        "value": args["value"],
        "spatial_shapes": [list(s) for s in case.shapes],
        "level_start_index": case.starts,
        **{k: args[k] for k in ("sampling_locations", "attention_weights")},
    }


def _dcn_args():
    case = DcnCase(special=False)
    return {**case.arrays(seeded("bad-dcn")), **case.options}


def _call(op, overrides):
    if op.startswith("msda"):
        a = {**_msda_args(), **overrides}
        positional = [
            a.pop(k)
            for k in (
                "value",
                "spatial_shapes",
                "level_start_index",
                "sampling_locations",
                "attention_weights",
            )
        ]
        if op == "msda":
            return multi_scale_deformable_attn(*positional, **a)
        grad = a.pop("grad_output", np.zeros((2, 4, 6)))
        return multi_scale_deformable_attn_backward(grad, *positional, **a)
    a = {**_dcn_args(), **overrides}
    if op.startswith("dcnv3"):
        positional = [a.pop(k) for k in ("input", "offset", "mask")]
        if op == "dcnv3":
            return dcnv3(*positional, **a)
        grad = a.pop("grad_output", np.zeros((2, 5, 6, 6)))
        return dcnv3_backward(grad, *positional, **a)
    x, offset, mask = a.pop("input"), a.pop("offset"), a.pop("mask")
    packed = a.pop("offset_mask", pack_offset_mask(offset, mask, 2, 9, 56))
    if op == "dcnv4":
        return dcnv4(x, packed, **a)
    grad = a.pop("grad_output", np.zeros((2, 5, 6, 6)))
    return dcnv4_backward(grad, x, packed, **a)


_ARGS = _msda_args()
_DCN = _dcn_args()

BAD = [
    # (op, overrides, error, fragment)
    (
        "msda",
        {"spatial_shapes": [(4, 5), (2, 3), (1, 2)]},
        CupydcnValueError,
        "spatial_shapes [(4, 5), (2, 3), (1, 2)] has sum(H_l * W_l) = 28; expected value.shape[1]",
    ),
    ("msda", {"spatial_shapes": [(4, 5), (2, 3)]}, CupydcnValueError, "level_start_index has 3"),
    (
        "msda",
        {"spatial_shapes": [(4, 5), (2, 3), (1, 1, 1)]},
        CupydcnTypeError,
        "spatial_shapes[2] must be a pair",
    ),
    (
        "msda",
        {"spatial_shapes": [(4, 5), (2, 3), (1.0, 1)]},
        CupydcnTypeError,
        "spatial_shapes[2] must be a pair",
    ),
    (
        "msda",
        {"spatial_shapes": [(4, 5), (2, 3), (0, 1)]},
        CupydcnValueError,
        "spatial_shapes[2] = (0, 1)",
    ),
    (
        "msda",
        {"spatial_shapes": np.array([[4, 5], [2, 3], [1, 1]], np.float32)},
        CupydcnTypeError,
        "spatial_shapes must be an integer array",
    ),
    (
        "msda",
        {"spatial_shapes": np.array([4, 5, 2, 3, 1, 1])},
        CupydcnValueError,
        "spatial_shapes must have shape [L, 2]",
    ),
    ("msda", {"spatial_shapes": None}, CupydcnTypeError, "spatial_shapes must be"),
    ("msda", {"spatial_shapes": []}, CupydcnValueError, "at least one level"),
    ("msda", {"spatial_shapes": "4x5"}, CupydcnTypeError, "spatial_shapes must be"),
    (
        "msda",
        {"level_start_index": [0, 20, 25]},
        CupydcnValueError,
        "level_start_index is [0, 20, 25]; expected [0, 20, 26]",
    ),
    ("msda", {"level_start_index": [0, 20]}, CupydcnValueError, "level_start_index has 2"),
    (
        "msda",
        {"level_start_index": [0, 20.0, 26]},
        CupydcnTypeError,
        "level_start_index must be a sequence of ints",
    ),
    (
        "msda",
        {"level_start_index": torch.tensor([0, 20, 25])},
        CupydcnTypeError,
        "pass arrays of one library",
    ),
    (
        "msda",
        {"sampling_locations": _ARGS["sampling_locations"][..., :1]},
        CupydcnValueError,
        "sampling_locations must have a last dimension of 2",
    ),
    (
        "msda",
        {"sampling_locations": _ARGS["sampling_locations"][:, :, :, :1]},
        CupydcnValueError,
        "sampling_locations has shape",
    ),
    (
        "msda",
        {"sampling_locations": _ARGS["sampling_locations"][:1]},
        CupydcnValueError,
        "sampling_locations has shape",
    ),
    (
        "msda",
        {"sampling_locations": _ARGS["sampling_locations"][0]},
        CupydcnValueError,
        "sampling_locations must be 6-D",
    ),
    (
        "msda",
        {"attention_weights": _ARGS["attention_weights"][:, :3]},
        CupydcnValueError,
        "attention_weights has shape",
    ),
    (
        "msda",
        {"attention_weights": _ARGS["attention_weights"].astype(np.float32)},
        CupydcnTypeError,
        "attention_weights has dtype float32",
    ),
    ("msda", {"value": _ARGS["value"][:, :-1]}, CupydcnValueError, "expected value.shape[1]"),
    ("msda", {"value": _ARGS["value"][0]}, CupydcnValueError, "value must be 4-D"),
    ("msda", {"value": _ARGS["value"].astype(np.int64)}, CupydcnTypeError, "value has dtype"),
    ("msda", {"value": None}, CupydcnTypeError, "value must be an array"),
    (
        "msda_backward",
        {"grad_output": np.zeros((2, 4, 5))},
        CupydcnValueError,
        "grad_output has shape (2, 4, 5)",
    ),
    (
        "msda_backward",
        {"grad_output": np.zeros((2, 4, 6), np.float32)},
        CupydcnTypeError,
        "grad_output has dtype float32",
    ),
    ("msda_backward", {"wrt": ("value", "offset")}, CupydcnValueError, "wrt names ['offset']"),
    (
        "msda_backward",
        {"level_start_index": [1, 20, 26]},
        CupydcnValueError,
        "level_start_index is [1, 20, 26]",
    ),
    (
        "dcnv3",
        {"group": 3},
        CupydcnValueError,
        "input has 6 channels (shape (2, 5, 6, 6)); expected group * group_channels = 3 * 3",
    ),
    ("dcnv3", {"group_channels": 2}, CupydcnValueError, "group * group_channels = 2 * 2"),
    ("dcnv3", {"group": 0}, CupydcnValueError, "group must be >= 1"),
    ("dcnv3", {"group": 2.0}, CupydcnTypeError, "group must be an int"),
    ("dcnv3", {"kernel_size": (3, 0)}, CupydcnValueError, "kernel_size must be >= 1"),
    ("dcnv3", {"stride": 0}, CupydcnValueError, "stride must be >= 1"),
    ("dcnv3", {"padding": -1}, CupydcnValueError, "padding must be >= 0"),
    ("dcnv3", {"dilation": (1, 0)}, CupydcnValueError, "dilation must be >= 1"),
    ("dcnv3", {"offset_scale": math.nan}, CupydcnValueError, "offset_scale must be finite"),
    ("dcnv3", {"offset_scale": "1"}, CupydcnTypeError, "offset_scale must be a real number"),
    (
        "dcnv3",
        {"remove_center": True, "kernel_size": (3, 2)},
        CupydcnValueError,
        "remove_center needs odd kernel sizes",
    ),
    ("dcnv3", {"remove_center": "yes"}, CupydcnTypeError, "remove_center must be a bool"),
    (
        "dcnv3",
        {"remove_center": True},
        CupydcnValueError,
        "offset has shape (2, 5, 6, 36); expected (2, 5, 6, 32)",
    ),
    (
        "dcnv3",
        {"padding": 0},
        CupydcnValueError,
        "offset has shape (2, 5, 6, 36); expected (2, 3, 4, 36)",
    ),
    ("dcnv3", {"mask": _DCN["mask"][..., :-1]}, CupydcnValueError, "mask has shape"),
    ("dcnv3", {"offset": _DCN["offset"][..., :-1]}, CupydcnValueError, "offset has shape"),
    ("dcnv3", {"mask": None}, CupydcnTypeError, "mask must be an array"),
    ("dcnv3", {"input": _DCN["input"][0]}, CupydcnValueError, "input must be 4-D"),
    ("dcnv3", {"kernel_size": 9}, CupydcnValueError, "the output size would be"),
    (
        "dcnv3",
        {"input": _DCN["input"].astype(np.float32)},
        CupydcnTypeError,
        "offset has dtype float64; expected float32",
    ),
    (
        "dcnv3_backward",
        {"grad_output": np.zeros((2, 5, 6, 5))},
        CupydcnValueError,
        "grad_output has shape (2, 5, 6, 5)",
    ),
    ("dcnv3_backward", {"wrt": "offset_mask"}, CupydcnValueError, "wrt names"),
    (
        "dcnv4",
        {"offset_mask": np.zeros((2, 5, 6, 53))},
        CupydcnValueError,
        "offset_mask has shape (2, 5, 6, 53); expected (2, 5, 6, D) with D >= group * 3 * P "
        "= 2 * 3 * 9 = 54",
    ),
    (
        "dcnv4",
        {"offset_mask": np.zeros((2, 5, 5, 54))},
        CupydcnValueError,
        "offset_mask has shape (2, 5, 5, 54)",
    ),
    (
        "dcnv4",
        {"offset_mask": np.zeros((2, 5, 6, 54), np.float16)},
        CupydcnTypeError,
        "offset_mask has dtype float16",
    ),
    (
        "dcnv4_backward",
        {"grad_output": np.zeros((2, 5, 6))},
        CupydcnValueError,
        "grad_output has shape (2, 5, 6)",
    ),
    ("dcnv4_backward", {"wrt": ["mask"]}, CupydcnValueError, "wrt names ['mask']"),
]

_OP_NAMES = {
    "msda": "multi_scale_deformable_attn",
    "msda_backward": "multi_scale_deformable_attn_backward",
}


@pytest.mark.parametrize(
    "op, overrides, error, fragment", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_input_is_refused_before_any_backend(op, overrides, error, fragment, no_backend):
    with pytest.raises(error) as info:
        _call(op, overrides)
    assert isinstance(info.value, CupydcnError)
    message = str(info.value)
    assert message.startswith(_OP_NAMES.get(op, op) + ": "), message
    assert fragment in message, message


@pytest.mark.parametrize(
    "op", ["msda", "msda_backward", "dcnv3", "dcnv3_backward", "dcnv4", "dcnv4_backward"]
)
def test_the_guard_catches_a_valid_call(op, no_backend):
    with pytest.raises(AssertionError, match="reached a backend"):
        _call(op, {})


def test_bad_level_arrays_of_the_callers_library_are_refused_before_any_backend(no_backend):
    """spatial_shapes / level_start_index as tensors are read inside the dispatch (on the
    arrays' stream) and checked there, still before any backend."""
    a = _msda_args()
    t = {k: torch.from_numpy(a[k]) for k in ("value", "sampling_locations", "attention_weights")}
    good_shapes = torch.tensor([[4, 5], [2, 3], [1, 1]])
    for shapes, starts, fragment in [
        (torch.tensor([[4, 5], [2, 3], [1, 2]]), torch.tensor([0, 20, 26]), "sum(H_l * W_l) = 28"),
        (good_shapes, torch.tensor([0, 20, 25]), "level_start_index is [0, 20, 25]"),
        (good_shapes, [0, 19, 26], "level_start_index is [0, 19, 26]"),
        (
            torch.tensor([[4, 5], [2, 3], [1, 1]], dtype=torch.float32),
            None,
            "spatial_shapes must be an integer array",
        ),
        (torch.tensor([4, 5, 2, 3, 1, 1]), None, "spatial_shapes must have shape [L, 2]"),
        (good_shapes, torch.tensor([0, 20]), "level_start_index has 2 entries"),
    ]:
        with pytest.raises(CupydcnError) as info:
            multi_scale_deformable_attn(
                t["value"], shapes, starts, t["sampling_locations"], t["attention_weights"]
            )
        assert fragment in str(info.value)
    with pytest.raises(AssertionError, match="reached a backend"):
        multi_scale_deformable_attn(
            t["value"],
            good_shapes,
            torch.tensor([0, 20, 26]),
            t["sampling_locations"],
            t["attention_weights"],
        )


def test_level_arguments_in_every_form_give_the_same_result():
    case = MSDA_CASES["three_levels"]
    arrays = case.arrays(seeded("forms"))
    expected = _msda(arrays, case)
    forms = [
        (np.array(case.shapes, dtype=np.int32), np.array(case.starts, dtype=np.int64)),
        (tuple(tuple(s) for s in case.shapes), None),
        ([list(s) for s in case.shapes], tuple(np.int64(s) for s in case.starts)),
    ]
    for shapes, starts in forms:
        got = multi_scale_deformable_attn(
            arrays["value"],
            shapes,
            starts,
            arrays["sampling_locations"],
            arrays["attention_weights"],
        )
        np.testing.assert_array_equal(got, expected)
    # remove_center as upstream passes it (0 / 1)
    dcase = DCN_CASES["remove_center_3x5"]
    darrays = dcase.arrays(seeded("forms-dcn"))
    np.testing.assert_array_equal(
        dcnv3(
            darrays["input"],
            darrays["offset"],
            darrays["mask"],
            **{**dcase.options, "remove_center": 1},
        ),
        _dcnv3(darrays, dcase),
    )


def test_a_nan_pixel_read_with_weight_zero_makes_the_sample_nan():
    """Every in-map corner of the cell is read (docs/semantics.md §6.3, §8.5)."""
    value = np.ones((1, 12, 1, 1))
    value[0, 0] = np.nan  # pixel (0, 0) of the 3 x 4 level
    # pixel (px, py) = (-1, 0): corners (y, x) = (0, -1), (1, -1) outside, (0, 0) and
    # (1, 0) inside with weight lx = 0
    loc = np.array([-0.5 / 4, 0.5 / 3], dtype=np.float64).reshape(1, 1, 1, 1, 1, 2)
    out = multi_scale_deformable_attn(value, ((3, 4),), [0], loc, np.ones((1, 1, 1, 1, 1)))
    expected = msda_reference(value, ((3, 4),), loc, np.ones((1, 1, 1, 1, 1)))
    assert np.isnan(out).all() and np.isnan(expected).all()
