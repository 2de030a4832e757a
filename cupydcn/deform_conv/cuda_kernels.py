"""Launches of deform_conv2d's sampling kernels (cupydcn/cuda/kernels/deform_conv.cu): the
specialisation, launch shape and arguments of each, so the orchestration
(:mod:`cupydcn.deform_conv.cuda_backend`) only says what to compute.

Layouts are those of deform_conv.cu (n = ``images``, K taps, S = pixels of the launch's
range ``pixels`` = (start, count), default the whole image). Every kernel is compiled per
specialisation (kernel_h, kernel_w, padding_mode code) of ``FILE_SPECIALISATIONS`` (zeros:
1x1, 3x3, 5x5 and any size; border and reflection: any size), :func:`conv_specialisation`
picks one; launches have explicit grids (x: pixels or tiles, y: channel slabs or (group,
tap) pairs, capped at 65535 and looped past in the kernel, z: images, likewise) except the
grid-stride fallback of grad_input. :func:`launch_shapes` reports them.

Predicted figures (per kernel, N = 8, C = 256, 64 x 64 output, 3x3, stride 1, G = 1,
float32: E = N C K P = 75.5 M column elements, 302 MB of columns; "before" = the
one-thread-per-item kernels these replace). Nothing here is measured.

* im2col: writes E * sizeof(T) (302 MB; 151 MB for half types, whose columns are T now),
  reads the input (34 MB) and offsets and mask (3.5 MB) from DRAM once; from L2 the
  offsets and mask 3 / 8 loads per element (113 MB, before 3 per element: 906 MB).
  10 FLOPs per element (blend, mask). Integer work: one division per thread for (oy, ox)
  and one for the slab's group (before 7 to 9 per item), a located point (about 40
  instructions) shared by the 8 channels of a slab, per element about 6 (corner
  addresses, predicates). Expected bound: DRAM writes, about 0.1 ms on an H100; issue
  about half of that.
* col2im_input (tiled): reads grad_columns (302 MB) and offsets and mask; 4 shared-memory
  atomics per element (302 M, on the SM), global float atomics about 1.5 per input
  element and channel (13 M; before 4 per element, 302 M to L2, the bound). Expected
  bound: the grad_columns read and the shared atomics' issue, about 0.1 to 0.2 ms.
  The grid-stride fallback (windows that do not fit shared memory) keeps the 302 M global
  atomics.
* col2im_coord: reads grad_columns (302 MB) and gathers 4 corners per element (from L1 /
  L2), about 20 FLOPs per element (value and two derivatives); writes 3.5 MB. One point
  per (group, tap, pixel), divisions by K constant when specialised. Expected bound:
  the grad_columns read, about 0.1 ms.
"""

from __future__ import annotations

from typing import NamedTuple

from cupydcn.core.dtypes import DTYPES, numpy_dtype
from cupydcn.cuda.kernel_source import specialisations
from cupydcn.cuda.launch import KernelLauncher, KernelTypes, launch_config, launch_kernel
from cupydcn.deform_conv.padding import PADDING_MODE_CODES
from cupydcn.deform_conv.spec import ConvGeometry

SOURCE_FILE = "deform_conv.cu"
# Constants of deform_conv.cu: channels per im2col thread (kIm2colSlab), the shared
# accumulator of the tiled grad_input (kWindowBytes), threads per block at most
# (kMaxThreads, the size of col2im_coord's reduction buffer).
IM2COL_SLAB = 8
WINDOW_BYTES = 24576
MAX_THREADS = 256
# CUDA's limit on grid.y and grid.z; the kernels loop past it.
MAX_GRID_YZ = 65535
# Channels per block of the tiled grad_input at most (the window holds one plane each).
TILED_MAX_SLAB = 8
# Window margins tried, in pixels beyond the undeformed footprint: samples with offsets
# within it land in shared memory, the others go to global atomics.
HALOS = (2, 1, 0)
# Tiles (width, height) of output pixels tried for the tiled grad_input, largest first
# (each clipped to the range's rows and the output width): a larger tile shares more of
# its window with its neighbours' samples.
TILES = ((32, 8), (16, 16), (32, 4), (16, 8), (8, 16), (8, 8), (16, 4), (8, 4))
# col2im_coord splits the channels of a pixel over up to this many threads when fewer
# than COORD_TARGET_THREADS (image, group, tap, pixel) items would run otherwise.
COORD_MAX_SPLIT = 8
COORD_TARGET_THREADS = 1 << 17


class LaunchShape(NamedTuple):
    """One kernel launch: the kernel, its template arguments after <T, I> (kernel_h,
    kernel_w, padding_mode code), grid and block (x, y, z), the static shared memory of
    the kernel in bytes, the work items (reported as the launch's total), and the size
    arguments besides the geometry's (by parameter name). ``grid_stride``: launched as a
    1-D grid-stride kernel (the launcher's configuration; grid and block here are
    :func:`~cupydcn.cuda.launch.launch_config`'s)."""

    kernel: str
    template_args: tuple[int, int, int]
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    total: int
    sizes: dict
    grid_stride: bool = False


class Tiling(NamedTuple):
    """The tiled grad_input's blocks: tile_w x tile_h output pixels (the block's threads),
    ``slab`` channels of one offset group, a window margin of ``halo`` pixels."""

    tile_w: int
    tile_h: int
    halo: int
    slab: int


def column_dtype(launcher: KernelLauncher, types: KernelTypes):
    """The dtype of the column buffer deform_conv_im2col writes: the element dtype (for
    half types each value is computed in float32 and rounded once), so the GEMMs take
    columns, weight and grad_output as they are."""
    return numpy_dtype(types.dtype_name)


def conv_specialisation(geom: ConvGeometry) -> tuple[int, int, int]:
    """(kernel_h, kernel_w, padding_mode code) of the module for ``geom``: its kernel size
    where deform_conv.cu has that specialisation for its padding mode, else (0, 0, code),
    the any-size kernels."""
    code = PADDING_MODE_CODES[geom.padding_mode]
    exact = (geom.kernel_h, geom.kernel_w, code)
    return exact if exact in specialisations(SOURCE_FILE) else (0, 0, code)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _acc_itemsize(dtype_name: str) -> int:
    return 8 if DTYPES[dtype_name].acc_name == "float64" else 4


def _range(geom: ConvGeometry, pixels: tuple[int, int] | None) -> tuple[int, int]:
    return (0, geom.out_h * geom.out_w) if pixels is None else (int(pixels[0]), int(pixels[1]))


def conv_sizes(
    geom: ConvGeometry, images: int, pixels: tuple[int, int] | None = None
) -> dict[str, int]:
    """The size overrides of a deform_conv.cu kernel over ``images`` images and the output
    pixel range ``pixels`` = (start, count) (default: all): the rest of its size
    arguments are the geometry's."""
    start, count = _range(geom, pixels)
    return dict(
        batch=images,
        channels=geom.in_channels,
        padding_mode=PADDING_MODE_CODES[geom.padding_mode],
        pixel_start=start,
        pixel_count=count,
    )


def _yz(count: int) -> int:
    """A grid.y / grid.z extent for ``count`` (>= 1) units: the kernels loop past it."""
    return max(1, min(count, MAX_GRID_YZ))


def im2col_shape(
    geom: ConvGeometry, dtype_name: str, images: int, pixels: tuple[int, int] | None = None
) -> LaunchShape:
    """deform_conv_im2col over ``images`` images and the output pixel range ``pixels``:
    block (pixels, slabs) of at most MAX_THREADS threads, grid (pixel blocks, slab
    blocks, images); a slab is IM2COL_SLAB channels of one offset group."""
    _, count = _range(geom, pixels)
    slabs = geom.offset_groups * _ceil_div(geom.in_channels // geom.offset_groups, IM2COL_SLAB)
    bx = max(1, min(MAX_THREADS, _ceil_div(count, 32) * 32))
    by = max(1, min(MAX_THREADS // bx, slabs))
    return LaunchShape(
        "deform_conv_im2col",
        conv_specialisation(geom),
        (max(1, _ceil_div(count, bx)), _yz(_ceil_div(slabs, by)), _yz(images)),
        (bx, by, 1),
        0,
        images * geom.in_channels * count,
        conv_sizes(geom, images, pixels),
    )


def _window_extent(tile: int, stride: int, dilation: int, kernel: int, halo: int, size: int):
    """Rows (or columns) of the tiled grad_input's window for a tile of ``tile`` output
    rows: the undeformed footprint, ``halo`` on each side and the cell's second corner
    (scatter_window of deform_conv.cu), at most the map's ``size``."""
    return min((tile - 1) * stride + (kernel - 1) * dilation + 2 * halo + 2, size)


def col2im_tiling(
    geom: ConvGeometry, dtype_name: str, pixels: tuple[int, int] | None = None
) -> Tiling | None:
    """The tiled grad_input's tiling for ``geom`` and the pixel range, or None where no
    window fits WINDOW_BYTES (the grid-stride kernel then runs). Prefers the widest halo,
    then the largest tile, whose slab holds at least min(C / G, 4) channels; failing
    that, any slab of one channel or more."""
    start, count = _range(geom, pixels)
    capacity = WINDOW_BYTES // _acc_itemsize(dtype_name)
    per_group = geom.in_channels // geom.offset_groups
    rows = (start + count - 1) // geom.out_w - start // geom.out_w + 1
    tiles = []
    for tile_w, tile_h in TILES:
        tile = (min(tile_w, _pow2_at_least(geom.out_w)), min(tile_h, _pow2_at_least(rows)))
        if tile not in tiles:
            tiles.append(tile)
    for need in (min(per_group, 4), 1):
        for halo in HALOS:
            for tile_w, tile_h in tiles:
                area = _window_extent(
                    tile_h, geom.stride_h, geom.dil_h, geom.kernel_h, halo, geom.height
                ) * _window_extent(
                    tile_w, geom.stride_w, geom.dil_w, geom.kernel_w, halo, geom.width
                )
                slab = min(per_group, TILED_MAX_SLAB, capacity // max(area, 1))
                if slab >= need:
                    return Tiling(tile_w, tile_h, halo, slab)
    return None


def col2im_input_shape(
    geom: ConvGeometry,
    dtype_name: str,
    images: int,
    pixels: tuple[int, int] | None = None,
    *,
    tiling: Tiling | None | str = "auto",
) -> LaunchShape:
    """The grad_input kernel over ``images`` images and the pixel range: the tiled one
    with ``tiling`` (default :func:`col2im_tiling`'s), block (tile_w, tile_h), grid
    (tiles of the range's rows, slabs, images); or, with ``tiling=None`` or where no
    window fits, the grid-stride deform_conv_col2im_input."""
    start, count = _range(geom, pixels)
    if tiling == "auto":
        tiling = col2im_tiling(geom, dtype_name, pixels)
    sizes = conv_sizes(geom, images, pixels)
    total = images * geom.column_rows * count
    if tiling is None:
        blocks, threads = launch_config(total)
        return LaunchShape(
            "deform_conv_col2im_input",
            conv_specialisation(geom),
            (blocks, 1, 1),
            (threads, 1, 1),
            0,
            total,
            sizes,
            grid_stride=True,
        )
    rows = (start + count - 1) // geom.out_w - start // geom.out_w + 1
    tiles = _ceil_div(rows, tiling.tile_h) * _ceil_div(geom.out_w, tiling.tile_w)
    slabs = geom.offset_groups * _ceil_div(geom.in_channels // geom.offset_groups, tiling.slab)
    return LaunchShape(
        "deform_conv_col2im_input_tiled",
        conv_specialisation(geom),
        (max(1, tiles), _yz(slabs), _yz(images)),
        (tiling.tile_w, tiling.tile_h, 1),
        WINDOW_BYTES,
        total,
        {**sizes, "channel_slab": tiling.slab, "halo": tiling.halo},
    )


def col2im_coord_shape(
    geom: ConvGeometry, dtype_name: str, images: int, pixels: tuple[int, int] | None = None
) -> LaunchShape:
    """deform_conv_col2im_coord over ``images`` images and the pixel range: block (pixels,
    channel split), grid (pixel blocks, G * K (group, tap) pairs, images); the channels of
    a pixel are split over up to COORD_MAX_SPLIT threads when the items are few."""
    _, count = _range(geom, pixels)
    units = geom.offset_groups * geom.taps
    per_group = geom.in_channels // geom.offset_groups
    items = images * units * count
    split = 1
    while (
        split < COORD_MAX_SPLIT and items * split < COORD_TARGET_THREADS and per_group >= 16 * split
    ):
        split *= 2
    bx = max(1, min(MAX_THREADS // split, _ceil_div(count, 32) * 32))
    return LaunchShape(
        "deform_conv_col2im_coord",
        conv_specialisation(geom),
        (max(1, _ceil_div(count, bx)), _yz(units), _yz(images)),
        (bx, split, 1),
        3 * MAX_THREADS * _acc_itemsize(dtype_name),
        items,
        conv_sizes(geom, images, pixels),
    )


def launch_shapes(
    geom: ConvGeometry, dtype_name: str, images: int, pixels: tuple[int, int] | None = None
) -> tuple[LaunchShape, ...]:
    """The launches of the three sampling kernels for ``images`` images and the pixel
    range (im2col, grad_input, col2im_coord), without launching: kernel, template
    arguments, grid, block, shared memory bytes."""
    return (
        im2col_shape(geom, dtype_name, images, pixels),
        col2im_input_shape(geom, dtype_name, images, pixels),
        col2im_coord_shape(geom, dtype_name, images, pixels),
    )


def launch_shaped(
    launcher: KernelLauncher, types: KernelTypes, geom: ConvGeometry, shape: LaunchShape, **arrays
) -> None:
    """Launches ``shape`` with its pointer arguments by name (``arrays``)."""
    explicit = {} if shape.grid_stride else {"grid": shape.grid, "block": shape.block}
    launch_kernel(
        launcher,
        shape.kernel,
        types.dtype_name,
        types.index_bits,
        shape.total,
        geom,
        shape.sizes,
        template_args=shape.template_args,
        **explicit,
        **arrays,
    )


def launch_im2col(
    launcher: KernelLauncher,
    types: KernelTypes,
    geom: ConvGeometry,
    *,
    input,
    offset,
    mask,
    columns,
    images: int,
    pixels: tuple[int, int] | None = None,
) -> None:
    """columns [images, C*K, S] (dtype :func:`column_dtype`) of input [images, C, H, W],
    offset and mask (None for DCNv1) of the same images."""
    launch_shaped(
        launcher,
        types,
        geom,
        im2col_shape(geom, types.dtype_name, images, pixels),
        input=input,
        offset=offset,
        mask=mask,
        columns=columns,
    )


def launch_col2im_input(
    launcher: KernelLauncher,
    types: KernelTypes,
    geom: ConvGeometry,
    *,
    grad_columns,
    offset,
    mask,
    grad_input,
    images: int,
    pixels: tuple[int, int] | None = None,
) -> None:
    """grad_input [images, C, H, W] (accumulation dtype) += the bilinear scatter of
    grad_columns [images, C*K, S] (accumulation dtype) times the mask."""
    launch_shaped(
        launcher,
        types,
        geom,
        col2im_input_shape(geom, types.dtype_name, images, pixels),
        grad_columns=grad_columns,
        offset=offset,
        mask=mask,
        grad_input=grad_input,
    )


def launch_col2im_coord(
    launcher: KernelLauncher,
    types: KernelTypes,
    geom: ConvGeometry,
    *,
    grad_columns,
    input,
    offset,
    mask,
    grad_offset,
    grad_mask,
    images: int,
    pixels: tuple[int, int] | None = None,
) -> None:
    """grad_offset [images, G*2K, out_h, out_w] and grad_mask [images, G*K, out_h, out_w]
    (element dtype; either None when not wanted; only the range's pixels written) from
    grad_columns [images, C*K, S] and the input."""
    launch_shaped(
        launcher,
        types,
        geom,
        col2im_coord_shape(geom, types.dtype_name, images, pixels),
        grad_columns=grad_columns,
        input=input,
        offset=offset,
        mask=mask,
        grad_offset=grad_offset,
        grad_mask=grad_mask,
    )
