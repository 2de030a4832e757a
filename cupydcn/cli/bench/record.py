"""One measurement: warm up, measure the peak extra memory once, time the rounds; the
record it leaves (the pytest suite's ``extra_info``, a row of the table)."""

from __future__ import annotations

import math
from typing import Any

from .calls import build_call
from .memory import peak_extra_memory
from .problems import Problem
from .providers import provider_label, provider_note
from .shapes import flops_of
from .timing import Timer, measure, peak_dtype, warm_up


def measurement_record(
    *,
    problem: Problem,
    provider: str,
    variant: str,
    pass_: str,
    timer: Timer,
    warmup: int,
    memory: tuple[int | None, str],
) -> dict[str, Any]:
    """What one measurement records (the pytest suite's ``extra_info``; a row of the table)."""
    device = problem.device
    shape = problem.shape
    record = {
        "op": shape.op,
        "shape": shape.id,
        "dims": shape.describe(),
        "variant": variant,
        "dtype": problem.dtype,
        "pass": pass_,
        "provider": provider,
        "label": provider_label(provider, device.kind),
        "device": device.name,
        "device_kind": device.kind,
        "timer": device.timer,
        "median_ms": timer.median_ms,
        "min_ms": min(timer.times_ms) if timer.times_ms else math.nan,
        "rounds": len(timer.times_ms),
        "warmup": warmup,
        "times_ms": [round(t, 6) for t in timer.times_ms],
        "peak_extra_bytes": memory[0],
        "memory_method": memory[1],
        "flops": flops_of(shape, pass_),
        "peak_gemm_dtype": peak_dtype(problem.dtype, device),
        "compute_dtype": problem.dtype if provider == "cupydcn" else problem.peer_dtype,
        "note": provider_note(problem, provider, variant),
    }
    if device.kind == "cuda":
        record["gpu_median_ms"] = timer.median_ms
    return record


def run_one(
    problem: Problem, provider: str, variant: str, pass_: str, *, rounds: int, warmup: int
) -> dict[str, Any]:
    """Warm up, measure peak extra memory once, time ``rounds`` calls; the record."""
    fn = build_call(problem, provider, variant, pass_)
    tracked = provider == "cupydcn" or problem.device.kind == "cuda"
    warm_up(fn, problem.device, warmup)
    memory = peak_extra_memory(fn, problem.device, tracked=tracked)
    timer = measure(fn, problem.device, rounds=rounds, warmup=0)
    return measurement_record(
        problem=problem,
        provider=provider,
        variant=variant,
        pass_=pass_,
        timer=timer,
        warmup=warmup,
        memory=memory,
    )
