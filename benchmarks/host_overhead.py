"""Host time of one deform_conv2d call on the CUDA path, without the device.

The orchestration (cupydcn/deform_conv/cuda_backend.py) runs against
``cupydcn.cuda.launch.NullLauncher``: argument packing and checks, planning, the launch
and GEMM calls, but no kernel. What this measures is the per-call cost a GPU call pays on
the host besides CuPy's own launch cost (a few microseconds per kernel). Small shapes,
where that overhead matters most; median of 200 calls after a warm-up.

    python benchmarks/host_overhead.py      # writes benchmarks/results/host_overhead.json
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from cupydcn.core.dtypes import numpy_dtype
from cupydcn.cuda.launch import NullLauncher, record_calls
from cupydcn.deform_conv import cuda_backend
from cupydcn.deform_conv.spec import DEFAULT_WORKSPACE_BYTES, ConvGeometry

GRADS = frozenset({"input", "offset", "weight", "mask", "bias"})


def geometry(n: int, c: int, hw: int, groups: int, dtype_name: str) -> ConvGeometry:
    return ConvGeometry(
        batch=n,
        in_channels=c,
        height=hw,
        width=hw,
        out_channels=c,
        groups=groups,
        offset_groups=1,
        kernel_h=3,
        kernel_w=3,
        stride_h=1,
        stride_w=1,
        pad_h=1,
        pad_w=1,
        dil_h=1,
        dil_w=1,
        out_h=hw,
        out_w=hw,
        has_mask=True,
        has_bias=True,
        dtype_name=dtype_name,
    )


def median_us(fn, rounds: int = 200) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(label: str, geom: ConvGeometry) -> dict:
    """Host time per forward and backward call of ``geom`` on the null launcher."""
    launcher = NullLauncher()
    dtype = numpy_dtype(geom.dtype_name)
    x = np.zeros(geom.input_shape, dtype)
    off = np.zeros(geom.offset_shape, dtype)
    w = np.zeros(geom.weight_shape, dtype)
    b = np.zeros((geom.out_channels,), dtype)
    m = np.zeros(geom.mask_shape, dtype)
    gy = np.zeros(geom.output_shape, dtype)
    budget = DEFAULT_WORKSPACE_BYTES

    def forward():
        cuda_backend.conv_forward(launcher, x, off, w, b, m, geom, workspace_bytes=budget)

    def backward():
        cuda_backend.conv_backward(
            launcher, gy, x, off, w, m, geom, wrt=GRADS, workspace_bytes=budget
        )

    with record_calls() as fwd_calls:
        forward()
    with record_calls() as bwd_calls:
        backward()
    return dict(
        shape=label,
        dtype=geom.dtype_name,
        forward_us=round(median_us(forward), 1),
        backward_us=round(median_us(backward), 1),
        forward_launches=fwd_calls.launch_count + fwd_calls.gemm_count,
        backward_launches=bwd_calls.launch_count + bwd_calls.gemm_count,
    )


def main() -> None:
    rows = [
        measure(label, geometry(n, c, hw, groups, dtype_name))
        for label, (n, c, hw, groups) in {
            "64 ch 8x8": (2, 64, 8, 1),
            "256 ch 16x16": (2, 256, 16, 1),
            "depthwise 64 ch 8x8": (2, 64, 8, 64),
        }.items()
        for dtype_name in ("float32", "float16")
    ]
    result = dict(
        machine=platform.processor() or platform.machine(),
        python=platform.python_version(),
        numpy=np.__version__,
        note="host time per call, null launcher (no kernel runs); medians of 200 calls",
        rows=rows,
    )
    out = Path(__file__).resolve().parent / "results" / "host_overhead.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
