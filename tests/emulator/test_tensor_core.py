"""The tensor-core primitives of cupydcn/cuda/kernels/tensor_core.cuh (mma.sync, ldmatrix,
cp.async) on the emulator (tests/emulator/tensor_core_shim.h), fragment by fragment against
NumPy models written from the PTX ISA's layout tables, and the same kernels through NVRTC for
every target architecture.

The test kernels are tests/emulator/kernels/tensor_core_mma.cu and tensor_core_async.cu; they
include tensor_core.cuh, which these tests inline (with the host shim after cuda_shim.h) the
way the package's module sources are inlined.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
import pytest

import nvrtc_build
from cupydcn.cuda.kernel_source import CUPY_ADDED_NVRTC_OPTIONS, NVRTC_OPTIONS, kernel_dir
from cupydcn.cuda.launch import round_to_tf32
from emulator.host_launcher import (
    AdHocKernels,
    EmulatorFaultError,
    HostLauncher,
    assert_order_independent,
    is_cooperative,
    shim_text,
)
from support import dtype_of, seeded

KERNELS = Path(__file__).resolve().parent / "kernels"
TENSOR_CORE_HEADER = kernel_dir() / "tensor_core.cuh"
TENSOR_CORE_SHIM = Path(__file__).resolve().with_name("tensor_core_shim.h")

_INCLUDE_HEADER = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"tensor_core\.cuh"[ \t]*$', re.MULTILINE)
_INCLUDE_SHIM = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"tensor_core_shim\.h"[ \t]*$', re.MULTILINE)


def _inline(text: str, include: re.Pattern, header: Path, includer: Path) -> str:
    """``text`` (the file ``includer``) with its ``#include`` of ``header`` replaced by the
    header's text, #line directives naming both files."""

    def replace(match: re.Match) -> str:
        directive = f'#line 1 "{includer}"\n'  # where the includer's text starts, if marked
        start = text.rfind(directive, 0, match.start())
        start = 0 if start < 0 else start + len(directive)
        after = text[start : match.end()].count("\n") + 2
        body = header.read_text().replace("#pragma once", "", 1)
        return f'#line 1 "{header}"\n{body}\n#line {after} "{includer}"'

    return include.sub(replace, text, count=1)


def shim_with_tensor_cores() -> str:
    """The emulator's shim text with tensor_core_shim.h after it: inlined where cuda_shim.h
    includes it, appended where it does not (yet), as is where the launcher inlines it."""
    text = shim_text()
    if "CUPYDCN_TENSOR_CORE_SHIM" in text:
        return text
    shim_path = Path(re.match(r'#line 1 "([^"]+)"', text).group(1))
    if _INCLUDE_SHIM.search(text):
        return _inline(text, _INCLUDE_SHIM, TENSOR_CORE_SHIM, shim_path)
    body = TENSOR_CORE_SHIM.read_text().replace("#pragma once", "", 1)
    return f'{text}#line 1 "{TENSOR_CORE_SHIM}"\n{body}\n'


def device_source(path: Path) -> str:
    """A test kernel file with tensor_core.cuh inlined: what NVRTC compiles."""
    return _inline(path.read_text(), _INCLUDE_HEADER, TENSOR_CORE_HEADER, path)


class TensorCoreKernels(AdHocKernels):
    """:class:`AdHocKernels` of a file that includes tensor_core.cuh: the translation unit is
    the shim with the tensor-core shim, then the file with the header inlined."""

    def translation_unit(self) -> str:
        unit = super().translation_unit()
        shim = shim_text()
        assert unit.startswith(shim)
        return shim_with_tensor_cores() + _inline(
            unit[len(shim) :], _INCLUDE_HEADER, TENSOR_CORE_HEADER, self.path
        )


HALF_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16"}
MMA = TensorCoreKernels(
    KERNELS / "tensor_core_mma.cu",
    [f"tctest::mma_global<{c}>" for c in HALF_TYPES.values()]
    + [f"tctest::mma_shared<{c}, {mode}>" for c in HALF_TYPES.values() for mode in range(4)]
    + ["tctest::mma_tf32", "tctest::tf32_round", "tctest::ldmatrix_raw", "tctest::misuse"],
)
ASYNC = TensorCoreKernels(
    KERNELS / "tensor_core_async.cu",
    ["tctest::async_copy", "tctest::async_misuse"]
    + [f"tctest::pipeline<{c}>" for c in HALF_TYPES.values()],
)

POISON = 0xFFFFFFFF  # a shared word no one wrote (the emulator's block-start fill)


def one_block(threads: int) -> dict:
    return {"grid": (1, 1, 1), "block": (threads, 1, 1)}


# ---------------------------------------------------------------------------- NumPy models


def sequential_mma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """D = A B + C per tile (a: (W, 16, K), b: (W, K, 8), c: (W, 16, 8) float32) in the
    emulator's documented order: D = ((C + p_0) + p_1) ... with p_k = A[:, k] B[k, :], each
    product exact and each sum rounded in float32."""
    acc = c.astype(np.float32).copy()
    for k in range(a.shape[2]):
        acc = acc + a[:, :, k, None].astype(np.float32) * b[:, None, k, :].astype(np.float32)
    return acc


def assert_mma_close(d: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    """|D - (A B + C)| within float32 accumulation's bound, K u (|C| + |A| |B|), of the exact
    result (float64; the products of the operands are exact there): what a kernel may rely
    on from real tensor cores too, whose internal summation order is not specified."""
    a64, b64, c64 = (x.astype(np.float64) for x in (a, b, c))
    exact = c64 + a64 @ b64
    bound = a.shape[2] * 2.0**-24 * (np.abs(c64) + np.abs(a64) @ np.abs(b64))
    np.testing.assert_array_less(np.abs(d - exact), bound * 1.0001 + 1e-30)


def operands(dtype_name: str, tiles: int, k: int, *key) -> tuple[np.ndarray, ...]:
    """Random A (tiles, 16, k), B (tiles, k, 8) in the dtype and C (tiles, 16, 8) float32,
    distinct everywhere so that a misplaced element shows."""
    rng = seeded("tensor core operands", dtype_name, tiles, k, *key)
    dtype = dtype_of(dtype_name)
    a = (rng.standard_normal((tiles, 16, k)) * 2).astype(dtype)
    b = (rng.standard_normal((tiles, k, 8)) * 2).astype(dtype)
    c = rng.standard_normal((tiles, 16, 8)).astype(np.float32)
    return a, b, c


def ldmatrix_model(values: np.ndarray, count: int, trans: bool) -> np.ndarray:
    """(32, 4) uint32: register j of each lane of ldmatrix .x<count> over the matrices
    values[8j:8j+8] (8 x 8 16-bit values), per the PTX ISA: lane l holds row l // 4, columns
    2 (l % 4) and 2 (l % 4) + 1 (.trans: rows 2 (l % 4), 2 (l % 4) + 1 of column l // 4), the
    lower index in the low half; registers past count are 0."""
    out = np.zeros((32, 4), np.uint32)
    m = values.reshape(4, 8, 8).astype(np.uint32)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for j in range(count):
            if trans:
                lo, hi = m[j, 2 * t, g], m[j, 2 * t + 1, g]
            else:
                lo, hi = m[j, g, 2 * t], m[j, g, 2 * t + 1]
            out[lane, j] = lo | (hi << 16)
    return out


# ---------------------------------------------------------------------------- mma


MMA_SHAPES = [
    pytest.param(1, 1, 1, id="1-warp-k16"),
    pytest.param(4, 2, 2, id="2x4-warps-k32"),
]


@pytest.mark.emulated
@pytest.mark.parametrize("warps, blocks, ksteps", MMA_SHAPES)
@pytest.mark.parametrize("dtype_name", HALF_TYPES)
def test_mma_fragments_from_global_memory(host_launcher, dtype_name, warps, blocks, ksteps):
    """Fragments built by the layout formulas, mma.sync m16n8k16, D stored by the layout:
    each warp's tiles give its own float32 A B + C (several warps per block, several blocks,
    accumulation across k-steps into the same fragment)."""
    tiles = warps * blocks
    a, b, c = operands(dtype_name, tiles, 16 * ksteps, "global")
    d = np.full((tiles, 16, 8), np.nan, np.float32)
    MMA.launch(
        host_launcher,
        f"tctest::mma_global<{HALF_TYPES[dtype_name]}>",
        [a.ravel(), b.ravel(), c.ravel(), d.ravel(), ksteps],
        grid=(blocks, 1, 1),
        block=(32 * warps, 1, 1),
    )
    np.testing.assert_array_equal(d, sequential_mma(a, b, c))
    assert_mma_close(d, a, b, c)


@pytest.mark.emulated
@pytest.mark.parametrize("variant", range(6), ids=["x1", "x2", "x4", "x1-t", "x2-t", "x4-t"])
def test_ldmatrix_registers_follow_the_ptx_layout(host_launcher, variant):
    values = seeded("ldmatrix", variant).permutation(65536)[:256].astype(np.int32)
    out = np.zeros((32, 4), np.uint32)
    MMA.launch(
        host_launcher, "tctest::ldmatrix_raw", [values, out.ravel(), variant], **one_block(32)
    )
    count, trans = (1, 2, 4)[variant % 3], variant >= 3
    np.testing.assert_array_equal(out, ldmatrix_model(values, count, trans))


@pytest.mark.emulated
@pytest.mark.parametrize(
    "mode",
    range(4),
    ids=["A-x4.B-x2t", "A-2x2.B-2x1t", "A-4x1.B-x2", "A-x4t.B-x4t"],
)
@pytest.mark.parametrize("dtype_name", HALF_TYPES)
def test_mma_with_tiles_loaded_by_ldmatrix(host_launcher, dtype_name, mode):
    """Tiles staged in shared memory (rows padded), fragments loaded with every ldmatrix
    form: the same D as the fragments built from the formulas."""
    warps, blocks, ksteps = 4, 2, 2
    tiles = warps * blocks
    a, b, c = operands(dtype_name, tiles, 16 * ksteps, "shared")
    d = np.full((tiles, 16, 8), np.nan, np.float32)
    MMA.launch(
        host_launcher,
        f"tctest::mma_shared<{HALF_TYPES[dtype_name]}, {mode}>",
        [a.ravel(), b.ravel(), c.ravel(), d.ravel(), ksteps],
        grid=(blocks, 1, 1),
        block=(32 * warps, 1, 1),
    )
    np.testing.assert_array_equal(d, sequential_mma(a, b, c))


# ---------------------------------------------------------------------------- tf32


def truncate_tf32(x: np.ndarray) -> np.ndarray:
    """float32 with the low 13 bits cleared: what the mma reads from raw float32 bits."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return (bits & np.uint32(0xFFFFE000)).view(np.float32)


@pytest.mark.emulated
@pytest.mark.parametrize("rounded", [True, False], ids=["float_to_tf32", "raw-bits"])
def test_tf32_mma(host_launcher, rounded):
    warps, blocks, ksteps = 2, 2, 3
    tiles = warps * blocks
    rng = seeded("tf32 mma", rounded)
    a = rng.standard_normal((tiles, 16, 8 * ksteps)).astype(np.float32)
    b = rng.standard_normal((tiles, 8 * ksteps, 8)).astype(np.float32)
    c = rng.standard_normal((tiles, 16, 8)).astype(np.float32)
    d = np.full((tiles, 16, 8), np.nan, np.float32)
    MMA.launch(
        host_launcher,
        "tctest::mma_tf32",
        [a.ravel(), b.ravel(), c.ravel(), d.ravel(), ksteps, int(rounded)],
        grid=(blocks, 1, 1),
        block=(32 * warps, 1, 1),
    )
    convert = (lambda x: round_to_tf32(np, x)) if rounded else truncate_tf32
    ta, tb = convert(a), convert(b)
    assert not np.array_equal(ta, a)  # the conversion matters for these operands
    np.testing.assert_array_equal(d, sequential_mma(ta, tb, c))
    assert_mma_close(d, ta, tb, c)


@pytest.mark.emulated
def test_float_to_tf32_rounds_to_nearest_ties_away(host_launcher):
    ulp = 2.0**-10  # of tf32 at 1
    special = np.array(
        [
            1 + ulp / 2,  # a tie: away from zero
            -(1 + ulp / 2),
            1 + 3 * ulp / 2,  # a tie between 1 + ulp and 1 + 2 ulp: away, to 1 + 2 ulp
            1 + ulp / 2 - 2.0**-23,  # just below a tie: down
            np.finfo(np.float32).max,  # rounds past the largest tf32: Inf
            np.float32(2.0**-140),  # subnormal
            np.inf,
            -np.inf,
            0.0,
            -0.0,
        ],
        np.float32,
    )
    x = np.concatenate([special, seeded("tf32").standard_normal(118).astype(np.float32)])
    out = np.zeros(x.size, np.uint32)
    MMA.launch(host_launcher, "tctest::tf32_round", [x, out, x.size], **one_block(128))
    np.testing.assert_array_equal(out, round_to_tf32(np, x).view(np.uint32))
    got = out[:5].view(np.float32)
    np.testing.assert_array_equal(got, [1 + ulp, -(1 + ulp), 1 + 2 * ulp, 1, np.inf])
    assert np.all(out & 0x1FFF == 0)
    nan = np.array([np.nan, np.float32(-np.nan)], np.float32)
    nan_out = np.zeros(2, np.uint32)
    MMA.launch(host_launcher, "tctest::tf32_round", [nan, nan_out, 2], **one_block(2))
    assert np.isnan(nan_out.view(np.float32)).all()


# ---------------------------------------------------------------------------- cp.async


def _async(host_launcher, mode: int, threads: int, blocks: int = 1):
    src = seeded("cp.async", mode).standard_normal(8 * threads * blocks).astype(np.float32)
    out = np.full(24 * threads * blocks, 7.0, np.float32)
    ASYNC.launch(
        host_launcher,
        "tctest::async_copy",
        [src, out, mode],
        grid=(blocks, 1, 1),
        block=(threads, 1, 1),
    )
    return src.reshape(blocks, 8 * threads), out.reshape(blocks, 6, 4 * threads)


@pytest.mark.emulated
def test_cp_async_lands_at_the_wait_of_its_group(host_launcher):
    threads = 64
    src, out = _async(host_launcher, 0, threads, blocks=2)
    bits = out.view(np.uint32)
    first, second = src[:, : 4 * threads], src[:, 4 * threads :]
    assert np.all(bits[:, 0] == POISON)  # read before any wait: the copy has not landed
    np.testing.assert_array_equal(out[:, 1], first)  # wait<1>: the older group landed
    assert np.all(bits[:, 2] == POISON)  # ... the newer one not
    np.testing.assert_array_equal(out[:, 3], second)  # wait<0>
    np.testing.assert_array_equal(out[:, 4], np.roll(first, -4, axis=1))  # after __syncthreads
    np.testing.assert_array_equal(out[:, 5], first)  # an empty group counts for wait<1>


@pytest.mark.emulated
def test_cp_async_zero_fill(host_launcher):
    threads = 64
    src, out = _async(host_launcher, 1, threads)
    got = out[0, 0].view(np.uint8).reshape(threads, 16)
    source = src[0, : 4 * threads].view(np.uint8).reshape(threads, 16)
    for t in range(threads):
        kept = 0 if t == 0 else t % 17
        np.testing.assert_array_equal(got[t, :kept], source[t, :kept], err_msg=f"thread {t}")
        assert np.all(got[t, kept:] == 0), f"thread {t}: bytes past src_bytes = {kept} not zero"


@pytest.mark.emulated
def test_cp_async_4_bytes(host_launcher):
    threads = 96
    src, out = _async(host_launcher, 2, threads)
    flat = out[0].ravel()
    assert np.all(flat[:threads].view(np.uint32) == POISON)
    np.testing.assert_array_equal(flat[threads : 2 * threads], src[0, :threads])


@pytest.mark.emulated
def test_uncommitted_copies_are_not_waited_for(host_launcher):
    threads = 32
    src, out = _async(host_launcher, 3, threads)
    assert np.all(out[0, 0].view(np.uint32) == POISON)
    np.testing.assert_array_equal(out[0, 1], src[0, : 4 * threads])


@pytest.mark.emulated
def test_copies_never_waited_for_are_dropped_with_their_block(host_launcher):
    threads = 32
    src, out = _async(host_launcher, 4, threads, blocks=2)
    bits = out.view(np.uint32)
    assert np.all(bits[0, 0] == POISON)
    assert np.all(bits[1, 0] == POISON)  # block 0's copies did not land in block 1's memory
    np.testing.assert_array_equal(out[1, 1], src[1, : 4 * threads])


@pytest.mark.emulated
@pytest.mark.parametrize(
    "mode, match",
    [
        (0, r"cp_async_16 at .*tensor_core_async.cu:\d+: the shared address 0x\w+ is not 16-byte"),
        (1, r"cp_async_16 at .*: the global address 0x\w+ is not 16-byte aligned"),
        (2, r"cp_async_16 at .*: the shared address 0x\w+ is not in __shared__ memory"),
        (3, r"cp_async_16 at .*: the global address 0x\w+ is in __shared__ memory"),
        (4, r"cp_async_16_zfill at .*: src_bytes 17 is not in 0 \.\. 16"),
        (5, r"cp_async_4 at .*: the shared address 0x\w+ is not 4-byte aligned"),
        (6, r"out-of-bounds access past the end of argument 0 .*element 8 of 8"),
    ],
    ids=[
        "shared-misaligned",
        "global-misaligned",
        "shared-in-global",
        "global-in-shared",
        "src-bytes",
        "4-misaligned",
        "past-the-end",
    ],
)
def test_cp_async_misuse_is_an_error(host_launcher, mode, match):
    src = np.arange(8, dtype=np.float32)
    out = np.zeros(32, np.float32)
    with pytest.raises(EmulatorFaultError, match=match):
        ASYNC.launch(host_launcher, "tctest::async_misuse", [src, out, mode, 8], **one_block(32))


@pytest.mark.emulated
@pytest.mark.parametrize("dtype_name", HALF_TYPES)
def test_pipeline_is_order_independent(dtype_name):
    """cp.async double buffering -> ldmatrix -> mma, several warps per block: the same bits
    in every fiber order (each warp synchronises its lanes with __syncwarp only)."""
    warps, blocks, ksteps = 4, 2, 3
    tiles = warps * blocks
    a, b, c = operands(dtype_name, tiles, 16 * ksteps, "pipeline")

    def run(launcher: HostLauncher) -> np.ndarray:
        d = launcher.xp.empty((tiles, 16, 8), np.float32)
        ASYNC.launch(
            launcher,
            f"tctest::pipeline<{HALF_TYPES[dtype_name]}>",
            [a.ravel(), b.ravel(), c.ravel(), d.ravel(), ksteps],
            grid=(blocks, 1, 1),
            block=(32 * warps, 1, 1),
        )
        return d

    np.testing.assert_array_equal(assert_order_independent(run), sequential_mma(a, b, c))


# ---------------------------------------------------------------------------- misuse


@pytest.mark.emulated
@pytest.mark.parametrize(
    "mode, threads, match",
    [
        (
            0,
            32,
            r"ldmatrix_x1 at .*tensor_core_mma.cu:\d+: the row address 0x\w+ of lane 0 is "
            r"not 16-byte aligned",
        ),
        (1, 32, r"ldmatrix_x1 at .*: the row address 0x\w+ of lane 0 is not in __shared__"),
        (
            2,
            32,
            r"thread \(0, 0, 0\): cupydcn::tc::ldmatrix_x1 at .*: lane 16 \(thread \(16, 0, "
            r"0\)\) executes cupydcn::tc::mma_m16n8k16<__half> at .*tensor_core_mma.cu:\d+ "
            r"instead",
        ),
        (
            3,
            32,
            r"__syncwarp with mask 0xffffffff at cupydcn::tc::mma_m16n8k16<__half> at "
            r".*tensor_core_mma.cu:\d+ names lane 5 \(thread \(5, 0, 0\)\), which has exited",
        ),
        (
            4,
            32,
            r"lane 7 \(thread \(7, 0, 0\)\) completed the warp's rendezvous from a "
            r"__syncwarp of its own",
        ),
        (
            5,
            32,
            r"lane 16 \(thread \(16, 0, 0\)\) executes cupydcn::tc::mma_m16n8k16<__half> "
            r"at .*tensor_core_mma.cu:\d+ instead",
        ),
        (
            6,
            48,
            r"mma_m16n8k16<__half> at .* names lane 16, which does not exist \(the block "
            r"has 48 threads\)",
        ),
        (
            7,
            32,
            r"mma_m16n8k16<__half> at .* names lane 16 \(thread \(16, 0, 0\)\), which "
            r"waits at __syncthreads",
        ),
    ],
    ids=[
        "misaligned-row",
        "row-in-global",
        "ldmatrix-against-mma",
        "exited-lane",
        "kernel-syncwarp",
        "two-call-sites",
        "partial-warp",
        "against-syncthreads",
    ],
)
def test_warp_level_misuse_is_an_error(host_launcher, mode, threads, match):
    out = np.zeros(4 * threads, np.float32)
    with pytest.raises(EmulatorFaultError, match=match):
        MMA.launch(host_launcher, "tctest::misuse", [out, mode], **one_block(threads))


@pytest.mark.emulated
def test_a_correct_call_of_the_misuse_kernel_runs(host_launcher):
    out = np.full(4 * 64, np.nan, np.float32)
    MMA.launch(host_launcher, "tctest::misuse", [out, 6], **one_block(64))
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.emulated
def test_primitive_outside_a_cooperative_launch(host_launcher, tmp_path):
    """A file whose text has no block-cooperative built-in runs its threads as plain calls
    (host_launcher.is_cooperative), where a warp-level primitive cannot meet its warp: the
    launch reports it, unless the launcher recognises the tensor-core primitives."""
    source = tmp_path / "plain.cu"
    source.write_text(
        '#include "tensor_core.cuh"\n'
        "__global__ void k(float* out) {\n"
        "  cupydcn::tc::FragA16 a = {{0, 0, 0, 0}};\n"
        "  cupydcn::tc::FragB16 b = {{0, 0}};\n"
        "  cupydcn::tc::FragC c = {{1.0f, 2.0f, 3.0f, 4.0f}};\n"
        "  cupydcn::tc::mma_m16n8k16<__half>(c, a, b, c);\n"
        "  out[threadIdx.x] = c.x[threadIdx.x % 4];\n"
        "}\n"
    )
    kernels = TensorCoreKernels(source, ["k"])
    out = np.zeros(32, np.float32)
    if is_cooperative(device_source(source)):
        kernels.launch(host_launcher, "k", [out], **one_block(32))
        np.testing.assert_array_equal(out, np.tile([1, 2, 3, 4], 8))
    else:
        with pytest.raises(
            EmulatorFaultError,
            match=r"cupydcn::tc::mma_m16n8k16<__half> at .*plain.cu:6 in a launch without fibers",
        ):
            kernels.launch(host_launcher, "k", [out], **one_block(32))


# ---------------------------------------------------------------------------- NVRTC

# sm_70 / sm_75: the header compiles (the sm_80 instructions trap there); sm_80 and later:
# every primitive is its PTX instruction.
NVRTC_ARCHS = (70, 75, 80, 86, 89, 90, 100, 120)
NVRTC_BUILDS = [
    pytest.param(major, arch, id=f"nvrtc{major}-sm_{arch}")
    for major in (12, 13)
    for arch in NVRTC_ARCHS
    if not (major == 13 and arch == 70)  # CUDA 13 dropped sm_70
]
NVRTC_FILES = {MMA.path: MMA.expressions, ASYNC.path: ASYNC.expressions}


@pytest.mark.nvrtc
@pytest.mark.parametrize("major, arch", NVRTC_BUILDS)
def test_nvrtc_builds_every_primitive(major, arch, tmp_path):
    """Both test kernel files, with every primitive, through NVRTC with the options CuPy's
    RawModule uses: no error, no warning, a cubin."""
    nvrtc = nvrtc_build.installed().get(major)
    if nvrtc is None:
        pytest.skip(nvrtc_build.missing_message(major))
    if not nvrtc.supports(arch):
        pytest.skip(f"NVRTC {nvrtc.version} does not support sm_{arch}")
    options = (*NVRTC_OPTIONS, *CUPY_ADDED_NVRTC_OPTIONS, "-Xptxas=-v")
    for path, expressions in NVRTC_FILES.items():
        result = nvrtc.compile(device_source(path), expressions, arch, options, path.name)
        assert result.cubin, f"{path.name}: NVRTC returned an empty cubin"
        warnings = [w for w in result.warnings() if "are deprecated" not in w]
        assert not warnings, f"{path.name}, sm_{arch}:\n" + "\n".join(warnings)
        for expression in expressions:
            assert result.lowered_names.get(expression) in result.resources, expression


def nvrtc_ptx(nvrtc: nvrtc_build.Nvrtc, source: str, expressions, arch: int) -> str:
    """The PTX NVRTC generates for compute_<arch> (the build binding returns cubins only)."""
    lib = ctypes.CDLL(str(nvrtc.library))  # the library already loaded: the same handle
    prog = ctypes.c_void_p()
    for name, argtypes in {
        "nvrtcCreateProgram": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p]
        + [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p],
        "nvrtcAddNameExpression": [ctypes.c_void_p, ctypes.c_char_p],
        "nvrtcCompileProgram": [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        "nvrtcGetPTXSize": [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)],
        "nvrtcGetPTX": [ctypes.c_void_p, ctypes.c_char_p],
        "nvrtcDestroyProgram": [ctypes.POINTER(ctypes.c_void_p)],
    }.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = ctypes.c_int
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"t.cu", 0, None, None) == 0
    try:
        for expression in expressions:
            assert lib.nvrtcAddNameExpression(prog, expression.encode()) == 0
        options = [
            *NVRTC_OPTIONS,
            *CUPY_ADDED_NVRTC_OPTIONS,
            f"--gpu-architecture=compute_{arch}",
            f"--include-path={nvrtc.include_dir}",
        ]
        encoded = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        assert lib.nvrtcCompileProgram(prog, len(options), encoded) == 0
        size = ctypes.c_size_t()
        assert lib.nvrtcGetPTXSize(prog, ctypes.byref(size)) == 0
        ptx = ctypes.create_string_buffer(size.value)
        assert lib.nvrtcGetPTX(prog, ptx) == 0
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# Every instruction tensor_core.cuh wraps, as it appears in the PTX.
INSTRUCTIONS = (
    "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
    "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
    "cvt.rna.tf32.f32",
    *(f"ldmatrix.sync.aligned.m8n8.x{n}{t}.shared.b16" for n in (1, 2, 4) for t in ("", ".trans")),
    "cp.async.cg.shared.global",
    "cp.async.ca.shared.global",
    "cp.async.commit_group",
    "cp.async.wait_group",
)


@pytest.mark.nvrtc
@pytest.mark.parametrize("arch", [75, 80, 90], ids=lambda a: f"sm_{a}")
def test_the_ptx_holds_the_instructions_from_sm_80(arch):
    """From sm_80 every primitive is its instruction and nothing traps; on sm_75 only
    ldmatrix exists and the others trap."""
    try:
        nvrtc = nvrtc_build.nvrtc_for_arch(arch)
    except nvrtc_build.NvrtcNotFound as exc:
        pytest.skip(str(exc))
    ptx = "".join(
        nvrtc_ptx(nvrtc, device_source(path), expressions, arch)
        for path, expressions in NVRTC_FILES.items()
    )
    found = {i for i in INSTRUCTIONS if i in ptx}
    if arch >= 80:
        assert found == set(INSTRUCTIONS)
        assert "trap;" not in ptx
        assert re.search(r"cp\.async\.cg\.shared\.global \[%r\d+\], \[%rd\d+\], 16, %r\d+;", ptx)
    else:
        assert found == {i for i in INSTRUCTIONS if i.startswith("ldmatrix")}
        assert "trap;" in ptx
