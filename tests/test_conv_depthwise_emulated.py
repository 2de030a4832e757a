"""The depthwise deform_conv2d kernels (cupydcn/cuda/kernels/deform_conv_depthwise.cu, driven by
cupydcn.deform_conv.depthwise_cuda), run on the CPU by the emulator and, with the
``launcher`` fixture's ``cupy`` variant, on a GPU.

Every result is compared with a float64 reference written here from docs/semantics.md §1
and §4 (its forward checked against the loop-form reference of tests/reference.py, its
gradients against finite differences) and with the NumPy backend, the generic path's
definition: every dtype, both index widths, the 3 x 3 specialisation and the generic
kernel size, channel multipliers, offset groups 1, C and in between, several input
channels per group, DCNv1, all padding modes. The block-cooperative reductions are run
in forward, reverse and shuffled thread orders (the emulator's missing-barrier check).

Emulator builds: one g++ build per (dtype, index width, kernel-size specialisation) of the
file that a test uses: 4 x 2 for 3 x 3, 4 + 2 for the generic size, 1 with UBSan: 15, about
4 s each (20 s with UBSan) on 2 shared cores, ~80 s in all; with them cached on disk the
file takes ~11 s.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

from cupydcn.cuda.launch import kernel_types, record_calls
from cupydcn.deform_conv import depthwise_cuda as dw
from cupydcn.deform_conv import numpy_backend as numpy_conv
from cupydcn.deform_conv.spec import ConvGeometry, conv_geometry
from emulator.host_launcher import HostLauncher, assert_order_independent
from reference import deform_conv2d_reference
from support import (
    DTYPE_NAMES,
    GRADS,
    assert_close_to_sum,
    assert_close_with_rounded_columns,
    dtype_of,
    on_device,
    to_numpy,
)

emulated = pytest.mark.emulated

BIG_WORKSPACE = 1 << 30
KERNELS = (dw.FORWARD_KERNEL, dw.DATA_KERNEL, dw.WEIGHT_KERNEL)


# ---------------------------------------------------------------------------- problems

CASES = {
    # C = groups = C_out, one offset group, 3x3 with padding 1 (zero offsets put taps exactly
    # on -1 and H), mask and bias.
    "depthwise": dict(batch=2, channels=4, size=(6, 7), out_channels=4, padding=1),
    # channel multiplier 2, offset groups = C, stride 2.
    "multiplier": dict(
        batch=2, channels=4, size=(7, 6), out_channels=8, stride=2, padding=1, offset_groups=4
    ),
    # 2 input channels per group, multiplier 3, offset groups between 1 and C; no bias.
    "grouped": dict(
        batch=1,
        channels=8,
        size=(5, 6),
        out_channels=12,
        padding=(1, 0),
        groups=4,
        offset_groups=2,
        with_bias=False,
    ),
    # multiplier 5 (two chunks of output channels), offset groups 3.
    "wide": dict(batch=1, channels=6, size=(5, 5), out_channels=30, padding=1, offset_groups=3),
    # 4 input channels per group, multiplier 4, 16 channels in one offset group (2 channel
    # slices in the input / offset / mask gradient kernel).
    "slices": dict(
        batch=1, channels=16, size=(5, 5), out_channels=16, padding=1, groups=4, offset_groups=1
    ),
    # the generic kernel size: non-square, H/W-specific stride, padding and dilation; DCNv1
    # (no mask), no bias, offset groups 2.
    "non_square": dict(
        batch=2,
        channels=4,
        size=(7, 9),
        out_channels=4,
        kernel=(2, 3),
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        offset_groups=2,
        with_mask=False,
        with_bias=False,
    ),
    # 4 channels per group in groups spanning several offset groups (C / G = 2 < cg).
    "spanning": dict(
        batch=1, channels=8, size=(5, 6), out_channels=4, padding=1, groups=2, offset_groups=4
    ),
}


class Problem:
    """The arrays of one call in ``dtype_name`` (offsets dyadic, so sample points are exact
    in every accumulation dtype; a third of them on integers, a sixth on halves: the kinks
    of the bilinear weights and of the padding modes) and its geometry."""

    def __init__(
        self,
        dtype_name,
        *,
        batch,
        channels,
        size,
        out_channels,
        kernel=(3, 3),
        stride=1,
        padding=0,
        dilation=1,
        groups=None,
        offset_groups=1,
        with_mask=True,
        with_bias=True,
        offset_scale=2.0,
        padding_mode="zeros",
        seed=0,
    ):
        rng = np.random.default_rng(seed)
        dtype = dtype_of(dtype_name)
        groups = channels if groups is None else groups
        kh, kw = kernel
        height, width = size
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        self.stride, self.padding, self.dilation = pair(stride), pair(padding), pair(dilation)
        out_h = (height + 2 * self.padding[0] - (self.dilation[0] * (kh - 1) + 1)) // self.stride[
            0
        ] + 1
        out_w = (width + 2 * self.padding[1] - (self.dilation[1] * (kw - 1) + 1)) // self.stride[
            1
        ] + 1
        taps = kh * kw
        self.dtype_name = dtype_name
        self.input = rng.standard_normal((batch, channels, height, width)).astype(dtype)
        self.weight = rng.standard_normal((out_channels, channels // groups, kh, kw)).astype(dtype)
        self.bias = rng.standard_normal(out_channels).astype(dtype) if with_bias else None
        shape = (batch, 2 * offset_groups * taps, out_h, out_w)
        offset = np.round(rng.uniform(-offset_scale, offset_scale, shape) * 64) / 64
        kind = rng.random(shape)
        offset[kind < 1 / 3] = np.round(offset[kind < 1 / 3])
        halves = (kind >= 1 / 3) & (kind < 0.5)
        offset[halves] = np.round(offset[halves] * 2) / 2
        self.offset = offset.astype(dtype)
        self.mask = (
            rng.uniform(-0.5, 1.5, (batch, offset_groups * taps, out_h, out_w)).astype(dtype)
            if with_mask
            else None
        )
        self.geom = conv_geometry(
            self.input,
            self.offset,
            self.weight,
            self.bias,
            self.mask,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            padding_mode=padding_mode,
        )
        self.grad_output = rng.standard_normal(self.geom.output_shape).astype(dtype)

    def arrays(self):
        return (self.input, self.offset, self.weight, self.bias, self.mask)


@functools.cache
def problem_of(case: str, dtype_name: str, padding_mode: str = "zeros", **changes) -> Problem:
    return Problem(dtype_name, **{**CASES[case], "padding_mode": padding_mode, **changes})


# ---------------------------------------------------------------------------- reference


def _map_coordinate(p, size, mode):
    """(p', dp'/dp) of docs/semantics.md §4.1 / §4.2, elementwise on float64 arrays."""
    if mode == "zeros":
        return p, np.ones_like(p)
    if size == 1:
        return np.zeros_like(p), np.zeros_like(p)
    last = float(size - 1)
    if mode == "border":
        return np.clip(p, 0.0, last), ((p >= 0) & (p <= last)).astype(np.float64)
    t = np.fmod(np.abs(p), 2 * last)
    folded = t > last
    return np.where(folded, 2 * last - t, t), np.where((p < 0) != folded, -1.0, 1.0)


def _cell(p, size, mode):
    """(floor, fraction) of the bilinear cell of a mapped coordinate (§1.4; §4.1: the cell
    of p' == size - 1 is [size - 2, size - 1] under border and reflection)."""
    p = np.clip(p, -4.0, size + 4.0)  # beyond (-2, size + 1) every corner is outside anyway
    low = np.floor(p)
    fraction = p - low
    if mode != "zeros" and size > 1:
        last = low == size - 1
        low = np.where(last, size - 2.0, low)
        fraction = np.where(last, 1.0, fraction)
    return low.astype(np.int64), fraction


def reference(problem: Problem) -> dict:
    """name -> (exact, magnitude, column magnitude or None) in float64, from docs/semantics.md
    §1.3 - §1.8 and §4: the output and the five gradients (None where not defined). The
    magnitude is each result's sum of the absolute values of its terms; the column
    magnitude (output and grad_weight) the sum of |other factor| * |column|, the scale of
    rounding each column value once (§6.1)."""
    geom = problem.geom
    x = problem.input.astype(np.float64)
    offset = problem.offset.astype(np.float64)
    weight = problem.weight.astype(np.float64)
    grad_output = problem.grad_output.astype(np.float64)
    N, C, H, W = geom.input_shape
    G, K, groups = geom.offset_groups, geom.taps, geom.groups
    Co, P = geom.out_channels, geom.out_h * geom.out_w
    cpg, cg, mult = C // G, C // groups, Co // groups
    mask = (
        np.ones((N, G * K, P))
        if problem.mask is None
        else problem.mask.astype(np.float64).reshape(N, G * K, P)
    )
    oy, ox = np.divmod(np.arange(P), geom.out_w)
    value = np.zeros((N, C, K, P))
    value_mag = np.zeros_like(value)
    d_dy, d_dx = np.zeros_like(value), np.zeros_like(value)
    dy_mag, dx_mag = np.zeros_like(value), np.zeros_like(value)
    slope_y, slope_x = np.zeros((N, G, K, P)), np.zeros((N, G, K, P))
    corners = {}  # (g, k) -> [(valid, weight, flat index within a plane)] per corner
    for g, k in itertools.product(range(G), range(K)):
        i, j = divmod(k, geom.kernel_w)
        dy = offset[:, g * 2 * K + 2 * k].reshape(N, P)
        dx = offset[:, g * 2 * K + 2 * k + 1].reshape(N, P)
        py = (oy * geom.stride_h - geom.pad_h + i * geom.dil_h) + dy  # §1.3
        px = (ox * geom.stride_w - geom.pad_w + j * geom.dil_w) + dx
        my, slope_y[:, g, k] = _map_coordinate(py, H, geom.padding_mode)
        mx, slope_x[:, g, k] = _map_coordinate(px, W, geom.padding_mode)
        y0, ly = _cell(my, H, geom.padding_mode)
        x0, lx = _cell(mx, W, geom.padding_mode)
        corners[g, k] = []
        for a, b in itertools.product((0, 1), repeat=2):
            qy, qx = y0 + a, x0 + b
            valid = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
            wy, wx = (ly if a else 1 - ly), (lx if b else 1 - lx)
            flat = np.clip(qy, 0, H - 1) * W + np.clip(qx, 0, W - 1)
            corners[g, k].append((valid, wy * wx, flat))
            for c in range(g * cpg, (g + 1) * cpg):
                v = np.where(valid, np.take_along_axis(x[:, c].reshape(N, -1), flat, 1), 0.0)
                value[:, c, k] += wy * wx * v
                value_mag[:, c, k] += wy * wx * np.abs(v)
                d_dy[:, c, k] += (1 if a else -1) * wx * v  # §1.8, from the cell's corners
                d_dx[:, c, k] += (1 if b else -1) * wy * v
                dy_mag[:, c, k] += wx * np.abs(v)
                dx_mag[:, c, k] += wy * np.abs(v)

    def per_channel(t):  # [N, G*K, P] -> [N, C, K, P], channel c's offset group
        return np.repeat(t.reshape(N, G, K, P), cpg, axis=1)

    m = per_channel(mask)
    column = m * value
    column_mag = np.abs(m) * value_mag
    w = weight.reshape(groups, mult, cg, K)
    go = grad_output.reshape(N, groups, mult, P)
    col = column.reshape(N, groups, cg, K, P)
    abs_col = np.abs(col)
    out = np.einsum("gjck,ngckp->ngjp", w, col).reshape(geom.output_shape)
    out_mag = np.einsum("gjck,ngckp->ngjp", np.abs(w), column_mag.reshape(col.shape))
    out_col = np.einsum("gjck,ngckp->ngjp", np.abs(w), abs_col).reshape(geom.output_shape)
    out_mag = out_mag.reshape(geom.output_shape)
    if problem.bias is not None:
        bias = problem.bias.astype(np.float64)[None, :, None, None]
        out, out_mag = out + bias, out_mag + np.abs(bias)

    gc = np.einsum("gjck,ngjp->ngckp", w, go).reshape(N, C, K, P)
    gc_mag = np.einsum("gjck,ngjp->ngckp", np.abs(w), np.abs(go)).reshape(N, C, K, P)
    grad_weight = np.einsum("ngjp,ngckp->gjck", go, col).reshape(geom.weight_shape)
    weight_mag = np.einsum("ngjp,ngckp->gjck", np.abs(go), column_mag.reshape(col.shape))
    weight_col = np.einsum("ngjp,ngckp->gjck", np.abs(go), abs_col).reshape(geom.weight_shape)
    grad_bias = grad_output.sum(axis=(0, 2, 3))

    def group_sum(t):  # [N, C, K, P] -> [N, G, K, P], summed over each offset group
        return t.reshape(N, G, cpg, K, P).sum(axis=2)

    grad_mask = group_sum(gc * value)
    mask_mag = group_sum(gc_mag * value_mag)
    m_g, abs_m = mask.reshape(N, G, K, P), np.abs(mask.reshape(N, G, K, P))
    grad_dy = m_g * slope_y * group_sum(gc * d_dy)
    grad_dx = m_g * slope_x * group_sum(gc * d_dx)
    dy_total = abs_m * np.abs(slope_y) * group_sum(gc_mag * dy_mag)
    dx_total = abs_m * np.abs(slope_x) * group_sum(gc_mag * dx_mag)

    def interleave(dy, dx):  # [N, G, K, P] twice -> the offset layout
        return np.stack([dy, dx], axis=3).reshape(geom.offset_shape)

    grad_input = np.zeros((N, C, H * W))
    input_mag = np.zeros_like(grad_input)
    for (g, k), cells in corners.items():
        for valid, weight_q, flat in cells:
            for c in range(g * cpg, (g + 1) * cpg):
                for n in range(N):
                    share = np.where(valid[n], weight_q[n] * m[n, c, k], 0.0)
                    np.add.at(grad_input[n, c], flat[n], share * gc[n, c, k])
                    np.add.at(input_mag[n, c], flat[n], np.abs(share) * gc_mag[n, c, k])

    return {
        "output": (out, out_mag, out_col),
        "input": (grad_input.reshape(geom.input_shape), input_mag.reshape(geom.input_shape), None),
        "offset": (interleave(grad_dy, grad_dx), interleave(dy_total, dx_total), None),
        "weight": (grad_weight, weight_mag.reshape(geom.weight_shape), weight_col),
        "mask": None
        if problem.mask is None
        else (grad_mask.reshape(geom.mask_shape), mask_mag.reshape(geom.mask_shape), None),
        "bias": (grad_bias, np.abs(grad_output).sum(axis=(0, 2, 3)), None),
    }


@functools.cache
def reference_of(case: str, dtype_name: str, padding_mode: str = "zeros", **changes) -> dict:
    return reference(problem_of(case, dtype_name, padding_mode, **changes))


@functools.cache
def numpy_backend_of(case: str, dtype_name: str, padding_mode: str = "zeros", **changes):
    """(output, ConvGrads) of the NumPy backend (the generic path's definition)."""
    problem = problem_of(case, dtype_name, padding_mode, **changes)
    output = numpy_conv.conv_forward(*problem.arrays(), problem.geom, workspace_bytes=BIG_WORKSPACE)
    grads = numpy_conv.conv_backward(
        problem.grad_output,
        problem.input,
        problem.offset,
        problem.weight,
        problem.mask,
        problem.geom,
        wrt=frozenset(GRADS),
        workspace_bytes=BIG_WORKSPACE,
    )
    return output, grads


# ---------------------------------------------------------------------------- running


def run_forward(launcher, problem: Problem, index_bits: int | None = None):
    """The depthwise forward of the problem's arrays (moved to ``launcher.xp``), in NumPy."""
    bits = dw.depthwise_index_bits(problem.geom) if index_bits is None else index_bits
    types = kernel_types(launcher, problem.dtype_name, bits)
    return to_numpy(
        dw.depthwise_forward(launcher, types, problem.geom, *on_device(launcher, *problem.arrays()))
    )


def run_backward(launcher, problem: Problem, index_bits: int | None = None, wrt=frozenset(GRADS)):
    """The depthwise ConvGrads (in NumPy)."""
    bits = dw.depthwise_index_bits(problem.geom) if index_bits is None else index_bits
    types = kernel_types(launcher, problem.dtype_name, bits)
    grad_output, input, offset, weight, mask = on_device(
        launcher, problem.grad_output, problem.input, problem.offset, problem.weight, problem.mask
    )
    grads = dw.depthwise_backward(
        launcher, types, problem.geom, grad_output, input, offset, weight, mask, wrt=frozenset(wrt)
    )
    return type(grads)(*(to_numpy(g) for g in grads))


def check_result(name, got, expected, dtype_name, *, against_backend=None):
    """``got`` against the reference ``expected`` = (exact, magnitude, column magnitude):
    one final rounding, the accumulation bound of the magnitude, and for the output and
    grad_weight one rounding of each column value (tests/support.py). With
    ``against_backend``, also against the NumPy backend's result: both sides' bounds."""
    exact, magnitude, column_magnitude = expected
    for label, want, roundings, scale in (
        ("reference", exact, 1, 1),
        ("NumPy backend", against_backend, 2, 2),
    ):
        if want is None:
            continue
        what = f"{name} vs the {label}"
        if column_magnitude is None:
            assert_close_to_sum(
                got,
                want,
                scale * magnitude,
                dtype_name,
                what,
                roundings=roundings,
                with_floor=True,
            )
        else:
            assert got.dtype == dtype_of(dtype_name), f"{what}: dtype {got.dtype}"
            assert_close_with_rounded_columns(
                got,
                want,
                scale * column_magnitude,
                dtype_name,
                what,
                magnitude=scale * magnitude,
                roundings=roundings,
            )


def check_all(problem: Problem, output, grads, expected, backend=None):
    """The output and every gradient of ``grads`` against the reference (and the NumPy
    backend's ``backend`` = (output, ConvGrads), when given)."""
    dtype_name = problem.dtype_name
    want_output = None if backend is None else backend[0]
    check_result("output", output, expected["output"], dtype_name, against_backend=want_output)
    for index, name in enumerate(GRADS):
        got = grads[index]
        if expected[name] is None:
            assert got is None, f"grad_{name} should be None"
            continue
        want = None if backend is None else backend[1][index]
        check_result(f"grad_{name}", got, expected[name], dtype_name, against_backend=want)


# ---------------------------------------------------------------------------- the reference


@emulated
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("case", ["grouped", "non_square", "spanning"])
def test_reference_forward_matches_loop_reference(case, padding_mode):
    """This file's reference against the loop-form one of tests/reference.py."""
    problem = problem_of(case, "float64", padding_mode, offset_scale=6.0)
    loop = deform_conv2d_reference(
        *problem.arrays(),
        stride=problem.stride,
        padding=problem.padding,
        dilation=problem.dilation,
        padding_mode=padding_mode,
    )
    np.testing.assert_allclose(reference(problem)["output"][0], loop, rtol=1e-13, atol=1e-13)


@emulated
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_reference_gradients_match_finite_differences(padding_mode):
    """The reference's gradients are the derivatives of its forward (away from the kinks,
    offsets moved off the dyadic grid)."""
    problem = Problem(
        "float64", **{**CASES["spanning"], "with_bias": True}, padding_mode=padding_mode, seed=5
    )
    rng = np.random.default_rng(11)
    problem.offset = problem.offset + rng.uniform(0.05, 0.2, problem.offset.shape)
    expected = reference(problem)
    names = ("input", "offset", "weight", "mask", "bias")

    def loss(name, value):
        original = getattr(problem, name)
        setattr(problem, name, value)
        try:
            return float(np.sum(reference(problem)["output"][0] * problem.grad_output))
        finally:
            setattr(problem, name, original)

    h = 1e-6
    for name in names:
        value = getattr(problem, name)
        direction = rng.standard_normal(value.shape)
        numeric = (loss(name, value + h * direction) - loss(name, value - h * direction)) / (2 * h)
        analytic = float(np.sum(expected[name][0] * direction))
        assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-6), name


# ---------------------------------------------------------------------------- the rule


def _geometry(**sizes) -> ConvGeometry:
    base = dict(
        batch=2,
        in_channels=8,
        height=9,
        width=9,
        out_channels=8,
        groups=8,
        offset_groups=1,
        kernel_h=3,
        kernel_w=3,
        stride_h=1,
        stride_w=1,
        pad_h=1,
        pad_w=1,
        dil_h=1,
        dil_w=1,
        out_h=9,
        out_w=9,
        has_mask=True,
        has_bias=True,
    )
    return ConvGeometry(**{**base, **sizes})


@pytest.mark.parametrize(
    "channels, groups, out_channels, applies",
    [
        (8, 8, 8, True),  # depthwise
        (8, 8, 16, True),  # multiplier 2
        (8, 8, 64, True),  # depthwise, any multiplier
        (1, 1, 3, True),  # one input channel
        (8, 4, 8, True),  # 2 channels per group, multiplier 2
        (16, 4, 16, True),  # 4 and 4
        (16, 4, 32, False),  # 4 channels per group, multiplier 8
        (20, 4, 20, False),  # 5 channels per group
        (8, 1, 8, False),  # a dense convolution
        (256, 256, 256, True),  # the benchmark shape S7
    ],
)
def test_depthwise_applies(channels, groups, out_channels, applies):
    geom = _geometry(in_channels=channels, groups=groups, out_channels=out_channels)
    assert dw.depthwise_applies(geom) is applies


def test_launch_plan_of_s7():
    """The benchmark shape S7 (N 16, C = C_out = groups 512, 28 x 28, 3 x 3, G 1): 8 groups
    per forward thread, 8 channel slices, one block per weight unit (512 channels x 3 tap
    rows), 32-bit indices."""
    geom = _geometry(
        batch=16,
        in_channels=512,
        out_channels=512,
        groups=512,
        height=28,
        width=28,
        out_h=28,
        out_w=28,
    )
    assert dw.kernel_size_specialisation(geom) == (3, 3)
    assert dw.groups_per_thread(geom) == 8
    assert dw.data_launch(geom) == (16 * 9 * 25, 8)
    assert dw.weight_launch(geom, want_weight=True) == (512 * 3, 256)
    assert dw.weight_launch(geom, want_weight=False) == (512, 256 * 2)
    assert dw.depthwise_index_bits(geom) == 32
    generic = _geometry(kernel_h=5, kernel_w=5, pad_h=2, pad_w=2)
    assert dw.kernel_size_specialisation(generic) == (0, 0)
    assert dw.groups_per_thread(generic) == 1


def test_index_width_checks():
    """A geometry whose tensors pass 2^31 elements needs the 64-bit kernels; asking for
    32-bit ones is an error before anything runs."""
    huge = _geometry(
        batch=64,
        in_channels=1024,
        out_channels=1024,
        groups=1024,
        height=256,
        width=256,
        out_h=256,
        out_w=256,
    )
    assert dw.depthwise_index_bits(huge) == 64

    class NoLaunch:
        xp = np

        def launch(self, *args, **kwargs):
            raise AssertionError("no launch expected")

    launcher = NoLaunch()
    with pytest.raises(ValueError, match="64-bit indices"):
        dw.depthwise_forward(
            launcher, kernel_types(launcher, "float32", 32), huge, None, None, None, None, None
        )
    with pytest.raises(ValueError, match="index_bits"):
        dw.depthwise_forward(
            launcher, kernel_types(launcher, "float32", 16), huge, None, None, None, None, None
        )


# ---------------------------------------------------------------------------- the kernels


MATRIX = (
    [
        (case, dtype_name, bits)
        for case in ("depthwise", "multiplier", "grouped", "wide", "slices")
        for dtype_name in DTYPE_NAMES
        for bits in (32, 64)
    ]
    + [("non_square", dtype_name, 32) for dtype_name in DTYPE_NAMES]
    + [("non_square", dtype_name, 64) for dtype_name in ("float64", "float32")]
)


@pytest.mark.parametrize(
    "case, dtype_name, index_bits", MATRIX, ids=[f"{c}-{d}-i{b}" for c, d, b in MATRIX]
)
def test_forward_and_every_gradient(launcher, case, dtype_name, index_bits):
    """Output and all five gradients against the float64 reference and the NumPy backend;
    inputs untouched; the launches use the requested index width and specialisation."""
    problem = problem_of(case, dtype_name)
    before = [a.copy() for a in (*problem.arrays(), problem.grad_output) if a is not None]
    start = len(launcher.launches)
    output = run_forward(launcher, problem, index_bits)
    grads = run_backward(launcher, problem, index_bits)
    check_all(
        problem, output, grads, reference_of(case, dtype_name), numpy_backend_of(case, dtype_name)
    )
    launches = [r for r in launcher.launches[start:] if r.kernel in KERNELS]
    assert [r.kernel for r in launches] == list(KERNELS)
    assert {r.index_bits for r in launches} == {index_bits}
    assert {r.template_args for r in launches} == {dw.kernel_size_specialisation(problem.geom)}
    after = [a for a in (*problem.arrays(), problem.grad_output) if a is not None]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(after, before))


PADDING_CASES = [
    (case, dtype_name, mode)
    for case in ("depthwise", "non_square")
    for dtype_name in DTYPE_NAMES
    for mode in ("border", "reflection")
]


@pytest.mark.parametrize(
    "case, dtype_name, padding_mode",
    PADDING_CASES,
    ids=[f"{c}-{d}-{m}" for c, d, m in PADDING_CASES],
)
def test_padding_modes(launcher, case, dtype_name, padding_mode):
    """border and reflection, sample points up to 3 map sizes beyond every side (reflection
    folds, clamped points, the edges' one-sided derivatives)."""
    changes = dict(offset_scale=20.0)
    problem = problem_of(case, dtype_name, padding_mode, **changes)
    output = run_forward(launcher, problem)
    grads = run_backward(launcher, problem)
    check_all(
        problem,
        output,
        grads,
        reference_of(case, dtype_name, padding_mode, **changes),
        numpy_backend_of(case, dtype_name, padding_mode, **changes),
    )


@pytest.mark.parametrize("with_mask", [True, False], ids=["dcnv2", "dcnv1"])
def test_wrt_subsets(launcher, with_mask):
    """Each subset of up to two gradients computes exactly those (grad_mask only with a
    mask) and launches only the kernels they need."""
    problem = problem_of("depthwise", "float32", with_mask=with_mask)
    expected = reference_of("depthwise", "float32", with_mask=with_mask)
    needs = {
        "input": {dw.DATA_KERNEL},
        "offset": {dw.DATA_KERNEL},
        "mask": {dw.DATA_KERNEL} if with_mask else set(),
        "weight": {dw.WEIGHT_KERNEL},
        "bias": {dw.WEIGHT_KERNEL},
    }
    for size in range(3):
        for wrt in map(frozenset, itertools.combinations(GRADS, size)):
            start = len(launcher.launches)
            grads = run_backward(launcher, problem, wrt=wrt)
            for index, name in enumerate(GRADS):
                if name in wrt and expected[name] is not None:
                    check_result(
                        f"grad_{name} of {set(wrt)}", grads[index], expected[name], "float32"
                    )
                else:
                    assert grads[index] is None, f"grad_{name} computed for wrt={set(wrt)}"
            launched = {r.kernel for r in launcher.launches[start:]}
            assert launched == set().union(*(needs[n] for n in wrt)), (wrt, launched)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_batch_zero(launcher, dtype_name):
    """N = 0: empty output and gradients, zero grad_weight and grad_bias, no launches."""
    problem = problem_of("multiplier", dtype_name, batch=0)
    start = len(launcher.launches)
    output = run_forward(launcher, problem)
    grads = run_backward(launcher, problem)
    geom = problem.geom
    assert output.shape == geom.output_shape and output.dtype == problem.input.dtype
    shapes = (geom.input_shape, geom.offset_shape, geom.weight_shape, geom.mask_shape)
    for got, shape in zip(grads, (*shapes, (geom.out_channels,))):
        assert got.shape == shape and got.dtype == problem.input.dtype
    assert not np.any(grads.grad_weight.astype(np.float64))
    assert not np.any(grads.grad_bias.astype(np.float64))
    assert not [r for r in launcher.launches[start:] if r.kernel in KERNELS and r.total]


@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_no_workspace_and_the_launches(launcher, dtype_name):
    """Nothing is allocated besides the results and their accumulators; one forward launch,
    two backward ones, a rounding launch per half-type accumulator, no GEMM."""
    problem = problem_of("depthwise", dtype_name)
    with record_calls() as calls:
        run_forward(launcher, problem)
        run_backward(launcher, problem)
    assert calls.workspace_bytes == 0
    assert calls.gemm_count == 0
    roundings = 3 if dtype_name == "float16" else 0
    assert calls.launches[dw.FORWARD_KERNEL] == 1
    assert calls.launches[dw.DATA_KERNEL] == calls.launches[dw.WEIGHT_KERNEL] == 1
    assert calls.launches["round_to_output"] == roundings
    assert calls.launches["xp.zeros"] == 3


@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_nan_offsets(launcher, dtype_name):
    """A NaN offset makes its tap's samples NaN: the outputs of that pixel, its offset and
    mask gradients, and grad_weight and grad_input as the NumPy backend has them."""
    problem = Problem(dtype_name, **CASES["multiplier"], seed=3)
    offset = problem.offset.copy()
    k = 4  # the centre tap: always near the map
    offset[1, 2 * k, 1, 2] = np.nan  # dy of image 1, offset group 0, pixel (1, 2)
    offset[0, 2 * (9 + k) + 1, 0, 0] = np.nan  # dx of image 0, offset group 1, pixel (0, 0)
    problem.offset = offset
    output = run_forward(launcher, problem)
    grads = run_backward(launcher, problem)
    want_output = numpy_conv.conv_forward(
        *problem.arrays(), problem.geom, workspace_bytes=BIG_WORKSPACE
    )
    want = numpy_conv.conv_backward(
        problem.grad_output,
        problem.input,
        problem.offset,
        problem.weight,
        problem.mask,
        problem.geom,
        wrt=frozenset(GRADS),
        workspace_bytes=BIG_WORKSPACE,
    )
    nan = lambda a: np.isnan(a.astype(np.float64))  # noqa: E731
    assert nan(output).any()
    np.testing.assert_array_equal(nan(output), nan(want_output))
    for name, got, expected in zip(GRADS, grads, want):
        np.testing.assert_array_equal(nan(got), nan(expected), err_msg=f"grad_{name}")
    assert nan(grads.grad_offset[1, 2 * k : 2 * k + 2, 1, 2]).all()
    assert nan(grads.grad_mask[1, k, 1, 2])


# ---------------------------------------------------------------------------- emulator only


ORDER_CASES = {
    # 8 channels per offset group in 8 slices, 8 groups per forward thread, 2 blocks per
    # weight unit (the constants lowered below), multiplier 2
    "3x3": dict(batch=2, channels=16, size=(12, 12), out_channels=32, padding=1, offset_groups=2),
    # the generic kernel size: one weight unit per tap
    "3x2": dict(
        batch=2,
        channels=16,
        size=(12, 12),
        out_channels=32,
        kernel=(3, 2),
        padding=1,
        offset_groups=2,
    ),
}


@emulated
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("case", sorted(ORDER_CASES))
def test_results_do_not_depend_on_thread_order(host_launcher, monkeypatch, case, dtype_name):
    """Forward, reverse and shuffled block / thread / fiber orders give the same bits for
    everything written without atomics or summed by at most two blocks (output, grad_offset,
    grad_mask, grad_weight, grad_bias: the block reductions and the channel slices'
    sums), with the forward's runs of groups, several channel slices and two blocks per
    weight unit; grad_input (atomics from many threads) within the reference's bound."""
    monkeypatch.setattr(dw, "MIN_FORWARD_THREADS", 1)
    monkeypatch.setattr(dw, "MIN_CHANNELS_PER_SLICE", 1)
    monkeypatch.setattr(dw, "MIN_PIXELS_PER_THREAD", 1)
    problem = Problem(dtype_name, **ORDER_CASES[case], seed=7)
    geom = problem.geom
    assert dw.groups_per_thread(geom) == (8 if case == "3x3" else 1)
    assert dw.data_launch(geom)[1] == 8
    assert dw.weight_launch(geom, want_weight=True)[1] == 2 * dw.BACKWARD_BLOCK

    def run(launcher):
        grads = run_backward(launcher, problem)
        return {
            "output": run_forward(launcher, problem),
            **{f"grad_{n}": g for n, g in zip(GRADS, grads) if n != "input"},
        }

    results = assert_order_independent(run)
    expected = reference(problem)
    check_result("output", results["output"], expected["output"], dtype_name)
    for name in ("offset", "weight", "mask", "bias"):
        check_result(f"grad_{name}", results[f"grad_{name}"], expected[name], dtype_name)
    for order in (dict(reverse=True), dict(shuffle=5)):
        grads = run_backward(HostLauncher(**order), problem, wrt={"input"})
        check_result("grad_input", grads.grad_input, expected["input"], dtype_name)


@emulated
def test_grid_stride_with_few_threads(host_launcher):
    """The forward's grid-stride loop with 3 blocks of 7 threads (each thread many items)
    gives the GPU configuration's result."""
    problem = problem_of("wide", "float64")
    expected = run_forward(host_launcher, problem)
    got = run_forward(HostLauncher(config=lambda total: (3, 7)), problem)
    np.testing.assert_array_equal(got, expected)


@emulated
def test_undefined_behaviour_sanitizer(host_launcher):
    """The 32-bit kernels under UBSan (signed overflow, float->int conversion, misaligned
    access), with far sample points."""
    sanitized = HostLauncher(sanitize="undefined")
    changes = dict(offset_scale=20.0)
    problem = problem_of("depthwise", "float32", "reflection", **changes)
    output = run_forward(sanitized, problem, 32)
    grads = run_backward(sanitized, problem, 32)
    check_all(problem, output, grads, reference_of("depthwise", "float32", "reflection", **changes))
