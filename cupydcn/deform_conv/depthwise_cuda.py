"""deform_conv2d on CUDA for few input channels per weight group (depthwise and
channel-multiplier convolutions): direct kernels, no column buffer, no GEMM.

The generic path (:mod:`cupydcn.deform_conv.cuda_backend`) samples a column buffer of
``C * K`` rows per image and multiplies it by the weight in one GEMM per weight group.
With ``groups == C`` those are ``C`` GEMMs of ``mult x K`` by ``K x P``: tiny, and the
column buffer is ``K`` times the input. Here each output element is summed in registers
straight from the sampled input, and the gradients are formed from ``grad_output``
without a column-gradient buffer. The kernels are in
``cupydcn/cuda/kernels/deform_conv_depthwise.cu``; the results are those of
docs/semantics.md §1 with the column values rounded once to the element dtype (§6.1), as
the generic path has them.

When it applies (:func:`depthwise_applies`), with ``cg = C / groups`` input and ``mult =
C_out / groups`` output channels per weight group::

    cg == 1 (depthwise, any channel multiplier)   or   cg <= 4 and mult <= 4

The kernels are correct for every geometry; the rule is where they beat im2col + GEMM.
Each column value is sampled once per chunk of 4 output channels of its group (so
``ceil(mult / 4)`` times: once up to mult = 4), and an output costs ``cg * K``
multiply-adds on CUDA cores, which for large ``cg * mult`` is the GEMM's job.

Launch plan (N batch, C / C_out channels, G offset groups, cpg = C / G, K = kh * kw taps,
P = H_out * W_out output pixels; 256-thread blocks; kernel size 3 x 3 specialised, every
other size generic)::

    forward         grid-stride 1-D over N * ceil(groups / r) * P threads (pixels
                    fastest), r = groups_per_thread(geom) in 1..8 consecutive weight
                    groups of one offset group per thread: the K points located once per
                    thread (3 x 3: kept in registers), per group cg * K samples shared by
                    up to 4 output channels; writes r * mult outputs.
    backward_data   explicit grid: one block per (image, offset group, tap, tile of
                    32 * 8 / S pixels), 8 warps = S channel slices x 8 / S pixel tiles
                    (S = channel_slices(geom), up to 8, >= 8 channels a slice); a thread
                    locates its point once and walks cpg / S channels: mult FMAs for the
                    column gradient, 4 gathers, 4 float atomics into grad_input; the
                    slices' offset and mask sums are added through 3 * 8 * 32 values of
                    shared memory and written once (no atomics).
    backward_weight explicit grid: units * S blocks, units = groups * ceil(mult / 4) * cg
                    * kh (3 x 3: a row of kw taps per unit) or * K (generic); a block's
                    threads stride over the unit's N * P pixels (S splits when the units
                    alone do not fill the GPU), then shuffle + shared-memory reduction and
                    one atomic per block and result element (grad_weight, grad_bias).

Resources (NVRTC 13, float32 / float16 / bfloat16 with 32-bit indices, sm_80 and sm_90):
forward 3 x 3 125-128 registers, generic 48; backward_data 64 registers, 3 KiB shared
(6 KiB for float64); backward_weight 60-64 registers, 512 B shared. No spills, no stack.

Per output element of a 3 x 3 depthwise layer (cg = mult = 1, float32, G = 1, r = 8):
the forward reads 9 * 4 input values (L1 / L2 gathers; the input itself once from
DRAM), 27 / 8 offset and mask values and 9 weights (broadcast), writes 4 bytes; about
9 * 16 FLOPs for the blends and FMAs plus 9 * 30 / 8 per point. The backward per
(channel, tap, pixel): 1 grad_output load, 4 gathers, 4 atomics and ~30 FLOPs (data
kernel), and the forward's sampling once more (weight kernel).

Predicted on an H200 (no GPU was available when this was written: estimates, not
measurements) for the benchmark shape S7 (N 16, C = C_out = groups 512, 28 x 28, 3 x 3,
G 1; float32): the forward moves ~53 MB through DRAM (input and output 25.7 MB each,
offsets and mask 1.4 MB: 11 us at 4.8 TB/s) but issues ~58 M samples (0.23 G gathers,
~1.4 G instructions), so it is bound by L1 / LSU throughput and issue: predicted 40-75
us. The backward is bound by the 0.23 G float atomics into grad_input (as torchvision's
col2im, but issued by warps of 32 consecutive pixels, whose atomics fall in few 32-byte
sectors): predicted 0.15-0.4 ms for the data kernel plus ~the forward's time for the
weight kernel. torchvision samples the same points into a 231 MB column buffer and runs
512 tiny GEMMs per image chunk (forward; twice that and col2im / col2im_coord backward):
a few milliseconds each way, so >= 20x is predicted for the forward and ~10-30x for the
backward. The shape N 8, C 256, groups 256, 64 x 64 has 1.3 times S7's samples.

Workspace: none. Besides the results, only the accumulation-dtype accumulators of
grad_input, grad_weight and grad_bias are allocated (zeroed, summed with atomics): for
float32 and float64 they are the results, for the half types rounded once into them.
"""

from __future__ import annotations

from cupydcn.cuda.launch import (
    INT32_INDEX_LIMIT,
    KernelLauncher,
    KernelTypes,
    index_bits_for_sizes,
    launch_kernel,
    report_array_operation,
    round_to_dtype,
)
from cupydcn.deform_conv.padding import PADDING_MODE_CODES
from cupydcn.deform_conv.spec import GRADIENT_NAMES, ConvGeometry, ConvGrads

SOURCE_FILE = "deform_conv_depthwise.cu"
FORWARD_KERNEL = "deform_conv_depthwise_forward"
DATA_KERNEL = "deform_conv_depthwise_backward_data"
WEIGHT_KERNEL = "deform_conv_depthwise_backward_weight"

# Kernel sizes with a specialisation of the file (taps unrolled, points in registers);
# every other size runs the generic (0, 0) one.
SPECIALISED_KERNEL_SIZES: tuple[tuple[int, int], ...] = ((3, 3),)
GENERIC_KERNEL_SIZE = (0, 0)

# The applicability rule (module docstring).
MAX_CHANNELS_PER_GROUP = 4
MAX_MULTIPLIER = 4
# Output channels of a group the kernels sum together (OUTPUTS_PER_PASS of the .cu file).
OUTPUTS_PER_PASS = 4

# Forward: at most this many weight groups per thread (their points located once), and
# fewer while the launch would have fewer threads than this.
MAX_GROUPS_PER_THREAD = 8
MIN_FORWARD_THREADS = 1 << 17
# Weight gradient: enough blocks to fill a large GPU, and at least this many pixels per
# thread before the pixels are split further.
TARGET_WEIGHT_BLOCKS = 1024
MIN_PIXELS_PER_THREAD = 4
# Input / offset / mask gradients: a block's 8 warps split an offset group's channels into
# up to 8 slices, each of at least this many channels.
MAX_CHANNEL_SLICES = 8
MIN_CHANNELS_PER_SLICE = 8
# The backward kernels' blocks (at most DEPTHWISE_MAX_WARPS = 8 warps in the .cu file).
BACKWARD_BLOCK = 256


def depthwise_applies(geom: ConvGeometry) -> bool:
    """Whether deform_conv2d of ``geom`` runs on the depthwise kernels: ``C / groups == 1``
    (any channel multiplier), or ``C / groups <= 4`` and ``C_out / groups <= 4``."""
    channels_per_group = geom.in_channels // geom.groups
    multiplier = geom.out_channels // geom.groups
    if channels_per_group == 1:
        return True
    return channels_per_group <= MAX_CHANNELS_PER_GROUP and multiplier <= MAX_MULTIPLIER


def kernel_size_specialisation(geom: ConvGeometry) -> tuple[int, int]:
    """The template arguments (kernel_h, kernel_w) of the file's kernels for ``geom``:
    its kernel size when specialised, else the generic (0, 0)."""
    size = (geom.kernel_h, geom.kernel_w)
    return size if size in SPECIALISED_KERNEL_SIZES else GENERIC_KERNEL_SIZE


def depthwise_index_bits(geom: ConvGeometry) -> int:
    """32 when every tensor and every launch of the depthwise kernels for ``geom`` stays
    within 32-bit grid-stride indexing, else 64."""
    pixels = geom.out_h * geom.out_w
    units, pixel_threads = weight_launch(geom, want_weight=True)
    return index_bits_for_sizes(
        geom.batch * geom.in_channels * geom.height * geom.width,
        geom.batch * 2 * geom.offset_groups * geom.taps * pixels,
        geom.batch * geom.out_channels * pixels,
        units * pixel_threads,
    )


def groups_per_thread(geom: ConvGeometry) -> int:
    """Weight groups per forward thread: a power of two up to MAX_GROUPS_PER_THREAD that
    divides the groups sharing an offset group (their points are located once per
    thread), halved while the launch has fewer than MIN_FORWARD_THREADS threads; 1 for
    the generic kernel size (it locates points per channel anyway)."""
    if kernel_size_specialisation(geom) == GENERIC_KERNEL_SIZE:
        return 1
    channels_per_group = geom.in_channels // geom.groups
    channels_per_offset_group = geom.in_channels // geom.offset_groups
    sharing = (
        channels_per_offset_group // channels_per_group
        if channels_per_offset_group % channels_per_group == 0
        else 1
    )
    count = 1
    while count * 2 <= MAX_GROUPS_PER_THREAD and sharing % (count * 2) == 0:
        count *= 2
    pixels = geom.batch * geom.out_h * geom.out_w
    while count > 1 and pixels * -(-geom.groups // count) < MIN_FORWARD_THREADS:
        count //= 2
    return count


def weight_launch(geom: ConvGeometry, *, want_weight: bool) -> tuple[int, int]:
    """(units, pixel_threads) of the weight-gradient kernel: its units (module docstring;
    output-channel chunks only for grad_bias alone) and the threads sharing each unit's
    N * P pixels, a multiple of BACKWARD_BLOCK."""
    chunks = -(-(geom.out_channels // geom.groups) // OUTPUTS_PER_PASS)
    units = geom.groups * chunks
    if want_weight:
        specialised = kernel_size_specialisation(geom) != GENERIC_KERNEL_SIZE
        tap_units = geom.kernel_h if specialised else geom.taps
        units *= (geom.in_channels // geom.groups) * tap_units
    items = geom.batch * geom.out_h * geom.out_w
    by_pixels = -(-items // (BACKWARD_BLOCK * MIN_PIXELS_PER_THREAD))
    by_blocks = -(-TARGET_WEIGHT_BLOCKS // units)
    splits = max(1, min(by_pixels, by_blocks))
    return units, splits * BACKWARD_BLOCK


def channel_slices(geom: ConvGeometry) -> int:
    """Channel slices of the input / offset / mask gradient kernel: a power of two up to
    MAX_CHANNEL_SLICES, with at least MIN_CHANNELS_PER_SLICE channels of an offset group
    per slice (1 when the groups are small)."""
    channels = geom.in_channels // geom.offset_groups
    slices = 1
    while slices * 2 <= MAX_CHANNEL_SLICES and channels // (slices * 2) >= MIN_CHANNELS_PER_SLICE:
        slices *= 2
    return slices


def data_launch(geom: ConvGeometry) -> tuple[int, int]:
    """(blocks, channel_slices) of the input / offset / mask gradient kernel: one block
    per (image, offset group, tap, tile of 32 * 8 / channel_slices output pixels)."""
    slices = channel_slices(geom)
    tile = 32 * (BACKWARD_BLOCK // 32 // slices)
    tiles = -(-(geom.out_h * geom.out_w) // tile)
    return geom.batch * geom.offset_groups * geom.taps * tiles, slices


def _check_types(geom: ConvGeometry, types: KernelTypes) -> None:
    if types.index_bits not in (32, 64):
        raise ValueError(f"index_bits must be 32 or 64; got {types.index_bits!r}")
    if types.index_bits == 32 and depthwise_index_bits(geom) == 64:
        raise ValueError(
            "the depthwise kernels need 64-bit indices for this geometry (a tensor or launch "
            f"exceeds {INT32_INDEX_LIMIT} elements); use depthwise_index_bits(geom)"
        )


def _sizes(geom: ConvGeometry, **extra: int) -> dict[str, int]:
    """The size arguments the geometry does not name as the kernels do."""
    return dict(
        padding_mode=PADDING_MODE_CODES[geom.padding_mode],
        **extra,
    )


def depthwise_forward(
    launcher: KernelLauncher,
    types: KernelTypes,
    geom: ConvGeometry,
    input,
    offset,
    weight,
    bias,
    mask,
):
    """The output [N, C_out, H_out, W_out] of deform_conv2d, in the element dtype.

    input [N, C, H, W], offset [N, 2*G*kh*kw, H_out, W_out], weight [C_out, C/groups, kh,
    kw], bias [C_out] or None, mask [N, G*kh*kw, H_out, W_out] or None: C-contiguous
    arrays of ``launcher.xp`` in ``types.dtype_name``. Each element is summed in the
    accumulation dtype and rounded once. One kernel launch; no workspace.
    """
    _check_types(geom, types)
    output = launcher.xp.empty(geom.output_shape, dtype=input.dtype)
    if geom.batch == 0:
        return output
    per_thread = groups_per_thread(geom)
    threads = geom.batch * -(-geom.groups // per_thread) * geom.out_h * geom.out_w
    launch_kernel(
        launcher,
        FORWARD_KERNEL,
        types.dtype_name,
        types.index_bits,
        threads,
        geom,
        _sizes(geom, groups_per_thread=per_thread),
        template_args=kernel_size_specialisation(geom),
        input=input,
        offset=offset,
        mask=mask,
        weight=weight,
        bias=bias,
        output=output,
    )
    return output


def depthwise_backward(
    launcher: KernelLauncher,
    types: KernelTypes,
    geom: ConvGeometry,
    grad_output,
    input,
    offset,
    weight,
    mask,
    *,
    wrt: frozenset[str],
) -> ConvGrads:
    """The gradients of deform_conv2d named in ``wrt`` (of "input", "offset", "weight",
    "mask", "bias"; grad_mask only with a mask), the others None.

    grad_output [N, C_out, H_out, W_out]; the other arrays as :func:`depthwise_forward`
    takes them. Results in the element dtype, each rounded once: grad_input [N, C, H, W]
    and grad_weight [C_out, C/groups, kh, kw], grad_bias [C_out] are summed with atomics
    in accumulation-dtype arrays (the results themselves for float32 / float64);
    grad_offset and grad_mask are written once per element. At most two kernel
    launches (and a rounding launch per half-type accumulator); no workspace.
    """
    unknown = set(wrt) - set(GRADIENT_NAMES)
    if unknown:
        raise ValueError(f"wrt may only name {GRADIENT_NAMES}; got {sorted(unknown)}")
    _check_types(geom, types)
    xp = launcher.xp
    dtype = input.dtype
    want_mask = "mask" in wrt and mask is not None

    def accumulator(name: str, shape):
        if name not in wrt:
            return None
        report_array_operation("zeros")
        return xp.zeros(shape, dtype=types.acc_dtype)

    grad_input = accumulator("input", geom.input_shape)
    grad_offset = xp.empty(geom.offset_shape, dtype=dtype) if "offset" in wrt else None
    grad_mask = xp.empty(geom.mask_shape, dtype=dtype) if want_mask else None
    grad_weight = accumulator("weight", geom.weight_shape)
    grad_bias = accumulator("bias", (geom.out_channels,))
    template_args = kernel_size_specialisation(geom)

    if geom.batch > 0 and (grad_input is not None or grad_offset is not None or want_mask):
        blocks, slices = data_launch(geom)
        launch_kernel(
            launcher,
            DATA_KERNEL,
            types.dtype_name,
            types.index_bits,
            blocks * BACKWARD_BLOCK,
            geom,
            _sizes(geom, channel_slices=slices),
            template_args=template_args,
            grid=(blocks, 1, 1),
            block=(BACKWARD_BLOCK, 1, 1),
            grad_output=grad_output,
            input=input,
            offset=offset,
            mask=mask,
            weight=weight,
            grad_input=grad_input,
            grad_offset=grad_offset,
            grad_mask=grad_mask,
        )
    if geom.batch > 0 and (grad_weight is not None or grad_bias is not None):
        units, pixel_threads = weight_launch(geom, want_weight=grad_weight is not None)
        blocks = units * pixel_threads // BACKWARD_BLOCK
        launch_kernel(
            launcher,
            WEIGHT_KERNEL,
            types.dtype_name,
            types.index_bits,
            units * pixel_threads,
            geom,
            _sizes(geom, pixel_threads=pixel_threads),
            template_args=template_args,
            grid=(blocks, 1, 1),
            block=(BACKWARD_BLOCK, 1, 1),
            grad_output=grad_output,
            input=input,
            offset=offset,
            mask=mask,
            grad_weight=grad_weight,
            grad_bias=grad_bias,
        )

    def rounded(accumulator):
        if accumulator is None:
            return None
        return round_to_dtype(launcher, types.dtype_name, types.index_bits, accumulator, dtype)

    return ConvGrads(
        grad_input=rounded(grad_input),
        grad_offset=grad_offset,
        grad_weight=rounded(grad_weight),
        grad_mask=grad_mask,
        grad_bias=rounded(grad_bias),
    )
