"""The fused deform_conv2d kernels for the half types (cupydcn/cuda/kernels/deform_conv_fused.cu
through cupydcn/deform_conv/fused_cuda.py), run by the emulator and, with the ``launcher``
fixture's ``cupy`` variant, on a GPU.

What is checked, per case (tile edges: C_out 1, 17, 70, 130; output pixels 1, 42, 63, 65,
72; C / groups 8, 12, 13, 16, 40; groups 2; offset groups 2 and 4 within and across weight
groups; stride, dilation and padding different in H and W; a non-square kernel; every
padding mode; DCNv1; no bias; offsets far out of the map and NaN), in float16 and bfloat16
and both index widths:

* the columns the forward samples are bit for bit deform_conv_im2col's: with a one-hot
  weight (output row r of a group = its column row r) the output is the column buffer;
* the forward is within one rounding to T plus float32 accumulation (32 u_f32 of the sum
  of |weight| |column| + |bias|) of the float64 product of the weight and im2col's
  rounded columns, as the column path (cuda_backend, algorithm "im2col") is too, and
  within the usual bound of the float64 reference (columns unrounded,
  assert_close_with_rounded_columns);
* grad_weight (float32 accumulator) is within float32 accumulation of the float64
  grad_output @ rounded columns^T, for one split and several, and so is the column
  path's (rounded once more);
* the packing kernel reorders the weight exactly; launches and workspace as
  fused_cuda.launch_shapes says;
* emulator only: forward and grad_weight (one split) are bitwise the same in forward,
  reverse and shuffled thread orders (assert_order_independent: the shared-memory
  pipeline's barriers and cp.async waits).

Emulator builds: one g++ build of the file per (dtype, index width): 4, a few seconds
each; the emulated MMAs are a rendezvous of the warp, fast enough for these sizes.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from functools import partial

import numpy as np
import pytest

import fused_problems
from cupydcn.cuda.launch import kernel_types, record_calls
from cupydcn.deform_conv import cuda_backend, cuda_kernels, fused_cuda
from cupydcn.deform_conv.padding import cell_floor, map_coordinates
from fused_problems import BIG_WORKSPACE, TYPE_IDS, TYPES, Problem, problems_fixture
from reference import deform_conv2d_reference
from support import (
    assert_close_to_sum,
    assert_close_with_rounded_columns,
    dtype_of,
    on_device,
    to_numpy,
)

emulated = pytest.mark.emulated


# ---------------------------------------------------------------------------- problems


# Two images unless a case says.
Case = partial(fused_problems.Case, batch=2)
SEED = "fused"

CASES = {
    # 6 x 7 = 42 pixels (one ragged pixel tile), C_out 17 (one ragged warp row), C / g 16.
    "base": Case(16, 17, (6, 7)),
    # C / g 13 (padded to 16: zero channels), C_out 70, 9 x 8 = 72 pixels (two tiles).
    "c13-co70": Case(13, 70, (9, 8)),
    # one output pixel, C_out 1, C / g 8
    "p1-co1": Case(8, 1, (3, 3), padding=(0, 0), batch=3),
    # 63 and 65 pixels: the last tile one short of full, one past
    "p63": Case(8, 20, (7, 9)),
    "p65": Case(16, 17, (5, 13)),
    # groups 2 (C / g 8, M 17) with offset groups 2; non-square kernel, H/W-specific
    # stride, padding and dilation; DCNv1; no bias
    "groups2": Case(
        16,
        34,
        (9, 8),
        kernel=(2, 3),
        groups=2,
        offset_groups=2,
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        with_mask=False,
        with_bias=False,
    ),
    # one weight group over 2 and over 4 offset groups (channels of a step's octets in
    # different groups), and weight groups straddling offset groups (C 24, g 2, G 3)
    "og2": Case(16, 17, (6, 7), offset_groups=2),
    "og4": Case(32, 18, (5, 6), offset_groups=4, kernel=(1, 3), padding=(0, 1)),
    "straddle": Case(24, 18, (5, 6), groups=2, offset_groups=3),
    # C / g 40: a tap's steps are 32 and 16 channels; C_out 130: two output-channel tiles
    "c40-co130": Case(40, 130, (4, 5), batch=1),
    # 1 x 1 kernel, stride 2: one tap of two steps (32 + 8 channels padded to 16)
    "1x1": Case(40, 24, (9, 11), kernel=(1, 1), padding=(0, 0), stride=(2, 2)),
    "border": Case(16, 17, (6, 7), padding_mode="border", offset_scale=4.0),
    "reflection": Case(16, 17, (6, 7), padding_mode="reflection", offset_scale=4.0),
    "far": Case(8, 17, (7, 8), offset_scale=7.0, edge_points=True),
}
# (case, dtype, index width): every case in both half types and both index widths.
CHECKS = [(name, dtype_name, bits) for name in sorted(CASES) for dtype_name, bits in TYPES]
CHECK_IDS = [f"{n}-{d}-i{b}" for n, d, b in CHECKS]


problems = problems_fixture(CASES, SEED)


# ---------------------------------------------------------------------------- references


def _axis(p: np.ndarray, size: int, mode: str):
    """Cell floor (int), fraction and NaN-ness per coordinate (docs/semantics.md §4);
    non-finite points that are not NaN are moved far outside the map."""
    mapped, _ = map_coordinates(np, p, size, mode)
    nan = np.isnan(mapped)
    safe = np.clip(np.where(np.isfinite(mapped), mapped, -10.0), -10.0, size + 10.0)
    floor = cell_floor(np, safe, size, mode)
    return floor.astype(np.int64), safe - floor, nan


def columns_reference(problem: Problem, *, magnitude: bool = False) -> np.ndarray:
    """The columns [n, C*K, P] (row c*K + k) in float64, unrounded: mask * input sampled
    at each tap's point (docs/semantics.md §1.3-§1.4, §4); with ``magnitude`` |mask| *
    the blend of |input|."""
    geom = problem.geom
    n, C, H, W = geom.input_shape
    G, K, P = geom.offset_groups, geom.taps, geom.out_h * geom.out_w
    Cg = C // G
    x = problem.arrays["input"].astype(np.float64).reshape(n, G, Cg, H, W)
    off = problem.arrays["offset"].astype(np.float64).reshape(n, G, K, 2, P)
    mask = problem.arrays["mask"]
    m = np.ones((n, G, K, P)) if mask is None else mask.astype(np.float64).reshape(n, G, K, P)
    if magnitude:
        x, m = np.abs(x), np.abs(m)
    pix = np.arange(P)
    oy, ox = pix // geom.out_w, pix % geom.out_w
    i = np.repeat(np.arange(geom.kernel_h), geom.kernel_w)[:, None]
    j = np.tile(np.arange(geom.kernel_w), geom.kernel_h)[:, None]
    py = (oy * geom.stride_h - geom.pad_h + i * geom.dil_h) + off[:, :, :, 0]
    px = (ox * geom.stride_w - geom.pad_w + j * geom.dil_w) + off[:, :, :, 1]
    fy, ly, nan_y = _axis(py, H, geom.padding_mode)
    fx, lx, nan_x = _axis(px, W, geom.padding_mode)
    n_idx = np.arange(n)[:, None, None, None]
    g_idx = np.arange(G)[None, :, None, None]
    value = np.zeros((n, G, K, P, Cg))
    for a, b in itertools.product((0, 1), repeat=2):
        qy, qx = fy + a, fx + b
        inside = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
        wy = ly if a else 1 - ly
        wx = lx if b else 1 - lx
        v = x[n_idx, g_idx, :, np.clip(qy, 0, H - 1), np.clip(qx, 0, W - 1)]
        value += (wy * wx)[..., None] * np.where(inside[..., None], v, 0.0)
    value[nan_y | nan_x] = np.nan
    columns = value * m[..., None]  # [n, G, K, P, Cg]
    return np.moveaxis(columns, -1, 2).reshape(n, C * K, P)


def _by_group(geom, columns: np.ndarray) -> np.ndarray:
    """[n, C*K, P] -> [n, groups, Cg*K, P]."""
    return columns.reshape(geom.batch, geom.groups, -1, geom.out_h * geom.out_w)


def forward_from_columns(problem: Problem, columns: np.ndarray, *, magnitude: bool = False):
    """output [N, Co, out_h, out_w] in float64 = weight @ columns (+ bias); with
    ``magnitude`` the same of absolute values."""
    geom = problem.geom
    w = (
        problem.arrays["weight"]
        .astype(np.float64)
        .reshape(geom.groups, -1, geom.column_rows // geom.groups)
    )
    bias = problem.arrays["bias"]
    cols = columns.astype(np.float64)
    if magnitude:
        w, cols = np.abs(w), np.abs(cols)
    out = np.matmul(w[None], _by_group(geom, cols)).reshape(geom.batch, geom.out_channels, -1)
    if bias is not None:
        b = bias.astype(np.float64)
        out = out + (np.abs(b) if magnitude else b)[:, None]
    return out.reshape(geom.output_shape)


def grad_weight_from_columns(problem: Problem, columns: np.ndarray, *, magnitude: bool = False):
    """[groups, Co/g, Cg*K] float64 = sum over images of grad_output @ columns^T."""
    geom = problem.geom
    go = problem.grad_output.astype(np.float64).reshape(
        geom.batch, geom.groups, -1, geom.out_h * geom.out_w
    )
    cols = _by_group(geom, columns.astype(np.float64))
    if magnitude:
        go, cols = np.abs(go), np.abs(cols)
    return np.einsum("bgmp,bgkp->gmk", go, cols)


# ---------------------------------------------------------------------------- running


def _types(launcher, dtype_name, index_bits):
    return kernel_types(launcher, dtype_name, index_bits)


def im2col_columns(launcher, problem: Problem, index_bits: int) -> np.ndarray:
    """deform_conv_im2col's columns [n, C*K, P] (element dtype, NumPy)."""
    geom = problem.geom
    types = _types(launcher, problem.dtype_name, index_bits)
    columns = launcher.xp.empty(
        (geom.batch, geom.column_rows, geom.out_h * geom.out_w),
        dtype=cuda_kernels.column_dtype(launcher, types),
    )
    input, offset, mask = on_device(
        launcher, problem.arrays["input"], problem.arrays["offset"], problem.arrays["mask"]
    )
    cuda_kernels.launch_im2col(
        launcher,
        types,
        geom,
        input=input,
        offset=offset,
        mask=mask,
        columns=columns,
        images=geom.batch,
    )
    return to_numpy(columns)


def fused_forward(launcher, problem: Problem, index_bits: int) -> np.ndarray:
    geom = problem.geom
    types = _types(launcher, problem.dtype_name, index_bits)
    a = problem.arrays
    input, offset, weight, bias, mask = on_device(
        launcher, a["input"], a["offset"], a["weight"], a["bias"], a["mask"]
    )
    output = launcher.xp.empty(geom.output_shape, dtype=input.dtype)
    fused_cuda.launch_fused_forward(
        launcher,
        types,
        geom,
        input=input,
        offset=offset,
        weight=weight,
        bias=bias,
        mask=mask,
        output=output,
    )
    return to_numpy(output)


def fused_grad_weight(launcher, problem: Problem, index_bits: int, splits=None) -> np.ndarray:
    geom = problem.geom
    types = _types(launcher, problem.dtype_name, index_bits)
    a = problem.arrays
    grad_output, input, offset, mask = on_device(
        launcher, problem.grad_output, a["input"], a["offset"], a["mask"]
    )
    acc = launcher.xp.zeros(
        (geom.groups, geom.out_channels // geom.groups, geom.column_rows // geom.groups),
        dtype=types.acc_dtype,
    )
    fused_cuda.launch_fused_grad_weight(
        launcher,
        types,
        geom,
        grad_output=grad_output,
        input=input,
        offset=offset,
        mask=mask,
        grad_weight_acc=acc,
        splits=splits,
    )
    return to_numpy(acc)


def column_path_forward(launcher, problem: Problem, index_bits: int) -> np.ndarray:
    a = problem.arrays
    arrays = on_device(launcher, a["input"], a["offset"], a["weight"], a["bias"], a["mask"])
    return to_numpy(
        cuda_backend.conv_forward(
            launcher,
            *arrays,
            problem.geom,
            workspace_bytes=BIG_WORKSPACE,
            index_bits=index_bits,
            algorithm="im2col",
        )
    )


def column_path_grad_weight(launcher, problem: Problem, index_bits: int) -> np.ndarray:
    a = problem.arrays
    grad_output, input, offset, weight, mask = on_device(
        launcher, problem.grad_output, a["input"], a["offset"], a["weight"], a["mask"]
    )
    grads = cuda_backend.conv_backward(
        launcher,
        grad_output,
        input,
        offset,
        weight,
        mask,
        problem.geom,
        wrt=frozenset({"weight"}),
        workspace_bytes=BIG_WORKSPACE,
        index_bits=index_bits,
        algorithm="im2col",
    )
    return to_numpy(grads.grad_weight)


# ---------------------------------------------------------------------------- pure Python


def _geom(case: Case, dtype_name: str = "float16"):
    return Problem(case, dtype_name, SEED).geom


def test_applicability_rule():
    geom = _geom(CASES["base"])
    assert fused_cuda.fused_applies(geom, "float16")
    assert fused_cuda.fused_applies(geom, "bfloat16")
    assert not fused_cuda.fused_applies(geom, "float32")  # the column path
    assert not fused_cuda.fused_applies(geom, "float64")
    assert not fused_cuda.fused_supports(geom, "float32")
    # the tile-occupancy floors: supported, not chosen
    tiny = _geom(CASES["p1-co1"])
    assert fused_cuda.fused_supports(tiny, "float16")
    assert not fused_cuda.fused_applies(tiny, "float16")  # C_out 1 < 16
    assert not fused_cuda.fused_applies(_geom(Case(4, 32, (5, 5))), "float16")  # C / g 4 < 8
    # offset groups a weight group touches
    assert fused_cuda.offset_group_span(_geom(CASES["og4"])) == 4
    assert fused_cuda.offset_group_span(_geom(CASES["straddle"])) == 2
    assert fused_cuda.offset_group_span(_geom(CASES["groups2"])) == 1
    many = _geom(Case(32, 32, (4, 4), offset_groups=8))
    assert fused_cuda.offset_group_span(many) == 8
    assert not fused_cuda.fused_supports(many, "float16")
    assert fused_cuda.fused_supported(80) and fused_cuda.fused_supported(90)
    assert not fused_cuda.fused_supported(75)


def test_launch_shapes():
    geom = _geom(CASES["c40-co130"])  # P 20, C / g 40, M 130
    pack, forward, weight = fused_cuda.launch_shapes(geom)
    assert fused_cuda.channels_padded(geom) == 48
    assert fused_cuda.packed_weight_shape(geom) == (1, 130, 9, 48)
    assert pack.grid_stride and pack.total == 130 * 9 * 48
    assert forward.grid == (1, 2, 1) and forward.block == (256, 1, 1)
    assert forward.shared_bytes == fused_cuda.FORWARD_SHARED_BYTES == 43008
    assert forward.sizes == {"batch": 1, "padding_mode": 0, "channels_padded": 48}
    assert weight.grid == (9, 2, 1) and weight.block == (256, 1, 1)
    assert weight.shared_bytes == fused_cuda.WEIGHT_SHARED_BYTES == 36864
    # images loop past grid.z's limit; grad_weight splits bounded by the pixels
    big = replace(_geom(CASES["base"]), batch=70000)
    assert fused_cuda.forward_shape(big, 70000).grid == (1, 1, 65535)
    assert fused_cuda.grad_weight_splits(geom, 1) == 1  # one slice of 20 pixels
    many = replace(_geom(CASES["base"]), batch=64, out_h=64, out_w=64)
    splits = fused_cuda.grad_weight_splits(many, 64)
    assert 1 < splits <= 64 * 128 // fused_cuda.MIN_SLICES_PER_SPLIT
    with pytest.raises(ValueError, match="splits"):
        fused_cuda.grad_weight_shape(geom, 1, splits=0)


def test_index_bits():
    geom = _geom(CASES["base"])
    assert fused_cuda.fused_index_bits(geom) == 32
    # an input of 2^31 elements, or an output past the limit, needs 64-bit indices
    assert fused_cuda.fused_index_bits(replace(geom, batch=2**31 // (16 * 6 * 7) + 1)) == 64
    assert fused_cuda.fused_index_bits(replace(geom, out_channels=2**27, batch=1)) == 64


def test_refuses_what_it_cannot_compute():
    from cupydcn.cuda.launch import NullLauncher

    launcher = NullLauncher()
    problem = Problem(CASES["base"], "float16", SEED)
    a = problem.arrays
    output = np.empty(problem.geom.output_shape, np.float16)
    kwargs = dict(input=a["input"], offset=a["offset"], weight=a["weight"], bias=None, mask=None)
    with pytest.raises(ValueError, match="float16"):
        fused_cuda.launch_fused_forward(
            launcher, kernel_types(launcher, "float32", 32), problem.geom, output=output, **kwargs
        )
    many = replace(problem.geom, offset_groups=8, in_channels=32)
    with pytest.raises(ValueError, match="offset groups"):
        fused_cuda.launch_fused_forward(
            launcher, kernel_types(launcher, "float16", 32), many, output=output, **kwargs
        )


def test_records_launches_and_workspace():
    from cupydcn.cuda.launch import NullLauncher

    launcher = NullLauncher()
    problem = Problem(CASES["c40-co130"], "bfloat16", SEED)
    geom, a = problem.geom, problem.arrays
    types = kernel_types(launcher, "bfloat16", 32)
    with record_calls() as calls:
        fused_cuda.launch_fused_forward(
            launcher,
            types,
            geom,
            input=a["input"],
            offset=a["offset"],
            weight=a["weight"],
            bias=a["bias"],
            mask=a["mask"],
            output=np.empty(geom.output_shape, a["input"].dtype),
        )
    pack, forward, _ = fused_cuda.launch_shapes(geom)
    assert [s[0] for s in calls.sequence] == [fused_cuda.PACK_KERNEL, fused_cuda.FORWARD_KERNEL]
    assert calls.sequence[1][2:] == (forward.grid, forward.block)
    assert calls.workspace == [130 * 9 * 48 * 2]  # the packed weight only
    assert calls.gemm_count == 0


# ---------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype_name, index_bits", TYPES, ids=TYPE_IDS)
def test_pack_weight(launcher, problems, dtype_name, index_bits):
    problem = problems("c13-co70", dtype_name)
    geom = problem.geom
    types = _types(launcher, dtype_name, index_bits)
    packed = launcher.xp.asarray(
        np.full(fused_cuda.packed_weight_shape(geom), np.nan, dtype=dtype_of(dtype_name))
    )
    fused_cuda.launch_pack_weight(
        launcher,
        types,
        geom,
        weight=on_device(launcher, problem.arrays["weight"]),
        weight_packed=packed,
    )
    w = problem.arrays["weight"].reshape(geom.groups, -1, 13, geom.taps)
    want = np.zeros(fused_cuda.packed_weight_shape(geom), dtype=w.dtype)
    want[..., :13] = np.swapaxes(w, 2, 3)
    np.testing.assert_array_equal(to_numpy(packed).view(np.uint16), want.view(np.uint16))


def _one_hot(problem: Problem) -> Problem:
    """The problem with weight [groups * Cg*K, Cg, kh, kw]: output row r of group g is
    column row r of g (weight[g*M + c*K + k, c, k] = 1)."""
    geom = problem.geom
    rows = geom.column_rows // geom.groups
    eye = np.eye(rows).reshape(rows, geom.in_channels // geom.groups, geom.kernel_h, geom.kernel_w)
    return problem.with_weight(np.concatenate([eye] * geom.groups))


@pytest.mark.parametrize("dtype_name, index_bits", TYPES, ids=TYPE_IDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_samples_im2col_columns(launcher, problems, name, dtype_name, index_bits):
    """Bit for bit the column values of deform_conv_im2col (as values: a -0 column is
    summed into +0; NaN columns make their pixel NaN in every row, as in float64)."""
    problem = _one_hot(problems(name, dtype_name))
    columns = im2col_columns(launcher, problem, index_bits)
    got = fused_forward(launcher, problem, index_bits).astype(np.float64)
    want = forward_from_columns(problem, columns)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name, dtype_name, index_bits", CHECKS, ids=CHECK_IDS)
def test_forward(launcher, problems, name, dtype_name, index_bits):
    """Within one rounding and float32 accumulation of weight @ im2col's rounded columns
    (+ bias), like the column path; within the usual bound of the float64 reference."""
    problem = problems(name, dtype_name)
    columns = im2col_columns(launcher, problem, index_bits)
    want = forward_from_columns(problem, columns)
    magnitude = forward_from_columns(problem, columns, magnitude=True)
    got = fused_forward(launcher, problem, index_bits)
    assert got.dtype == dtype_of(dtype_name)
    assert_close_to_sum(got, want, magnitude, dtype_name, "fused output", roundings=1)
    column_path = column_path_forward(launcher, problem, index_bits)
    assert_close_to_sum(column_path, want, magnitude, dtype_name, "column path", roundings=1)
    # the float64 reference from unrounded columns
    exact = columns_reference(problem)
    w = np.abs(problem.arrays["weight"].astype(np.float64))
    abs_columns = columns_reference(problem, magnitude=True)
    geom = problem.geom
    weight_terms = np.matmul(
        w.reshape(geom.groups, -1, geom.column_rows // geom.groups)[None],
        _by_group(geom, abs_columns),
    ).reshape(geom.output_shape)
    bias = problem.arrays["bias"]
    full = weight_terms + (0.0 if bias is None else np.abs(bias.astype(np.float64))[:, None, None])
    assert_close_with_rounded_columns(
        got,
        forward_from_columns(problem, exact),
        weight_terms,
        dtype_name,
        "fused output vs float64",
        magnitude=full,
        roundings=1,
    )


def test_reference_columns_match_loop_reference():
    """columns_reference through forward_from_columns is tests/reference.py's loop form."""
    for name in ("groups2", "straddle", "reflection"):
        problem = Problem(replace(CASES[name], batch=1), "float16", SEED)
        a = {k: None if v is None else v.astype(np.float64) for k, v in problem.arrays.items()}
        case = problem.case
        loop = deform_conv2d_reference(
            a["input"],
            a["offset"],
            a["weight"],
            a["bias"],
            a["mask"],
            stride=case.stride,
            padding=case.padding,
            dilation=case.dilation,
            padding_mode=case.padding_mode,
        )
        ours = forward_from_columns(problem, columns_reference(problem))
        np.testing.assert_allclose(ours, loop, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, dtype_name, index_bits", CHECKS, ids=CHECK_IDS)
def test_grad_weight(launcher, problems, name, dtype_name, index_bits):
    """Within float32 accumulation of grad_output @ im2col's columns^T summed over the
    images, for one split and several; the column path within one more rounding."""
    problem = problems(name, dtype_name)
    columns = im2col_columns(launcher, problem, index_bits)
    want = grad_weight_from_columns(problem, columns)
    magnitude = grad_weight_from_columns(problem, columns, magnitude=True)
    slices = problem.geom.batch * -(-problem.geom.out_h * problem.geom.out_w // fused_cuda.SLICE)
    for splits in sorted({1, None, min(3, slices), slices}, key=str):
        got = fused_grad_weight(launcher, problem, index_bits, splits)
        assert got.dtype == np.float32
        assert_close_to_sum(
            got,
            want,
            magnitude,
            dtype_name,
            f"fused grad_weight ({splits} splits)",
            roundings=0,
            dtype_checked=False,
        )
    column_path = column_path_grad_weight(launcher, problem, index_bits)
    assert_close_to_sum(
        column_path.reshape(want.shape),
        want,
        magnitude,
        dtype_name,
        "column path grad_weight",
        roundings=1,
    )


# ---------------------------------------------------------------------------- thread order


@emulated
@pytest.mark.parametrize("name", ["c40-co130", "og4", "p65", "straddle"])
def test_order_independent(host_launcher, problems, name):
    """The pipeline's barriers and cp.async waits: bitwise the same results in forward,
    reverse and shuffled thread orders (grad_weight with one split: one atomic per
    element)."""
    from emulator.host_launcher import assert_order_independent

    problem = problems(name, "float16")
    assert_order_independent(lambda launcher: fused_forward(launcher, problem, 32))
    assert_order_independent(lambda launcher: fused_grad_weight(launcher, problem, 32, splits=1))
