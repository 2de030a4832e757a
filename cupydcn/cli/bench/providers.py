"""Who is measured: the providers of each op (cupydcn and its peers torchvision, cuDNN
conv2d, mmcv), their labels and mask variants, why one cannot run here, and the notes a
row of theirs carries."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .device import Device, import_peer
from .shapes import ConvShape

if TYPE_CHECKING:
    from .problems import Problem

CONV_PROVIDERS = ("cupydcn", "torchvision", "cudnn_nchw", "cudnn_nhwc", "mmcv")
ROI_PROVIDERS = ("cupydcn", "roi_align", "mmcv")
PSROI_PROVIDERS = ("cupydcn", "ps_roi_align")
# The deformable-attention family: the upstream pure-PyTorch references (grid_sample
# based: mmcv's multi_scale_deformable_attn_pytorch, InternImage's dcnv3_core_pytorch,
# written from their math in calls.py) and mmcv's CUDA multi-scale deformable attention.
MSDA_PROVIDERS = ("cupydcn", "grid_sample", "mmcv")
DCNV3_PROVIDERS = ("cupydcn", "grid_sample")
PROVIDERS = {
    "deform_conv2d": CONV_PROVIDERS,
    "deform_roi_pool": ROI_PROVIDERS,
    "deform_psroi_pool": PSROI_PROVIDERS,
    "multi_scale_deformable_attn": MSDA_PROVIDERS,
    "dcnv3": DCNV3_PROVIDERS,
    "dcnv4": DCNV3_PROVIDERS,
}
ATTN_OPS = ("multi_scale_deformable_attn", "dcnv3", "dcnv4")
PROVIDER_ORDER = (
    "cupydcn",
    "torchvision",
    "cudnn_nchw",
    "cudnn_nhwc",
    "roi_align",
    "ps_roi_align",
    "grid_sample",
    "mmcv",
)
# Providers with no mask/no-mask choice: one row serves both variants.
VARIANTLESS = {"cudnn_nchw", "cudnn_nhwc", "roi_align"}


def provider_label(provider: str, device_kind: str = "cuda") -> str:
    gpu = {
        "cupydcn": "cupydcn",
        "torchvision": "torchvision deform_conv2d",
        "cudnn_nchw": "cuDNN conv2d NCHW",
        "cudnn_nhwc": "cuDNN conv2d NHWC",
        "roi_align": "torchvision roi_align",
        "ps_roi_align": "torchvision ps_roi_align",
        "grid_sample": "PyTorch grid_sample reference",
        "mmcv": "mmcv",
    }[provider]
    if device_kind == "cpu":
        return {
            "cupydcn": "cupydcn (NumPy)",
            "cudnn_nchw": "torch conv2d NCHW (CPU)",
            "cudnn_nhwc": "torch conv2d NHWC (CPU)",
        }.get(provider, gpu + " (CPU)")
    return gpu


def variants_of(op: str, provider: str) -> tuple[str, ...]:
    """The mask variants a provider runs for an op."""
    if op in ("deform_psroi_pool", *ATTN_OPS) or provider in VARIANTLESS:
        return ("-",)
    return ("mask", "nomask")


def skip_reason(
    op: str, provider: str, variant: str, device: Device, cpu_peers: bool = False
) -> str | None:
    """Why ``provider`` cannot run here (None: it can)."""
    if provider not in PROVIDERS[op]:
        return f"{provider} has no {op}"
    if provider == "cupydcn":
        return None
    if device.kind != "cuda" and not cpu_peers:
        return (
            f"GPU provider, no CUDA device here ({device.no_gpu_reason}); it runs on a GPU "
            "machine (--bench-cpu-peers / --cpu-peers time its CPU build instead)"
        )
    if device.kind == "cuda" and not device.torch_cuda:
        return "peers need PyTorch with CUDA, which is not importable here"
    if provider in ("torchvision", "roi_align", "ps_roi_align"):
        error = import_peer("torchvision.ops")[1]
        if error:
            return f"torchvision is not importable ({error})"
    if provider == "grid_sample":
        error = import_peer("torch")[1]
        if error:
            return f"PyTorch is not importable ({error})"
    if provider == "mmcv":
        if device.kind != "cuda":
            return "mmcv's deformable ops are CUDA only"
        if op == "multi_scale_deformable_attn":
            error = import_peer("mmcv.ops.multi_scale_deform_attn")[1]
            if error:
                return (
                    f"mmcv's multi-scale deformable attention is not importable ({error}); not run"
                )
            return None
        error = import_peer("mmcv.ops")[1]
        if error:
            return f"mmcv ops are not importable ({error}); not run"
        if op == "deform_roi_pool" and variant == "mask":
            return "mmcv's deform_roi_pool has no modulation mask"
    return None


def provider_note(problem: Problem, provider: str, variant: str) -> str:
    notes = []
    if provider != "cupydcn" and problem.peer_note:
        notes.append(problem.peer_note)
    if provider == "mmcv" and isinstance(problem.shape, ConvShape) and variant == "nomask":
        notes.append("mmcv's DCNv1 has no bias")
    if provider == "ps_roi_align":
        notes.append("plain PS-RoIAlign (no offsets), sampling_ratio = sample_per_part")
    if provider == "roi_align":
        notes.append("plain RoIAlign (aligned=True, no offsets)")
    if provider == "grid_sample":
        notes.append(
            {
                "multi_scale_deformable_attn": "mmcv's multi_scale_deformable_attn_pytorch math",
                "dcnv3": "InternImage's dcnv3_core_pytorch math (grid in float32)",
                "dcnv4": "InternImage's dcnv3_core_pytorch math on the unpacked offset_mask",
            }.get(problem.shape.op, "grid_sample reference")
        )
    if provider == "mmcv" and problem.shape.op == "multi_scale_deformable_attn":
        notes.append("MultiScaleDeformableAttnFunction, im2col_step 64")
    return "; ".join(notes)
