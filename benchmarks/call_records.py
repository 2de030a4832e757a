"""What one deform_conv2d call launches, multiplies and allocates on the CUDA path, per
benchmark shape (benchmarks/shapes.py, full size), before and after the GPU speed work.

"after" is recorded: the orchestration runs against ``cupydcn.cuda.launch.NullLauncher``
(nothing executes; every kernel launch, array operation, GEMM and workspace buffer is
reported to ``record_calls``). "before" is the same count written from the code of
commit 91aaad7 (the last one before): per chunk of n images, forward = widen weight and
bias (half types), im2col into float32 columns, one float32 ``xp.matmul``, a bias add, a
float32 output buffer rounded by one more kernel (half types); backward = grad_output
widened (half types), a bias sum per chunk, the grad_columns matmul, col2im, coord,
im2col, a batched matmul against the *transposed* columns (CuPy copies them: one more
column buffer) into per-image grad_weight products, and their sum.

    python benchmarks/call_records.py            # writes benchmarks/results/call_records.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cupydcn.core.dtypes import numpy_dtype
from cupydcn.cuda.launch import NullLauncher, record_calls
from cupydcn.deform_conv import cuda_backend
from cupydcn.deform_conv.spec import DEFAULT_WORKSPACE_BYTES, ConvGeometry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import FULL  # noqa: E402

GRADS = frozenset({"input", "offset", "weight", "mask", "bias"})
MB = 1e6


def geometry(shape, dtype_name: str) -> ConvGeometry:
    return ConvGeometry(
        batch=shape.n,
        in_channels=shape.c_in,
        height=shape.h,
        width=shape.w,
        out_channels=shape.c_out,
        groups=shape.groups,
        offset_groups=shape.offset_groups,
        kernel_h=shape.kh,
        kernel_w=shape.kw,
        stride_h=shape.stride,
        stride_w=shape.stride,
        pad_h=shape.padding,
        pad_w=shape.padding,
        dil_h=shape.dilation,
        dil_w=shape.dilation,
        out_h=shape.out_h,
        out_w=shape.out_w,
        has_mask=True,
        has_bias=True,
        dtype_name=dtype_name,
    )


def after(geom: ConvGeometry, algorithm: str = "im2col"):
    dtype = numpy_dtype(geom.dtype_name)
    z = lambda s: np.zeros(s, dtype)  # noqa: E731
    x, off, w, b, m = (
        z(geom.input_shape),
        z(geom.offset_shape),
        z(geom.weight_shape),
        z((geom.out_channels,)),
        z(geom.mask_shape),
    )
    launcher = NullLauncher()
    with record_calls() as fwd:
        cuda_backend.conv_forward(
            launcher,
            x,
            off,
            w,
            b,
            m,
            geom,
            workspace_bytes=DEFAULT_WORKSPACE_BYTES,
            algorithm=algorithm,
        )
    with record_calls() as bwd:
        cuda_backend.conv_backward(
            launcher,
            z(geom.output_shape),
            x,
            off,
            w,
            m,
            geom,
            wrt=GRADS,
            workspace_bytes=DEFAULT_WORKSPACE_BYTES,
            algorithm=algorithm,
        )
    return fwd, bwd


def before(geom: ConvGeometry) -> tuple[tuple[int, int, float], tuple[int, int, float]]:
    """(launches incl. array operations, GEMM calls, workspace MB) of 91aaad7, forward
    and backward, from its chunking (float32 columns for every dtype but float64)."""
    half = geom.dtype_name in ("float16", "bfloat16")
    acc = 8 if geom.dtype_name == "float64" else 4
    p = geom.out_h * geom.out_w
    rows, co, n = geom.column_rows, geom.out_channels, geom.batch
    weight = co * rows // geom.groups
    f_image = (rows * p + (co * p if half else 0)) * acc
    f_chunk = max(1, min(n, DEFAULT_WORKSPACE_BYTES // f_image))
    f_chunks = -(-n // f_chunk)
    f_launches = (2 if half else 0) + f_chunks * (1 + 1 + 1 + int(half))  # im2col, mm, +bias, round
    f_ws = f_chunk * f_image + (weight * acc if half else 0)
    b_image = (2 * rows * p + (co * p if half else 0) + weight) * acc
    b_chunk = max(1, min(n, DEFAULT_WORKSPACE_BYTES // b_image))
    b_chunks = -(-n // b_chunk)
    # per chunk: widen go, bias sum, mm, col2im, coord, im2col, transposed copy, mm, sum, +=
    per_chunk = int(half) + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1
    b_launches = int(half) + 1 + b_chunks * per_chunk + (3 if half else 0)  # widen w, zeros, rounds
    b_ws = b_chunk * b_image + b_chunk * rows * p * acc + (weight * acc if half else 0)
    return (f_launches, f_chunks, f_ws / MB), (b_launches, 2 * b_chunks, b_ws / MB)


def main() -> None:
    lines = [
        "# deform_conv2d on CUDA: launches, GEMM calls and workspace per call",
        "",
        "Written by `benchmarks/call_records.py` (no GPU needed): *after* recorded by the",
        "null launcher, *before* counted from commit 91aaad7's code. Launches include array",
        "operations (fills, sums, copies); workspace is the orchestration's buffers besides",
        "the results, at the default 512 MiB budget. Every conv is 3×3, DCNv2 with bias,",
        "all gradients in the backward.",
        "",
        '*after* is the column path (`algorithm="im2col"`); *fused* the tensor-core kernels',
        "where they apply (float16, sm_80+), *depthwise* S7's direct kernels.",
        "",
        "| shape | dtype | pass | launches before → after | GEMMs before → after "
        "| workspace MB before → after | fused / depthwise: launches, workspace MB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for shape in FULL.values():
        if getattr(shape, "op", "") != "deform_conv2d":
            continue
        for dtype_name in ("float32", "float16"):
            geom = geometry(shape, dtype_name)
            fwd, bwd = after(geom)
            old_f, old_b = before(geom)
            why = cuda_backend.candidates(geom, dtype_name, backward=True)
            other = next((a for a in ("fused", "depthwise") if why[a] is None), None)
            alt = after(geom, other) if other else (None, None)
            for name, new, old, alt_calls in (
                ("fwd", fwd, old_f, alt[0]),
                ("bwd", bwd, old_b, alt[1]),
            ):
                extra = (
                    f"{other}: {alt_calls.launch_count + alt_calls.gemm_count}, "
                    f"{alt_calls.workspace_bytes / MB:.1f}"
                    if alt_calls is not None
                    else "–"
                )
                lines.append(
                    f"| {shape.id} | {dtype_name} | {name} | {old[0]} → {new.launch_count} | "
                    f"{old[1]} → {new.gemm_count} | {old[2]:.1f} → {new.workspace_bytes / MB:.1f} "
                    f"| {extra} |"
                )
    out = Path(__file__).resolve().parent / "results" / "call_records.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
