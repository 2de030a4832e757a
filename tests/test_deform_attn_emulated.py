"""The deformable-attention CUDA kernels (cupydcn/cuda/kernels/deform_attn.cu) and their
orchestration (cupydcn/deform_attn/cuda_backend.py), run on the CPU by the emulator and,
with the ``launcher`` fixture's ``cupy`` variant, on a GPU.

Every kernel (MSDA forward / backward, the DCN forward / backward that DCNv3 and DCNv4
share), every dtype and both index widths (64-bit forced as well as picked), against the
NumPy backend on the same (quantised) inputs and against the float64 loop reference
(tests/reference_deform_attn.py). Points on the map's edges and pixel kinks, outside,
far outside, infinite and NaN; batch 0, no channels, no points; non-contiguous inputs;
every ``wrt`` subset; block / thread order.

Tolerances (tests/support.py):

* forward against the NumPy backend: bit for bit on the emulator (the kernels compute
  every sum in the backend's order with the same operations, and the host build does
  not contract FMAs), NaNs included; on a GPU (FMAs) ``assert_close``;
* gradients against the NumPy backend: ``assert_close``, elementwise 2 * rounding * |ref|
  + of_max * scale (scale = the largest |ref| of the tensor): float64 1e-12 * scale,
  float32 1e-5 * scale, float16 2**-10 |ref| + 1e-5 scale, bfloat16 2**-7 |ref| + 1e-5
  scale. The value / input gradient is summed by atomics in another order; the channel
  sums of the location / weight gradients are sequential in the kernel, pairwise in
  NumPy;
* against the float64 reference: the same bound (inputs quantised to the dtype first, the
  reference run on the quantised values).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from cupydcn.deform_attn import cuda_backend as _kernels
from cupydcn.deform_attn import numpy_backend as _numpy
from cupydcn.deform_attn import spec
from emulator.host_launcher import HostLauncher
from reference_deform_attn import (
    dcn_options,
    dcn_output_size,
    dcn_taps,
    dcnv3_reference,
    dcnv4_reference,
    msda_reference,
    pack_offset_mask,
)
from support import (
    DTYPE_NAMES,
    assert_close,
    dtype_of,
    is_exact,
    on_device,
    seeded,
    strided_copy,
    to_numpy,
)

# Tests taking ``launcher`` are marked ``emulated`` (or ``gpu``) by its parameter.
INDEX_BITS = (32, 64)
MSDA_NAMES = spec.MSDA_GRADIENT_NAMES
DCNV3_NAMES = spec.DCNV3_GRADIENT_NAMES
DCNV4_NAMES = spec.DCNV4_GRADIENT_NAMES
HALF = ("float16", "bfloat16")
# Against the float64 reference: points on edges, kinks and outside in float64 only (a
# coordinate computed in float32 may round across a kink the float64 reference does not
# cross), every dtype with points off the kinks.
REFERENCE_RUNS = [("float64", True)] + [(name, False) for name in DTYPE_NAMES]


# ---------------------------------------------------------------------------- problems


def _cast(arrays: dict, dtype) -> dict:
    """The arrays in ``dtype``; the huge special coordinates become inf in float16."""
    with np.errstate(over="ignore"):
        return {k: v.astype(dtype) for k, v in arrays.items()}


@dataclass(frozen=True)
class MsdaCase:
    batch: int = 2
    queries: int = 3
    heads: int = 2
    head_dim: int = 3
    shapes: tuple = ((4, 5), (2, 3), (1, 1))
    points: int = 2
    low: float = -0.3
    high: float = 1.3
    special: bool = True  # edges, pixel kinks, outside, far outside, inf and NaN points

    @property
    def keys(self) -> int:
        return sum(h * w for h, w in self.shapes)

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(int(s) for s in np.cumsum([0] + [h * w for h, w in self.shapes])[:-1])

    def arrays(self, rng, dtype) -> dict:
        n, q, m, lv, p = self.batch, self.queries, self.heads, len(self.shapes), self.points
        value = rng.standard_normal((n, self.keys, m, self.head_dim))
        loc = rng.uniform(self.low, self.high, (n, q, m, lv, p, 2))
        weights = rng.standard_normal((n, q, m, lv, p))
        if self.special and loc.size:
            flat = loc.reshape(-1, lv, p, 2)
            h, w = self.shapes[0]
            specials = [
                (-0.5 / w, 0.5 / h),
                (0.5 / w, -0.5 / h),
                ((w - 0.5) / w, (h - 0.5) / h),
                ((w + 0.5) / w, 0.25),
                (1.5 / w, 1.5 / h),
                (-1.5 / w, 0.5),
                (4.0, -3.0),
                (-1e30, 0.5),
                (math.inf, 0.5),
                (0.5, -math.inf),
                (math.nan, 0.5),
                (0.25, math.nan),
            ]
            for i, xy in enumerate(specials[: flat.shape[0] * p]):
                flat[i // p, 0, i % p] = xy
        arrays = {"value": value, "sampling_locations": loc, "attention_weights": weights}
        arrays = _cast(arrays, dtype)
        out_shape = (n, q, m * self.head_dim)
        arrays["grad_output"] = rng.standard_normal(out_shape).astype(dtype)
        return arrays


MSDA_CASES = {
    "three_levels": MsdaCase(),
    # D = 11: a full channel vector of 8 and a partial one
    "head_dim_11_one_level": MsdaCase(batch=1, queries=2, head_dim=11, shapes=((3, 4),), points=3),
    "four_levels_odd_batch": MsdaCase(
        batch=3, queries=2, heads=3, head_dim=1, shapes=((3, 2), (2, 2), (2, 1), (1, 3)), points=1
    ),
}


@dataclass(frozen=True)
class DcnCase:
    batch: int = 2
    height: int = 4
    width: int = 5
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
    special: bool = True  # integer offsets (kinks), NaN, huge and infinite offsets
    packed_pad: int = 3  # dcnv4: padding of the packed last dimension

    @property
    def points(self) -> int:
        return len(dcn_taps(self.options["kernel_size"], self.options["remove_center"]))

    @property
    def out_size(self):
        o = self.options
        return dcn_output_size(
            self.height, self.width, o["kernel_size"], o["stride"], o["padding"], o["dilation"]
        )

    def arrays(self, rng, dtype) -> dict:
        g, cg, p = self.options["group"], self.options["group_channels"], self.points
        ho, wo = self.out_size
        x = rng.standard_normal((self.batch, self.height, self.width, g * cg))
        offset = rng.standard_normal((self.batch, ho, wo, g * p * 2)) * self.offset_std
        mask = rng.uniform(-0.5, 1.5, (self.batch, ho, wo, g * p))
        if self.special and offset.size:
            flat = offset.reshape(-1)
            flat[:12] = np.round(flat[:12])
            flat[12:17] = [math.nan, 1e30, -math.inf, 40.0, -1.0]
        arrays = {"input": x, "offset": offset, "mask": mask}
        arrays = _cast(arrays, dtype)
        arrays["grad_output"] = rng.standard_normal((self.batch, ho, wo, g * cg)).astype(dtype)
        dim = g * 3 * p + self.packed_pad
        arrays["offset_mask"] = pack_offset_mask(arrays["offset"], arrays["mask"], g, p, dim)
        return arrays


DCN_CASES = {
    "3x3_pad1": DcnCase(),
    "non_square_options": DcnCase(
        height=6,
        width=5,
        options=dcn_options(
            kernel_size=(3, 2),
            stride=(2, 1),
            padding=(2, 0),
            dilation=(1, 2),
            group=3,
            group_channels=2,
            offset_scale=0.5,
        ),
    ),
    # Cg = 10: a full channel vector and a partial one
    "remove_center_3x5_cg10": DcnCase(
        batch=1,
        height=4,
        width=5,
        options=dcn_options(
            kernel_size=(3, 5),
            padding=(1, 2),
            remove_center=True,
            group=1,
            group_channels=10,
            offset_scale=1.7,
        ),
    ),
}


def _msda_geometry(arrays, case: MsdaCase, *, shapes_on_host=True):
    native = {
        k: arrays[k] for k in ("value", "sampling_locations", "attention_weights", "grad_output")
    }
    if shapes_on_host:
        return spec.msda_geometry(
            spec.MSDA_OP, native, shapes_host=case.shapes, starts_host=case.starts
        )
    native["spatial_shapes"] = np.asarray(case.shapes, dtype=np.int64)
    return spec.msda_geometry(spec.MSDA_OP, native, shapes_host=None, starts_host=None)


def _dcn_geometry(arrays, case: DcnCase, *, packed: bool):
    names = ("input", "offset_mask") if packed else ("input", "offset", "mask")
    native = {k: arrays[k] for k in (*names, "grad_output")}
    return spec.dcn_geometry(
        spec.DCNV4_OP if packed else spec.DCNV3_OP,
        native,
        spec.Dcnv3Options(**case.options),
        packed=packed,
    )


def _assert_close(actual, expected, dtype_name, what):
    assert actual is not None, what
    actual = to_numpy(actual)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert actual.flags.c_contiguous, what
    assert_close(actual, expected, dtype_name, what, zero_scale=1e-300)


def _assert_forward(launcher, output, expected, dtype_name, what):
    output = to_numpy(output)
    assert output.dtype == expected.dtype and output.shape == expected.shape, what
    if is_exact(launcher):
        np.testing.assert_array_equal(output, expected, err_msg=what)
    else:
        _assert_close(output, expected, dtype_name, what)


def _assert_grads(grads, expected, names, dtype_name, what=""):
    for name, actual, wanted in zip(names, grads, expected):
        if wanted is None:
            assert actual is None, name
        else:
            _assert_close(actual, wanted, dtype_name, f"{what}grad_{name}")


# ---------------------------------------------------------------------------- runners


def _msda_run(
    launcher, arrays, case, geom, *, wrt=frozenset(MSDA_NAMES), index_bits=None, spatial_shapes=None
):
    value, loc, weights, grad = on_device(
        launcher,
        arrays["value"],
        arrays["sampling_locations"],
        arrays["attention_weights"],
        arrays["grad_output"],
    )
    shapes = None if spatial_shapes is None else on_device(launcher, spatial_shapes)
    output = _kernels.msda_forward(
        launcher, value, shapes, None, loc, weights, geom, index_bits=index_bits
    )
    grads = _kernels.msda_backward(
        launcher, grad, value, shapes, None, loc, weights, geom, wrt=wrt, index_bits=index_bits
    )
    return output, grads


def _msda_numpy(arrays, geom, wrt=frozenset(MSDA_NAMES)):
    args = (arrays["value"], None, None, arrays["sampling_locations"], arrays["attention_weights"])
    return (
        _numpy.msda_forward(*args, geom),
        _numpy.msda_backward(arrays["grad_output"], *args, geom, wrt=wrt),
    )


def _dcn_run(launcher, arrays, geom, *, packed, wrt=None, index_bits=None):
    if packed:
        wrt = frozenset(DCNV4_NAMES) if wrt is None else wrt
        x, om, grad = on_device(
            launcher, arrays["input"], arrays["offset_mask"], arrays["grad_output"]
        )
        return (
            _kernels.dcnv4_forward(launcher, x, om, geom, index_bits=index_bits),
            _kernels.dcnv4_backward(launcher, grad, x, om, geom, wrt=wrt, index_bits=index_bits),
        )
    wrt = frozenset(DCNV3_NAMES) if wrt is None else wrt
    x, off, mask, grad = on_device(
        launcher, arrays["input"], arrays["offset"], arrays["mask"], arrays["grad_output"]
    )
    return (
        _kernels.dcnv3_forward(launcher, x, off, mask, geom, index_bits=index_bits),
        _kernels.dcnv3_backward(launcher, grad, x, off, mask, geom, wrt=wrt, index_bits=index_bits),
    )


def _dcn_numpy(arrays, geom, *, packed, wrt=None):
    if packed:
        wrt = frozenset(DCNV4_NAMES) if wrt is None else wrt
        args = (arrays["input"], arrays["offset_mask"])
        return (
            _numpy.dcnv4_forward(*args, geom),
            _numpy.dcnv4_backward(arrays["grad_output"], *args, geom, wrt=wrt),
        )
    wrt = frozenset(DCNV3_NAMES) if wrt is None else wrt
    args = (arrays["input"], arrays["offset"], arrays["mask"])
    return (
        _numpy.dcnv3_forward(*args, geom),
        _numpy.dcnv3_backward(arrays["grad_output"], *args, geom, wrt=wrt),
    )


def _kernels_launched(launcher, first):
    return [r.kernel for r in launcher.launches[first:]]


# ---------------------------------------------------------------------------- MSDA


@pytest.mark.parametrize("index_bits", INDEX_BITS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("name", MSDA_CASES)
def test_msda_kernels_match_numpy_backend(launcher, name, dtype_name, index_bits):
    case = MSDA_CASES[name]
    arrays = case.arrays(seeded("msda", name, dtype_name), dtype_of(dtype_name))
    geom = _msda_geometry(arrays, case)
    first = len(launcher.launches)
    output, grads = _msda_run(launcher, arrays, case, geom, index_bits=index_bits)
    launched = launcher.launches[first:]
    assert {r.index_bits for r in launched} == {index_bits}
    kernels = [r.kernel for r in launched]
    assert kernels[:2] == ["deform_attn_msda_forward", "deform_attn_msda_backward"]
    # each gradient accumulates in the acc dtype and is rounded once
    assert kernels[2:] == (["round_to_output"] * 3 if dtype_name in HALF else [])
    expected_output, expected_grads = _msda_numpy(arrays, geom)
    _assert_forward(launcher, output, expected_output, dtype_name, "output")
    _assert_grads(grads, expected_grads, MSDA_NAMES, dtype_name)
    assert np.isnan(to_numpy(output)).any() == case.special


@pytest.mark.parametrize(("dtype_name", "special"), REFERENCE_RUNS)
def test_msda_kernels_match_float64_reference(launcher, dtype_name, special):
    """Against the loop reference on the quantised inputs (REFERENCE_RUNS)."""
    case = replace(MSDA_CASES["three_levels"], special=special, head_dim=17)  # 3 lanes
    arrays = case.arrays(seeded("msda-ref", dtype_name, special), dtype_of(dtype_name))
    geom = _msda_geometry(arrays, case)
    output, grads = _msda_run(launcher, arrays, case, geom)
    exact = {k: v.astype(np.float64) for k, v in arrays.items()}
    expected, expected_grads = msda_reference(
        exact["value"],
        case.shapes,
        exact["sampling_locations"],
        exact["attention_weights"],
        grad_output=exact["grad_output"],
    )
    _assert_close(output, expected.astype(output.dtype), dtype_name, "output")
    _assert_grads(
        grads, [g.astype(arrays["value"].dtype) for g in expected_grads], MSDA_NAMES, dtype_name
    )


def test_msda_spatial_shapes_array(launcher):
    """spatial_shapes as an array of the caller's library (read by the kernels)."""
    case = MSDA_CASES["three_levels"]
    arrays = case.arrays(seeded("msda-array"), np.float32)
    geom = _msda_geometry(arrays, case, shapes_on_host=False)
    assert geom.level_shapes is None
    output, grads = _msda_run(
        launcher, arrays, case, geom, spatial_shapes=np.asarray(case.shapes, dtype=np.int64)
    )
    expected_output, expected_grads = _msda_numpy(arrays, _msda_geometry(arrays, case))
    _assert_forward(launcher, output, expected_output, "float32", "output")
    _assert_grads(grads, expected_grads, MSDA_NAMES, "float32")


def _subsets(names):
    return [frozenset(c) for r in range(len(names) + 1) for c in itertools.combinations(names, r)]


@pytest.mark.parametrize("wrt", _subsets(MSDA_NAMES), ids=lambda w: "+".join(sorted(w)) or "none")
def test_msda_every_wrt_subset(launcher, wrt):
    case = MSDA_CASES["three_levels"]
    arrays = case.arrays(seeded("msda-wrt"), np.float32)
    geom = _msda_geometry(arrays, case)
    first = len(launcher.launches)
    _, grads = _msda_run(launcher, arrays, case, geom, wrt=wrt)
    kernels = _kernels_launched(launcher, first)
    assert kernels == ["deform_attn_msda_forward"] + (["deform_attn_msda_backward"] if wrt else [])
    _, expected = _msda_numpy(arrays, geom, wrt)
    _assert_grads(grads, expected, MSDA_NAMES, "float32")


def test_msda_empty_problems(launcher):
    """Batch 0 and no queries: empty results, no launches; no channels or no points: no
    output elements, zero (or NaN) coordinate gradients as the NumPy backend."""
    for case in (
        replace(MSDA_CASES["three_levels"], batch=0),
        replace(MSDA_CASES["three_levels"], queries=0),
    ):
        arrays = case.arrays(seeded("msda-empty"), np.float32)
        geom = _msda_geometry(arrays, case)
        first = len(launcher.launches)
        output, grads = _msda_run(launcher, arrays, case, geom)
        assert _kernels_launched(launcher, first) == []
        assert output.shape == geom.output_shape
        expected_output, expected_grads = _msda_numpy(arrays, geom)
        for got, wanted in zip(grads, expected_grads):
            assert to_numpy(got).shape == wanted.shape and not np.any(to_numpy(got))
    for case in (
        replace(MSDA_CASES["three_levels"], head_dim=0),
        replace(MSDA_CASES["three_levels"], points=0, special=False),
    ):
        arrays = case.arrays(seeded("msda-zero"), np.float32)
        geom = _msda_geometry(arrays, case)
        output, grads = _msda_run(launcher, arrays, case, geom)
        expected_output, expected_grads = _msda_numpy(arrays, geom)
        _assert_forward(launcher, output, expected_output, "float32", "output")
        for label, got, wanted in zip(MSDA_NAMES, grads, expected_grads):
            np.testing.assert_array_equal(to_numpy(got), wanted, err_msg=label)


# ---------------------------------------------------------------------------- DCNv3 / v4


@pytest.mark.parametrize("index_bits", INDEX_BITS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("name", DCN_CASES)
def test_dcn_kernels_match_numpy_backend(launcher, name, dtype_name, index_bits):
    case = DCN_CASES[name]
    arrays = case.arrays(seeded("dcn", name, dtype_name), dtype_of(dtype_name))
    for packed, names in ((False, DCNV3_NAMES), (True, DCNV4_NAMES)):
        what = "dcnv4 " if packed else "dcnv3 "
        geom = _dcn_geometry(arrays, case, packed=packed)
        first = len(launcher.launches)
        output, grads = _dcn_run(launcher, arrays, geom, packed=packed, index_bits=index_bits)
        launched = launcher.launches[first:]
        assert {r.index_bits for r in launched} == {index_bits}
        kernels = [r.kernel for r in launched]
        assert kernels[:2] == ["deform_attn_dcn_forward", "deform_attn_dcn_backward"]
        assert kernels[2:] == (["round_to_output"] * len(names) if dtype_name in HALF else [])
        expected_output, expected_grads = _dcn_numpy(arrays, geom, packed=packed)
        _assert_forward(launcher, output, expected_output, dtype_name, what + "output")
        _assert_grads(grads, expected_grads, names, dtype_name, what)
        if packed:
            used = case.options["group"] * 3 * case.points
            assert not np.any(to_numpy(grads.grad_offset_mask)[..., used:])


@pytest.mark.parametrize(("dtype_name", "special"), REFERENCE_RUNS)
def test_dcn_kernels_match_float64_reference(launcher, dtype_name, special):
    case = replace(DCN_CASES["non_square_options"], special=special)
    arrays = case.arrays(seeded("dcn-ref", dtype_name, special), dtype_of(dtype_name))
    exact = {k: v.astype(np.float64) for k, v in arrays.items()}
    dtype = arrays["input"].dtype
    geom = _dcn_geometry(arrays, case, packed=False)
    output, grads = _dcn_run(launcher, arrays, geom, packed=False)
    expected, expected_grads = dcnv3_reference(
        exact["input"],
        exact["offset"],
        exact["mask"],
        **case.options,
        grad_output=exact["grad_output"],
    )
    _assert_close(output, expected.astype(dtype), dtype_name, "dcnv3 output")
    _assert_grads(grads, [g.astype(dtype) for g in expected_grads], DCNV3_NAMES, dtype_name)
    geom = _dcn_geometry(arrays, case, packed=True)
    output, grads = _dcn_run(launcher, arrays, geom, packed=True)
    expected, expected_grads = dcnv4_reference(
        exact["input"], exact["offset_mask"], **case.options, grad_output=exact["grad_output"]
    )
    _assert_close(output, expected.astype(dtype), dtype_name, "dcnv4 output")
    _assert_grads(grads, [g.astype(dtype) for g in expected_grads], DCNV4_NAMES, dtype_name)


@pytest.mark.parametrize(
    "wrt",
    _subsets(DCNV3_NAMES) + [frozenset({"offset_mask"}), frozenset({"input", "offset_mask"})],
    ids=lambda w: "+".join(sorted(w)) or "none",
)
def test_dcn_every_wrt_subset(launcher, wrt):
    case = DCN_CASES["3x3_pad1"]
    arrays = case.arrays(seeded("dcn-wrt"), np.float32)
    packed = "offset_mask" in wrt
    names = DCNV4_NAMES if packed else DCNV3_NAMES
    geom = _dcn_geometry(arrays, case, packed=packed)
    first = len(launcher.launches)
    _, grads = _dcn_run(launcher, arrays, geom, packed=packed, wrt=wrt)
    kernels = _kernels_launched(launcher, first)
    assert kernels == ["deform_attn_dcn_forward"] + (["deform_attn_dcn_backward"] if wrt else [])
    _, expected = _dcn_numpy(arrays, geom, packed=packed, wrt=wrt)
    _assert_grads(grads, expected, names, "float32")
    if not packed and frozenset({"input"}) == wrt:  # dcnv4 with grad_input only, too
        geom4 = _dcn_geometry(arrays, case, packed=True)
        _, grads4 = _dcn_run(launcher, arrays, geom4, packed=True, wrt=wrt)
        _, expected4 = _dcn_numpy(arrays, geom4, packed=True, wrt=wrt)
        _assert_grads(grads4, expected4, DCNV4_NAMES, "float32")


def test_dcn_batch_zero(launcher):
    case = replace(DCN_CASES["3x3_pad1"], batch=0)
    arrays = case.arrays(seeded("dcn-empty"), np.float32)
    for packed in (False, True):
        geom = _dcn_geometry(arrays, case, packed=packed)
        first = len(launcher.launches)
        output, grads = _dcn_run(launcher, arrays, geom, packed=packed)
        assert _kernels_launched(launcher, first) == []
        assert output.shape == geom.output_shape
        for grad in grads:
            assert grad.size == 0


# ---------------------------------------------------------------------------- layouts, order


def test_non_contiguous_inputs(launcher):
    """Strided views of every input give the contiguous inputs' results (copied once)."""
    xp = launcher.xp
    case = MSDA_CASES["three_levels"]
    arrays = case.arrays(seeded("strided-msda"), np.float32)
    geom = _msda_geometry(arrays, case)
    output, grads = _msda_run(launcher, arrays, case, geom)
    strided = {k: strided_copy(xp, v) for k, v in arrays.items()}
    assert not any(v.flags.c_contiguous for v in strided.values())
    output2, grads2 = _msda_run(launcher, strided, case, geom)
    np.testing.assert_array_equal(to_numpy(output2), to_numpy(output))
    _assert_grads(grads2, [to_numpy(g) for g in grads], MSDA_NAMES, "float32")

    dcase = DCN_CASES["3x3_pad1"]
    darrays = dcase.arrays(seeded("strided-dcn"), np.float32)
    dstrided = {k: strided_copy(xp, v) for k, v in darrays.items()}
    for packed, names in ((False, DCNV3_NAMES), (True, DCNV4_NAMES)):
        geom = _dcn_geometry(darrays, dcase, packed=packed)
        output, grads = _dcn_run(launcher, darrays, geom, packed=packed)
        output2, grads2 = _dcn_run(launcher, dstrided, geom, packed=packed)
        np.testing.assert_array_equal(to_numpy(output2), to_numpy(output))
        _assert_grads(grads2, [to_numpy(g) for g in grads], names, "float32")


def _odd_launchers():
    tiny = lambda total: (min(2, max(1, total)), 3)  # noqa: E731
    return [HostLauncher(reverse=True, config=tiny), HostLauncher(shuffle=12345, config=tiny)]


@pytest.mark.emulated
def test_forward_independent_of_block_and_thread_order(host_launcher):
    """Blocks and threads last to first or shuffled, 3 threads per block and at most 2
    blocks (grid-stride loops of many rounds): the forward and the location / weight
    gradients bit for bit, the value / input gradients (atomics) within rounding."""
    case = MSDA_CASES["head_dim_11_one_level"]
    arrays = case.arrays(seeded("order-msda"), np.float64)
    geom = _msda_geometry(arrays, case)
    base_out, base_grads = _msda_run(host_launcher, arrays, case, geom)
    dcase = DCN_CASES["remove_center_3x5_cg10"]
    darrays = dcase.arrays(seeded("order-dcn"), np.float64)
    dgeom = _dcn_geometry(darrays, dcase, packed=False)
    dbase_out, dbase_grads = _dcn_run(host_launcher, darrays, dgeom, packed=False)
    for odd in _odd_launchers():
        out, grads = _msda_run(odd, arrays, case, geom)
        np.testing.assert_array_equal(out, base_out)
        np.testing.assert_array_equal(
            grads.grad_sampling_locations, base_grads.grad_sampling_locations
        )
        np.testing.assert_array_equal(
            grads.grad_attention_weights, base_grads.grad_attention_weights
        )
        _assert_close(grads.grad_value, base_grads.grad_value, "float64", "grad_value")
        out, grads = _dcn_run(odd, darrays, dgeom, packed=False)
        np.testing.assert_array_equal(out, dbase_out)
        np.testing.assert_array_equal(grads.grad_offset, dbase_grads.grad_offset)
        np.testing.assert_array_equal(grads.grad_mask, dbase_grads.grad_mask)
        _assert_close(grads.grad_input, dbase_grads.grad_input, "float64", "grad_input")


def test_index_width_picked_from_sizes(launcher):
    case = MSDA_CASES["three_levels"]
    arrays = case.arrays(seeded("bits"), np.float32)
    geom = _msda_geometry(arrays, case)
    assert _kernels.msda_index_bits(geom) == 32
    assert _kernels.msda_index_bits(replace(geom, batch=2**20, num_keys=2**12)) == 64
    dgeom = _dcn_geometry(
        DCN_CASES["3x3_pad1"].arrays(seeded("bits"), np.float32), DCN_CASES["3x3_pad1"], packed=True
    )
    assert _kernels.dcn_index_bits(dgeom) == 32
    assert _kernels.dcn_index_bits(replace(dgeom, batch=2**22)) == 64
    first = len(launcher.launches)
    _msda_run(launcher, arrays, case, geom)
    assert {r.index_bits for r in launcher.launches[first:]} == {32}


@pytest.mark.gpu
def test_public_functions_on_cupy():
    """The dispatch reaches these kernels for CuPy arrays and returns CuPy arrays."""
    import cupy

    from cupydcn.deform_attn import dcnv4, multi_scale_deformable_attn_backward

    case = MSDA_CASES["three_levels"]
    arrays = case.arrays(seeded("cupy"), np.float32)
    grads = multi_scale_deformable_attn_backward(
        cupy.asarray(arrays["grad_output"]),
        cupy.asarray(arrays["value"]),
        cupy.asarray(np.asarray(case.shapes)),
        None,
        cupy.asarray(arrays["sampling_locations"]),
        cupy.asarray(arrays["attention_weights"]),
    )
    assert all(isinstance(g, cupy.ndarray) for g in grads)
    _, expected = _msda_numpy(arrays, _msda_geometry(arrays, case))
    _assert_grads(grads, expected, MSDA_NAMES, "float32")
    dcase = DCN_CASES["3x3_pad1"]
    darrays = dcase.arrays(seeded("cupy-dcn"), np.float32)
    out = dcnv4(
        cupy.asarray(darrays["input"]), cupy.asarray(darrays["offset_mask"]), **dcase.options
    )
    expected_out, _ = _dcn_numpy(darrays, _dcn_geometry(darrays, dcase, packed=True), packed=True)
    _assert_close(out, expected_out, "float32", "dcnv4 output")
