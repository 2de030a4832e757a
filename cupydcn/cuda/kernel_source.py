"""Kernel sources: where ``cupydcn/cuda/kernels/`` lives, how a module's source string is built, and
the name expressions of every specialisation.

A module's source string is the ``.cu`` file with its ``#include "..."`` lines replaced by
the included files' text, so editing a header changes the string that CuPy's compile
cache keys on. The same text is what the NVRTC build test and the CPU test harness
compile, so all three see one source.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from cupydcn.core.dtypes import DTYPES, INDEX_C_TYPES

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$", re.MULTILINE)

# Every kernel template, by the source file that defines it. Each is instantiated as
# ``cupydcn::<name><T, I>`` for every dtype T of the table and index width I.
KERNEL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "deform_conv.cu": (
        "deform_conv_im2col",
        "deform_conv_col2im_input",
        "deform_conv_col2im_coord",
    ),
    "convert.cu": ("widen_to_acc", "round_to_output"),
    "deform_roi_pool.cu": (
        "deform_roi_pool_forward",
        "deform_roi_pool_backward_input",
        "deform_roi_pool_backward_coord",
    ),
    "deform_psroi_pool.cu": (
        "deform_psroi_pool_forward",
        "deform_psroi_pool_backward_input",
        "deform_psroi_pool_backward_offset",
    ),
}

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"

SOURCE_OF_KERNEL: dict[str, str] = {
    kernel: source for source, kernels in KERNEL_TEMPLATES.items() for kernel in kernels
}

# Extra NVRTC options; the C++ standard is the one both NVRTC and the host harness use.
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)


def kernel_dir() -> Path:
    """The directory of the CUDA sources, ``cupydcn/cuda/kernels/`` (package data)."""
    return KERNEL_DIR


def _inline(path: Path, seen: set[Path]) -> str:
    text = _PRAGMA_ONCE.sub("", path.read_text())

    def replace(match: re.Match) -> str:
        included = (path.parent / match.group(1)).resolve()
        if included in seen:  # each header once, like #pragma once
            return ""
        seen.add(included)
        return f"// ---- begin {match.group(1)}\n{_inline(included, seen)}\n// ---- end {match.group(1)}"

    return _INCLUDE.sub(replace, text)


@functools.lru_cache(maxsize=None)
def module_source(source_file: str) -> str:
    """The full source string of one ``cupydcn/cuda/kernels/`` file, local includes inlined."""
    path = kernel_dir() / source_file
    return _inline(path, {path.resolve()})


def name_expression(kernel: str, dtype_name: str, index_bits: int) -> str:
    """``cupydcn::deform_conv_im2col<float, int>`` and the like."""
    return f"cupydcn::{kernel}<{DTYPES[dtype_name].c_type}, {INDEX_C_TYPES[index_bits]}>"


def name_expressions(source_file: str, dtype_name: str, index_bits: int) -> tuple[str, ...]:
    """Every specialisation of one source file for one dtype and index width."""
    return tuple(
        name_expression(kernel, dtype_name, index_bits)
        for kernel in KERNEL_TEMPLATES[source_file]
    )
