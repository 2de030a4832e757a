"""Which CUDA algorithm deform_conv2d uses: the setting and its scoped override.

- ``"auto"`` (the default): among the algorithms that apply, the fastest, timed once per
  problem on the device (:mod:`cupydcn.deform_conv.autotune`, like cuDNN's benchmark
  mode); without a device timer, the heuristic choice;
- ``"heuristic"``: the first that applies of fused, depthwise, im2col, without timing (the
  same inputs always take the same kernels);
- ``"im2col"``: the column path (im2col, cuBLAS GEMMs, col2im), which computes every
  problem, the reference the others are tested against;
- ``"depthwise"``: the direct kernels of
  :func:`cupydcn.deform_conv.depthwise_cuda.depthwise_applies` problems (an error
  elsewhere);
- ``"fused"``: the implicit-GEMM tensor-core kernels, no column buffer (float16 /
  bfloat16 on sm_80+, :func:`cupydcn.deform_conv.fused_cuda.fused_applies`; an error
  elsewhere).

The NumPy backend has one algorithm and ignores the setting. An ``algorithm=`` argument of
the backend functions takes precedence over :func:`conv_algorithm`, which takes precedence
over :func:`set_conv_algorithm`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from cupydcn.core.errors import CupydcnTypeError, CupydcnValueError

ALGORITHMS: tuple[str, ...] = ("auto", "heuristic", "im2col", "depthwise", "fused")

_GLOBAL = ["auto"]
_SCOPED: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "cupydcn_conv_algorithm", default=None
)


def check_algorithm(algorithm: object, where: str = "cupydcn.set_conv_algorithm") -> str:
    """``algorithm`` when it is one of ALGORITHMS; a CupydcnTypeError (not a str) or
    CupydcnValueError (unknown) naming ``where`` otherwise."""
    if not isinstance(algorithm, str):
        raise CupydcnTypeError(
            f"{where}: algorithm must be a str ({', '.join(map(repr, ALGORITHMS))}) or None; "
            f"got {type(algorithm).__name__} {algorithm!r}"
        )
    if algorithm not in ALGORITHMS:
        raise CupydcnValueError(
            f"{where}: algorithm must be one of {', '.join(map(repr, ALGORITHMS))}; "
            f"got {algorithm!r}"
        )
    return algorithm


def set_conv_algorithm(algorithm: str) -> None:
    """The CUDA algorithm of deform_conv2d calls, process-wide (see the module)."""
    _GLOBAL[0] = check_algorithm(algorithm)


@contextlib.contextmanager
def conv_algorithm(algorithm: str) -> Iterator[None]:
    """The CUDA algorithm inside the block, for this thread / async context."""
    token = _SCOPED.set(check_algorithm(algorithm, "cupydcn.conv_algorithm"))
    try:
        yield
    finally:
        _SCOPED.reset(token)


def current_conv_algorithm() -> str:
    scoped = _SCOPED.get()
    return _GLOBAL[0] if scoped is None else scoped
