"""The NumPy backend of deform_conv2d against the naive float64 reference (tests/reference.py).

Tolerances (tests/support.py's table; S = the reference evaluated on |input|, |weight|,
|bias|, |mask|, i.e. the sum of the magnitudes of the terms of each output, so cancellation
does not tighten them): |out - ref| <= 2 * rounding * |ref| + of_sum * S, i.e. 32 u_acc * S
for float32 / float64 and 2u * |ref| + 32 * 2**-24 * S + u * S_columns for the half types,
whose columns (mask * sample, the GEMM operand) are rounded once to the element dtype
before the GEMM (docs/semantics.md §6.1): S_columns = S without the bias, the sum of
|weight| * |column| over the terms. Their grad_weight likewise carries u times the sum of
|grad_output| * |column|; the other gradients do not read the columns.

The half types must compute in float32 and round once: the of_sum term is far below
what half-precision accumulation would give. Low-precision inputs are quantised first and
the reference runs on the quantised values, so only the computation's rounding is measured.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cupydcn.deform_conv.numpy_backend import (
    _images_per_chunk,
    _working_bytes_per_image,
    conv_backward,
    conv_forward,
)
from cupydcn.deform_conv.spec import conv_geometry
from reference import ConvConfig, deform_conv2d_reference
from support import (
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
ALL_GRADIENTS = frozenset(GRADS)
LARGE_WORKSPACE = 1 << 30


def geometry(arrays: dict, config: ConvConfig):
    return conv_geometry(
        arrays["input"],
        arrays["offset"],
        arrays["weight"],
        arrays["bias"],
        arrays["mask"],
        padding_mode="zeros",
        **config.options,
    )


def forward(arrays: dict, config: ConvConfig, *, workspace_bytes: int = LARGE_WORKSPACE):
    return conv_forward(
        arrays["input"],
        arrays["offset"],
        arrays["weight"],
        arrays["bias"],
        arrays["mask"],
        geometry(arrays, config),
        workspace_bytes=workspace_bytes,
    )


def backward(
    grad_output,
    arrays: dict,
    config: ConvConfig,
    *,
    wrt=ALL_GRADIENTS,
    workspace_bytes: int = LARGE_WORKSPACE,
) -> dict:
    grads = conv_backward(
        grad_output,
        arrays["input"],
        arrays["offset"],
        arrays["weight"],
        arrays["mask"],
        geometry(arrays, config),
        wrt=frozenset(wrt),
        workspace_bytes=workspace_bytes,
    )
    return dict(zip(GRADIENT_ORDER, grads))


def reference(arrays: dict, config: ConvConfig) -> np.ndarray:
    return deform_conv2d_reference(
        arrays["input"],
        arrays["offset"],
        arrays["weight"],
        arrays["bias"],
        arrays["mask"],
        **config.options,
    )


def magnitude(arrays: dict, config: ConvConfig) -> np.ndarray:
    """S: the reference on absolute values, a bound of sum |term| of every output."""
    absolute = {
        name: (None if value is None or name == "offset" else np.abs(value.astype(np.float64)))
        for name, value in arrays.items()
    }
    absolute["offset"] = arrays["offset"]
    return deform_conv2d_reference(
        absolute["input"],
        absolute["offset"],
        absolute["weight"],
        absolute["bias"],
        absolute["mask"],
        **config.options,
    )


def grad_weight_magnitude(grad_output, arrays: dict, config: ConvConfig) -> np.ndarray:
    """The float64 grad_weight on |grad_output|, |input|, |mask|: the sum over its terms of
    |grad_output| * |column| (the bilinear weights are not negative)."""
    absolute = {
        name: None if value is None or name == "offset" else np.abs(value.astype(np.float64))
        for name, value in arrays.items()
    }
    absolute["offset"] = arrays["offset"].astype(np.float64)
    grad_output = np.abs(grad_output.astype(np.float64))
    return backward(grad_output, absolute, config, wrt={"weight"})["weight"]


def assert_close_to_reference(output, arrays, config, dtype_name: str) -> None:
    """|out - ref| <= 2 * rounding * |ref| + of_sum * S + rounding * S_columns (module
    docstring; the last term, one rounding of each column, only for the half types)."""
    columns = magnitude({**arrays, "bias": None}, config) if dtype_name in HALF_TYPES else 0.0
    assert_close_with_rounded_columns(
        output,
        reference(arrays, config),
        columns,
        dtype_name,
        "output",
        magnitude=magnitude(arrays, config),
    )


CONFIGS = {
    "k3x3_mask_bias": ConvConfig(),
    "k2x3_stride2x1_pad1x0_dil1x2": ConvConfig(
        kernel=(2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2), height=6, width=7
    ),
    "k3x1_stride1x3_pad2x1_dil2x1": ConvConfig(
        kernel=(3, 1), stride=(1, 3), padding=(2, 1), dilation=(2, 1), height=5, width=8
    ),
    "k1x3_stride2x2_pad0x2_dil1x3": ConvConfig(
        kernel=(1, 3), stride=(2, 2), padding=(0, 2), dilation=(1, 3), height=5, width=6
    ),
    "groups2_offset_groups4": ConvConfig(
        in_channels=8, out_channels=6, groups=2, offset_groups=4, kernel=(2, 2), height=4, width=5
    ),
    "groups4_offset_groups2": ConvConfig(
        in_channels=8,
        out_channels=4,
        groups=4,
        offset_groups=2,
        kernel=(2, 3),
        padding=(1, 1),
        height=4,
        width=4,
    ),
    "groups2_offset_groups2_no_mask": ConvConfig(
        in_channels=4, out_channels=2, groups=2, offset_groups=2, with_mask=False, height=4
    ),
    "groups3_dcnv1_no_bias": ConvConfig(
        in_channels=6,
        out_channels=3,
        groups=3,
        with_mask=False,
        with_bias=False,
        kernel=(2, 2),
        height=4,
        width=4,
    ),
    "batch1_no_bias": ConvConfig(batch=1, with_bias=False, padding=(1, 1)),
    "batch3_no_mask_no_bias": ConvConfig(
        batch=3, with_mask=False, with_bias=False, height=4, width=4, kernel=(2, 2)
    ),
    "k1x1_pad2": ConvConfig(kernel=(1, 1), padding=(2, 2), height=3, width=4),
    "output_1x1": ConvConfig(height=3, width=3, out_channels=2),
    "one_channel": ConvConfig(in_channels=1, out_channels=1, batch=1, padding=(1, 1)),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("offset_scale", [1.5, 6.0], ids=["offsets_near", "offsets_far"])
def test_forward_matches_reference(name, offset_scale):
    config = CONFIGS[name]
    rng = seeded(name, offset_scale)
    arrays = config.arrays(rng, offset_scale=offset_scale)
    assert_close_to_reference(forward(arrays, config), arrays, config, "float64")


def boundary_offsets(config: ConvConfig, special_values_y, special_values_x, rng) -> np.ndarray:
    """Offsets whose sample points land exactly on the given coordinates (y, x)."""
    kernel_h, kernel_w = config.kernel
    taps = kernel_h * kernel_w
    out_h, out_w = config.out_size
    oy = np.arange(out_h)[:, None]
    ox = np.arange(out_w)[None, :]
    offset = np.empty((config.batch, 2 * config.offset_groups * taps, out_h, out_w))
    for channel in range(offset.shape[1]):
        tap = (channel // 2) % taps
        i, j = divmod(tap, kernel_w)
        base_y = oy * config.stride[0] - config.padding[0] + i * config.dilation[0]
        base_x = ox * config.stride[1] - config.padding[1] + j * config.dilation[1]
        if channel % 2 == 0:
            target = rng.choice(special_values_y, size=(config.batch, out_h, out_w))
            offset[:, channel] = target - base_y
        else:
            target = rng.choice(special_values_x, size=(config.batch, out_h, out_w))
            offset[:, channel] = target - base_x
    return offset


def test_sample_points_on_and_beyond_every_edge():
    """Points exactly on -1, 0, H-1, H (and W), just inside and outside them, and far off
    every side of the map, in every combination of y and x."""
    config = ConvConfig(
        batch=3, in_channels=2, out_channels=3, height=4, width=5, offset_groups=2, kernel=(2, 2)
    )
    rng = np.random.default_rng(7)
    arrays = config.arrays(rng)
    h, w = config.height, config.width
    ys = [
        -7.0,
        -2.0,
        -1.5,
        -1.0,
        -0.999,
        -0.25,
        0.0,
        1.5,
        h - 1.0,
        h - 0.5,
        h - 1e-3,
        h,
        h + 0.5,
        h + 1.0,
        h + 9.0,
    ]
    xs = [
        -9.0,
        -2.0,
        -1.25,
        -1.0,
        -0.75,
        0.0,
        2.25,
        w - 1.0,
        w - 0.25,
        w,
        w + 0.75,
        w + 1.0,
        w + 6.0,
    ]
    arrays["offset"] = boundary_offsets(config, ys, xs, rng)
    assert_close_to_reference(forward(arrays, config), arrays, config, "float64")


def test_sample_on_minus_one_and_on_size_reads_zero():
    """A point on y = -1 or y = H (or x = -1, x = W) samples 0 even where the map is not."""
    config = ConvConfig(
        batch=1,
        in_channels=1,
        out_channels=1,
        height=3,
        width=3,
        kernel=(1, 1),
        with_bias=False,
        with_mask=False,
    )
    arrays = config.arrays(np.random.default_rng(3))
    arrays["input"] = np.full((1, 1, 3, 3), 5.0)
    arrays["weight"] = np.ones((1, 1, 1, 1))
    for dy, dx in [(-1.0, 0.0), (3.0, 0.0), (0.0, -1.0), (0.0, 3.0)]:
        arrays["offset"] = np.zeros((1, 2, 3, 3))
        arrays["offset"][0, 0, 0, 0] = dy  # output pixel (0, 0) samples (dy, dx)
        arrays["offset"][0, 1, 0, 0] = dx
        output = forward(arrays, config)
        assert output[0, 0, 0, 0] == 0.0
        assert np.all(output.ravel()[1:] == 5.0)


def test_nonfinite_and_huge_offsets():
    """inf and huge offsets sample 0 and get a zero offset gradient, without warnings; NaN
    offsets sample NaN and get a NaN offset and mask gradient, and add nothing to the input
    gradient."""
    config = ConvConfig(
        batch=2, in_channels=4, out_channels=2, offset_groups=2, height=4, width=4, kernel=(2, 2)
    )
    rng = np.random.default_rng(11)
    arrays = config.arrays(rng)
    offset = arrays["offset"]
    offset[0, 0, 0, 0] = np.inf  # group 0, tap 0, dy
    offset[0, 3, 1, 1] = -np.inf  # group 0, tap 1, dx
    offset[1, 8, 2, 0] = 1e30  # group 1, tap 0, dy
    offset[1, 11, 0, 2] = -1e300  # group 1, tap 1, dx
    offset[1, 13, 1, 2] = np.nan  # group 1, tap 2, dx
    offset[0, 6, 2, 2] = np.nan  # group 0, tap 3, dy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output = forward(arrays, config)
        grads = backward(rng.normal(size=output.shape), arrays, config)
    expected = reference(arrays, config)
    np.testing.assert_allclose(output, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert np.isnan(output[1, :, 1, 2]).all() and np.isnan(output[0, :, 2, 2]).all()

    grad_offset = grads["offset"]
    for n, channel, y, x in [(0, 0, 0, 0), (0, 3, 1, 1), (1, 8, 2, 0), (1, 11, 0, 2)]:
        assert grad_offset[n, channel & ~1, y, x] == 0.0
        assert grad_offset[n, channel | 1, y, x] == 0.0
    nan_entries = np.zeros(grad_offset.shape, dtype=bool)
    nan_entries[1, 12:14, 1, 2] = True  # both coordinates of the NaN point
    nan_entries[0, 6:8, 2, 2] = True
    np.testing.assert_array_equal(np.isnan(grad_offset), nan_entries)
    mask_nan = np.zeros(grads["mask"].shape, dtype=bool)
    mask_nan[1, 6, 1, 2] = True  # group 1, tap 2
    mask_nan[0, 3, 2, 2] = True  # group 0, tap 3
    np.testing.assert_array_equal(np.isnan(grads["mask"]), mask_nan)
    assert np.isfinite(grads["input"]).all()


def test_batch_zero():
    config = ConvConfig(batch=0, in_channels=4, out_channels=2, groups=2, offset_groups=2)
    arrays = config.arrays(np.random.default_rng(0))
    output = forward(arrays, config)
    assert output.shape == (0, 2) + config.out_size and output.dtype == np.float64
    grads = backward(np.zeros(output.shape), arrays, config)
    assert grads["input"].shape == arrays["input"].shape
    assert grads["offset"].shape == arrays["offset"].shape
    assert grads["mask"].shape == arrays["mask"].shape
    np.testing.assert_array_equal(grads["weight"], np.zeros(arrays["weight"].shape))
    np.testing.assert_array_equal(grads["bias"], np.zeros(2))


def strided_views(arrays: dict) -> dict:
    """The same values as non-contiguous, read-only views (transposed, sliced, reversed)."""
    x = arrays["input"]
    views = {
        # channels-last storage seen as NCHW
        "input": np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
        # every other channel of a wider array
        "offset": np.repeat(arrays["offset"], 2, axis=1)[:, ::2],
        # Fortran order
        "weight": np.asfortranarray(arrays["weight"]),
        # reversed strides
        "bias": arrays["bias"][::-1].copy()[::-1],
        # stepped along the last axis
        "mask": np.repeat(arrays["mask"], 3, axis=3)[..., ::3],
    }
    for name, view in views.items():
        np.testing.assert_array_equal(view, arrays[name])
        view.setflags(write=False)
    assert not views["input"].flags.c_contiguous and not views["offset"].flags.c_contiguous
    return views


def test_noncontiguous_readonly_inputs_are_read_only_used():
    config = ConvConfig(
        batch=3,
        in_channels=4,
        out_channels=6,
        groups=2,
        offset_groups=2,
        stride=(2, 1),
        padding=(1, 2),
    )
    rng = np.random.default_rng(5)
    arrays = config.arrays(rng)
    views = strided_views(arrays)
    grad_output = rng.normal(size=(config.batch, 6) + config.out_size)[:, ::-1]
    grad_output.setflags(write=False)
    saved = {name: view.copy() for name, view in views.items()}
    saved_grad_output = grad_output.copy()

    output = forward(views, config)
    grads = backward(grad_output, views, config)

    for name, view in views.items():
        np.testing.assert_array_equal(view, saved[name])
    np.testing.assert_array_equal(grad_output, saved_grad_output)
    assert_close_to_reference(output, arrays, config, "float64")
    contiguous_grads = backward(np.ascontiguousarray(grad_output), arrays, config)
    for name in GRADIENT_ORDER:
        np.testing.assert_allclose(grads[name], contiguous_grads[name], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype_name", LOW_PRECISION)
def test_inputs_of_every_dtype_are_unchanged(dtype_name):
    dtype = dtype_of(dtype_name)
    config = ConvConfig(batch=2, offset_groups=2, padding=(1, 1))
    rng = np.random.default_rng(2)
    arrays = cast_arrays(config.arrays(rng), dtype)
    grad_output = rng.normal(size=(2, 4) + config.out_size).astype(dtype)
    for array in list(arrays.values()) + [grad_output]:
        array.setflags(write=False)
    saved = {name: value.copy() for name, value in arrays.items()}
    forward(arrays, config)
    backward(grad_output, arrays, config)
    for name, value in arrays.items():
        assert value.tobytes() == saved[name].tobytes()


def test_chunking_gives_identical_results():
    config = ConvConfig(
        batch=5, in_channels=4, out_channels=4, groups=2, offset_groups=2, padding=(1, 0)
    )
    rng = np.random.default_rng(9)
    arrays = config.arrays(rng)
    geom = geometry(arrays, config)
    acc = np.dtype(np.float64)
    assert _images_per_chunk(geom, acc, 1, backward=True) == 1
    assert _images_per_chunk(geom, acc, 1, backward=False) == 1
    assert _images_per_chunk(geom, acc, LARGE_WORKSPACE, backward=True) == config.batch
    two_images = 2 * _working_bytes_per_image(geom, acc, backward=True) + 1
    assert _images_per_chunk(geom, acc, two_images, backward=True) == 2  # chunks 2, 2, 1
    grad_output = rng.normal(size=(config.batch, 4) + config.out_size)

    one_by_one = forward(arrays, config, workspace_bytes=1)
    all_at_once = forward(arrays, config, workspace_bytes=LARGE_WORKSPACE)
    np.testing.assert_array_equal(one_by_one, all_at_once)

    results = [
        backward(grad_output, arrays, config, workspace_bytes=size)
        for size in (1, two_images, LARGE_WORKSPACE)
    ]
    for grads in results[:2]:
        for name in ("input", "offset", "mask"):  # per image: no reduction across chunks
            np.testing.assert_array_equal(grads[name], results[2][name])
        for name in ("weight", "bias"):  # summed over the batch in another order
            np.testing.assert_allclose(grads[name], results[2][name], rtol=1e-13, atol=1e-13)


LOW_PRECISION_CONFIGS = (
    "k3x3_mask_bias",
    "k2x3_stride2x1_pad1x0_dil1x2",
    "groups4_offset_groups2",
    "batch3_no_mask_no_bias",
)


@pytest.mark.parametrize("name", LOW_PRECISION_CONFIGS)
@pytest.mark.parametrize("dtype_name", LOW_PRECISION)
def test_low_precision_forward_matches_reference(name, dtype_name):
    config = CONFIGS[name]
    dtype = dtype_of(dtype_name)
    rng = seeded(name, dtype_name)
    arrays = cast_arrays(config.arrays(rng), dtype)
    output = forward(arrays, config, workspace_bytes=1)
    assert output.dtype == dtype
    assert_close_to_reference(output, cast_arrays(arrays, np.float64), config, dtype_name)


# Backward in low precision against the float64 backward (itself checked against finite
# differences in test_conv_gradcheck.py) on the same quantised inputs, per gradient:
#   |grad - grad64| <= 2 * rounding * |grad64| + of_max * max|grad64| (tests/support.py),
# plus, for grad_weight in the half types, rounding * sum |grad_output| * |column| (its
# columns are rounded once, docs/semantics.md §6.1).


@pytest.mark.parametrize("name", LOW_PRECISION_CONFIGS)
@pytest.mark.parametrize("dtype_name", LOW_PRECISION)
def test_low_precision_backward_matches_float64(name, dtype_name):
    config = CONFIGS[name]
    dtype = dtype_of(dtype_name)
    rng = seeded(name, dtype_name, "backward")
    arrays = cast_arrays(config.arrays(rng, away_from_kinks=True), dtype)
    grad_output = rng.normal(size=(config.batch, config.out_channels) + config.out_size)
    grad_output = grad_output.astype(dtype)
    grads = backward(grad_output, arrays, config, workspace_bytes=1)
    expected = backward(grad_output.astype(np.float64), cast_arrays(arrays, np.float64), config)
    for name in GRADIENT_ORDER:
        if expected[name] is None:
            assert grads[name] is None
            continue
        assert grads[name].dtype == dtype
        if name == "weight" and dtype_name in HALF_TYPES:
            columns = grad_weight_magnitude(grad_output, arrays, config)
            assert_close_with_rounded_columns(
                grads[name], expected[name], columns, dtype_name, name, zero_scale=0.0
            )
        else:
            assert_close(grads[name], expected[name], dtype_name, name, zero_scale=0.0)
