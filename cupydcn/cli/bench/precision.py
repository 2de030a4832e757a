"""The precision switches of the protocol, set for a run and recorded: TF32 off for
every peer, ``CUPY_TF32`` unset, cuDNN autotuning on."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


def set_precision_switches() -> tuple[dict[str, Any], Callable[[], None]]:
    """TF32 off for every peer, ``CUPY_TF32`` unset, cuDNN autotuning on; returns the
    switches as set (for the record) and a function restoring the previous state."""
    record: dict[str, Any] = {}
    previous_env = os.environ.pop("CUPY_TF32", None)
    record["CUPY_TF32"] = (
        "unset"
        if previous_env is None
        else (
            f"unset (was {previous_env!r}; removed"
            + (", but CuPy was already imported" if "cupy" in sys.modules else "")
            + ")"
        )
    )
    restores: list[Callable[[], None]] = []
    if previous_env is not None:
        restores.append(lambda: os.environ.__setitem__("CUPY_TF32", previous_env))
    try:
        import torch
    except ImportError:
        record["torch"] = "not installed"
    else:
        before = (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic,
        )

        def restore_torch():
            (
                torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark,
                torch.backends.cudnn.deterministic,
            ) = before

        restores.append(restore_torch)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
        record.update(
            {
                "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                "torch.float32_matmul_precision": torch.get_float32_matmul_precision(),
                "torch.backends.cudnn.benchmark": torch.backends.cudnn.benchmark,
                "torch.backends.cudnn.deterministic": torch.backends.cudnn.deterministic,
                # Left at PyTorch's defaults, recorded: they concern half-precision GEMMs.
                "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
                "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            }
        )
    record["cupydcn"] = (
        "float32 GEMMs through CuPy's matmul with CUPY_TF32 unset (no TF32); "
        "float16/bfloat16 accumulate in float32"
    )

    def restore():
        for undo in reversed(restores):
            undo()

    return record, restore
