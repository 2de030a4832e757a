"""The bad-input catalogue: every public op and backward refuses bad arguments cleanly.

One table (CASES) of bad calls, each checked for: the right CupydcnValueError /
CupydcnTypeError, a message that starts with the op's name and names the argument, a quick
return with little memory (tracemalloc peak and wall-clock bounds: no huge allocation, no
endless loop) and no backend reached (every backend function is replaced by one that
fails). ACCEPTED lists the arguments that must work (NumPy integer scalars and pairs,
0-d integer arrays, the largest allowed work per bin) and compares each with the call
spelled with Python ints.

The cases of the first-contact issue §3 are marked ``issue``: each failed before the fix
(raw TypeError / OverflowError / AttributeError, a terabyte allocation, a hung kernel).
The tests at the end pin the NumPy RoI backends' memory for the largest work per bin the
checks allow (MAX_SAMPLES_PER_BIN = 2**20 samples per bin): it stays within the backend's
workspace budget, and the blocked sampling gives the per-sample results.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import cupydcn
from cupydcn import CupydcnError, CupydcnTypeError, CupydcnValueError
from cupydcn.deform_conv.algorithm import ALGORITHMS

try:
    import torch
except ImportError:  # the torch-valued cases are left out
    torch = None

LIMIT = 2**31 - 1  # MAX_OPTION_VALUE: the largest size or count an option may take
MAX_GRID = 1024  # isqrt(MAX_SAMPLES_PER_BIN): samples per bin and axis
# A refused call must return within these (it only checks shapes, options and rois).
MAX_SECONDS = 2.0
MAX_PEAK_BYTES = 8 * 2**20


# ---------------------------------------------------------------------------- valid calls


def _rng():
    return np.random.default_rng(0)


def conv_args():
    rng = _rng()
    f32 = np.float32
    return dict(
        input=rng.standard_normal((1, 2, 5, 5)).astype(f32),
        offset=rng.standard_normal((1, 18, 5, 5)).astype(f32),
        weight=rng.standard_normal((3, 2, 3, 3)).astype(f32),
        bias=rng.standard_normal((3,)).astype(f32),
        mask=rng.uniform(size=(1, 9, 5, 5)).astype(f32),
        stride=1,
        padding=1,
        dilation=1,
    )


def conv_backward_args():
    args = conv_args()
    del args["bias"]
    args["grad_output"] = _rng().standard_normal((1, 3, 5, 5)).astype(np.float32)
    return args


def roi_args():
    rng = _rng()
    f32 = np.float32
    return dict(
        input=rng.standard_normal((2, 3, 8, 8)).astype(f32),
        rois=np.array([[0, 1, 1, 6, 5], [1, 0.5, 2, 7, 7.5]], f32),
        offset=(0.1 * rng.standard_normal((2, 2, 2, 2))).astype(f32),
        mask=rng.uniform(size=(2, 1, 2, 2)).astype(f32),
        output_size=2,
        spatial_scale=1.0,
        sampling_ratio=2,
        gamma=0.1,
    )


def roi_backward_args():
    args = roi_args()
    args["grad_output"] = _rng().standard_normal((2, 3, 2, 2)).astype(np.float32)
    return args


def psroi_args():
    rng = _rng()
    f32 = np.float32
    return dict(
        input=rng.standard_normal((2, 2 * 2 * 2, 8, 8)).astype(f32),
        rois=np.array([[0, 1, 1, 6, 5], [1, 0.5, 2, 7, 7.5]], f32),
        offset=(0.1 * rng.standard_normal((2, 2, 2, 2))).astype(f32),
        output_dim=2,
        group_size=2,
        pooled_size=2,
        part_size=2,
        sample_per_part=2,
        spatial_scale=1.0,
        trans_std=0.1,
    )


def psroi_backward_args():
    args = psroi_args()
    args["grad_output"] = _rng().standard_normal((2, 2, 2, 2)).astype(np.float32)
    return args


def penalty_args():
    return dict(
        offset=_rng().standard_normal((1, 18, 5, 5)).astype(np.float32),
        weight=1.0,
        reduction="mean",
    )


def penalty_backward_args():
    return dict(grad=np.asarray(1.0, np.float32), **penalty_args())


def sampling_args():
    return dict(
        offset=_rng().standard_normal((1, 18, 5, 5)).astype(np.float32),
        kernel_size=3,
        stride=1,
        padding=1,
        dilation=1,
    )


def stacked_args():
    rng = _rng()
    return dict(
        offsets=[
            rng.standard_normal((1, 18, 5, 5)).astype(np.float32),
            rng.standard_normal((1, 18, 5, 5)).astype(np.float32),
        ],
        points=[[2, 2], [0.5, 4]],
        kernel_size=3,
        stride=1,
        padding=1,
        dilation=1,
        masks=[None, rng.uniform(size=(1, 9, 5, 5)).astype(np.float32)],
        offset_group=0,
        interpolation="bilinear",
    )


@dataclass(frozen=True)
class Op:
    function: Callable[..., Any]
    args: Callable[[], dict]


OPS = {
    "deform_conv2d": Op(cupydcn.deform_conv2d, conv_args),
    "deform_conv2d_backward": Op(cupydcn.deform_conv2d_backward, conv_backward_args),
    "deform_roi_pool": Op(cupydcn.deform_roi_pool, roi_args),
    "deform_roi_pool_backward": Op(cupydcn.deform_roi_pool_backward, roi_backward_args),
    "deform_psroi_pool": Op(cupydcn.deform_psroi_pool, psroi_args),
    "deform_psroi_pool_backward": Op(cupydcn.deform_psroi_pool_backward, psroi_backward_args),
    "offset_l2_penalty": Op(cupydcn.offset_l2_penalty, penalty_args),
    "offset_l2_penalty_backward": Op(cupydcn.offset_l2_penalty_backward, penalty_backward_args),
    "sampling_locations": Op(cupydcn.sampling_locations, sampling_args),
    "effective_dilation": Op(cupydcn.effective_dilation, sampling_args),
    "stacked_sampling_locations": Op(cupydcn.stacked_sampling_locations, stacked_args),
}
CONV = ("deform_conv2d", "deform_conv2d_backward")
ROI = ("deform_roi_pool", "deform_roi_pool_backward")
PSROI = ("deform_psroi_pool", "deform_psroi_pool_backward")
PENALTY = ("offset_l2_penalty", "offset_l2_penalty_backward")
SAMPLING = ("sampling_locations", "effective_dilation")
SSL = "stacked_sampling_locations"
BACKWARDS = ("deform_conv2d_backward", "deform_roi_pool_backward", "deform_psroi_pool_backward")


def call(op: str, changes=None):
    """Call ``op`` with its valid arguments changed by ``changes`` (a dict of replacements,
    or a function taking and returning the argument dict)."""
    args = OPS[op].args()
    if callable(changes):
        args = changes(args)
    elif changes:
        args.update(changes)
    return OPS[op].function(**args)


# ---------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Case:
    id: str
    op: str
    changes: Any
    error: type
    fragments: tuple[str, ...]
    issue: bool = False  # quoted in the first-contact issue §3 (failed before the fix)
    huge: bool = False  # before the fix: a huge allocation or an endless loop


CASES: list[Case] = []


def case(id, op, changes, error, *fragments, issue=False, huge=False):
    CASES.append(Case(f"{op}-{id}", op, changes, error, tuple(fragments), issue, huge))


def with_array(name, make):
    """Replace array ``name`` by ``make(args)`` (an array derived from the valid ones)."""

    def change(args):
        args[name] = make(args)
        return args

    return change


# -- None for each required array (issue: AttributeError 'NoneType' has no 'shape')
REQUIRED = {
    "deform_conv2d": ("input", "offset", "weight"),
    "deform_conv2d_backward": ("grad_output", "input", "offset", "weight"),
    "deform_roi_pool": ("input", "rois"),
    "deform_roi_pool_backward": ("grad_output", "input", "rois"),
    "deform_psroi_pool": ("input", "rois"),
    "deform_psroi_pool_backward": ("grad_output", "input", "rois"),
    "offset_l2_penalty": ("offset",),
    "offset_l2_penalty_backward": ("grad", "offset"),
    "sampling_locations": ("offset",),
    "effective_dilation": ("offset",),
}
for op, names in REQUIRED.items():
    for name in names:
        case(
            f"{name}-None",
            op,
            {name: None},
            CupydcnTypeError,
            f"{name} must be an array; got None",
            issue=op in CONV + ROI + PSROI,
        )
case(
    "offsets-None",
    "stacked_sampling_locations",
    {"offsets": None},
    CupydcnTypeError,
    "offsets must be a non-empty list",
)
case(
    "offsets-empty",
    "stacked_sampling_locations",
    {"offsets": []},
    CupydcnTypeError,
    "offsets must be a non-empty list",
)
case(
    "offsets-entry-None",
    "stacked_sampling_locations",
    lambda a: {**a, "offsets": [a["offsets"][0], None]},
    CupydcnTypeError,
    "offsets[1] must be an array; got None",
)
case(
    "points-None",
    "stacked_sampling_locations",
    {"points": None},
    CupydcnTypeError,
    "points must be an array; got None",
)

# -- non-arrays, mixed libraries
case(
    "input-list",
    "deform_conv2d",
    {"input": [[1.0]]},
    CupydcnTypeError,
    "input must be an array supporting DLPack",
)
case(
    "rois-list",
    "deform_roi_pool",
    {"rois": [[0, 1, 1, 2, 2]]},
    CupydcnTypeError,
    "rois must be an array supporting DLPack",
)
case(
    "offset-float",
    "offset_l2_penalty",
    {"offset": 1.0},
    CupydcnTypeError,
    "offset must be an array supporting DLPack",
)
if torch is not None:
    case(
        "mixed-libraries",
        "deform_conv2d",
        with_array("input", lambda a: torch.from_numpy(a["input"])),
        CupydcnTypeError,
        "input is a torch.Tensor but offset is a numpy.ndarray",
    )
    case(
        "mixed-libraries",
        "deform_roi_pool",
        with_array("rois", lambda a: torch.from_numpy(a["rois"])),
        CupydcnTypeError,
        "rois is a torch.Tensor",
    )
    case(
        "points-other-library",
        "stacked_sampling_locations",
        {"points": torch.tensor([[1.0, 1.0]])},
        CupydcnTypeError,
        "points is a torch.Tensor",
    )

# -- int options: wrong types, out of range, huge (issue: np.array stride, padding=2**63)
NOT_INTS = [
    ("float", 1.0),
    ("str", "1"),
    ("bool", True),
    ("np-bool", np.True_),
    ("array", np.array([1, 1])),
    ("0d-float-array", np.array(1.0)),
    ("0d-bool-array", np.array(True)),
    ("complex", 1 + 0j),
    ("object", object()),
]
if torch is not None:
    NOT_INTS += [("torch-float", torch.tensor(1.5)), ("torch-bool", torch.tensor(True))]
NOT_PAIRS = [
    ("triple", (1, 1, 1)),
    ("float-in-pair", (1, 1.0)),
    ("nested", [[1, 1]]),
    ("bool-in-pair", (1, True)),
    ("array-in-pair", (1, np.array([1]))),
]
HUGE = [("2**31", 2**31), ("2**63", 2**63), ("np-uint64", np.uint64(2**63))]

# (op, option, minimum, maximum, is a pair option, None allowed)
INT_OPTIONS = []
for op in CONV:
    INT_OPTIONS += [
        (op, "stride", 1, LIMIT, True),
        (op, "padding", 0, LIMIT, True),
        (op, "dilation", 1, LIMIT, True),
    ]
for op in ROI:
    INT_OPTIONS += [(op, "output_size", 1, LIMIT, True), (op, "sampling_ratio", 0, MAX_GRID, False)]
for op in PSROI:
    INT_OPTIONS += [
        (op, "output_dim", 1, LIMIT, False),
        (op, "group_size", 1, 46340, False),
        (op, "pooled_size", 1, 46340, False),
        (op, "part_size", 1, 46340, False),
        (op, "sample_per_part", 1, MAX_GRID, False),
    ]
for op in SAMPLING + ("stacked_sampling_locations",):
    INT_OPTIONS += [
        (op, "kernel_size", 1, LIMIT, True),
        (op, "stride", 1, LIMIT, True),
        (op, "padding", 0, LIMIT, True),
        (op, "dilation", 1, LIMIT, True),
    ]

for op, name, minimum, maximum, pair in INT_OPTIONS:
    for label, value in NOT_INTS + (NOT_PAIRS if pair else [("pair", (1, 1))]):
        if op == SSL and label == "nested":
            continue  # a list is one value per layer there
        case(
            f"{name}-{label}",
            op,
            {name: value},
            CupydcnTypeError,
            f"{name} must be an int",
            issue=(op, name, label) == ("deform_conv2d", "stride", "array"),
        )
    if name != "part_size":  # part_size=None means pooled_size
        case(f"{name}-None", op, {name: None}, CupydcnTypeError, f"{name} must be an int")
    case(
        f"{name}-below-minimum",
        op,
        {name: minimum - 1},
        CupydcnValueError,
        f"{name} must be >= {minimum}",
    )
    case(
        f"{name}-above-maximum",
        op,
        {name: maximum + 1},
        CupydcnValueError,
        f"{name} must be at most {maximum}",
    )
    for label, value in HUGE:
        case(
            f"{name}-{label}",
            op,
            {name: value},
            CupydcnValueError,
            f"{name} must be at most {maximum}",
            issue=(op, name, label) == ("deform_conv2d", "padding", "2**63"),
            huge=name in ("sampling_ratio", "sample_per_part"),
        )
    if pair:
        case(
            f"{name}-pair-one-huge",
            op,
            {name: (1, 2**63)},
            CupydcnValueError,
            f"{name} must be at most {maximum} in both dimensions",
        )
        case(
            f"{name}-pair-one-low",
            op,
            {name: (minimum - 1, 1)},
            CupydcnValueError,
            f"{name} must be >= {minimum} in both dimensions",
        )

# The issue's quoted values, named as such.
case(
    "sampling_ratio-10**6",
    "deform_roi_pool",
    {"sampling_ratio": 10**6},
    CupydcnValueError,
    "sampling_ratio must be at most 1024; got 1000000",
    issue=True,
    huge=True,
)
case(
    "sampling_ratio-10**6",
    "deform_roi_pool_backward",
    {"sampling_ratio": 10**6},
    CupydcnValueError,
    "sampling_ratio must be at most 1024; got 1000000",
    huge=True,
)
case(
    "sample_per_part-46340",
    "deform_psroi_pool",
    {"sample_per_part": 46340},
    CupydcnValueError,
    "sample_per_part must be at most 1024; got 46340",
    issue=True,
    huge=True,
)
case(
    "sample_per_part-46340",
    "deform_psroi_pool_backward",
    {"sample_per_part": 46340},
    CupydcnValueError,
    "sample_per_part must be at most 1024; got 46340",
    huge=True,
)

# workspace_bytes: a positive int or None
for op in CONV:
    for label, value in [("float", 1.5), ("str", "1"), ("bool", True), ("array", np.array([1]))]:
        case(
            f"workspace_bytes-{label}",
            op,
            {"workspace_bytes": value},
            CupydcnTypeError,
            "workspace_bytes must be an int or None",
        )
    case(
        "workspace_bytes-0",
        op,
        {"workspace_bytes": 0},
        CupydcnValueError,
        "workspace_bytes must be positive",
    )

# algorithm: None or one of the CUDA algorithms
_ALGORITHM_NAMES = ", ".join(map(repr, ALGORITHMS))
for op in CONV:
    for label, value in [("int", 1), ("bool", True), ("bytes", b"auto")]:
        case(
            f"algorithm-{label}",
            op,
            {"algorithm": value},
            CupydcnTypeError,
            f"algorithm must be a str ({_ALGORITHM_NAMES}) or None",
        )
    case(
        "algorithm-unknown",
        op,
        {"algorithm": "fast"},
        CupydcnValueError,
        f"algorithm must be one of {_ALGORITHM_NAMES}; got 'fast'",
    )

# stacked_sampling_locations: offset_group, per-layer lists
for label, value in [("bool", True), ("float", 0.0), ("str", "0"), ("None", None)]:
    case(
        f"offset_group-{label}",
        SSL,
        {"offset_group": value},
        CupydcnTypeError,
        "offset_group for layer 0 must be an int in [0, 1)",
    )
for label, value in [("negative", -1), ("too-large", 1), ("2**70", 2**70)]:
    case(
        f"offset_group-{label}",
        SSL,
        {"offset_group": value},
        CupydcnValueError,
        "offset_group for layer 0 must be an int in [0, 1)",
    )
case(
    "stride-list-length",
    SSL,
    {"stride": [1, 1, 1]},
    CupydcnValueError,
    "stride is a list of 3 entries; expected one per layer (2)",
)
case(
    "masks-length",
    SSL,
    {"masks": [None]},
    CupydcnValueError,
    "masks must be None or a list of 2 entries",
)
case("masks-int", SSL, {"masks": 3}, CupydcnValueError, "masks must be None or a list")

# -- float options: NaN / inf, wrong types
NOT_REALS = [
    ("str", "1"),
    ("None", None),
    ("complex", 1 + 0j),
    ("bool", True),
    ("array", np.array([1.0])),
    ("0d-array", np.array(1.0)),
]
FLOAT_OPTIONS = (
    [(op, "spatial_scale") for op in ROI + PSROI]
    + [(op, "gamma") for op in ROI]
    + [(op, "trans_std") for op in PSROI]
    + [(op, "weight") for op in PENALTY]
)
for op, name in FLOAT_OPTIONS:
    for label, value in [
        ("nan", float("nan")),
        ("inf", float("inf")),
        ("-inf", -np.inf),
        ("np-nan", np.float32("nan")),
    ]:
        case(f"{name}-{label}", op, {name: value}, CupydcnValueError, f"{name} must be finite")
    for label, value in NOT_REALS:
        case(
            f"{name}-{label}", op, {name: value}, CupydcnTypeError, f"{name} must be a real number"
        )
for op in PSROI:
    for value in (0, -1.0):
        case(
            f"spatial_scale-{value}",
            op,
            {"spatial_scale": value},
            CupydcnValueError,
            "spatial_scale must be > 0",
        )

# -- string options
for op in CONV:
    for label, value in [("unknown", "zero"), ("int", 3), ("None", None)]:
        case(
            f"padding_mode-{label}",
            op,
            {"padding_mode": value},
            CupydcnValueError,
            "padding_mode must be one of",
        )
for op in PENALTY:
    for label, value in [("unknown", "avg"), ("int", 3), ("None", None)]:
        case(
            f"reduction-{label}",
            op,
            {"reduction": value},
            CupydcnValueError,
            "reduction must be one of",
        )
for label, value in [("unknown", "linear"), ("int", 3)]:
    case(
        f"interpolation-{label}",
        SSL,
        {"interpolation": value},
        CupydcnValueError,
        "interpolation must be one of",
    )

# -- wrt: types (issue: wrt=3 gave a raw TypeError) and names
for op in BACKWARDS:
    for label, value in [
        ("int", 3),
        ("float", 1.5),
        ("bytes", b"input"),
        ("int-list", [3]),
        ("none-in-list", ["input", None]),
        ("object", object()),
    ]:
        case(
            f"wrt-{label}",
            op,
            {"wrt": value},
            CupydcnTypeError,
            "wrt must be None, a gradient name or an iterable of names",
            issue=op == "deform_conv2d_backward" and label == "int",
        )
    for label, value in [
        ("unknown", "inputs"),
        ("unknown-in-list", ["input", "rois"]),
        ("weight-of-pooling", "weight"),
    ]:
        if op == "deform_conv2d_backward" and value == "weight":
            continue
        case(f"wrt-{label}", op, {"wrt": value}, CupydcnValueError, "wrt names [")
for op, name in [
    ("deform_conv2d_backward", "mask"),
    ("deform_roi_pool_backward", "mask"),
    ("deform_roi_pool_backward", "offset"),
    ("deform_psroi_pool_backward", "offset"),
]:
    case(
        f"wrt-{name}-without-{name}",
        op,
        {"wrt": [name], name: None},
        CupydcnValueError,
        f"wrt names {name!r} but {name} is None",
    )

# -- dtypes
FLOAT_ARRAYS = {
    "deform_conv2d": ("input", "offset", "weight", "bias", "mask"),
    "deform_conv2d_backward": ("grad_output", "input", "offset", "weight", "mask"),
    "deform_roi_pool": ("input", "offset", "mask"),
    "deform_roi_pool_backward": ("grad_output", "input", "offset", "mask"),
    "deform_psroi_pool": ("input", "offset"),
    "deform_psroi_pool_backward": ("grad_output", "input", "offset"),
    "offset_l2_penalty": ("offset",),
    "offset_l2_penalty_backward": ("grad", "offset"),
    "sampling_locations": ("offset",),
    "effective_dilation": ("offset",),
}
for op, names in FLOAT_ARRAYS.items():
    for name in names:
        for dtype in (np.int32, np.bool_, np.complex64):
            case(
                f"{name}-{np.dtype(dtype).name}",
                op,
                with_array(name, lambda a, name=name, dtype=dtype: a[name].astype(dtype)),
                CupydcnTypeError,
                f"{name} has dtype {np.dtype(dtype).name}",
            )
        if len(names) == 1:
            continue  # float64 alone is valid
        case(
            f"{name}-float64-among-float32",
            op,
            with_array(name, lambda a, name=name: a[name].astype(np.float64)),
            CupydcnTypeError,
            "float64",
            name,
        )
for op in ROI + PSROI:
    case(
        "rois-int",
        op,
        with_array("rois", lambda a: a["rois"].astype(np.int32)),
        CupydcnTypeError,
        "rois has dtype int32",
    )
case(
    "offsets-int",
    SSL,
    lambda a: {**a, "offsets": [o.astype(np.int32) for o in a["offsets"]]},
    CupydcnTypeError,
    "offsets[0] has dtype int32",
)

# -- points of stacked_sampling_locations (issue: NumPy's conversion error)
for label, value, error, fragment in [
    ("strings", [["a", "b"]], CupydcnTypeError, "points must be [P, 2] (oy, ox) numbers"),
    ("ragged", [[1, 2], [3]], CupydcnTypeError, "points must be [P, 2] (oy, ox) numbers"),
    ("dict-rows", [{"y": 1}], CupydcnTypeError, "points must be [P, 2] (oy, ox) numbers"),
    ("None-entry", [[None, 1]], CupydcnValueError, "points must be finite"),
    ("nan", [[np.nan, 1]], CupydcnValueError, "points must be finite"),
    ("inf", [[1, np.inf]], CupydcnValueError, "points must be finite"),
    ("flat", [1, 2], CupydcnValueError, "points must have shape [P, 2]"),
    ("three-columns", [[1, 2, 3]], CupydcnValueError, "points must have shape [P, 2]"),
    ("str", "12", CupydcnTypeError, "points must be an array supporting DLPack"),
    ("array-strings", np.array([["a", "b"]]), CupydcnTypeError, "points has dtype <U1"),
    (
        "array-object",
        np.array([[None, 1]], dtype=object),
        CupydcnTypeError,
        "points has dtype object",
    ),
    ("array-complex", np.array([[1j, 1]]), CupydcnTypeError, "points has dtype complex128"),
    ("array-bool", np.array([[True, False]]), CupydcnTypeError, "points has dtype bool"),
    ("array-nan", np.array([[np.nan, 1.0]]), CupydcnValueError, "points must be finite"),
    ("array-flat", np.array([1.0, 2.0]), CupydcnValueError, "points must have shape [P, 2]"),
]:
    case(
        f"points-{label}",
        SSL,
        {"points": value},
        error,
        fragment,
        issue=label in ("strings", "array-strings"),
    )

# -- shapes
case(
    "C_out-0",
    "deform_conv2d",
    lambda a: {**a, "weight": a["weight"][:0], "bias": None},
    CupydcnValueError,
    "weight must have at least one output channel",
    issue=True,
)
case(
    "C_out-0",
    "deform_conv2d_backward",
    lambda a: {**a, "weight": a["weight"][:0], "grad_output": a["grad_output"][:, :0]},
    CupydcnValueError,
    "weight must have at least one output channel",
)
for op in CONV:
    for name in ("input", "offset", "weight"):
        case(
            f"{name}-3d",
            op,
            with_array(name, lambda a, name=name: a[name][0]),
            CupydcnValueError,
            f"{name} must be 4-D",
        )
    case(
        "input-0-channels",
        op,
        lambda a: {**a, "input": a["input"][:, :0], "weight": a["weight"][:, :0]},
        CupydcnValueError,
        "input must have at least one channel",
    )
    case(
        "weight-kernel-0",
        op,
        with_array("weight", lambda a: a["weight"][..., :0]),
        CupydcnValueError,
        "weight must have a kernel of at least 1 x 1",
    )
    case(
        "weight-channels",
        op,
        with_array("weight", lambda a: np.concatenate([a["weight"], a["weight"][:, :1]], axis=1)),
        CupydcnValueError,
        "weight.shape[1] = 3",
    )
    case(
        "offset-channels",
        op,
        with_array("offset", lambda a: a["offset"][:, :-1]),
        CupydcnValueError,
        "offset.shape[1] = 17",
    )
    case(
        "offset-size",
        op,
        with_array("offset", lambda a: a["offset"][..., :-1]),
        CupydcnValueError,
        "offset has shape (1, 18, 5, 4)",
    )
    case(
        "mask-shape",
        op,
        with_array("mask", lambda a: a["mask"][:, :-1]),
        CupydcnValueError,
        "mask has shape (1, 8, 5, 5)",
    )
    case(
        "output-empty",
        op,
        {"padding": 0, "dilation": 3},
        CupydcnValueError,
        "the output size would be",
    )
case(
    "bias-shape",
    "deform_conv2d",
    with_array("bias", lambda a: a["bias"][:-1]),
    CupydcnValueError,
    "bias has shape (2,)",
)
for op in ROI + PSROI:
    case(
        "input-3d",
        op,
        with_array("input", lambda a: a["input"][0]),
        CupydcnValueError,
        "input must be 4-D",
    )
    case(
        "rois-1d",
        op,
        with_array("rois", lambda a: a["rois"][0]),
        CupydcnValueError,
        "rois must have shape [K, 5]",
    )
    case(
        "rois-4-columns",
        op,
        with_array("rois", lambda a: a["rois"][:, :4]),
        CupydcnValueError,
        "rois must have shape [K, 5]",
    )
    case(
        "offset-shape",
        op,
        with_array("offset", lambda a: a["offset"][:1]),
        CupydcnValueError,
        "offset has shape (1, 2, 2, 2)",
    )
case(
    "input-empty-map",
    "deform_roi_pool",
    with_array("input", lambda a: a["input"][:, :, :0]),
    CupydcnValueError,
    "input must have a spatial size of at least 1 x 1",
)
for op in ROI:
    case(
        "mask-shape",
        op,
        with_array("mask", lambda a: a["mask"][..., :1]),
        CupydcnValueError,
        "mask has shape (2, 1, 2, 1)",
    )
for op in PSROI:
    case(
        "input-channels",
        op,
        with_array("input", lambda a: a["input"][:, :-1]),
        CupydcnValueError,
        "input has 7 channels",
    )
    case(
        "offset-3d",
        op,
        with_array("offset", lambda a: a["offset"][0]),
        CupydcnValueError,
        "offset must be 4-D",
    )
    case(
        "offset-odd-channels",
        op,
        with_array("offset", lambda a: a["offset"][:, :1]),
        CupydcnValueError,
        "offset.shape[1] = 1 must be 2 * num_classes",
    )
    case(
        "classes-do-not-divide-output_dim",
        op,
        with_array("offset", lambda a: np.concatenate([a["offset"]] * 3, axis=1)),
        CupydcnValueError,
        "output_dim = 2 must be divisible by num_classes = 3",
    )
for op in BACKWARDS:
    case(
        "grad_output-shape",
        op,
        with_array("grad_output", lambda a: a["grad_output"][..., :-1]),
        CupydcnValueError,
        "grad_output has shape",
    )
case(
    "grad-shape",
    "offset_l2_penalty_backward",
    with_array("grad", lambda a: np.ones((2,), np.float32)),
    CupydcnValueError,
    "grad has shape (2,)",
)
for op in SAMPLING:
    case(
        "offset-3d",
        op,
        with_array("offset", lambda a: a["offset"][0]),
        CupydcnValueError,
        "offset must be 4-D",
    )
    case(
        "offset-channels",
        op,
        with_array("offset", lambda a: a["offset"][:, :-1]),
        CupydcnValueError,
        "offset.shape[1] = 17",
    )
case(
    "one-tap-kernel",
    "effective_dilation",
    lambda a: {**a, "kernel_size": 1, "offset": a["offset"][:, :2]},
    CupydcnValueError,
    "kernel_size must have at least two taps",
)
case("layer-size", SSL, {"stride": [1, 2]}, CupydcnValueError, "offsets[1] has output size 5 x 5")
case(
    "layer-batch",
    SSL,
    lambda a: {**a, "offsets": [a["offsets"][0], np.concatenate([a["offsets"][1]] * 2)]},
    CupydcnValueError,
    "offsets[1] has batch 2",
)
case(
    "mask-shape",
    SSL,
    lambda a: {**a, "masks": [None, a["masks"][1][:, :-1]]},
    CupydcnValueError,
    "masks[1] has shape (1, 8, 5, 5)",
)


# -- RoI values (read on the arrays' device before any kernel)
def with_roi(row, *, dtype=np.float32, input_dtype=None):
    def change(args):
        args["rois"] = np.array([row], dtype)
        if input_dtype is not None:
            for name in ("input", "offset", "mask", "grad_output"):
                if args.get(name) is not None:
                    args[name] = args[name].astype(input_dtype)
        for name in ("offset", "mask", "grad_output"):
            if args.get(name) is not None:
                args[name] = args[name][:1]
        return args

    return change


for op in ROI + PSROI:
    case(
        "rois-nan",
        op,
        with_roi([0, np.nan, 1, 2, 2]),
        CupydcnValueError,
        "rois[0] = [0.0, nan, 1.0, 2.0, 2.0] has a non-finite value",
    )
    case("rois-inf", op, with_roi([0, 1, 1, np.inf, 2]), CupydcnValueError, "rois[0]", "non-finite")
    case(
        "rois-fractional-batch",
        op,
        with_roi([0.5, 1, 1, 2, 2]),
        CupydcnValueError,
        "rois[0, 0] = 0.5 is not an integer batch index",
    )
    case(
        "rois-batch-out-of-range",
        op,
        with_roi([2, 1, 1, 2, 2]),
        CupydcnValueError,
        "rois[0, 0] = 2 is outside the batch range [0, 2)",
    )
    case(
        "rois-negative-batch",
        op,
        with_roi([-1, 1, 1, 2, 2]),
        CupydcnValueError,
        "rois[0, 0] = -1 is outside the batch range [0, 2)",
    )

# Work per bin with the adaptive grid (sampling_ratio=0): at most MAX_SAMPLES_PER_BIN.
# Issue: a 1e9 px RoI tried to allocate 6.94 EiB; a 1e4 px RoI with output 1x1 ran for minutes.
ADAPTIVE = {"sampling_ratio": 0}
for op in ROI:
    issue = op == "deform_roi_pool"
    for label, row, changes in [
        ("roi-1e9px", [0, 0, 0, 1e9, 1e9], {}),
        ("roi-1e4px-output-1x1", [0, 0, 0, 1e4, 1e4], {"output_size": 1}),
        ("roi-1025px-output-1x1", [0, 0, 0, 1025, 1024], {"output_size": 1}),
        ("roi-2049px-output-2x2", [0, 0, 0, 2049, 2049], {}),
        ("roi-1e6-times-spatial_scale-1e3", [0, 0, 0, 1e6, 1e6], {"spatial_scale": 1e3}),
    ]:

        def change(args, row=row, changes=changes):
            args = with_roi(row)(args)
            args.update(ADAPTIVE, **changes)
            if args["output_size"] == 1:
                for name in ("offset", "mask", "grad_output"):
                    if args.get(name) is not None:
                        args[name] = args[name][..., :1, :1]
            return args

        case(
            label,
            op,
            change,
            CupydcnValueError,
            "rois[0] = [0.0, 0.0, 0.0,",
            "samples per output bin with sampling_ratio=0",
            "the limit is 1048576",
            "pass a sampling_ratio",
            issue=issue and label != "roi-1025px-output-1x1",
            huge=True,
        )

    # coordinates that overflow to inf times spatial_scale (float64: inf samples)
    def overflow(args):
        args = with_roi([0, 0, 0, 1e300, 1e300], dtype=np.float64, input_dtype=np.float64)(args)
        args.update(ADAPTIVE, spatial_scale=1e10)
        return args

    case(
        "roi-overflows-to-inf",
        op,
        overflow,
        CupydcnValueError,
        "needs infinitely many samples per output bin",
        huge=True,
    )

    # a RoI whose size is NaN (inf - inf: no samples) must not hide a huge one
    def nan_and_huge(args):
        args = with_roi([0, 0, 0, 1, 1], dtype=np.float64, input_dtype=np.float64)(args)
        args["rois"] = np.array([[0, 1e300, 1e300, 2e300, 2e300], [1, 0, 0, 1e6, 1e6]])
        for name in ("offset", "mask", "grad_output"):
            if args.get(name) is not None:
                args[name] = np.concatenate([args[name]] * 2)
        args.update(ADAPTIVE, spatial_scale=1e10)
        return args

    case(
        "nan-sized-roi-does-not-hide-a-huge-one",
        op,
        nan_and_huge,
        CupydcnValueError,
        "rois[1] = [1.0, 0.0, 0.0, 1000000.0, 1000000.0] needs",
        huge=True,
    )


@pytest.fixture
def no_backend(monkeypatch):
    """Every backend function fails: a refused call must not reach one."""
    from cupydcn.core import dispatch as _dispatch
    from cupydcn.deform_conv import cuda_backend as conv_cuda
    from cupydcn.deform_conv import numpy_backend as conv_numpy
    from cupydcn.deform_conv import offset_penalty, sampling
    from cupydcn.psroi_pool import cuda_backend as psroi_cuda
    from cupydcn.psroi_pool import numpy_backend as psroi_numpy
    from cupydcn.roi_pool import cuda_backend as roi_cuda
    from cupydcn.roi_pool import numpy_backend as roi_numpy

    def fail(*args, **kwargs):
        raise AssertionError("bad input reached a backend")

    failing = _dispatch.Backends(numpy=fail, cuda=fail)
    for module, names in [
        (conv_numpy, ("conv_forward", "conv_backward")),
        (conv_cuda, ("conv_forward", "conv_backward")),
        (roi_numpy, ("roi_pool_forward", "roi_pool_backward")),
        (roi_cuda, ("roi_pool_forward", "roi_pool_backward")),
        (psroi_numpy, ("psroi_pool_forward", "psroi_pool_backward")),
        (psroi_cuda, ("psroi_pool_forward", "psroi_pool_backward")),
    ]:
        for name in names:
            monkeypatch.setattr(module, name, fail)
    # The array-API ops build their Backends from a function: replace those.
    monkeypatch.setattr(offset_penalty, "FORWARD", failing)
    monkeypatch.setattr(offset_penalty, "BACKWARD", failing)

    class FailingBackends:
        @staticmethod
        def array_api(function):
            return failing

    monkeypatch.setattr(sampling, "Backends", FailingBackends)


@pytest.mark.parametrize("op", list(OPS))
def test_the_guard_catches_a_valid_call(op, no_backend):
    """The no_backend fixture is effective for every op (so a refused case that passes
    really was refused before any backend)."""
    with pytest.raises(AssertionError, match="reached a backend"):
        call(op)


@pytest.mark.parametrize("op", list(OPS))
def test_the_valid_calls_work(op):
    call(op)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_refused(c: Case, no_backend):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CupydcnError) as info:
            call(c.op, c.changes)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    error = info.value
    assert type(error) is c.error, f"{type(error).__name__}: {error}"
    assert isinstance(error, ValueError if c.error is CupydcnValueError else TypeError)
    message = str(error)
    assert message.startswith(f"{c.op}: "), message
    for fragment in c.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert elapsed < MAX_SECONDS, f"refusing took {elapsed:.2f} s"
    assert peak < MAX_PEAK_BYTES, f"refusing allocated {peak / 2**20:.1f} MiB at the peak"


def _apply(changes, args):
    if callable(changes):
        return changes(args)
    return {**args, **(changes or {})}


# The cases decided by reading the rois (check_values, on the arrays' device and stream).
VALUE_CASES = [
    c
    for c in CASES
    if c.op in ROI + PSROI and ("-rois-" in c.id or "-roi-" in c.id or "nan-sized" in c.id)
]


@pytest.mark.gpu
@pytest.mark.parametrize("c", VALUE_CASES, ids=[c.id for c in VALUE_CASES])
def test_refused_on_a_gpu(c: Case, no_backend):
    """The RoI value checks (the work-per-bin bound included) run on CuPy arrays too,
    before any kernel."""
    cupy = pytest.importorskip("cupy")

    def on_device(args):
        args = _apply(c.changes, args)
        return {k: cupy.asarray(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}

    start = time.perf_counter()
    with pytest.raises(c.error) as info:
        call(c.op, on_device)
    assert time.perf_counter() - start < 30  # first use compiles CuPy's reductions
    message = str(info.value)
    assert message.startswith(f"{c.op}: ")
    for fragment in c.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_the_catalogue():
    """The table covers every op, and every case of the issue."""
    assert {c.op for c in CASES} == set(OPS)
    assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"
    issue_ids = {c.id for c in CASES if c.issue}
    for expected in [
        "deform_roi_pool-sampling_ratio-10**6",
        "deform_roi_pool-roi-1e9px",
        "deform_roi_pool-roi-1e4px-output-1x1",
        "deform_psroi_pool-sample_per_part-46340",
        "deform_conv2d-C_out-0",
        "deform_conv2d-stride-array",
        "deform_conv2d-padding-2**63",
        "deform_conv2d_backward-wrt-int",
        "deform_conv2d-input-None",
        "deform_conv2d-offset-None",
        "deform_conv2d-weight-None",
        "deform_roi_pool-rois-None",
        "stacked_sampling_locations-points-strings",
    ]:
        assert expected in issue_ids, expected
    assert len(CASES) >= 235


# ---------------------------------------------------------------------------- accepted


def _np_int_pair(value):
    return (np.int64(value), np.int32(value))


# (id, op, changes): each must give what the call with Python ints gives.
ACCEPTED = [
    ("stride-np-int-pair", "deform_conv2d", {"stride": _np_int_pair(1)}),  # issue
    ("stride-np-int", "deform_conv2d", {"stride": np.int64(1)}),
    ("stride-list", "deform_conv2d", {"stride": [1, 1]}),
    ("stride-0d-array", "deform_conv2d", {"stride": np.array(1)}),
    ("padding-np-pair", "deform_conv2d", {"padding": (np.int8(1), np.uint16(1))}),
    ("dilation-np-pair", "deform_conv2d_backward", {"dilation": _np_int_pair(1)}),
    ("workspace_bytes-np-int", "deform_conv2d", {"workspace_bytes": np.int64(1)}),
    ("wrt-tuple", "deform_conv2d_backward", {"wrt": ("input", "weight")}),
    ("wrt-set", "deform_conv2d_backward", {"wrt": {"offset"}}),
    ("wrt-generator", "deform_roi_pool_backward", {"wrt": (n for n in ["input", "mask"])}),
    ("wrt-name", "deform_psroi_pool_backward", {"wrt": "offset"}),
    ("output_size-np-pair", "deform_roi_pool", {"output_size": _np_int_pair(2)}),
    ("output_size-np-int", "deform_roi_pool_backward", {"output_size": np.int16(2)}),
    ("sampling_ratio-np-int", "deform_roi_pool", {"sampling_ratio": np.int32(2)}),
    ("spatial_scale-np-float", "deform_roi_pool", {"spatial_scale": np.float32(1.0)}),
    ("gamma-np-float", "deform_roi_pool_backward", {"gamma": np.float64(0.1)}),
    (
        "psroi-np-ints",
        "deform_psroi_pool",
        {
            "output_dim": np.int64(2),
            "group_size": np.int32(2),
            "pooled_size": np.uint8(2),
            "part_size": np.int16(2),
            "sample_per_part": np.int64(2),
        },
    ),
    (
        "psroi-np-ints",
        "deform_psroi_pool_backward",
        {
            "output_dim": np.int64(2),
            "group_size": np.int32(2),
            "pooled_size": np.uint8(2),
            "part_size": np.int16(2),
            "sample_per_part": np.int64(2),
        },
    ),
    ("weight-np-float", "offset_l2_penalty", {"weight": np.float32(1.0)}),
    ("kernel_size-np-pair", "sampling_locations", {"kernel_size": _np_int_pair(3)}),
    ("stride-np-pair", "effective_dilation", {"stride": _np_int_pair(1)}),
    (
        "np-ints",
        SSL,
        {
            "kernel_size": _np_int_pair(3),
            "offset_group": np.int64(0),
            "padding": [np.int64(1), (1, np.int32(1))],
        },
    ),
    ("points-int-array", SSL, {"points": np.array([[2, 2], [1, 4]])}),
]
if torch is not None:
    ACCEPTED.append(("stride-0d-torch-int", "deform_conv2d", {"stride": torch.tensor(1)}))


def _plain(value):
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.floating):
        return float(value)
    try:
        return int(value)
    except TypeError:
        return value


@pytest.mark.parametrize(
    "op, changes",
    [(op, changes) for _, op, changes in ACCEPTED],
    ids=[f"{op}-{id}" for id, op, _ in ACCEPTED],
)
def test_accepted(op, changes):
    got = call(op, changes)
    if any(name in changes for name in ("wrt", "workspace_bytes", "points")):
        return  # other results by design (fewer gradients) or nothing to compare with
    expected = call(op, {name: _plain(value) for name, value in changes.items()})
    for g, e in zip(_flat(got), _flat(expected)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


def _flat(result):
    if isinstance(result, tuple):
        return [r for r in result if r is not None]
    return [result]


# ---------------------------------------------------------------------------- the largest work


def _ramp_problem(channels=2, size=24, dtype=np.float64):
    """input[n, c, y, x] = (c + 1) * x + y: bilinear sampling of it is exact, so the
    average over any grid of samples inside the map is its value at the grid's centre."""
    y, x = np.mgrid[0:size, 0:size].astype(dtype)
    planes = np.stack([(c + 1) * x + y for c in range(channels)])
    return planes[None].astype(dtype)


def _measure(function):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = function()
        return result, tracemalloc.get_traced_memory()[1], time.perf_counter() - start
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("adaptive", [False, True], ids=["sampling_ratio-1024", "adaptive-1024"])
def test_roi_pool_largest_grid_is_bounded_and_exact(adaptive, monkeypatch):
    """1024 x 1024 samples per bin (the limit), three RoIs, two channels: the NumPy backend
    keeps its temporaries within its workspace (blocks of samples, not a million steps)
    and the averages are exact on a linear ramp."""
    from cupydcn.roi_pool import numpy_backend

    if adaptive:  # 1024 px RoIs with a 1 x 1 output: ceil(1024 / 1) samples per axis
        input = _ramp_problem(size=1030)
        rois = np.array(
            [[0, 1, 1, 1025, 1025], [0, 3, 2, 1027, 1026], [0, 0.5, 4.25, 1024.5, 1028.25]]
        )
        sampling_ratio = 0
    else:
        input = _ramp_problem()
        rois = np.array([[0, 2, 3, 20, 18], [0, 5, 5, 9, 9], [0, 1, 1, 22, 22]], np.float64)
        sampling_ratio = 1024
    spatial_scale = 1.0
    options = dict(
        output_size=1, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, gamma=0.1
    )
    offset = np.zeros((3, 2, 1, 1))
    # Besides the workspace: the channels-last copy of the input (and of its gradient).
    planes = 2 * input.nbytes + 2**20
    for budget in (numpy_backend._WORKSPACE_BYTES, 16 * 2**20):
        monkeypatch.setattr(numpy_backend, "_WORKSPACE_BYTES", budget)
        output, peak, seconds = _measure(
            lambda: cupydcn.deform_roi_pool(input, rois, offset, **options)
        )
        assert peak <= 1.25 * budget + planes, f"forward peak {peak / 2**20:.0f} MiB"
        assert seconds < 60
        grads, peak, seconds = _measure(
            lambda output=output: cupydcn.deform_roi_pool_backward(
                np.ones_like(output), input, rois, offset, **options
            )
        )
        assert peak <= 1.25 * budget + 2 * planes, f"backward peak {peak / 2**20:.0f} MiB"
        assert seconds < 60
    # The centre of the RoI (x1 + x2) / 2 * scale - 0.5 in both axes, per channel.
    scaled = rois[:, 1:] * spatial_scale - 0.5
    cx, cy = (scaled[:, 0] + scaled[:, 2]) / 2, (scaled[:, 1] + scaled[:, 3]) / 2
    expected = np.stack([(c + 1) * cx + cy for c in range(2)], axis=1)[..., None, None]
    np.testing.assert_allclose(output, expected, rtol=1e-9)
    # d output / d input sums to 1 per RoI and channel; d / d offset_x = gamma * roi_w * (c+1)
    np.testing.assert_allclose(grads.grad_input.sum(axis=(0, 2, 3)), [3.0, 3.0], rtol=1e-9)
    roi_w, roi_h = scaled[:, 2] - scaled[:, 0], scaled[:, 3] - scaled[:, 1]
    np.testing.assert_allclose(grads.grad_offset[:, 0, 0, 0], 0.1 * roi_w * 3, rtol=1e-6)
    np.testing.assert_allclose(grads.grad_offset[:, 1, 0, 0], 0.1 * roi_h * 2, rtol=1e-6)


def test_psroi_pool_largest_grid_is_bounded_and_exact(monkeypatch):
    """sample_per_part = 1024 (the limit): bounded temporaries, exact ramp averages."""
    from cupydcn.psroi_pool import numpy_backend

    input = _ramp_problem(channels=2)
    rois = np.array([[0, 2, 3, 20, 18], [0, 1, 1, 10, 22]], np.float64)
    options = dict(
        output_dim=2,
        group_size=1,
        pooled_size=1,
        sample_per_part=1024,
        spatial_scale=1.0,
        trans_std=0.1,
    )
    offset = np.zeros((2, 2, 1, 1))
    for budget in (numpy_backend._WORKSPACE_BYTES, 16 * 2**20):
        monkeypatch.setattr(numpy_backend, "_WORKSPACE_BYTES", budget)
        (output, count), peak, seconds = _measure(
            lambda: cupydcn.deform_psroi_pool(input, rois, offset, **options)
        )
        assert peak <= 1.25 * budget + 2**20, f"forward peak {peak / 2**20:.0f} MiB"
        assert seconds < 60
        grads, peak, seconds = _measure(
            lambda output=output: cupydcn.deform_psroi_pool_backward(
                np.ones_like(output), input, rois, offset, **options
            )
        )
        assert peak <= 1.25 * budget + 2**20, f"backward peak {peak / 2**20:.0f} MiB"
        assert seconds < 60
    assert (count == 1024**2).all()
    # MSRA's grid: start round(x1) - 0.5, size round(x2) + 1 - round(x1), samples at
    # start + i * size / 1024 for i < 1024: their mean is start + size * 1023 / 2048.
    start = rois[:, 1:3] - 0.5
    size = rois[:, 3:5] + 1 - rois[:, 1:3]
    mean_x, mean_y = (start + size * 1023 / 2048).T
    expected = np.stack([(c + 1) * mean_x + mean_y for c in range(2)], axis=1)[..., None, None]
    np.testing.assert_allclose(output, expected, rtol=1e-9)
    np.testing.assert_allclose(grads.grad_input.sum(axis=(0, 2, 3)), [2.0, 2.0], rtol=1e-9)


@pytest.mark.parametrize("family", ["roi", "psroi"])
def test_blocks_of_samples_give_the_per_sample_results(family, monkeypatch):
    """The blocked sampling (one workspace-sized step) equals one sample per step: the
    forward bit for bit (samples are added in the kernels' order), the gradients to
    rounding."""
    if family == "roi":
        from cupydcn.roi_pool import numpy_backend

        args = roi_backward_args()
        args.update(sampling_ratio=0, spatial_scale=1.7, output_size=(2, 3))
        args["rois"][1, 3:] = [7.9, 7.5]
        rng = _rng()
        args["offset"] = rng.standard_normal((2, 2, 2, 3)).astype(np.float32)
        args["mask"] = rng.uniform(size=(2, 1, 2, 3)).astype(np.float32)
        args["grad_output"] = rng.standard_normal((2, 3, 2, 3)).astype(np.float32)
        forward, backward = cupydcn.deform_roi_pool, cupydcn.deform_roi_pool_backward
    else:
        from cupydcn.psroi_pool import numpy_backend

        args = psroi_backward_args()
        args.update(sample_per_part=7, trans_std=0.7)
        forward, backward = cupydcn.deform_psroi_pool, cupydcn.deform_psroi_pool_backward
    grad_output = args.pop("grad_output")
    results = []
    for budget in (numpy_backend._WORKSPACE_BYTES, 1):
        monkeypatch.setattr(numpy_backend, "_WORKSPACE_BYTES", budget)
        results.append((forward(**args), backward(grad_output, **args)))
    (out_a, grads_a), (out_b, grads_b) = results
    for a, b in zip(_flat(out_a), _flat(out_b)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_flat(grads_a), _flat(grads_b)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
