"""What one deform_conv2d call launches and allocates on the CUDA path, pinned per shape.

The orchestration (cupydcn/deform_conv/cuda_backend.py) runs against
``cupydcn.cuda.launch.NullLauncher``: nothing executes, every kernel launch, array
operation, GEMM and workspace buffer is reported to ``record_calls``. The numbers below (the
column path, ``algorithm="im2col"``, unless a test says otherwise) are written out by hand
from the shapes (benchmarks/shapes.py, the full-size rows) and
the default workspace (512 MiB), so a change in how many kernels, GEMMs or bytes a call
takes fails here without a GPU. Per call:

- forward, per chunk of images: one im2col, one bias fill, one GEMM (groups = 1);
  workspace = the columns of a chunk, in the element dtype (C*9*P*itemsize per image);
- backward (every gradient), per chunk: the grad_columns GEMM, col2im (input), col2im
  (offset and mask), im2col, and one grad_weight GEMM per image; once: grad_input's
  zero fill, grad_bias's sum and three roundings (grad_input, grad_weight, grad_bias;
  none for float32); workspace = grad_columns (float32) + columns (element dtype).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from cupydcn.core.dtypes import numpy_dtype
from cupydcn.cuda.launch import GemmCall, NullLauncher, record_calls
from cupydcn.deform_conv import cuda_backend
from cupydcn.deform_conv.spec import DEFAULT_WORKSPACE_BYTES, ConvGeometry
from support import GRADS

# id: (N, C_in, C_out, H, W, stride, offset_groups) of benchmarks/shapes.py (3x3, pad 1)
SHAPES = {
    "S1": (2, 128, 128, 100, 168, 1, 1),
    "S3": (2, 512, 512, 25, 42, 1, 1),
    "S4": (2, 128, 128, 200, 336, 2, 1),
    "S5": (8, 256, 256, 64, 64, 1, 1),
    "S5-n64": (64, 128, 128, 56, 56, 1, 1),
    "S6": (4, 64, 64, 256, 256, 1, 8),
}

# (shape, dtype): output pixels P, forward (images per chunk, workspace bytes), backward
# (images per chunk, workspace bytes). Columns are C*9 rows of P pixels; the workspace
# fits 512 MiB = 536,870,912 bytes.
PINNED = {
    # 1152 x 16800 columns: 38.7 MB per image in float16, both images in one chunk
    ("S1", "float16"): (16800, (2, 77_414_400), (2, 232_243_200)),
    ("S1", "float32"): (16800, (2, 154_828_800), (2, 309_657_600)),
    ("S3", "float16"): (1050, (2, 19_353_600), (2, 58_060_800)),
    ("S4", "float16"): (16800, (2, 77_414_400), (2, 232_243_200)),
    # 2304 x 4096: 18.9 MB per image (float16); backward 6 bytes per column element
    ("S5", "float16"): (4096, (8, 150_994_944), (8, 452_984_832)),
    # float32 backward: 75.5 MB per image, 7 fit: chunks of 7 and 1
    ("S5", "float32"): (4096, (8, 301_989_888), (7, 528_482_304)),
    # 64 images: forward chunks of 37 + 27 (float32); backward 18, 18, 18, 10
    ("S5-n64", "float32"): (3136, (37, 534_675_456), (18, 520_224_768)),
    ("S6", "float16"): (65536, (4, 301_989_888), (2, 452_984_832)),
}


def _geometry(shape_id: str, dtype_name: str) -> ConvGeometry:
    n, c, co, h, w, stride, offset_groups = SHAPES[shape_id]
    return ConvGeometry(
        batch=n,
        in_channels=c,
        height=h,
        width=w,
        out_channels=co,
        groups=1,
        offset_groups=offset_groups,
        kernel_h=3,
        kernel_w=3,
        stride_h=stride,
        stride_w=stride,
        pad_h=1,
        pad_w=1,
        dil_h=1,
        dil_w=1,
        out_h=(h - 1) // stride + 1,
        out_w=(w - 1) // stride + 1,
        has_mask=True,
        has_bias=True,
        dtype_name=dtype_name,
    )


def _arrays(geom: ConvGeometry):
    """Uninitialised arrays of the call (the null launcher reads none of them)."""
    dtype = numpy_dtype(geom.dtype_name)
    empty = lambda shape: np.zeros(shape, dtype)  # noqa: E731 - zeros: sum() reads them
    return dict(
        input=empty(geom.input_shape),
        offset=empty(geom.offset_shape),
        weight=empty(geom.weight_shape),
        bias=empty((geom.out_channels,)),
        mask=empty(geom.mask_shape),
        grad_output=empty(geom.output_shape),
    )


def _forward(launcher, geom, a, workspace=DEFAULT_WORKSPACE_BYTES, algorithm="im2col"):
    with record_calls() as calls:
        cuda_backend.conv_forward(
            launcher,
            a["input"],
            a["offset"],
            a["weight"],
            a["bias"],
            a["mask"],
            geom,
            workspace_bytes=workspace,
            algorithm=algorithm,
        )
    return calls


def _backward(launcher, geom, a, workspace=DEFAULT_WORKSPACE_BYTES, algorithm="im2col"):
    with record_calls() as calls:
        cuda_backend.conv_backward(
            launcher,
            a["grad_output"],
            a["input"],
            a["offset"],
            a["weight"],
            a["mask"],
            geom,
            wrt=frozenset(GRADS),
            workspace_bytes=workspace,
            algorithm=algorithm,
        )
    return calls


def _chunks(n: int, chunk: int) -> list[int]:
    return [min(chunk, n - s) for s in range(0, n, chunk)]


@pytest.mark.parametrize("shape_id, dtype_name", sorted(PINNED))
def test_forward_launches_gemms_and_workspace(shape_id, dtype_name):
    geom = _geometry(shape_id, dtype_name)
    pixels, (chunk, workspace), _ = PINNED[(shape_id, dtype_name)]
    assert geom.out_h * geom.out_w == pixels
    calls = _forward(NullLauncher(), geom, _arrays(geom))
    chunks = _chunks(geom.batch, chunk)
    assert dict(calls.launches) == {
        "deform_conv_im2col": len(chunks),
        "xp.fill_bias": len(chunks),
    }
    rows = geom.in_channels * 9
    assert calls.gemms == [
        GemmCall(n, geom.out_channels, pixels, rows, dtype_name, dtype_name, False) for n in chunks
    ]
    assert calls.workspace == [workspace]


@pytest.mark.parametrize("shape_id, dtype_name", sorted(PINNED))
def test_backward_launches_gemms_and_workspace(shape_id, dtype_name):
    geom = _geometry(shape_id, dtype_name)
    pixels, _, (chunk, workspace) = PINNED[(shape_id, dtype_name)]
    calls = _backward(NullLauncher(), geom, _arrays(geom))
    chunks = _chunks(geom.batch, chunk)
    half = dtype_name != "float32"
    assert dict(calls.launches) == {
        "xp.zeros": 1,
        "xp.sum": 1,
        **({"round_to_output": 3} if half else {}),
        "deform_conv_col2im_input_tiled": len(chunks),
        "deform_conv_col2im_coord": len(chunks),
        "deform_conv_im2col": len(chunks),
    }
    rows, co = geom.in_channels * 9, geom.out_channels
    grad_columns = [GemmCall(n, rows, pixels, co, dtype_name, "float32", False) for n in chunks]
    grad_weight = [GemmCall(1, co, rows, pixels, dtype_name, "float32", False)] * geom.batch
    assert sorted(calls.gemms) == sorted(grad_columns + grad_weight)
    # grad_columns (float32) and the recomputed columns (element dtype), per chunk
    per_image = rows * pixels
    assert calls.workspace == [chunk * per_image * 4, chunk * per_image * (2 if half else 4)]
    assert sum(calls.workspace) == workspace


def test_groups_take_the_fewer_of_images_and_groups_gemm_calls():
    """groups = 4 over 2 images: one call per image, each batched over the 4 groups."""
    geom = _geometry("S3", "float16")
    geom = ConvGeometry(**{**geom.__dict__, "groups": 4})
    calls = _forward(NullLauncher(), geom, _arrays(geom))
    per_group_rows = geom.in_channels // 4 * 9
    assert (
        calls.gemms
        == [GemmCall(4, geom.out_channels // 4, 1050, per_group_rows, "float16", "float16", False)]
        * 2
    )


def test_split_image_reads_and_writes_in_place():
    """A workspace below one image: ranges of pixels, the GEMM writing each range of the
    output in place (no copies: the launches are im2col and the bias fill per range)."""
    geom = _geometry("S1", "float16")
    workspace = cuda_backend.MIN_SLICE_BYTES  # 4 MiB: 4194304 // (1152 * 2) = 1820 pixels
    calls = _forward(NullLauncher(), geom, _arrays(geom), workspace)
    ranges = -(-16800 // 1820)  # 10 per image
    assert dict(calls.launches) == {"deform_conv_im2col": 2 * ranges, "xp.fill_bias": 2 * ranges}
    assert len(calls.gemms) == 2 * ranges
    assert {g.n for g in calls.gemms} == {1820, 16800 - 9 * 1820}
    assert calls.workspace == [1820 * 1152 * 2]


def test_tf32_reaches_the_float32_gemms_only():
    from cupydcn.cuda.tf32 import allow_tf32

    for dtype_name in ("float32", "float16"):
        geom = _geometry("S3", dtype_name)
        with allow_tf32():
            calls = _forward(NullLauncher(), geom, _arrays(geom))
        assert {g.tf32 for g in calls.gemms} == {True}
        # the flag is passed to every GEMM; only float32 operands use it (cuBLAS compute
        # type: tests/test_gemm.py)
        assert {g.dtype_name for g in calls.gemms} == {dtype_name}


def test_host_overhead_of_a_call_is_small():
    """The orchestration's own time per call (null launcher, a small shape): what a GPU
    call costs on the host besides the launches themselves. Measured values are in
    benchmarks/results/host_overhead.json; the bound here is loose (shared CI cores)."""
    geom = ConvGeometry(**{**_geometry("S3", "float16").__dict__, "height": 8, "width": 8})
    geom = ConvGeometry(**{**geom.__dict__, "out_h": 8, "out_w": 8, "batch": 2})
    arrays = _arrays(geom)
    launcher = NullLauncher()
    for _ in range(3):
        _forward(launcher, geom, arrays)
        _backward(launcher, geom, arrays)
    rounds = 50
    start = time.perf_counter()
    for _ in range(rounds):
        _forward(launcher, geom, arrays)
    forward = (time.perf_counter() - start) / rounds
    start = time.perf_counter()
    for _ in range(rounds):
        _backward(launcher, geom, arrays)
    backward = (time.perf_counter() - start) / rounds
    assert forward < 2e-3 and backward < 5e-3, (forward, backward)


@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_depthwise_takes_no_columns_and_no_gemm(dtype_name):
    """S7 (16 x 512 channels, groups 512, 28 x 28): the depthwise kernels, no workspace.
    Forward: one thread per (image, run of 8 groups, pixel) = 16 * 64 * 784 threads, 3136
    blocks of 256. Backward: zero fills of the three float32 accumulators, one block per
    (image, offset group, tap, tile of 32 pixels) = 16 * 9 * 25 = 3600 blocks for
    input/offset/mask, one per (channel, row of taps) = 512 * 3 = 1536 for weight/bias,
    and the three roundings of the half types."""
    n, c, hw = 16, 512, 28
    geom = ConvGeometry(
        **{
            **_geometry("S3", dtype_name).__dict__,
            "batch": n,
            "in_channels": c,
            "out_channels": c,
            "groups": c,
            "height": hw,
            "width": hw,
            "out_h": hw,
            "out_w": hw,
        }
    )
    arrays = _arrays(geom)
    forward = _forward(NullLauncher(), geom, arrays, algorithm="auto")
    assert forward.sequence == [
        ("deform_conv_depthwise_forward", (3, 3), (3136, 1, 1), (256, 1, 1))
    ]
    assert forward.gemms == [] and forward.workspace == []
    backward = _backward(NullLauncher(), geom, arrays, algorithm="auto")
    kernels = [s[:3] for s in backward.sequence if not s[0].startswith("xp.")]
    rounds = [("round_to_output", (), (blocks, 1, 1)) for blocks in (25088, 18, 2)]
    assert kernels == [
        ("deform_conv_depthwise_backward_data", (3, 3), (3600, 1, 1)),
        ("deform_conv_depthwise_backward_weight", (3, 3), (1536, 1, 1)),
    ] + (rounds if dtype_name == "float16" else [])
    assert backward.launches["xp.zeros"] == 3
    assert backward.gemms == [] and backward.workspace == []


def test_fused_path_takes_no_columns_and_no_gemm():
    """S5 in float16 on the fused kernels. Forward: the weight packed once into [groups,
    C_out, K, C_in padded to 16] (256 * 9 * 256 halves = 1,179,648 bytes of workspace,
    589,824 / 256 = 2304 blocks) and one launch over tiles of 64 pixels x 128 output
    channels: (4096 / 64, 256 / 128, 8 images). Backward: the data-gradient kernel over
    (64 pixel tiles, 9 taps, 8 images), grad_weight over (9 taps x 4 chunks of 64
    channels, 2 channel tiles, 15 pixel splits = ceil(1024 / 72)), the zero fills of the
    two float32 accumulators, the bias sum and three roundings (8 * 256 * 64 * 64 / 256 =
    32768, 589,824 / 256 = 2304 and 1 block). No GEMM, no column buffer."""
    geom = _geometry("S5", "float16")
    arrays = _arrays(geom)
    forward = _forward(NullLauncher(), geom, arrays, algorithm="fused")
    assert forward.sequence == [
        ("deform_conv_fused_pack_weight", (), (2304, 1, 1), (256, 1, 1)),
        ("deform_conv_fused_forward", (), (64, 2, 8), (256, 1, 1)),
    ]
    assert forward.gemms == [] and forward.workspace == [256 * 9 * 256 * 2]
    backward = _backward(NullLauncher(), geom, arrays, algorithm="fused")
    assert backward.sequence == [
        ("xp.zeros", (), None, None),
        ("deform_conv_fused_backward_data", (), (64, 9, 8), (256, 1, 1)),
        ("xp.zeros", (), None, None),
        ("deform_conv_fused_grad_weight", (), (36, 2, 15), (256, 1, 1)),
        ("xp.sum", (), None, None),
        ("round_to_output", (), (32768, 1, 1), (256, 1, 1)),
        ("round_to_output", (), (2304, 1, 1), (256, 1, 1)),
        ("round_to_output", (), (1, 1, 1), (256, 1, 1)),
    ]
    assert backward.gemms == [] and backward.workspace == []
