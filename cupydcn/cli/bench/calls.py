"""The timed callables: one pass (forward, backward, forward+backward) of one provider on
a problem (cupydcn's explicit forward and backward; the peers through PyTorch autograd)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .device import Unavailable, import_peer
from .problems import Problem
from .shapes import ConvShape, Dcnv3Shape, Dcnv4Shape, MsdaShape, PsRoiShape, RoiShape


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
    if isinstance(shape, MsdaShape):
        return _msda_call(problem, shape, a, provider, pass_)
    if isinstance(shape, Dcnv3Shape):
        return _dcn_call(problem, shape, a, provider, pass_)
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


# ------------------------------------------------------- the deformable-attention family
# The peers "grid_sample": the upstream pure-PyTorch references, written here from their
# math (mmcv's multi_scale_deformable_attn_pytorch, InternImage's dcnv3_core_pytorch):
# torch.nn.functional.grid_sample(bilinear, zeros, align_corners=False) per level / group.
# The level sizes are Python ints (the most favourable case for the reference: no device
# read of spatial_shapes); cupydcn gets them as a sequence of pairs likewise.


def msda_reference(value, levels, sampling_locations, attention_weights):
    """[N, Lq, M*D]: value [N, S, M, D] split by level, each [N*M, D, H, W] sampled at
    ``2 * location - 1`` by grid_sample, weighted and summed over levels and points."""
    import torch
    import torch.nn.functional as F

    n, _, m, d = value.shape
    _, lq, _, n_levels, points, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1
    sampled = []
    parts = value.split([h * w for h, w in levels], dim=1)
    for level, ((h, w), part) in enumerate(zip(levels, parts)):
        maps = part.flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        sampled.append(
            F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [N*M, D, Lq, P]
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # [N*M, D, Lq]
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


def dcnv3_reference(input, offset, mask, shape: Dcnv3Shape):
    """[N, H_out, W_out, G*Cg]: the padded input per group [N*G, Cg, H_in, W_in] sampled
    by grid_sample at reference point + (x-major dilation grid + offset) * offset_scale,
    normalised by the padded size; the grid computed in float32 (as upstream), then cast
    to the input's dtype; weighted by the mask and summed over the points."""
    import torch
    import torch.nn.functional as F

    n, h, w, _ = input.shape
    g, cg, k = shape.group, shape.group_channels, shape.k
    pad, dil, stride, scale = shape.padding, shape.dilation, shape.stride, shape.offset_scale
    ho, wo, taps = shape.out_h, shape.out_w, shape.points
    padded = F.pad(input, (0, 0, pad, pad, pad, pad))
    h_in, w_in = h + 2 * pad, w + 2 * pad
    centre = (dil * (k - 1)) // 2
    f32 = dict(device=input.device, dtype=torch.float32)
    ref_y = torch.arange(ho, **f32) * stride + centre + 0.5
    ref_x = torch.arange(wo, **f32) * stride + centre + 0.5
    yy, xx = torch.meshgrid(ref_y, ref_x, indexing="ij")
    reference = torch.stack([xx, yy], -1).view(1, ho, wo, 1, 1, 2)
    steps = torch.arange(k, **f32) * dil - centre
    tap_x, tap_y = torch.meshgrid(steps, steps, indexing="ij")  # k = iw * kh + ih
    grid = torch.stack([tap_x.flatten(), tap_y.flatten()], -1).view(1, 1, 1, 1, taps, 2)
    norm = torch.tensor([w_in, h_in], **f32)
    locations = (reference + (grid + offset.view(n, ho, wo, g, taps, 2)) * scale) / norm
    grids = (2 * locations - 1).to(input.dtype)
    grids = grids.permute(0, 3, 1, 2, 4, 5).reshape(n * g, ho * wo, taps, 2)
    maps = padded.view(n, h_in, w_in, g, cg).permute(0, 3, 4, 1, 2).reshape(n * g, cg, h_in, w_in)
    sampled = F.grid_sample(maps, grids, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = mask.view(n, ho, wo, g, taps).permute(0, 3, 1, 2, 4).reshape(n * g, 1, ho * wo, taps)
    out = (sampled * weights).sum(-1)  # [N*G, Cg, H_out*W_out]
    return out.view(n, g * cg, ho * wo).transpose(1, 2).reshape(n, ho, wo, g * cg).contiguous()


def dcnv4_reference(input, offset_mask, shape: Dcnv4Shape):
    """:func:`dcnv3_reference` on DCNv4's packed offset_mask (per group 2P offsets then P
    mask values; the padding is not read)."""
    n, ho, wo, _ = offset_mask.shape
    g, taps = shape.group, shape.points
    packed = offset_mask[..., : g * 3 * taps].reshape(n, ho, wo, g, 3 * taps)
    offset = packed[..., : 2 * taps].reshape(n, ho, wo, g * taps * 2)
    mask = packed[..., 2 * taps :].reshape(n, ho, wo, g * taps)
    return dcnv3_reference(input, offset, mask, shape)


def _msda_call(problem, shape: MsdaShape, a, provider, pass_):
    levels, starts = shape.levels, shape.level_start_index
    if provider == "cupydcn":
        from cupydcn import multi_scale_deformable_attn, multi_scale_deformable_attn_backward

        return _cupydcn_passes(
            lambda: multi_scale_deformable_attn(
                a["value"], levels, starts, a["sampling_locations"], a["attention_weights"]
            ),
            lambda: tuple(
                multi_scale_deformable_attn_backward(
                    a["grad_output"],
                    a["value"],
                    levels,
                    starts,
                    a["sampling_locations"],
                    a["attention_weights"],
                )
            ),
            pass_,
        )
    p = problem.peer
    leaves = [p("value"), p("sampling_locations"), p("attention_weights")]
    if provider == "grid_sample":

        def op(value, locations, weights):
            return msda_reference(value, levels, locations, weights)

        return _torch_calls(op, leaves, p("grad_output"), pass_)
    if provider == "mmcv":
        import torch

        function = import_peer("mmcv.ops.multi_scale_deform_attn")[0]
        function = function.MultiScaleDeformableAttnFunction
        device = leaves[0].device
        spatial_shapes = torch.tensor(levels, dtype=torch.long, device=device)
        level_start_index = torch.tensor(starts, dtype=torch.long, device=device)

        def op(value, locations, weights):
            return function.apply(value, spatial_shapes, level_start_index, locations, weights, 64)

        return _torch_calls(op, leaves, p("grad_output"), pass_)
    raise Unavailable(f"unknown provider {provider!r} for multi_scale_deformable_attn")


def _dcn_call(problem, shape: Dcnv3Shape, a, provider, pass_):
    options = shape.options()
    v4 = isinstance(shape, Dcnv4Shape)
    if provider == "cupydcn":
        if v4:
            from cupydcn import dcnv4, dcnv4_backward

            return _cupydcn_passes(
                lambda: dcnv4(a["input"], a["offset_mask"], **options),
                lambda: tuple(
                    dcnv4_backward(a["grad_output"], a["input"], a["offset_mask"], **options)
                ),
                pass_,
            )
        from cupydcn import dcnv3, dcnv3_backward

        return _cupydcn_passes(
            lambda: dcnv3(a["input"], a["offset"], a["mask"], **options),
            lambda: tuple(
                dcnv3_backward(a["grad_output"], a["input"], a["offset"], a["mask"], **options)
            ),
            pass_,
        )
    p = problem.peer
    if provider == "grid_sample":
        if v4:
            return _torch_calls(
                lambda x, om: dcnv4_reference(x, om, shape),
                [p("input"), p("offset_mask")],
                p("grad_output"),
                pass_,
            )
        return _torch_calls(
            lambda x, off, m: dcnv3_reference(x, off, m, shape),
            [p("input"), p("offset"), p("mask")],
            p("grad_output"),
            pass_,
        )
    raise Unavailable(f"unknown provider {provider!r} for {shape.op}")
