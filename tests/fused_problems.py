"""The problems of the fused-kernel tests (tests/test_conv_fused_emulated.py and
tests/test_conv_fused_backward_emulated.py): a case's sizes and options, and the seeded
half-type arrays of one case, built once per (case, dtype) and test module."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest

from cupydcn.deform_conv.spec import conv_geometry
from support import dtype_of, seeded

BIG_WORKSPACE = 1 << 30
HALF_TYPES = ("float16", "bfloat16")
TYPES = [(d, b) for d in HALF_TYPES for b in (32, 64)]  # (dtype, index width)
TYPE_IDS = [f"{d}-i{b}" for d, b in TYPES]


@dataclass(frozen=True)
class Case:
    channels: int
    out_channels: int
    size: tuple[int, int]
    kernel: tuple[int, int] = (3, 3)
    batch: int = 1
    groups: int = 1
    offset_groups: int = 1
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding_mode: str = "zeros"
    with_mask: bool = True
    with_bias: bool = True
    offset_scale: float = 2.0
    edge_points: bool = False  # some offsets at +-1e4, +-inf, NaN


@dataclass
class Problem:
    """The arrays of ``case`` in ``dtype_name``, drawn from the generator seeded by
    (``seed``, case, dtype): input, offset (on a 1/1024 grid, a fifth of them integer
    points, some far out, infinite or NaN with ``edge_points``), weight (scaled by
    1/sqrt(fan-in)), bias and mask when the case has them; grad_output; the geometry."""

    case: Case
    dtype_name: str
    seed: str

    def __post_init__(self):
        case = self.case
        rng = seeded(self.seed, case, self.dtype_name)
        dtype = dtype_of(self.dtype_name)
        H, W = case.size
        kh, kw = case.kernel
        (sh, sw), (ph, pw), (dh, dw) = case.stride, case.padding, case.dilation
        out_h = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
        out_w = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
        taps, G, n = kh * kw, case.offset_groups, case.batch
        offset = rng.uniform(-case.offset_scale, case.offset_scale, (n, 2 * G * taps, out_h, out_w))
        offset = np.round(offset * 1024) / 1024
        offset[rng.random(offset.shape) < 0.2] = 0.0  # integer points
        if case.edge_points:
            flat = offset.reshape(-1)
            picks = rng.choice(flat.size, 12, replace=False)
            flat[picks] = rng.choice([1e4, -1e4, np.inf, -np.inf, np.nan, -H - 1.0, H], 12)
        arrays = {
            "input": rng.standard_normal((n, case.channels, H, W)),
            "offset": offset,
            "weight": rng.standard_normal((case.out_channels, case.channels // case.groups, kh, kw))
            / np.sqrt(case.channels // case.groups * taps),
            "bias": rng.standard_normal(case.out_channels) if case.with_bias else None,
            "mask": rng.uniform(-0.5, 1.5, (n, G * taps, out_h, out_w)) if case.with_mask else None,
        }
        self.arrays = {k: None if v is None else v.astype(dtype) for k, v in arrays.items()}
        self.geom = conv_geometry(
            self.arrays["input"],
            self.arrays["offset"],
            self.arrays["weight"],
            self.arrays["bias"],
            self.arrays["mask"],
            stride=case.stride,
            padding=case.padding,
            dilation=case.dilation,
            padding_mode=case.padding_mode,
        )
        self.grad_output = rng.standard_normal(self.geom.output_shape).astype(dtype)
        self.rng = rng

    def with_weight(self, weight: np.ndarray) -> Problem:
        """The problem with another weight (any number of output channels) and no bias."""
        other = Problem.__new__(Problem)
        other.case, other.dtype_name, other.seed = self.case, self.dtype_name, self.seed
        other.rng = self.rng
        other.arrays = {
            **self.arrays,
            "weight": weight.astype(dtype_of(self.dtype_name)),
            "bias": None,
        }
        other.geom = replace(self.geom, out_channels=weight.shape[0], has_bias=False)
        other.grad_output = None
        return other


def problems_fixture(cases: dict[str, Case], seed: str):
    """A module-scoped fixture ``problems``: ``problems(name, dtype_name)`` is the
    :class:`Problem` of ``cases[name]``, built once per module."""

    @pytest.fixture(scope="module")
    def problems():
        cache: dict[tuple[str, str], Problem] = {}

        def get(name: str, dtype_name: str) -> Problem:
            if (name, dtype_name) not in cache:
                cache[name, dtype_name] = Problem(cases[name], dtype_name, seed)
            return cache[name, dtype_name]

        return get

    return problems
