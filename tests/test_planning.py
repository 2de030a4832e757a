"""Launch planning without launching: chunk sizes follow the workspace budget, index
width switches to 64 bits exactly where a tensor or buffer passes 2^31 - 1 elements,
and the kernel sources are assembled from the files on disk."""

from __future__ import annotations

import dataclasses

import pytest

from cupydcn.cuda.kernel_source import KERNEL_TEMPLATES, module_source, name_expression
from cupydcn.cuda.launch import BLOCK_SIZE, INT32_INDEX_LIMIT, MAX_BLOCKS, launch_config
from cupydcn.deform_conv.cuda_backend import images_per_chunk, index_bits_for
from cupydcn.deform_conv.spec import ConvGeometry


def _geometry(**overrides) -> ConvGeometry:
    base = dict(
        batch=8,
        in_channels=64,
        height=32,
        width=32,
        out_channels=64,
        groups=1,
        offset_groups=1,
        kernel_h=3,
        kernel_w=3,
        stride_h=1,
        stride_w=1,
        pad_h=1,
        pad_w=1,
        dil_h=1,
        dil_w=1,
        out_h=32,
        out_w=32,
        has_mask=True,
        has_bias=True,
    )
    base.update(overrides)
    return ConvGeometry(**base)


def test_chunk_follows_budget():
    geom = _geometry(batch=37)
    per_image = 1000
    assert images_per_chunk(geom, per_image, 10**9) == 37
    assert images_per_chunk(geom, per_image, 5 * per_image + 1) == 5
    assert images_per_chunk(geom, per_image, 1) == 1  # at least one image
    assert images_per_chunk(dataclasses.replace(geom, batch=0), per_image, 10**9) == 1


def test_index_bits_switch_at_int32_limit():
    geom = _geometry(
        batch=1,
        in_channels=1,
        out_channels=1,
        height=1,
        width=1,
        out_h=1,
        out_w=1,
        kernel_h=1,
        kernel_w=1,
    )
    assert index_bits_for(geom, 1) == 32
    # A grid-stride loop adds blocks * threads to an index below the total, so 32-bit
    # indexing stops that far below 2^31 - 1.
    limit = 2**31 - 1 - MAX_BLOCKS * BLOCK_SIZE
    assert INT32_INDEX_LIMIT == limit
    assert index_bits_for(dataclasses.replace(geom, height=limit), 1) == 32
    assert index_bits_for(dataclasses.replace(geom, height=limit + 1), 1) == 64
    assert index_bits_for(dataclasses.replace(geom, height=2**31), 1) == 64
    # the column buffer alone can force 64 bits: C*K*P*chunk
    columns = _geometry(
        batch=64,
        in_channels=512,
        kernel_h=3,
        kernel_w=3,
        height=8,
        width=8,
        out_h=256,
        out_w=256,
        out_channels=8,
    )
    assert columns.in_channels * 9 * 256 * 256 * 1 < limit
    assert index_bits_for(columns, 1) == 32
    assert index_bits_for(columns, 8) == 64
    # the output too
    assert index_bits_for(dataclasses.replace(geom, out_channels=2**31, out_h=1), 1) == 64


@pytest.mark.parametrize(
    "total, expected",
    [
        (1, (1, BLOCK_SIZE)),
        (BLOCK_SIZE, (1, BLOCK_SIZE)),
        (BLOCK_SIZE + 1, (2, BLOCK_SIZE)),
        (10**12, (MAX_BLOCKS, BLOCK_SIZE)),
    ],
)
def test_launch_config(total, expected):
    assert launch_config(total) == expected


def test_module_source_inlines_headers_from_disk():
    source = module_source("deform_conv.cu")
    assert '#include "' not in source  # every local header inlined, nested ones too
    assert "struct BilinearPoint" in source  # from the header
    assert "#pragma once" not in source
    for source_file, kernels in KERNEL_TEMPLATES.items():
        text = module_source(source_file)
        for kernel in kernels:
            assert f"void {kernel}(" in text


def test_name_expression_spelling():
    assert (
        name_expression("deform_conv_im2col", "bfloat16", 64)
        == "cupydcn::deform_conv_im2col<__nv_bfloat16, long long>"
    )
    assert (
        name_expression("round_to_output", "float16", 32) == "cupydcn::round_to_output<__half, int>"
    )
