"""deform_psroi_pool on the NumPy backend: against the float64 loop reference written from
docs/semantics.md §3 (tests/reference_psroi_pool.py), finite differences, MSRA's
conventions at the kinks and validation (array libraries, wrt, strided inputs and empty
RoI sets: tests/test_op_properties.py).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import reference_psroi_pool as ref
from cupydcn import CupydcnTypeError, CupydcnValueError
from cupydcn.psroi_pool import (
    PSRoiPoolGrads,
    deform_psroi_pool,
    deform_psroi_pool_backward,
)
from cupydcn.psroi_pool.cuda_backend import index_bits_for
from cupydcn.psroi_pool.spec import psroi_pool_geometry
from reference_psroi_pool import CONFIGS, MIXED_ROIS, options, problem
from support import LOW_PRECISION, as_float64, assert_relative, dtype_of


def reference(input, rois, offset, grad_output, cfg):
    o = ref.Options(**options(cfg))
    output, count = ref.forward(input, rois, offset, o)
    grad_input, grad_offset = ref.backward(grad_output, input, rois, offset, o)
    return output, count, grad_input, grad_offset


# ---------------------------------------------------------------------------- forward and backward


@pytest.mark.parametrize("name", list(CONFIGS))
def test_numpy_matches_reference_float64(name):
    cfg = CONFIGS[name]
    input, rois, offset, grad_output = problem(cfg)
    expected_output, expected_count, expected_gi, expected_go = reference(
        input, rois, offset, grad_output, cfg
    )

    output, count = deform_psroi_pool(input, rois, offset, **options(cfg))
    assert output.dtype == np.float64 and count.dtype == np.int32
    np.testing.assert_array_equal(count, expected_count)
    assert_relative(output, expected_output, "float64")

    grads = deform_psroi_pool_backward(grad_output, input, rois, offset, **options(cfg))
    assert isinstance(grads, PSRoiPoolGrads)
    assert grads.grad_input.shape == input.shape
    assert_relative(grads.grad_input, expected_gi, "float64")
    if offset is None:
        assert grads.grad_offset is None
    else:
        assert grads.grad_offset.shape == offset.shape
        assert_relative(grads.grad_offset, expected_go, "float64")


def test_configs_cover_the_edge_cases():
    """The problems above really contain what their names promise."""
    cfg = CONFIGS["basic"]
    input, rois, offset, _ = problem(cfg)
    _, count = deform_psroi_pool(input, rois, offset, **options(cfg))
    full = cfg["sample_per_part"] ** 2
    assert (count[2] == 0).all()  # RoI wholly outside the map
    assert ((count[1] > 0) & (count[1] < full)).any()  # partly outside
    assert (count[4] == full).any()
    cfg = CONFIGS["offsets_off_map"]
    input, rois, offset, _ = problem(cfg)
    _, count = deform_psroi_pool(input, rois, offset, **options(cfg))
    assert (np.delete(count, 2, axis=0) == 0).any()  # bins of RoIs on the map pushed off
    assert ref.round_half_away(2.5) == 3 and ref.round_half_away(-2.5) == -3


@pytest.mark.parametrize("dtype_name", LOW_PRECISION)
@pytest.mark.parametrize("name", ["basic", "parts_coarser", "offsets_off_map", "no_trans"])
def test_dtypes_match_reference(name, dtype_name):
    """Every dtype against the float64 reference evaluated on the same (rounded) inputs."""
    cfg = CONFIGS[name]
    input, rois, offset, grad_output = problem(cfg, dtype_name, seed=3)
    expected_output, expected_count, expected_gi, expected_go = reference(
        as_float64(input),
        rois,
        None if offset is None else as_float64(offset),
        as_float64(grad_output),
        cfg,
    )

    output, count = deform_psroi_pool(input, rois, offset, **options(cfg))
    assert output.dtype == input.dtype and count.dtype == np.int32
    np.testing.assert_array_equal(count, expected_count)
    assert_relative(output, expected_output, dtype_name)

    grads = deform_psroi_pool_backward(grad_output, input, rois, offset, **options(cfg))
    assert grads.grad_input.dtype == input.dtype
    assert_relative(grads.grad_input, expected_gi, dtype_name)
    if offset is not None:
        assert grads.grad_offset.dtype == input.dtype
        assert_relative(grads.grad_offset, expected_go, dtype_name)


def test_rois_of_another_float_dtype():
    """rois may have any floating dtype; float16 rois hold these coordinates exactly."""
    cfg = CONFIGS["basic"]
    input, rois, offset, _ = problem(cfg)
    expected = deform_psroi_pool(input, rois, offset, **options(cfg))
    for rois_dtype in ("float32", "float16", "bfloat16"):
        got = deform_psroi_pool(input, rois.astype(dtype_of(rois_dtype)), offset, **options(cfg))
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


def test_part_cells_without_bins_get_zero_gradient():
    cfg = CONFIGS["parts_finer"]  # P = 2, S = 3: bins use cells 0 and 1 only
    input, rois, offset, grad_output = problem(cfg)
    grad_offset = deform_psroi_pool_backward(
        grad_output, input, rois, offset, **options(cfg)
    ).grad_offset
    assert (grad_offset[..., 2, :] == 0).all() and (grad_offset[..., :, 2] == 0).all()
    assert (grad_offset[..., :2, :2] != 0).any()


def test_nan_offset_poisons_only_its_cell():
    """A NaN offset makes its bins' samples NaN (kept and counted, not clamped to 0)."""
    cfg = CONFIGS["basic"]
    input, rois, offset, grad_output = problem(cfg)
    offset[0, 0, 1, 2] = np.nan  # RoI 0, class 0, x of cell (1, 2)
    output, count = deform_psroi_pool(input, rois, offset, **options(cfg))
    poisoned = np.zeros(output.shape, dtype=bool)
    poisoned[0, :2, 1, 2] = True  # class 0 = output channels 0, 1
    assert np.isnan(output[poisoned]).all() and not np.isnan(output[~poisoned]).any()
    assert (count[poisoned] == cfg["sample_per_part"] ** 2).all()
    grads = deform_psroi_pool_backward(grad_output, input, rois, offset, **options(cfg))
    assert not np.isnan(grads.grad_input).any()
    nan_cells = np.isnan(grads.grad_offset)
    assert nan_cells[0, :2, 1, 2].all() and nan_cells.sum() == 2


# ---------------------------------------------------------------------------- gradients


def _kink_margin(input, rois, offset, cfg) -> float:
    """Smallest distance of any sample coordinate to a kink of the op: an integer (the
    bilinear corners, the clamp at 0 and size-1) or the skip bound -0.5 / size-0.5."""
    points = ref.sample_coordinates(rois, offset, ref.Options(**options(cfg)))
    integer = np.abs(points - np.round(points))
    half = np.abs(points + 0.5 - np.round(points + 0.5))
    return float(min(integer.min(), half.min()))


@pytest.mark.parametrize("name", ["basic", "parts_coarser", "parts_finer", "three_classes"])
def test_gradients_match_finite_differences(name):
    """<grad_output, output> differentiated along random directions. The output is
    linear in input and piecewise quadratic in offset, so central differences are exact
    up to rounding when no sample is near a kink (checked)."""
    cfg = CONFIGS[name]
    rois = [r for r in MIXED_ROIS if r[1] > -50]  # RoIs whose samples move with the offset
    # The first seed whose samples all keep 1e-5 from a kink (the steps below move them
    # by less than 4e-6).
    input, rois, offset, grad_output = next(
        p
        for p in (problem(cfg, seed=seed, rois=rois) for seed in range(10, 30))
        if _kink_margin(p[0], p[1], p[2], cfg) > 1e-5
    )
    grads = deform_psroi_pool_backward(grad_output, input, rois, offset, **options(cfg))

    def loss(x, off):
        output, _ = deform_psroi_pool(x, rois, off, **options(cfg))
        return float((output * grad_output).sum())

    rng = np.random.default_rng(5)
    for _ in range(2):
        direction = rng.standard_normal(input.shape)
        numeric = (loss(input + direction, offset) - loss(input - direction, offset)) / 2
        np.testing.assert_allclose((grads.grad_input * direction).sum(), numeric, rtol=1e-10)

        direction = rng.standard_normal(offset.shape)
        step = 1e-7
        numeric = (
            loss(input, offset + step * direction) - loss(input, offset - step * direction)
        ) / (2 * step)
        np.testing.assert_allclose(
            (grads.grad_offset * direction).sum(), numeric, rtol=1e-6, atol=1e-9
        )


def _single_sample(value_of_x, offset_x, roi, *, trans_std=0.1, spatial_scale=0.5):
    """One RoI, one bin, one sample on a 1 x 1-channel 4 x 6 map with values
    value_of_x(column); returns (output, count, grad_offset) for grad_output 1."""
    input = np.broadcast_to(value_of_x(np.arange(6.0)), (1, 1, 4, 6)).copy()
    rois = np.array([roi], dtype=np.float64)
    offset = np.array([offset_x, 0.0]).reshape(1, 2, 1, 1)
    kw = dict(
        output_dim=1,
        group_size=1,
        pooled_size=1,
        sample_per_part=1,
        spatial_scale=spatial_scale,
        trans_std=trans_std,
    )
    output, count = deform_psroi_pool(input, rois, offset, **kw)
    grads = deform_psroi_pool_backward(np.ones((1, 1, 1, 1)), input, rois, offset, **kw)
    return float(output[0, 0, 0, 0]), int(count[0, 0, 0, 0]), grads.grad_offset[0, :, 0, 0]


def test_kink_on_an_integer_coordinate_has_zero_derivative():
    """MSRA's corners floor(w), ceil(w) coincide on an integer w: d/dw = 0 there, although
    the one-sided derivatives of the ramp are 1. Just off the integer it is 1."""
    ramp = lambda x: x  # noqa: E731
    # x1 = 5 at scale 0.5: start_w = round(5) * 0.5 - 0.5 = 2; roi_w = 0.5; the sample is
    # at w = 2 + trans_std * offset_x * 0.5.
    roi = [0, 5, 2, 5, 2]
    output, count, grad = _single_sample(ramp, 0.0, roi)
    assert (output, count) == (2.0, 1)
    np.testing.assert_array_equal(grad, [0.0, 0.0])
    output, count, grad = _single_sample(ramp, 0.2, roi)
    assert output == pytest.approx(2.01) and count == 1
    np.testing.assert_allclose(grad, [0.1 * 0.5, 0.0])  # d/dw * trans_std * roi_w


def test_clamped_and_skipped_samples():
    ramp = lambda x: 3.0 + x  # noqa: E731
    # x1 = 0 at scale 1: start_w = -0.5, roi_w = 1.
    roi = [0, 0, 1, 0, 1]
    # w = -0.5 + 0.1 * 2 * 1 = -0.3: kept, clamped to 0 -> value 3, derivative 0
    output, count, grad = _single_sample(ramp, 2.0, roi, spatial_scale=1.0)
    assert (output, count) == (pytest.approx(3.0), 1)
    np.testing.assert_array_equal(grad, [0.0, 0.0])
    # w = -0.5 exactly: kept (the bound is inclusive)
    output, count, _ = _single_sample(ramp, 0.0, roi, spatial_scale=1.0)
    assert (output, count) == (3.0, 1)
    # w = -0.7: skipped -> output 0, count 0, no gradient
    output, count, grad = _single_sample(ramp, -2.0, roi, spatial_scale=1.0)
    assert (output, count) == (0.0, 0)
    np.testing.assert_array_equal(grad, [0.0, 0.0])


def test_zero_offsets_on_the_pixel_grid_follow_msra():
    """Zero offsets with power-of-two bin sizes put many samples exactly on integers and
    on the clamp; the backend must agree with MSRA's backward there too."""
    cfg = dict(CONFIGS["parts_coarser"], spatial_scale=1.0, sample_per_part=4)
    rois = [[0, 0, 0, 7, 7], [1, 2, 0, 9, 7], [0, -4, -4, 3, 3]]  # 8 x 8: bins 2, samples 0.5
    input, rois, offset, grad_output = problem(cfg, rois=rois)
    offset[...] = 0
    points = ref.sample_coordinates(rois, offset, ref.Options(**options(cfg)))
    assert (points == np.round(points)).mean() > 0.2
    expected = reference(input, rois, offset, grad_output, cfg)
    grads = deform_psroi_pool_backward(grad_output, input, rois, offset, **options(cfg))
    assert_relative(grads.grad_input, expected[2], "float64")
    assert_relative(grads.grad_offset, expected[3], "float64")


# ---------------------------------------------------------------------------- validation

BASE = CONFIGS["basic"]


def _valid_call():
    input, rois, offset, grad_output = problem(BASE)
    return dict(input=input, rois=rois, offset=offset), grad_output


def _change(arrays: dict, key: str, value) -> dict:
    return {**arrays, key: value}


VALIDATION_CASES = [
    # (id, array changes, option changes, error type, substrings of the message)
    (
        "input-3d",
        {"input": np.zeros((36, 9, 11))},
        {},
        CupydcnValueError,
        ["input must be 4-D", "(36, 9, 11)"],
    ),
    (
        "channels",
        {"input": np.zeros((2, 35, 9, 11))},
        {},
        CupydcnValueError,
        ["input has 35 channels", "output_dim * group_size**2 = 4 * 3**2 = 36"],
    ),
    (
        "empty-map",
        {"input": np.zeros((2, 36, 0, 11))},
        {},
        CupydcnValueError,
        ["height and width", "(2, 36, 0, 11)"],
    ),
    (
        "input-int",
        {"input": np.zeros((2, 36, 9, 11), dtype=np.int64)},
        {},
        CupydcnTypeError,
        ["input has dtype int64", "float64, float32"],
    ),
    (
        "offset-dtype",
        {"offset": np.zeros((7, 4, 3, 3), dtype=np.float32)},
        {},
        CupydcnTypeError,
        ["offset has dtype float32", "expected float64 like input"],
    ),
    (
        "rois-shape",
        {"rois": np.zeros((7, 4))},
        {},
        CupydcnValueError,
        ["rois must have shape [K, 5]", "(7, 4)"],
    ),
    (
        "rois-dtype",
        {"rois": np.zeros((7, 5), dtype=np.int32)},
        {},
        CupydcnTypeError,
        ["rois has dtype int32", "floating"],
    ),
    (
        "rois-batch",
        {"rois": np.array([[2.0, 0, 0, 1, 1]] * 7)},
        {},
        CupydcnValueError,
        ["rois[0, 0] = 2", "[0, 2)"],
    ),
    (
        "rois-nan",
        {"rois": np.array([[0.0, 0, 0, 1, 1]] * 6 + [[0, np.nan, 0, 1, 1]])},
        {},
        CupydcnValueError,
        ["rois[6]", "non-finite"],
    ),
    (
        "offset-odd",
        {"offset": np.zeros((7, 3, 3, 3))},
        {},
        CupydcnValueError,
        ["offset.shape[1] = 3", "2 * num_classes"],
    ),
    (
        "offset-3d",
        {"offset": np.zeros((7, 4, 3))},
        {},
        CupydcnValueError,
        ["offset must be 4-D", "(7, 4, 3)"],
    ),
    (
        "classes",
        {"offset": np.zeros((7, 6, 3, 3))},
        {},
        CupydcnValueError,
        ["output_dim = 4 must be divisible by num_classes = 3"],
    ),
    (
        "offset-parts",
        {"offset": np.zeros((7, 4, 2, 2))},
        {},
        CupydcnValueError,
        ["offset has shape (7, 4, 2, 2); expected (7, 4, 3, 3)"],
    ),
    (
        "offset-rois",
        {"offset": np.zeros((6, 4, 3, 3))},
        {},
        CupydcnValueError,
        ["offset has shape (6, 4, 3, 3); expected (7, 4, 3, 3)"],
    ),
    ("pooled-size", {}, {"pooled_size": 0}, CupydcnValueError, ["pooled_size must be >= 1; got 0"]),
    ("part-size", {}, {"part_size": -1}, CupydcnValueError, ["part_size must be >= 1; got -1"]),
    (
        "group-size-type",
        {},
        {"group_size": 1.5},
        CupydcnTypeError,
        ["group_size must be an int; got 1.5"],
    ),
    (
        "output-dim-bool",
        {},
        {"output_dim": True},
        CupydcnTypeError,
        ["output_dim must be an int; got True"],
    ),
    (
        "samples",
        {},
        {"sample_per_part": 0},
        CupydcnValueError,
        ["sample_per_part must be >= 1; got 0"],
    ),
    (
        "samples-huge",
        {},
        {"sample_per_part": 50_000},
        CupydcnValueError,
        ["sample_per_part must be at most 1024; got 50000"],
    ),
    (
        "scale-nan",
        {},
        {"spatial_scale": float("nan")},
        CupydcnValueError,
        ["spatial_scale must be finite; got nan"],
    ),
    (
        "scale-zero",
        {},
        {"spatial_scale": 0.0},
        CupydcnValueError,
        ["spatial_scale must be > 0; got 0.0"],
    ),
    (
        "trans-inf",
        {},
        {"trans_std": float("inf")},
        CupydcnValueError,
        ["trans_std must be finite; got inf"],
    ),
    (
        "trans-str",
        {},
        {"trans_std": "0.1"},
        CupydcnTypeError,
        ["trans_std must be a real number; got '0.1'"],
    ),
]


@pytest.mark.parametrize("case", VALIDATION_CASES, ids=[c[0] for c in VALIDATION_CASES])
def test_validation(case):
    _, array_changes, option_changes, error, fragments = case
    arrays, grad_output = _valid_call()
    arrays.update(array_changes)
    kw = {**options(BASE), **option_changes}
    for op, call in (
        ("deform_psroi_pool", lambda: deform_psroi_pool(**arrays, **kw)),
        (
            "deform_psroi_pool_backward",
            lambda: deform_psroi_pool_backward(grad_output, **arrays, **kw),
        ),
    ):
        with pytest.raises(error) as raised:
            call()
        message = str(raised.value)
        assert message.startswith(f"{op}: ")
        for fragment in fragments:
            assert fragment in message


@pytest.mark.parametrize(
    "grad_output, wrt, error, fragments",
    [
        (
            np.zeros((7, 4, 3, 2)),
            None,
            CupydcnValueError,
            ["grad_output has shape (7, 4, 3, 2); expected the output shape (7, 4, 3, 3)"],
        ),
        (
            np.zeros((7, 4, 3, 3), dtype=np.float32),
            None,
            CupydcnTypeError,
            ["grad_output has dtype float32; expected float64 like input"],
        ),
        (
            np.zeros((7, 4, 3, 3)),
            ["input", "mask"],
            CupydcnValueError,
            ["wrt names ['mask']", "['input', 'offset']"],
        ),
    ],
)
def test_backward_validation(grad_output, wrt, error, fragments):
    arrays, _ = _valid_call()
    with pytest.raises(error) as raised:
        deform_psroi_pool_backward(grad_output, **arrays, wrt=wrt, **options(BASE))
    for fragment in ["deform_psroi_pool_backward: ", *fragments]:
        assert fragment in str(raised.value)


def test_wrt_offset_without_offset():
    arrays, grad_output = _valid_call()
    with pytest.raises(CupydcnValueError, match="wrt names 'offset' but offset is None"):
        deform_psroi_pool_backward(
            grad_output, **_change(arrays, "offset", None), wrt="offset", **options(BASE)
        )


def test_mixed_array_libraries():
    torch = pytest.importorskip("torch")
    arrays, _ = _valid_call()
    with pytest.raises(CupydcnTypeError, match="pass arrays of one library"):
        deform_psroi_pool(
            **_change(arrays, "rois", torch.from_numpy(arrays["rois"])), **options(BASE)
        )


# ---------------------------------------------------------------------------- planning


def test_index_width_switches_past_2_to_the_31():
    cfg = CONFIGS["basic"]
    input, rois, offset, _ = problem(cfg)
    geom = psroi_pool_geometry("test", input, rois, offset, **options(cfg))
    assert index_bits_for(geom) == 32
    assert index_bits_for(replace(geom, batch=2**31 // (36 * 9 * 11) + 1)) == 64  # input
    assert index_bits_for(replace(geom, num_rois=2**31 // (4 * 9) + 1)) == 64  # output
    # offset [K, 4, 3, 3]: 36 K elements; 32-bit only up to the grid-stride-safe limit
    from cupydcn.cuda.launch import INT32_INDEX_LIMIT

    assert index_bits_for(replace(geom, num_rois=INT32_INDEX_LIMIT // 36 + 1, output_dim=1)) == 64
    assert index_bits_for(replace(geom, num_rois=INT32_INDEX_LIMIT // 36, output_dim=1)) == 32
