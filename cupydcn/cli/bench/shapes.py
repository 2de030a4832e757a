"""The benchmark problems as data: ops, passes, dtypes, mask variants, the shape classes
and the quick command's shapes (rows of ``benchmarks/shapes.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

OPS = (
    "deform_conv2d",
    "deform_roi_pool",
    "deform_psroi_pool",
    "multi_scale_deformable_attn",
    "dcnv3",
    "dcnv4",
)
PASSES = ("forward", "backward", "forward+backward")
DTYPES = ("float32", "float16", "bfloat16")
# Multiples of the forward's GEMM work counted for each pass (backward: input and weight
# gradients, one forward-sized GEMM each).
PASS_FLOP_FACTOR = {"forward": 1, "backward": 2, "forward+backward": 3}
# "mask": DCNv2 / modulated pooling, "nomask": DCNv1 / plain deformable pooling,
# "-": no such choice (cuDNN conv2d, PS-RoI pooling, the deformable-attention family).
VARIANTS = ("mask", "nomask", "-")


@dataclass(frozen=True)
class ConvShape:
    """One deform_conv2d problem: input [n, c_in, h, w], weight [c_out, c_in/groups, kh, kw]."""

    op: ClassVar[str] = "deform_conv2d"
    id: str
    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    kh: int = 3
    kw: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    groups: int = 1
    offset_groups: int = 1
    why: str = ""

    @property
    def out_h(self) -> int:
        return (self.h + 2 * self.padding - (self.dilation * (self.kh - 1) + 1)) // self.stride + 1

    @property
    def out_w(self) -> int:
        return (self.w + 2 * self.padding - (self.dilation * (self.kw - 1) + 1)) // self.stride + 1

    def forward_flops(self) -> int:
        """2*N*C_out*H_out*W_out*(C_in/groups)*kh*kw: the GEMM work of one forward."""
        return (
            2
            * self.n
            * self.c_out
            * self.out_h
            * self.out_w
            * (self.c_in // self.groups)
            * self.kh
            * self.kw
        )

    def describe(self) -> str:
        text = f"N={self.n} C={self.c_in}→{self.c_out} {self.h}×{self.w} k{self.kh}×{self.kw}"
        if self.stride != 1:
            text += f" stride {self.stride}"
        if self.groups != 1:
            text += f" groups {self.groups}"
        if self.offset_groups != 1:
            text += f" offset groups {self.offset_groups}"
        return text


@dataclass(frozen=True)
class RoiShape:
    """One deform_roi_pool problem: input [n, c, h, w], ``rois`` RoIs, offsets [K, 2, P, P]."""

    op: ClassVar[str] = "deform_roi_pool"
    id: str
    n: int
    c: int
    h: int
    w: int
    rois: int
    output_size: int = 7
    sampling_ratio: int = 2
    gamma: float = 0.1
    spatial_scale: float = 0.25
    why: str = ""

    def forward_flops(self) -> None:
        return None

    def describe(self) -> str:
        return (
            f"N={self.n} C={self.c} {self.h}×{self.w} {self.rois} RoIs "
            f"{self.output_size}×{self.output_size} sr {self.sampling_ratio} "
            f"scale 1/{round(1 / self.spatial_scale)}"
        )


@dataclass(frozen=True)
class PsRoiShape:
    """One deform_psroi_pool problem: input [n, output_dim*group_size², h, w]; class-agnostic
    offsets [K, 2, part_size, part_size]."""

    op: ClassVar[str] = "deform_psroi_pool"
    id: str
    n: int
    output_dim: int
    group_size: int
    pooled_size: int
    part_size: int
    sample_per_part: int
    h: int
    w: int
    rois: int
    spatial_scale: float = 0.125
    trans_std: float = 0.1
    why: str = ""

    @property
    def c(self) -> int:
        return self.output_dim * self.group_size**2

    def forward_flops(self) -> None:
        return None

    def describe(self) -> str:
        return (
            f"N={self.n} C={self.c} {self.h}×{self.w} {self.rois} RoIs out {self.output_dim} "
            f"group {self.group_size} pooled {self.pooled_size} part {self.part_size} "
            f"spp {self.sample_per_part} scale 1/{round(1 / self.spatial_scale)}"
        )


@dataclass(frozen=True)
class MsdaShape:
    """One multi_scale_deformable_attn problem: value [n, S, heads, head_dim] over the
    levels (H_l, W_l), S = sum H_l W_l; sampling_locations [n, Lq, heads, L, points, 2],
    attention_weights [n, Lq, heads, L, points]; ``queries`` None: Lq = S (an encoder)."""

    op: ClassVar[str] = "multi_scale_deformable_attn"
    id: str
    n: int
    levels: tuple[tuple[int, int], ...]
    heads: int = 8
    head_dim: int = 32
    points: int = 4
    queries: int | None = None
    why: str = ""

    @property
    def keys(self) -> int:
        return sum(h * w for h, w in self.levels)

    @property
    def level_start_index(self) -> tuple[int, ...]:
        starts, total = [], 0
        for h, w in self.levels:
            starts.append(total)
            total += h * w
        return tuple(starts)

    @property
    def lq(self) -> int:
        return self.keys if self.queries is None else self.queries

    def forward_flops(self) -> None:
        return None

    def describe(self) -> str:
        levels = ", ".join(f"{h}×{w}" for h, w in self.levels)
        lq = f"Lq=S={self.keys}" if self.queries is None else f"Lq={self.queries}"
        return f"N={self.n} levels {levels} M={self.heads} D={self.head_dim} P={self.points} {lq}"


@dataclass(frozen=True)
class Dcnv3Shape:
    """One dcnv3 problem (channels last): input [n, h, w, group*group_channels], offset
    [n, H_out, W_out, group*P*2], mask [n, H_out, W_out, group*P], P = k*k."""

    op: ClassVar[str] = "dcnv3"
    id: str
    n: int
    h: int
    w: int
    group: int
    group_channels: int
    k: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    offset_scale: float = 1.0
    why: str = ""

    @property
    def channels(self) -> int:
        return self.group * self.group_channels

    @property
    def points(self) -> int:
        return self.k * self.k

    @property
    def out_h(self) -> int:
        return (self.h + 2 * self.padding - (self.dilation * (self.k - 1) + 1)) // self.stride + 1

    @property
    def out_w(self) -> int:
        return (self.w + 2 * self.padding - (self.dilation * (self.k - 1) + 1)) // self.stride + 1

    @property
    def offset_mask_dim(self) -> int:
        """DCNv4's packed last dimension: group*3P padded to a multiple of 8."""
        return -(-self.group * 3 * self.points // 8) * 8

    def options(self) -> dict:
        return dict(
            kernel_size=self.k,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            group=self.group,
            group_channels=self.group_channels,
            offset_scale=self.offset_scale,
        )

    def forward_flops(self) -> None:
        return None

    def describe(self) -> str:
        text = (
            f"N={self.n} {self.h}×{self.w} C={self.channels} ({self.group} groups × "
            f"{self.group_channels}) k{self.k}×{self.k} pad {self.padding}"
        )
        if self.stride != 1:
            text += f" stride {self.stride}"
        return text


@dataclass(frozen=True)
class Dcnv4Shape(Dcnv3Shape):
    """One dcnv4 problem: :class:`Dcnv3Shape` with offsets and mask packed into
    offset_mask [n, H_out, W_out, offset_mask_dim] (per group 2P offsets then P mask
    values, padded to a multiple of 8 as DCNv4 does)."""

    op: ClassVar[str] = "dcnv4"


Shape = ConvShape | RoiShape | PsRoiShape | MsdaShape | Dcnv3Shape | Dcnv4Shape

# The deformable-attention family's benchmark shapes (benchmarks/test_bench_attn.py):
# A1/A2 Deformable DETR's encoder and decoder (800×1333-like input, strides 8–64: four
# levels 100×150 … 13×19, M=8 heads of D=32, P=4 points; the encoder queries every key,
# the decoder 300 object queries), D3/D4 an InternImage-T-like DCNv3 / DCNv4 layer
# (stage 1: N=8, 56×56, 64 channels in 4 groups of 16, 3×3, padding 1). The CPU versions
# keep the structure (levels, heads, groups, kernel) with spatial sizes / 4, batch 1 and
# fewer channels, so the CPU smoke run stays fast.
DETR_LEVELS = ((100, 150), (50, 75), (25, 38), (13, 19))
DETR_LEVELS_CPU = ((25, 38), (13, 19), (7, 10), (4, 5))
ATTN_SHAPES: dict[str, Shape] = {
    s.id: s
    for s in (
        MsdaShape("A1", 2, DETR_LEVELS, why="Deformable DETR encoder (Lq = S)"),
        MsdaShape("A2", 2, DETR_LEVELS, queries=300, why="Deformable DETR decoder (300 queries)"),
        Dcnv3Shape("D3", 8, 56, 56, group=4, group_channels=16, why="InternImage-T-like DCNv3"),
        Dcnv4Shape("D4", 8, 56, 56, group=4, group_channels=16, why="InternImage-T-like DCNv4"),
    )
}
ATTN_SHAPES_CPU: dict[str, Shape] = {
    s.id: s
    for s in (
        MsdaShape("A1", 1, DETR_LEVELS_CPU, head_dim=8, why="Deformable DETR encoder, scaled down"),
        MsdaShape(
            "A2",
            1,
            DETR_LEVELS_CPU,
            head_dim=8,
            queries=100,
            why="Deformable DETR decoder, scaled down",
        ),
        Dcnv3Shape(
            "D3", 1, 14, 14, group=4, group_channels=4, why="InternImage-T-like DCNv3, scaled down"
        ),
        Dcnv4Shape(
            "D4", 1, 14, 14, group=4, group_channels=4, why="InternImage-T-like DCNv4, scaled down"
        ),
    )
}
assert ATTN_SHAPES.keys() == ATTN_SHAPES_CPU.keys()

# The shapes of the quick command: rows S1, S3, S7, R1 and R2 of benchmarks/shapes.py (a
# test keeps them equal), full size on a GPU, scaled down on the CPU.
QUICK_SHAPES: dict[str, Shape] = {
    "S1": ConvShape("S1", 2, 128, 128, 100, 168, why="R50 c3"),
    "S3": ConvShape("S3", 2, 512, 512, 25, 42, why="R50 c5"),
    "S7": ConvShape("S7", 16, 512, 512, 28, 28, groups=512, why="depthwise"),
    "R1": RoiShape("R1", 2, 256, 200, 336, 1024, why="deformable RoI pooling"),
    "R2": PsRoiShape("R2", 2, 10, 7, 7, 7, 4, 100, 168, 512, why="deformable PS-RoI pooling"),
}
QUICK_SHAPES_CPU: dict[str, Shape] = {
    "S1": ConvShape("S1", 1, 16, 16, 25, 42, why="R50 c3, scaled down"),
    "S3": ConvShape("S3", 1, 64, 64, 8, 11, why="R50 c5, scaled down"),
    "S7": ConvShape("S7", 2, 64, 64, 8, 8, groups=64, why="depthwise, scaled down"),
    "R1": RoiShape(
        "R1", 1, 32, 50, 84, 64, spatial_scale=1 / 16, why="deformable RoI pooling, scaled down"
    ),
    "R2": PsRoiShape(
        "R2",
        1,
        2,
        7,
        7,
        7,
        4,
        25,
        42,
        32,
        spatial_scale=1 / 32,
        why="deformable PS-RoI pooling, scaled down",
    ),
}


def flops_of(shape: Shape, pass_: str) -> int | None:
    forward = shape.forward_flops()
    return None if forward is None else forward * PASS_FLOP_FACTOR[pass_]
