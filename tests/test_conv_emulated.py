"""deform_conv2d's CUDA kernels and their orchestration, run on the CPU by the emulator
and, with the ``launcher`` fixture's ``cupy`` variant, on a GPU.

``cupydcn.deform_conv.cuda_backend.conv_forward / conv_backward`` drive the real ``cupydcn/cuda/kernels/`` sources
through :class:`HostLauncher` (tests/emulator, checked mode) and are compared with a
vectorised float64 reference of the forward and all five gradients written here from
docs/semantics.md §1 (its forward checked against the loop reference of tests/reference.py, its
gradients against finite differences), and the NumPy backend against the same reference.
"""

from __future__ import annotations

import ctypes
import itertools

import ml_dtypes
import numpy as np
import pytest

from cupydcn.cuda.launch import INT32_INDEX_LIMIT, index_bits_for_sizes, launch_config
from cupydcn.deform_conv import cuda_backend as _conv_kernels
from cupydcn.deform_conv import numpy_backend as numpy_conv
from cupydcn.deform_conv.cuda_kernels import conv_specialisation
from cupydcn.deform_conv.spec import conv_geometry
from emulator.host_launcher import (
    EmulatorFaultError,
    HostLauncher,
    build_library,
    shim_text,
)
from reference import deform_conv2d_reference
from support import (
    DTYPE_NAMES,
    GRADS,
    assert_close_to_sum,
    dtype_of,
    on_device,
    strided_copy,
    to_numpy,
)

# The column path (im2col, GEMMs, col2im), not the depthwise kernels "auto" would pick
# for some of these small grouped cases.
pytestmark = pytest.mark.usefixtures("im2col_only")

# Tests taking ``launcher`` are marked ``emulated`` (or ``gpu``) by its parameter; the
# others, which use the emulator alone, carry the mark themselves.
emulated = pytest.mark.emulated

BIG_WORKSPACE = 1 << 30

# Error bound per element (tests/support.py): |got - ref| <= roundings * rounding * |ref| +
# of_sum * magnitude + floor, where magnitude is the same sum over absolute values of every
# term (the reference with magnitude=True). Sample points are exact in every acc dtype
# (offsets are multiples of 2^-10), so only sums round.


# ---------------------------------------------------------------------------- reference


def _corner_data(x, py, px):
    """Bilinear corners of points (py, px) [N, G, K, Ho, Wo] in x [N, G, Cg, H, W], per
    docs/semantics.md §1: weights g(q_y, p_y) g(q_x, p_x), g(a, b) = max(0, 1 - |a - b|), over the
    integer points q = floor(p) + {0, 1}^2 inside the map. Yields, per corner,
    (in_map, weight, values [..., Cg], qy, qx, corner offsets (a, b))."""
    height, width = x.shape[-2:]
    nan = np.isnan(py) | np.isnan(px)
    y = np.where(nan, -10.0, np.clip(py, -10.0, height + 10.0))
    xx = np.where(nan, -10.0, np.clip(px, -10.0, width + 10.0))
    y0, x0 = np.floor(y), np.floor(xx)
    n_idx = np.arange(x.shape[0])[:, None, None, None, None]
    g_idx = np.arange(x.shape[1])[None, :, None, None, None]
    for a, b in itertools.product((0, 1), repeat=2):
        qy, qx = y0 + a, x0 + b
        inside = (qy >= 0) & (qy < height) & (qx >= 0) & (qx < width)
        weight = np.maximum(0, 1 - np.abs(qy - y)) * np.maximum(0, 1 - np.abs(qx - xx))
        iy = np.clip(qy, 0, height - 1).astype(np.int64)
        ix = np.clip(qx, 0, width - 1).astype(np.int64)
        values = x[n_idx, g_idx, :, iy, ix]  # [N, G, K, Ho, Wo, Cg]
        values = np.where(inside[..., None], values, 0.0)
        yield inside & ~nan, weight, values, iy, ix, (a, b), y - y0, xx - x0


def _sample_points(offset, geom):
    """(py, px) [N, G, K, Ho, Wo] in float64."""
    n, G, K = geom.batch, geom.offset_groups, geom.taps
    off = offset.astype(np.float64).reshape(n, G, K, 2, geom.out_h, geom.out_w)
    i = np.repeat(np.arange(geom.kernel_h), geom.kernel_w)
    j = np.tile(np.arange(geom.kernel_w), geom.kernel_h)
    base_y = (np.arange(geom.out_h) * geom.stride_h - geom.pad_h)[None, :, None] + (i * geom.dil_h)[
        :, None, None
    ]
    base_x = (np.arange(geom.out_w) * geom.stride_w - geom.pad_w)[None, None, :] + (j * geom.dil_w)[
        :, None, None
    ]
    return base_y + off[:, :, :, 0], base_x + off[:, :, :, 1]


def reference(input, offset, weight, bias, mask, grad_output, geom, *, magnitude=False):
    """Forward output and the five gradients in float64, straight from docs/semantics.md §1
    (torchvision's conventions at the kinks). With ``magnitude``, every term of every sum
    is replaced by its absolute value (the scale of the rounding errors)."""
    if magnitude:
        input, weight, grad_output = abs(input), abs(weight), abs(grad_output)
        bias = None if bias is None else abs(bias)
        mask = None if mask is None else abs(mask)
    N, C, H, W = geom.input_shape
    G, K, groups = geom.offset_groups, geom.taps, geom.groups
    Co, Ho, Wo = geom.out_channels, geom.out_h, geom.out_w
    Cg = C // G
    x = input.astype(np.float64).reshape(N, G, Cg, H, W)
    m = (
        np.ones((N, G, K, Ho, Wo))
        if mask is None
        else mask.astype(np.float64).reshape(N, G, K, Ho, Wo)
    )
    py, px = _sample_points(offset, geom)
    nan = np.isnan(py) | np.isnan(px)

    value = np.zeros((N, G, K, Ho, Wo, Cg))
    d_dy = np.zeros_like(value)
    d_dx = np.zeros_like(value)
    corners = list(_corner_data(x, py, px))
    for inside, w, values, _, _, (a, b), ly, lx in corners:
        value += (w * inside)[..., None] * values
        # torchvision's get_coordinate_weight: d/dy of the 4-corner blend, invalid corners 0
        wy = (lx if b else 1 - lx) * (1 if a or magnitude else -1)
        wx = (ly if a else 1 - ly) * (1 if b or magnitude else -1)
        d_dy += (wy * ~nan)[..., None] * values
        d_dx += (wx * ~nan)[..., None] * values
    value[nan] = np.nan
    d_dy[nan] = np.nan
    d_dx[nan] = np.nan

    def to_columns(t):  # [N, G, K, Ho, Wo, Cg] -> [N, groups, Cin_g*K, P]
        return np.moveaxis(t, -1, 2).reshape(N, groups, C // groups * K, Ho * Wo)

    columns = to_columns(value * m[..., None])
    w = weight.astype(np.float64).reshape(groups, Co // groups, -1)
    out = np.einsum("gok,ngkp->ngop", w, columns).reshape(N, Co, Ho, Wo)
    if bias is not None:
        out += bias.astype(np.float64)[None, :, None, None]

    go = grad_output.astype(np.float64).reshape(N, groups, Co // groups, Ho * Wo)
    grad_cols = np.einsum("gok,ngop->ngkp", w, go).reshape(N, G, Cg, K, Ho, Wo)
    grad_cols = np.moveaxis(grad_cols, 2, -1)  # [N, G, K, Ho, Wo, Cg]

    grad_weight = np.einsum("ngop,ngkp->gok", go, columns).reshape(geom.weight_shape)
    grad_bias = go.sum(axis=(0, 3)).reshape(Co)
    grad_mask = (grad_cols * value).sum(-1).reshape(geom.mask_shape)
    goff = np.stack([m * (grad_cols * d_dy).sum(-1), m * (grad_cols * d_dx).sum(-1)], axis=3)
    grad_offset = goff.reshape(geom.offset_shape)

    grad_x = np.zeros(N * G * Cg * H * W)
    n_idx = np.arange(N)[:, None, None, None, None, None]
    g_idx = np.arange(G)[None, :, None, None, None, None]
    c_idx = np.arange(Cg)
    for inside, w_c, _, iy, ix, _, _, _ in corners:
        contrib = (w_c * inside * m)[..., None] * np.where(nan[..., None], 0.0, grad_cols)
        flat = (((n_idx * G + g_idx) * Cg + c_idx) * H + iy[..., None]) * W + ix[..., None]
        grad_x += np.bincount(flat.ravel(), contrib.ravel(), minlength=grad_x.size)
    grad_input = grad_x.reshape(geom.input_shape)

    return {
        "output": out,
        "input": grad_input,
        "offset": grad_offset,
        "weight": grad_weight,
        "mask": None if mask is None else grad_mask,
        "bias": grad_bias,
    }


# ---------------------------------------------------------------------------- problems


class Problem:
    """Inputs of one call, in ``dtype_name``, with its geometry and float64 reference."""

    def __init__(
        self,
        dtype_name,
        *,
        batch,
        channels,
        size,
        out_channels,
        kernel,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        offset_groups=1,
        with_mask=True,
        with_bias=True,
        seed=0,
        offset_scale=2.0,
        edge_targets=False,
        padding_mode="zeros",
    ):
        rng = np.random.default_rng(seed)
        dtype = dtype_of(dtype_name)
        H, W = size
        kh, kw = kernel
        self.dtype_name = dtype_name

        def cast(a):
            return np.ascontiguousarray(a).astype(dtype)

        self.input = cast(rng.standard_normal((batch, channels, H, W)))
        self.weight = cast(rng.standard_normal((out_channels, channels // groups, kh, kw)))
        self.bias = cast(rng.standard_normal(out_channels)) if with_bias else None
        sh, sw = (stride, stride) if isinstance(stride, int) else stride
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
        Ho = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
        Wo = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
        taps = kh * kw
        offset = rng.uniform(-offset_scale, offset_scale, (batch, 2 * offset_groups * taps, Ho, Wo))
        offset = np.round(offset * 1024) / 1024  # sample points exact in float32
        kind = rng.random(offset.shape)
        offset[kind < 0.3] = 0.0  # integer sample points (e.g. exactly -1 with padding 1)
        halves = (kind >= 0.3) & (kind < 0.45)
        offset[halves] = np.round(offset[halves] * 2) / 2
        mask = rng.uniform(-0.5, 1.5, (batch, offset_groups * taps, Ho, Wo)) if with_mask else None
        self.stride, self.padding, self.dilation = (sh, sw), (ph, pw), (dh, dw)
        offset = cast(offset)
        self.mask = None if mask is None else cast(mask)
        self.geom = conv_geometry(
            self.input,
            offset,
            self.weight,
            self.bias,
            self.mask,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            padding_mode=padding_mode,
        )
        if edge_targets:
            offset = self._edge_offsets(offset, rng)
        self.offset = offset
        self.grad_output = cast(rng.standard_normal(self.geom.output_shape))

    def _edge_offsets(self, offset, rng):
        """Sample points exactly on -1, 0, H-1, H (and W), just inside and outside, far
        outside and at +-inf, on every side, in every combination of y and x."""
        geom = self.geom
        H, W = geom.height, geom.width
        ys = [
            -np.inf,
            -1e4,
            -2.0,
            -1.5,
            -1.0,
            -0.5,
            0.0,
            H - 1.0,
            H - 0.5,
            H,
            H + 0.5,
            H + 1,
            1e4,
            np.inf,
            2.25,
        ]
        xs = [
            -np.inf,
            -1e4,
            -2.0,
            -1.5,
            -1.0,
            -0.5,
            0.0,
            W - 1.0,
            W - 0.5,
            W,
            W + 0.5,
            W + 1,
            1e4,
            np.inf,
            3.75,
        ]
        pairs = list(itertools.product(ys, xs))
        rng.shuffle(pairs)
        py, px = _sample_points(np.zeros(offset.shape), geom)  # base points
        off = offset.astype(np.float64).reshape(py.shape[:3] + (2,) + py.shape[3:])
        positions = list(np.ndindex(py.shape))
        assert len(positions) >= len(pairs), "edge problem too small for every pair"
        for (ty, tx), pos in zip(pairs, positions):
            n, g, k, oy, ox = pos
            off[n, g, k, 0, oy, ox] = ty - py[pos]
            off[n, g, k, 1, oy, ox] = tx - px[pos]
        return off.reshape(offset.shape).astype(offset.dtype)

    def reference(self, *, magnitude=False):
        return reference(
            self.input,
            self.offset,
            self.weight,
            self.bias,
            self.mask,
            self.grad_output,
            self.geom,
            magnitude=magnitude,
        )

    def expected(self):
        """name -> (reference, magnitude) (None for a gradient that does not exist)."""
        ref, mag = self.reference(), self.reference(magnitude=True)
        return {k: None if ref[k] is None else (ref[k], mag[k]) for k in ref}

    def arrays(self):
        return (self.input, self.offset, self.weight, self.bias, self.mask)


CASES = {
    # 3x3, padding 1: zero offsets put taps exactly on -1 and H; mask and bias.
    "square": dict(batch=2, channels=4, size=(6, 7), out_channels=6, kernel=(3, 3), padding=1),
    # groups > 1, offset groups > 1 (not equal), non-square kernel, H/W-specific
    # stride / padding / dilation, odd batch; mask, no bias.
    "grouped": dict(
        batch=3,
        channels=6,
        size=(7, 9),
        out_channels=4,
        kernel=(2, 3),
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        groups=2,
        offset_groups=3,
        with_bias=False,
        seed=1,
    ),
    # DCNv1 (no mask), no bias, 3x1 kernel, offset groups = channels.
    "dcnv1": dict(
        batch=1,
        channels=2,
        size=(5, 4),
        out_channels=3,
        kernel=(3, 1),
        stride=(1, 2),
        padding=(0, 1),
        dilation=(2, 1),
        offset_groups=2,
        with_mask=False,
        with_bias=False,
        seed=2,
        offset_scale=3.0,
    ),
    # Sample points placed on every edge case, on every side.
    "edges": dict(
        batch=2,
        channels=2,
        size=(4, 5),
        out_channels=2,
        kernel=(2, 2),
        padding=1,
        seed=3,
        edge_targets=True,
    ),
}


# The results computed from the columns, which half types round to the element dtype
# before the GEMMs (docs/semantics.md §6.1): one more rounding per term.
FROM_COLUMNS = ("output", "grad_weight", "weight")


def assert_close(actual, expected, dtype_name, what, *, roundings=1):
    """``expected`` = (reference, magnitude); see the bound above. ``roundings``: how many
    final roundings separate the two (2 when neither is exact)."""
    ref, magnitude = expected
    assert_close_to_sum(
        actual,
        ref,
        magnitude,
        dtype_name,
        what,
        roundings=roundings,
        with_floor=True,
        operand_roundings=int(what in FROM_COLUMNS),
    )


def run_forward(launcher, problem, *, workspace_bytes=BIG_WORKSPACE, index_bits=None):
    """The kernels' output for the problem's arrays (moved to ``launcher.xp``), in NumPy."""
    return to_numpy(
        _conv_kernels.conv_forward(
            launcher,
            *on_device(launcher, *problem.arrays()),
            problem.geom,
            dtype_name=problem.dtype_name,
            workspace_bytes=workspace_bytes,
            index_bits=index_bits,
        )
    )


def run_backward(
    launcher, problem, *, wrt=frozenset(GRADS), workspace_bytes=BIG_WORKSPACE, index_bits=None
):
    """The kernels' ConvGrads (in NumPy)."""
    grad_output, input, offset, weight, mask = on_device(
        launcher, problem.grad_output, problem.input, problem.offset, problem.weight, problem.mask
    )
    grads = _conv_kernels.conv_backward(
        launcher,
        grad_output,
        input,
        offset,
        weight,
        mask,
        problem.geom,
        dtype_name=problem.dtype_name,
        wrt=frozenset(wrt),
        workspace_bytes=workspace_bytes,
        index_bits=index_bits,
    )
    return type(grads)(*(to_numpy(g) for g in grads))


def check_all(problem, output, grads, expected):
    dtype_name = problem.dtype_name
    assert_close(output, expected["output"], dtype_name, "output")
    for name, got in zip(GRADS, grads):
        if expected[name] is None:
            assert got is None, f"grad_{name} should be None"
        else:
            assert_close(got, expected[name], dtype_name, f"grad_{name}")


@emulated
@pytest.mark.parametrize("case", ["grouped", "edges"])
def test_reference_forward_matches_loop_reference(case):
    """This file's vectorised reference against the loop-form one of tests/reference.py."""
    problem = Problem("float64", **CASES[case])
    loop = deform_conv2d_reference(
        *problem.arrays(), stride=problem.stride, padding=problem.padding, dilation=problem.dilation
    )
    np.testing.assert_allclose(problem.reference()["output"], loop, rtol=1e-13, atol=1e-13)


@emulated
def test_reference_gradients_match_finite_differences():
    """The reference's backward is the derivative of its forward (away from the kinks)."""
    problem = Problem("float64", **{**CASES["grouped"], "with_bias": True})
    rng = np.random.default_rng(11)
    problem.offset = problem.offset + rng.uniform(0.05, 0.2, problem.offset.shape)  # off-grid
    expected = problem.reference()
    names = ("input", "offset", "weight", "mask", "bias")

    def loss(**changed):
        args = {n: getattr(problem, n) for n in names} | changed
        out = reference(
            args["input"],
            args["offset"],
            args["weight"],
            args["bias"],
            args["mask"],
            problem.grad_output,
            problem.geom,
        )["output"]
        return float(np.sum(out * problem.grad_output))

    h = 1e-6
    for name in names:
        value = getattr(problem, name)
        direction = rng.standard_normal(value.shape)
        numeric = (
            loss(**{name: value + h * direction}) - loss(**{name: value - h * direction})
        ) / (2 * h)
        analytic = float(np.sum(expected[name] * direction))
        assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-6), name


# ---------------------------------------------------------------------------- the shim


_CONVERSIONS = r"""
extern "C" void half_to_float(const unsigned short* in, float* out, long n) {
  for (long i = 0; i < n; ++i) { __half h; h.__x = in[i]; out[i] = __half2float(h); }
}
extern "C" void float_to_half(const float* in, unsigned short* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = __float2half_rn(in[i]).__x;
}
extern "C" void bfloat16_to_float(const unsigned short* in, float* out, long n) {
  for (long i = 0; i < n; ++i) { __nv_bfloat16 h; h.__x = in[i]; out[i] = __bfloat162float(h); }
}
extern "C" void float_to_bfloat16(const float* in, unsigned short* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(in[i]).__x;
}
"""


def _call(library, name, source, out_dtype):
    out = np.empty(source.shape, out_dtype)
    getattr(library, name)(
        ctypes.c_void_p(source.ctypes.data),
        ctypes.c_void_p(out.ctypes.data),
        ctypes.c_long(source.size),
    )
    return out


def _float32_probes(sixteen_bit_as_float32):
    """Every value of a 16-bit format, its float32 neighbours, the exact midpoints between
    consecutive values (ties) and theirs, random float32 bit patterns and specials."""
    values = np.unique(
        sixteen_bit_as_float32[np.isfinite(sixteen_bit_as_float32)].astype(np.float64)
    )
    mids = ((values[:-1] + values[1:]) / 2).astype(np.float32)  # exact in float32
    exact = values.astype(np.float32)
    rng = np.random.default_rng(7)
    random_bits = rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32)
    specials = np.array(
        [
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            np.nan,
            -np.nan,
            65504.0,
            65519.996,
            65520.0,
            65536.0,
            2.0**-24,
            2.0**-25,
            2.0**-26,
            1.5 * 2.0**-25,
            2.0**-14,
            2.0**-14 - 2.0**-25,
            np.finfo(np.float32).max,
            np.finfo(np.float32).tiny,
            1e-45,
            3.3895314e38,
            3.4e38,
        ],
        dtype=np.float32,
    )
    pieces = [exact, mids, random_bits.view(np.float32), specials, -specials]
    for piece in (exact, mids):
        pieces += [
            np.nextafter(piece, np.float32(np.inf)),
            np.nextafter(piece, np.float32(-np.inf)),
        ]
    return np.ascontiguousarray(np.concatenate(pieces).astype(np.float32))


def _assert_same_bits(got_bits, expected_bits, dtype, inputs, what):
    got_nan = np.isnan(got_bits.view(dtype))
    exp_nan = np.isnan(expected_bits.view(dtype))
    np.testing.assert_array_equal(got_nan, exp_nan, err_msg=f"{what}: NaN-ness")
    bad = (got_bits != expected_bits) & ~exp_nan
    assert not bad.any(), (
        f"{what}: {bad.sum()} mismatches, e.g. input {inputs[bad][:5]!r} -> "
        f"{got_bits[bad][:5]} expected {expected_bits[bad][:5]}"
    )


@emulated
def test_shim_half_and_bfloat16_conversions_are_exact():
    library = build_library(shim_text() + _CONVERSIONS, what="the shim conversion test")
    every = np.arange(2**16, dtype=np.uint16)

    # 16-bit -> float32: every bit pattern
    for name, dtype in (("half_to_float", np.float16), ("bfloat16_to_float", ml_dtypes.bfloat16)):
        got = _call(library, name, every, np.float32)
        expected = every.view(dtype).astype(np.float32)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=name)
        ok = ~np.isnan(expected)
        np.testing.assert_array_equal(
            got[ok].view(np.uint32), expected[ok].view(np.uint32), err_msg=name
        )  # bitwise: signed zeros, subnormals

    # float32 -> 16-bit, round to nearest even, overflow, subnormals, NaN
    for name, dtype in (("float_to_half", np.float16), ("float_to_bfloat16", ml_dtypes.bfloat16)):
        probes = _float32_probes(every.view(dtype).astype(np.float32))
        got = _call(library, name, probes, np.uint16)
        with np.errstate(over="ignore", invalid="ignore"):
            expected = probes.astype(dtype).view(np.uint16)
        _assert_same_bits(got, expected, dtype, probes, name)
    assert _call(library, "float_to_half", np.array([np.nan], np.float32), np.uint16)[0] == 0x7FFF
    assert (
        _call(library, "float_to_bfloat16", np.array([np.nan], np.float32), np.uint16)[0] == 0x7FFF
    )


# ---------------------------------------------------------------------------- the launcher


@emulated
def test_launcher_checks_arguments(host_launcher):
    launcher = host_launcher
    a = np.zeros(8, np.float16)
    out = np.zeros(8, np.float32)
    launcher.launch("widen_to_acc", "float16", 32, 8, [a, out, 8])
    with pytest.raises(TypeError, match="dtype float32"):
        launcher.launch("widen_to_acc", "float16", 32, 8, [out, out.copy(), 8])
    with pytest.raises(ValueError, match="not C-contiguous"):
        launcher.launch("widen_to_acc", "float16", 32, 4, [a[::2], out[:4], 4])
    with pytest.raises(OverflowError, match="int32"):
        launcher.launch("widen_to_acc", "float16", 32, 8, [a, out, 2**31])
    with pytest.raises(TypeError, match="takes 3 arguments"):
        launcher.launch("widen_to_acc", "float16", 32, 8, [a, out])
    with pytest.raises(TypeError, match="must be an int"):
        launcher.launch("widen_to_acc", "float16", 32, 8, [a, out, 8.0])
    with pytest.raises(ValueError, match="overlaps"):
        launcher.launch("round_to_output", "float16", 32, 4, [out[:4], out[:2].view(np.float16), 4])
    launcher.launch("widen_to_acc", "float16", 32, 0, [None, None, 0])  # zero size: no-op


@emulated
def test_launcher_refuses_32bit_grid_stride_overflow(host_launcher):
    launcher = host_launcher
    """A 32-bit index near 2^31 would wrap in index += blockDim * gridDim (and loop on
    negative indices); the orchestration's limit keeps clear of it, the harness refuses it."""
    a = np.zeros(8, np.float16)
    out = np.zeros(8, np.float32)
    with pytest.raises(OverflowError, match="64-bit indices"):
        launcher.launch("widen_to_acc", "float16", 32, 2**31 - 1000, [a, out, 2**31 - 1000])
    grid, block = launch_config(INT32_INDEX_LIMIT)
    assert INT32_INDEX_LIMIT - 1 + grid * block <= 2**31 - 1
    assert index_bits_for_sizes(INT32_INDEX_LIMIT) == 32
    assert index_bits_for_sizes(INT32_INDEX_LIMIT + 1) == 64


@emulated
def test_checked_mode_reports_out_of_bounds(host_launcher):
    launcher = host_launcher
    src = np.arange(64, dtype=np.float16)
    short = np.zeros(40, np.float32)
    with pytest.raises(EmulatorFaultError, match=r"past the end of argument 1 .*element 40 of 40"):
        launcher.launch("widen_to_acc", "float16", 64, 64, [src, short, 64])
    big = np.zeros(64, np.float32)
    with pytest.raises(EmulatorFaultError, match=r"past the end of argument 0"):
        launcher.launch("widen_to_acc", "float16", 64, 64, [src[:10], big, 64])


@emulated
def test_grid_stride_loop_and_thread_order(host_launcher):
    launcher = host_launcher
    """Few blocks (each thread loops many times) and reversed thread order give the
    results of the GPU's configuration."""
    problem = Problem("float64", **CASES["grouped"])
    expected_out = run_forward(launcher, problem)
    expected_grads = run_backward(launcher, problem)
    for other in (HostLauncher(config=lambda total: (3, 7)), HostLauncher(reverse=True)):
        out = run_forward(other, problem)
        grads = run_backward(other, problem)
        np.testing.assert_allclose(out, expected_out, rtol=1e-13, atol=1e-13)
        for got, want in zip(grads, expected_grads):
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
        assert any(r.grid * r.block < r.total for r in other.launches) or other.reverse


# ---------------------------------------------------------------------------- deform_conv2d


@pytest.mark.parametrize("index_bits", [None, 64], ids=["auto-index", "index64"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_every_gradient_match_reference(launcher, case, dtype_name, index_bits):
    problem = Problem(dtype_name, **CASES[case])
    before = [None if a is None else a.copy() for a in (*problem.arrays(), problem.grad_output)]
    start = len(launcher.launches)
    output = run_forward(launcher, problem, index_bits=index_bits)
    grads = run_backward(launcher, problem, index_bits=index_bits)
    expected = problem.expected()
    check_all(problem, output, grads, expected)
    if index_bits is None:  # the NumPy backend, against the same reference and bound
        check_all(
            problem,
            numpy_conv.conv_forward(*problem.arrays(), problem.geom, workspace_bytes=BIG_WORKSPACE),
            tuple(
                numpy_conv.conv_backward(
                    problem.grad_output,
                    problem.input,
                    problem.offset,
                    problem.weight,
                    problem.mask,
                    problem.geom,
                    wrt=frozenset(GRADS),
                    workspace_bytes=BIG_WORKSPACE,
                )
            ),
            expected,
        )
    used_bits = {r.index_bits for r in launcher.launches[start:]}
    assert used_bits == {index_bits or 32}
    for a, b in zip((*problem.arrays(), problem.grad_output), before):  # inputs untouched
        if a is not None:
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_chunking(launcher, dtype_name):
    """chunk = 1 (tiny workspace) and a chunk of 2 that does not divide the batch of 5."""
    problem = Problem(dtype_name, **{**CASES["grouped"], "batch": 5})
    expected = problem.expected()
    geom = problem.geom
    pixels = geom.out_h * geom.out_w
    # the columns, in the element dtype (the GEMM writes the output in place)
    per_image_forward = geom.column_rows * pixels * dtype_of(dtype_name).itemsize
    for workspace, chunk in ((1, 1), (2 * per_image_forward + 7, 2)):
        start = len(launcher.launches)
        output = run_forward(launcher, problem, workspace_bytes=workspace)
        im2col = [r for r in launcher.launches[start:] if r.kernel == "deform_conv_im2col"]
        assert [r.total // (geom.in_channels * pixels) for r in im2col] == [
            min(chunk, 5 - s) for s in range(0, 5, chunk)
        ]
        grads = run_backward(launcher, problem, workspace_bytes=workspace)
        check_all(problem, output, grads, expected)


def test_chunking_backward_chunk_of_two(launcher):
    """Backward's own per-image estimate: a workspace for two images, batch 5."""
    problem = Problem("float64", **{**CASES["square"], "batch": 5})
    geom = problem.geom
    pixels = geom.out_h * geom.out_w
    per_image = geom.column_rows * pixels * 2 * 8  # columns and grad_columns
    start = len(launcher.launches)
    grads = run_backward(launcher, problem, workspace_bytes=2 * per_image + 3)
    coord = [r.total for r in launcher.launches[start:] if r.kernel == "deform_conv_col2im_coord"]
    per = geom.offset_groups * geom.taps * pixels
    assert coord == [2 * per, 2 * per, per]
    check_all(problem, run_forward(launcher, problem), grads, problem.expected())


@pytest.mark.parametrize("with_mask", [True, False])
def test_wrt_subsets(launcher, with_mask):
    problem = Problem("float32", **{**CASES["square"], "with_mask": with_mask})
    expected = problem.expected()
    kernels_needed = {
        "input": {"deform_conv_col2im_input_tiled"},  # its tile fits shared memory
        "offset": {"deform_conv_col2im_coord"},
        "mask": {"deform_conv_col2im_coord"} if with_mask else set(),
        "weight": {"deform_conv_im2col"},
        "bias": set(),
    }
    subsets = [frozenset(s) for r in range(0, 3) for s in itertools.combinations(GRADS, r)]
    for wrt in subsets:
        start = len(launcher.launches)
        grads = run_backward(launcher, problem, wrt=wrt)
        for name, got in zip(GRADS, grads):
            if name in wrt and expected[name] is not None:
                assert_close(got, expected[name], "float32", f"grad_{name} of wrt={set(wrt)}")
            else:
                assert got is None, f"grad_{name} computed for wrt={set(wrt)}"
        launched = {r.kernel for r in launcher.launches[start:]}
        assert launched == set().union(*(kernels_needed[n] for n in wrt)), (wrt, launched)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_batch_zero(launcher, dtype_name):
    problem = Problem(dtype_name, **{**CASES["grouped"], "batch": 0})
    start = len(launcher.launches)
    output = run_forward(launcher, problem)
    assert output.shape == problem.geom.output_shape and output.dtype == problem.input.dtype
    grads = run_backward(launcher, problem)
    shapes = (
        problem.geom.input_shape,
        problem.geom.offset_shape,
        problem.geom.weight_shape,
        problem.geom.mask_shape,
        (problem.geom.out_channels,),
    )
    for got, shape in zip(grads, shapes):
        assert got.shape == shape and got.dtype == problem.input.dtype
    assert not np.any(grads.grad_weight.astype(np.float64))
    assert not np.any(grads.grad_bias.astype(np.float64))
    assert all(r.total == 0 for r in launcher.launches[start:] if r.kernel.startswith("deform"))


def test_odd_batch_and_noncontiguous_inputs(launcher):
    problem = Problem("float64", **{**CASES["grouped"], "batch": 3})
    expected = problem.expected()
    views = {
        name: strided_copy(launcher.xp, getattr(problem, name))
        for name in ("input", "offset", "weight", "mask", "grad_output")
    }
    assert not views["input"].flags.c_contiguous
    output = to_numpy(
        _conv_kernels.conv_forward(
            launcher,
            views["input"],
            views["offset"],
            views["weight"],
            on_device(launcher, problem.bias),
            views["mask"],
            problem.geom,
            dtype_name="float64",
            workspace_bytes=BIG_WORKSPACE,
        )
    )
    grads = _conv_kernels.conv_backward(
        launcher,
        views["grad_output"],
        views["input"],
        views["offset"],
        views["weight"],
        views["mask"],
        problem.geom,
        dtype_name="float64",
        wrt=frozenset(GRADS),
        workspace_bytes=BIG_WORKSPACE,
    )
    check_all(problem, output, [to_numpy(g) for g in grads], expected)


@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_nan_offsets_give_nan(launcher, dtype_name):
    problem = Problem(dtype_name, **CASES["square"])
    geom = problem.geom
    offset = problem.offset.copy()
    k = 4  # centre tap: always near the map
    offset[1, 2 * k, 2, 3] = np.nan  # dy of image 1, pixel (2, 3)
    offset[0, 2 * k + 1, 0, 0] = np.nan  # dx of image 0, pixel (0, 0)
    problem.offset = offset
    output = run_forward(launcher, problem)
    grads = run_backward(launcher, problem)
    expected = problem.expected()
    nan_pixels = np.zeros(geom.output_shape, bool)
    nan_pixels[1, :, 2, 3] = nan_pixels[0, :, 0, 0] = True
    assert np.array_equal(np.isnan(output.astype(np.float64)), nan_pixels)
    assert np.isnan(expected["output"][0][nan_pixels]).all()
    check_all(problem, output, grads, expected)
    assert np.isnan(grads.grad_offset.astype(np.float64)[1, 2 * k : 2 * k + 2, 2, 3]).all()
    assert np.isnan(grads.grad_mask.astype(np.float64)[1, k, 2, 3])


@emulated
def test_undefined_behaviour_sanitizer(host_launcher):
    """One problem per index width under UBSan (integer overflow, float->int overflow...)."""
    sanitized = HostLauncher(sanitize="undefined")
    problem = Problem("float32", **CASES["edges"])
    spec = conv_specialisation(problem.geom)  # build just the one specialisation it runs
    sanitized.prebuild([("deform_conv_im2col", "float32", bits, spec) for bits in (32, 64)])
    for bits in (None, 64):
        output = run_forward(sanitized, problem, index_bits=bits)
        grads = run_backward(sanitized, problem, index_bits=bits)
        check_all(problem, output, grads, problem.expected())


@pytest.mark.parametrize("padding_mode", ["border", "reflection"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_padding_modes_match_numpy_backend(launcher, dtype_name, padding_mode):
    """border / reflection (the reference above is for zeros): the kernels against the
    NumPy backend on every case, edge targets included; the error scale of each tensor is
    its largest magnitude."""
    for case in sorted(CASES):
        problem = Problem(dtype_name, padding_mode=padding_mode, **CASES[case])
        got = (run_forward(launcher, problem), *run_backward(launcher, problem))
        want = (
            numpy_conv.conv_forward(*problem.arrays(), problem.geom, workspace_bytes=BIG_WORKSPACE),
            *numpy_conv.conv_backward(
                problem.grad_output,
                problem.input,
                problem.offset,
                problem.weight,
                problem.mask,
                problem.geom,
                wrt=frozenset(GRADS),
                workspace_bytes=BIG_WORKSPACE,
            ),
        )
        for name, a, b in zip(("output", *GRADS), got, want):
            if b is None:
                assert a is None, f"grad_{name} should be None"
                continue
            ref = b.astype(np.float64)
            scale = np.max(np.abs(ref[np.isfinite(ref)]), initial=0.0)
            assert_close(
                a,
                (ref, np.full(ref.shape, scale)),
                dtype_name,
                f"{name} ({case}, {padding_mode})",
                roundings=2,
            )
