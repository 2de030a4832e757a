"""Whether CUDA devices are there, and why not: one probe for check, bench and demo."""

from __future__ import annotations


def cuda_device_count() -> tuple[int, str | None]:
    """(the number of CUDA devices CuPy sees, None) or (0, why there is none): CuPy is
    not installed, CuPy's error text (no driver, a driver too old), or a count of 0."""
    try:
        import cupy
    except ImportError:
        return 0, "CuPy is not installed (cupydcn's CUDA path needs it)"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # no driver / no device / a driver too old
        return 0, f"CuPy finds no CUDA device: {type(exc).__name__}: {exc}"
    if count == 0:
        return 0, "CuPy reports 0 CUDA devices"
    return count, None
