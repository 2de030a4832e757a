"""deform_conv2d's sampling kernels one by one (cupydcn/cuda/kernels/deform_conv.cu through
cupydcn/deform_conv/cuda_kernels.py), run by the emulator and, with the ``launcher``
fixture's ``cupy`` variant, on a GPU.

Each kernel of each specialisation (kernel_h, kernel_w, padding mode) is compared with a
float64 reference of the columns, grad_input, grad_offset and grad_mask written here from
docs/semantics.md §1 and §4 (the reference itself is checked against the NumPy backend),
over whole images and ranges of output pixels. The tiled grad_input is also compared with
the grid-stride one, bit for bit on exactly representable data, with offsets that throw
samples out of its shared window and out of the map, and run in reverse and shuffled
thread orders (the emulator's missing-barrier check).

Compile budget: every (dtype, index width, specialisation) is one host build of
deform_conv.cu. Every dtype and index width runs on the 3x3 and the any-size
specialisations; 1x1, 5x5, border and reflection run on (float32, 32-bit) and (float64,
64-bit): 24 builds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from cupydcn.cuda.kernel_source import specialisations
from cupydcn.cuda.launch import kernel_types
from cupydcn.deform_conv import cuda_kernels
from cupydcn.deform_conv import numpy_backend as numpy_conv
from cupydcn.deform_conv.padding import cell_floor, map_coordinates
from cupydcn.deform_conv.spec import conv_geometry
from support import (
    DTYPE_NAMES,
    assert_close_to_sum,
    dtype_of,
    on_device,
    seeded,
    to_numpy,
)

emulated = pytest.mark.emulated

# ---------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Case:
    """A conv geometry and how its offsets are drawn."""

    kernel: tuple[int, int]
    channels: int
    offset_groups: int
    size: tuple[int, int]
    batch: int = 2
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    with_mask: bool = True
    padding_mode: str = "zeros"
    offset_scale: float = 2.0
    edge_points: bool = False  # some points at +-1e4, +-inf, NaN, on the map's edges


CASES = {
    # C / G = 10: ragged im2col slabs (8 + 2) and tiled slabs; 9 x 11 output: ragged
    # tiles in both directions.
    "3x3": Case((3, 3), channels=20, offset_groups=2, size=(9, 11)),
    # non-square kernel (the any-size specialisation), H/W-specific stride, padding and
    # dilation, 3 offset groups, no mask.
    "2x3": Case(
        (2, 3),
        channels=9,
        offset_groups=3,
        size=(8, 10),
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        with_mask=False,
        batch=3,
    ),
    "1x1": Case((1, 1), channels=16, offset_groups=1, size=(7, 9), stride=(2, 2), padding=(0, 0)),
    "5x5": Case((5, 5), channels=10, offset_groups=2, size=(9, 8), padding=(2, 3), dilation=(1, 2)),
    # offsets far beyond the tiled kernel's halo, and points out of the map and non-finite
    "far": Case(
        (3, 3), channels=6, offset_groups=1, size=(7, 8), offset_scale=7.0, edge_points=True
    ),
}
BORDER_CASES = {
    mode: Case(
        (3, 3), channels=10, offset_groups=2, size=(6, 7), padding_mode=mode, offset_scale=4.0
    )
    for mode in ("border", "reflection")
}


@dataclass
class Problem:
    """Inputs of the sampling kernels in ``dtype_name``, and the geometry."""

    case: Case
    dtype_name: str
    seed: int = 0
    dyadic: bool = False  # every value exact in float16: sums exact in any order
    arrays: dict = field(init=False)

    def __post_init__(self):
        case = self.case
        rng = seeded(case, self.dtype_name, self.seed, self.dyadic)
        dtype = dtype_of(self.dtype_name)
        H, W = case.size
        kh, kw = case.kernel
        (sh, sw), (ph, pw), (dh, dw) = case.stride, case.padding, case.dilation
        out_h = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
        out_w = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
        taps, G, n = kh * kw, case.offset_groups, case.batch
        grain = 4 if self.dyadic else 1024  # offsets in multiples of 1 / grain
        offset = rng.uniform(-case.offset_scale, case.offset_scale, (n, 2 * G * taps, out_h, out_w))
        offset = np.round(offset * grain) / grain
        offset[rng.random(offset.shape) < 0.25] = 0.0  # integer points
        if case.edge_points:
            flat = offset.reshape(-1)
            picks = rng.choice(flat.size, 40, replace=False)
            flat[picks] = rng.choice([1e4, -1e4, np.inf, -np.inf, np.nan, -H - 1.0, H], 40)
        if self.dyadic:
            input = rng.integers(-8, 9, (n, case.channels, H, W)) / 8
            mask = rng.choice([0.5, 1.0, -1.0, 2.0], (n, G * taps, out_h, out_w))
        else:
            input = rng.standard_normal((n, case.channels, H, W))
            mask = rng.uniform(-0.5, 1.5, (n, G * taps, out_h, out_w))
        weight = np.zeros((1, case.channels, kh, kw))
        self.arrays = {
            "input": input.astype(dtype),
            "offset": offset.astype(dtype),
            "mask": mask.astype(dtype) if case.with_mask else None,
        }
        self.geom = conv_geometry(
            self.arrays["input"],
            self.arrays["offset"],
            weight.astype(dtype),
            None,
            self.arrays["mask"],
            stride=case.stride,
            padding=case.padding,
            dilation=case.dilation,
            padding_mode=case.padding_mode,
        )
        self.rng = rng

    def grad_columns(self, pixels: tuple[int, int]) -> np.ndarray:
        """grad_columns [n, C*K, S] in the accumulation dtype."""
        shape = (self.geom.batch, self.geom.column_rows, pixels[1])
        acc = np.float64 if self.dtype_name == "float64" else np.float32
        if self.dyadic:
            return (self.rng.integers(-16, 17, shape) / 16).astype(acc)
        return self.rng.standard_normal(shape).astype(acc)

    def whole(self) -> tuple[int, int]:
        return (0, self.geom.out_h * self.geom.out_w)


# ---------------------------------------------------------------------------- reference


def _axis(p: np.ndarray, size: int, mode: str):
    """Per coordinate (docs/semantics.md §4): cell floor (int), fraction, slope, NaN-ness.
    Non-finite points that are not NaN (zeros mode) are moved far outside the map."""
    mapped, slope = map_coordinates(np, p, size, mode)
    nan = np.isnan(mapped)
    safe = np.clip(np.where(np.isfinite(mapped), mapped, -10.0), -10.0, size + 10.0)
    floor = cell_floor(np, safe, size, mode)
    return floor.astype(np.int64), safe - floor, slope, nan


def sampling_reference(problem: Problem, pixels, grad_columns=None, *, magnitude=False) -> dict:
    """columns [n, C*K, S], and with ``grad_columns`` grad_input [n, C, H, W] and
    grad_offset / grad_mask (the range's pixels; elsewhere NaN) in float64, from
    docs/semantics.md §1.3-§1.6 and §4. With ``magnitude`` every term is replaced by its
    absolute value (the scale of the rounding errors)."""
    geom = problem.geom
    start, count = pixels
    n, C, H, W = geom.input_shape
    G, K, P = geom.offset_groups, geom.taps, geom.out_h * geom.out_w
    Cg = C // G
    x = problem.arrays["input"].astype(np.float64).reshape(n, G, Cg, H, W)
    off = problem.arrays["offset"].astype(np.float64).reshape(n, G, K, 2, P)
    off = off[..., start : start + count]
    mask = problem.arrays["mask"]
    m = (
        np.ones((n, G, K, count))
        if mask is None
        else mask.astype(np.float64).reshape(n, G, K, P)[..., start : start + count]
    )
    if magnitude:
        x, m = np.abs(x), np.abs(m)
    pix = np.arange(start, start + count)
    oy, ox = pix // geom.out_w, pix % geom.out_w
    i = np.repeat(np.arange(geom.kernel_h), geom.kernel_w)[:, None]
    j = np.tile(np.arange(geom.kernel_w), geom.kernel_h)[:, None]
    py = (oy * geom.stride_h - geom.pad_h + i * geom.dil_h) + off[:, :, :, 0]  # [n, G, K, S]
    px = (ox * geom.stride_w - geom.pad_w + j * geom.dil_w) + off[:, :, :, 1]
    fy, ly, slope_y, nan_y = _axis(py, H, geom.padding_mode)
    fx, lx, slope_x, nan_x = _axis(px, W, geom.padding_mode)
    nan = nan_y | nan_x
    n_idx = np.arange(n)[:, None, None, None]
    g_idx = np.arange(G)[None, :, None, None]
    value = np.zeros((n, G, K, count, Cg))
    d_dy = np.zeros_like(value)
    d_dx = np.zeros_like(value)
    corners = []
    for a, b in itertools.product((0, 1), repeat=2):
        qy, qx = fy + a, fx + b
        inside = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
        wy = ly if a else 1 - ly
        wx = lx if b else 1 - lx
        v = x[n_idx, g_idx, :, np.clip(qy, 0, H - 1), np.clip(qx, 0, W - 1)]
        v = np.where(inside[..., None], v, 0.0)
        sy = 1 if a or magnitude else -1
        sx = 1 if b or magnitude else -1
        value += (wy * wx)[..., None] * v
        d_dy += (sy * wx)[..., None] * v
        d_dx += (sx * wy)[..., None] * v
        corners.append((inside & ~nan, wy * wx, qy, qx))
    for t in (value, d_dy, d_dx):
        t[nan] = np.nan

    def rows(t):  # [n, G, K, S, Cg] -> [n, C*K, S]
        return np.moveaxis(t, -1, 2).reshape(n, C * K, count)

    result = {"columns": rows(value * m[..., None])}
    if grad_columns is None:
        return result
    gc = grad_columns.astype(np.float64).reshape(n, G, Cg, K, count)
    gc = np.moveaxis(gc, 2, -1)  # [n, G, K, S, Cg]
    if magnitude:
        gc = np.abs(gc)
        slope_y, slope_x = np.abs(slope_y), np.abs(slope_x)
    grad_mask = np.full((n, G, K, P), np.nan)
    grad_mask[..., start : start + count] = (gc * value).sum(-1)
    grad_offset = np.full((n, G, K, 2, P), np.nan)
    grad_offset[:, :, :, 0, start : start + count] = m * slope_y * (gc * d_dy).sum(-1)
    grad_offset[:, :, :, 1, start : start + count] = m * slope_x * (gc * d_dx).sum(-1)
    grad_input = np.zeros(n * C * H * W)
    c_idx = np.arange(Cg)
    for inside, weight, qy, qx in corners:
        contrib = (weight * inside * m)[..., None] * np.where(nan[..., None], 0.0, gc)
        plane = (n_idx * G + g_idx)[..., None] * Cg + c_idx  # [n, G, 1, 1, Cg]
        flat = (plane * H + np.clip(qy, 0, H - 1)[..., None]) * W + np.clip(qx, 0, W - 1)[..., None]
        grad_input += np.bincount(flat.ravel(), contrib.ravel(), minlength=grad_input.size)
    result.update(
        grad_input=grad_input.reshape(geom.input_shape),
        grad_offset=grad_offset.reshape(geom.offset_shape),
        grad_mask=grad_mask.reshape(geom.mask_shape)
        if problem.arrays["mask"] is not None
        else None,
    )
    return result


def expected(problem: Problem, pixels, grad_columns=None) -> dict:
    """name -> (reference, magnitude)."""
    ref = sampling_reference(problem, pixels, grad_columns)
    mag = sampling_reference(problem, pixels, grad_columns, magnitude=True)
    return {k: (ref[k], mag[k]) for k in ref if ref[k] is not None}


def check(name, got, want, dtype_name, *, roundings=1):
    ref, magnitude = want
    assert_close_to_sum(
        got,
        ref,
        np.nan_to_num(magnitude, nan=0.0, posinf=0.0),
        dtype_name,
        name,
        roundings=roundings,
        dtype_checked=False,
        with_floor=True,
    )


# ---------------------------------------------------------------------------- running


def _types(launcher, problem: Problem, index_bits: int):
    return kernel_types(launcher, problem.dtype_name, index_bits)


def run_im2col(launcher, problem, index_bits, pixels, shape=None):
    """The kernel's columns [n, C*K, S] (NumPy)."""
    geom = problem.geom
    shape = shape or cuda_kernels.im2col_shape(geom, problem.dtype_name, geom.batch, pixels)
    types = _types(launcher, problem, index_bits)
    columns = launcher.xp.empty(
        (geom.batch, geom.column_rows, pixels[1]),
        dtype=cuda_kernels.column_dtype(launcher, types),
    )
    input, offset, mask = on_device(launcher, *problem.arrays.values())
    cuda_kernels.launch_shaped(
        launcher, types, geom, shape, input=input, offset=offset, mask=mask, columns=columns
    )
    return to_numpy(columns)


def run_col2im_input(launcher, problem, index_bits, pixels, grad_columns, shape=None):
    """The kernel's grad_input [n, C, H, W] (accumulation dtype, NumPy), from zeros."""
    geom = problem.geom
    shape = shape or cuda_kernels.col2im_input_shape(geom, problem.dtype_name, geom.batch, pixels)
    types = _types(launcher, problem, index_bits)
    grad_input = launcher.xp.zeros(geom.input_shape, dtype=types.acc_dtype)
    offset, mask, gc = on_device(
        launcher, problem.arrays["offset"], problem.arrays["mask"], grad_columns
    )
    cuda_kernels.launch_shaped(
        launcher,
        types,
        geom,
        shape,
        grad_columns=gc,
        offset=offset,
        mask=mask,
        grad_input=grad_input,
    )
    return to_numpy(grad_input)


def run_col2im_coord(launcher, problem, index_bits, pixels, grad_columns, shape=None):
    """The kernel's (grad_offset, grad_mask) (NumPy; NaN outside the range's pixels)."""
    geom = problem.geom
    shape = shape or cuda_kernels.col2im_coord_shape(geom, problem.dtype_name, geom.batch, pixels)
    types = _types(launcher, problem, index_bits)
    xp = launcher.xp
    dtype = problem.arrays["input"].dtype
    grad_offset = xp.asarray(np.full(geom.offset_shape, np.nan, dtype))
    has_mask = problem.arrays["mask"] is not None
    grad_mask = xp.asarray(np.full(geom.mask_shape, np.nan, dtype)) if has_mask else None
    input, offset, mask, gc = on_device(launcher, *problem.arrays.values(), grad_columns)
    cuda_kernels.launch_shaped(
        launcher,
        types,
        geom,
        shape,
        grad_columns=gc,
        input=input,
        offset=offset,
        mask=mask,
        grad_offset=grad_offset,
        grad_mask=grad_mask,
    )
    return to_numpy(grad_offset), to_numpy(grad_mask)


def check_all_kernels(launcher, problem, index_bits, pixels, template_args=None):
    """The three kernels (grad_input tiled and grid-stride) against the reference."""
    geom, dtype_name = problem.geom, problem.dtype_name
    n = geom.batch

    def shaped(shape):
        return shape if template_args is None else shape._replace(template_args=template_args)

    gc = problem.grad_columns(pixels)
    want = expected(problem, pixels, gc)
    columns = run_im2col(
        launcher,
        problem,
        index_bits,
        pixels,
        shaped(cuda_kernels.im2col_shape(geom, dtype_name, n, pixels)),
    )
    assert columns.dtype == problem.arrays["input"].dtype
    check("columns", columns, want["columns"], dtype_name)
    tiled = cuda_kernels.col2im_input_shape(geom, dtype_name, n, pixels)
    assert tiled.kernel == "deform_conv_col2im_input_tiled"
    fallback = cuda_kernels.col2im_input_shape(geom, dtype_name, n, pixels, tiling=None)
    for shape in (tiled, fallback):
        got = run_col2im_input(launcher, problem, index_bits, pixels, gc, shaped(shape))
        check(f"grad_input ({shape.kernel})", got, want["grad_input"], dtype_name, roundings=0)
    grad_offset, grad_mask = run_col2im_coord(
        launcher,
        problem,
        index_bits,
        pixels,
        gc,
        shaped(cuda_kernels.col2im_coord_shape(geom, dtype_name, n, pixels)),
    )
    check("grad_offset", grad_offset, want["grad_offset"], dtype_name)
    if "grad_mask" in want:
        check("grad_mask", grad_mask, want["grad_mask"], dtype_name)
    else:
        assert grad_mask is None


def _range_of(geom, fraction_start, fraction_count):
    """A pixel range starting and ending inside output rows."""
    pixels = geom.out_h * geom.out_w
    start = int(pixels * fraction_start) | 1
    return start, max(1, min(pixels - start, int(pixels * fraction_count)))


# ---------------------------------------------------------------------------- the reference


@emulated
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("case", ["3x3", "2x3", "far"])
def test_reference_columns_match_numpy_backend(case, padding_mode):
    """The reference's columns are the NumPy backend's: its forward with a weight that
    picks each (channel, tap) into an output channel of its own."""
    problem = Problem(replace(CASES[case], padding_mode=padding_mode), "float64")
    geom = problem.geom
    C, K = geom.in_channels, geom.taps
    eye = np.eye(C * K).reshape(C * K, C, geom.kernel_h, geom.kernel_w)
    a = problem.arrays
    weight_geom = conv_geometry(
        a["input"],
        a["offset"],
        eye,
        None,
        a["mask"],
        stride=problem.case.stride,
        padding=problem.case.padding,
        dilation=problem.case.dilation,
        padding_mode=padding_mode,
    )
    out = numpy_conv.conv_forward(
        a["input"], a["offset"], eye, None, a["mask"], weight_geom, workspace_bytes=1 << 30
    )
    ref = sampling_reference(problem, problem.whole())["columns"]
    out = out.reshape(ref.shape)
    # a NaN column element makes every output of its pixel NaN (NaN * 0 in the GEMM)
    nan_pixels = np.isnan(ref).any(axis=1, keepdims=True)
    assert np.isnan(out[np.broadcast_to(nan_pixels, out.shape)]).all()
    keep = np.broadcast_to(~nan_pixels, out.shape)
    np.testing.assert_allclose(out[keep], ref[keep], rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------- the kernels


@pytest.mark.parametrize("index_bits", [32, 64])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("case", ["3x3", "2x3"])
def test_kernels_match_reference(launcher, case, dtype_name, index_bits):
    """The 3x3 and the any-size specialisations, every dtype and index width: whole
    images, then a range of output pixels starting and ending mid-row."""
    problem = Problem(CASES[case], dtype_name)
    assert cuda_kernels.conv_specialisation(problem.geom) == (
        (3, 3, 0) if case == "3x3" else (0, 0, 0)
    )
    check_all_kernels(launcher, problem, index_bits, problem.whole())
    check_all_kernels(launcher, problem, index_bits, _range_of(problem.geom, 0.3, 0.45))


@pytest.mark.parametrize("index_bits", [32, 64])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_any_size_kernels_on_a_3x3_problem(launcher, dtype_name, index_bits):
    """The any-size specialisation computes what the 3x3 one does (runtime kernel size)."""
    problem = Problem(CASES["3x3"], dtype_name, seed=1)
    check_all_kernels(launcher, problem, index_bits, problem.whole(), template_args=(0, 0, 0))


OTHER_SPECIALISATIONS = [("1x1", CASES["1x1"]), ("5x5", CASES["5x5"])] + [
    (mode, case) for mode, case in BORDER_CASES.items()
]


@pytest.mark.parametrize(
    "dtype_name, index_bits", [("float32", 32), ("float64", 64)], ids=["f32-i32", "f64-i64"]
)
@pytest.mark.parametrize(
    "name, case", OTHER_SPECIALISATIONS, ids=[n for n, _ in OTHER_SPECIALISATIONS]
)
def test_other_specialisations_match_reference(launcher, name, case, dtype_name, index_bits):
    """1x1 and 5x5 (zeros), border and reflection (any size): whole and ranged."""
    problem = Problem(case, dtype_name)
    spec = cuda_kernels.conv_specialisation(problem.geom)
    assert spec in specialisations("deform_conv.cu")
    assert spec[:2] == (case.kernel if case.padding_mode == "zeros" else (0, 0))
    check_all_kernels(launcher, problem, index_bits, problem.whole())
    check_all_kernels(launcher, problem, index_bits, _range_of(problem.geom, 0.2, 0.5))


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_far_offsets_and_points_out_of_the_map(launcher, dtype_name):
    """Offsets up to 7 pixels (beyond the tiled kernel's halo: global atomics), points at
    +-1e4, +-inf and NaN, on the map's edges."""
    problem = Problem(CASES["far"], dtype_name)
    bits = 32 if dtype_name == "float32" else 64
    tiling = cuda_kernels.col2im_tiling(problem.geom, dtype_name)
    assert tiling is not None and tiling.halo < problem.case.offset_scale
    check_all_kernels(launcher, problem, bits, problem.whole())
    check_all_kernels(launcher, problem, bits, _range_of(problem.geom, 0.4, 0.3))


def test_small_grids_loop_over_slabs_and_images(launcher):
    """grid.y and grid.z smaller than the slabs / images to cover (as past CUDA's 65535):
    the kernels loop over the rest."""
    problem = Problem(CASES["3x3"], "float32", seed=2)
    geom, pixels = problem.geom, problem.whole()
    gc = problem.grad_columns(pixels)
    want = expected(problem, pixels, gc)
    n = geom.batch

    def shrunk(shape):
        return shape._replace(grid=(shape.grid[0], 1, 1))

    columns = run_im2col(
        launcher, problem, 32, pixels, shrunk(cuda_kernels.im2col_shape(geom, "float32", n, pixels))
    )
    check("columns", columns, want["columns"], "float32")
    tiled = shrunk(cuda_kernels.col2im_input_shape(geom, "float32", n, pixels))
    check(
        "grad_input",
        run_col2im_input(launcher, problem, 32, pixels, gc, tiled),
        want["grad_input"],
        "float32",
        roundings=0,
    )
    coord = shrunk(cuda_kernels.col2im_coord_shape(geom, "float32", n, pixels))
    grad_offset, grad_mask = run_col2im_coord(launcher, problem, 32, pixels, gc, coord)
    check("grad_offset", grad_offset, want["grad_offset"], "float32")
    check("grad_mask", grad_mask, want["grad_mask"], "float32")


def test_coord_channel_split(launcher):
    """col2im_coord with the channels of a pixel split over 8 threads (few pixels, many
    channels), its sums added in shared memory."""
    case = Case((3, 3), channels=64, offset_groups=1, size=(3, 4), batch=1)
    problem = Problem(case, "float32")
    geom, pixels = problem.geom, problem.whole()
    shape = cuda_kernels.col2im_coord_shape(geom, "float32", 1, pixels)
    assert shape.block[1] == 8  # 108 items, 64 channels: 8 per thread
    gc = problem.grad_columns(pixels)
    want = expected(problem, pixels, gc)
    grad_offset, grad_mask = run_col2im_coord(launcher, problem, 32, pixels, gc, shape)
    check("grad_offset", grad_offset, want["grad_offset"], "float32")
    check("grad_mask", grad_mask, want["grad_mask"], "float32")


@pytest.mark.parametrize("case", ["3x3", "far", "2x3"])
def test_tiled_grad_input_equals_grid_stride_on_exact_data(launcher, case):
    """On data whose every product and sum is exact in float32 (dyadic inputs, masks and
    offsets in quarters), the tiled grad_input is bitwise the grid-stride one and the
    reference, whatever the order of the atomics."""
    problem = Problem(CASES[case], "float32", dyadic=True)
    geom = problem.geom
    for pixels in (problem.whole(), _range_of(geom, 0.25, 0.5)):
        gc = problem.grad_columns(pixels)
        tiled = cuda_kernels.col2im_input_shape(geom, "float32", geom.batch, pixels)
        fallback = cuda_kernels.col2im_input_shape(geom, "float32", geom.batch, pixels, tiling=None)
        got = run_col2im_input(launcher, problem, 32, pixels, gc, tiled)
        want = run_col2im_input(launcher, problem, 32, pixels, gc, fallback)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, sampling_reference(problem, pixels, gc)["grad_input"])


# ---------------------------------------------------------------------------- thread order


@emulated
@pytest.mark.parametrize("case", ["3x3", "far"])
def test_cooperative_kernels_do_not_depend_on_thread_order(case):
    """The tiled grad_input (exact data: its atomics' order cannot round differently) and
    col2im_coord with a channel split, in forward, reverse and shuffled orders of blocks,
    threads and fibers after each barrier: bitwise equal (no missing barrier)."""
    from emulator.host_launcher import assert_order_independent

    problem = Problem(CASES[case], "float32", dyadic=True)
    geom = problem.geom
    pixels = _range_of(geom, 0.1, 0.8)
    gc = problem.grad_columns(pixels)
    # grids smaller than the slabs and images: each block loops, reusing its window
    tiled = cuda_kernels.col2im_input_shape(geom, "float32", geom.batch, pixels)
    tiled = tiled._replace(grid=(tiled.grid[0], 1, 1))
    coord = cuda_kernels.col2im_coord_shape(geom, "float32", geom.batch, pixels)
    coord = coord._replace(block=(32, 2, 1), grid=(-(-pixels[1] // 32), 3, 1))  # split, loops

    def run(launcher):
        grad_offset, grad_mask = run_col2im_coord(launcher, problem, 32, pixels, gc, coord)
        return {
            "grad_input": run_col2im_input(launcher, problem, 32, pixels, gc, tiled),
            "grad_offset": grad_offset,
            "grad_mask": grad_mask,
        }

    assert_order_independent(run)


# ---------------------------------------------------------------------------- launch shapes


def _geometry(**overrides):
    """A geometry of the given sizes (arrays of zeros: shapes only)."""
    sizes = dict(
        batch=2, channels=256, size=(64, 64), kernel=(3, 3), stride=1, padding=1, dilation=1
    )
    sizes.update(overrides)
    H, W = sizes["size"]
    kh, kw = sizes["kernel"]
    s, p, d = (
        sizes[k] if isinstance(sizes[k], tuple) else (sizes[k],) * 2
        for k in ("stride", "padding", "dilation")
    )
    out_h = (H + 2 * p[0] - (d[0] * (kh - 1) + 1)) // s[0] + 1
    out_w = (W + 2 * p[1] - (d[1] * (kw - 1) + 1)) // s[1] + 1
    shape = np.lib.stride_tricks.as_strided
    zero = np.zeros((), np.float32)
    n, C = sizes["batch"], sizes["channels"]
    return conv_geometry(
        shape(zero, (n, C, H, W), (0,) * 4),
        shape(zero, (n, 2 * kh * kw, out_h, out_w), (0,) * 4),
        shape(zero, (1, C, kh, kw), (0,) * 4),
        None,
        None,
        stride=s,
        padding=p,
        dilation=d,
        padding_mode=sizes.get("padding_mode", "zeros"),
    )


@emulated
def test_launch_shapes():
    """The reported launches: specialisation, grid caps, shared memory, the tiled
    grad_input's tiling and its fallback."""
    geom = _geometry(batch=70000, channels=16)
    im2col, col2im, coord = cuda_kernels.launch_shapes(geom, "float32", geom.batch)
    assert im2col.template_args == col2im.template_args == coord.template_args == (3, 3, 0)
    assert im2col.block == (256, 1, 1) and im2col.grid == (16, 2, 65535)  # z capped
    assert im2col.shared_bytes == 0
    assert col2im.kernel == "deform_conv_col2im_input_tiled"
    assert col2im.block == (32, 8, 1) and col2im.grid == (2 * 8, 2, 65535)
    assert col2im.shared_bytes == cuda_kernels.WINDOW_BYTES
    assert col2im.sizes["channel_slab"] == 8 and col2im.sizes["halo"] == 2
    assert coord.grid == (16, 9, 65535) and coord.block == (256, 1, 1)
    assert coord.shared_bytes == 3 * 256 * 4
    # any size, border: the mode's any-size kernels
    assert cuda_kernels.conv_specialisation(_geometry(kernel=(3, 3), padding_mode="border")) == (
        0,
        0,
        1,
    )
    assert cuda_kernels.conv_specialisation(_geometry(kernel=(7, 7), padding=3)) == (0, 0, 0)
    # a window that cannot fit: the grid-stride kernel
    huge = _geometry(kernel=(3, 3), dilation=200, padding=200, size=(500, 500))
    assert cuda_kernels.col2im_tiling(huge, "float64") is None
    shape = cuda_kernels.col2im_input_shape(huge, "float64", 1)
    assert shape.kernel == "deform_conv_col2im_input" and shape.grid_stride
    # stride 2: a smaller tile keeps 4 channels per block
    strided = cuda_kernels.col2im_tiling(_geometry(stride=2), "float32")
    assert strided.slab >= 4
    # a pixel range: tiles cover its rows only
    ranged = cuda_kernels.col2im_input_shape(geom, "float32", 1, (64 * 10 + 5, 64 * 3))
    assert ranged.grid[0] == 1 * 2  # rows 10..13 in one tile row of 8, 2 tiles across
