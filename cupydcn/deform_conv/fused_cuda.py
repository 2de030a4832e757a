"""deform_conv2d's fused kernels for the half types on tensor cores (sm_80+): implicit
GEMMs that sample their columns into shared memory, no column buffer.

The column path (:mod:`cupydcn.deform_conv.cuda_backend`) writes ``C * K`` column rows
per image (in the element dtype) and multiplies them by the weight with cuBLAS; here each
weight group's product is an implicit GEMM whose column tiles are sampled into shared
memory (cupydcn/cuda/kernels/deform_conv_fused.cu, sampler in fused_sampling.cuh). Every
column value is bit for bit deform_conv_im2col's (computed in float32, rounded once to T,
docs/semantics.md §6.1), so the results equal the column path's up to the order of the
float32 accumulation. Which calls take it: :func:`fused_applies` (half types, C / groups
>= 8, C_out / groups >= 16, at most 4 offset groups per weight group) on devices of
compute capability >= 8.0 (:func:`fused_supported`); float32 and float64 stay on the
column path.

Kernels and launch shapes (M = C_out / groups, cg = C / groups, cg_pad = cg rounded up to
16, K taps, P = H_out * W_out; 256 threads = 8 warps, 4 (M) x 2 (N) of 32 x 32 each)::

    pack_weight   grid-stride over C_out * K * cg_pad: weight [C_out, cg, kh, kw] ->
                  weight_packed [groups, M, K, cg_pad] (tap-major, zero-padded channels),
                  the A operand's layout (16-byte cp.async rows). Workspace: that buffer.
    forward       grid (ceil(P / 64), groups * ceil(M / 128), N); block tile 128 output
                  channels x 64 pixels of one image; reduction (tap, channel) in steps of
                  32 channels of one tap (16 for a tap's last step when cg_pad % 32 == 16):
                  weight tile 128 x 32 by cp.async, column tile 64 x 32 built by the
                  threads (a pixel and 8 channels each, one 16-byte shared store), both
                  double-buffered (one barrier a step); the points of the 64 pixels at a
                  tap located once per offset group into shared memory, a tap ahead;
                  epilogue + bias, rounded once, staged, stored along the pixels.
                  Shared memory 43008 B static (A 20480, B 10240, points 12288).
    grad_weight   grid (K * ceil(cg / 64), groups * ceil(M / 128), splits); block tile 128
                  output channels x 64 columns (one tap, 64 channels); reduction over its
                  split of the N * ceil(P / 32) slices of 32 pixels: grad_output tile 128 x
                  32 and column tile 64 x 32 double-buffered, the slice's points a slice
                  ahead; one float32 atomic per accumulator into grad_weight_acc [groups, M,
                  cg * K]. splits = min(ceil(1024 / tiles), slices / 16). Shared memory
                  36864 B static (20480, 10240, points 6144).

Resources (NVRTC 13.5, -ftz=true; registers per thread, no spills, no stack; sm_70 / 75
build empty kernels): forward 106-110 with 32-bit indices on sm_80 / 86 / 89 / 90
(107-108 on sm_100 / 120), 136-140 with 64-bit (188-194 on sm_100 / 120); grad_weight
109-111 (125-126 on sm_100 / 120), 64-bit 165-166 (236-238). __launch_bounds__(256, 2)
with 32-bit indices (128 registers at most: two blocks, 16 warps per SM, register-bound;
their shared memory 86 KB of 228), (256, 1) with 64-bit. pack_weight 19-46. NVRTC time
per module (one dtype and index width, three kernels): 1.1-1.9 s on sm_80-90.

Predicted on an H200 (no GPU was available: estimates, not measurements; 132 SMs at
1.98 GHz, 4.8 TB/s HBM3e, mma.sync f16 at about 650 of the 989 dense TFLOP/s, 128 B/clk
of shared memory per SM) for N = 8, C = C_out = 256, 64 x 64 output, 3 x 3, stride 1, G =
1, float16 (E = N * C * K * P = 75.5 M column values, 38.7 GFLOP per product):

* forward: 1024 blocks (3.9 waves of 264). DRAM ~37 MB (input and output 16.8 MB each,
  offsets, mask, weight and its packed copy): 8 us, not binding; the column path moves
  another 302 MB (151 MB of columns written, then read by the GEMM, from a 151 MB
  workspace). MMAs 38.7
  GFLOP: ~60 us. Sampling: each value once per output-channel tile (2 here: 151 M), ~26
  instructions and 4 gathered 2-byte loads each (~1.5-2 L1 wavefronts per warp load):
  ~120 us of issue, ~110-145 us of L1. Shared memory ~50 KB per block step (A and B
  fills 12 KB, ldmatrix reads 32 KB: a 32 x 32 warp tile reads 16 FLOP per byte, below
  the ~20 the MMA rate needs; points 6 KB), 73.7 K steps: ~110 us. Expected bound: the
  sampler's issue / L1 and shared-memory bandwidth together, predicted 130-200 us;
  the column path ~150-250 us (im2col ~60-100 us, cuBLAS ~60 us, the column round trip).
  Its main gain is memory: no column buffer at all.
* grad_weight: 72 tiles x 15 splits = 1080 blocks (4.1 waves). Sampling as the forward
  (151 M values: ~120-145 us); grad_output tiles re-read from L2 once per column tile
  (36 x 16.8 MB = 600 MB: ~50 us of L2); shared memory as the forward (~110 us); 8.8 M
  float atomics (15 per element of a 590 K-element grad_weight); DRAM ~36 MB. Expected
  bound: sampler and shared memory, predicted 150-220 us, against the column path's
  im2col again, the batched GEMMs and the 151 MB column buffer.

Next steps these figures suggest: a 64 x 32 warp tile (halves the ldmatrix bytes per
FLOP, ~64 more accumulator registers), BM = 256 for C_out / groups > 128 (samples each
value once), and the fused data gradient (grad_input, grad_offset, grad_mask) from the
same sampler, which would retire the grad_columns buffer too.
"""

from __future__ import annotations

from typing import NamedTuple

from cupydcn.cuda.launch import (
    INT32_INDEX_LIMIT,
    KernelLauncher,
    KernelTypes,
    index_bits_for_sizes,
    launch_config,
    launch_kernel,
    workspace_empty,
)
from cupydcn.deform_conv.padding import PADDING_MODE_CODES
from cupydcn.deform_conv.spec import ConvGeometry

SOURCE_FILE = "deform_conv_fused.cu"
PACK_KERNEL = "deform_conv_fused_pack_weight"
FORWARD_KERNEL = "deform_conv_fused_forward"
WEIGHT_KERNEL = "deform_conv_fused_grad_weight"

# Constants of deform_conv_fused.cu (kFused*): threads per block (8 warps), the block tile
# (output channels x pixels or columns), the reduction per step (channels of one tap in
# the forward, pixels in grad_weight), the offset groups one weight group may touch.
THREADS = 256
TILE_M = 128
TILE_N = 64
TILE_K = 32
SLICE = TILE_K
MAX_OFFSET_GROUPS = 4
# The packed weight's channels per tap: C / groups rounded up to this (one mma k-slice).
CHANNEL_ALIGN = 16
# Static shared memory per block (the static_asserts of the .cu file).
FORWARD_SHARED_BYTES = 43008
WEIGHT_SHARED_BYTES = 36864

# The element dtypes the kernels compute (others: the column path), and the compute
# capability they need.
DTYPES = ("float16", "bfloat16")
MIN_COMPUTE_CAPABILITY = 80
# The applicability rule's tile-occupancy floor (module docstring).
MIN_CHANNELS_PER_GROUP = 8
MIN_OUTPUTS_PER_GROUP = 16

# grad_weight: splits of the images' pixels (grid.z) until about this many blocks run,
# each split at least MIN_SLICES_PER_SPLIT slices of SLICE pixels.
TARGET_WEIGHT_BLOCKS = 1024
MIN_SLICES_PER_SPLIT = 16
MAX_GRID_YZ = 65535


class LaunchShape(NamedTuple):
    """One launch: kernel, grid and block (x, y, z), static shared memory in bytes, the
    work items reported as its total, the size arguments besides the geometry's (by
    parameter name), and whether it is a 1-D grid-stride launch (the launcher's
    configuration; grid and block here are :func:`~cupydcn.cuda.launch.launch_config`'s)."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    total: int
    sizes: dict
    grid_stride: bool = False


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _yz(count: int) -> int:
    """A grid.y / grid.z extent for ``count`` units: the kernels loop past it."""
    return max(1, min(count, MAX_GRID_YZ))


def channels_per_group(geom: ConvGeometry) -> int:
    return geom.in_channels // geom.groups


def outputs_per_group(geom: ConvGeometry) -> int:
    return geom.out_channels // geom.groups


def channels_padded(geom: ConvGeometry) -> int:
    """The packed weight's channels per tap: C / groups rounded up to CHANNEL_ALIGN."""
    return _ceil_div(channels_per_group(geom), CHANNEL_ALIGN) * CHANNEL_ALIGN


def packed_weight_shape(geom: ConvGeometry) -> tuple[int, int, int, int]:
    """[groups, C_out / groups, K, channels_padded]: weight[g*M + m, c, tap] at [g, m,
    tap, c], zero for c >= C / groups."""
    return (geom.groups, outputs_per_group(geom), geom.taps, channels_padded(geom))


def offset_group_span(geom: ConvGeometry) -> int:
    """The most offset groups the input channels of one weight group touch."""
    cg = channels_per_group(geom)
    cpg = geom.in_channels // geom.offset_groups
    return max(((g + 1) * cg - 1) // cpg - (g * cg) // cpg + 1 for g in range(geom.groups))


def fused_supports(geom: ConvGeometry, dtype_name: str) -> bool:
    """Whether the fused kernels can compute deform_conv2d of ``geom`` in ``dtype_name``
    at all (what the launch functions require): a half type (float16, bfloat16), and the
    input channels of each weight group touching at most MAX_OFFSET_GROUPS offset groups
    (the points of a tile's pixels are staged for that many). Every size, stride,
    dilation, padding and padding mode, mask or none, bias or none."""
    return dtype_name in DTYPES and offset_group_span(geom) <= MAX_OFFSET_GROUPS


def fused_applies(geom: ConvGeometry, dtype_name: str) -> bool:
    """Whether deform_conv2d of ``geom`` in ``dtype_name`` should run on the fused kernels
    (on a device of compute capability >= MIN_COMPUTE_CAPABILITY, which the caller checks:
    :func:`fused_supported`). The rule:

    * the element dtype is float16 or bfloat16. float32 and float64 stay on the column
      path (their GEMMs would need TF32 or double MMAs: other kernels);
    * C / groups >= MIN_CHANNELS_PER_GROUP (8) and C_out / groups >=
      MIN_OUTPUTS_PER_GROUP (16): below that the 16-deep k-slices and the 128 x 64 tiles
      are mostly padding, and the depthwise kernels or the GEMMs do better;
    * the channels of each weight group touch at most MAX_OFFSET_GROUPS (4) offset groups
      (:func:`fused_supports`): any geometry whose offset_groups divides groups, or
      groups = 1 with offset_groups <= 4.

    Shared memory is static and fixed (FORWARD_SHARED_BYTES, WEIGHT_SHARED_BYTES, both
    under 48 KiB), so it always fits."""
    return (
        fused_supports(geom, dtype_name)
        and channels_per_group(geom) >= MIN_CHANNELS_PER_GROUP
        and outputs_per_group(geom) >= MIN_OUTPUTS_PER_GROUP
    )


def fused_supported(compute_capability: int) -> bool:
    """Whether a device of ``compute_capability`` (major * 10 + minor) runs the fused
    kernels (mma.sync m16n8k16 and cp.async need sm_80)."""
    return int(compute_capability) >= MIN_COMPUTE_CAPABILITY


def fused_index_bits(geom: ConvGeometry) -> int:
    """32 when every tensor the fused kernels index (input, offset and mask, output and
    grad_output, the packed weight, grad_weight) and the grid-stride packing launch stay
    within 32-bit indexing, else 64."""
    pixels = geom.out_h * geom.out_w
    return index_bits_for_sizes(
        geom.batch * geom.in_channels * geom.height * geom.width,
        geom.batch * 2 * geom.offset_groups * geom.taps * pixels,
        geom.batch * geom.out_channels * pixels,
        geom.out_channels * geom.taps * channels_padded(geom),
        geom.out_channels * channels_per_group(geom) * geom.taps,
    )


def _sizes(geom: ConvGeometry, images: int, **extra: int) -> dict[str, int]:
    return dict(batch=images, padding_mode=PADDING_MODE_CODES[geom.padding_mode], **extra)


def pack_weight_shape(geom: ConvGeometry) -> LaunchShape:
    """deform_conv_fused_pack_weight: grid-stride over the packed weight's elements."""
    total = geom.out_channels * geom.taps * channels_padded(geom)
    blocks, threads = launch_config(total)
    return LaunchShape(
        PACK_KERNEL,
        (blocks, 1, 1),
        (threads, 1, 1),
        0,
        total,
        _sizes(geom, geom.batch, channels_padded=channels_padded(geom)),
        grid_stride=True,
    )


def forward_shape(geom: ConvGeometry, images: int) -> LaunchShape:
    """deform_conv_fused_forward over ``images`` images: grid (pixel tiles of TILE_N,
    groups * output-channel tiles of TILE_M, images), THREADS threads."""
    pixels = geom.out_h * geom.out_w
    units = geom.groups * _ceil_div(outputs_per_group(geom), TILE_M)
    return LaunchShape(
        FORWARD_KERNEL,
        (max(1, _ceil_div(pixels, TILE_N)), _yz(units), _yz(images)),
        (THREADS, 1, 1),
        FORWARD_SHARED_BYTES,
        images * geom.out_channels * pixels,
        _sizes(geom, images, channels_padded=channels_padded(geom)),
    )


def grad_weight_splits(geom: ConvGeometry, images: int) -> int:
    """Splits of the images' pixel slices for grad_weight: enough blocks for about
    TARGET_WEIGHT_BLOCKS, at least MIN_SLICES_PER_SPLIT slices each (at least 1, at most
    65535)."""
    slices = images * _ceil_div(geom.out_h * geom.out_w, SLICE)
    tiles = _weight_tiles(geom)
    by_blocks = _ceil_div(TARGET_WEIGHT_BLOCKS, tiles)
    by_slices = max(1, slices // MIN_SLICES_PER_SPLIT)
    return max(1, min(by_blocks, by_slices, MAX_GRID_YZ))


def _weight_tiles(geom: ConvGeometry) -> int:
    columns = geom.taps * _ceil_div(channels_per_group(geom), TILE_N)
    return columns * geom.groups * _ceil_div(outputs_per_group(geom), TILE_M)


def grad_weight_shape(geom: ConvGeometry, images: int, splits: int | None = None) -> LaunchShape:
    """deform_conv_fused_grad_weight over ``images`` images: grid (K * channel tiles of
    TILE_N, groups * output-channel tiles of TILE_M, splits), THREADS threads."""
    splits = grad_weight_splits(geom, images) if splits is None else int(splits)
    if not 1 <= splits <= MAX_GRID_YZ:
        raise ValueError(f"splits must be in 1..{MAX_GRID_YZ}; got {splits}")
    columns = geom.taps * _ceil_div(channels_per_group(geom), TILE_N)
    units = geom.groups * _ceil_div(outputs_per_group(geom), TILE_M)
    return LaunchShape(
        WEIGHT_KERNEL,
        (max(1, columns), _yz(units), splits),
        (THREADS, 1, 1),
        WEIGHT_SHARED_BYTES,
        images * geom.out_h * geom.out_w * geom.out_channels,
        _sizes(geom, images),
    )


def launch_shapes(geom: ConvGeometry, images: int | None = None) -> tuple[LaunchShape, ...]:
    """The launches of a forward (packing, forward) and of a grad_weight, without
    launching."""
    images = geom.batch if images is None else images
    return (pack_weight_shape(geom), forward_shape(geom, images), grad_weight_shape(geom, images))


def _check(geom: ConvGeometry, types: KernelTypes) -> None:
    if types.dtype_name not in DTYPES:
        raise ValueError(
            f"the fused kernels compute {DTYPES}; got {types.dtype_name} (fused_supports)"
        )
    if not fused_supports(geom, types.dtype_name):
        raise ValueError(
            f"the channels of a weight group touch more than {MAX_OFFSET_GROUPS} offset "
            "groups: the fused kernels do not support this geometry (fused_supports)"
        )
    if types.index_bits not in (32, 64):
        raise ValueError(f"index_bits must be 32 or 64; got {types.index_bits!r}")
    if types.index_bits == 32 and fused_index_bits(geom) == 64:
        raise ValueError(
            "the fused kernels need 64-bit indices for this geometry (a tensor exceeds "
            f"{INT32_INDEX_LIMIT} elements); use fused_index_bits(geom)"
        )


def _launch(launcher: KernelLauncher, types: KernelTypes, geom, shape: LaunchShape, **arrays):
    explicit = {} if shape.grid_stride else {"grid": shape.grid, "block": shape.block}
    launch_kernel(
        launcher,
        shape.kernel,
        types.dtype_name,
        types.index_bits,
        shape.total,
        geom,
        shape.sizes,
        **explicit,
        **arrays,
    )


def launch_pack_weight(
    launcher: KernelLauncher, types: KernelTypes, geom: ConvGeometry, *, weight, weight_packed
) -> None:
    """weight_packed (:func:`packed_weight_shape`, element dtype) from weight [C_out,
    C / groups, kh, kw]."""
    _launch(
        launcher, types, geom, pack_weight_shape(geom), weight=weight, weight_packed=weight_packed
    )


def launch_fused_forward(
    launcher: KernelLauncher,
    types: KernelTypes,
    geom: ConvGeometry,
    *,
    input,
    offset,
    weight,
    bias,
    mask,
    output,
    weight_packed=None,
) -> None:
    """output [n, C_out, H_out, W_out] (element dtype) = deform_conv2d of input [n, C, H,
    W], offset, mask (None: DCNv1) of the same n images, weight [C_out, C / groups, kh,
    kw] and bias [C_out] (or None); n = input.shape[0]. All C-contiguous arrays of
    ``launcher.xp`` in ``types.dtype_name``.

    The weight is first packed (:func:`launch_pack_weight`) into a workspace buffer of
    :func:`packed_weight_shape` (C_out * K * channels_padded elements, reported as
    workspace), unless ``weight_packed`` (that shape, already packed: e.g. kept across the
    chunks of one call) is given. Then one launch of :func:`forward_shape`."""
    _check(geom, types)
    images = int(input.shape[0])
    if images == 0:
        return
    if weight_packed is None:
        weight_packed = workspace_empty(launcher, packed_weight_shape(geom), weight.dtype)
        launch_pack_weight(launcher, types, geom, weight=weight, weight_packed=weight_packed)
    _launch(
        launcher,
        types,
        geom,
        forward_shape(geom, images),
        input=input,
        offset=offset,
        mask=mask,
        weight_packed=weight_packed,
        bias=bias,
        output=output,
    )


def launch_fused_grad_weight(
    launcher: KernelLauncher,
    types: KernelTypes,
    geom: ConvGeometry,
    *,
    grad_output,
    input,
    offset,
    mask,
    grad_weight_acc,
    splits: int | None = None,
) -> None:
    """grad_weight_acc [groups, C_out / groups, C / groups * K] (float32, the weight's
    memory order) += sum over the n images (n = input.shape[0]) and their pixels of
    grad_output [n, C_out, H_out, W_out] @ columns^T, with float32 atomics (zero it first
    for the gradient itself). ``splits``: of the pixels (grid.z; default
    :func:`grad_weight_splits`); with more than one the additions' order, and so the
    rounding, depends on the scheduling. grad_bias is not computed here (a sum of
    grad_output over images and pixels)."""
    _check(geom, types)
    images = int(input.shape[0])
    if images == 0:
        return
    _launch(
        launcher,
        types,
        geom,
        grad_weight_shape(geom, images, splits),
        grad_output=grad_output,
        input=input,
        offset=offset,
        mask=mask,
        grad_weight=grad_weight_acc,
    )
