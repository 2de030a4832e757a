"""deform_conv2d's NumPy backend under each BLAS thread policy (cupydcn/core/threads.py),
idle and with a spinning second process, interleaved in one process.

    python benchmarks/cpu/thread_policy.py [NAME ...]   # needs threadpoolctl

NAMEs select the shapes whose label contains one of them (default: all).

Policies: "auto" (the default: one BLAS thread for products below SMALL_GEMM_FLOPS),
"blas" (the BLAS library's own threads for every product) and 1 (one thread always).
Prints the median forward+backward time per shape, policy and condition.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from busy import Spinner  # noqa: E402

from cupydcn import deform_conv2d, deform_conv2d_backward  # noqa: E402
from cupydcn.core import threads  # noqa: E402

SHAPES = {  # (n, c, h, w): c -> c channels, 3x3, padding 1, DCNv2
    "demo 16ch 4x64x64": (4, 16, 64, 64),
    "S1/4 16ch 25x42": (1, 16, 25, 42),
    "S3/8 64ch 8x11": (1, 64, 8, 11),
    "64ch 2x32x32": (2, 64, 32, 32),
    "S1 128ch 100x168": (1, 128, 100, 168),
    "S2 256ch 50x84": (1, 256, 50, 84),
    "S3 512ch 25x42": (1, 512, 25, 42),
}
POLICIES = ("auto", "blas", 1)


def arrays(n, c, h, w):
    rng = np.random.default_rng(0)
    return dict(
        input=rng.standard_normal((n, c, h, w), dtype=np.float32),
        offset=rng.standard_normal((n, 18, h, w), dtype=np.float32),
        weight=(rng.standard_normal((c, c, 3, 3), dtype=np.float32) / (9 * c) ** 0.5),
        mask=rng.random((n, 9, h, w), dtype=np.float32),
        grad=rng.standard_normal((n, c, h, w), dtype=np.float32),
    )


def step(a):
    deform_conv2d(a["input"], a["offset"], a["weight"], None, padding=1, mask=a["mask"])
    deform_conv2d_backward(a["grad"], a["input"], a["offset"], a["weight"], a["mask"], padding=1)


def main() -> None:
    print("thread control:", threads.has_thread_control(), " load", os.getloadavg())
    wanted = sys.argv[1:]
    for name, dims in SHAPES.items():
        if wanted and not any(w in name for w in wanted):
            continue
        a = arrays(*dims)
        for busy in (False, True):
            spinner = Spinner(120) if busy else None
            if spinner:
                spinner.__enter__()
            try:
                times = {p: [] for p in POLICIES}
                for policy in POLICIES:  # warm-up
                    threads.set_blas_threads(policy)
                    step(a)
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < 6 or len(times[1]) < 3:
                    for policy in POLICIES:
                        threads.set_blas_threads(policy)
                        s = time.perf_counter()
                        step(a)
                        times[policy].append(time.perf_counter() - s)
                    if len(times[1]) >= 15:
                        break
            finally:
                threads.set_blas_threads(None)
                if spinner:
                    spinner.__exit__()
            cells = "  ".join(
                f"{p!s:>4}: {statistics.median(v) * 1e3:8.1f} ms" for p, v in times.items()
            )
            print(
                f"{name:20s} {'busy' if busy else 'idle'}  {cells}  n={len(times[1])}"
                f"  load {os.getloadavg()[0]:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
