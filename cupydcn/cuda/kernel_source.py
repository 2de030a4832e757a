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
from typing import NamedTuple

from cupydcn.core.dtypes import DTYPES, INDEX_C_TYPES

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$", re.MULTILINE)

# Every kernel template, by the source file that defines it. Each is instantiated as
# ``cupydcn::<name><T, I>`` for every dtype T of the table and index width I.
KERNEL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "deform_conv.cu": (
        "deform_conv_im2col",
        "deform_conv_col2im_input",
        "deform_conv_col2im_input_tiled",
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
    "deform_attn.cu": (
        "deform_attn_msda_forward",
        "deform_attn_msda_backward",
        "deform_attn_dcn_forward",
        "deform_attn_dcn_backward",
    ),
    # The deterministic backward (deterministic=True): slot-writing passes of the
    # grad_input kernels and the ordered reduction of the slots.
    "deform_conv_deterministic.cu": ("deform_conv_col2im_input_slots",),
    "deform_roi_pool_deterministic.cu": ("deform_roi_pool_backward_input_slots",),
    "deform_psroi_pool_deterministic.cu": ("deform_psroi_pool_backward_input_slots",),
    "segment_sum.cu": ("segment_sum",),
    # The double backward: the terms along an offset direction (second_order_cuda.py).
    "deform_conv_second_order.cu": (
        "deform_conv_second_order_columns",
        "deform_conv_second_order_coord",
        "deform_conv_second_order_input",
    ),
    # Few input channels per weight group (depthwise): direct kernels without columns
    # (cupydcn/deform_conv/depthwise_cuda.py).
    "deform_conv_depthwise.cu": (
        "deform_conv_depthwise_forward",
        "deform_conv_depthwise_backward_data",
        "deform_conv_depthwise_backward_weight",
    ),
    # The half types on tensor cores (sm_80+): implicit GEMMs sampling their columns in
    # shared memory, no column buffer (cupydcn/deform_conv/fused_cuda.py).
    "deform_conv_fused.cu": (
        "deform_conv_fused_pack_weight",
        "deform_conv_fused_forward",
        "deform_conv_fused_grad_weight",
    ),
    # The fused data gradient for the half types on tensor cores (sm_80+): grad_input,
    # grad_offset and grad_mask without grad_columns (cupydcn/deform_conv/fused_backward_cuda.py).
    "deform_conv_fused_backward.cu": ("deform_conv_fused_backward_data",),
}

# The parameter list of every kernel, in order and comma-separated, spelled as the .cu file
# declares it (less ``__restrict__``, with ``acc_t<T>`` written ``A``): pointers
# ``[const] T* name`` (element type), ``A* name`` (accumulation type), ``int* name`` or
# ``[const] I* name`` (index type), and ``I name`` for the sizes, of the index type. The
# CUDA backends build each launch's argument list from these names
# (``cupydcn.cuda.launch.kernel_arguments``), the CuPy launcher and the CPU emulator check
# arguments against them, and tests/test_nvrtc.py parses the sources and checks they agree
# with this table.
_CONV_SIZES = (
    "I batch, I channels, I height, I width, I kernel_h, I kernel_w, I stride_h, I stride_w, "
    "I pad_h, I pad_w, I dil_h, I dil_w, I out_h, I out_w, I offset_groups, I padding_mode, "
    # the launch's range of output pixels (the whole image, 0 and out_h * out_w, unless
    # one image's columns exceed the workspace; cupydcn/deform_conv/cuda_backend.py)
    "I pixel_start, I pixel_count"
)
_ROI_SIZES = "I num_rois, I channels, I height, I width, I pooled_h, I pooled_w, I sampling_ratio"
_PSROI_SIZES = (
    "I num_rois, I channels, I height, I width, I output_dim, I group_size, I pooled_size, "
    "I part_size, I sample_per_part, I num_classes"
)
# deform_attn.cu: the sizes of MsdaGeometry / DcnGeometry (cupydcn/deform_attn/spec.py).
_MSDA_SIZES = "I batch, I num_keys, I heads, I head_dim, I num_queries, I levels, I points"
_DCN_SIZES = (
    "I batch, I height, I width, I group, I group_channels, I kernel_h, I kernel_w, "
    "I stride_h, I stride_w, I pad_h, I pad_w, I dil_h, I dil_w, I out_h, I out_w, "
    "I remove_center, I packed_dim"
)
# deform_conv_depthwise.cu: the sizes by ConvGeometry's names (cupydcn/deform_conv/spec.py).
_DEPTHWISE_SIZES = (
    "I batch, I in_channels, I height, I width, I out_channels, I groups, I offset_groups, "
    "I kernel_h, I kernel_w, I stride_h, I stride_w, I pad_h, I pad_w, I dil_h, I dil_w, "
    "I out_h, I out_w, I padding_mode"
)
# deform_conv_fused.cu: the same ConvGeometry-named sizes.
_FUSED_SIZES = _DEPTHWISE_SIZES
KERNEL_PARAMETERS: dict[str, str] = {
    "deform_conv_im2col": f"const T* input, const T* offset, const T* mask, T* columns, {_CONV_SIZES}",
    "deform_conv_col2im_input": (
        f"const A* grad_columns, const T* offset, const T* mask, A* grad_input, {_CONV_SIZES}"
    ),
    # the tiled (shared-memory) grad_input: channels per block and the window's margin
    "deform_conv_col2im_input_tiled": (
        f"const A* grad_columns, const T* offset, const T* mask, A* grad_input, {_CONV_SIZES}, "
        "I channel_slab, I halo"
    ),
    "deform_conv_col2im_coord": (
        "const A* grad_columns, const T* input, const T* offset, const T* mask, "
        f"T* grad_offset, T* grad_mask, {_CONV_SIZES}"
    ),
    "widen_to_acc": "const T* input, A* output, I total",
    "round_to_output": "const A* input, T* output, I total",
    "deform_roi_pool_forward": (
        "const T* input, const A* rois, const T* offset, const T* mask, "
        f"const A* scale_and_gamma, T* output, {_ROI_SIZES}"
    ),
    "deform_roi_pool_backward_input": (
        "const T* grad_output, const A* rois, const T* offset, const T* mask, "
        f"const A* scale_and_gamma, A* grad_input, {_ROI_SIZES}"
    ),
    "deform_roi_pool_backward_coord": (
        "const T* grad_output, const T* input, const A* rois, const T* offset, const T* mask, "
        f"const A* scale_and_gamma, T* grad_offset, T* grad_mask, {_ROI_SIZES}"
    ),
    "deform_psroi_pool_forward": (
        "const T* input, const A* rois, const T* offset, const A* scalars, T* output, "
        f"int* count, {_PSROI_SIZES}"
    ),
    "deform_psroi_pool_backward_input": (
        "const T* grad_output, const A* rois, const T* offset, const A* scalars, "
        f"A* grad_input, {_PSROI_SIZES}"
    ),
    "deform_psroi_pool_backward_offset": (
        "const T* grad_output, const T* input, const A* rois, const T* offset, "
        f"const A* scalars, T* grad_offset, {_PSROI_SIZES}"
    ),
    "deform_attn_msda_forward": (
        "const T* value, const int* spatial_shapes, const T* sampling_locations, "
        f"const T* attention_weights, T* output, {_MSDA_SIZES}"
    ),
    "deform_attn_msda_backward": (
        "const T* grad_output, const T* value, const int* spatial_shapes, "
        "const T* sampling_locations, const T* attention_weights, A* grad_value, "
        f"A* grad_sampling_locations, A* grad_attention_weights, {_MSDA_SIZES}"
    ),
    "deform_attn_dcn_forward": (
        "const T* input, const T* offset, const T* mask, const A* offset_scale, T* output, "
        f"{_DCN_SIZES}"
    ),
    "deform_attn_dcn_backward": (
        "const T* grad_output, const T* input, const T* offset, const T* mask, "
        "const A* offset_scale, A* grad_input, A* grad_offset, A* grad_mask, "
        f"{_DCN_SIZES}"
    ),
    "deform_conv_col2im_input_slots": (
        "const A* grad_columns, const T* offset, const T* mask, I* slots, I* keys, A* values, "
        f"{_CONV_SIZES}"
    ),
    "deform_roi_pool_backward_input_slots": (
        "const T* grad_output, const A* rois, const T* offset, const T* mask, "
        f"const A* scale_and_gamma, I* slots, I* keys, A* values, {_ROI_SIZES}"
    ),
    "deform_psroi_pool_backward_input_slots": (
        "const T* grad_output, const A* rois, const T* offset, const A* scalars, "
        f"I* slots, I* keys, A* values, {_PSROI_SIZES}"
    ),
    "segment_sum": "const I* sorted_keys, const A* sorted_values, A* output, I count, I targets",
    "deform_conv_second_order_columns": (
        "const T* input, const T* offset, const T* mask, const T* offset_tangent, A* columns, "
        f"{_CONV_SIZES}"
    ),
    "deform_conv_second_order_coord": (
        "const A* grad_columns, const T* input, const T* offset, const T* mask, "
        f"const T* offset_tangent, T* grad_offset, T* grad_mask, {_CONV_SIZES}"
    ),
    "deform_conv_second_order_input": (
        "const A* grad_columns, const T* offset, const T* mask, const T* offset_tangent, "
        f"A* grad_input, {_CONV_SIZES}"
    ),
    "deform_conv_depthwise_forward": (
        "const T* input, const T* offset, const T* mask, const T* weight, const T* bias, "
        f"T* output, {_DEPTHWISE_SIZES}, I groups_per_thread"
    ),
    "deform_conv_depthwise_backward_data": (
        "const T* grad_output, const T* input, const T* offset, const T* mask, "
        f"const T* weight, A* grad_input, T* grad_offset, T* grad_mask, {_DEPTHWISE_SIZES}, "
        "I channel_slices"
    ),
    "deform_conv_depthwise_backward_weight": (
        "const T* grad_output, const T* input, const T* offset, const T* mask, "
        f"A* grad_weight, A* grad_bias, {_DEPTHWISE_SIZES}, I pixel_threads"
    ),
    # deform_conv_fused.cu: the sizes by ConvGeometry's names (as the depthwise kernels');
    # channels_padded = C / groups rounded up to 16, the packed weight's channels per tap.
    "deform_conv_fused_pack_weight": (
        f"const T* weight, T* weight_packed, {_FUSED_SIZES}, I channels_padded"
    ),
    "deform_conv_fused_forward": (
        "const T* input, const T* offset, const T* mask, const T* weight_packed, "
        f"const T* bias, T* output, {_FUSED_SIZES}, I channels_padded"
    ),
    "deform_conv_fused_grad_weight": (
        "const T* grad_output, const T* input, const T* offset, const T* mask, "
        f"A* grad_weight, {_FUSED_SIZES}"
    ),
    # deform_conv_fused_backward.cu: the same ConvGeometry-named sizes.
    "deform_conv_fused_backward_data": (
        "const T* grad_output, const T* input, const T* offset, const T* mask, "
        "const T* weight, A* grad_input, T* grad_offset, T* grad_mask, "
        f"{_DEPTHWISE_SIZES}"
    ),
}

# The modules (source files) each public op launches kernels from, by the op's function
# name: what ``cupydcn.precompile`` builds for an op. ``DETERMINISTIC_SOURCE_FILES`` are
# the extra ones only its ``deterministic=True`` backward launches.
OP_SOURCE_FILES: dict[str, tuple[str, ...]] = {
    "deform_conv2d": (
        "deform_conv.cu",
        "convert.cu",
        "deform_conv_second_order.cu",
        "deform_conv_depthwise.cu",
        "deform_conv_fused.cu",
        "deform_conv_fused_backward.cu",
    ),
    "deform_roi_pool": ("deform_roi_pool.cu", "convert.cu"),
    "deform_psroi_pool": ("deform_psroi_pool.cu", "convert.cu"),
    "multi_scale_deformable_attn": ("deform_attn.cu", "convert.cu"),
    "dcnv3": ("deform_attn.cu", "convert.cu"),
    "dcnv4": ("deform_attn.cu", "convert.cu"),
}
DETERMINISTIC_SOURCE_FILES: dict[str, tuple[str, ...]] = {
    "deform_conv2d": ("deform_conv_deterministic.cu", "segment_sum.cu"),
    "deform_roi_pool": ("deform_roi_pool_deterministic.cu", "segment_sum.cu"),
    "deform_psroi_pool": ("deform_psroi_pool_deterministic.cu", "segment_sum.cu"),
    "multi_scale_deformable_attn": (),
    "dcnv3": (),
    "dcnv4": (),
}

_PARAMETER = re.compile(r"(const\s+)?(T|A|int|I)\s*(\*)?\s*([A-Za-z_]\w*)")


class KernelParameter(NamedTuple):
    """One parameter of a kernel: its name, its type (``T``, ``A``, ``int`` or ``I``),
    whether it is a pointer and whether that pointer is to const."""

    name: str
    type: str
    pointer: bool
    const: bool

    def __str__(self) -> str:
        return (
            f"{'const ' if self.const else ''}{self.type}{'*' if self.pointer else ''} {self.name}"
        )

    def dtype_name(self, dtype_name: str, index_bits: int) -> str:
        """The dtype of this parameter's array (pointer) or value (size) in one
        specialisation."""
        return {
            "T": dtype_name,
            "A": DTYPES[dtype_name].acc_name,
            "int": "int32",
            "I": f"int{index_bits}",
        }[self.type]


def parse_parameter(text: str) -> KernelParameter:
    """``KernelParameter`` of ``"const T* input"`` and the like (see KERNEL_PARAMETERS)."""
    match = _PARAMETER.fullmatch(text.strip())
    if match is None or (match.group(1) and not match.group(3)):
        raise ValueError(f"not a kernel parameter declaration: {text!r}")
    return KernelParameter(
        match.group(4), match.group(2), bool(match.group(3)), bool(match.group(1))
    )


@functools.cache
def kernel_parameters(kernel: str) -> tuple[KernelParameter, ...]:
    """The parameters of ``kernel``, in order (KeyError for an unknown kernel)."""
    return tuple(parse_parameter(p) for p in KERNEL_PARAMETERS[kernel].split(","))


KERNEL_DIR = Path(__file__).resolve().parent / "kernels"

SOURCE_OF_KERNEL: dict[str, str] = {
    kernel: source for source, kernels in KERNEL_TEMPLATES.items() for kernel in kernels
}

# Extra NVRTC options; the C++ standard is the one both NVRTC and the host harness use.
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)

# What CuPy's RawModule adds to these for NVRTC (CuPy 14, cupy/cuda/compiler.py), besides
# its include directories, -arch and --pch. -ftz=true flushes float subnormals to zero,
# which is why the kernels' decision expressions use explicitly rounded operations
# (cupydcn/cuda/kernels/rounding.cuh) and the CPU emulator flushes in those. tests/test_nvrtc.py builds
# with these options and checks that CuPy still adds exactly them.
CUPY_ADDED_NVRTC_OPTIONS: tuple[str, ...] = ("-ftz=true", "--device-as-default-execution-space")


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


@functools.cache
def module_source(source_file: str) -> str:
    """The full source string of one ``cupydcn/cuda/kernels/`` file, local includes inlined."""
    path = kernel_dir() / source_file
    return _inline(path, {path.resolve()})


# Source files whose kernels take compile-time integer template parameters after <T, I>
# (their names, in order), and the specialisations the backends launch. Such a file is
# compiled as one module per (dtype, index width, specialisation), holding every kernel of
# the file with those template arguments; a file not listed here is one module per (dtype,
# index width) and its kernels take no extra arguments.
FILE_TEMPLATE_PARAMETERS: dict[str, tuple[str, ...]] = {
    # kernel size (0, 0: any, from the runtime arguments) and PADDING_* code
    # (cupydcn/deform_conv/cuda_kernels.py: conv_specialisation picks one)
    "deform_conv.cu": ("kernel_h", "kernel_w", "padding_mode"),
    # kernel size; (0, 0): any, from the runtime arguments
    # (cupydcn/deform_conv/depthwise_cuda.py: kernel_size_specialisation picks one)
    "deform_conv_depthwise.cu": ("kernel_h", "kernel_w"),
}
FILE_SPECIALISATIONS: dict[str, tuple[tuple[int, ...], ...]] = {
    # zeros: 1x1, 3x3, 5x5 and any size; border and reflection: any size (mode constant)
    "deform_conv.cu": ((1, 1, 0), (3, 3, 0), (5, 5, 0), (0, 0, 0), (0, 0, 1), (0, 0, 2)),
    # 3x3 (taps unrolled, points kept in registers) and any size
    "deform_conv_depthwise.cu": ((3, 3), (0, 0)),
}


def specialisations(source_file: str) -> tuple[tuple[int, ...], ...]:
    """The template arguments (after <T, I>) a module of ``source_file`` is built with:
    ``((),)`` for a file without template parameters."""
    return FILE_SPECIALISATIONS.get(source_file, ((),))


def check_template_args(kernel: str, template_args: tuple[int, ...]) -> tuple[int, ...]:
    """``template_args`` as a tuple of ints when it is one of the specialisations of the
    kernel's file; a ``ValueError`` naming the kernel, the parameters and the choices
    otherwise."""
    source_file = SOURCE_OF_KERNEL[kernel]
    args = tuple(int(a) for a in template_args)
    allowed = specialisations(source_file)
    if args not in allowed:
        names = FILE_TEMPLATE_PARAMETERS.get(source_file, ())
        raise ValueError(
            f"{kernel}: template arguments {args} for ({', '.join(names) or 'none'}) are not "
            f"one of the specialisations of {source_file}: {list(allowed)}"
        )
    return args


def name_expression(
    kernel: str, dtype_name: str, index_bits: int, template_args: tuple[int, ...] = ()
) -> str:
    """``cupydcn::deform_conv_im2col<float, int>`` and the like; the ``template_args`` (a
    specialisation of the kernel's file) follow the index type."""
    extra = "".join(f", {int(a)}" for a in template_args)
    return f"cupydcn::{kernel}<{DTYPES[dtype_name].c_type}, {INDEX_C_TYPES[index_bits]}{extra}>"


def name_expressions(
    source_file: str, dtype_name: str, index_bits: int, template_args: tuple[int, ...] = ()
) -> tuple[str, ...]:
    """Every kernel of one module: one source file for one dtype, index width and
    specialisation."""
    return tuple(
        name_expression(kernel, dtype_name, index_bits, template_args)
        for kernel in KERNEL_TEMPLATES[source_file]
    )
