"""``python -m cupydcn bench`` and the measuring core shared with ``benchmarks/``.

One protocol for the quick command and the pytest-benchmark suite (``benchmarks/``, see
its README):

- the device: CUDA when CuPy finds a device (cupydcn then gets PyTorch CUDA tensors when
  PyTorch has CUDA, the very tensors the peers get, else CuPy arrays), otherwise the CPU,
  where cupydcn runs its NumPy backend on scaled-down shapes and the GPU peers are skipped
  with the reason;
- time: CUDA events around each call on the stream the work runs on, synchronised inside
  the timed callable, after warm-up (which includes NVRTC compilation and cuDNN
  autotuning); ``time.perf_counter`` on the CPU; the median is reported;
- peak extra memory: the allocator high-water mark during one call minus what was
  allocated before it and minus the call's outputs (PyTorch's caching allocator plus
  CuPy's memory pool on a GPU, ``tracemalloc`` for NumPy on the CPU);
- precision switches set explicitly and recorded: TF32 off for every peer
  (``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``
  False), ``CUPY_TF32`` unset, cuDNN autotuning on;
- the device's peak: a large GEMM timed the same way; achieved TFLOP/s of a convolution
  count 2*N*C_out*H_out*W_out*(C_in/groups)*kh*kw per forward (twice that for the
  backward, three times for forward+backward);
- bfloat16 peers: the peers get the bfloat16 values upcast to float32, and the row says so.

Nothing here is imported by the ops; PyTorch, torchvision, mmcv and CuPy are imported
only when a measurement needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import math
import os
import platform
import re
import statistics
import sys
import time
import tracemalloc
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

# ---------------------------------------------------------------------------- shapes
OPS = ("deform_conv2d", "deform_roi_pool", "deform_psroi_pool")
PASSES = ("forward", "backward", "forward+backward")
DTYPES = ("float32", "float16", "bfloat16")
# Multiples of the forward's GEMM work counted for each pass (backward: input and weight
# gradients, one forward-sized GEMM each).
PASS_FLOP_FACTOR = {"forward": 1, "backward": 2, "forward+backward": 3}
# "mask": DCNv2 / modulated pooling, "nomask": DCNv1 / plain deformable pooling,
# "-": no such choice (cuDNN conv2d, PS-RoI pooling).
VARIANTS = ("mask", "nomask", "-")


@dataclass(frozen=True)
class ConvShape:
    """One deform_conv2d problem: input [n, c_in, h, w], weight [c_out, c_in/groups, kh, kw]."""

    op: ClassVar[str] = "deform_conv2d"
    id: str
    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    kh: int = 3
    kw: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    groups: int = 1
    offset_groups: int = 1
    why: str = ""

    @property
    def out_h(self) -> int:
        return (self.h + 2 * self.padding - (self.dilation * (self.kh - 1) + 1)) // self.stride + 1

    @property
    def out_w(self) -> int:
        return (self.w + 2 * self.padding - (self.dilation * (self.kw - 1) + 1)) // self.stride + 1

    def forward_flops(self) -> int:
        """2*N*C_out*H_out*W_out*(C_in/groups)*kh*kw: the GEMM work of one forward."""
        return (2 * self.n * self.c_out * self.out_h * self.out_w
                * (self.c_in // self.groups) * self.kh * self.kw)

    def describe(self) -> str:
        text = (f"N={self.n} C={self.c_in}→{self.c_out} {self.h}×{self.w} "
                f"k{self.kh}×{self.kw}")
        if self.stride != 1:
            text += f" stride {self.stride}"
        if self.groups != 1:
            text += f" groups {self.groups}"
        if self.offset_groups != 1:
            text += f" offset groups {self.offset_groups}"
        return text


@dataclass(frozen=True)
class RoiShape:
    """One deform_roi_pool problem: input [n, c, h, w], ``rois`` RoIs, offsets [K, 2, P, P]."""

    op: ClassVar[str] = "deform_roi_pool"
    id: str
    n: int
    c: int
    h: int
    w: int
    rois: int
    output_size: int = 7
    sampling_ratio: int = 2
    gamma: float = 0.1
    spatial_scale: float = 0.25
    why: str = ""

    def forward_flops(self) -> None:
        return None

    def describe(self) -> str:
        return (f"N={self.n} C={self.c} {self.h}×{self.w} {self.rois} RoIs "
                f"{self.output_size}×{self.output_size} sr {self.sampling_ratio} "
                f"scale 1/{round(1 / self.spatial_scale)}")


@dataclass(frozen=True)
class PsRoiShape:
    """One deform_psroi_pool problem: input [n, output_dim*group_size², h, w]; class-agnostic
    offsets [K, 2, part_size, part_size]."""

    op: ClassVar[str] = "deform_psroi_pool"
    id: str
    n: int
    output_dim: int
    group_size: int
    pooled_size: int
    part_size: int
    sample_per_part: int
    h: int
    w: int
    rois: int
    spatial_scale: float = 0.125
    trans_std: float = 0.1
    why: str = ""

    @property
    def c(self) -> int:
        return self.output_dim * self.group_size ** 2

    def forward_flops(self) -> None:
        return None

    def describe(self) -> str:
        return (f"N={self.n} C={self.c} {self.h}×{self.w} {self.rois} RoIs out {self.output_dim} "
                f"group {self.group_size} pooled {self.pooled_size} part {self.part_size} "
                f"spp {self.sample_per_part} scale 1/{round(1 / self.spatial_scale)}")


Shape = ConvShape | RoiShape | PsRoiShape

# The shapes of the quick command: rows S1, S3, S7, R1 and R2 of benchmarks/shapes.py (a
# test keeps them equal), full size on a GPU, scaled down on the CPU.
QUICK_SHAPES: dict[str, Shape] = {
    "S1": ConvShape("S1", 2, 128, 128, 100, 168, why="R50 c3"),
    "S3": ConvShape("S3", 2, 512, 512, 25, 42, why="R50 c5"),
    "S7": ConvShape("S7", 16, 512, 512, 28, 28, groups=512, why="depthwise"),
    "R1": RoiShape("R1", 2, 256, 200, 336, 1024, why="deformable RoI pooling"),
    "R2": PsRoiShape("R2", 2, 10, 7, 7, 7, 4, 100, 168, 512, why="deformable PS-RoI pooling"),
}
QUICK_SHAPES_CPU: dict[str, Shape] = {
    "S1": ConvShape("S1", 1, 16, 16, 25, 42, why="R50 c3, scaled down"),
    "S3": ConvShape("S3", 1, 64, 64, 8, 11, why="R50 c5, scaled down"),
    "S7": ConvShape("S7", 2, 64, 64, 8, 8, groups=64, why="depthwise, scaled down"),
    "R1": RoiShape("R1", 1, 32, 50, 84, 64, spatial_scale=1 / 16,
                   why="deformable RoI pooling, scaled down"),
    "R2": PsRoiShape("R2", 1, 2, 7, 7, 7, 4, 25, 42, 32, spatial_scale=1 / 32,
                     why="deformable PS-RoI pooling, scaled down"),
}

# ---------------------------------------------------------------------------- providers
CONV_PROVIDERS = ("cupydcn", "torchvision", "cudnn_nchw", "cudnn_nhwc", "mmcv")
ROI_PROVIDERS = ("cupydcn", "roi_align", "mmcv")
PSROI_PROVIDERS = ("cupydcn", "ps_roi_align")
PROVIDERS = {"deform_conv2d": CONV_PROVIDERS, "deform_roi_pool": ROI_PROVIDERS,
             "deform_psroi_pool": PSROI_PROVIDERS}
PROVIDER_ORDER = ("cupydcn", "torchvision", "cudnn_nchw", "cudnn_nhwc", "roi_align",
                  "ps_roi_align", "mmcv")
# Providers with no mask/no-mask choice: one row serves both variants.
VARIANTLESS = {"cudnn_nchw", "cudnn_nhwc", "roi_align"}


def provider_label(provider: str, device_kind: str = "cuda") -> str:
    gpu = {
        "cupydcn": "cupydcn",
        "torchvision": "torchvision deform_conv2d",
        "cudnn_nchw": "cuDNN conv2d NCHW",
        "cudnn_nhwc": "cuDNN conv2d NHWC",
        "roi_align": "torchvision roi_align",
        "ps_roi_align": "torchvision ps_roi_align",
        "mmcv": "mmcv",
    }[provider]
    if device_kind == "cpu":
        return {
            "cupydcn": "cupydcn (NumPy)",
            "cudnn_nchw": "torch conv2d NCHW (CPU)",
            "cudnn_nhwc": "torch conv2d NHWC (CPU)",
        }.get(provider, gpu + " (CPU)")
    return gpu


def variants_of(op: str, provider: str) -> tuple[str, ...]:
    """The mask variants a provider runs for an op."""
    if op == "deform_psroi_pool" or provider in VARIANTLESS:
        return ("-",)
    return ("mask", "nomask")


class Unavailable(Exception):
    """A provider cannot run here; the message says why (the test is skipped with it)."""


# ---------------------------------------------------------------------------- the device
@dataclass
class Device:
    kind: str                   # "cuda" or "cpu"
    name: str                   # GPU model or CPU model
    library: str                # what cupydcn gets: "torch" / "cupy" (CUDA) or "numpy"
    torch_cuda: bool            # PyTorch has CUDA on this device (the peers can run)
    no_gpu_reason: str | None   # why there is no CUDA path (None on a GPU)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def timer(self) -> str:
        return "cuda_event" if self.kind == "cuda" else "perf_counter"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _torch_cuda() -> tuple[bool, str | None]:
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return False, f"PyTorch {torch.__version__} has no CUDA device"
    return True, None


def thread_settings() -> dict[str, str]:
    """The CPU thread settings in force (BLAS and OpenMP pools; PyTorch's if imported).
    On a shared or loaded machine, multi-threaded BLAS calls wait on descheduled threads:
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 give steadier CPU numbers there."""
    found = {name: os.environ.get(name, "unset")
             for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    torch = sys.modules.get("torch")
    if torch is not None:
        found["torch.get_num_threads()"] = str(torch.get_num_threads())
    return found


def detect_device() -> Device:
    """CUDA device 0 when CuPy finds one, else the CPU (with the reason there is no GPU)."""
    reason = None
    try:
        import cupy

        count = int(cupy.cuda.runtime.getDeviceCount())
        if count == 0:
            reason = "CuPy reports 0 CUDA devices"
    except ImportError:
        reason = "CuPy is not installed (cupydcn's CUDA path needs it)"
    except Exception as exc:  # no driver / no device
        reason = f"CuPy finds no CUDA device: {type(exc).__name__}: {exc}"
    cores = os.cpu_count()
    if reason is not None:
        return Device("cpu", _cpu_name(), "numpy", False, reason,
                      {"cpu": _cpu_name(), "cpu_count": cores, "threads": thread_settings()})
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    torch_cuda, torch_reason = _torch_cuda()
    details = {
        "gpu": name,
        "compute_capability": f"{props['major']}.{props['minor']}",
        "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
        "sm_count": props["multiProcessorCount"],
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
        "cpu": _cpu_name(),
        "cpu_count": cores,
        "threads": thread_settings(),
    }
    if torch_reason:
        details["peers"] = f"not run: {torch_reason}"
    return Device("cuda", name, "torch" if torch_cuda else "cupy", torch_cuda, None, details)


_PEER_IMPORTS: dict[str, tuple[Any, str | None, list[str]]] = {}


def import_peer(name: str) -> tuple[Any, str | None, list[str]]:
    """(module or None, why not, warnings raised while importing) for a peer library.

    A peer's import-time warnings (torchvision's optional image extension, mmcv's
    deprecations) concern parts that are not timed; they are recorded with the versions
    instead of failing a run whose pytest turns warnings into errors."""
    if name not in _PEER_IMPORTS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                module, error = importlib.import_module(name), None
            except Exception as exc:  # not installed, or built for another torch / CUDA
                module, error = None, f"{type(exc).__name__}: {exc}"
        _PEER_IMPORTS[name] = (module, error, [str(w.message)[:200] for w in caught])
    return _PEER_IMPORTS[name]


def versions() -> dict[str, str]:
    """Versions of the libraries that take part."""
    from cupydcn import __version__

    found = {"python": platform.python_version(), "cupydcn": __version__,
             "numpy": np.__version__}
    for module in ("cupy", "torch", "torchvision", "mmcv"):
        if module in ("torchvision", "mmcv"):
            imported, _, caught = import_peer(module)
        else:
            try:
                imported, caught = importlib.import_module(module), []
            except Exception:  # not installed or broken: listed as absent
                imported = None
        if imported is None:
            found[module] = "not importable"
            continue
        found[module] = str(getattr(imported, "__version__", "?"))
        if caught:
            found[module] += f" (import warnings: {'; '.join(caught)})"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        found["torch.cuda"] = str(torch.version.cuda)
        found["cudnn"] = str(torch.backends.cudnn.version())
    return found


# ---------------------------------------------------------------------------- precision
def set_precision_switches() -> tuple[dict[str, Any], Callable[[], None]]:
    """TF32 off for every peer, ``CUPY_TF32`` unset, cuDNN autotuning on; returns the
    switches as set (for the record) and a function restoring the previous state."""
    record: dict[str, Any] = {}
    previous_env = os.environ.pop("CUPY_TF32", None)
    record["CUPY_TF32"] = "unset" if previous_env is None else (
        f"unset (was {previous_env!r}; removed"
        + (", but CuPy was already imported" if "cupy" in sys.modules else "") + ")")
    restores: list[Callable[[], None]] = []
    if previous_env is not None:
        restores.append(lambda: os.environ.__setitem__("CUPY_TF32", previous_env))
    try:
        import torch
    except ImportError:
        record["torch"] = "not installed"
    else:
        before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                  torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)

        def restore_torch():
            (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) = before

        restores.append(restore_torch)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
        record.update({
            "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "torch.float32_matmul_precision": torch.get_float32_matmul_precision(),
            "torch.backends.cudnn.benchmark": torch.backends.cudnn.benchmark,
            "torch.backends.cudnn.deterministic": torch.backends.cudnn.deterministic,
            # Left at PyTorch's defaults, recorded: they concern half-precision GEMMs.
            "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction":
                torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
            "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction":
                torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        })
    record["cupydcn"] = ("float32 GEMMs through CuPy's matmul with CUPY_TF32 unset (no TF32); "
                         "float16/bfloat16 accumulate in float32")

    def restore():
        for undo in reversed(restores):
            undo()

    return record, restore


# ---------------------------------------------------------------------------- timing
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


# ---------------------------------------------------------------------------- memory
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


def peak_extra_memory(fn: Callable[[], Any], device: Device, *, tracked: bool = True
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


# ---------------------------------------------------------------------------- peak GEMM
def peak_gemm(device: Device, dtype: str, *, size: int | None = None, rounds: int = 20,
              warmup: int = 3) -> dict[str, Any]:
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
        a = torch.randn(size, size, device="cuda", generator=gen).to(_torch_dtype(dtype))
        b = torch.randn(size, size, device="cuda", generator=gen).to(_torch_dtype(dtype))
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
    return {"dtype": computed, "m": size, "n": size, "k": size, "library": library,
            "timer": device.timer, "rounds": rounds, "median_ms": median,
            "tflops": 2 * size ** 3 / (median * 1e-3) / 1e12}


def peak_dtype(dtype: str, device: Device) -> str:
    """Which measured GEMM peak a row of ``dtype`` is compared with."""
    return "float32" if device.kind != "cuda" else dtype


# ---------------------------------------------------------------------------- inputs
def _torch_dtype(name: str):
    import torch

    return {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[name]


def _rois(rng: np.random.Generator, count: int, batch: int, image_h: float, image_w: float
          ) -> np.ndarray:
    """Detection-like boxes: sides log-uniform in [16, half the image], inside the image."""
    side_max = min(image_h, image_w) / 2
    w = np.exp(rng.uniform(np.log(16), np.log(side_max), count))
    h = np.exp(rng.uniform(np.log(16), np.log(side_max), count))
    x1 = rng.uniform(0, image_w - w)
    y1 = rng.uniform(0, image_h - h)
    index = rng.integers(0, batch, count).astype(np.float64)
    return np.stack([index, x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def host_arrays(shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 NumPy inputs of a problem (a mask is always made; DCNv1 leaves it out)."""
    rng = np.random.default_rng(seed)

    def normal(*dims, scale=1.0):
        return (scale * rng.standard_normal(dims, dtype=np.float32)).astype(np.float32)

    if isinstance(shape, ConvShape):
        taps = shape.kh * shape.kw
        ho, wo = shape.out_h, shape.out_w
        fan_in = shape.c_in // shape.groups * taps
        return {
            "input": normal(shape.n, shape.c_in, shape.h, shape.w),
            "offset": normal(shape.n, 2 * shape.offset_groups * taps, ho, wo),
            "weight": normal(shape.c_out, shape.c_in // shape.groups, shape.kh, shape.kw,
                             scale=fan_in ** -0.5),
            "bias": normal(shape.c_out, scale=0.1),
            "mask": rng.uniform(size=(shape.n, shape.offset_groups * taps, ho, wo)
                                ).astype(np.float32),
            "grad_output": normal(shape.n, shape.c_out, ho, wo),
        }
    if isinstance(shape, RoiShape):
        p = shape.output_size
        return {
            "input": normal(shape.n, shape.c, shape.h, shape.w),
            "rois": _rois(rng, shape.rois, shape.n, shape.h / shape.spatial_scale,
                          shape.w / shape.spatial_scale),
            "offset": normal(shape.rois, 2, p, p),
            "mask": rng.uniform(size=(shape.rois, 1, p, p)).astype(np.float32),
            "grad_output": normal(shape.rois, shape.c, p, p),
        }
    p = shape.pooled_size
    return {
        "input": normal(shape.n, shape.c, shape.h, shape.w),
        "rois": _rois(rng, shape.rois, shape.n, shape.h / shape.spatial_scale,
                      shape.w / shape.spatial_scale),
        "offset": normal(shape.rois, 2, shape.part_size, shape.part_size),
        "grad_output": normal(shape.rois, shape.output_dim, p, p),
    }


@dataclass
class Problem:
    """A problem's arrays on the device in one dtype: ``arrays`` are what cupydcn gets
    (``rois`` stay float32); :meth:`peer` gives the same values as PyTorch tensors."""

    shape: Shape
    dtype: str
    device: Device
    arrays: dict[str, Any]

    @property
    def peer_dtype(self) -> str:
        return "float32" if self.dtype == "bfloat16" else self.dtype

    @property
    def peer_note(self) -> str:
        if self.dtype == "bfloat16":
            return "peer ran in float32 on the bfloat16 values upcast (protocol)"
        return ""

    def peer(self, name: str):
        """The PyTorch tensor of input ``name`` for a peer: the same tensor cupydcn got on
        a GPU (float32 copy for bfloat16); on the CPU a tensor sharing the NumPy memory;
        rois in the peer's dtype (torchvision wants one dtype)."""
        import torch

        array = self.arrays[name]
        if isinstance(array, np.ndarray):
            if array.dtype.name == "bfloat16" or name == "rois":
                array = array.astype(np.float32)
            tensor = torch.from_numpy(array)
        else:
            tensor = array
        target = _torch_dtype(self.peer_dtype)
        return tensor if tensor.dtype == target else tensor.to(target)


def make_problem(shape: Shape, dtype: str, device: Device,
                 host: dict[str, np.ndarray] | None = None) -> Problem:
    host = host_arrays(shape) if host is None else host
    arrays: dict[str, Any] = {}
    for name, value in host.items():
        target = "float32" if name == "rois" else dtype
        arrays[name] = _to_device(value, target, device)
    return Problem(shape, dtype, device, arrays)


def _to_device(value: np.ndarray, dtype: str, device: Device):
    if device.kind != "cuda":
        from cupydcn.core.dtypes import numpy_dtype

        try:
            return np.ascontiguousarray(value.astype(numpy_dtype(dtype)))
        except ImportError as exc:
            raise Unavailable(str(exc)) from exc
    if device.library == "torch":
        import torch

        return torch.from_numpy(value).to("cuda").to(_torch_dtype(dtype)).contiguous()
    import cupy

    if dtype == "bfloat16":
        from cupydcn.core.dtypes import numpy_dtype

        try:
            return cupy.asarray(value.astype(numpy_dtype("bfloat16")))
        except Exception as exc:  # CuPy without bfloat16 support
            raise Unavailable(f"CuPy cannot hold bfloat16 arrays here: {exc}") from exc
    return cupy.asarray(value).astype(dtype)


# ---------------------------------------------------------------------------- the calls
def skip_reason(op: str, provider: str, variant: str, device: Device,
                cpu_peers: bool = False) -> str | None:
    """Why ``provider`` cannot run here (None: it can)."""
    if provider not in PROVIDERS[op]:
        return f"{provider} has no {op}"
    if provider == "cupydcn":
        return None
    if device.kind != "cuda" and not cpu_peers:
        return (f"GPU provider, no CUDA device here ({device.no_gpu_reason}); it runs on a GPU "
                "machine (--bench-cpu-peers / --cpu-peers time its CPU build instead)")
    if device.kind == "cuda" and not device.torch_cuda:
        return "peers need PyTorch with CUDA, which is not importable here"
    if provider in ("torchvision", "roi_align", "ps_roi_align"):
        error = import_peer("torchvision.ops")[1]
        if error:
            return f"torchvision is not importable ({error})"
    if provider == "mmcv":
        if device.kind != "cuda":
            return "mmcv's deformable ops are CUDA only"
        error = import_peer("mmcv.ops")[1]
        if error:
            return f"mmcv ops are not importable ({error}); not run"
        if op == "deform_roi_pool" and variant == "mask":
            return "mmcv's deform_roi_pool has no modulation mask"
    return None


def _torch_calls(op_fn: Callable, leaves: Sequence, grad_output, pass_: str) -> Callable:
    """forward (no graph), backward (graph built once outside, retained) or both, with
    PyTorch autograd over ``leaves`` (the tensors needing gradients)."""
    import torch

    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in leaves]
    wanted = [t for t in leaves if t is not None]
    if pass_ == "forward":
        def forward():
            with torch.no_grad():
                return op_fn(*leaves)

        return forward
    if pass_ == "backward":
        out = op_fn(*leaves)

        def backward():
            return torch.autograd.grad(out, wanted, grad_output, retain_graph=True)

        return backward

    def forward_backward():
        out = op_fn(*leaves)
        return torch.autograd.grad(out, wanted, grad_output)

    return forward_backward


def build_call(problem: Problem, provider: str, variant: str, pass_: str) -> Callable[[], Any]:
    """A callable running one pass of one provider on ``problem``; it returns its outputs
    (for the memory accounting). Raises :class:`Unavailable`."""
    shape = problem.shape
    a = problem.arrays
    with_mask = variant == "mask"
    if isinstance(shape, ConvShape):
        return _conv_call(problem, shape, a, provider, with_mask, pass_)
    if isinstance(shape, RoiShape):
        return _roi_call(problem, shape, a, provider, with_mask, pass_)
    return _psroi_call(problem, shape, a, provider, pass_)


def _cupydcn_passes(forward: Callable, backward: Callable, pass_: str) -> Callable:
    if pass_ == "forward":
        return forward
    if pass_ == "backward":
        return backward

    def forward_backward():
        forward()
        return backward()

    return forward_backward


def _conv_call(problem, shape: ConvShape, a, provider, with_mask, pass_):
    options = dict(stride=shape.stride, padding=shape.padding, dilation=shape.dilation)
    if provider == "cupydcn":
        from cupydcn import deform_conv2d, deform_conv2d_backward

        mask = a["mask"] if with_mask else None
        return _cupydcn_passes(
            lambda: deform_conv2d(a["input"], a["offset"], a["weight"], a["bias"], mask=mask,
                                  **options),
            lambda: tuple(deform_conv2d_backward(a["grad_output"], a["input"], a["offset"],
                                                 a["weight"], mask, **options)),
            pass_)
    import torch

    p = problem.peer
    grad_output = p("grad_output")
    if provider == "torchvision":
        tv_ops = import_peer("torchvision.ops")[0]

        def op(x, off, w, b, m=None):
            return tv_ops.deform_conv2d(x, off, w, b, mask=m, **options)

        leaves = [p("input"), p("offset"), p("weight"), p("bias")]
        if with_mask:
            leaves.append(p("mask"))
        return _torch_calls(op, leaves, grad_output, pass_)
    if provider in ("cudnn_nchw", "cudnn_nhwc"):
        fmt = torch.channels_last if provider == "cudnn_nhwc" else torch.contiguous_format
        x = p("input").contiguous(memory_format=fmt)
        w = p("weight").contiguous(memory_format=fmt)
        grad_output = grad_output.contiguous(memory_format=fmt)

        def conv(x, w, b):
            return torch.nn.functional.conv2d(x, w, b, groups=shape.groups, **options)

        return _torch_calls(conv, [x, w, p("bias")], grad_output, pass_)
    if provider == "mmcv":
        mm_ops = import_peer("mmcv.ops")[0]
        mm_deform_conv2d, mm_modulated = mm_ops.deform_conv2d, mm_ops.modulated_deform_conv2d

        if with_mask:
            def op(x, off, m, w, b):
                return mm_modulated(x, off, m, w, b, shape.stride, shape.padding,
                                    shape.dilation, shape.groups, shape.offset_groups)

            leaves = [p("input"), p("offset"), p("mask"), p("weight"), p("bias")]
        else:
            def op(x, off, w):  # mmcv's DCNv1 takes no bias
                return mm_deform_conv2d(x, off, w, shape.stride, shape.padding, shape.dilation,
                                        shape.groups, shape.offset_groups)

            leaves = [p("input"), p("offset"), p("weight")]
        return _torch_calls(op, leaves, grad_output, pass_)
    raise Unavailable(f"unknown provider {provider!r} for deform_conv2d")


def _roi_call(problem, shape: RoiShape, a, provider, with_mask, pass_):
    options = dict(output_size=shape.output_size, spatial_scale=shape.spatial_scale,
                   sampling_ratio=shape.sampling_ratio)
    if provider == "cupydcn":
        from cupydcn import deform_roi_pool, deform_roi_pool_backward

        mask = a["mask"] if with_mask else None
        return _cupydcn_passes(
            lambda: deform_roi_pool(a["input"], a["rois"], a["offset"], mask,
                                    gamma=shape.gamma, **options),
            lambda: tuple(deform_roi_pool_backward(a["grad_output"], a["input"], a["rois"],
                                                   a["offset"], mask, gamma=shape.gamma,
                                                   **options)),
            pass_)
    p = problem.peer
    rois = p("rois")
    if provider == "roi_align":
        tv_ops = import_peer("torchvision.ops")[0]

        def op(x):
            return tv_ops.roi_align(x, rois, aligned=True, **options)

        return _torch_calls(op, [p("input")], p("grad_output"), pass_)
    if provider == "mmcv":
        mm_deform_roi_pool = import_peer("mmcv.ops")[0].deform_roi_pool

        def op(x, off):
            return mm_deform_roi_pool(x, rois, off, shape.output_size, shape.spatial_scale,
                                      shape.sampling_ratio, shape.gamma)

        return _torch_calls(op, [p("input"), p("offset")], p("grad_output"), pass_)
    raise Unavailable(f"unknown provider {provider!r} for deform_roi_pool")


def _psroi_call(problem, shape: PsRoiShape, a, provider, pass_):
    if provider == "cupydcn":
        from cupydcn import deform_psroi_pool, deform_psroi_pool_backward

        options = dict(output_dim=shape.output_dim, group_size=shape.group_size,
                       pooled_size=shape.pooled_size, part_size=shape.part_size,
                       sample_per_part=shape.sample_per_part,
                       spatial_scale=shape.spatial_scale, trans_std=shape.trans_std)
        return _cupydcn_passes(
            lambda: deform_psroi_pool(a["input"], a["rois"], a["offset"], **options),
            lambda: tuple(deform_psroi_pool_backward(a["grad_output"], a["input"], a["rois"],
                                                     a["offset"], **options)),
            pass_)
    p = problem.peer
    rois = p("rois")
    if provider == "ps_roi_align":
        tv_ops = import_peer("torchvision.ops")[0]

        def op(x):
            return tv_ops.ps_roi_align(x, rois, shape.pooled_size, shape.spatial_scale,
                                                shape.sample_per_part)

        return _torch_calls(op, [p("input")], p("grad_output"), pass_)
    raise Unavailable(f"unknown provider {provider!r} for deform_psroi_pool")


def provider_note(problem: Problem, provider: str, variant: str) -> str:
    notes = []
    if provider != "cupydcn" and problem.peer_note:
        notes.append(problem.peer_note)
    if provider == "mmcv" and isinstance(problem.shape, ConvShape) and variant == "nomask":
        notes.append("mmcv's DCNv1 has no bias")
    if provider == "ps_roi_align":
        notes.append("plain PS-RoIAlign (no offsets), sampling_ratio = sample_per_part")
    if provider == "roi_align":
        notes.append("plain RoIAlign (aligned=True, no offsets)")
    return "; ".join(notes)


# ---------------------------------------------------------------------------- one measurement
def flops_of(shape: Shape, pass_: str) -> int | None:
    forward = shape.forward_flops()
    return None if forward is None else forward * PASS_FLOP_FACTOR[pass_]


def measurement_record(*, problem: Problem, provider: str, variant: str, pass_: str,
                       timer: Timer, warmup: int, memory: tuple[int | None, str]
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


def run_one(problem: Problem, provider: str, variant: str, pass_: str, *, rounds: int,
            warmup: int) -> dict[str, Any]:
    """Warm up, measure peak extra memory once, time ``rounds`` calls; the record."""
    fn = build_call(problem, provider, variant, pass_)
    tracked = provider == "cupydcn" or problem.device.kind == "cuda"
    warm_up(fn, problem.device, warmup)
    memory = peak_extra_memory(fn, problem.device, tracked=tracked)
    timer = measure(fn, problem.device, rounds=rounds, warmup=0)
    return measurement_record(problem=problem, provider=provider, variant=variant, pass_=pass_,
                              timer=timer, warmup=warmup, memory=memory)


# ---------------------------------------------------------------------------- the table
def _fmt_ms(value) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _fmt_mib(value) -> str:
    if value is None:
        return "n/t"
    return f"{value / 2**20:.1f}"


def _order(value, sequence) -> int:
    return sequence.index(value) if value in sequence else len(sequence)


def _shape_key(shape_id: str):
    match = re.match(r"([A-Z]+)(\d+)(.*)", shape_id)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else (shape_id, 0, "")


def table_rows(records: Sequence[dict]) -> dict[str, list[dict]]:
    """Group the records by op into rows keyed (shape, variant, dtype, pass), each with the
    cupydcn record and the peers' records ("-" variant records serve both variants)."""
    by_op: dict[str, dict[tuple, dict]] = {}
    for r in records:
        by_op.setdefault(r["op"], {})[(r["shape"], r["variant"], r["dtype"], r["pass"],
                                       r["provider"])] = r
    out: dict[str, list[dict]] = {}
    for op in sorted(by_op, key=lambda o: _order(o, OPS)):
        found = by_op[op]
        keys = {(s, v, d, p) for (s, v, d, p, _) in found}
        with_variant = {(s, d, p) for (s, v, d, p) in keys if v != "-"}
        keys = {k for k in keys if k[1] != "-" or (k[0], k[2], k[3]) not in with_variant}
        rows = []
        for key in sorted(keys, key=lambda k: (_shape_key(k[0]), _order(k[1], VARIANTS),
                                               _order(k[2], DTYPES), _order(k[3], PASSES))):
            shape_id, variant, dtype, pass_ = key
            providers = {}
            for (s, v, d, p, provider), r in found.items():
                if (s, d, p) == (shape_id, dtype, pass_) and (v == variant or v == "-"):
                    providers.setdefault(provider, r)
            rows.append({"shape": shape_id, "variant": variant, "dtype": dtype, "pass": pass_,
                         "providers": providers})
        out[op] = rows
    return out


def markdown_tables(records: Sequence[dict], peaks: dict[str, dict] | None = None) -> str:
    """Per op: a time table (cupydcn ms, TFLOP/s, % of the measured GEMM peak, then each
    peer's ms and peer/cupydcn ratio) and a peak-extra-memory table."""
    peaks = peaks or {}
    parts: list[str] = []
    notes: dict[str, str] = {}
    for op, rows in table_rows(records).items():
        peers = sorted({p for row in rows for p in row["providers"] if p != "cupydcn"},
                       key=lambda p: _order(p, PROVIDER_ORDER))
        kinds = {r["device_kind"] for row in rows for r in row["providers"].values()}
        kind = "cuda" if "cuda" in kinds else "cpu"
        conv = op == "deform_conv2d"
        head = ["shape", "mask", "dtype", "pass", "cupydcn ms"]
        if conv:
            head += ["TFLOP/s", "% peak"]
        for peer in peers:
            head += [f"{provider_label(peer, kind)} ms", "×"]
        lines = [f"### {op}", "", "| " + " | ".join(head) + " |",
                 "|" + "|".join("---" if i < 4 else "---:" for i in range(len(head))) + "|"]
        mem_head = ["shape", "mask", "dtype", "pass"] + [
            provider_label(p, kind) for p in ("cupydcn", *peers)]
        mem_lines = ["| " + " | ".join(mem_head) + " |",
                     "|" + "|".join("---" if i < 4 else "---:" for i in range(len(mem_head)))
                     + "|"]
        for row in rows:
            mine = row["providers"].get("cupydcn")
            base = mine["median_ms"] if mine else None
            cells = [row["shape"], row["variant"], row["dtype"], row["pass"], _fmt_ms(base)]
            if conv:
                tflops = pct = "—"
                if mine and mine.get("flops") and base and math.isfinite(base):
                    achieved = mine["flops"] / (base * 1e-3) / 1e12
                    tflops = f"{achieved:.3g}"
                    peak = peaks.get(mine.get("peak_gemm_dtype", row["dtype"]))
                    if peak and peak.get("tflops"):
                        pct = f"{100 * achieved / peak['tflops']:.3g}"
                cells += [tflops, pct]
            mem_cells = [row["shape"], row["variant"], row["dtype"], row["pass"],
                         _fmt_mib(mine["peak_extra_bytes"]) if mine else "—"]
            for peer in peers:
                r = row["providers"].get(peer)
                if r is None:
                    cells += ["—", "—"]
                    mem_cells.append("—")
                    continue
                mark = ""
                if r.get("note"):
                    mark = "†" if "upcast" in r["note"] else ""
                    if mark:
                        notes["†"] = r["note"]
                ratio = (f"{r['median_ms'] / base:.3g}" if base and math.isfinite(base)
                         and math.isfinite(r["median_ms"]) else "—")
                cells += [_fmt_ms(r["median_ms"]) + mark, ratio]
                mem_cells.append(_fmt_mib(r["peak_extra_bytes"]))
            lines.append("| " + " | ".join(cells) + " |")
            mem_lines.append("| " + " | ".join(mem_cells) + " |")
        lines += ["", f"Peak extra memory (MiB, n/t = not tracked), {op}:", "", *mem_lines, ""]
        parts.append("\n".join(lines))
    text = "\n".join(parts)
    legend = ["× = peer time / cupydcn time (above 1: cupydcn is faster). "
              "TFLOP/s counts 2·N·C_out·H_out·W_out·(C_in/groups)·kh·kw per forward "
              "(backward ×2, forward+backward ×3); % peak is against the GEMM peak measured "
              "in the same run."]
    for mark, note in notes.items():
        legend.append(f"{mark} bfloat16 row: {note}.")
    return text + "\n" + "\n".join(legend) + "\n"


def skipped_lines(skipped: dict[tuple[str, str], int]) -> list[str]:
    """Markdown bullets of the providers not run, grouped by reason (GPU labels: the
    providers as they are named on a GPU)."""
    by_reason: dict[str, dict[str, int]] = {}
    for (provider, reason), count in skipped.items():
        by_reason.setdefault(reason, {})
        by_reason[reason][provider] = by_reason[reason].get(provider, 0) + count
    lines = []
    for reason, providers in by_reason.items():
        names = ", ".join(
            f"{provider_label(p)} ({n})"
            for p, n in sorted(providers.items(), key=lambda kv: _order(kv[0], PROVIDER_ORDER)))
        lines.append(f"- {names}: {reason}")
    return lines


def shapes_legend(shapes: Sequence[Shape]) -> str:
    lines = ["| shape | op | dims | why |", "|---|---|---|---|"]
    for s in shapes:
        lines.append(f"| {s.id} | {s.op} | {s.describe()} | {s.why} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the command
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cupydcn bench",
        description="Quick benchmark on the present device: cupydcn (CuPy kernels on a GPU, "
        "the NumPy backend on scaled-down shapes on the CPU) against torchvision and "
        "cuDNN when importable; prints a Markdown table. The full suite is benchmarks/ "
        "(pytest-benchmark).")
    parser.add_argument("--quick", action="store_true",
                        help="fewest measurements: S1 and R1, float32, 3 rounds")
    parser.add_argument("--shapes", default="S1,S3,S7,R1,R2",
                        help="comma-separated ids among " + ",".join(QUICK_SHAPES))
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated (default: float32,float16 on a GPU, float32 on "
                        "the CPU)")
    parser.add_argument("--passes", default="forward,backward",
                        help="comma-separated among " + ",".join(PASSES))
    parser.add_argument("--variants", default="mask", help="mask, nomask or both (comma)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed calls per measurement (default 50 on a GPU, 5 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls first (default 5 on a GPU, 1 on the CPU)")
    parser.add_argument("--full-shapes", action="store_true",
                        help="full-size shapes on the CPU too (slow)")
    parser.add_argument("--cpu-peers", action="store_true",
                        help="on the CPU, also time PyTorch's CPU conv2d (and torchvision's "
                        "CPU ops if importable)")
    parser.add_argument("--json", default=None, help="also write the records to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.passes = "S1,R1", "forward,backward"
        args.dtypes = args.dtypes or "float32"
        args.rounds = args.rounds or 3
    return args


def _split(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"python -m cupydcn bench: unknown {what} {bad or text!r}; "
                         f"choose among {', '.join(allowed)}")
    return items


def run_bench(argv: Sequence[str] | None = None) -> int:
    """``python -m cupydcn bench [options]``: measure and print the table; exit code."""
    args = _parse(argv)
    device = detect_device()
    gpu = device.kind == "cuda"
    shape_ids = _split(args.shapes, list(QUICK_SHAPES), "shape")
    dtypes = _split(args.dtypes or ("float32,float16" if gpu else "float32"), DTYPES, "dtype")
    passes = _split(args.passes, PASSES, "pass")
    variants = _split(args.variants, ("mask", "nomask"), "variant")
    rounds = args.rounds or (50 if gpu else 5)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    table = QUICK_SHAPES if gpu or args.full_shapes else QUICK_SHAPES_CPU
    shapes = [table[i] for i in shape_ids]

    switches, restore = set_precision_switches()
    try:
        started = time.perf_counter()
        print(f"cupydcn bench on {device.kind.upper()}: {device.name}")
        if not gpu:
            print(f"  no GPU: {device.no_gpu_reason}")
            print("  cupydcn runs its NumPy backend"
                  + ("" if args.full_shapes else " on scaled-down shapes"))
        info = versions()
        print("  " + ", ".join(f"{k} {v}" for k, v in info.items()))
        print("  precision: " + ", ".join(f"{k}={v}" for k, v in switches.items()
                                           if k != "cupydcn"))
        peaks: dict[str, dict] = {}
        for dtype in sorted({peak_dtype(d, device) for d in dtypes}, key=DTYPES.index):
            try:
                peaks[dtype] = peak_gemm(device, dtype, rounds=max(5, min(rounds, 20)))
            except Unavailable as exc:
                print(f"  peak GEMM {dtype}: not measured ({exc})")
                continue
            pk = peaks[dtype]
            print(f"  peak GEMM {dtype}: {pk['tflops']:.2f} TFLOP/s "
                  f"({pk['m']}³ {pk['library']}, median {pk['median_ms']:.3f} ms)")
        timer_text = ("CUDA events" if gpu else "time.perf_counter")
        print(f"  timing: {timer_text}, median of {rounds} after {warmup} warm-up call(s)")
        print()

        records: list[dict] = []
        skipped: dict[tuple[str, str], int] = {}
        for shape in shapes:
            host = host_arrays(shape)
            for dtype in dtypes:
                try:
                    problem = make_problem(shape, dtype, device, host)
                except Unavailable as exc:
                    skipped[("cupydcn", str(exc))] = skipped.get(("cupydcn", str(exc)), 0) + 1
                    continue
                for provider in PROVIDERS[shape.op]:
                    for variant in variants_of(shape.op, provider):
                        if variant != "-" and variant not in variants:
                            continue
                        reason = skip_reason(shape.op, provider, variant, device, args.cpu_peers)
                        if reason:
                            skipped[(provider, reason)] = (skipped.get((provider, reason), 0)
                                                           + len(passes))
                            continue
                        for pass_ in passes:
                            try:
                                records.append(run_one(problem, provider, variant, pass_,
                                                       rounds=rounds, warmup=warmup))
                            except Unavailable as exc:
                                key = (provider, str(exc))
                                skipped[key] = skipped.get(key, 0) + 1
                            except Exception as exc:
                                if provider == "cupydcn":
                                    raise
                                key = (provider, f"failed: {type(exc).__name__}: {exc}")
                                skipped[key] = skipped.get(key, 0) + 1
                del problem
        print(markdown_tables(records, peaks))
        print(shapes_legend(shapes))
        if skipped:
            print("Not run (provider (measurements): reason):")
            print("\n".join(skipped_lines(skipped)))
            print()
        print(f"{len(records)} measurements in {time.perf_counter() - started:.1f} s")
        if args.json:
            import json

            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump({"device": device.details | {"name": device.name, "kind": device.kind},
                           "versions": info, "precision": switches, "peak_gemm": peaks,
                           "records": records,
                           "skipped": [{"provider": p, "reason": r, "count": c}
                                       for (p, r), c in skipped.items()]},
                          fh, indent=1, default=str)
            print(f"records written to {args.json}")
    finally:
        restore()
    return 0
