"""PyTorch integration of cupydcn: custom operators, differentiable functions, layers.

``import cupydcn.torch`` registers the custom operators

    torch.ops.cupydcn.deform_conv2d      torch.ops.cupydcn.deform_conv2d_backward
    torch.ops.cupydcn.deform_roi_pool    torch.ops.cupydcn.deform_roi_pool_backward
    torch.ops.cupydcn.deform_psroi_pool  torch.ops.cupydcn.deform_psroi_pool_backward

with fake implementations, autograd formulas (the backward ops) and autocast rules, so
they work under autograd, ``torch.compile`` (no graph break), ``torch.library.opcheck``
and ``torch.autocast``. CPU tensors are computed by the NumPy backend, CUDA tensors by
the CUDA kernels on PyTorch's current stream of their device.

The functions :func:`deform_conv2d`, :func:`deform_roi_pool` and
:func:`deform_psroi_pool` take the arguments of their ``cupydcn`` counterparts and are
differentiable; the layers follow torchvision (:class:`DeformConv2d`) and mmcv (the
``*Pack`` layers, :class:`DeformRoIPool`).

``import cupydcn`` does not import torch; this module does.
"""

from ._modules import (
    DeformConv2d,
    DeformConv2dPack,
    DeformPSRoIPool,
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformConv2dPack,
    ModulatedDeformRoIPoolPack,
)
from ._ops import deform_conv2d, deform_psroi_pool, deform_roi_pool

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "DeformPSRoIPool",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformConv2dPack",
    "ModulatedDeformRoIPoolPack",
    "deform_conv2d",
    "deform_psroi_pool",
    "deform_roi_pool",
]
