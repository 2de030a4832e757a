"""What the test files share: dtypes, the one tolerance table, seeded generators and the
comparison helpers. Test files import from here (and from the reference modules), never
from each other.

The tolerance table
===================

    dtype     u       rounding  of_sum        of_max  relative  floor
    float64   2^-53   0         32 * 2^-53    1e-12   1e-13     0
    float32   2^-24   0         32 * 2^-24    1e-5    1e-5      0
    float16   2^-11   2^-11     32 * 2^-24    1e-5    2^-10     2^-25
    bfloat16  2^-8    2^-8      32 * 2^-24    1e-5    2^-7      0

Every bound is written in terms of the unit roundoff u of a dtype (half the distance
from 1 to the next number: 2^-53, 2^-24, 2^-11, 2^-8). The kernels and the NumPy
backend compute in an accumulation dtype (float64 for float64, float32 otherwise) and
round each result once to the element dtype, so a result carries two kinds of error:

* ``rounding``: the final rounding of an accumulation-dtype value to the element dtype,
  relative to |exact|: u for the half types, 0 for float32 and float64 (their results are
  not rounded again). Comparisons in which both sides may be rounded (or the reference
  saw inputs rounded once more) allow ``roundings=2`` of them: 2u = 2^-10 (float16),
  2^-7 (bfloat16), the value every file used.
* accumulation in the accumulation dtype, bounded in one of two ways:

  - ``of_sum``, relative to S = the sum of the magnitudes of the terms of each result
    (no cancellation can tighten it): 32 u_acc. Sums of up to a few hundred terms stay
    within 32 u_acc of their magnitude on random data (the worst case is n u_acc).
  - ``of_max``, relative to the largest |exact| of the tensor, where no term magnitudes
    are at hand: 1e-12 (float64, ~4500 u), 1e-5 (float32 and the half types, whose
    accumulation dtype is float32: ~170 u_f32). This also covers sample coordinates
    computed in the accumulation dtype (an ulp of a coordinate moves a bilinear sample).

* ``relative``: the bound of a max-relative or elementwise-relative comparison of a
  result in the dtype, max(2 * rounding, of_max) except float64: 1e-13 (the strictest
  value a file used: sums of positive terms in float64), 1e-5 (float32), 2^-10
  (float16), 2^-7 (bfloat16). (Two files had used 2e-3 for float16 and 1.6e-2 for
  bfloat16 here: the stricter 2^-10 and 2^-7 hold.)
* ``floor``: an absolute allowance, half the spacing of float16's subnormals (2^-25),
  for results below float16's normal range that lose relative precision; 0 elsewhere.

Comparisons against NaN-bearing results require the same NaN pattern first.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from cupydcn.core.dtypes import numpy_dtype

DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16")
LOW_PRECISION = ("float32", "float16", "bfloat16")  # below float64
HALF_TYPES = ("float16", "bfloat16")  # computed in float32, rounded once
GRADS = ("input", "offset", "weight", "mask", "bias")  # deform_conv2d's gradient order

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


@dataclass(frozen=True)
class Tolerance:
    """The bounds of one dtype; see the module docstring."""

    u: float  # unit roundoff of the dtype
    acc_u: float  # unit roundoff of its accumulation dtype
    rounding: float  # one final rounding, relative to |exact|
    of_sum: float  # accumulation, relative to the sum of |terms|
    of_max: float  # accumulation, relative to the tensor's largest |exact|
    relative: float  # a relative comparison of a result in the dtype
    floor: float  # absolute allowance (float16 subnormals)


def _tolerance(name: str) -> Tolerance:
    u = UNIT_ROUNDOFF[name]
    acc_u = UNIT_ROUNDOFF["float64" if name == "float64" else "float32"]
    rounding = u if name in HALF_TYPES else 0.0
    of_max = 1e-12 if name == "float64" else 1e-5
    return Tolerance(
        u=u,
        acc_u=acc_u,
        rounding=rounding,
        of_sum=32 * acc_u,
        of_max=of_max,
        relative=1e-13 if name == "float64" else max(2 * rounding, of_max),
        floor=2.0**-25 if name == "float16" else 0.0,
    )


TOLERANCE = {name: _tolerance(name) for name in DTYPE_NAMES}


def dtype_of(name: str) -> np.dtype:
    """The NumPy dtype of a dtype name (bfloat16 from ml_dtypes)."""
    return np.dtype(numpy_dtype(name))


def seeded(*key) -> np.random.Generator:
    """A generator seeded from the test's parameters (stable across runs and processes)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def cast_arrays(arrays: dict, dtype) -> dict:
    """Every array of ``arrays`` in ``dtype`` (None stays None)."""
    return {name: None if v is None else np.asarray(v).astype(dtype) for name, v in arrays.items()}


def as_float64(array) -> np.ndarray:
    return np.asarray(array).astype(np.float64)


def _nan_patterns_agree(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    np.testing.assert_array_equal(
        np.isnan(got), np.isnan(expected), err_msg=f"{what}: NaN pattern differs"
    )


def tensor_scale(expected: np.ndarray, *, empty: float = 1.0) -> float:
    """The largest finite |expected| of a tensor (``empty`` when there is none or it is 0)."""
    finite = np.isfinite(expected)
    scale = float(np.abs(expected[finite]).max()) if finite.any() else 0.0
    return scale if scale > 0 else empty


def assert_close(
    actual,
    expected,
    dtype_name: str,
    what: str = "",
    *,
    roundings: int = 2,
    of_max: float | None = None,
    zero_scale: float = 1.0,
) -> None:
    """Elementwise |actual - expected| <= roundings * rounding * |expected| + of_max *
    scale, scale = the tensor's largest finite |expected| (``zero_scale`` if 0); same NaN
    pattern; elements where expected is infinite are not bounded."""
    tolerance = TOLERANCE[dtype_name]
    expected = as_float64(expected)
    actual = as_float64(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    _nan_patterns_agree(actual, expected, what)
    scale = tensor_scale(expected, empty=zero_scale)
    bound = (
        roundings * tolerance.rounding * np.abs(expected)
        + (tolerance.of_max if of_max is None else of_max) * scale
    )
    error = np.abs(actual - expected)
    ok = ~np.isfinite(expected) | (error <= bound)
    assert ok.all(), (
        f"{what} ({dtype_name}): max error {np.nanmax(error):.3g} (scale "
        f"{scale:.3g}), worst excess {np.nanmax(error - bound):.3g} at "
        f"{np.argwhere(~ok)[:3].tolist()}"
    )


def assert_close_to_sum(
    actual,
    expected,
    magnitude,
    dtype_name: str,
    what: str = "",
    *,
    roundings: int = 1,
    dtype_checked: bool = True,
    with_floor: bool = False,
    operand_roundings: int = 0,
) -> None:
    """Elementwise |actual - expected| <= roundings * rounding * |expected| + (of_sum +
    operand_roundings * rounding) * magnitude (+ floor ``with_floor``), ``magnitude`` =
    the sum of |terms| of each element; same NaN pattern; ``actual`` in ``dtype_name``
    unless not ``dtype_checked``. ``operand_roundings``: how many of each term's factors
    were rounded to the element dtype before the sum (deform_conv2d's columns for half
    types, docs/semantics.md §6.1: 1 for its output and grad_weight)."""
    tolerance = TOLERANCE[dtype_name]
    assert actual is not None, f"{what}: missing"
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if dtype_checked:
        assert actual.dtype == dtype_of(dtype_name), f"{what}: dtype {actual.dtype}"
    got = as_float64(actual)
    _nan_patterns_agree(got, expected, what)
    ok = ~np.isnan(expected)
    bound = (
        roundings * tolerance.rounding * np.abs(expected)
        + (tolerance.of_sum + operand_roundings * tolerance.rounding) * magnitude
        + (tolerance.floor if with_floor else 0.0)
    )[ok]
    error = np.abs(got[ok] - expected[ok])
    worst = np.argmax(error - bound) if error.size else 0
    assert np.all(error <= bound), (
        f"{what} ({dtype_name}): {np.sum(error > bound)} of {error.size} elements off; worst "
        f"got {got[ok][worst]!r} expected {expected[ok][worst]!r} (bound {bound[worst]:.3g})"
    )


def assert_close_with_rounded_columns(
    actual,
    expected,
    column_magnitude,
    dtype_name: str,
    what: str = "",
    *,
    magnitude=None,
    roundings: int = 2,
    zero_scale: float = 1.0,
) -> None:
    """deform_conv2d's output or grad_weight, the results computed from its columns, which
    the half types round once to the element dtype before the GEMMs (docs/semantics.md
    §6.1): the bound of ``assert_close_to_sum`` (given ``magnitude``, the sum of |terms|)
    or else of ``assert_close`` (of_max * the tensor's largest finite |expected|), plus
    rounding * ``column_magnitude``, the sum over the GEMM's terms of |weight| * |column|
    (|grad_output| * |column| for grad_weight): one rounding of each column value, none of
    the bias. rounding is 0 for float32 and float64, whose bounds are unchanged. Same NaN
    pattern; elements where expected is NaN (given ``magnitude``) or not finite (without)
    are not bounded, as in those two."""
    tolerance = TOLERANCE[dtype_name]
    assert actual is not None, f"{what}: missing"
    expected = as_float64(expected)
    actual = as_float64(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    _nan_patterns_agree(actual, expected, what)
    if magnitude is None:
        accumulation = tolerance.of_max * tensor_scale(expected, empty=zero_scale)
        unbounded = ~np.isfinite(expected)
    else:
        accumulation = tolerance.of_sum * as_float64(magnitude)
        unbounded = np.isnan(expected)
    bound = (
        roundings * tolerance.rounding * np.abs(expected)
        + accumulation
        + tolerance.rounding * as_float64(column_magnitude)
    )
    error = np.abs(actual - expected)
    ok = unbounded | (error <= bound)
    assert ok.all(), (
        f"{what} ({dtype_name}): {np.sum(~ok)} of {ok.size} elements off; max error "
        f"{np.nanmax(error):.3g}, worst excess {np.nanmax(error - bound):.3g} at "
        f"{np.argwhere(~ok)[:3].tolist()}"
    )


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| over the elements where expected is not
    NaN (0 for an empty tensor)."""
    actual = as_float64(actual)
    expected = as_float64(expected)
    keep = ~np.isnan(expected)
    actual, expected = actual[keep], expected[keep]
    if not expected.size:
        return 0.0
    scale = max(float(np.abs(expected).max()), 1e-30)
    return float(np.abs(actual - expected).max() / scale)


def assert_relative(
    actual, expected, dtype_name: str, what: str = "", *, bound: float | None = None
) -> None:
    """Same NaN pattern, then max |actual - expected| <= relative * max |expected|."""
    actual = as_float64(actual)
    expected = as_float64(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    _nan_patterns_agree(actual, expected, what)
    limit = TOLERANCE[dtype_name].relative if bound is None else bound
    error = relative_error(actual, expected)
    assert error <= limit, f"{what} ({dtype_name}): relative error {error:.3g} > {limit:.3g}"


def to_numpy(array):
    """A NumPy copy (or view) of a NumPy, CuPy, torch or JAX array; None stays None."""
    if array is None or isinstance(array, np.ndarray):
        return array
    if hasattr(array, "get") and type(array).__module__.startswith("cupy"):
        return array.get()
    if type(array).__module__.startswith("torch"):
        import torch

        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            return array.view(torch.int16).numpy().view(dtype_of("bfloat16"))
        return array.numpy()
    return np.asarray(array)


# ---------------------------------------------------------------------------- launchers


class RecordingLauncher:
    """A KernelLauncher (CuPy's) that records each launch and GEMM as the emulator's
    ``HostLauncher.launches`` / ``gemms`` do, so the kernel tests read them the same way.
    Template arguments and an explicit grid and block are passed through (only when given,
    so a launcher of the first protocol still takes grid-stride launches)."""

    exact = False  # the device contracts a * b + c into FMAs: not bitwise the NumPy backend

    def __init__(self, inner):
        self.inner = inner
        self.xp = inner.xp
        self.launches: list = []
        self.gemms: list = []

    def launch(
        self,
        kernel,
        dtype_name,
        index_bits,
        total,
        args,
        *,
        template_args=(),
        grid=None,
        block=None,
    ):
        from cupydcn.cuda.launch import check_launch_shape, launch_config
        from emulator.host_launcher import LaunchRecord

        template_args = tuple(int(a) for a in template_args)
        shape = check_launch_shape(kernel, grid, block)
        if shape is None:
            blocks, threads = launch_config(total)
            grid3, block3 = (blocks, 1, 1), (threads, 1, 1)
        else:
            grid3, block3 = shape
        self.launches.append(
            LaunchRecord(
                kernel,
                dtype_name,
                index_bits,
                total,
                grid3[0],
                block3[0],
                template_args,
                grid3,
                block3,
            )
        )
        extra = {} if shape is None else {"grid": grid3, "block": block3}
        if template_args:
            extra["template_args"] = template_args
        self.inner.launch(kernel, dtype_name, index_bits, total, args, **extra)

    def gemm(self, a, b, out, **options):
        from cupydcn.cuda.launch import GemmCall, check_gemm_operands

        batch, m, n, k = check_gemm_operands(
            a,
            b,
            out,
            transpose_a=options.get("transpose_a", False),
            transpose_b=options.get("transpose_b", False),
        )
        self.inner.gemm(a, b, out, **options)
        self.gemms.append(
            GemmCall(batch, m, n, k, a.dtype.name, out.dtype.name, bool(options.get("tf32", False)))
        )


def is_exact(launcher) -> bool:
    """Whether ``launcher`` computes bit for bit what the NumPy backend does (the
    emulator: host build without FMA contraction) or only within rounding (a GPU)."""
    return getattr(launcher, "exact", True)


def on_device(launcher, *arrays):
    """``arrays`` as arrays of ``launcher.xp`` (NumPy arrays as they are for the
    emulator, views included); None stays None. One array in, one out."""
    moved = [None if a is None else launcher.xp.asarray(a) for a in arrays]
    return moved[0] if len(moved) == 1 else moved


def strided_copy(xp, array):
    """The values of ``array`` in a non-contiguous ``xp`` array (every other element of
    a buffer twice as wide in the last axis)."""
    strided = xp.empty(array.shape[:-1] + (2 * array.shape[-1],), array.dtype)[..., ::2]
    strided[...] = xp.asarray(array)
    return strided
