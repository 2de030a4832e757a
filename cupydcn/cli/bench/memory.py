"""Peak extra memory of one call: the allocator high-water mark above what was allocated
before it, minus the call's outputs (PyTorch's caching allocator plus CuPy's memory pool
on a GPU, ``tracemalloc`` for NumPy on the CPU)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

from .device import Device
from .timing import synchronize


def _flatten(outputs) -> list:
    if outputs is None:
        return []
    if isinstance(outputs, (tuple, list)):
        return [a for item in outputs for a in _flatten(item)]
    return [outputs]


def output_bytes(outputs) -> int:
    return int(sum(int(getattr(a, "nbytes", 0) or 0) for a in _flatten(outputs)))


class _CupyHighWater:
    """Live bytes handed out by CuPy's memory pool since entering, and their maximum."""

    def __init__(self):
        from cupy.cuda import memory_hook

        class Hook(memory_hook.MemoryHook):
            name = "cupydcn_bench_high_water"

            def __init__(hook):
                hook.current = 0
                hook.peak = 0

            def malloc_postprocess(hook, **kwargs):
                hook.current += int(kwargs["mem_size"])
                hook.peak = max(hook.peak, hook.current)

            def free_postprocess(hook, **kwargs):
                hook.current -= int(kwargs["mem_size"])

        self.hook = Hook()

    def __enter__(self):
        self.hook.__enter__()
        return self.hook

    def __exit__(self, *exc):
        return self.hook.__exit__(*exc)


def peak_extra_memory(
    fn: Callable[[], Any], device: Device, *, tracked: bool = True
) -> tuple[int | None, str]:
    """(bytes, method): the allocator high-water mark during one call of ``fn`` above what
    was allocated before it, minus the bytes of what ``fn`` returns. ``tracked=False``
    (PyTorch on the CPU, whose allocator tracemalloc does not see) gives (None, why)."""
    if device.kind != "cuda":
        if not tracked:
            return None, "not tracked (PyTorch's CPU allocator is invisible to tracemalloc)"
        was_tracing = tracemalloc.is_tracing()
        if not was_tracing:
            tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            outputs = fn()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            if not was_tracing:
                tracemalloc.stop()
        return max(0, peak - base - output_bytes(outputs)), "tracemalloc (NumPy allocations)"
    synchronize(device)
    torch = None
    if device.library == "torch":
        import torch

        torch.cuda.reset_peak_memory_stats()
        torch_base = torch.cuda.memory_allocated()
    with _CupyHighWater() as hook:
        outputs = fn()
        synchronize(device)
    extra = hook.peak
    method = "CuPy memory pool high-water mark"
    if torch is not None:
        extra += torch.cuda.max_memory_allocated() - torch_base
        method = "PyTorch caching allocator + CuPy memory pool high-water marks"
    extra -= output_bytes(outputs)
    del outputs
    return max(0, int(extra)), method
