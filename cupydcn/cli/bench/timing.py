"""Time: CUDA events on the stream the work runs on (``time.perf_counter`` on the CPU),
warm-up, garbage collection paused; the device's peak, a large GEMM timed the same way."""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .device import Device, Unavailable
from .problems import torch_dtype


def synchronize(device: Device) -> None:
    if device.kind != "cuda":
        return
    if device.library == "torch":
        import torch

        torch.cuda.synchronize()
    import cupy

    cupy.cuda.Device().synchronize()


class Timer:
    """Times one call per round and keeps the times (ms). On a GPU: CUDA events recorded
    on the stream the work runs on (PyTorch's current stream for PyTorch tensors, which is
    also where cupydcn launches; CuPy's current stream for CuPy arrays), the end event
    synchronised inside the round. On the CPU: ``time.perf_counter``."""

    def __init__(self, device: Device):
        self.device = device
        self.times_ms: list[float] = []

    def wrap(self, fn: Callable[[], Any]) -> Callable[[], None]:
        times = self.times_ms
        if self.device.kind != "cuda":

            def round_cpu():
                start = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - start))

            return round_cpu
        if self.device.library == "torch":
            import torch

            def round_torch():
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(float(start.elapsed_time(end)))

            return round_torch
        import cupy

        def round_cupy():
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(float(cupy.cuda.get_elapsed_time(start, end)))

        return round_cupy

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.times_ms)) if self.times_ms else math.nan


def warm_up(fn: Callable[[], Any], device: Device, rounds: int) -> None:
    """Run ``fn`` (at least once: compilation, autotuning) and wait for the device."""
    for _ in range(max(1, rounds)):
        fn()
    synchronize(device)


@contextlib.contextmanager
def gc_paused():
    """No garbage collection while timing (a collection would stall the launches)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def measure(fn: Callable[[], Any], device: Device, *, rounds: int, warmup: int) -> Timer:
    warm_up(fn, device, warmup)
    timer = Timer(device)
    one_round = timer.wrap(fn)
    with gc_paused():
        for _ in range(rounds):
            one_round()
    return timer


def peak_gemm(
    device: Device, dtype: str, *, size: int | None = None, rounds: int = 20, warmup: int = 3
) -> dict[str, Any]:
    """A size³ GEMM timed like the ops: TFLOP/s = 2·size³ / median time. On the CPU the
    NumPy backend computes half types in float32, so the CPU peak is float32's."""
    if device.kind != "cuda":
        size = size or 1024
        rng = np.random.default_rng(0)
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        fn = lambda: a @ b  # noqa: E731
        library, computed = "numpy.matmul", "float32"
    elif device.library == "torch":
        import torch

        size = size or 8192
        gen = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randn(size, size, device="cuda", generator=gen).to(torch_dtype(dtype))
        b = torch.randn(size, size, device="cuda", generator=gen).to(torch_dtype(dtype))
        fn = lambda: torch.matmul(a, b)  # noqa: E731
        library, computed = "torch.matmul (TF32 off)", dtype
    else:
        import cupy

        size = size or 8192
        if dtype == "bfloat16":
            raise Unavailable("CuPy arrays: no bfloat16 GEMM to time")
        a = cupy.random.standard_normal((size, size), dtype=cupy.float32).astype(dtype)
        b = cupy.random.standard_normal((size, size), dtype=cupy.float32).astype(dtype)
        fn = lambda: cupy.matmul(a, b)  # noqa: E731
        library, computed = "cupy.matmul (CUPY_TF32 unset)", dtype
    timer = measure(fn, device, rounds=rounds, warmup=warmup)
    median = timer.median_ms
    return {
        "dtype": computed,
        "m": size,
        "n": size,
        "k": size,
        "library": library,
        "timer": device.timer,
        "rounds": rounds,
        "median_ms": median,
        "tflops": 2 * size**3 / (median * 1e-3) / 1e12,
    }


def peak_dtype(dtype: str, device: Device) -> str:
    """Which measured GEMM peak a row of ``dtype`` is compared with."""
    return "float32" if device.kind != "cuda" else dtype
