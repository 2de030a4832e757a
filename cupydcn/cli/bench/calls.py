"""The timed callables: one pass (forward, backward, forward+backward) of one provider on
a problem (cupydcn's explicit forward and backward; the peers through PyTorch autograd)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .device import Unavailable, import_peer
from .problems import Problem
from .shapes import ConvShape, PsRoiShape, RoiShape


def _torch_calls(op_fn: Callable, leaves: Sequence, grad_output, pass_: str) -> Callable:
    """forward (no graph), backward (graph built once outside, retained) or both, with
    PyTorch autograd over ``leaves`` (the tensors needing gradients)."""
    import torch

    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in leaves]
    wanted = [t for t in leaves if t is not None]
    if pass_ == "forward":

        def forward():
            with torch.no_grad():
                return op_fn(*leaves)

        return forward
    if pass_ == "backward":
        out = op_fn(*leaves)

        def backward():
            return torch.autograd.grad(out, wanted, grad_output, retain_graph=True)

        return backward

    def forward_backward():
        out = op_fn(*leaves)
        return torch.autograd.grad(out, wanted, grad_output)

    return forward_backward


def build_call(problem: Problem, provider: str, variant: str, pass_: str) -> Callable[[], Any]:
    """A callable running one pass of one provider on ``problem``; it returns its outputs
    (for the memory accounting). Raises :class:`Unavailable`."""
    shape = problem.shape
    a = problem.arrays
    with_mask = variant == "mask"
    if isinstance(shape, ConvShape):
        return _conv_call(problem, shape, a, provider, with_mask, pass_)
    if isinstance(shape, RoiShape):
        return _roi_call(problem, shape, a, provider, with_mask, pass_)
    return _psroi_call(problem, shape, a, provider, pass_)


def _cupydcn_passes(forward: Callable, backward: Callable, pass_: str) -> Callable:
    if pass_ == "forward":
        return forward
    if pass_ == "backward":
        return backward

    def forward_backward():
        forward()
        return backward()

    return forward_backward


def _conv_call(problem, shape: ConvShape, a, provider, with_mask, pass_):
    options = dict(stride=shape.stride, padding=shape.padding, dilation=shape.dilation)
    if provider == "cupydcn":
        from cupydcn import deform_conv2d, deform_conv2d_backward

        mask = a["mask"] if with_mask else None
        return _cupydcn_passes(
            lambda: deform_conv2d(
                a["input"], a["offset"], a["weight"], a["bias"], mask=mask, **options
            ),
            lambda: tuple(
                deform_conv2d_backward(
                    a["grad_output"], a["input"], a["offset"], a["weight"], mask, **options
                )
            ),
            pass_,
        )
    import torch

    p = problem.peer
    grad_output = p("grad_output")
    if provider == "torchvision":
        tv_ops = import_peer("torchvision.ops")[0]

        def op(x, off, w, b, m=None):
            return tv_ops.deform_conv2d(x, off, w, b, mask=m, **options)

        leaves = [p("input"), p("offset"), p("weight"), p("bias")]
        if with_mask:
            leaves.append(p("mask"))
        return _torch_calls(op, leaves, grad_output, pass_)
    if provider in ("cudnn_nchw", "cudnn_nhwc"):
        fmt = torch.channels_last if provider == "cudnn_nhwc" else torch.contiguous_format
        x = p("input").contiguous(memory_format=fmt)
        w = p("weight").contiguous(memory_format=fmt)
        grad_output = grad_output.contiguous(memory_format=fmt)

        def conv(x, w, b):
            return torch.nn.functional.conv2d(x, w, b, groups=shape.groups, **options)

        return _torch_calls(conv, [x, w, p("bias")], grad_output, pass_)
    if provider == "mmcv":
        mm_ops = import_peer("mmcv.ops")[0]
        mm_deform_conv2d, mm_modulated = mm_ops.deform_conv2d, mm_ops.modulated_deform_conv2d

        if with_mask:

            def op(x, off, m, w, b):
                return mm_modulated(
                    x,
                    off,
                    m,
                    w,
                    b,
                    shape.stride,
                    shape.padding,
                    shape.dilation,
                    shape.groups,
                    shape.offset_groups,
                )

            leaves = [p("input"), p("offset"), p("mask"), p("weight"), p("bias")]
        else:

            def op(x, off, w):  # mmcv's DCNv1 takes no bias
                return mm_deform_conv2d(
                    x,
                    off,
                    w,
                    shape.stride,
                    shape.padding,
                    shape.dilation,
                    shape.groups,
                    shape.offset_groups,
                )

            leaves = [p("input"), p("offset"), p("weight")]
        return _torch_calls(op, leaves, grad_output, pass_)
    raise Unavailable(f"unknown provider {provider!r} for deform_conv2d")


def _roi_call(problem, shape: RoiShape, a, provider, with_mask, pass_):
    options = dict(
        output_size=shape.output_size,
        spatial_scale=shape.spatial_scale,
        sampling_ratio=shape.sampling_ratio,
    )
    if provider == "cupydcn":
        from cupydcn import deform_roi_pool, deform_roi_pool_backward

        mask = a["mask"] if with_mask else None
        return _cupydcn_passes(
            lambda: deform_roi_pool(
                a["input"], a["rois"], a["offset"], mask, gamma=shape.gamma, **options
            ),
            lambda: tuple(
                deform_roi_pool_backward(
                    a["grad_output"],
                    a["input"],
                    a["rois"],
                    a["offset"],
                    mask,
                    gamma=shape.gamma,
                    **options,
                )
            ),
            pass_,
        )
    p = problem.peer
    rois = p("rois")
    if provider == "roi_align":
        tv_ops = import_peer("torchvision.ops")[0]

        def op(x):
            return tv_ops.roi_align(x, rois, aligned=True, **options)

        return _torch_calls(op, [p("input")], p("grad_output"), pass_)
    if provider == "mmcv":
        mm_deform_roi_pool = import_peer("mmcv.ops")[0].deform_roi_pool

        def op(x, off):
            return mm_deform_roi_pool(
                x,
                rois,
                off,
                shape.output_size,
                shape.spatial_scale,
                shape.sampling_ratio,
                shape.gamma,
            )

        return _torch_calls(op, [p("input"), p("offset")], p("grad_output"), pass_)
    raise Unavailable(f"unknown provider {provider!r} for deform_roi_pool")


def _psroi_call(problem, shape: PsRoiShape, a, provider, pass_):
    if provider == "cupydcn":
        from cupydcn import deform_psroi_pool, deform_psroi_pool_backward

        options = dict(
            output_dim=shape.output_dim,
            group_size=shape.group_size,
            pooled_size=shape.pooled_size,
            part_size=shape.part_size,
            sample_per_part=shape.sample_per_part,
            spatial_scale=shape.spatial_scale,
            trans_std=shape.trans_std,
        )
        return _cupydcn_passes(
            lambda: deform_psroi_pool(a["input"], a["rois"], a["offset"], **options),
            lambda: tuple(
                deform_psroi_pool_backward(
                    a["grad_output"], a["input"], a["rois"], a["offset"], **options
                )
            ),
            pass_,
        )
    p = problem.peer
    rois = p("rois")
    if provider == "ps_roi_align":
        tv_ops = import_peer("torchvision.ops")[0]

        def op(x):
            return tv_ops.ps_roi_align(
                x, rois, shape.pooled_size, shape.spatial_scale, shape.sample_per_part
            )

        return _torch_calls(op, [p("input")], p("grad_output"), pass_)
    raise Unavailable(f"unknown provider {provider!r} for deform_psroi_pool")
