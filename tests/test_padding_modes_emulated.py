"""deform_conv2d's CUDA kernels with every ``padding_mode``, run on the CPU by the emulator
and, with the ``launcher`` fixture's ``cupy`` variant, on a GPU.

``cupydcn.deform_conv.cuda_backend`` drives the real ``cupydcn/cuda/kernels/deform_conv.cu`` through
:class:`HostLauncher` (tests/emulator) for every mode, dtype and index width, and is
compared with the NumPy backend in float64 on the same quantised inputs (the NumPy
backend is itself checked against the loop reference and finite differences in
tests/test_padding_modes.py). Sample points are exact in every accumulation dtype, so
points on the kinks (0, H-1, the reflection points) take the same branch on both sides:
a difference in the kink conventions would be an O(1) error, far above the tolerances.
"""

from __future__ import annotations

import numpy as np
import pytest

from cupydcn.deform_conv import cuda_backend as _conv_kernels
from cupydcn.deform_conv.numpy_backend import conv_backward as numpy_backward
from cupydcn.deform_conv.numpy_backend import conv_forward as numpy_forward
from cupydcn.deform_conv.spec import conv_geometry
from emulator.host_launcher import HostLauncher
from reference import ConvConfig, far_offsets, offsets_for_points
from support import DTYPE_NAMES, GRADS, assert_relative, dtype_of, on_device, seeded, to_numpy

# The column path (im2col, GEMMs, col2im), not the depthwise kernels "auto" would pick
# for some of these small grouped cases.
pytestmark = pytest.mark.usefixtures("im2col_only")

# Tests taking ``launcher`` are marked ``emulated`` (or ``gpu``) by its parameter; the
# others carry the mark themselves.
MODES = ("zeros", "border", "reflection")
WORKSPACE = 1 << 28
# max |got - expected| / max |expected| per tensor <= the dtype's ``relative`` bound of
# tests/support.py (float64: rounding only; the half types round every result once from
# float32: 2u = 2**-10 resp. 2**-7).


CONFIGS = {
    # 3x3, padding 1, points far beyond every side, on integers and halves
    "far": ConvConfig(batch=2, in_channels=4, out_channels=3, height=5, width=6, padding=(1, 1)),
    # non-square kernel, stride / padding / dilation per axis, groups and offset groups
    "grouped": ConvConfig(
        batch=3,
        in_channels=6,
        out_channels=4,
        groups=2,
        offset_groups=3,
        kernel=(2, 3),
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        height=7,
        width=8,
        with_bias=False,
    ),
    # every sample point on a kink of some mode: 0, H-1, +-k(H-1), -1, H (and for x)
    "kinks": ConvConfig(
        batch=2, in_channels=2, out_channels=2, height=5, width=4, kernel=(2, 2), padding=(1, 1)
    ),
    "h1": ConvConfig(
        batch=2,
        in_channels=2,
        out_channels=2,
        height=1,
        width=6,
        kernel=(1, 3),
        padding=(0, 1),
        with_mask=False,
    ),
    "w1": ConvConfig(
        batch=1,
        in_channels=3,
        out_channels=2,
        height=5,
        width=1,
        kernel=(3, 1),
        padding=(1, 0),
        offset_groups=3,
    ),
    "h1w1": ConvConfig(
        batch=2, in_channels=2, out_channels=1, height=1, width=1, kernel=(2, 2), padding=(1, 1)
    ),
}


def kink_offsets(config: ConvConfig, rng: np.random.Generator) -> np.ndarray:
    h, w = config.height - 1, config.width - 1
    ys = [-3 * h, -2 * h, -h, -1.0, -0.5, 0.0, 1.0, h - 0.5, h, h + 1.0, 2 * h, 3 * h + 0.5]
    xs = [-2 * w, -w, -1.0, 0.0, 0.5, w, w + 1.0, 2 * w, 3 * w, 4 * w + 0.25]
    kernel_h, kernel_w = config.kernel
    shape = (config.batch, config.offset_groups, kernel_h * kernel_w) + config.out_size
    return offsets_for_points(config, rng.choice(ys, size=shape), rng.choice(xs, size=shape))


class Problem:
    """One call in ``dtype_name`` and the NumPy backend's float64 answer on its values."""

    def __init__(self, name: str, mode: str, dtype_name: str, *, offset=None):
        config = CONFIGS[name]
        rng = seeded(name, mode, dtype_name)
        arrays = config.arrays(rng)
        if offset is None:
            offset = kink_offsets(config, rng) if name == "kinks" else far_offsets(config, rng)
        arrays["offset"] = offset
        dtype = dtype_of(dtype_name)
        self.dtype_name = dtype_name
        self.arrays = {
            k: None if v is None else np.ascontiguousarray(v.astype(dtype))
            for k, v in arrays.items()
        }
        self.grad_output = rng.normal(
            size=(config.batch, config.out_channels) + config.out_size
        ).astype(dtype)
        a = self.arrays
        self.geom = conv_geometry(
            a["input"],
            a["offset"],
            a["weight"],
            a["bias"],
            a["mask"],
            padding_mode=mode,
            **config.options,
        )

    def run(self, launcher, index_bits=None):
        """(output, grads) of the kernels, in NumPy."""
        a = {k: on_device(launcher, v) for k, v in self.arrays.items()}
        output = _conv_kernels.conv_forward(
            launcher,
            a["input"],
            a["offset"],
            a["weight"],
            a["bias"],
            a["mask"],
            self.geom,
            dtype_name=self.dtype_name,
            workspace_bytes=WORKSPACE,
            index_bits=index_bits,
        )
        grads = _conv_kernels.conv_backward(
            launcher,
            on_device(launcher, self.grad_output),
            a["input"],
            a["offset"],
            a["weight"],
            a["mask"],
            self.geom,
            dtype_name=self.dtype_name,
            wrt=frozenset(GRADS),
            workspace_bytes=WORKSPACE,
            index_bits=index_bits,
        )
        return to_numpy(output), [to_numpy(g) for g in grads]

    def expected(self):
        exact = {k: None if v is None else v.astype(np.float64) for k, v in self.arrays.items()}
        output = numpy_forward(
            exact["input"],
            exact["offset"],
            exact["weight"],
            exact["bias"],
            exact["mask"],
            self.geom,
            workspace_bytes=WORKSPACE,
        )
        grads = numpy_backward(
            self.grad_output.astype(np.float64),
            exact["input"],
            exact["offset"],
            exact["weight"],
            exact["mask"],
            self.geom,
            wrt=frozenset(GRADS),
            workspace_bytes=WORKSPACE,
        )
        return output, grads


def assert_close(got, expected, dtype_name: str, what: str) -> None:
    assert got is not None, f"{what}: missing"
    assert got.dtype == dtype_of(dtype_name), f"{what}: dtype {got.dtype}"
    assert_relative(got, expected, dtype_name, what)


def check(problem: Problem, output, grads) -> None:
    expected_output, expected_grads = problem.expected()
    assert_close(output, expected_output, problem.dtype_name, "output")
    for name, got, expected in zip(GRADS, grads, expected_grads):
        if expected is None:
            assert got is None, f"grad_{name} should be None"
        else:
            assert_close(got, expected, problem.dtype_name, f"grad_{name}")


@pytest.mark.parametrize("index_bits", [None, 64], ids=["auto-index", "index64"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kernels_match_numpy_backend(launcher, name, mode, dtype_name, index_bits):
    problem = Problem(name, mode, dtype_name)
    before = {k: None if v is None else v.tobytes() for k, v in problem.arrays.items()}
    start = len(launcher.launches)
    output, grads = problem.run(launcher, index_bits)
    assert {r.index_bits for r in launcher.launches[start:]} == {index_bits or 32}
    check(problem, output, grads)
    for k, v in problem.arrays.items():  # inputs untouched
        assert v is None or v.tobytes() == before[k]


def test_modes_reach_the_kernels(launcher):
    """The same inputs give three different results: the mode is not dropped on the way."""
    outputs = []
    for mode in MODES:
        problem = Problem("far", mode, "float64")
        problem.arrays = Problem("far", "zeros", "float64").arrays
        outputs.append(problem.run(launcher)[0])
    assert not np.allclose(outputs[0], outputs[1])
    assert not np.allclose(outputs[1], outputs[2])


def _nonfinite_offset(mode: str) -> np.ndarray:
    config = CONFIGS["far"]
    offset = far_offsets(config, np.random.default_rng(5))
    offset[0, 0, 0, 0] = np.inf  # tap 0 dy
    offset[0, 3, 1, 1] = -np.inf  # tap 1 dx
    offset[1, 4, 2, 2] = np.nan  # tap 2 dy
    offset[1, 9, 3, 3] = 1e30  # tap 4 dx
    offset[0, 16, 4, 5] = -1e30  # tap 8 dy
    return offset


@pytest.mark.parametrize("index_bits", [None, 64], ids=["auto-index", "index64"])
@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_and_huge_offsets(launcher, mode, dtype_name, index_bits):
    """NaN stays NaN; +-inf reads 0 (zeros), the edge (border) or NaN (reflection); 1e30
    maps exactly (fmod) where the mode maps."""
    problem = Problem("far", mode, dtype_name, offset=_nonfinite_offset(mode))
    output, grads = problem.run(launcher, index_bits)
    check(problem, output, grads)
    assert np.isnan(output[1, :, 2, 2]).all()
    assert np.isnan(output[0, :, 0, 0]).all() == (mode == "reflection")


@pytest.mark.parametrize("mode", ["border", "reflection"])
@pytest.mark.emulated
def test_undefined_behaviour_sanitizer(mode):
    """Non-finite, huge and kink points under UBSan, both index widths."""
    sanitized = HostLauncher(sanitize="undefined")
    for bits in (None, 64):
        for problem in (
            Problem("far", mode, "float32", offset=_nonfinite_offset(mode)),
            Problem("kinks", mode, "float32"),
            Problem("h1w1", mode, "float32"),
        ):
            output, grads = problem.run(sanitized, bits)
            check(problem, output, grads)
