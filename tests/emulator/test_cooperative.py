"""Block-cooperative kernels on the emulator (cuda_shim.h: fibers, shared memory, barriers,
warp collectives) and the launcher protocol v2 of HostLauncher (template arguments, explicit
grid and block, GEMMs). The test kernels are in tests/emulator/kernels/; the expected values
come from NumPy models written from the CUDA programming guide's description of each
built-in."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from cupydcn.cuda import kernel_source
from cupydcn.cuda.launch import GemmCall, record_calls, round_to_tf32
from emulator.host_launcher import (
    AdHocKernels,
    EmulatorBuildError,
    EmulatorFaultError,
    HostLauncher,
    assert_order_independent,
    is_cooperative,
)
from support import assert_close_to_sum, dtype_of, seeded

pytestmark = pytest.mark.emulated

KERNELS = Path(__file__).resolve().parent / "kernels"

BLOCK = AdHocKernels(
    KERNELS / "block.cu",
    [
        "emutest::block_sum<int>",
        "emutest::block_sum<double>",
        "emutest::rotate<0>",
        "emutest::rotate<1>",
        "emutest::barrier_votes",
        "emutest::shared_histogram",
        "emutest::uninitialised_shared",
        "emutest::barrier_rounds",
    ],
)
# dtype name -> C++ type of the shuffle kernels' template argument
SHUFFLE_TYPES = {
    "int32": "int",
    "uint32": "unsigned",
    "int64": "long long",
    "float32": "float",
    "float64": "double",
}
WARP = AdHocKernels(
    KERNELS / "warp.cu",
    [
        f"emutest::{k}<{c}>"
        for k in ("xor_sum", "down_sum", "up_scan")
        for c in SHUFFLE_TYPES.values()
    ]
    + ["emutest::gather", "emutest::shifts"]
    + ["emutest::partial_warp_sum<0>", "emutest::partial_warp_sum<1>"]
    + ["emutest::votes"],
)
MISUSE = AdHocKernels(
    KERNELS / "misuse.cu",
    [
        "emutest::barrier_after_exit",
        "emutest::divergent_barriers",
        "emutest::shuffle_after_exit",
        "emutest::shuffle_against_barrier",
        "emutest::mask_without_caller",
        "emutest::bad_width",
        "emutest::write_past_end",
        "emutest::overflow_stack",
        "emutest::overflow_after_barrier",
    ],
)
HIDDEN = AdHocKernels(KERNELS / "hidden.cu", ["emutest::hidden_barrier"])


def one_block(threads: int) -> dict:
    return {"grid": (1, 1, 1), "block": (threads, 1, 1)}


# ---------------------------------------------------------------------------- block level


@pytest.mark.parametrize(
    "grid, block",
    [
        ((3, 1, 1), (256, 1, 1)),
        ((2, 3, 1), (8, 4, 2)),
        ((2, 2, 2), (4, 4, 4)),
        ((3, 1, 2), (5, 3, 2)),
    ],
    ids=["1d", "2d-grid-3d-block", "3d", "odd-3d-block"],
)
def test_shared_memory_tree_reduction(host_launcher, grid, block):
    blocks, threads = int(np.prod(grid)), int(np.prod(block))
    n = blocks * threads - 7  # the last block is partly past the end
    x = seeded("block_sum", grid, block).integers(-1000, 1000, n).astype(np.int32)
    out = np.full(blocks, -1, np.int32)
    BLOCK.launch(host_launcher, "emutest::block_sum<int>", [x, out, n], grid=grid, block=block)
    chunks = np.concatenate([x, np.zeros(blocks * threads - n, np.int32)]).reshape(blocks, -1)
    np.testing.assert_array_equal(out, chunks.sum(axis=1))

    real = seeded("block_sum float", grid).standard_normal(n)
    sums = np.zeros(blocks)
    BLOCK.launch(
        host_launcher, "emutest::block_sum<double>", [real, sums, n], grid=grid, block=block
    )
    expected = np.concatenate([real, np.zeros(blocks * threads - n)]).reshape(blocks, -1)
    np.testing.assert_allclose(sums, expected.sum(axis=1), rtol=1e-13, atol=1e-13)


def test_barrier_count_and_or(host_launcher):
    grid, block = (4, 1, 1), (16, 2, 1)
    x = np.zeros((4, 32), np.int32)
    x[1, 5] = 1  # one positive
    x[2] = 3  # all positive
    x[3, ::3] = 2
    out = np.zeros(12, np.int32)
    BLOCK.launch(host_launcher, "emutest::barrier_votes", [x.ravel(), out], grid=grid, block=block)
    positive = x > 0
    expected = np.stack([positive.sum(1), positive.all(1), positive.any(1)], axis=1)
    np.testing.assert_array_equal(out.reshape(4, 3), expected)


def test_shared_atomics(host_launcher):
    values = seeded("histogram").integers(0, 10, (3, 128)).astype(np.int32)
    out = np.zeros(3 * 10, np.int32)
    BLOCK.launch(
        host_launcher,
        "emutest::shared_histogram",
        [values.ravel(), out, 10],
        grid=(3, 1, 1),
        block=(32, 4, 1),
    )
    expected = [np.bincount(row, minlength=10) for row in values]
    np.testing.assert_array_equal(out.reshape(3, 10), expected)


def test_shared_memory_is_poisoned_at_every_block_start(host_launcher):
    out = np.zeros((2, 8), np.float32)
    BLOCK.launch(
        host_launcher,
        "emutest::uninitialised_shared",
        [out.ravel()],
        grid=(2, 1, 1),
        block=(8, 1, 1),
    )
    written = np.zeros((2, 8), bool)
    written[0, 1] = written[1, 2] = True
    assert np.all(out[written] == 2.0)
    assert np.isnan(out[~written]).all()  # block 1 does not see block 0's element 1


def _rotate(expression: str, grid=(2, 1, 1), block=(8, 4, 1)):
    """A launch callable of the rotate kernel for assert_order_independent."""
    threads = int(np.prod(block))
    x = np.arange(int(np.prod(grid)) * threads, dtype=np.float32)

    def run(launcher: HostLauncher) -> np.ndarray:
        out = launcher.xp.empty(x.shape, np.float32)
        BLOCK.launch(launcher, expression, [x, out], grid=grid, block=block)
        return out

    return run, x.reshape(-1, threads)


def test_missing_barrier_gives_order_dependent_results():
    run, _ = _rotate("emutest::rotate<0>")
    forward = run(HostLauncher())
    reverse = run(HostLauncher(reverse=True))
    shuffled = run(HostLauncher(shuffle=5))
    for a, b in [(forward, reverse), (forward, shuffled), (reverse, shuffled)]:
        assert not np.array_equal(a, b, equal_nan=True)
    with pytest.raises(
        AssertionError,
        match="(?s)depend on the order in which blocks and threads run.*differs from forward",
    ):
        assert_order_independent(run)


def test_with_the_barrier_every_order_agrees():
    run, x = _rotate("emutest::rotate<1>")
    out = assert_order_independent(run)
    np.testing.assert_array_equal(out.reshape(x.shape), np.roll(x, -1, axis=1))


# ---------------------------------------------------------------------------- warp level


def _segments(n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(lane within its width segment, index of its segment's first thread) per thread."""
    index = np.arange(n)
    lane = index % 32
    return lane % width, index - lane % width


def _warp_input(dtype_name: str, n: int) -> np.ndarray:
    rng = seeded("warp", dtype_name, n)
    if dtype_name.startswith("float"):
        return rng.standard_normal(n).astype(dtype_name)
    low = 0 if dtype_name == "uint32" else -(2**20)
    return rng.integers(low, 2**20, n).astype(dtype_name)


WIDTHS = [32, 16, 8, 4, 2, 1]


@pytest.mark.parametrize("dtype_name", list(SHUFFLE_TYPES))
@pytest.mark.parametrize("width", WIDTHS)
def test_xor_butterfly(host_launcher, dtype_name, width):
    x = _warp_input(dtype_name, 64)
    out = np.zeros_like(x)
    expression = f"emutest::xor_sum<{SHUFFLE_TYPES[dtype_name]}>"
    WARP.launch(host_launcher, expression, [x, out, width], **one_block(64))
    v = x.copy()  # the same additions in the same order: bitwise equal for floats too
    lanes = np.arange(64)
    offset = width // 2
    while offset > 0:
        v = v + v[lanes ^ offset]
        offset //= 2
    np.testing.assert_array_equal(out, v)
    if not dtype_name.startswith("float"):
        _, start = _segments(64, width)
        np.testing.assert_array_equal(
            out, np.add.reduceat(x, np.arange(0, 64, width))[start // width]
        )


@pytest.mark.parametrize("dtype_name", list(SHUFFLE_TYPES))
@pytest.mark.parametrize("width", WIDTHS)
def test_down_reduction(host_launcher, dtype_name, width):
    x = _warp_input(dtype_name, 64)
    out = np.zeros_like(x)
    expression = f"emutest::down_sum<{SHUFFLE_TYPES[dtype_name]}>"
    WARP.launch(host_launcher, expression, [x, out, width], **one_block(64))
    lane, start = _segments(64, width)
    v = x.copy()
    offset = width // 2
    while offset > 0:
        # past the end of the segment the caller gets its own value
        source = np.where(lane + offset < width, np.arange(64) + offset, np.arange(64))
        v = v + v[source]
        offset //= 2
    np.testing.assert_array_equal(out, v)
    if not dtype_name.startswith("float"):
        heads = np.arange(0, 64, width)
        np.testing.assert_array_equal(out[heads], np.add.reduceat(x, heads))


@pytest.mark.parametrize("dtype_name", ["int32", "uint32", "int64"])
@pytest.mark.parametrize("width", WIDTHS)
def test_up_scan(host_launcher, dtype_name, width):
    x = _warp_input(dtype_name, 96)
    out = np.zeros_like(x)
    expression = f"emutest::up_scan<{SHUFFLE_TYPES[dtype_name]}>"
    WARP.launch(host_launcher, expression, [x, out, width], **one_block(96))
    expected = np.cumsum(x.reshape(-1, width), axis=1, dtype=x.dtype).ravel()
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("width", WIDTHS)
def test_indexed_shuffle_wraps_within_the_segment(host_launcher, width):
    x = np.arange(64, dtype=np.float32) * 1.5
    source = seeded("gather", width).integers(-40, 80, 64).astype(np.int32)
    out = np.zeros(64, np.float32)
    WARP.launch(host_launcher, "emutest::gather", [x, source, out, width], **one_block(64))
    _, start = _segments(64, width)
    np.testing.assert_array_equal(out, x[start + source % width])


@pytest.mark.parametrize("width", [32, 8, 2])
@pytest.mark.parametrize("delta, lane_mask", [(1, 1), (3, 5), (5, 12), (31, 31)])
def test_shuffles_past_their_segment(host_launcher, width, delta, lane_mask):
    """Out of its segment a shuffle returns the caller's own value; an xor may reach into an
    earlier segment but not a later one."""
    x = np.arange(64, dtype=np.float32) + 0.25
    out = np.zeros((64, 3), np.float32)
    args = [x, out.ravel(), delta, lane_mask, width]
    WARP.launch(host_launcher, "emutest::shifts", args, **one_block(64))
    index = np.arange(64)
    lane = index % 32
    segment, position = lane // width, lane % width
    up = np.where(position >= delta, index - delta, index)
    down = np.where(position + delta < width, index + delta, index)
    partner = lane ^ lane_mask
    xor = np.where(partner // width <= segment, index - lane + partner, index)
    np.testing.assert_array_equal(out, x[np.stack([up, down, xor], axis=1)])


@pytest.mark.parametrize("threads", [40, 64, 97])
def test_partial_last_warp_with_its_mask(host_launcher, threads):
    x = seeded("partial", threads).standard_normal(threads).astype(np.float32)
    warps = -(-threads // 32)
    out = np.zeros(warps, np.float32)
    WARP.launch(host_launcher, "emutest::partial_warp_sum<1>", [x, out], **one_block(threads))
    expected = [x[w * 32 : (w + 1) * 32].astype(np.float64).sum() for w in range(warps)]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # Without the guard, lanes read lanes outside the mask: undefined on a GPU, NaN here.
    WARP.launch(host_launcher, "emutest::partial_warp_sum<0>", [x, out], **one_block(threads))
    full = threads // 32
    np.testing.assert_allclose(out[:full], expected[:full], rtol=1e-5, atol=1e-5)
    assert np.isnan(out[full:]).all()


def _votes_model(p: np.ndarray) -> np.ndarray:
    """What each thread of a 1-D block writes in emutest::votes, computed warp by warp."""
    n = p.size
    out = np.zeros((n, 12), np.uint64)
    for first in range(0, n, 32):
        lanes = p[first : first + 32].astype(np.int64)
        count = lanes.size
        mask = (1 << count) - 1
        bits = 1 << np.arange(count, dtype=np.int64)
        c_mod = np.fmod(lanes, 5)  # C's % truncates toward zero
        c_div = np.trunc(lanes / 1000).astype(np.int64)
        low = np.arange(count) < 16
        rows = out[first : first + count]
        rows[:, 0] = bits[(lanes & 1) != 0].sum()
        rows[:, 1] = (lanes == 7).any()
        rows[:, 2] = (lanes >= 0).all()
        rows[:, 3] = [bits[c_mod == c].sum() for c in c_mod]
        rows[:, 4] = (lanes % 2**32).sum() % 2**32
        rows[:, 5] = (lanes - 50).min() % 2**32
        rows[:, 6] = (lanes % 2**32).max()
        rows[:, 7] = mask
        same = bool((c_div == c_div[0]).all())
        rows[:, 8] = mask if same else 0
        rows[:, 9] = same
        rows[:, 10] = (lanes - 50).sum() % 2**32
        rows[:, 11] = np.where(low, bits[low & ((lanes & 2) != 0)].sum(), 0xDEAD)
    return out.astype(np.uint32)


def test_votes_match_and_reductions(host_launcher):
    rng = seeded("votes")
    p = np.concatenate([rng.integers(-3000, 3000, 32), rng.integers(0, 1000, 8)]).astype(np.int32)
    p[3] = 7
    out = np.zeros(40 * 12, np.uint32)
    WARP.launch(host_launcher, "emutest::votes", [p, out], **one_block(40))
    np.testing.assert_array_equal(out.reshape(40, 12), _votes_model(p))


# ---------------------------------------------------------------------------- misuse


@pytest.mark.parametrize(
    "expression, threads, match",
    [
        (
            "barrier_after_exit",
            32,
            r"emutest::barrier_after_exit: block \(0, 0, 0\), thread \(0, 0, 0\): waits at "
            r"__syncthreads at .*misuse.cu:\d+, but thread \(3, 0, 0\) has exited",
        ),
        (
            "divergent_barriers",
            32,
            r"emutest::divergent_barriers: .*__syncthreads at .*misuse.cu:\d+, but thread "
            r"\(1, 0, 0\) waits at __syncthreads at .*misuse.cu:\d+",
        ),
        (
            "shuffle_after_exit",
            32,
            r"emutest::shuffle_after_exit: .*__shfl_xor_sync with mask 0xffffffff at "
            r".*misuse.cu:\d+ names lane 5 \(thread \(5, 0, 0\)\), which has exited",
        ),
        (
            "shuffle_after_exit",
            40,  # the partial last warp: the full mask names lanes that do not exist
            r"names lane (5 .*has exited|8, which does not exist)",
        ),
        (
            "shuffle_against_barrier",
            32,
            r"__shfl_xor_sync with mask 0xffffffff .* names lane 16 \(thread \(16, 0, 0\)\), "
            r"which waits at __syncthreads",
        ),
        (
            "mask_without_caller",
            2,
            r"thread \(1, 0, 0\): __shfl_sync at .*misuse.cu:\d+: mask 0x00000001 does not name "
            r"the calling lane 1",
        ),
    ],
)
def test_misuse_is_an_error_naming_the_kernel(host_launcher, expression, threads, match):
    out = np.zeros(threads, np.float32)
    with pytest.raises(EmulatorFaultError, match=match):
        MISUSE.launch(host_launcher, f"emutest::{expression}", [out], **one_block(threads))


def test_shuffle_width_must_be_a_power_of_two(host_launcher):
    out = np.zeros(32, np.float32)
    with pytest.raises(EmulatorFaultError, match="width 3 is not a power of two"):
        MISUSE.launch(host_launcher, "emutest::bad_width", [out, 3], **one_block(32))
    MISUSE.launch(host_launcher, "emutest::bad_width", [out, 4], **one_block(32))


def test_builtin_in_a_sequential_launch_is_an_error(host_launcher):
    assert not is_cooperative(HIDDEN.path.read_text())
    out = np.zeros(4, np.float32)
    with pytest.raises(
        EmulatorFaultError, match="__syncthreads at .*hidden.cu:\\d+ in a launch without fibers"
    ):
        HIDDEN.launch(host_launcher, "emutest::hidden_barrier", [out], **one_block(4))


def test_dynamic_shared_memory_is_refused(host_launcher, tmp_path):
    source = tmp_path / "dynamic.cu"
    source.write_text("__global__ void k(float* p) { extern __shared__ float d[]; p[0] = d[0]; }\n")
    kernels = AdHocKernels(source, ["k"])
    with pytest.raises(EmulatorBuildError, match="extern __shared__ .* is not supported"):
        kernels.launch(host_launcher, "k", [np.zeros(1, np.float32)], **one_block(1))


def test_fault_inside_a_fiber_is_caught_and_the_process_survives(host_launcher):
    out = np.zeros(64, np.float32)
    with pytest.raises(EmulatorFaultError, match=r"past the end of argument 0 .*element 64 of 64"):
        MISUSE.launch(host_launcher, "emutest::write_past_end", [out, 64], **one_block(64))
    deep = np.zeros(4, np.int32)
    with pytest.raises(EmulatorFaultError, match="stack overflow"):
        MISUSE.launch(host_launcher, "emutest::overflow_stack", [deep, 1000], **one_block(4))
    MISUSE.launch(host_launcher, "emutest::overflow_stack", [deep, 10], **one_block(4))
    np.testing.assert_array_equal(deep, sum(range(11)))  # each frame adds its depth
    wide = np.zeros(128, np.float32)
    MISUSE.launch(host_launcher, "emutest::write_past_end", [wide, 64], **one_block(64))
    np.testing.assert_array_equal(wide, np.r_[np.zeros(64), np.ones(64)])


def test_undefined_behaviour_sanitizer_in_a_fiber():
    sanitized = HostLauncher(sanitize="undefined")
    sums = np.zeros(2, np.int32)
    x = np.arange(128, dtype=np.int32)
    BLOCK.launch(
        sanitized, "emutest::block_sum<int>", [x, sums, 128], grid=(2, 1, 1), block=(64, 1, 1)
    )
    np.testing.assert_array_equal(sums, x.reshape(2, 64).sum(1))
    out = np.zeros(8, np.int32)
    with pytest.raises(EmulatorFaultError, match="(?s)UBSan reported.*signed integer overflow"):
        MISUSE.launch(sanitized, "emutest::overflow_after_barrier", [out, 2**30], **one_block(8))


def test_ucontext_switch_agrees():
    """The portable context switch (ucontext) runs the same kernels as the assembly one."""
    portable = HostLauncher()
    portable.flags = portable.flags + ("-DCUPYDCN_EMULATION_UCONTEXT",)  # a build of its own
    x = seeded("ucontext").integers(-100, 100, 3 * 64).astype(np.int32)
    sums = np.zeros(3, np.int32)
    BLOCK.launch(
        portable, "emutest::block_sum<int>", [x, sums, x.size], grid=(3, 1, 1), block=(8, 8, 1)
    )
    np.testing.assert_array_equal(sums, x.reshape(3, 64).sum(1))
    out = np.zeros(32, np.float32)
    with pytest.raises(EmulatorFaultError, match="has exited"):
        MISUSE.launch(portable, "emutest::barrier_after_exit", [out], **one_block(32))


def test_cooperative_launch_speed(host_launcher):
    grid, block = (64, 1, 1), (256, 1, 1)
    x = seeded("speed").standard_normal(64 * 256).astype(np.float32)
    out = np.zeros_like(x)
    BLOCK.entries(host_launcher)  # build first
    start = time.perf_counter()
    BLOCK.launch(host_launcher, "emutest::barrier_rounds", [x, out, 4], grid=grid, block=block)
    elapsed = time.perf_counter() - start  # 64 blocks x 256 threads x 8 barriers
    assert elapsed < 0.5, f"{elapsed:.3f} s"
    v = x.reshape(64, 256).copy()
    for _ in range(4):
        v = np.float32(0.5) * (v + np.roll(v, -1, axis=1))
    np.testing.assert_array_equal(out.reshape(64, 256), v)


# ---------------------------------------------------------------------------- protocol v2


# templated.cu as a path relative to kernel_dir(), the form the tables hold
TEMPLATED = os.path.relpath(KERNELS / "templated.cu", kernel_source.kernel_dir())


@pytest.fixture
def templated_kernels(monkeypatch):
    """tests/emulator/kernels/templated.cu registered in the kernel_source tables as a
    source file with one template parameter, for the duration of a test."""
    if not (kernel_source.kernel_dir() / TEMPLATED).resolve().is_file():
        raise FileNotFoundError(TEMPLATED)
    kernels = ("emulator_test_scale", "emulator_test_indices")
    monkeypatch.setitem(kernel_source.KERNEL_TEMPLATES, TEMPLATED, kernels)
    for kernel in kernels:
        monkeypatch.setitem(kernel_source.SOURCE_OF_KERNEL, kernel, TEMPLATED)
    monkeypatch.setitem(
        kernel_source.KERNEL_PARAMETERS, "emulator_test_scale", "const T* input, T* output, I total"
    )
    monkeypatch.setitem(
        kernel_source.KERNEL_PARAMETERS, "emulator_test_indices", "I* output, I total"
    )
    monkeypatch.setitem(kernel_source.FILE_TEMPLATE_PARAMETERS, TEMPLATED, ("factor",))
    monkeypatch.setitem(kernel_source.FILE_SPECIALISATIONS, TEMPLATED, ((2,), (3,)))
    return kernels


@pytest.mark.parametrize("factor", [2, 3])
def test_template_arguments_reach_the_kernel(host_launcher, templated_kernels, factor):
    x = np.arange(1000, dtype=np.float32)
    out = host_launcher.xp.empty(1000, np.float32)
    start = len(host_launcher.launches)
    with record_calls() as calls:
        host_launcher.launch(
            "emulator_test_scale", "float32", 32, 1000, [x, out, 1000], template_args=(factor,)
        )
    np.testing.assert_array_equal(out, x * factor)
    record = host_launcher.launches[start]
    assert record.template_args == (factor,)
    assert (record.grid3, record.block3, record.grid, record.block) == (
        (4, 1, 1),
        (256, 1, 1),
        4,
        256,
    )
    assert calls.sequence == [("emulator_test_scale", (factor,), (4, 1, 1), (256, 1, 1))]
    with pytest.raises(ValueError, match=r"template arguments \(4,\) for \(factor\)"):
        host_launcher.launch(
            "emulator_test_scale", "float32", 32, 1000, [x, out, 1000], template_args=(4,)
        )
    with pytest.raises(ValueError, match="template arguments"):
        host_launcher.launch("emulator_test_scale", "float32", 32, 1000, [x, out, 1000])


def test_prebuild_takes_every_or_one_specialisation(templated_kernels):
    launcher = HostLauncher()
    launcher.prebuild([("emulator_test_scale", "float64", 64)])
    built = {
        key[3] for key in launcher._entries if key[:3] == ("emulator_test_scale", "float64", 64)
    }
    assert built == {(2,), (3,)}
    launcher.prebuild([("emulator_test_indices", "float32", 32, (3,))])
    assert ("emulator_test_indices", "float32", 32, (3,)) in launcher._entries
    with pytest.raises(ValueError, match="prebuild takes"):
        launcher.prebuild([("emulator_test_scale", "float64")])


def test_template_arguments_of_a_file_without_them_are_refused(host_launcher):
    a = np.zeros(8, np.float16)
    out = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="not one of the specialisations of convert.cu"):
        host_launcher.launch("widen_to_acc", "float16", 32, 8, [a, out, 8], template_args=(1,))


@pytest.mark.parametrize("order", [{}, {"reverse": True}, {"shuffle": 9}])
def test_explicit_three_dimensional_launch(templated_kernels, order):
    """A sequential (non-cooperative) kernel given a 3-D grid of 3-D blocks sees every
    (blockIdx, threadIdx) once, linearised x fastest."""
    launcher = HostLauncher(**order)
    grid, block = (3, 2, 2), (4, 2, 3)
    total = 12 * 24 - 5
    out = np.full(6 * total + 1, -1, np.int64)
    with record_calls() as calls:
        launcher.launch(
            "emulator_test_indices",
            "float32",
            64,
            total,
            [out, total],
            template_args=(3,),
            grid=grid,
            block=block,
        )
    assert calls.sequence == [("emulator_test_indices", (3,), grid, block)]
    assert launcher.launches[-1][4:] == (3, 4, (3,), grid, block)
    assert out[-1] == 3
    t = np.arange(total)
    thread, blk = t % 24, t // 24
    expected = np.stack(
        [thread % 4, thread // 4 % 2, thread // 8, blk % 3, blk // 3 % 2, blk // 6], axis=1
    )
    np.testing.assert_array_equal(out[:-1].reshape(total, 6), expected)


def test_launch_shape_checks(host_launcher, templated_kernels):
    out = np.zeros(7, np.int64)

    def launch(total: int, **shape) -> None:
        args = [out, total] if total else [None, 0]
        host_launcher.launch(
            "emulator_test_indices", "float32", 64, total, args, template_args=(2,), **shape
        )

    with pytest.raises(ValueError, match="grid and block go together"):
        launch(1, grid=(1, 1, 1))
    with pytest.raises(ValueError, match="1..1024 threads"):
        launch(1, grid=(1, 1, 1), block=(32, 32, 2))
    with pytest.raises(ValueError, match="must be \\(x, y, z\\)"):
        launch(1, grid=(1, 1), block=(1, 1, 1))
    with pytest.raises(ValueError, match="outside 1.."):
        launch(1, grid=(1, 65536, 1), block=(1, 1, 1))
    # total == 0 is recorded and launches nothing
    start = len(host_launcher.launches)
    with record_calls() as calls:
        launch(0, grid=(1, 1, 1), block=(1, 1, 1))
    assert calls.launch_count == 0 and len(host_launcher.launches) == start + 1
    launch(1, grid=(1, 1, 1), block=(1, 1, 1))
    assert out[:6].tolist() == [0] * 6 and out[6] == 2


def test_only_cooperative_files_run_as_fibers(host_launcher):
    assert not is_cooperative("// __syncthreads() in a comment\n/* __shared__ */ int x;")
    assert is_cooperative("__global__ void k() { __shared__ float s[4]; }")
    assert not host_launcher.entry("widen_to_acc", "float16", 32).cooperative
    assert all(e.cooperative for e in BLOCK.entries(host_launcher).values())


# ---------------------------------------------------------------------------- GEMM


def _operand(rng, shape, dtype_name, transpose):
    """A (batch, rows, cols) operand, stored transposed when ``transpose``, and op() of it
    in float64."""
    batch, rows, cols = shape
    stored = rng.standard_normal((batch, cols, rows) if transpose else shape)
    stored = stored.astype(dtype_of(dtype_name))
    exact = stored.astype(np.float64)
    return stored, np.swapaxes(exact, 1, 2) if transpose else exact


@pytest.mark.parametrize("transpose_a", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("transpose_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize(
    "dtype_name, out_dtype",
    [
        ("float64", "float64"),
        ("float32", "float32"),
        ("float16", "float32"),
        ("float16", "float16"),
        ("bfloat16", "float32"),
        ("bfloat16", "bfloat16"),
    ],
)
def test_gemm_matches_float64(host_launcher, transpose_a, transpose_b, dtype_name, out_dtype):
    rng = seeded("gemm", transpose_a, transpose_b, dtype_name, out_dtype)
    batch, m, n, k = 3, 5, 7, 33
    a, op_a = _operand(rng, (batch, m, k), dtype_name, transpose_a)
    b, op_b = _operand(rng, (batch, k, n), dtype_name, transpose_b)
    start = rng.standard_normal((batch, m, n)).astype(dtype_of(out_dtype))
    out = start.copy()
    alpha, beta = 0.75, -1.5
    with record_calls() as calls:
        host_launcher.gemm(
            a, b, out, transpose_a=transpose_a, transpose_b=transpose_b, alpha=alpha, beta=beta
        )
    c0 = start.astype(np.float64)
    expected = alpha * op_a @ op_b + beta * c0
    magnitude = abs(alpha) * np.abs(op_a) @ np.abs(op_b) + abs(beta) * np.abs(c0)
    assert_close_to_sum(out, expected, magnitude, out_dtype, "gemm")
    call = GemmCall(batch, m, n, k, dtype_name, out_dtype, False)
    assert host_launcher.gemms[-1] == call and calls.gemms == [call]
    assert call.flops == 2 * batch * m * n * k


def test_gemm_broadcasts_a_over_the_batch(host_launcher):
    """Batch stride 0 for ``a``; ``b``'s rows further apart than their length (a leading
    dimension, as cuBLAS takes)."""
    rng = seeded("gemm broadcast")
    a1 = rng.standard_normal((1, 4, 6)).astype(np.float32)
    a = np.broadcast_to(a1, (5, 4, 6))
    assert a.strides[0] == 0
    b = rng.standard_normal((5, 6, 8)).astype(np.float32)[:, :, :3]
    out = host_launcher.xp.empty((5, 4, 3), np.float32)  # NaN: beta = 0 must not read it
    host_launcher.gemm(a, b, out)
    expected = a1.astype(np.float64) @ b.astype(np.float64)
    magnitude = np.abs(a1.astype(np.float64)) @ np.abs(b.astype(np.float64))
    assert_close_to_sum(out, expected, magnitude, "float32", "broadcast gemm")


def test_gemm_tf32_rounds_the_operands(host_launcher):
    rng = seeded("tf32")
    a = rng.standard_normal((2, 3, 40)).astype(np.float32)
    b = rng.standard_normal((2, 40, 4)).astype(np.float32)
    out = np.zeros((2, 3, 4), np.float32)
    host_launcher.gemm(a, b, out, tf32=True)
    ra = round_to_tf32(np, a).astype(np.float64)
    rb = round_to_tf32(np, b).astype(np.float64)
    assert_close_to_sum(out, ra @ rb, np.abs(ra) @ np.abs(rb), "float32", "tf32 gemm")
    assert host_launcher.gemms[-1].tf32
    assert not np.array_equal(ra, a.astype(np.float64))


def test_gemm_refuses_bad_operands(host_launcher):
    a = np.zeros((2, 3, 4), np.float32)
    b = np.zeros((2, 4, 5), np.float32)
    out = np.zeros((2, 3, 5), np.float32)
    gemm = host_launcher.gemm
    with pytest.raises(ValueError, match="the matrices of a need unit element stride"):
        gemm(np.zeros((2, 3, 8), np.float32)[:, :, ::2], b, out)
    with pytest.raises(ValueError, match="the matrices of out need unit element stride"):
        gemm(a, b, np.zeros((2, 5, 3), np.float32).transpose(0, 2, 1))
    with pytest.raises(ValueError, match="does not give out"):
        gemm(a, b, np.zeros((2, 3, 6), np.float32))
    with pytest.raises(ValueError, match="does not give out"):
        gemm(a, b, out, transpose_a=True)
    with pytest.raises(ValueError, match="3-D"):
        gemm(a[0], b, out)
    with pytest.raises(TypeError, match="share a dtype"):
        gemm(a, b.astype(np.float64), out)
    with pytest.raises(TypeError, match="out must have dtype"):
        gemm(a, b, out.astype(np.float64))
    with pytest.raises(TypeError, match="out must have dtype"):
        gemm(a.astype(np.float16), b.astype(np.float16), out.astype(dtype_of("bfloat16")))
    with pytest.raises(ValueError, match="cannot broadcast"):
        gemm(a, b, np.broadcast_to(np.zeros((1, 3, 5), np.float32), (2, 3, 5)))
    with pytest.raises(TypeError, match="NumPy array"):
        gemm(a.tolist(), b, out)
    square = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="out overlaps a"):
        gemm(square, np.zeros((1, 4, 4), np.float32), square)
    unchecked = HostLauncher(checked=False)
    unchecked.gemm(square, np.eye(4, dtype=np.float32)[None], square)  # allowed unchecked
