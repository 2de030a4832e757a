"""The TF32 opt-in for float32 GEMMs on CUDA.

float32 is exact by default: its GEMMs compute in float32 (``CUBLAS_COMPUTE_32F``). With
TF32 allowed, float32 GEMMs may run on tensor cores with ``CUBLAS_COMPUTE_32F_FAST_TF32``:
each operand is rounded to TF32 (10 explicit significand bits, a relative error of at
most 2^-11 each) and the products are summed in float32, so an output element carries a
relative error up to about ``2 * 2^-11`` of the sum of the magnitudes of its products
(``tests/test_gemm.py`` checks this bound on the emulator's model of it). The sampling
kernels, the half types (float16 / bfloat16 always compute in float32 on tensor cores),
float64 and the NumPy backend are unaffected.

``cupydcn.torch`` follows PyTorch's setting while it runs an op:
``torch.backends.cuda.matmul.allow_tf32`` or ``torch.get_float32_matmul_precision()`` other
than ``"highest"``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from cupydcn.core.errors import type_error

_GLOBAL = [False]
_SCOPED: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "cupydcn_allow_tf32", default=None
)


def set_allow_tf32(enabled: bool) -> None:
    """Allow (True) or forbid (False, the default at import) TF32 in float32 GEMMs on
    CUDA, process-wide; :func:`allow_tf32` (per thread / async context) takes
    precedence."""
    if not isinstance(enabled, bool):
        raise type_error("cupydcn.set_allow_tf32", f"enabled must be a bool; got {enabled!r}")
    _GLOBAL[0] = enabled


def is_tf32_allowed() -> bool:
    """Whether float32 GEMMs on CUDA may use TF32 now."""
    scoped = _SCOPED.get()
    return _GLOBAL[0] if scoped is None else scoped


@contextlib.contextmanager
def allow_tf32(enabled: bool = True) -> Iterator[None]:
    """TF32 allowed (or forbidden) inside the block, for this thread / async context."""
    if not isinstance(enabled, bool):
        raise type_error("cupydcn.allow_tf32", f"enabled must be a bool; got {enabled!r}")
    token = _SCOPED.set(enabled)
    try:
        yield
    finally:
        _SCOPED.reset(token)
