"""deform_conv2d's fused data gradient for the half types on tensor cores (sm_80+):
grad_input, grad_offset and grad_mask without a grad_columns buffer
(cupydcn/cuda/kernels/deform_conv_fused_backward.cu, kernel
``deform_conv_fused_backward_data``).

Per weight group g, grad_columns[(c, tap), p] = sum_o weight[g*M + o, c, tap] *
grad_output[b, g*M + o, p] is an MMA (mma.m16n8k16, float32 accumulators) whose tiles
are spent at once: grad_input += mask * gc * the bilinear corner weights (float32
atomics into ``grad_input_acc``), and per (pixel, tap, offset group) the sums over the
group's channels of gc * d sample / d p and gc * sample (grad_offset, grad_mask), exactly
the column path's deform_conv_col2im_input / deform_conv_col2im_coord but for the order
of the float32 additions.

Tiles and launch. A block (THREADS = 256, 8 warps) owns one image, one tap and TILE_N =
64 output pixels: grid (ceil(P / 64), K, images), block (256, 1, 1) (y and z loop past
65535). It walks all C channels offset group by offset group, cut at weight-group ends
into chunks of TILE_M = 32 channels; per chunk the 32 x 64 gc tile is the MMA over the
weight group's M output channels in steps of TILE_K = 32 (weight^T and grad_output tiles
in shared memory, double-buffered, 8 warps of 16 x 16), staged in shared memory as
float, then spent by the 256 threads (a pixel and 8 channels each). Because a block owns
every channel of its (tap, pixels), grad_offset and grad_mask are reduced inside the block
in a fixed order and written once in the element dtype, without atomics (bitwise
reproducible); grad_input uses float32 global atomics (4 per gc element). No kernel-size
specialisation (one module per dtype and index width).

Shared memory per block: 27136 bytes, static (SHARED_BYTES): 2 x 2560 (weight tiles) + 2
x 5120 (grad_output tiles) + 8704 (gc stage) + 3072 (coordinate partials).

Predicted roofline on an H200 (predicted from counts, not measured: no device was
available to this work). Layer N 8, C = Co = 256, 3x3, 64 x 64 output, groups 1, offset
groups 1: gc has C K P N = 75.5 M elements, so the MMAs are 2 * 75.5 M * 256 = 39 GFLOP
(~0.1-0.2 ms at the 20-40 % of the ~990 TFLOP/s f16 dense peak that 16 x 16 warp tiles
with 32-bit shared fragment loads reach); the operand re-reads are L2 traffic (the
weight slice of a tap once per block, 0.6 GB; the grad_output tile once per 32-channel
chunk, 1.2 GB; ~0.2 ms at ~10 TB/s of L2); spending gc is 4 corner loads, ~30 flops and
4 float32 atomics per element (302 M atomics, the bound: ~0.2-0.4 ms through L2); HBM
traffic is small (input 17 MB, grad_input 34 MB, mostly L2 resident). Predicted
~0.3-0.5 ms, atomics-bound, against the column path's float32 grad_columns (302 MB
written by the GEMM and read by two kernels, ~0.2 ms of HBM alone, plus the same
atomics and the GEMM), and no grad_columns workspace (C K P * 4 bytes per image).
"""

from __future__ import annotations

from typing import NamedTuple

from cupydcn.cuda.launch import (
    INT32_INDEX_LIMIT,
    KernelLauncher,
    KernelTypes,
    index_bits_for_sizes,
    launch_kernel,
)
from cupydcn.deform_conv.padding import PADDING_MODE_CODES
from cupydcn.deform_conv.spec import ConvGeometry

SOURCE_FILE = "deform_conv_fused_backward.cu"
KERNEL = "deform_conv_fused_backward_data"

# Constants of deform_conv_fused_backward.cu (kFusedBwd*).
THREADS = 256
TILE_M = 32  # channels per chunk
TILE_N = 64  # output pixels per block
TILE_K = 32  # output channels per MMA step
SHARED_BYTES = 27136  # static; the emulator refuses extern __shared__
MAX_STATIC_SHARED_BYTES = 48 * 1024
MAX_GRID_YZ = 65535

DTYPES = ("float16", "bfloat16")
MIN_COMPUTE_CAPABILITY = 80
# The applicability rule's tile-occupancy floors (fused_data_applies).
MIN_CHANNELS_PER_CHUNK = 8
MIN_OUTPUTS_PER_GROUP = 16


class LaunchShape(NamedTuple):
    """The launch: kernel, grid and block (x, y, z), static shared memory in bytes, the
    work items reported as its total, and the size arguments besides the geometry's."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    total: int
    sizes: dict


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _yz(count: int) -> int:
    return max(1, min(count, MAX_GRID_YZ))


def channel_chunks(geom: ConvGeometry) -> list[tuple[int, int, int]]:
    """The chunks a block walks, in order: (offset group, first channel, channels), the
    channels of each offset group cut at weight-group ends and into TILE_M."""
    cg = geom.in_channels // geom.groups
    cpg = geom.in_channels // geom.offset_groups
    chunks = []
    for og in range(geom.offset_groups):
        c, end = og * cpg, (og + 1) * cpg
        while c < end:
            stop = min(end, (c // cg + 1) * cg, c + TILE_M)
            chunks.append((og, c, stop - c))
            c = stop
    return chunks


def fused_data_supports(geom: ConvGeometry, dtype_name: str) -> bool:
    """Whether the kernel can compute the data gradient of ``geom`` in ``dtype_name`` at
    all: a half type. Every size, group structure, stride, dilation, padding and padding
    mode, mask or none."""
    return dtype_name in DTYPES


def fused_data_applies(geom: ConvGeometry, dtype_name: str) -> bool:
    """Whether the data gradient of ``geom`` in ``dtype_name`` should run on this kernel
    (on a device of compute capability >= MIN_COMPUTE_CAPABILITY, which the caller checks:
    :func:`fused_data_supported`). The rule:

    * the element dtype is float16 or bfloat16 (float32 / float64: the column path);
    * the channel chunks (:func:`channel_chunks`: each offset group's channels cut at
      weight-group ends and into 32) hold at least MIN_CHANNELS_PER_CHUNK (8) channels on
      average, i.e. C / number of chunks >= 8: below that the 32-row MMA tiles are mostly
      padding (depthwise-like layers: the depthwise kernels);
    * C_out / groups >= MIN_OUTPUTS_PER_GROUP (16): the MMA's reduction (over output
      channels) is at least one 16-deep slice.

    Shared memory is static and fixed, SHARED_BYTES = 27136 <= 48 KiB, so it always fits."""
    if not fused_data_supports(geom, dtype_name):
        return False
    chunks = len(channel_chunks(geom))
    return (
        SHARED_BYTES <= MAX_STATIC_SHARED_BYTES
        and geom.in_channels >= MIN_CHANNELS_PER_CHUNK * chunks
        and geom.out_channels // geom.groups >= MIN_OUTPUTS_PER_GROUP
    )


def fused_data_supported(compute_capability: int) -> bool:
    """Whether a device of ``compute_capability`` (major * 10 + minor) runs the kernel."""
    return int(compute_capability) >= MIN_COMPUTE_CAPABILITY


def fused_data_index_bits(geom: ConvGeometry) -> int:
    """32 when every tensor the kernel indexes stays within 32-bit indexing, else 64."""
    pixels = geom.out_h * geom.out_w
    return index_bits_for_sizes(
        geom.batch * geom.in_channels * geom.height * geom.width,
        geom.batch * 2 * geom.offset_groups * geom.taps * pixels,
        geom.batch * geom.out_channels * pixels,
        geom.out_channels * (geom.in_channels // geom.groups) * geom.taps,
    )


def backward_data_shape(geom: ConvGeometry, images: int) -> LaunchShape:
    """The launch over ``images`` images: grid (ceil(P / TILE_N), K, images), THREADS
    threads, SHARED_BYTES static shared memory."""
    pixels = geom.out_h * geom.out_w
    return LaunchShape(
        KERNEL,
        (max(1, _ceil_div(pixels, TILE_N)), _yz(geom.taps), _yz(images)),
        (THREADS, 1, 1),
        SHARED_BYTES,
        images * geom.in_channels * geom.taps * pixels,
        dict(batch=images, padding_mode=PADDING_MODE_CODES[geom.padding_mode]),
    )


def _check(geom: ConvGeometry, types: KernelTypes) -> None:
    if types.dtype_name not in DTYPES:
        raise ValueError(
            f"the fused data gradient computes {DTYPES}; got {types.dtype_name} "
            "(fused_data_supports)"
        )
    if types.index_bits not in (32, 64):
        raise ValueError(f"index_bits must be 32 or 64; got {types.index_bits!r}")
    if types.index_bits == 32 and fused_data_index_bits(geom) == 64:
        raise ValueError(
            "the fused data gradient needs 64-bit indices for this geometry (a tensor "
            f"exceeds {INT32_INDEX_LIMIT} elements); use fused_data_index_bits(geom)"
        )


def launch_fused_data_backward(
    launcher: KernelLauncher,
    types: KernelTypes,
    geom: ConvGeometry,
    *,
    grad_output,
    input,
    offset,
    weight,
    mask,
    grad_input_acc,
    grad_offset,
    grad_mask,
) -> None:
    """The data gradients of deform_conv2d for the n = input.shape[0] images of
    grad_output [n, C_out, H_out, W_out], input [n, C, H, W], offset, mask (None: DCNv1)
    and weight [C_out, C / groups, kh, kw], all C-contiguous in ``types.dtype_name``:

    * grad_input_acc [n, C, H, W] float32 += d loss / d input (float32 atomics: zero it
      first for the gradient itself; the additions' order depends on the scheduling);
    * grad_offset [n, 2 G K, H_out, W_out] and grad_mask [n, G K, H_out, W_out] (element
      dtype) are written (every element), or None when not wanted (grad_mask must be None
      without a mask).

    One launch of :func:`backward_data_shape`; no workspace."""
    _check(geom, types)
    if mask is None and grad_mask is not None:
        raise ValueError("grad_mask without a mask (DCNv1)")
    images = int(input.shape[0])
    if images == 0:
        return
    shape = backward_data_shape(geom, images)
    launch_kernel(
        launcher,
        shape.kernel,
        types.dtype_name,
        types.index_bits,
        shape.total,
        geom,
        shape.sizes,
        grid=shape.grid,
        block=shape.block,
        grad_output=grad_output,
        input=input,
        offset=offset,
        mask=mask,
        weight=weight,
        grad_input=grad_input_acc,
        grad_offset=grad_offset,
        grad_mask=grad_mask,
    )
