"""``python -m cupydcn check``: find the backends and devices, run every op forward and
backward on each, and compare with the reference.

The reference is established in two steps, both printed:
1. the NumPy backend in float64: deform_conv2d's forward against a direct evaluation of
   y(p0) = sum_k w(k) m_k x(p0 + p_k + dp_k) + b at random output points, and every op's
   backward against central finite differences of its forward along random directions;
2. every backend and dtype against that float64 backend on the same (rounded) inputs;
3. the PyTorch and JAX adapters (``cupydcn.torch``, ``cupydcn.jax``), forward and backward
   through autograd and ``jax.grad``, against the functional API on the same float32
   inputs (skipped, with the reason, when not importable).
"""

from __future__ import annotations

import importlib
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from cupydcn import __version__
from cupydcn.cli.probe import cuda_device_count
from cupydcn.core.dtypes import DTYPES, numpy_dtype
from cupydcn.deform_conv import deform_conv2d, deform_conv2d_backward
from cupydcn.psroi_pool import deform_psroi_pool, deform_psroi_pool_backward
from cupydcn.roi_pool import deform_roi_pool, deform_roi_pool_backward

# Max |error| / max |reference| accepted per dtype (about 4 units of roundoff for halves).
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
FINITE_DIFFERENCE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class OpCase:
    """One op on one small problem. ``forward(arrays, api=FUNCTIONAL)`` returns the
    differentiable output of ``api``'s op (the functional API, or an adapter module with
    the same functions), ``backward(grad_output, arrays)`` a dict of gradients by input
    name."""

    name: str
    make_arrays: Callable[[np.random.Generator], dict[str, np.ndarray]]
    forward: Callable[[dict], object]
    backward: Callable[[object, dict], dict[str, object]]
    differentiable: tuple[str, ...]
    fixed: tuple[str, ...] = ()  # arrays not rounded to the dtype (RoI boxes)


# The functional API; cupydcn.torch and cupydcn.jax have functions of the same names.
FUNCTIONAL = SimpleNamespace(
    deform_conv2d=deform_conv2d,
    deform_roi_pool=deform_roi_pool,
    deform_psroi_pool=deform_psroi_pool,
)


# ---------------------------------------------------------------- deform_conv2d
CONV = dict(
    n=3,
    c=6,
    h=9,
    w=8,
    c_out=4,
    kh=3,
    kw=2,
    groups=2,
    offset_groups=3,
    stride=(1, 2),
    padding=(1, 2),
    dilation=(2, 1),
)


def _conv_options():
    return {k: CONV[k] for k in ("stride", "padding", "dilation")}


def _conv_out_size() -> tuple[int, int]:
    return tuple(
        (CONV[size] + 2 * CONV["padding"][a] - (CONV["dilation"][a] * (CONV[k] - 1) + 1))
        // CONV["stride"][a]
        + 1
        for a, (size, k) in enumerate((("h", "kh"), ("w", "kw")))
    )


def _conv_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    out_h, out_w = _conv_out_size()
    taps = CONV["kh"] * CONV["kw"]
    return {
        "input": rng.standard_normal((CONV["n"], CONV["c"], CONV["h"], CONV["w"])),
        "offset": 1.7
        * rng.standard_normal((CONV["n"], 2 * CONV["offset_groups"] * taps, out_h, out_w)),
        "weight": rng.standard_normal(
            (CONV["c_out"], CONV["c"] // CONV["groups"], CONV["kh"], CONV["kw"])
        ),
        "bias": rng.standard_normal((CONV["c_out"],)),
        "mask": rng.uniform(size=(CONV["n"], CONV["offset_groups"] * taps, out_h, out_w)),
    }


def _conv_forward(a, api=FUNCTIONAL):
    return api.deform_conv2d(
        a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **_conv_options()
    )


def _conv_backward(grad_output, a):
    g = deform_conv2d_backward(
        grad_output, a["input"], a["offset"], a["weight"], a["mask"], **_conv_options()
    )
    return {
        "input": g.grad_input,
        "offset": g.grad_offset,
        "weight": g.grad_weight,
        "mask": g.grad_mask,
        "bias": g.grad_bias,
    }


def _conv_direct_point(a: dict[str, np.ndarray], b: int, co: int, oy: int, ox: int) -> float:
    """y[b, co, oy, ox] summed straight from the definition (float64)."""
    cg = CONV["c"] // CONV["groups"]
    group = co // (CONV["c_out"] // CONV["groups"])
    per_offset_group = CONV["c"] // CONV["offset_groups"]
    taps = CONV["kh"] * CONV["kw"]
    total = a["bias"][co]
    for ci in range(cg):
        c = group * cg + ci
        g = c // per_offset_group
        for i in range(CONV["kh"]):
            for j in range(CONV["kw"]):
                k = i * CONV["kw"] + j
                py = (
                    oy * CONV["stride"][0]
                    - CONV["padding"][0]
                    + i * CONV["dilation"][0]
                    + a["offset"][b, g * 2 * taps + 2 * k, oy, ox]
                )
                px = (
                    ox * CONV["stride"][1]
                    - CONV["padding"][1]
                    + j * CONV["dilation"][1]
                    + a["offset"][b, g * 2 * taps + 2 * k + 1, oy, ox]
                )
                value = 0.0
                for qy in range(math.floor(py), math.floor(py) + 2):
                    for qx in range(math.floor(px), math.floor(px) + 2):
                        if 0 <= qy < CONV["h"] and 0 <= qx < CONV["w"]:
                            value += (
                                max(0.0, 1 - abs(qy - py))
                                * max(0.0, 1 - abs(qx - px))
                                * a["input"][b, c, qy, qx]
                            )
                total += a["weight"][co, ci, i, j] * a["mask"][b, g * taps + k, oy, ox] * value
    return float(total)


# ---------------------------------------------------------------- RoI pooling
def _rois(rng: np.random.Generator, count: int, batch: int, extent: float) -> np.ndarray:
    x1, y1 = rng.uniform(-3, extent - 4, size=(2, count))
    w, h = rng.uniform(2, extent / 2, size=(2, count))
    return np.stack([rng.integers(0, batch, count).astype(np.float64), x1, y1, x1 + w, y1 + h], 1)


ROI = dict(output_size=(3, 4), spatial_scale=0.5, sampling_ratio=0, gamma=0.1)


def _roi_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    k = 5
    return {
        "input": rng.standard_normal((2, 3, 10, 12)),
        "rois": _rois(rng, k, 2, 22.0),
        "offset": rng.standard_normal((k, 2, 3, 4)),
        "mask": rng.uniform(size=(k, 1, 3, 4)),
    }


def _roi_forward(a, api=FUNCTIONAL):
    return api.deform_roi_pool(a["input"], a["rois"], a["offset"], a["mask"], **ROI)


def _roi_backward(grad_output, a):
    g = deform_roi_pool_backward(grad_output, a["input"], a["rois"], a["offset"], a["mask"], **ROI)
    return {"input": g.grad_input, "offset": g.grad_offset, "mask": g.grad_mask}


PSROI = dict(
    output_dim=4,
    group_size=3,
    pooled_size=3,
    part_size=2,
    sample_per_part=3,
    spatial_scale=0.5,
    trans_std=0.1,
)


def _psroi_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    k = 5
    return {
        "input": rng.standard_normal((2, 4 * 9, 10, 12)),
        "rois": _rois(rng, k, 2, 22.0),
        "offset": rng.standard_normal((k, 2 * 2, 2, 2)),  # 2 classes
    }


def _psroi_forward(a, api=FUNCTIONAL):
    return api.deform_psroi_pool(a["input"], a["rois"], a["offset"], **PSROI)[0]


def _psroi_backward(grad_output, a):
    g = deform_psroi_pool_backward(grad_output, a["input"], a["rois"], a["offset"], **PSROI)
    return {"input": g.grad_input, "offset": g.grad_offset}


CASES = (
    OpCase(
        "deform_conv2d",
        _conv_arrays,
        _conv_forward,
        _conv_backward,
        ("input", "offset", "weight", "mask", "bias"),
    ),
    OpCase(
        "deform_roi_pool",
        _roi_arrays,
        _roi_forward,
        _roi_backward,
        ("input", "offset", "mask"),
        fixed=("rois",),
    ),
    OpCase(
        "deform_psroi_pool",
        _psroi_arrays,
        _psroi_forward,
        _psroi_backward,
        ("input", "offset"),
        fixed=("rois",),
    ),
)


# ---------------------------------------------------------------- the checks
@dataclass
class Row:
    op: str
    backend: str
    dtype: str
    what: str
    error: float
    tolerance: float
    millis: float
    skipped: str = ""  # why the row did not run ("" when it ran)

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tolerance


def _skipped(op: str, backend: str, dtype: str, reason: str) -> Row:
    return Row(op, backend, dtype, "-", math.nan, math.nan, math.nan, skipped=reason)


def _relative(error: float, scale: float) -> float:
    return error / max(scale, 1e-30)


def _timed(function, *args):
    _synchronize()
    start = time.perf_counter()
    result = function(*args)
    _synchronize()
    return result, 1e3 * (time.perf_counter() - start)


def _reference_rows(case: OpCase, a: dict[str, np.ndarray], rng) -> list[Row]:
    """The float64 NumPy backend against the formula (conv) and finite differences."""
    rows = []
    out, forward_ms = _timed(case.forward, a)
    if case.name == "deform_conv2d":
        points = [tuple(int(rng.integers(0, s)) for s in out.shape) for _ in range(24)]
        error = max(abs(out[pt] - _conv_direct_point(a, *pt)) for pt in points)
        rows.append(
            Row(
                case.name,
                "numpy float64 vs formula",
                "float64",
                "forward (24 points)",
                _relative(error, np.abs(out).max()),
                TOLERANCE["float64"],
                forward_ms,
            )
        )
    grad_output = rng.standard_normal(out.shape)
    grads, backward_ms = _timed(case.backward, grad_output, a)
    eps = 1e-6
    for name in case.differentiable:
        direction = rng.standard_normal(a[name].shape)
        values = [
            float(
                np.sum(
                    case.forward(dict(a, **{name: a[name] + sign * eps * direction})) * grad_output
                )
            )
            for sign in (1, -1)
        ]
        numeric = (values[0] - values[1]) / (2 * eps)
        analytic = float(np.sum(grads[name] * direction))
        rows.append(
            Row(
                case.name,
                "numpy float64 vs finite diff.",
                "float64",
                f"d/d{name}",
                _relative(abs(numeric - analytic), abs(numeric)),
                FINITE_DIFFERENCE_TOLERANCE,
                backward_ms,
            )
        )
    return rows


def _backends() -> tuple[list[tuple[str, Callable]], str | None]:
    """(label, converter from NumPy) for the NumPy backend and each CUDA device, and why
    there is no CUDA device (None when there is one)."""
    found: list[tuple[str, Callable]] = [("numpy (CPU)", lambda x: x)]
    count, reason = cuda_device_count()
    if not count:
        return found, reason
    import cupy

    for device in range(count):
        name = cupy.cuda.runtime.getDeviceProperties(device)["name"].decode()

        def to_device(x, device=device):
            with cupy.cuda.Device(device):
                return cupy.asarray(x)

        found.append((f"cupy cuda:{device} ({name})", to_device))
    return found, None


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "get"):
        x = x.get()
    return np.asarray(x).astype(np.float64)


def _synchronize() -> None:
    if cuda_device_count()[0]:
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def _backend_rows(case: OpCase, label: str, convert, a: dict[str, np.ndarray], rng) -> list[Row]:
    """Each dtype on one backend against float64 on the same rounded inputs: gradients
    jump where a sample point crosses an integer, so rounding the inputs first keeps input
    quantisation out of the arithmetic error being measured."""
    rows = []
    grad_output = rng.standard_normal(np.shape(case.forward(a)))
    for dtype_name in DTYPES:
        try:
            dtype = numpy_dtype(dtype_name)
        except ImportError as exc:
            rows.append(_skipped(case.name, label, dtype_name, str(exc)))
            continue
        rounded = {k: v if k in case.fixed else v.astype(dtype) for k, v in a.items()}
        rounded_grad = grad_output.astype(dtype)
        as_float64 = {k: v.astype(np.float64) for k, v in rounded.items()}
        ref_out = case.forward(as_float64)
        ref_grads = case.backward(rounded_grad.astype(np.float64), as_float64)
        args = {k: convert(v) for k, v in rounded.items()}
        go = convert(rounded_grad)
        for _ in range(2):  # the first run compiles kernels; time the second
            out, forward_ms = _timed(case.forward, args)
            grads, backward_ms = _timed(case.backward, go, args)
        tol = TOLERANCE[dtype_name]
        rows.append(
            Row(
                case.name,
                label,
                dtype_name,
                "forward",
                _relative(np.abs(_to_numpy(out) - ref_out).max(), np.abs(ref_out).max()),
                tol,
                forward_ms,
            )
        )
        for name in case.differentiable:
            ref = ref_grads[name]
            error = np.abs(_to_numpy(grads[name]) - ref).max()
            rows.append(
                Row(
                    case.name,
                    label,
                    dtype_name,
                    f"grad_{name}",
                    _relative(error, np.abs(ref).max()),
                    tol,
                    backward_ms,
                )
            )
    return rows


# ---------------------------------------------------------------- the adapters
def _adapter_inputs(case: OpCase, a: dict[str, np.ndarray], rng):
    """float32 inputs and grad_output, and the functional API's output and gradients on
    them: what each adapter is compared with."""
    inputs = {k: v.astype(np.float32) for k, v in a.items()}
    grad_output = rng.standard_normal(np.shape(case.forward(a))).astype(np.float32)
    return inputs, grad_output, case.forward(inputs), case.backward(grad_output, inputs)


def _torch_adapter_runs(case: OpCase, inputs, grad_output):
    """(label, output, gradients, forward ms, backward ms) of cupydcn.torch on each torch
    device (the CPU, and CUDA when PyTorch and CuPy both have it): autograd.grad."""
    import torch

    import cupydcn.torch as adapter

    devices = ["cpu"]
    if torch.cuda.is_available() and cuda_device_count()[0]:
        devices.append("cuda")
    for device in devices:
        synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        tensors = {
            k: torch.from_numpy(v).to(device).requires_grad_(k in case.differentiable)
            for k, v in inputs.items()
        }
        leaves = [tensors[name] for name in case.differentiable]
        go = torch.from_numpy(grad_output).to(device)
        for _ in range(2 if device == "cuda" else 1):  # the first compiles: time the second
            synchronize()
            start = time.perf_counter()
            out = case.forward(tensors, adapter)
            synchronize()
            forward_ms = 1e3 * (time.perf_counter() - start)
            start = time.perf_counter()
            grads = torch.autograd.grad(out, leaves, go)
            synchronize()
            backward_ms = 1e3 * (time.perf_counter() - start)
        yield (
            f"torch adapter ({device})",
            out.detach().cpu().numpy(),
            {name: g.cpu().numpy() for name, g in zip(case.differentiable, grads)},
            forward_ms,
            backward_ms,
        )


def _jax_adapter_runs(case: OpCase, inputs, grad_output):
    """The same for cupydcn.jax on JAX's default device: jax.grad of the output's inner
    product with grad_output."""
    import jax
    import jax.numpy as jnp

    import cupydcn.jax as adapter

    arrays = {k: jnp.asarray(v) for k, v in inputs.items()}
    go = jnp.asarray(grad_output)
    names = case.differentiable

    def loss(*values):
        return jnp.sum(case.forward(dict(arrays, **dict(zip(names, values))), adapter) * go)

    gradient = jax.grad(loss, argnums=tuple(range(len(names))))
    start = time.perf_counter()
    out = jax.block_until_ready(case.forward(arrays, adapter))
    forward_ms = 1e3 * (time.perf_counter() - start)
    start = time.perf_counter()  # jax.grad traces the op's custom_vjp: included
    grads = jax.block_until_ready(gradient(*(arrays[name] for name in names)))
    backward_ms = 1e3 * (time.perf_counter() - start)
    yield (
        f"jax adapter ({jax.default_backend()})",
        np.asarray(out),
        {name: np.asarray(g) for name, g in zip(names, grads)},
        forward_ms,
        backward_ms,
    )


ADAPTERS = (
    ("torch adapter", "cupydcn.torch", _torch_adapter_runs),
    ("jax adapter", "cupydcn.jax", _jax_adapter_runs),
)


def _adapter_rows(case: OpCase, a: dict[str, np.ndarray], rng) -> list[Row]:
    """Each adapter against the functional API on the same float32 inputs (skipped, with
    the reason, when the adapter or its framework is not importable)."""
    rows = []
    inputs, grad_output, ref_out, ref_grads = _adapter_inputs(case, a, rng)
    tol = TOLERANCE["float32"]
    for label, module, runs in ADAPTERS:
        try:
            importlib.import_module(module)
        except Exception as exc:  # not installed, or built for another version
            rows.append(
                _skipped(
                    case.name,
                    label,
                    "float32",
                    f"{module} is not importable ({type(exc).__name__}: {exc})",
                )
            )
            continue
        for backend, out, grads, forward_ms, backward_ms in runs(case, inputs, grad_output):
            rows.append(
                Row(
                    case.name,
                    backend,
                    "float32",
                    "forward",
                    _relative(np.abs(out - ref_out).max(), np.abs(ref_out).max()),
                    tol,
                    forward_ms,
                )
            )
            for name in case.differentiable:
                ref = _to_numpy(ref_grads[name])
                rows.append(
                    Row(
                        case.name,
                        backend,
                        "float32",
                        f"grad_{name} (autograd)",
                        _relative(np.abs(grads[name] - ref).max(), np.abs(ref).max()),
                        tol,
                        backward_ms,
                    )
                )
    return rows


# ---------------------------------------------------------------- the report
def _environment_lines(no_cuda_reason: str | None) -> list[str]:
    lines = [f"cupydcn {__version__}, Python {platform.python_version()}, NumPy {np.__version__}"]
    try:
        import cupy
    except ImportError:
        lines.append("CuPy: not installed (CPU arrays only)")
    else:
        lines.append(f"CuPy {cupy.__version__}")
    count = cuda_device_count()[0]
    lines.append(f"CUDA devices: {count}" if count else f"CUDA devices: none ({no_cuda_reason})")
    for module in ("torch", "jax", "ml_dtypes"):
        try:
            imported = importlib.import_module(module)
            lines.append(f"{module} {getattr(imported, '__version__', '?')}")
        except ImportError:
            lines.append(f"{module}: not installed")
    return lines


COLUMNS = (
    ("op", "<"),
    ("backend", "<"),
    ("dtype", "<"),
    ("what", "<"),
    ("rel. error", ">"),
    ("tolerance", ">"),
    ("ms", ">"),
)


def table_lines(rows: list[Row]) -> list[str]:
    """The table: columns as wide as their widest cell; a skipped row prints dashes in
    its number columns, "skip" and the reason at its end."""
    cells = []
    for row in rows:
        if row.skipped:
            numbers = ("-", "-", "-")
            ok = f"skip  {row.skipped}"
        else:
            numbers = (f"{row.error:.2e}", f"{row.tolerance:.0e}", f"{row.millis:.2f}")
            ok = "yes" if row.ok else "NO"
        cells.append(((row.op, row.backend, row.dtype, row.what, *numbers), ok))
    widths = [
        max([len(name)] + [len(c[0][i]) for c in cells]) for i, (name, _) in enumerate(COLUMNS)
    ]

    def line(values, ok):
        return (
            " ".join(f"{v:{align}{w}}" for v, (_, align), w in zip(values, COLUMNS, widths))
            + "  "
            + ok
        )

    header = line([name for name, _ in COLUMNS], "ok")
    return [header, "-" * len(header), *(line(values, ok) for values, ok in cells)]


def run_check() -> int:
    """Print the environment and the error table; return a process exit code."""
    backends, no_cuda_reason = _backends()
    for line in _environment_lines(no_cuda_reason):
        print(line)
    print(
        "backends: "
        + ", ".join(label for label, _ in backends)
        + (f"; no CUDA backend: {no_cuda_reason}" if no_cuda_reason else "")
    )
    rows: list[Row] = []
    for case in CASES:
        rng = np.random.default_rng(0)
        a = case.make_arrays(rng)
        rows.extend(_reference_rows(case, a, rng))
        for label, convert in backends:
            rows.extend(_backend_rows(case, label, convert, a, rng))
        rows.extend(_adapter_rows(case, a, rng))

    print()
    for line in table_lines(rows):
        print(line)
    failures = sum(not row.skipped and not row.ok for row in rows)
    print()
    print("all checks passed" if failures == 0 else f"{failures} check(s) FAILED")
    return 0 if failures == 0 else 1
