"""Sampling-location analysis: sampling_locations, effective_dilation and
stacked_sampling_locations against loop references, their identities (zero offsets give
the regular grid, dilation d gives effective dilation d, a scaled grid scales it), every
array type, and validation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import cupydcn
from cupydcn.deform_conv.sampling import (
    effective_dilation,
    sampling_locations,
    stacked_sampling_locations,
)

# ---------------------------------------------------------------------------- references


def _out_size(size, k, s, p, d):
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


def _offsets(rng, n, groups, kh, kw, out_h, out_w, scale=1.5, dtype=np.float64):
    return (scale * rng.standard_normal((n, 2 * groups * kh * kw, out_h, out_w))).astype(dtype)


def loop_locations(offset, kh, kw, stride, padding, dilation):
    """[N, G, K, 2, H, W] straight from docs/semantics.md §5.2, one point at a time."""
    n, channels, out_h, out_w = offset.shape
    groups = channels // (2 * kh * kw)
    result = np.zeros((n, groups, kh * kw, 2, out_h, out_w))
    for b, g, i, j, oy, ox in itertools.product(
        range(n), range(groups), range(kh), range(kw), range(out_h), range(out_w)
    ):
        k = i * kw + j
        dy = offset[b, g * 2 * kh * kw + 2 * k, oy, ox]
        dx = offset[b, g * 2 * kh * kw + 2 * k + 1, oy, ox]
        result[b, g, k, 0, oy, ox] = oy * stride[0] - padding[0] + i * dilation[0] + dy
        result[b, g, k, 1, oy, ox] = ox * stride[1] - padding[1] + j * dilation[1] + dx
    return result


def loop_dilation(locations, kh, kw):
    n, groups, _, _, out_h, out_w = locations.shape
    result = np.zeros((n, groups, out_h, out_w))
    for b, g, oy, ox in itertools.product(range(n), range(groups), range(out_h), range(out_w)):
        distances = []
        for i, j in itertools.product(range(kh), range(kw)):
            here = locations[b, g, i * kw + j, :, oy, ox]
            if j + 1 < kw:
                distances.append(math.dist(here, locations[b, g, i * kw + j + 1, :, oy, ox]))
            if i + 1 < kh:
                distances.append(math.dist(here, locations[b, g, (i + 1) * kw + j, :, oy, ox]))
        result[b, g, oy, ox] = sum(distances) / len(distances)
    return result


def _read(field, y, x, interpolation):
    """field [C, H, W] at one fractional (y, x), clamped into the grid."""
    _, height, width = field.shape
    y = min(max(y, 0.0), height - 1.0)
    x = min(max(x, 0.0), width - 1.0)
    if interpolation == "nearest":
        iy = min(int(math.floor(y + 0.5)), height - 1)
        ix = min(int(math.floor(x + 0.5)), width - 1)
        return field[:, iy, ix]
    value = 0.0
    for qy in range(height):
        for qx in range(width):
            weight = max(0.0, 1 - abs(qy - y)) * max(0.0, 1 - abs(qx - x))
            if weight:
                value = value + weight * field[:, qy, qx]
    return value


def loop_stack(
    offsets,
    points,
    kernels,
    strides,
    paddings,
    dilations,
    masks=None,
    groups=None,
    interpolation="bilinear",
):
    """locations [N, P, T, 2] and weights [N, P, T] by recursion, one point at a time."""
    layers = len(offsets)
    groups = groups or [0] * layers
    masks = masks or [None] * layers

    def expand(b, layer, y, x, weight):
        if layer < 0:
            return [((y, x), weight)]
        (kh, kw), (sh, sw) = kernels[layer], strides[layer]
        (ph, pw), (dh, dw) = paddings[layer], dilations[layer]
        taps = kh * kw
        g = groups[layer]
        field = offsets[layer][b, g * 2 * taps : (g + 1) * 2 * taps]
        read = _read(field, y, x, interpolation)
        mread = None
        if masks[layer] is not None:
            mread = _read(masks[layer][b, g * taps : (g + 1) * taps], y, x, interpolation)
        out = []
        for i, j in itertools.product(range(kh), range(kw)):
            k = i * kw + j
            ny = y * sh - ph + i * dh + read[2 * k]
            nx = x * sw - pw + j * dw + read[2 * k + 1]
            w = weight if mread is None else weight * mread[k]
            out.extend(expand(b, layer - 1, ny, nx, w))
        return out

    n = offsets[0].shape[0]
    all_points = [
        [expand(b, layers - 1, float(py), float(px), 1.0) for py, px in points] for b in range(n)
    ]
    locations = np.array([[[p for p, _ in pts] for pts in row] for row in all_points])
    weights = np.array([[[w for _, w in pts] for pts in row] for row in all_points])
    return locations, weights


# ---------------------------------------------------------------------------- sampling_locations


@pytest.mark.parametrize(
    "kh, kw, stride, padding, dilation, groups",
    [
        (3, 3, (1, 1), (1, 1), (1, 1), 1),
        (3, 2, (2, 1), (0, 2), (1, 3), 2),
        (1, 4, (1, 3), (2, 0), (2, 1), 1),
        (5, 5, (2, 2), (3, 3), (2, 2), 3),
    ],
)
def test_locations_match_loop_reference(kh, kw, stride, padding, dilation, groups):
    rng = np.random.default_rng(0)
    h, w = 9, 8
    out_h = _out_size(h, kh, stride[0], padding[0], dilation[0])
    out_w = _out_size(w, kw, stride[1], padding[1], dilation[1])
    offset = _offsets(rng, 2, groups, kh, kw, out_h, out_w)
    result = sampling_locations(
        offset, kernel_size=(kh, kw), stride=stride, padding=padding, dilation=dilation
    )
    assert result.shape == (2, groups, kh * kw, 2, out_h, out_w) and result.dtype == np.float64
    np.testing.assert_allclose(
        result, loop_locations(offset, kh, kw, stride, padding, dilation), rtol=0, atol=1e-12
    )


def test_locations_are_where_deform_conv2d_reads():
    """A one-hot input at each sampling point: deform_conv2d with a unit tap weight reads
    exactly 1 where sampling_locations says the tap samples."""
    rng = np.random.default_rng(1)
    h = w = 7
    offset = np.round(rng.uniform(-2, 2, (1, 18, h, w)))  # integer offsets: exact reads
    locations = sampling_locations(offset, kernel_size=3, padding=1)
    for k in (0, 4, 8):
        weight = np.zeros((1, 1, 3, 3))
        weight[0, 0, k // 3, k % 3] = 1
        for oy, ox in ((0, 0), (3, 4), (6, 6)):
            y, x = (int(v) for v in locations[0, 0, k, :, oy, ox])
            image = np.zeros((1, 1, h, w))
            if 0 <= y < h and 0 <= x < w:
                image[0, 0, y, x] = 1
            out = cupydcn.deform_conv2d(image, offset, weight, padding=1)
            assert out[0, 0, oy, ox] == (1.0 if 0 <= y < h and 0 <= x < w else 0.0)


def test_zero_offsets_give_the_regular_grid():
    offset = np.zeros((1, 18, 4, 5), np.float32)
    loc = sampling_locations(offset, kernel_size=3, stride=2, padding=1, dilation=2)
    assert loc.dtype == np.float32
    for oy, ox, i, j in itertools.product(range(4), range(5), range(3), range(3)):
        assert loc[0, 0, i * 3 + j, 0, oy, ox] == oy * 2 - 1 + 2 * i
        assert loc[0, 0, i * 3 + j, 1, oy, ox] == ox * 2 - 1 + 2 * j


# ---------------------------------------------------------------------------- effective_dilation


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("kernel", [3, (3, 3), (5, 5), (2, 4), (1, 3)])
def test_effective_dilation_of_zero_offsets_is_the_dilation(d, kernel):
    offset = np.zeros((2, 2 * 2 * np.prod(np.broadcast_to(kernel, 2)), 3, 4))
    result = effective_dilation(offset, kernel_size=kernel, dilation=d, stride=2, padding=1)
    assert result.shape == (2, 2, 3, 4)
    np.testing.assert_allclose(result, d, rtol=0, atol=1e-12)


def test_effective_dilation_of_an_anisotropic_dilation_is_the_pair_weighted_mean():
    kh, kw, dh, dw = 3, 4, 2, 5
    result = effective_dilation(
        np.zeros((1, 2 * kh * kw, 2, 2)), kernel_size=(kh, kw), dilation=(dh, dw)
    )
    expected = (kh * (kw - 1) * dw + (kh - 1) * kw * dh) / (kh * (kw - 1) + (kh - 1) * kw)
    np.testing.assert_allclose(result, expected, rtol=1e-14)


@pytest.mark.parametrize("scale", [0.5, 2.0, 3.5])
def test_scaling_the_grid_scales_the_effective_dilation(scale):
    """Offsets that stretch the 3 x 3 grid about its centre by ``scale`` (the DCN paper's
    picture of a larger receptive field) give effective dilation ``scale * d``."""
    d = 2
    offset = np.zeros((1, 18, 3, 3))
    for i, j in itertools.product(range(3), range(3)):
        k = i * 3 + j
        offset[0, 2 * k] = (scale - 1) * (i - 1) * d
        offset[0, 2 * k + 1] = (scale - 1) * (j - 1) * d
    result = effective_dilation(offset, kernel_size=3, dilation=d, padding=2)
    np.testing.assert_allclose(result, scale * d, rtol=1e-12)


def test_effective_dilation_matches_loop_reference():
    rng = np.random.default_rng(2)
    kh, kw = 3, 2
    offset = _offsets(rng, 2, 2, kh, kw, 4, 3)
    result = effective_dilation(offset, kernel_size=(kh, kw), stride=(1, 2), dilation=(2, 1))
    reference = loop_dilation(loop_locations(offset, kh, kw, (1, 2), (0, 0), (2, 1)), kh, kw)
    np.testing.assert_allclose(result, reference, rtol=1e-12)


def test_effective_dilation_does_not_depend_on_stride_or_padding():
    rng = np.random.default_rng(3)
    offset = _offsets(rng, 1, 1, 3, 3, 5, 5)
    a = effective_dilation(offset, kernel_size=3)
    b = effective_dilation(offset, kernel_size=3, stride=3, padding=2)
    np.testing.assert_allclose(a, b, rtol=1e-12)


# ---------------------------------------------------------------------------- stacked


def test_stack_of_zero_offsets_is_the_regular_receptive_field():
    """Two 3 x 3 layers (stride 1, padding 1): 81 points covering the 5 x 5 receptive field
    with multiplicities (1 2 3 2 1) x (1 2 3 2 1)."""
    zeros = np.zeros((1, 18, 6, 6))
    result = stacked_sampling_locations([zeros, zeros], [[3, 2]], kernel_size=3, padding=1)
    assert result.locations.shape == (1, 1, 81, 2) and result.weights is None
    points, counts = np.unique(result.locations[0, 0], axis=0, return_counts=True)
    expected = {
        (y, x): a * b
        for (y, a), (x, b) in itertools.product(
            zip(range(1, 6), (1, 2, 3, 2, 1)), zip(range(0, 5), (1, 2, 3, 2, 1))
        )
    }
    assert {tuple(p): c for p, c in zip(points.astype(int).tolist(), counts)} == expected


def test_stack_with_stride_of_zero_offsets():
    """Layer 1: 3 x 3, stride 2, padding 1 on a 9 x 9 image (5 x 5 out); layer 2: 3 x 3,
    padding 0 (3 x 3 out). Output point (1, 1) reads layer-1 positions 1..3, which read
    image rows 2p - 1 + {0, 1, 2}."""
    l1 = np.zeros((1, 18, 5, 5))
    l2 = np.zeros((1, 18, 3, 3))
    result = stacked_sampling_locations(
        [l1, l2], np.array([[1, 1]]), kernel_size=3, stride=[2, 1], padding=[1, 0]
    )
    ys = sorted(set(result.locations[0, 0, :, 0].tolist()))
    assert ys == list(range(1, 8))  # rows 2p - 1 + {0, 1, 2} for p in 1, 2, 3
    # the tap order: the last layer's tap is the most significant index
    first_tap = result.locations[0, 0, :9]  # layer-2 tap (0, 0) -> layer-1 position (1, 1)
    np.testing.assert_array_equal(first_tap[:, 0], [1, 1, 1, 2, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(first_tap[:, 1], [1, 2, 3, 1, 2, 3, 1, 2, 3])


def test_one_layer_stack_at_grid_points_is_sampling_locations():
    rng = np.random.default_rng(4)
    offset = _offsets(rng, 2, 2, 3, 3, 5, 6)
    points = np.array([[0, 0], [2, 3], [4, 5]])
    stacked = stacked_sampling_locations(
        [offset], points, kernel_size=3, stride=2, padding=1, offset_group=1
    )
    direct = sampling_locations(offset, kernel_size=3, stride=2, padding=1)
    for index, (oy, ox) in enumerate(points):
        np.testing.assert_allclose(
            stacked.locations[:, index], direct[:, 1, :, :, oy, ox], rtol=0, atol=1e-12
        )


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_stack_matches_loop_reference(interpolation):
    rng = np.random.default_rng(5)
    # image 10 x 9 -> layer 1 (3x3, s1, p1, d1): 10 x 9 -> layer 2 (3x2, s2, p1, d(1, 2)): 5 x 4
    # -> layer 3 (1x3, s1, p(0, 1), d1): 5 x 4
    kernels = [(3, 3), (3, 2), (1, 3)]
    strides = [(1, 1), (2, 2), (1, 1)]
    paddings = [(1, 1), (1, 1), (0, 1)]
    dilations = [(1, 1), (1, 2), (1, 1)]
    sizes = [(10, 9)]
    for k, s, p, d in zip(kernels, strides, paddings, dilations):
        sizes.append(tuple(_out_size(sizes[-1][a], k[a], s[a], p[a], d[a]) for a in range(2)))
    groups = [2, 1, 2]
    offsets = [
        _offsets(rng, 2, g, k[0], k[1], *size, scale=1.2)
        for g, k, size in zip(groups, kernels, sizes[1:])
    ]
    masks = [
        rng.uniform(size=(2, g * k[0] * k[1]) + size)
        for g, k, size in zip(groups, kernels, sizes[1:])
    ]
    masks[1] = None
    points = np.array([[0.0, 0.0], [2.0, 1.0], [4.0, 3.0], [1.5, 2.25]])
    result = stacked_sampling_locations(
        offsets,
        points,
        kernel_size=kernels,
        stride=strides,
        padding=paddings,
        dilation=dilations,
        masks=masks,
        offset_group=[1, 0, 1],
        interpolation=interpolation,
    )
    ref_loc, ref_w = loop_stack(
        offsets,
        points,
        kernels,
        strides,
        paddings,
        dilations,
        masks=masks,
        groups=[1, 0, 1],
        interpolation=interpolation,
    )
    assert result.locations.shape == (2, 4, 9 * 6 * 3, 2)
    np.testing.assert_allclose(result.locations, ref_loc, rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.weights, ref_w, rtol=0, atol=1e-12)


def test_stack_weights_are_products_of_masks():
    zeros = np.zeros((1, 18, 4, 4))
    m1 = np.full((1, 9, 4, 4), 0.5)
    m2 = np.full((1, 9, 4, 4), 0.25)
    result = stacked_sampling_locations(
        [zeros, zeros], [[1, 1]], kernel_size=3, padding=1, masks=[m1, m2]
    )
    np.testing.assert_allclose(result.weights, 0.125)
    only_first = stacked_sampling_locations(
        [zeros, zeros], [[1, 1]], kernel_size=3, padding=1, masks=[m1, None]
    )
    np.testing.assert_allclose(only_first.weights, 0.5)


# ---------------------------------------------------------------------------- array types


def _problem(dtype=np.float32):
    rng = np.random.default_rng(6)
    mask = rng.uniform(size=(2, 9, 5, 5)).astype(dtype)
    return _offsets(rng, 2, 1, 3, 3, 5, 5, dtype=dtype), mask


def _all_three(offset, mask, points):
    return (
        sampling_locations(offset, kernel_size=3, padding=1),
        effective_dilation(offset, kernel_size=3, padding=1),
        *stacked_sampling_locations(
            [offset, offset], points, kernel_size=3, padding=1, masks=[mask, mask]
        ),
    )


def test_torch_cpu():
    torch = pytest.importorskip("torch")
    offset, mask = _problem()
    expected = _all_three(offset, mask, np.array([[2, 2]]))
    for points in (torch.tensor([[2, 2]]), [[2, 2]]):
        results = _all_three(torch.from_numpy(offset), torch.from_numpy(mask), points)
        for got, want in zip(results, expected):
            assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_torch_half_types_give_float32():
    torch = pytest.importorskip("torch")
    offset, _ = _problem()
    for dtype in (torch.float16, torch.bfloat16):
        result = sampling_locations(torch.from_numpy(offset).to(dtype), kernel_size=3, padding=1)
        assert result.dtype == torch.float32
        rounded = torch.from_numpy(offset).to(dtype).to(torch.float64).numpy()
        np.testing.assert_allclose(
            result.numpy(), sampling_locations(rounded, kernel_size=3, padding=1), rtol=1e-6
        )


def test_jax_cpu():
    jax = pytest.importorskip("jax")
    offset, mask = _problem()
    expected = _all_three(offset, mask, np.array([[2, 2]]))
    results = _all_three(
        jax.numpy.asarray(offset), jax.numpy.asarray(mask), jax.numpy.asarray([[2, 2]])
    )
    for got, want in zip(results, expected):
        assert isinstance(got, jax.Array) and got.dtype == jax.numpy.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_inputs_untouched():
    offset, mask = _problem()
    before = offset.copy(), mask.copy()
    offset.setflags(write=False)
    mask.setflags(write=False)
    _all_three(offset, mask, np.array([[1, 1]]))
    np.testing.assert_array_equal(offset, before[0])
    np.testing.assert_array_equal(mask, before[1])


@pytest.mark.gpu
def test_cupy_matches_numpy():
    cupy = pytest.importorskip("cupy")
    offset, mask = _problem()
    expected = _all_three(offset, mask, np.array([[2, 2]]))
    results = _all_three(cupy.asarray(offset), cupy.asarray(mask), cupy.asarray([[2, 2]]))
    for got, want in zip(results, expected):
        assert isinstance(got, cupy.ndarray)
        np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=1e-6)


# ---------------------------------------------------------------------------- validation


def _raises(exc_type, op, fragment, call):
    with pytest.raises(exc_type) as info:
        call()
    assert isinstance(info.value, cupydcn.CupydcnError)
    message = str(info.value)
    assert message.startswith(f"{op}: ") and fragment in message, message


@pytest.mark.parametrize("function", [sampling_locations, effective_dilation])
def test_validation_of_one_layer(function):
    op = function.__name__
    good = np.zeros((1, 18, 4, 4), np.float32)
    _raises(
        ValueError,
        op,
        "must be a positive multiple of 2 * kh * kw = 18",
        lambda: function(np.zeros((1, 17, 4, 4), np.float32), kernel_size=3),
    )
    _raises(
        ValueError,
        op,
        "offset must be 4-D",
        lambda: function(np.zeros((18, 4, 4), np.float32), kernel_size=3),
    )
    _raises(
        TypeError,
        op,
        "kernel_size must be an int or a pair",
        lambda: function(good, kernel_size="3"),
    )
    _raises(ValueError, op, "stride must be >= 1", lambda: function(good, kernel_size=3, stride=0))
    _raises(
        ValueError, op, "padding must be >= 0", lambda: function(good, kernel_size=3, padding=-1)
    )
    _raises(
        ValueError,
        op,
        "dilation must be >= 1",
        lambda: function(good, kernel_size=3, dilation=(1, 0)),
    )
    _raises(
        TypeError,
        op,
        "offset has dtype int32",
        lambda: function(good.astype(np.int32), kernel_size=3),
    )
    _raises(TypeError, op, "offset must be an array", lambda: function([[0.0]], kernel_size=3))


def test_effective_dilation_needs_two_taps():
    _raises(
        ValueError,
        "effective_dilation",
        "at least two taps",
        lambda: effective_dilation(np.zeros((1, 2, 3, 3)), kernel_size=1),
    )


def test_validation_of_stacks():
    op = "stacked_sampling_locations"
    l1 = np.zeros((1, 18, 8, 8))
    l2 = np.zeros((1, 18, 4, 4))
    call = stacked_sampling_locations
    _raises(
        ValueError,
        op,
        "offsets[1] has output size 4 x 4",
        lambda: call([l1, l2], [[0, 0]], kernel_size=3, padding=1),
    )
    call([l1, l2], [[0, 0]], kernel_size=3, padding=1, stride=[1, 2])  # consistent
    _raises(TypeError, op, "non-empty list", lambda: call([], [[0, 0]], kernel_size=3))
    _raises(TypeError, op, "non-empty list", lambda: call(l1, [[0, 0]], kernel_size=3))
    _raises(
        ValueError,
        op,
        "stride is a list of 3 entries",
        lambda: call([l1, l2], [[0, 0]], kernel_size=3, stride=[1, 2, 1]),
    )
    _raises(
        ValueError,
        op,
        "offset_group for layer 0",
        lambda: call([l1], [[0, 0]], kernel_size=3, offset_group=1),
    )
    _raises(
        ValueError,
        op,
        "interpolation must be one of",
        lambda: call([l1], [[0, 0]], kernel_size=3, interpolation="cubic"),
    )
    _raises(
        ValueError, op, "points must have shape [P, 2]", lambda: call([l1], [0, 0], kernel_size=3)
    )
    _raises(
        ValueError, op, "points must be finite", lambda: call([l1], [[0, np.nan]], kernel_size=3)
    )
    _raises(
        ValueError,
        op,
        "masks[0] has shape",
        lambda: call([l1], [[0, 0]], kernel_size=3, masks=[np.zeros((1, 8, 8, 8))]),
    )
    _raises(
        ValueError,
        op,
        "masks must be None or a list of 1",
        lambda: call([l1], [[0, 0]], kernel_size=3, masks=[None, None]),
    )
    _raises(
        ValueError,
        op,
        "offsets[1] has batch 2",
        lambda: call([l1, np.zeros((2, 18, 8, 8))], [[0, 0]], kernel_size=3, padding=1),
    )


def test_mixed_libraries_are_rejected():
    torch = pytest.importorskip("torch")
    _raises(
        TypeError,
        "stacked_sampling_locations",
        "pass arrays of one library",
        lambda: stacked_sampling_locations(
            [np.zeros((1, 18, 4, 4)), torch.zeros(1, 18, 4, 4)], [[0, 0]], kernel_size=3, padding=1
        ),
    )
