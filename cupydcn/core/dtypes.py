"""The single table of supported dtypes: name -> C type and accumulation dtype.

Kernels are specialised per element type through C++ templates; this table is the only
place that maps a NumPy/CuPy dtype to the C type spelled in ``name_expressions`` and to
the dtype arithmetic is carried out in (half types accumulate in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DtypeInfo:
    name: str  # numpy dtype name
    c_type: str  # C++ spelling in the cupydcn/cuda/kernels/ templates
    acc_name: str  # dtype the kernels and GEMMs accumulate in
    eps: float  # unit roundoff, used by callers choosing tolerances


DTYPES: dict[str, DtypeInfo] = {
    "float64": DtypeInfo("float64", "double", "float64", 2.0**-53),
    "float32": DtypeInfo("float32", "float", "float32", 2.0**-24),
    "float16": DtypeInfo("float16", "__half", "float32", 2.0**-11),
    "bfloat16": DtypeInfo("bfloat16", "__nv_bfloat16", "float32", 2.0**-8),
}

INDEX_C_TYPES: dict[int, str] = {32: "int", 64: "long long"}

INT32_LIMIT = 2**31 - 1


def bfloat16_dtype() -> np.dtype:
    """The NumPy bfloat16 dtype (from ml_dtypes), imported only when needed."""
    try:
        import ml_dtypes
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "bfloat16 arrays on the CPU need the 'ml_dtypes' package (pip install ml_dtypes)"
        ) from exc
    return np.dtype(ml_dtypes.bfloat16)


def dtype_info(dtype) -> DtypeInfo | None:
    """The table row of ``dtype`` (any object with a NumPy-style ``name``), or None."""
    name = getattr(dtype, "name", None) or str(dtype)
    return DTYPES.get(name)


def acc_dtype(name: str) -> np.dtype:
    """The NumPy dtype arithmetic on elements of dtype ``name`` is carried out in."""
    return np.dtype(DTYPES[name].acc_name)


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return bfloat16_dtype()
    return np.dtype(name)
