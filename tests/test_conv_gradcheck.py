"""Finite-difference checks of the NumPy backend's conv_backward, in float64.

The loss is a random projection of the output, L = sum(R * y), so dL/dy = R is what is
passed to conv_backward. Offsets are an integer plus a fraction in [0.2, 0.8]: no sample
point lies within 0.2 of an integer coordinate, where the bilinear weight has a kink, and a
step of 1e-6 never crosses one. Between kinks the output is linear in each single input
element, so central differences are exact up to rounding (tolerance 1e-6 relative).

* every element of every input: central differences of the vectorised forward;
* random directions: central differences of the naive reference (tests/reference.py),
  so the check does not rest on the backend's forward;
* the kink convention: with zero offsets every sample point is on integers; the offset
  gradient is the one-sided difference in the +eps direction (from inside the map at
  y = -1 / x = -1) and is nonzero on the first row / column of taps.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cupydcn.deform_conv.numpy_backend import conv_backward, conv_forward
from cupydcn.deform_conv.spec import conv_geometry
from reference import ConvConfig, deform_conv2d_reference
from support import GRADS, seeded

GRADIENT_ORDER = GRADS
ALL_GRADIENTS = frozenset(GRADIENT_ORDER)
WORKSPACE = 1 << 24
STEP = 1e-6
RTOL = 1e-6


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


def projected_forward(arrays: dict, config: ConvConfig, projection: np.ndarray) -> float:
    output = conv_forward(
        arrays["input"],
        arrays["offset"],
        arrays["weight"],
        arrays["bias"],
        arrays["mask"],
        geometry(arrays, config),
        workspace_bytes=WORKSPACE,
    )
    return float(np.sum(projection * output))


def projected_reference(arrays: dict, config: ConvConfig, projection: np.ndarray) -> float:
    output = deform_conv2d_reference(
        arrays["input"],
        arrays["offset"],
        arrays["weight"],
        arrays["bias"],
        arrays["mask"],
        **config.options,
    )
    return float(np.sum(projection * output))


def analytic_gradients(
    arrays: dict, config: ConvConfig, projection: np.ndarray, wrt=ALL_GRADIENTS
) -> dict:
    grads = conv_backward(
        projection,
        arrays["input"],
        arrays["offset"],
        arrays["weight"],
        arrays["mask"],
        geometry(arrays, config),
        wrt=frozenset(wrt),
        workspace_bytes=WORKSPACE,
    )
    return dict(zip(GRADIENT_ORDER, grads))


def elementwise_differences(loss, arrays: dict, name: str, *, one_sided: bool = False):
    """d loss / d arrays[name] element by element: central differences, or forward
    differences (step +STEP) when one_sided."""
    array = arrays[name]
    gradient = np.empty_like(array)
    base = None if not one_sided else loss()
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + STEP
        plus = loss()
        if one_sided:
            gradient[index] = (plus - base) / STEP
        else:
            array[index] = original - STEP
            gradient[index] = (plus - loss()) / (2 * STEP)
        array[index] = original
    return gradient


def assert_gradient_close(actual, expected, name: str) -> None:
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * scale, err_msg=name)


CONFIGS = {
    "k3x3_mask_bias": ConvConfig(batch=2, in_channels=2, out_channels=2, height=4, width=5),
    "k2x3_s2x1_p1x0_d1x2_groups2_offset_groups2": ConvConfig(
        batch=1,
        in_channels=4,
        out_channels=4,
        groups=2,
        offset_groups=2,
        kernel=(2, 3),
        stride=(2, 1),
        padding=(1, 0),
        dilation=(1, 2),
        height=5,
        width=6,
    ),
    "k3x1_s1x2_p2x1_d2x1_groups2_offset_groups4_no_mask": ConvConfig(
        batch=3,
        in_channels=4,
        out_channels=2,
        groups=2,
        offset_groups=4,
        kernel=(3, 1),
        stride=(1, 2),
        padding=(2, 1),
        dilation=(2, 1),
        height=4,
        width=5,
        with_mask=False,
    ),
    "groups1_offset_groups2_no_bias": ConvConfig(
        batch=1,
        in_channels=4,
        out_channels=3,
        offset_groups=2,
        kernel=(2, 2),
        padding=(1, 1),
        height=3,
        width=4,
        with_bias=False,
    ),
}


def problem(name: str):
    config = CONFIGS[name]
    rng = seeded(name)
    arrays = config.arrays(rng, away_from_kinks=True)
    projection = rng.normal(size=(config.batch, config.out_channels) + config.out_size)
    return config, arrays, projection, rng


PRESENT_ARGUMENTS = [
    (name, argument)
    for name, config in CONFIGS.items()
    for argument in GRADIENT_ORDER
    if (argument != "mask" or config.with_mask) and (argument != "bias" or config.with_bias)
]


@pytest.mark.parametrize(
    ("name", "argument"),
    PRESENT_ARGUMENTS,
    ids=[f"{name}-{argument}" for name, argument in PRESENT_ARGUMENTS],
)
def test_gradient_matches_central_differences(name, argument):
    config, arrays, projection, _ = problem(name)
    expected = elementwise_differences(
        lambda: projected_forward(arrays, config, projection), arrays, argument
    )
    actual = analytic_gradients(arrays, config, projection)[argument]
    assert actual.shape == arrays[argument].shape
    assert_gradient_close(actual, expected, argument)
    assert np.abs(expected).max() > 0  # the problem exercises this gradient


@pytest.mark.parametrize("name", CONFIGS)
def test_gradient_matches_reference_directional_differences(name):
    """<gradient, v> = (L(x + h v) - L(x - h v)) / 2h with L from the naive reference, for
    random directions v in each input separately."""
    config, arrays, projection, rng = problem(name)
    grads = analytic_gradients(arrays, config, projection)
    for argument in GRADIENT_ORDER:
        if arrays[argument] is None:
            continue
        original = arrays[argument]
        for _ in range(2):
            direction = rng.normal(size=original.shape)
            arrays[argument] = original + STEP * direction
            plus = projected_reference(arrays, config, projection)
            arrays[argument] = original - STEP * direction
            minus = projected_reference(arrays, config, projection)
            arrays[argument] = original
            numerical = (plus - minus) / (2 * STEP)
            analytic = float(np.sum(grads[argument] * direction))
            scale = max(1.0, float(np.sum(np.abs(grads[argument] * direction))))
            assert abs(analytic - numerical) <= RTOL * scale, (argument, analytic, numerical)


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no_mask"])
def test_offset_gradient_at_integer_points_is_one_sided_from_inside(with_mask):
    """Zero offsets with padding 1: the first row and column of taps sample exactly at -1,
    the last at H / W, all at integers. The offset gradient is torchvision's: the forward
    difference (+eps, into the map at -1), nonzero at -1 where the other coordinate is in
    the map (mmcv gives 0 there), 0 at H / W."""
    config = ConvConfig(
        batch=1,
        in_channels=2,
        out_channels=2,
        height=3,
        width=4,
        padding=(1, 1),
        with_mask=with_mask,
    )
    rng = seeded("kinks", with_mask)
    arrays = config.arrays(rng)
    arrays["offset"] = np.zeros_like(arrays["offset"])
    # positive everything: every channel sum of grad_columns * (v10 - v00) has one sign
    arrays["input"] = rng.uniform(0.5, 1.5, size=arrays["input"].shape)
    arrays["weight"] = rng.uniform(0.5, 1.5, size=arrays["weight"].shape)
    if with_mask:
        arrays["mask"] = rng.uniform(0.5, 1.5, size=arrays["mask"].shape)
    projection = rng.uniform(0.5, 1.5, size=(1, 2) + config.out_size)

    one_sided = elementwise_differences(
        lambda: projected_reference(arrays, config, projection), arrays, "offset", one_sided=True
    )
    grad_offset = analytic_gradients(arrays, config, projection)["offset"]
    assert_gradient_close(grad_offset, one_sided, "offset")

    out_h, out_w = config.out_size
    d_dy = grad_offset[0, 0::2].reshape(3, 3, out_h, out_w)  # [i, j, oy, ox]
    d_dx = grad_offset[0, 1::2].reshape(3, 3, out_h, out_w)
    # tap row 0 at output row 0 samples y = -1; x = ox - 1 + j is inside for these:
    x_inside = np.array([[0 <= ox - 1 + j < config.width for ox in range(out_w)] for j in range(3)])
    assert np.all(d_dy[0, :, 0, :][x_inside] > 0.1)
    y_inside = np.array(
        [[0 <= oy - 1 + i < config.height for oy in range(out_h)] for i in range(3)]
    )
    assert np.all(d_dx[:, 0, :, 0][y_inside] > 0.1)
    # tap row 2 at the last output row samples y = H: zero from both sides of the kernel
    np.testing.assert_array_equal(d_dy[2, :, out_h - 1, :], 0.0)
    np.testing.assert_array_equal(d_dx[:, 2, :, out_w - 1], 0.0)


WRT_SUBSETS = [
    frozenset(s) for r in (0, 1, 2, 4) for s in itertools.combinations(GRADIENT_ORDER, r)
]


@pytest.mark.parametrize("wrt", WRT_SUBSETS, ids=lambda s: "+".join(sorted(s)) or "none")
def test_wrt_returns_only_the_requested_gradients(wrt):
    name = "k2x3_s2x1_p1x0_d1x2_groups2_offset_groups2"
    config, arrays, projection, _ = problem(name)
    everything = analytic_gradients(arrays, config, projection)
    subset = analytic_gradients(arrays, config, projection, wrt=wrt)
    for argument in GRADIENT_ORDER:
        if argument in wrt:
            np.testing.assert_array_equal(subset[argument], everything[argument], err_msg=argument)
        else:
            assert subset[argument] is None, argument


def test_mask_gradient_is_none_without_mask():
    name = "k3x1_s1x2_p2x1_d2x1_groups2_offset_groups4_no_mask"
    config, arrays, projection, _ = problem(name)
    grads = analytic_gradients(arrays, config, projection, wrt={"mask", "offset"})
    assert grads["mask"] is None and grads["offset"] is not None


def test_unknown_gradient_name_is_an_error():
    config, arrays, projection, _ = problem("k3x3_mask_bias")
    with pytest.raises(ValueError, match="wrt"):
        analytic_gradients(arrays, config, projection, wrt={"input", "offsets"})
