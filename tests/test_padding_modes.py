"""deform_conv2d's ``padding_mode`` ("zeros", "border", "reflection"; docs/semantics.md §4).

The layers of the core op, per mode:

* the coordinate mapping (cupydcn.deform_conv.padding.map_coordinates) against the formula written
  in tests/reference.py, with its slopes;
* the NumPy backend's forward against the loop reference, every dtype, on problems with
  sample points far outside the map on every side, 1-pixel-high / -wide maps and
  non-square kernels; its backward in low precision against float64;
* float64 finite differences of every input away from the kinks (the backend's forward,
  elementwise, and the reference's, along random directions);
* the kink convention: at sample points exactly on 0, H-1 and the reflection points, the
  offset gradient is the one-sided difference of the reference on the documented side;
* torch.nn.functional.grid_sample (align_corners=True) computes the same function;
* the public API with NumPy, PyTorch and JAX arrays, and validation.

The CUDA kernels, run by the CPU emulator and on a GPU: tests/test_padding_modes_emulated.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import cupydcn
from cupydcn import PADDING_MODES
from cupydcn.deform_conv.numpy_backend import conv_backward, conv_forward
from cupydcn.deform_conv.padding import PADDING_MODE_CODES, cell_floor, map_coordinates
from cupydcn.deform_conv.spec import conv_geometry
from reference import (
    ConvConfig,
    deform_conv2d_reference,
    far_offsets,
    map_coordinate,
    offsets_for_points,
    sample_points_of,
)
from support import (
    DTYPE_NAMES,
    GRADS,
    HALF_TYPES,
    LOW_PRECISION,
    assert_close,
    assert_close_with_rounded_columns,
    cast_arrays,
    dtype_of,
    seeded,
)

GRADIENT_ORDER = GRADS
ALL_GRADIENTS = frozenset(GRADIENT_ORDER)
WORKSPACE = 1 << 26
MODES = ("zeros", "border", "reflection")
PADDED_MODES = ("border", "reflection")

# ---------------------------------------------------------------------------- problems

CONFIGS = {
    "k3x3_p1": ConvConfig(
        batch=2, in_channels=2, out_channels=3, height=5, width=6, padding=(1, 1)
    ),
    "k2x3_s2x1_p1x2_d1x2_groups2_offset_groups2": ConvConfig(
        batch=1,
        in_channels=4,
        out_channels=4,
        groups=2,
        offset_groups=2,
        kernel=(2, 3),
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        height=6,
        width=7,
    ),
    "k3x1_h2_no_mask": ConvConfig(
        batch=2,
        in_channels=2,
        out_channels=2,
        kernel=(3, 1),
        padding=(1, 0),
        height=2,
        width=5,
        with_mask=False,
    ),
    "h1_k1x3": ConvConfig(
        batch=2, in_channels=2, out_channels=2, height=1, width=6, kernel=(1, 3), padding=(0, 1)
    ),
    "w1_k3x1_offset_groups3_no_bias": ConvConfig(
        batch=1,
        in_channels=3,
        out_channels=2,
        height=5,
        width=1,
        kernel=(3, 1),
        padding=(1, 0),
        offset_groups=3,
        with_bias=False,
    ),
    "h1w1_k2x2": ConvConfig(
        batch=2, in_channels=2, out_channels=1, height=1, width=1, kernel=(2, 2), padding=(1, 1)
    ),
}


def problem(name: str, *key, away_from_kinks=False):
    config = CONFIGS[name]
    rng = seeded(name, *key)
    arrays = config.arrays(rng)
    arrays["offset"] = far_offsets(config, rng, away_from_kinks=away_from_kinks)
    projection = rng.normal(size=(config.batch, config.out_channels) + config.out_size)
    return config, arrays, projection, rng


def geometry(arrays: dict, config: ConvConfig, mode: str):
    return conv_geometry(
        arrays["input"],
        arrays["offset"],
        arrays["weight"],
        arrays["bias"],
        arrays["mask"],
        padding_mode=mode,
        **config.options,
    )


def forward(arrays: dict, config: ConvConfig, mode: str, *, workspace_bytes=WORKSPACE):
    return conv_forward(
        arrays["input"],
        arrays["offset"],
        arrays["weight"],
        arrays["bias"],
        arrays["mask"],
        geometry(arrays, config, mode),
        workspace_bytes=workspace_bytes,
    )


def backward(
    grad_output,
    arrays: dict,
    config: ConvConfig,
    mode: str,
    *,
    wrt=ALL_GRADIENTS,
    workspace_bytes=WORKSPACE,
) -> dict:
    grads = conv_backward(
        grad_output,
        arrays["input"],
        arrays["offset"],
        arrays["weight"],
        arrays["mask"],
        geometry(arrays, config, mode),
        wrt=frozenset(wrt),
        workspace_bytes=workspace_bytes,
    )
    return dict(zip(GRADIENT_ORDER, grads))


def reference(arrays: dict, config: ConvConfig, mode: str) -> np.ndarray:
    return deform_conv2d_reference(
        arrays["input"],
        arrays["offset"],
        arrays["weight"],
        arrays["bias"],
        arrays["mask"],
        padding_mode=mode,
        **config.options,
    )


def magnitude(arrays: dict, config: ConvConfig, mode: str) -> np.ndarray:
    """S: the reference on |input|, |weight|, |bias|, |mask| (bounds sum |term|)."""
    absolute = {
        name: None if v is None or name == "offset" else np.abs(v.astype(np.float64))
        for name, v in arrays.items()
    }
    absolute["offset"] = arrays["offset"].astype(np.float64)
    return reference(absolute, config, mode)


def grad_weight_magnitude(grad_output, arrays: dict, config: ConvConfig, mode: str):
    """The float64 grad_weight on |grad_output|, |input|, |mask|: the sum over its terms of
    |grad_output| * |column| (the bilinear weights are not negative in every mode)."""
    absolute = {
        name: None if v is None or name == "offset" else np.abs(v.astype(np.float64))
        for name, v in arrays.items()
    }
    absolute["offset"] = arrays["offset"].astype(np.float64)
    grad_output = np.abs(grad_output.astype(np.float64))
    return backward(grad_output, absolute, config, mode, wrt={"weight"})["weight"]


# |out - ref| <= 2 * rounding * |ref| + of_sum * S (tests/support.py), plus for the half
# types rounding * S_columns, S_columns = S without the bias (the sum of |weight| *
# |column|): their columns are rounded once to the element dtype before the GEMM
# (docs/semantics.md §6.1); as in tests/test_conv_numpy.py.
def assert_close_to_reference(output, arrays, config, mode, dtype_name) -> None:
    exact = cast_arrays(arrays, np.float64)
    columns = magnitude({**exact, "bias": None}, config, mode) if dtype_name in HALF_TYPES else 0.0
    assert_close_with_rounded_columns(
        output,
        reference(exact, config, mode),
        columns,
        dtype_name,
        "output",
        magnitude=magnitude(exact, config, mode),
    )


# ---------------------------------------------------------------------------- the mapping

MAPPING_POINTS = [
    -np.inf,
    -1e30,
    -1e4,
    -37.25,
    -16.0,
    -9.0,
    -8.0,
    -7.5,
    -4.0,
    -3.0,
    -1.0,
    -0.5,
    -1e-9,
    -0.0,
    0.0,
    1e-9,
    0.5,
    1.0,
    2.75,
    3.0,
    4.0,
    4.5,
    5.0,
    7.0,
    8.0,
    8.25,
    12.0,
    16.0,
    17.0,
    1e4 + 0.5,
    1e30,
    np.inf,
    np.nan,
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("size", [1, 2, 5])
@pytest.mark.parametrize("mode", MODES)
def test_map_coordinates_matches_formula(mode, size, dtype):
    p = np.array(MAPPING_POINTS, dtype=dtype)
    mapped, slope = map_coordinates(np, p, size, mode)
    assert mapped.dtype == dtype and slope.dtype == dtype and mapped.shape == p.shape
    expected = np.array([map_coordinate(float(v), size, mode) for v in p])
    # fmod is exact: the mapping is exact in every precision
    np.testing.assert_array_equal(mapped.astype(np.float64), expected)
    if mode == "reflection" and size > 1:
        assert np.isnan(mapped[np.isinf(p)]).all()  # no limit at infinity
    if mode != "zeros":
        finite = np.isfinite(mapped)
        assert np.all((mapped[finite] >= 0) & (mapped[finite] <= size - 1))
    assert np.all(np.isin(slope, (-1.0, 0.0, 1.0)))


@pytest.mark.parametrize("size", [1, 2, 5])
@pytest.mark.parametrize("mode", MODES)
def test_map_coordinates_slope_is_the_derivative_between_kinks(mode, size):
    rng = np.random.default_rng(size)
    p = rng.integers(-40, 40, 400) + rng.uniform(0.05, 0.95, 400)
    _, slope = map_coordinates(np, p, size, mode)
    h = 1e-7
    plus = np.array([map_coordinate(v + h, size, mode) for v in p])
    minus = np.array([map_coordinate(v - h, size, mode) for v in p])
    np.testing.assert_allclose(slope, (plus - minus) / (2 * h), atol=1e-6)


def test_map_coordinates_slope_at_the_kinks():
    """The slope of the branch taken (module docstring of cupydcn.deform_conv.padding), size 5."""
    p = np.array([-8.0, -4.0, -0.0, 0.0, 4.0, 8.0, 12.0, 16.0, -12.0])
    mapped, slope = map_coordinates(np, p, 5, "reflection")
    np.testing.assert_array_equal(mapped, [0, 4, 0, 0, 4, 0, 4, 0, 4])
    np.testing.assert_array_equal(slope, [-1, -1, 1, 1, 1, 1, 1, 1, -1])
    mapped, slope = map_coordinates(
        np, np.array([-1.0, 0.0, 2.0, 4.0, 4.5, -np.inf, np.inf]), 5, "border"
    )
    np.testing.assert_array_equal(mapped, [0, 0, 2, 4, 4, 0, 4])
    np.testing.assert_array_equal(slope, [0, 1, 1, 1, 0, 0, 0])
    for mode in PADDED_MODES:  # a 1-pixel dimension: constant
        mapped, slope = map_coordinates(np, np.array([-3.0, 0.0, 2.5, np.nan]), 1, mode)
        np.testing.assert_array_equal(mapped, [0, 0, 0, np.nan])
        np.testing.assert_array_equal(slope[:3], 0)


def test_cell_floor_keeps_the_last_cell_inside():
    mapped = np.array([0.0, 0.5, 3.0, 3.5, 4.0])
    np.testing.assert_array_equal(cell_floor(np, mapped, 5, "border"), [0, 0, 3, 3, 3])
    np.testing.assert_array_equal(cell_floor(np, mapped, 5, "zeros"), [0, 0, 3, 3, 4])
    np.testing.assert_array_equal(cell_floor(np, np.zeros(2), 1, "reflection"), [0, 0])


def test_padding_mode_names_and_codes():
    assert PADDING_MODES == MODES
    assert PADDING_MODE_CODES == {"zeros": 0, "border": 1, "reflection": 2}
    from cupydcn.cuda.kernel_source import module_source

    source = module_source("deform_conv.cu")  # the kernels' codes are the same
    for mode, code in PADDING_MODE_CODES.items():
        assert f"PADDING_{mode.upper()} = {code}" in source


def test_map_coordinates_rejects_unknown_mode():
    with pytest.raises(ValueError, match="circular"):
        map_coordinates(np, np.zeros(3), 4, "circular")


# ---------------------------------------------------------------------------- forward


def test_problems_reach_beyond_every_side():
    for name in CONFIGS:
        config, arrays, _, _ = problem(name, "forward", "float64")
        py, px = sample_points_of(config, arrays["offset"])
        assert py.min() < -config.height and py.max() > 2 * config.height, name
        assert px.min() < -config.width and px.max() > 2 * config.width, name


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_reference(name, mode, dtype_name):
    config, arrays, _, _ = problem(name, "forward", dtype_name)
    dtype = dtype_of(dtype_name)
    arrays = cast_arrays(arrays, dtype)
    output = forward(
        arrays, config, mode, workspace_bytes=1 if dtype_name == "float32" else WORKSPACE
    )
    assert output.dtype == dtype
    assert_close_to_reference(output, arrays, config, mode, dtype_name)


@pytest.mark.parametrize("mode", PADDED_MODES)
def test_points_outside_read_the_mapped_pixel(mode):
    """1x1 kernel, weight 1: the output is the input at the mapped point; far points read
    the edge (border) or the mirrored pixel (reflection), not 0."""
    config = ConvConfig(
        batch=1,
        in_channels=1,
        out_channels=1,
        height=3,
        width=4,
        kernel=(1, 1),
        with_bias=False,
        with_mask=False,
    )
    arrays = config.arrays(np.random.default_rng(0))
    arrays["input"] = np.arange(12.0).reshape(1, 1, 3, 4)
    arrays["weight"] = np.ones((1, 1, 1, 1))
    py = np.array([-1.0, -5.0, 3.0, 7.0, 1.0, 1.0, 1.0, 1.0, -2.0, 2.0, 0.5, 13.0])
    px = np.array([1.0, 1.0, 1.0, 1.0, -1.0, -4.0, 4.0, 9.0, -3.0, 3.0, 6.5, 2.0])
    arrays["offset"] = offsets_for_points(
        config, py.reshape(1, 1, 1, 3, 4), px.reshape(1, 1, 1, 3, 4)
    )
    output = forward(arrays, config, mode).reshape(-1)
    if mode == "border":
        rows = np.clip(py, 0, 2)
        cols = np.clip(px, 0, 3)
    else:
        rows = np.array([1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 0.5, 1])
        cols = np.array([1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 0.5, 2])
    np.testing.assert_allclose(output, rows * 4 + cols, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_offsets(mode):
    """NaN samples NaN in every mode; +-inf samples 0 (zeros), the edge pixel (border) or
    NaN (reflection). No warnings (they are errors here)."""
    config = CONFIGS["k3x3_p1"]
    _, arrays, projection, _ = problem("k3x3_p1", "nonfinite")
    offset = arrays["offset"]
    offset[0, 0, 0, 0] = np.inf  # tap 0 dy
    offset[0, 3, 1, 1] = -np.inf  # tap 1 dx
    offset[1, 4, 2, 2] = np.nan  # tap 2 dy
    output = forward(arrays, config, mode)
    grads = backward(projection, arrays, config, mode)
    np.testing.assert_allclose(
        output, reference(arrays, config, mode), rtol=1e-12, atol=1e-12, equal_nan=True
    )
    assert np.isnan(output[1, :, 2, 2]).all()
    infinite_is_nan = mode == "reflection"
    assert np.isnan(output[0, :, 0, 0]).all() == infinite_is_nan
    assert np.isnan(output[0, :, 1, 1]).all() == infinite_is_nan
    nan_offsets = np.isnan(grads["offset"])
    assert nan_offsets[1, 4:6, 2, 2].all()
    assert nan_offsets[0, 0:2, 0, 0].all() == infinite_is_nan
    if mode == "border":  # clamped: no offset gradient in the clamped coordinate
        assert grads["offset"][0, 0, 0, 0] == 0 and grads["offset"][0, 3, 1, 1] == 0
    assert np.isfinite(grads["input"]).all()


# ---------------------------------------------------------------------------- backward

# Backward in low precision against the float64 backward on the same quantised inputs
# (as tests/test_conv_numpy.py): |grad - grad64| <= 2 * rounding * |grad64| + of_max *
# max|grad64| (tests/support.py).


@pytest.mark.parametrize("dtype_name", LOW_PRECISION)
@pytest.mark.parametrize("mode", PADDED_MODES)
@pytest.mark.parametrize(
    "name",
    [
        "k3x3_p1",
        "k2x3_s2x1_p1x2_d1x2_groups2_offset_groups2",
        "h1_k1x3",
        "w1_k3x1_offset_groups3_no_bias",
    ],
)
def test_low_precision_backward_matches_float64(name, mode, dtype_name):
    config, arrays, projection, _ = problem(name, "backward", dtype_name)
    dtype = dtype_of(dtype_name)
    arrays = cast_arrays(arrays, dtype)
    grad_output = projection.astype(dtype)
    grads = backward(grad_output, arrays, config, mode, workspace_bytes=1)
    expected = backward(
        grad_output.astype(np.float64), cast_arrays(arrays, np.float64), config, mode
    )
    for argument in GRADIENT_ORDER:
        if expected[argument] is None:
            assert grads[argument] is None
            continue
        assert grads[argument].dtype == dtype
        if argument == "weight" and dtype_name in HALF_TYPES:
            # its columns are rounded once (docs/semantics.md §6.1): + rounding * the sum
            # of |grad_output| * |column|
            columns = grad_weight_magnitude(grad_output, arrays, config, mode)
            assert_close_with_rounded_columns(
                grads[argument], expected[argument], columns, dtype_name, argument, zero_scale=0.0
            )
        else:
            assert_close(grads[argument], expected[argument], dtype_name, argument, zero_scale=0.0)


STEP = 1e-6
RTOL = 1e-6
GRADCHECK_CONFIGS = (
    "k3x3_p1",
    "k2x3_s2x1_p1x2_d1x2_groups2_offset_groups2",
    "h1_k1x3",
    "w1_k3x1_offset_groups3_no_bias",
)
GRADCHECK_CASES = [
    (name, mode, argument)
    for name in GRADCHECK_CONFIGS
    for mode in PADDED_MODES
    for argument in GRADIENT_ORDER
    if (argument != "mask" or CONFIGS[name].with_mask)
    and (argument != "bias" or CONFIGS[name].with_bias)
]


def projected(arrays, config, mode, projection, *, loop_reference=False) -> float:
    output = reference(arrays, config, mode) if loop_reference else forward(arrays, config, mode)
    return float(np.sum(projection * output))


@pytest.mark.parametrize(
    ("name", "mode", "argument"),
    GRADCHECK_CASES,
    ids=[f"{n}-{m}-{a}" for n, m, a in GRADCHECK_CASES],
)
def test_gradient_matches_central_differences(name, mode, argument):
    """Every element of every input, float64; no sample point within 0.2 of an integer
    (the kinks of the bilinear weights and of both mappings are on integers)."""
    config, arrays, projection, _ = problem(name, "gradcheck", away_from_kinks=True)
    actual = backward(projection, arrays, config, mode)[argument]
    array = arrays[argument]
    expected = np.empty_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + STEP
        plus = projected(arrays, config, mode, projection)
        array[index] = original - STEP
        minus = projected(arrays, config, mode, projection)
        array[index] = original
        expected[index] = (plus - minus) / (2 * STEP)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * scale, err_msg=argument)
    assert np.abs(expected).max() > 0  # the problem exercises this gradient


@pytest.mark.parametrize("mode", PADDED_MODES)
@pytest.mark.parametrize("name", GRADCHECK_CONFIGS)
def test_gradient_matches_reference_directional_differences(name, mode):
    """<gradient, v> against central differences of the loop reference along random v."""
    config, arrays, projection, rng = problem(name, "directional", away_from_kinks=True)
    grads = backward(projection, arrays, config, mode)
    for argument in GRADIENT_ORDER:
        if arrays[argument] is None:
            continue
        original = arrays[argument]
        direction = rng.normal(size=original.shape)
        arrays[argument] = original + STEP * direction
        plus = projected(arrays, config, mode, projection, loop_reference=True)
        arrays[argument] = original - STEP * direction
        minus = projected(arrays, config, mode, projection, loop_reference=True)
        arrays[argument] = original
        numerical = (plus - minus) / (2 * STEP)
        analytic = float(np.sum(grads[argument] * direction))
        scale = max(1.0, float(np.sum(np.abs(grads[argument] * direction))))
        assert abs(analytic - numerical) <= RTOL * scale, (argument, analytic, numerical)


# ---------------------------------------------------------------------------- kinks


def documented_side(p: float, size: int, mode: str) -> int:
    """The side (+1: p + h, -1: p - h) whose one-sided derivative the offset gradient is,
    or 0 where it is 0 (cupydcn/deform_conv/padding.py): the slope of the branch taken times the
    blend's derivative from inside the map, which at p' == size - 1 is the left one."""
    if mode == "zeros":
        return 1
    if size == 1:
        return 0
    last = size - 1
    if mode == "border":
        if p < 0 or p > last:
            return 0
        return -1 if p == last else 1
    t = abs(p) % (2 * last)
    mapped = t if t <= last else 2 * last - t
    slope = (-1 if p < 0 else 1) * (1 if t <= last else -1)
    return -slope if mapped == last else slope


KINK_CONFIG = ConvConfig(
    batch=1, in_channels=2, out_channels=2, height=5, width=4, kernel=(2, 2), padding=(0, 0)
)


@pytest.mark.parametrize("mode", MODES)
def test_offset_gradient_at_kinks_is_the_documented_one_sided_derivative(mode):
    """Sample points on 0, H-1, the reflection points -(H-1), +-2(H-1), 3(H-1), ..., on
    other integers and between them, in every combination; each offset element's gradient
    is the one-sided difference of the loop reference on the documented side."""
    config = KINK_CONFIG
    rng = seeded("kinks", mode)
    arrays = config.arrays(rng)
    # rising by more than 0.7 per row, positive weights, mask and projection: every
    # derivative in y on the map has one sign and is clearly nonzero
    rows = np.arange(config.height, dtype=np.float64)[:, None]
    arrays["input"] = rows + rng.uniform(0.0, 0.3, size=arrays["input"].shape)
    arrays["weight"] = rng.uniform(0.5, 1.5, size=arrays["weight"].shape)
    arrays["mask"] = rng.uniform(0.5, 1.5, size=arrays["mask"].shape)
    h, w = config.height - 1, config.width - 1  # reflection period halves
    ys = np.array(
        [-3 * h, -2 * h, -h, -3.0, -1.0, -0.5, 0.0, 1.0, 2.5, h, h + 1.0, 2 * h, 3 * h, 4 * h + 1.5]
    )
    xs = np.array([-2 * w, -w, -1.0, 0.0, 1.0, 1.5, w, w + 1.0, 2 * w, 3 * w, 5 * w + 0.25])
    out_h, out_w = config.out_size
    shape = (1, 1, 4, out_h, out_w)
    points_y = rng.choice(ys, size=shape)
    points_x = rng.choice(xs, size=shape)
    arrays["offset"] = offsets_for_points(config, points_y, points_x)
    projection = rng.uniform(0.5, 1.5, size=(1, 2, out_h, out_w))
    grad_offset = backward(projection, arrays, config, mode)["offset"]

    offset = arrays["offset"]
    sides = np.stack(
        [
            np.vectorize(documented_side)(points_y, config.height, mode),
            np.vectorize(documented_side)(points_x, config.width, mode),
        ],
        axis=3,
    )
    sides = sides.reshape(offset.shape)
    base = projected(arrays, config, mode, projection, loop_reference=True)
    for index in np.ndindex(offset.shape):
        side = int(sides[index])
        original = offset[index]
        offset[index] = original + (side or 1) * STEP
        moved = projected(arrays, config, mode, projection, loop_reference=True)
        offset[index] = original
        if side == 0:
            assert grad_offset[index] == 0.0, index
            assert abs(moved - base) <= 1e-12, index
            continue
        expected = (moved - base) / (side * STEP)
        assert grad_offset[index] == pytest.approx(expected, rel=1e-6, abs=1e-6), (index, side)
    if mode != "zeros":  # on the edges themselves: from inside the map, never 0
        on_edge = (points_y == 0) | (points_y == h)
        d_dy = grad_offset.reshape(1, 1, 4, 2, out_h, out_w)[:, :, :, 0]
        assert on_edge.any() and np.all(d_dy[on_edge] > 0.1)


# ---------------------------------------------------------------------------- grid_sample


@pytest.mark.parametrize("mode", MODES)
def test_matches_torch_grid_sample(mode):
    """A depthwise 1x1 deform_conv2d with weight 1 is grid_sample(align_corners=True) at the
    sample points: values, input gradient, and (away from kinks) the offset gradient, with
    H - 1 and W - 1 powers of two so the grid's normalisation is exact."""
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("torch.nn.functional")
    config = ConvConfig(
        batch=2,
        in_channels=3,
        out_channels=3,
        height=9,
        width=5,
        kernel=(1, 1),
        groups=3,
        with_bias=False,
        with_mask=False,
    )
    for away_from_kinks in (False, True):
        rng = seeded("grid_sample", mode, away_from_kinks)
        arrays = config.arrays(rng)
        arrays["weight"] = np.ones((3, 1, 1, 1))
        arrays["offset"] = far_offsets(config, rng, away_from_kinks=away_from_kinks)
        projection = rng.normal(size=(2, 3, 9, 5))
        output = forward(arrays, config, mode)
        grads = backward(projection, arrays, config, mode, wrt={"input", "offset"})

        py, px = sample_points_of(config, arrays["offset"])  # [N, 1, 1, 9, 5]
        grid = np.stack([2 * px[:, 0, 0] / 4 - 1, 2 * py[:, 0, 0] / 8 - 1], axis=-1)
        x = torch.tensor(arrays["input"], requires_grad=True)
        g = torch.tensor(grid, requires_grad=True)
        sampled = functional.grid_sample(
            x, g, mode="bilinear", padding_mode=mode, align_corners=True
        )
        (sampled * torch.tensor(projection)).sum().backward()
        np.testing.assert_allclose(output, sampled.detach().numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(grads["input"], x.grad.numpy(), rtol=0, atol=1e-12)
        if away_from_kinks:
            grid_grad = g.grad.numpy()  # d/d grid = d/dp * (size - 1) / 2
            np.testing.assert_allclose(
                grads["offset"][:, 0], grid_grad[..., 1] * 2 / 8, rtol=0, atol=1e-12
            )
            np.testing.assert_allclose(
                grads["offset"][:, 1], grid_grad[..., 0] * 2 / 4, rtol=0, atol=1e-12
            )


# ---------------------------------------------------------------------------- public API


def _to_library(library: str, array):
    if array is None or library == "numpy":
        return array
    if library == "torch":
        torch = pytest.importorskip("torch")
        return torch.from_numpy(array.copy())
    jnp = pytest.importorskip("jax.numpy")
    return jnp.asarray(array)


@pytest.mark.parametrize("library", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("mode", MODES)
def test_public_api(library, mode):
    name = "k2x3_s2x1_p1x2_d1x2_groups2_offset_groups2"
    config, arrays, projection, _ = problem(name, "api")
    arrays = cast_arrays(arrays, np.float32)
    projection = projection.astype(np.float32)
    converted = {k: _to_library(library, v) for k, v in arrays.items()}
    output = cupydcn.deform_conv2d(
        converted["input"],
        converted["offset"],
        converted["weight"],
        converted["bias"],
        mask=converted["mask"],
        padding_mode=mode,
        **config.options,
    )
    grads = cupydcn.deform_conv2d_backward(
        _to_library(library, projection),
        converted["input"],
        converted["offset"],
        converted["weight"],
        converted["mask"],
        padding_mode=mode,
        **config.options,
    )
    assert type(output) is type(converted["input"])
    np.testing.assert_array_equal(np.asarray(output), forward(arrays, config, mode))
    expected = backward(projection, arrays, config, mode)
    for argument in GRADIENT_ORDER:
        np.testing.assert_array_equal(
            np.asarray(getattr(grads, f"grad_{argument}")), expected[argument], err_msg=argument
        )


def test_modes_differ_where_points_leave_the_map():
    config, arrays, _, _ = problem("k3x3_p1", "differ")
    outputs = {mode: forward(arrays, config, mode) for mode in MODES}
    assert not np.allclose(outputs["zeros"], outputs["border"])
    assert not np.allclose(outputs["border"], outputs["reflection"])


@pytest.mark.parametrize("bad", ["circular", "Border", "", None, 1, ("zeros",)])
@pytest.mark.parametrize("op", ["deform_conv2d", "deform_conv2d_backward"])
def test_invalid_padding_mode(op, bad):
    config, arrays, projection, _ = problem("k3x3_p1", "invalid")
    with pytest.raises(cupydcn.CupydcnValueError) as info:
        if op == "deform_conv2d":
            cupydcn.deform_conv2d(
                arrays["input"],
                arrays["offset"],
                arrays["weight"],
                padding=1,
                mask=arrays["mask"],
                padding_mode=bad,
            )
        else:
            cupydcn.deform_conv2d_backward(
                projection,
                arrays["input"],
                arrays["offset"],
                arrays["weight"],
                arrays["mask"],
                padding=1,
                padding_mode=bad,
            )
    message = str(info.value)
    assert message.startswith(
        f"{op}: padding_mode must be one of ('zeros', 'border', 'reflection'); got {bad!r}"
    ), message
