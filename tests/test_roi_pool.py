"""deform_roi_pool: the NumPy backend against the float64 loop reference
(tests/reference_roi_pool.py), finite differences, RoIAlign, validation and the array
boundary.

Tolerances (tests/support.py), elementwise, with scale = the largest |reference| of the
tensor (1 if 0): |out - ref| <= 2 * rounding * |ref| + of_max * scale, i.e. 1e-12 * scale
(float64), 1e-5 * scale (float32, coordinates in float32), 2u * |ref| + 1e-5 * scale (the
half types, u = 2**-11 and 2**-8).

The half types compute in float32 and round once, so their error is one rounding plus
float32 noise. Low-precision inputs are quantised first (rois to float32, the dtype the
backends read them in) and the reference runs on the quantised values.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from cupydcn.roi_pool import RoiPoolGrads, deform_roi_pool, deform_roi_pool_backward
from cupydcn.roi_pool import numpy_backend as _numpy_roi_pool
from reference_roi_pool import (
    ROI_KINDS,
    RoiCase,
    deform_roi_pool_backward_reference,
    deform_roi_pool_reference,
    sample_points,
)
from support import DTYPE_NAMES, assert_close, dtype_of, seeded

# ---------------------------------------------------------------------------- problems

CASES = {
    "mixed": RoiCase(),
    "every_kind_adaptive": RoiCase(roi_kinds=ROI_KINDS, rois_per_kind=1),
    "every_kind_ratio2": RoiCase(roi_kinds=ROI_KINDS, rois_per_kind=1, sampling_ratio=2),
    "square_4x4_ratio1": RoiCase(output_size=(4, 4), sampling_ratio=1, roi_kinds=("inside",)),
    "ratio3_1x5": RoiCase(output_size=(1, 5), sampling_ratio=3),
    "scale_quarter": RoiCase(spatial_scale=0.25, roi_kinds=("inside", "partly_outside", "large")),
    "far_offsets": RoiCase(offset_scale=6.0, gamma=0.3, roi_kinds=("inside", "large")),
    "no_offset": RoiCase(with_offset=False),
    "no_mask": RoiCase(with_mask=False, roi_kinds=("inside", "reversed")),
    "plain_roi_align": RoiCase(
        with_offset=False, with_mask=False, roi_kinds=ROI_KINDS, rois_per_kind=1
    ),
    "one_image_many_rois": RoiCase(batch=1, channels=2, rois_per_kind=4),
    "three_images_1x1_map": RoiCase(batch=3, height=1, width=1, channels=2),
    "one_row_map": RoiCase(height=1, width=6, output_size=(2, 3)),
    "output_1x1": RoiCase(output_size=(1, 1), roi_kinds=("inside", "large", "tiny")),
}


def _reference(arrays, case):
    return deform_roi_pool_reference(
        arrays["input"], arrays["rois"], arrays["offset"], arrays["mask"], **case.options
    )


def _reference_grads(grad_output, arrays, case):
    return deform_roi_pool_backward_reference(
        grad_output,
        arrays["input"],
        arrays["rois"],
        arrays["offset"],
        arrays["mask"],
        **case.options,
    )


def _forward(arrays, case, **overrides):
    return deform_roi_pool(
        arrays["input"],
        arrays["rois"],
        arrays["offset"],
        arrays["mask"],
        **{**case.options, **overrides},
    )


def _backward(grad_output, arrays, case, **kwargs):
    return deform_roi_pool_backward(
        grad_output,
        arrays["input"],
        arrays["rois"],
        arrays["offset"],
        arrays["mask"],
        **case.options,
        **kwargs,
    )


def _cast(arrays, dtype_name):
    """Inputs quantised to the dtype (rois to float32 below float64) and their float64
    values for the reference."""
    dtype = dtype_of(dtype_name)
    rois_dtype = np.float64 if dtype_name == "float64" else np.float32
    cast = {
        name: None if v is None else v.astype(rois_dtype if name == "rois" else dtype)
        for name, v in arrays.items()
    }
    exact = {name: None if v is None else v.astype(np.float64) for name, v in cast.items()}
    return cast, exact


# ---------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("name", CASES)
def test_forward_and_backward_match_reference(name):
    case = CASES[name]
    rng = seeded(name)
    arrays = case.arrays(rng)
    output = _forward(arrays, case)
    assert output.dtype == np.float64 and output.flags.c_contiguous
    assert_close(output, _reference(arrays, case), "float64", "output")

    grad_output = rng.normal(size=output.shape)
    grads = _backward(grad_output, arrays, case)
    assert isinstance(grads, RoiPoolGrads)
    expected = _reference_grads(grad_output, arrays, case)
    for label, actual, wanted in zip(("input", "offset", "mask"), grads, expected):
        if wanted is None:
            assert actual is None, label
        else:
            assert actual.dtype == np.float64 and actual.flags.c_contiguous, label
            assert_close(actual, wanted, "float64", f"grad_{label}")


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("name", ["every_kind_adaptive", "far_offsets", "square_4x4_ratio1"])
def test_dtypes_match_reference(name, dtype_name):
    case = CASES[name]
    rng = seeded(name, dtype_name)
    cast, exact = _cast(case.arrays(rng), dtype_name)
    output = _forward(cast, case)
    assert output.dtype == dtype_of(dtype_name)
    assert_close(output, _reference(exact, case), dtype_name, "output")
    grad_output = rng.normal(size=output.shape).astype(output.dtype)
    grads = _backward(grad_output, cast, case)
    expected = _reference_grads(grad_output.astype(np.float64), exact, case)
    for label, actual, wanted in zip(("input", "offset", "mask"), grads, expected):
        assert actual.dtype == dtype_of(dtype_name), label
        assert_close(actual, wanted, dtype_name, f"grad_{label}")


# ---------------------------------------------------------------------------- finite differences


def _away_from_kinks(arrays, case, margin=1e-3) -> np.ndarray:
    """[K, ph, pw] bins whose sample points all lie farther than ``margin`` from an integer
    coordinate (every kink: the cell edges, 0, -1, H - 1, H) in y and in x."""
    ph, pw = case.output_size
    safe = np.zeros((arrays["rois"].shape[0], ph, pw), dtype=bool)
    points = sample_points(arrays["rois"], arrays["offset"], **case.options)
    for (k, i, j), coords in points.items():
        safe[k, i, j] = all(abs(c - round(c)) > margin for point in coords for c in point)
    return safe


@pytest.mark.parametrize("name", ["mixed", "every_kind_adaptive", "far_offsets", "ratio3_1x5"])
def test_offset_gradient_matches_finite_differences(name):
    case = CASES[name]
    rng = seeded("fd", name)
    arrays = case.arrays(rng)
    grad_output = rng.normal(size=(arrays["rois"].shape[0], case.channels, *case.output_size))
    grads = _backward(grad_output, arrays, case)
    safe = _away_from_kinks(arrays, case)
    assert safe.mean() > 0.5
    eps = 1e-6
    for channel in (0, 1):  # each bin's output depends on its own offset only
        step = np.zeros_like(arrays["offset"])
        step[:, channel] = eps
        plus = _forward({**arrays, "offset": arrays["offset"] + step}, case)
        minus = _forward({**arrays, "offset": arrays["offset"] - step}, case)
        numeric = ((plus - minus) * grad_output).sum(axis=1) / (2 * eps)
        analytic = grads.grad_offset[:, channel]
        np.testing.assert_allclose(
            analytic[safe], numeric[safe], rtol=1e-6, atol=1e-7 * max(np.abs(numeric).max(), 1)
        )


@pytest.mark.parametrize("name", ["mixed", "every_kind_ratio2", "one_row_map"])
def test_input_and_mask_gradients_match_finite_differences(name):
    """The op is linear in input and in mask: the gradients are the adjoints, checked with
    random directions (input) and per bin (mask) by central differences."""
    case = CASES[name]
    rng = seeded("fd-linear", name)
    arrays = case.arrays(rng)
    output = _forward(arrays, case)
    grad_output = rng.normal(size=output.shape)
    grads = _backward(grad_output, arrays, case)
    for _ in range(3):
        direction = rng.normal(size=arrays["input"].shape)
        numeric = (
            (
                _forward({**arrays, "input": arrays["input"] + direction}, case)
                - _forward({**arrays, "input": arrays["input"] - direction}, case)
            )
            * grad_output
        ).sum() / 2
        np.testing.assert_allclose((grads.grad_input * direction).sum(), numeric, rtol=1e-10)
    eps = 1e-3
    numeric = (
        (
            _forward({**arrays, "mask": arrays["mask"] + eps}, case)
            - _forward({**arrays, "mask": arrays["mask"] - eps}, case)
        )
        * grad_output
    ).sum(axis=1, keepdims=True) / (2 * eps)
    np.testing.assert_allclose(grads.grad_mask, numeric, rtol=1e-9, atol=1e-12)


def _single_sample_problem(ys, xs, plane):
    """One RoI per (y, x) whose single sample (1 x 1 output, sampling_ratio 1, zero
    offset) lies exactly at (y, x): a 2 x 2 box centred there."""
    rois = np.array([[0, x - 0.5, y - 0.5, x + 1.5, y + 1.5] for y, x in zip(ys, xs)])
    k = len(rois)
    return {
        "input": plane[None, None].astype(np.float64),
        "rois": rois,
        "offset": np.zeros((k, 2, 1, 1)),
        "mask": None,
    }


def test_kink_conventions():
    """Value and offset gradient on and around every kink, on a map whose rows grow
    quadratically (so left and right derivatives differ) and columns linearly.

    d out / d offset_y = gamma * roi_h * dv/dy with roi_h = 2 (one sample, count 1)."""
    height, width = 4, 5
    rows = np.arange(height, dtype=np.float64) ** 2
    plane = 10 * rows[:, None] + np.arange(width)[None, :]  # v(y, x) = 10 y^2 + x
    x = 2.25
    cases = [  # y, value, dv/dy, dv/dx
        (-1.5, 0.0, 0.0, 0.0),  # outside
        (-1.0, 0.0 + x, 0.0, 1.0),  # on -1: inside, clamped to row 0
        (-0.5, 0.0 + x, 0.0, 1.0),  # clamped zone
        (0.0, 0.0 + x, 10.0, 1.0),  # kink at 0: right-sided slope of cell [0, 1]
        (0.5, 5.0 + x, 10.0, 1.0),
        (1.0, 10.0 + x, 30.0, 1.0),  # interior kink: right cell [1, 2] (left is 10)
        (2.0, 40.0 + x, 50.0, 1.0),
        (3.0, 90.0 + x, 0.0, 1.0),  # on H - 1: clamped, x still interpolated
        (3.5, 90.0 + x, 0.0, 1.0),
        (4.0, 90.0 + x, 0.0, 1.0),  # on H: still inside
        (4.25, 0.0, 0.0, 0.0),  # outside
    ]
    ys = [c[0] for c in cases]
    case = RoiCase(
        batch=1,
        channels=1,
        height=height,
        width=width,
        output_size=(1, 1),
        sampling_ratio=1,
        gamma=0.5,
    )
    arrays = _single_sample_problem(ys, [x] * len(ys), plane)
    output = _forward(arrays, case)
    np.testing.assert_array_equal(output[:, 0, 0, 0], [c[1] for c in cases])
    grads = _backward(np.ones_like(output), arrays, case)
    gamma_roi = case.gamma * 2.0
    np.testing.assert_array_equal(grads.grad_offset[:, 1, 0, 0], [gamma_roi * c[2] for c in cases])
    np.testing.assert_array_equal(grads.grad_offset[:, 0, 0, 0], [gamma_roi * c[3] for c in cases])
    # the reference follows the same conventions
    expected = _reference_grads(np.ones_like(output), arrays, case)
    np.testing.assert_array_equal(grads.grad_offset, expected[1])
    np.testing.assert_array_equal(grads.grad_input, expected[0])

    # x on its kinks, y interior: -1 and W - 1 .. W are clamped, 0 is right-sided
    xs = [-1.0, -0.25, 0.0, 3.0, 4.0, 5.0]
    arrays = _single_sample_problem([1.5] * len(xs), xs, plane)
    grads = _backward(np.ones((len(xs), 1, 1, 1)), arrays, case)
    np.testing.assert_array_equal(
        grads.grad_offset[:, 0, 0, 0], gamma_roi * np.array([0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    )
    np.testing.assert_array_equal(grads.grad_offset[:, 1, 0, 0], gamma_roi * 30.0)


# ---------------------------------------------------------------------------- RoIAlign


def roi_align_torchvision_style(input, boxes, output_size, spatial_scale, sampling_ratio):
    """RoIAlign with aligned=True, written from torchvision's documented algorithm
    (roi_align_kernel.cpp: pre-computed bilinear corners per sample), independent of the
    reference. boxes [K, 5]; returns [K, C, ph, pw] float64."""
    ph, pw = output_size
    num_rois = boxes.shape[0]
    _, channels, height, width = input.shape
    out = np.zeros((num_rois, channels, ph, pw))
    for k in range(num_rois):
        roi_batch = int(boxes[k, 0])
        offset = 0.5  # aligned=True
        roi_start_w = boxes[k, 1] * spatial_scale - offset
        roi_start_h = boxes[k, 2] * spatial_scale - offset
        roi_end_w = boxes[k, 3] * spatial_scale - offset
        roi_end_h = boxes[k, 4] * spatial_scale - offset
        roi_width, roi_height = roi_end_w - roi_start_w, roi_end_h - roi_start_h
        bin_size_h, bin_size_w = roi_height / ph, roi_width / pw
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_height / ph)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_width / pw)
        count = max(grid_h * grid_w, 1)
        # all sample coordinates of the RoI at once: yy [ph, grid_h], xx [pw, grid_w]
        yy = (
            roi_start_h
            + np.arange(ph)[:, None] * bin_size_h
            + (np.arange(max(grid_h, 0))[None, :] + 0.5) * bin_size_h / max(grid_h, 1)
        )
        xx = (
            roi_start_w
            + np.arange(pw)[:, None] * bin_size_w
            + (np.arange(max(grid_w, 0))[None, :] + 0.5) * bin_size_w / max(grid_w, 1)
        )
        feature = input[roi_batch]
        for (a, _b), y in np.ndenumerate(yy):
            for (c, _d), x in np.ndenumerate(xx):
                if y < -1.0 or y > height or x < -1.0 or x > width:
                    continue
                y, x = max(y, 0.0), max(x, 0.0)
                y_low, x_low = int(y), int(x)
                if y_low >= height - 1:
                    y_high = y_low = height - 1
                    y = float(y_low)
                else:
                    y_high = y_low + 1
                if x_low >= width - 1:
                    x_high = x_low = width - 1
                    x = float(x_low)
                else:
                    x_high = x_low + 1
                ly, lx = y - y_low, x - x_low
                hy, hx = 1.0 - ly, 1.0 - lx
                out[k, :, a, c] += (
                    hy * hx * feature[:, y_low, x_low]
                    + hy * lx * feature[:, y_low, x_high]
                    + ly * hx * feature[:, y_high, x_low]
                    + ly * lx * feature[:, y_high, x_high]
                )
        out[k] /= count
    return out


@pytest.mark.parametrize(
    "name", ["plain_roi_align", "scale_quarter", "every_kind_ratio2", "one_row_map"]
)
def test_without_offset_and_mask_equals_roi_align(name):
    case = replace(CASES[name], with_offset=False, with_mask=False)
    arrays = case.arrays(seeded("roi_align", name))
    output = _forward(arrays, case)
    expected = roi_align_torchvision_style(
        arrays["input"], arrays["rois"], case.output_size, case.spatial_scale, case.sampling_ratio
    )
    assert_close(output, expected, "float64", "roi_align")


@pytest.mark.parametrize("name", ["plain_roi_align", "scale_quarter", "every_kind_ratio2"])
def test_without_offset_and_mask_equals_torchvision_roi_align(name):
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    case = replace(CASES[name], with_offset=False, with_mask=False)
    arrays = case.arrays(seeded("torchvision", name))
    expected = ops.roi_align(
        torch.from_numpy(arrays["input"]),
        torch.from_numpy(arrays["rois"]),
        case.output_size,
        case.spatial_scale,
        case.sampling_ratio,
        aligned=True,
    ).numpy()
    assert_close(_forward(arrays, case), expected, "float64", "torchvision roi_align")


# ---------------------------------------------------------------------------- special cases


def test_rois_outside_reversed_or_pushed_off_the_map_give_zeros():
    case = RoiCase(roi_kinds=("outside",), rois_per_kind=4)
    arrays = case.arrays(seeded("outside"))
    assert np.all(_forward(arrays, case) == 0)
    # reversed boxes sample nothing with an adaptive grid (ceil of a negative size)
    reversed_case = RoiCase(roi_kinds=("inside",), with_offset=False)
    arrays = reversed_case.arrays(seeded("reversed"))
    arrays["rois"][:, [1, 3]] = arrays["rois"][:, [3, 1]]
    assert np.all(_forward(arrays, reversed_case) == 0)
    # offsets of +-30 RoI sizes push every bin of RoIs of size >= 1 off the map
    pushed_case = RoiCase(roi_kinds=("inside", "partly_outside", "large"))
    arrays = pushed_case.arrays(seeded("pushed"))
    arrays["offset"] = np.sign(arrays["offset"]) * 300.0
    output = _forward(arrays, pushed_case)
    assert np.all(output == 0)
    grads = _backward(np.ones_like(output), arrays, pushed_case)
    assert np.all(grads.grad_input == 0) and np.all(grads.grad_offset == 0)


def test_nan_offset_poisons_its_bin_only():
    case = CASES["mixed"]
    arrays = case.arrays(seeded("nan"))
    arrays["offset"][1, 1, 2, 0] = np.nan
    output = _forward(arrays, case)
    assert np.isnan(output[1, :, 2, 0]).all()
    output[1, :, 2, 0] = 0
    assert np.isfinite(output).all()
    grad_output = np.ones_like(output)
    grads = _backward(grad_output, arrays, case)
    expected = _reference_grads(grad_output, arrays, case)
    assert np.isfinite(grads.grad_input).all()
    assert np.isnan(grads.grad_offset[1, :, 2, 0]).all()
    assert np.isnan(grads.grad_mask[1, 0, 2, 0])
    for actual, wanted in zip(grads, expected):
        assert_close(actual, wanted, "float64")


def test_default_wrt_skips_absent_arguments():
    case = CASES["no_offset"]
    arrays = replace(case, with_mask=False).arrays(seeded("absent"))
    grads = _backward(np.ones_like(_forward(arrays, case)), arrays, case)
    assert grads.grad_input is not None
    assert grads.grad_offset is None and grads.grad_mask is None


def test_chunked_matches_unchunked(monkeypatch):
    """Chunks of one RoI (the workspace bound) give the same results."""
    case = CASES["every_kind_adaptive"]
    arrays = case.arrays(seeded("chunks"))
    output = _forward(arrays, case)
    grads = _backward(np.ones_like(output), arrays, case)
    monkeypatch.setattr(_numpy_roi_pool, "_WORKSPACE_BYTES", 1)
    np.testing.assert_array_equal(_forward(arrays, case), output)
    for whole, chunked in zip(grads, _backward(np.ones_like(output), arrays, case)):
        np.testing.assert_allclose(chunked, whole, rtol=1e-13, atol=1e-13)


def test_rois_of_another_float_dtype():
    case = CASES["mixed"]
    arrays = case.arrays(seeded("rois dtype"))
    arrays["rois"] = arrays["rois"].astype(np.float16).astype(np.float64)
    output = _forward(arrays, case)
    for dtype in (np.float32, np.float16, dtype_of("bfloat16")):
        rois = arrays["rois"].astype(dtype)
        if np.array_equal(rois.astype(np.float64), arrays["rois"]):
            np.testing.assert_array_equal(_forward({**arrays, "rois": rois}, case), output)


def test_int_output_size_and_numpy_scalars():
    case = replace(CASES["mixed"], output_size=(2, 2))
    arrays = case.arrays(seeded("scalars"))
    expected = _forward(arrays, case)
    output = deform_roi_pool(
        arrays["input"],
        arrays["rois"],
        arrays["offset"],
        arrays["mask"],
        output_size=np.int64(2),
        spatial_scale=np.float32(1.0),
        sampling_ratio=np.int32(0),
        gamma=0.1,
    )
    np.testing.assert_array_equal(output, expected)


# ---------------------------------------------------------------------------- array libraries


def test_torch_cpu_round_trip():
    torch = pytest.importorskip("torch")
    case = CASES["mixed"]
    arrays = case.arrays(seeded("torch"))
    expected = _forward(arrays, case)
    grad_output = np.ones_like(expected)
    expected_grads = _backward(grad_output, arrays, case)
    tensors = {name: None if v is None else torch.from_numpy(v) for name, v in arrays.items()}
    output = _forward(tensors, case)
    assert isinstance(output, torch.Tensor) and output.dtype == torch.float64
    np.testing.assert_array_equal(output.numpy(), expected)
    grads = _backward(torch.from_numpy(grad_output), tensors, case)
    for grad, wanted in zip(grads, expected_grads):
        assert isinstance(grad, torch.Tensor)
        np.testing.assert_array_equal(grad.numpy(), wanted)
    # bfloat16 tensors (NumPy's DLPack has no bfloat16) and tensors requiring grad
    half = {name: None if v is None else v.to(torch.bfloat16) for name, v in tensors.items()}
    half["rois"] = tensors["rois"].float()
    half["input"].requires_grad_(True)
    with torch.no_grad():  # tensors requiring grad are refused under grad mode
        output = _forward(half, case)
    assert isinstance(output, torch.Tensor) and output.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- validation


@pytest.fixture
def no_compute(monkeypatch):
    """A call that reaches the backend is a failure of validation."""

    def fail(*args, **kwargs):
        raise AssertionError("validation let bad input reach the backend")

    monkeypatch.setattr(_numpy_roi_pool, "roi_pool_forward", fail)
    monkeypatch.setattr(_numpy_roi_pool, "roi_pool_backward", fail)


def _valid(dtype=np.float32):
    arrays = {
        name: None if v is None else v.astype(dtype)
        for name, v in CASES["mixed"].arrays(seeded("valid")).items()
    }
    return arrays, dict(output_size=(3, 2))


def _raises(exc, fragments, *, backward=False, **changes):
    arrays, options = _valid()
    for name in list(changes):
        if name in arrays:
            arrays[name] = changes.pop(name)
    options.update(changes)
    with pytest.raises(exc) as info:
        if backward:
            grad_output = options.pop("grad_output", np.ones((6, 3, 3, 2), np.float32))
            deform_roi_pool_backward(
                grad_output,
                arrays["input"],
                arrays["rois"],
                arrays["offset"],
                arrays["mask"],
                **options,
            )
        else:
            deform_roi_pool(
                arrays["input"], arrays["rois"], arrays["offset"], arrays["mask"], **options
            )
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert message.startswith("deform_roi_pool")


K = 6  # RoIs of the valid problem


@pytest.mark.usefixtures("no_compute")
@pytest.mark.parametrize(
    "changes, exc, fragments",
    [
        (dict(input=np.zeros((2, 3, 7), np.float32)), ValueError, ["input", "4-D", "(2, 3, 7)"]),
        (
            dict(input=np.zeros((2, 3, 0, 9), np.float32)),
            ValueError,
            ["input", "1 x 1", "(2, 3, 0, 9)"],
        ),
        (dict(input=np.zeros((2, 3, 7, 9), np.int32)), TypeError, ["input", "int32", "float64"]),
        (dict(rois=np.zeros((K, 4), np.float32)), ValueError, ["rois", "[K, 5]", f"({K}, 4)"]),
        (dict(rois=np.zeros((K, 5), np.int64)), TypeError, ["rois", "int64", "floating"]),
        (
            dict(rois=np.array([[2, 0, 0, 1, 1]], np.float32), offset=None, mask=None),
            ValueError,
            ["rois[0, 0]", "2", "[0, 2)"],
        ),
        (
            dict(rois=np.array([[0.5, 0, 0, 1, 1]], np.float32), offset=None, mask=None),
            ValueError,
            ["rois[0, 0]", "0.5", "integer"],
        ),
        (
            dict(rois=np.array([[0, 0, np.nan, 1, 1]], np.float32), offset=None, mask=None),
            ValueError,
            ["rois[0]", "non-finite"],
        ),
        (
            dict(offset=np.zeros((K, 2, 2, 3), np.float32)),
            ValueError,
            ["offset", "(6, 2, 2, 3)", "expected (6, 2, 3, 2)"],
        ),
        (
            dict(offset=np.zeros((K + 1, 2, 3, 2), np.float32)),
            ValueError,
            ["offset", "(7, 2, 3, 2)", "expected (6, 2, 3, 2)"],
        ),
        (
            dict(mask=np.zeros((K, 2, 3, 2), np.float32)),
            ValueError,
            ["mask", "(6, 2, 3, 2)", "expected (6, 1, 3, 2)"],
        ),
        (
            dict(offset=np.zeros((K, 2, 3, 2), np.float64)),
            TypeError,
            ["offset", "float64", "float32"],
        ),
        (dict(mask=np.zeros((K, 1, 3, 2), np.float16)), TypeError, ["mask", "float16", "float32"]),
        (dict(output_size=0), ValueError, ["output_size", ">= 1", "0"]),
        (dict(output_size=(3, -2)), ValueError, ["output_size[1]", ">= 1", "-2"]),
        (dict(output_size=(3, 2, 1)), TypeError, ["output_size", "pair", "(3, 2, 1)"]),
        (dict(output_size=2.0), TypeError, ["output_size", "2.0"]),
        (dict(output_size=True), TypeError, ["output_size", "True"]),
        (dict(sampling_ratio=-1), ValueError, ["sampling_ratio", ">= 0", "-1"]),
        (dict(sampling_ratio=1.5), TypeError, ["sampling_ratio", "int", "1.5"]),
        (dict(spatial_scale=float("nan")), ValueError, ["spatial_scale", "finite", "nan"]),
        (dict(spatial_scale="1"), TypeError, ["spatial_scale", "real number", "'1'"]),
        (dict(gamma=float("inf")), ValueError, ["gamma", "finite", "inf"]),
        (dict(input=[[1.0]]), TypeError, ["input", "DLPack", "list"]),
    ],
)
def test_forward_validation(changes, exc, fragments):
    _raises(exc, fragments, **changes)


@pytest.mark.usefixtures("no_compute")
@pytest.mark.parametrize(
    "changes, exc, fragments",
    [
        (
            dict(grad_output=np.ones((K, 3, 2, 3), np.float32)),
            ValueError,
            ["grad_output", "(6, 3, 2, 3)", "(6, 3, 3, 2)"],
        ),
        (
            dict(grad_output=np.ones((K, 3, 3, 2), np.float64)),
            TypeError,
            ["grad_output", "float64", "float32"],
        ),
        (dict(wrt=("input", "rois")), ValueError, ["wrt", "rois", "input"]),
        (dict(wrt="offset", offset=None), ValueError, ["wrt", "offset", "None"]),
        (dict(wrt=("mask",), mask=None), ValueError, ["wrt", "mask", "None"]),
    ],
)
def test_backward_validation(changes, exc, fragments):
    _raises(exc, fragments, backward=True, **changes)
