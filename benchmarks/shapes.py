"""The benchmark shapes: S1–S7 (deform_conv2d), R1 (deform_roi_pool), R2 (deform_psroi_pool).

All convolutions are 3×3, padding 1, dilation 1, stride 1 unless noted. Taken from where
DCN is used for real: ResNet-50 stages c3–c5 with DCN on an 800×1333 detection input
(mmdetection's DCN configs), the EDVR/BasicVSR alignment layer, and the depthwise case
that im2col peers handle worst.

| id | N | C_in → C_out | H × W | extra | why |
|---|---|---|---|---|---|
| S1 | 2 | 128 → 128 | 100 × 168 | | R50 c3 |
| S2 | 2 | 256 → 256 | 50 × 84 | offset groups 1 and 4 | R50 c4 |
| S3 | 2 | 512 → 512 | 25 × 42 | | R50 c5 |
| S4 | 2 | 128 → 128 | 200 × 336 | stride 2 | first c3 layer |
| S5 | 8 | 256 → 256 | 64 × 64 | also N=64, 128 ch, 56 × 56 | canonical; batch > 32 |
| S6 | 4 | 64 → 64 | 256 × 256 | offset groups 8 | video alignment (sampling-bound) |
| S7 | 16 | 512 → 512 | 28 × 28 | groups = 512 (depthwise) | worst case for im2col peers |
| R1 | 2 | 256 | 200 × 336 | 1024 RoIs, 7 × 7, sampling_ratio 2, gamma 0.1, scale 1/4 | deformable RoI pooling |
| R2 | 2 | 7·7·10 = 490 | 100 × 168 | 512 RoIs, output_dim 10, group 7, pooled 7, part 7, sample_per_part 4 | deformable PS-RoI pooling |

Rows with two cases are two ids: S2 and S2-og4, S5 and S5-n64. R2's spatial scale is 1/8
(its 100 × 168 map is stride 8 of the same 800 × 1344 image as R1's stride-4 map) and its
offsets are class-agnostic ([K, 2, 7, 7]); trans_std 0.1.

Each conv shape runs DCNv2 (mask) and DCNv1 (no mask); every shape runs forward, backward
and forward+backward in float32, float16 and bfloat16.

Without a GPU the suite times the NumPy backend on the scaled-down versions in ``CPU``:
the same structure (stride, groups, offset groups, RoI geometry) with channels / 8,
spatial sizes / 4, batch ≤ 2 and fewer RoIs, so a CPU run takes seconds.
"""

from __future__ import annotations

from cupydcn.cli.bench import ConvShape, PsRoiShape, RoiShape

FULL = {
    s.id: s
    for s in (
        ConvShape("S1", 2, 128, 128, 100, 168, why="R50 c3"),
        ConvShape("S2", 2, 256, 256, 50, 84, why="R50 c4"),
        ConvShape("S2-og4", 2, 256, 256, 50, 84, offset_groups=4, why="R50 c4, offset groups 4"),
        ConvShape("S3", 2, 512, 512, 25, 42, why="R50 c5"),
        ConvShape("S4", 2, 128, 128, 200, 336, stride=2, why="first c3 layer (stride 2)"),
        ConvShape("S5", 8, 256, 256, 64, 64, why="canonical"),
        ConvShape("S5-n64", 64, 128, 128, 56, 56, why="canonical, batch > 32"),
        ConvShape(
            "S6", 4, 64, 64, 256, 256, offset_groups=8, why="video alignment (sampling-bound)"
        ),
        ConvShape(
            "S7", 16, 512, 512, 28, 28, groups=512, why="depthwise: worst case for im2col peers"
        ),
        RoiShape(
            "R1",
            2,
            256,
            200,
            336,
            1024,
            output_size=7,
            sampling_ratio=2,
            gamma=0.1,
            spatial_scale=1 / 4,
            why="deformable RoI pooling",
        ),
        PsRoiShape(
            "R2",
            2,
            output_dim=10,
            group_size=7,
            pooled_size=7,
            part_size=7,
            sample_per_part=4,
            h=100,
            w=168,
            rois=512,
            spatial_scale=1 / 8,
            trans_std=0.1,
            why="deformable PS-RoI pooling",
        ),
    )
}

CPU = {
    s.id: s
    for s in (
        ConvShape("S1", 1, 16, 16, 25, 42, why="R50 c3, scaled down"),
        ConvShape("S2", 1, 32, 32, 13, 21, why="R50 c4, scaled down"),
        ConvShape(
            "S2-og4", 1, 32, 32, 13, 21, offset_groups=4, why="R50 c4, offset groups 4, scaled down"
        ),
        ConvShape("S3", 1, 64, 64, 8, 11, why="R50 c5, scaled down"),
        ConvShape("S4", 1, 16, 16, 50, 84, stride=2, why="first c3 layer (stride 2), scaled down"),
        ConvShape("S5", 2, 32, 32, 16, 16, why="canonical, scaled down"),
        ConvShape("S5-n64", 2, 16, 16, 14, 14, why="canonical, batch > 32, scaled down"),
        ConvShape(
            "S6",
            1,
            8,
            8,
            64,
            64,
            offset_groups=8,
            why="video alignment (sampling-bound), scaled down",
        ),
        ConvShape("S7", 2, 64, 64, 8, 8, groups=64, why="depthwise, scaled down"),
        RoiShape(
            "R1",
            1,
            32,
            50,
            84,
            64,
            output_size=7,
            sampling_ratio=2,
            gamma=0.1,
            spatial_scale=1 / 16,
            why="deformable RoI pooling, scaled down",
        ),
        PsRoiShape(
            "R2",
            1,
            output_dim=2,
            group_size=7,
            pooled_size=7,
            part_size=7,
            sample_per_part=4,
            h=25,
            w=42,
            rois=32,
            spatial_scale=1 / 32,
            trans_std=0.1,
            why="deformable PS-RoI pooling, scaled down",
        ),
    )
}

CONV_IDS = tuple(i for i, s in FULL.items() if s.op == "deform_conv2d")
ROI_IDS = tuple(i for i, s in FULL.items() if s.op == "deform_roi_pool")
PSROI_IDS = tuple(i for i, s in FULL.items() if s.op == "deform_psroi_pool")

assert FULL.keys() == CPU.keys()


def cases(op: str, shape_ids) -> list[tuple[str, str, str, str, str]]:
    """Every (shape, variant, dtype, pass, provider) of ``op``, ordered so that the tests
    of one problem (shape, dtype) follow each other and share its arrays."""
    from cupydcn.cli.bench import DTYPES, PASSES, PROVIDERS, variants_of

    return [
        (shape_id, variant, dtype, pass_, provider)
        for shape_id in shape_ids
        for dtype in DTYPES
        for pass_ in PASSES
        for provider in PROVIDERS[op]
        for variant in variants_of(op, provider)
    ]


def lookup(shape_id: str, *, scaled: bool):
    """The shape of ``shape_id``: full size, or its scaled-down CPU version."""
    return (CPU if scaled else FULL)[shape_id]


if __name__ == "__main__":
    from cupydcn.cli.bench import shapes_legend

    print("Full shapes (GPU):\n")
    print(shapes_legend(list(FULL.values())))
    print("Scaled-down shapes (CPU):\n")
    print(shapes_legend(list(CPU.values())))
