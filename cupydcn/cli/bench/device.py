"""Where the measurements run: the device (CUDA device 0 or the CPU, and why there is no
GPU), the CPU thread settings, the peers' imports and the versions taking part."""

from __future__ import annotations

import importlib
import os
import platform
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cupydcn.cli.probe import cuda_device_count


class Unavailable(Exception):
    """A provider cannot run here; the message says why (the test is skipped with it)."""


@dataclass
class Device:
    kind: str  # "cuda" or "cpu"
    name: str  # GPU model or CPU model
    library: str  # what cupydcn gets: "torch" / "cupy" (CUDA) or "numpy"
    torch_cuda: bool  # PyTorch has CUDA on this device (the peers can run)
    no_gpu_reason: str | None  # why there is no CUDA path (None on a GPU)
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
    found = {
        name: os.environ.get(name, "unset")
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        found["torch.get_num_threads()"] = str(torch.get_num_threads())
    return found


def detect_device() -> Device:
    """CUDA device 0 when CuPy finds one, else the CPU (with the reason there is no GPU)."""
    _, reason = cuda_device_count()
    cores = os.cpu_count()
    if reason is not None:
        return Device(
            "cpu",
            _cpu_name(),
            "numpy",
            False,
            reason,
            {"cpu": _cpu_name(), "cpu_count": cores, "threads": thread_settings()},
        )
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

    found = {"python": platform.python_version(), "cupydcn": __version__, "numpy": np.__version__}
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
