"""``python -m cupydcn check``: find the backends and devices, run every op forward and
backward on each, and compare with the reference.

The reference is established in two steps, both printed:
1. the NumPy backend in float64 against a direct evaluation of the formula
   y(p0) = sum_k w(k) m_k x(p0 + p_k + dp_k) + b at random output points, and its
   backward against central finite differences of the forward along random directions;
2. every backend and dtype against that float64 result.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass

import numpy as np

from . import __version__
from ._deform_conv import deform_conv2d, deform_conv2d_backward
from ._dtypes import DTYPES, numpy_dtype

# A small problem with everything different in H and W, groups and offset groups.
PROBLEM = dict(n=3, c=6, h=9, w=8, c_out=4, kh=3, kw=2, groups=2, offset_groups=3,
               stride=(1, 2), padding=(1, 2), dilation=(2, 1))

# Max |error| / max |reference| accepted per dtype.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}

GRAD_NAMES = ("grad_input", "grad_offset", "grad_weight", "grad_mask", "grad_bias")


@dataclass
class Row:
    backend: str
    dtype: str
    what: str
    error: float
    tolerance: float
    millis: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tolerance


def _problem(seed: int = 0) -> dict[str, np.ndarray]:
    p = PROBLEM
    rng = np.random.default_rng(seed)
    out_h = (p["h"] + 2 * p["padding"][0] - (p["dilation"][0] * (p["kh"] - 1) + 1)) // p["stride"][0] + 1
    out_w = (p["w"] + 2 * p["padding"][1] - (p["dilation"][1] * (p["kw"] - 1) + 1)) // p["stride"][1] + 1
    taps = p["kh"] * p["kw"]
    return {
        "input": rng.standard_normal((p["n"], p["c"], p["h"], p["w"])),
        "offset": 1.7 * rng.standard_normal((p["n"], 2 * p["offset_groups"] * taps, out_h, out_w)),
        "weight": rng.standard_normal((p["c_out"], p["c"] // p["groups"], p["kh"], p["kw"])),
        "bias": rng.standard_normal((p["c_out"],)),
        "mask": rng.uniform(size=(p["n"], p["offset_groups"] * taps, out_h, out_w)),
    }


def _options():
    return {k: PROBLEM[k] for k in ("stride", "padding", "dilation")}


def _direct_output_point(a: dict[str, np.ndarray], b: int, co: int, oy: int, ox: int) -> float:
    """y[b, co, oy, ox] summed straight from the definition (float64)."""
    p = PROBLEM
    c_in, height, width = p["c"], p["h"], p["w"]
    cg = c_in // p["groups"]
    group = co // (p["c_out"] // p["groups"])
    channels_per_offset_group = c_in // p["offset_groups"]
    total = a["bias"][co]
    for ci in range(cg):
        c = group * cg + ci
        g = c // channels_per_offset_group
        for i in range(p["kh"]):
            for j in range(p["kw"]):
                k = i * p["kw"] + j
                py = oy * p["stride"][0] - p["padding"][0] + i * p["dilation"][0] + a["offset"][b, g * 2 * p["kh"] * p["kw"] + 2 * k, oy, ox]
                px = ox * p["stride"][1] - p["padding"][1] + j * p["dilation"][1] + a["offset"][b, g * 2 * p["kh"] * p["kw"] + 2 * k + 1, oy, ox]
                value = 0.0
                for qy in range(math.floor(py), math.floor(py) + 2):
                    for qx in range(math.floor(px), math.floor(px) + 2):
                        if 0 <= qy < height and 0 <= qx < width:
                            value += max(0.0, 1 - abs(qy - py)) * max(0.0, 1 - abs(qx - px)) * a["input"][b, c, qy, qx]
                total += a["weight"][co, ci, i, j] * a["mask"][b, g * p["kh"] * p["kw"] + k, oy, ox] * value
    return float(total)


def _relative(error: float, scale: float) -> float:
    return error / max(scale, 1e-30)


def _reference_rows(a: dict[str, np.ndarray]) -> tuple[list[Row], np.ndarray]:
    rows = []
    start = time.perf_counter()
    out = deform_conv2d(a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **_options())
    millis = 1e3 * (time.perf_counter() - start)
    rng = np.random.default_rng(1)
    points = [tuple(int(rng.integers(0, s)) for s in out.shape) for _ in range(24)]
    error = max(abs(out[pt] - _direct_output_point(a, *pt)) for pt in points)
    rows.append(Row("numpy float64 vs formula", "float64", "forward (24 points)",
                    _relative(error, np.abs(out).max()), TOLERANCE["float64"], millis))

    grad_output = rng.standard_normal(out.shape)
    start = time.perf_counter()
    grads = deform_conv2d_backward(grad_output, a["input"], a["offset"], a["weight"], a["mask"],
                                   **_options())
    millis = 1e3 * (time.perf_counter() - start)
    eps = 1e-6
    for name in ("input", "offset", "weight", "mask", "bias"):
        direction = rng.standard_normal(a[name].shape)
        values = []
        for sign in (1, -1):
            moved = dict(a, **{name: a[name] + sign * eps * direction})
            y = deform_conv2d(moved["input"], moved["offset"], moved["weight"], moved["bias"],
                              mask=moved["mask"], **_options())
            values.append(float(np.sum(y * grad_output)))
        numeric = (values[0] - values[1]) / (2 * eps)
        analytic = float(np.sum(getattr(grads, "grad_" + name) * direction))
        rows.append(Row("numpy float64 vs finite diff.", "float64", f"d/d{name}",
                        _relative(abs(numeric - analytic), abs(numeric)), 1e-5, millis))
    return rows, grad_output


def _backends() -> list[tuple[str, object]]:
    """(label, converter from NumPy) for the NumPy backend and each CUDA device."""
    found: list[tuple[str, object]] = [("numpy (CPU)", lambda x: x)]
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy / no driver / no device
        return found
    for device in range(count):
        name = cupy.cuda.runtime.getDeviceProperties(device)["name"].decode()

        def to_device(x, device=device):
            with cupy.cuda.Device(device):
                return cupy.asarray(x)

        found.append((f"cupy cuda:{device} ({name})", to_device))
    return found


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "get"):
        x = x.get()
    return np.asarray(x).astype(np.float64)


def _synchronize() -> None:
    try:
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    except Exception:  # nothing to synchronise without CuPy
        pass


def _float64_result(a: dict[str, np.ndarray], grad_output: np.ndarray):
    """Forward and all gradients by the NumPy backend in float64."""
    out = deform_conv2d(a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **_options())
    grads = deform_conv2d_backward(grad_output, a["input"], a["offset"], a["weight"], a["mask"],
                                   **_options())
    return out, grads


def _backend_rows(label, convert, a, grad_output) -> list[Row]:
    """Each dtype on one backend against float64 on the same (rounded) inputs: the offset
    gradient jumps where a sample point crosses an integer, so rounding the inputs first
    keeps input quantisation out of the arithmetic error being measured."""
    rows = []
    for dtype_name in DTYPES:
        try:
            dtype = numpy_dtype(dtype_name)
        except ImportError as exc:
            rows.append(Row(label, dtype_name, f"skipped: {exc}", float("nan"), 0.0, 0.0))
            continue
        rounded = {k: v.astype(dtype) for k, v in a.items()}
        rounded_grad_output = grad_output.astype(dtype)
        ref_out, ref_grads = _float64_result(
            {k: v.astype(np.float64) for k, v in rounded.items()},
            rounded_grad_output.astype(np.float64))
        args = {k: convert(v) for k, v in rounded.items()}
        go = convert(rounded_grad_output)
        for _ in range(2):  # the first run compiles kernels; time the second
            _synchronize()
            start = time.perf_counter()
            out = deform_conv2d(args["input"], args["offset"], args["weight"], args["bias"],
                                mask=args["mask"], **_options())
            _synchronize()
            forward_ms = 1e3 * (time.perf_counter() - start)
            start = time.perf_counter()
            grads = deform_conv2d_backward(go, args["input"], args["offset"], args["weight"],
                                           args["mask"], **_options())
            _synchronize()
            backward_ms = 1e3 * (time.perf_counter() - start)
        tol = TOLERANCE[dtype_name]
        error = np.abs(_to_numpy(out) - ref_out).max()
        rows.append(Row(label, dtype_name, "forward", _relative(error, np.abs(ref_out).max()),
                        tol, forward_ms))
        for name in GRAD_NAMES:
            ref = getattr(ref_grads, name)
            error = np.abs(_to_numpy(getattr(grads, name)) - ref).max()
            rows.append(Row(label, dtype_name, name, _relative(error, np.abs(ref).max()), tol,
                            backward_ms))
    return rows


def _environment_lines() -> list[str]:
    lines = [f"cupydcn {__version__}, Python {platform.python_version()}, NumPy {np.__version__}"]
    try:
        import cupy

        lines.append(f"CuPy {cupy.__version__}")
        try:
            count = cupy.cuda.runtime.getDeviceCount()
            lines.append(f"CUDA devices: {count}")
        except Exception as exc:  # a driver-less machine
            lines.append(f"CUDA devices: none ({type(exc).__name__}: {exc})")
    except ImportError:
        lines.append("CuPy: not installed (CPU arrays only)")
    for module in ("torch", "jax", "ml_dtypes"):
        try:
            imported = __import__(module)
            lines.append(f"{module} {getattr(imported, '__version__', '?')}")
        except ImportError:
            lines.append(f"{module}: not installed")
    return lines


def run_check() -> int:
    """Print the environment and the error table; return a process exit code."""
    for line in _environment_lines():
        print(line)
    a = _problem()
    rows, grad_output = _reference_rows(a)
    for label, convert in _backends():
        rows.extend(_backend_rows(label, convert, a, grad_output))

    print()
    header = f"{'backend':34} {'dtype':9} {'what':22} {'rel. error':>11} {'tolerance':>10} {'ms':>9}  ok"
    print(header)
    print("-" * len(header))
    failures = 0
    for row in rows:
        skipped = row.what.startswith("skipped")
        ok = "skip" if skipped else ("yes" if row.ok else "NO")
        failures += (not skipped and not row.ok)
        print(f"{row.backend:34} {row.dtype:9} {row.what:22} {row.error:11.2e} "
              f"{row.tolerance:10.0e} {row.millis:9.2f}  {ok}")
    print()
    print("all checks passed" if failures == 0 else f"{failures} check(s) FAILED")
    return 0 if failures == 0 else 1
