"""GEMMs of deform_conv2d's NumPy backend with 1 BLAS thread and with all threads, idle and
with a spinning second process (the measurements behind cupydcn/core/threads.py).

    python benchmarks/cpu/gemm_threads.py            # needs threadpoolctl

Prints one line per GEMM: median seconds of 1 thread / all threads, idle and busy, with the
load average. Shapes: (batch, M, K, N) of ``matmul([M, K], [batch, K, N])``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from busy import Spinner  # noqa: E402

# forward GEMM weight [C_out, C*K] @ columns [C*K, P]; backward W^T @ grad [C*K, C_out]@[C_out, P]
SHAPES = {
    "demo 16ch 64x64 fwd (n=4)": (4, 16, 144, 4096),
    "demo 16ch 64x64 bwd-in (n=4)": (4, 144, 16, 4096),
    "32ch 13x21 fwd": (1, 32, 288, 273),
    "64ch 8x11 fwd": (1, 64, 576, 88),
    "S1 128ch 100x168 fwd": (1, 128, 1152, 16800),
    "S1 bwd-in": (1, 1152, 128, 16800),
    "S2 256ch 50x84 fwd": (1, 256, 2304, 4200),
    "S3 512ch 25x42 fwd": (1, 512, 4608, 1050),
    "S3 bwd-in": (1, 4608, 512, 1050),
}


def median_time(fn, repeats: int, budget_s: float = 1.5) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < budget_s and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > 4 * budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def main() -> None:
    info = [(i["internal_api"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()]
    print("BLAS:", info, "cores:", os.cpu_count())
    rng = np.random.default_rng(0)
    rows = []
    for name, (batch, m, k, n) in SHAPES.items():
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((batch, k, n), dtype=np.float32)
        result = {}
        for busy in (False, True):
            ctx = Spinner(120) if busy else None
            if ctx:
                ctx.__enter__()
            try:
                for _ in range(2):  # interleave 1 / all threads, twice
                    for threads in (1, None):
                        with threadpool_limits(limits=threads, user_api="blas"):
                            t = median_time(lambda a=a, b=b: np.matmul(a, b), 5)
                        result.setdefault((busy, threads), []).append(t)
            finally:
                if ctx:
                    ctx.__exit__()
        flops = 2 * batch * m * k * n
        cells = {key: min(v) for key, v in result.items()}
        rows.append((name, flops, cells))
        print(
            f"{name:32s} {flops / 1e6:9.1f} MFLOP  idle 1t {cells[(False, 1)] * 1e3:8.2f} ms"
            f"  all {cells[(False, None)] * 1e3:8.2f} ms  busy 1t {cells[(True, 1)] * 1e3:8.2f} ms"
            f"  all {cells[(True, None)] * 1e3:8.2f} ms   load {os.getloadavg()[0]:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
