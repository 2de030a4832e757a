"""Cross-cutting properties of every public op, driven once by a table of ops.

Each row of ``OPS`` is one public function (deform_conv2d and its backward, deform_roi_pool,
deform_psroi_pool and theirs, offset_l2_penalty and its backward, sampling_locations,
effective_dilation) with a small problem and what its results are. Every property runs
on every row that has what it needs:

* array libraries: NumPy, PyTorch (CPU), JAX (CPU) and CuPy (``gpu``) in, the caller's type
  out, in the dtype NumPy's call returns, with the values of NumPy's call (bit for bit on
  the CPU, where every library reaches the same backend; within the dtype's tolerance of
  tests/support.py on a GPU);
* ``wrt``: every subset of the gradients (a list, and a plain string for one name) gives
  exactly the requested ones, equal to the full call's, and None for the others;
* read-only, non-contiguous views as inputs give the results of contiguous inputs and are
  left as they were;
* an empty batch (no images, no RoIs) gives empty results of the right shapes, and zero
  for the results that do not depend on the batch size (grad_weight, grad_bias, the RoI
  ops' grad_input);
* NaN poisoning: a NaN offset of the first item leaves the other items' results bit for bit
  as they were, and the results documented to stay finite (the input gradient) finite;
* inputs are never written, by any library's call.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

import cupydcn
from cupydcn.deform_conv.offset_penalty import offset_l2_penalty, offset_l2_penalty_backward
from cupydcn.deform_conv.sampling import effective_dilation, sampling_locations
from reference import ConvConfig
from reference_psroi_pool import CONFIGS as PSROI_CONFIGS
from reference_psroi_pool import options as psroi_options
from reference_psroi_pool import problem as psroi_problem
from reference_roi_pool import RoiCase
from support import DTYPE_NAMES, assert_close, cast_arrays, dtype_of, seeded, to_numpy

# ---------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Op:
    """One public function: how to make its inputs and call it, and what its results are."""

    name: str
    make: Callable[[str], dict]  # dtype name -> NumPy inputs, by argument name
    call: Callable[..., dict]  # (inputs, wrt) -> results by name (None: not computed)
    grads: tuple[str, ...] = ()  # the names ``wrt`` takes (backward ops)
    fixed: tuple[str, ...] = ()  # inputs whose dtype is not the op's (rois)
    batch: tuple[str, ...] = ()  # inputs sliced to an empty batch along axis 0
    per_item: tuple[str, ...] = ()  # results indexed by the batch item along axis 0
    batch_free_zero: tuple[str, ...] = ()  # results that are zero for an empty batch
    finite_under_nan: tuple[str, ...] = ()  # results a NaN offset must not reach
    nan_at: tuple = ()  # (input name, index) of the poisoned offset element
    dtypes: tuple[str, ...] = DTYPE_NAMES
    keywords: dict = field(default_factory=dict)


CONV = ConvConfig(
    batch=3, in_channels=4, out_channels=6, groups=2, offset_groups=2, padding=(1, 1), stride=(2, 1)
)
CONV_GRADS = ("input", "offset", "weight", "mask", "bias")


def _conv_inputs(dtype_name: str) -> dict:
    rng = seeded("op properties", "conv", dtype_name)
    arrays = CONV.arrays(rng)
    arrays["grad_output"] = rng.normal(size=(CONV.batch, CONV.out_channels) + CONV.out_size)
    return cast_arrays(arrays, dtype_of(dtype_name))


def _conv_forward(a, wrt=None):
    return {
        "output": cupydcn.deform_conv2d(
            a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **CONV.options
        )
    }


def _conv_backward(a, wrt=None):
    grads = cupydcn.deform_conv2d_backward(
        a["grad_output"], a["input"], a["offset"], a["weight"], a["mask"], wrt=wrt, **CONV.options
    )
    return dict(zip(CONV_GRADS, grads))


ROI = RoiCase()
ROI_GRADS = ("input", "offset", "mask")


def _roi_inputs(dtype_name: str) -> dict:
    rng = seeded("op properties", "roi", dtype_name)
    arrays = ROI.arrays(rng)
    arrays["grad_output"] = rng.normal(
        size=(arrays["rois"].shape[0], ROI.channels, *ROI.output_size)
    )
    cast = cast_arrays(arrays, dtype_of(dtype_name))
    cast["rois"] = arrays["rois"].astype(np.float64 if dtype_name == "float64" else np.float32)
    return cast


def _roi_forward(a, wrt=None):
    return {
        "output": cupydcn.deform_roi_pool(
            a["input"], a["rois"], a["offset"], a["mask"], **ROI.options
        )
    }


def _roi_backward(a, wrt=None):
    grads = cupydcn.deform_roi_pool_backward(
        a["grad_output"], a["input"], a["rois"], a["offset"], a["mask"], wrt=wrt, **ROI.options
    )
    return dict(zip(ROI_GRADS, grads))


PSROI = PSROI_CONFIGS["basic"]
PSROI_GRADS = ("input", "offset")


def _psroi_inputs(dtype_name: str) -> dict:
    input, rois, offset, grad_output = psroi_problem(PSROI, dtype_name, seed=11)
    return {"input": input, "rois": rois, "offset": offset, "grad_output": grad_output}


def _psroi_forward(a, wrt=None):
    output, count = cupydcn.deform_psroi_pool(
        a["input"], a["rois"], a["offset"], **psroi_options(PSROI)
    )
    return {"output": output, "count": count}


def _psroi_backward(a, wrt=None):
    grads = cupydcn.deform_psroi_pool_backward(
        a["grad_output"], a["input"], a["rois"], a["offset"], wrt=wrt, **psroi_options(PSROI)
    )
    return dict(zip(PSROI_GRADS, grads))


def _penalty_inputs(dtype_name: str) -> dict:
    rng = seeded("op properties", "penalty", dtype_name)
    dtype = dtype_of(dtype_name)
    return {
        "offset": rng.normal(scale=2.0, size=(2, 18, 5, 6)).astype(dtype),
        "grad": rng.normal(size=(2, 18, 5, 6)).astype(dtype),
    }


def _penalty_forward(a, wrt=None):
    return {"penalty": offset_l2_penalty(a["offset"], weight=0.3, reduction="none")}


def _penalty_backward(a, wrt=None):
    return {
        "grad": offset_l2_penalty_backward(a["grad"], a["offset"], weight=0.3, reduction="none")
    }


SAMPLING = dict(kernel_size=3, padding=1, stride=1, dilation=(1, 2))


def _sampling_inputs(dtype_name: str) -> dict:
    rng = seeded("op properties", "sampling", dtype_name)
    return {"offset": rng.normal(size=(2, 2 * 2 * 9, 5, 3)).astype(dtype_of(dtype_name))}


def _sampling_locations(a, wrt=None):
    return {"locations": sampling_locations(a["offset"], **SAMPLING)}


def _effective_dilation(a, wrt=None):
    return {"dilation": effective_dilation(a["offset"], **SAMPLING)}


OPS = {
    op.name: op
    for op in [
        Op(
            "deform_conv2d",
            _conv_inputs,
            _conv_forward,
            batch=("input", "offset", "mask"),
            per_item=("output",),
            nan_at=("offset", (0, 8, 1, 2)),
        ),
        Op(
            "deform_conv2d_backward",
            _conv_inputs,
            _conv_backward,
            grads=CONV_GRADS,
            batch=("input", "offset", "mask", "grad_output"),
            per_item=("input", "offset", "mask"),
            batch_free_zero=("weight", "bias"),
            finite_under_nan=("input",),
            nan_at=("offset", (0, 8, 1, 2)),
        ),
        Op(
            "deform_roi_pool",
            _roi_inputs,
            _roi_forward,
            fixed=("rois",),
            batch=("rois", "offset", "mask"),
            per_item=("output",),
            nan_at=("offset", (0, 1, 2, 0)),
        ),
        Op(
            "deform_roi_pool_backward",
            _roi_inputs,
            _roi_backward,
            grads=ROI_GRADS,
            fixed=("rois",),
            batch=("rois", "offset", "mask", "grad_output"),
            per_item=("offset", "mask"),
            batch_free_zero=("input",),
            finite_under_nan=("input",),
            nan_at=("offset", (0, 1, 2, 0)),
        ),
        Op(
            "deform_psroi_pool",
            _psroi_inputs,
            _psroi_forward,
            fixed=("rois",),
            batch=("rois", "offset"),
            per_item=("output", "count"),
            nan_at=("offset", (0, 0, 1, 2)),
        ),
        Op(
            "deform_psroi_pool_backward",
            _psroi_inputs,
            _psroi_backward,
            grads=PSROI_GRADS,
            fixed=("rois",),
            batch=("rois", "offset", "grad_output"),
            per_item=("offset",),
            batch_free_zero=("input",),
            finite_under_nan=("input",),
            nan_at=("offset", (0, 0, 1, 2)),
        ),
        Op(
            "offset_l2_penalty",
            _penalty_inputs,
            _penalty_forward,
            batch=("offset",),
            per_item=("penalty",),
            nan_at=("offset", (0, 3, 1, 1)),
        ),
        Op(
            "offset_l2_penalty_backward",
            _penalty_inputs,
            _penalty_backward,
            batch=("offset", "grad"),
            per_item=("grad",),
            nan_at=("offset", (0, 3, 1, 1)),
        ),
        # (sampling_locations and effective_dilation reject an empty batch: no ``batch``)
        Op(
            "sampling_locations",
            _sampling_inputs,
            _sampling_locations,
            per_item=("locations",),
            nan_at=("offset", (0, 5, 2, 1)),
        ),
        Op(
            "effective_dilation",
            _sampling_inputs,
            _effective_dilation,
            per_item=("dilation",),
            nan_at=("offset", (0, 5, 2, 1)),
        ),
    ]
}

BACKWARD_OPS = [name for name, op in OPS.items() if op.grads]

# ---------------------------------------------------------------------------- libraries


def _torch(array):
    import torch

    if array.dtype == dtype_of("bfloat16"):
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _jax(array):
    import jax.numpy as jnp

    return jnp.asarray(array)


def _cupy(array):
    import cupy

    return cupy.asarray(array)


def _array_type(library: str):
    if library == "numpy":
        return np.ndarray
    if library == "torch":
        import torch

        return torch.Tensor
    if library == "jax":
        import jax

        return jax.Array
    import cupy

    return cupy.ndarray


CONVERT = {"numpy": lambda a: a, "torch": _torch, "jax": _jax, "cupy": _cupy}
LIBRARIES = [
    pytest.param("numpy"),
    pytest.param("torch"),
    pytest.param("jax"),
    pytest.param("cupy", marks=pytest.mark.gpu),
]
# JAX runs without 64-bit types (its default): float64 inputs would become float32.
LIBRARY_DTYPES = {"jax": ("float32", "float16", "bfloat16")}


def _library(name: str):
    pytest.importorskip({"numpy": "numpy", "torch": "torch", "jax": "jax", "cupy": "cupy"}[name])
    return CONVERT[name]


def _inputs(op: Op, dtype_name: str, library: str = "numpy") -> dict:
    inputs = op.make(dtype_name)
    if library == "jax":  # no float64 for JAX: rois in float32
        inputs = {
            k: v.astype(np.float32) if k in op.fixed and v.dtype == np.float64 else v
            for k, v in inputs.items()
        }
    return inputs


def _numpy_results(results: dict) -> dict:
    return {k: to_numpy(v) for k, v in results.items()}


def _assert_same(got: dict, want: dict, what: str) -> None:
    """The same result names, None where None, equal to the last bit (NaNs included)."""
    assert got.keys() == want.keys(), what
    for name in want:
        if want[name] is None:
            assert got[name] is None, f"{what}: {name} should be None"
            continue
        assert got[name] is not None, f"{what}: {name} missing"
        assert got[name].dtype == want[name].dtype, f"{what}: {name} dtype"
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{what}: {name}")


# ---------------------------------------------------------------------------- properties

OP_DTYPES = [(name, dtype) for name, op in OPS.items() for dtype in op.dtypes]


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize(
    ("op_name", "dtype_name"), OP_DTYPES, ids=[f"{n}-{d}" for n, d in OP_DTYPES]
)
def test_array_library_round_trip(op_name, dtype_name, library):
    """The caller's array type out, in NumPy's result dtype, with NumPy's values."""
    convert = _library(library)
    if dtype_name not in LIBRARY_DTYPES.get(library, (dtype_name,)):
        pytest.skip(f"{library} runs without {dtype_name} here")
    op = OPS[op_name]
    inputs = _inputs(op, dtype_name, library)
    expected = _numpy_results(op.call(inputs))
    converted = {k: None if v is None else convert(v) for k, v in inputs.items()}
    results = op.call(converted)
    array_type = _array_type(library)
    for name, result in results.items():
        if expected[name] is None:
            assert result is None, name
            continue
        assert isinstance(result, array_type), f"{name}: {type(result)}"
    got = _numpy_results(results)
    if library != "cupy":
        _assert_same(got, expected, f"{op_name} with {library}")
        return
    for name in expected:  # a GPU: FMA contraction and other summation orders
        if expected[name] is None:
            assert got[name] is None, name
        elif expected[name].dtype.kind in "iu":
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
        else:
            assert got[name].dtype == expected[name].dtype, name
            assert_close(got[name], expected[name], dtype_name, name)


WRT_CASES = [
    (name, subset)
    for name in BACKWARD_OPS
    for r in range(len(OPS[name].grads) + 1)
    for subset in itertools.combinations(OPS[name].grads, r)
]


@pytest.mark.parametrize(
    ("op_name", "wrt"), WRT_CASES, ids=[f"{n}-{'+'.join(s) or 'none'}" for n, s in WRT_CASES]
)
def test_wrt_returns_exactly_the_requested_gradients(op_name, wrt):
    op = OPS[op_name]
    inputs = _inputs(op, "float32")
    everything = _numpy_results(op.call(inputs))
    forms = [list(wrt)] + ([wrt[0]] if len(wrt) == 1 else [])
    for form in forms:
        subset = _numpy_results(op.call(inputs, wrt=form))
        expected = {k: v if k in wrt else None for k, v in everything.items()}
        _assert_same(subset, expected, f"{op_name} wrt={form!r}")


def _read_only_strided(array: np.ndarray) -> np.ndarray:
    """The values of ``array`` in a read-only view that is not C-contiguous."""
    wide = np.zeros(array.shape + (2,), dtype=array.dtype)
    wide[..., 1] = array
    view = wide[..., 1]
    view.flags.writeable = False
    return view


@pytest.mark.parametrize("dtype_name", ["float64", "bfloat16"])
@pytest.mark.parametrize("op_name", OPS)
def test_read_only_non_contiguous_inputs(op_name, dtype_name):
    op = OPS[op_name]
    inputs = _inputs(op, dtype_name)
    expected = _numpy_results(op.call(inputs))
    views = {k: None if v is None else _read_only_strided(v) for k, v in inputs.items()}
    assert not any(v.flags.c_contiguous for v in views.values() if v is not None and v.size > 1)
    before = {k: None if v is None else v.copy() for k, v in views.items()}
    _assert_same(_numpy_results(op.call(views)), expected, f"{op_name} on strided views")
    for name, view in views.items():
        if view is not None:
            np.testing.assert_array_equal(view, before[name], err_msg=name)


@pytest.mark.parametrize("op_name", [name for name, op in OPS.items() if op.batch])
def test_empty_batch(op_name):
    op = OPS[op_name]
    inputs = _inputs(op, "float32")
    full = _numpy_results(op.call(inputs))
    empty = {k: v[:0] if k in op.batch else v for k, v in inputs.items()}
    results = _numpy_results(op.call(empty))
    assert results.keys() == full.keys()
    for name, result in results.items():
        if full[name] is None:
            assert result is None, name
            continue
        assert result.dtype == full[name].dtype, name
        if name in op.per_item:
            assert result.shape == (0,) + full[name].shape[1:], name
        elif name in op.batch_free_zero:
            assert result.shape == full[name].shape, name
            np.testing.assert_array_equal(result, np.zeros(result.shape, result.dtype), name)
        else:  # the gradient of a batched input: empty like it
            assert result.shape[0] == 0, name


@pytest.mark.parametrize("dtype_name", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("op_name", OPS)
def test_nan_offset_poisons_only_its_item(op_name, dtype_name):
    op = OPS[op_name]
    inputs = _inputs(op, dtype_name)
    clean = _numpy_results(op.call(inputs))
    name, index = op.nan_at
    poisoned = dict(inputs, **{name: inputs[name].copy()})
    poisoned[name][index] = np.nan
    results = _numpy_results(op.call(poisoned))
    reached = False
    for result_name in op.per_item:
        got, want = results[result_name], clean[result_name]
        np.testing.assert_array_equal(got[1:], want[1:], err_msg=f"{result_name}: other items")
        if got.dtype.kind not in "iub":  # floating (bfloat16's kind is "V")
            reached |= bool(np.isnan(got[0].astype(np.float64)).any())
    assert reached, "the NaN reached none of the poisoned item's results"
    for result_name in op.finite_under_nan:
        assert np.isfinite(results[result_name].astype(np.float64)).all(), result_name


@pytest.mark.parametrize("library", ["numpy", "torch", pytest.param("cupy", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("op_name", OPS)
def test_inputs_are_never_written(op_name, library):
    convert = _library(library)
    op = OPS[op_name]
    inputs = {k: None if v is None else convert(v) for k, v in _inputs(op, "float32").items()}
    before = {k: None if v is None else to_numpy(v).copy() for k, v in inputs.items()}
    op.call(inputs)
    if op.grads:
        op.call(inputs, wrt=list(op.grads[:1]))
    for name, value in inputs.items():
        if value is not None:
            assert to_numpy(value).tobytes() == before[name].tobytes(), f"{name} was written"
