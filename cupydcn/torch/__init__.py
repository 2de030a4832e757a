"""PyTorch integration of cupydcn: custom operators, differentiable functions, layers.

``import cupydcn.torch`` registers the custom operators

    torch.ops.cupydcn.deform_conv2d      torch.ops.cupydcn.deform_conv2d_backward
    torch.ops.cupydcn.deform_roi_pool    torch.ops.cupydcn.deform_roi_pool_backward
    torch.ops.cupydcn.deform_psroi_pool  torch.ops.cupydcn.deform_psroi_pool_backward
    torch.ops.cupydcn.multi_scale_deformable_attn
    torch.ops.cupydcn.multi_scale_deformable_attn_backward
    torch.ops.cupydcn.dcnv3              torch.ops.cupydcn.dcnv3_backward
    torch.ops.cupydcn.dcnv4              torch.ops.cupydcn.dcnv4_backward

with fake implementations, autograd formulas (the backward ops) and autocast rules, so
they work under autograd, ``torch.compile`` (no graph break), ``torch.library.opcheck``
and ``torch.autocast``. CPU tensors are computed by the NumPy backend, CUDA tensors by
the CUDA kernels on PyTorch's current stream of their device.

The functions :func:`deform_conv2d`, :func:`deform_roi_pool` and
:func:`deform_psroi_pool` take the arguments of their ``cupydcn`` counterparts and are
differentiable; the layers follow torchvision (:class:`DeformConv2d`) and mmcv (the
``*Pack`` layers, :class:`DeformRoIPool`). The deformable-attention family likewise:
:func:`multi_scale_deformable_attn`, :func:`dcnv3`, :func:`dcnv4`, and the layers
:class:`MultiScaleDeformableAttention` (mmcv's), :class:`DCNv3` (InternImage's) and
:class:`DCNv4` (the DCNv4 repository's), with their parameter names, so that their
checkpoints load.

ONNX (module :mod:`cupydcn.torch.onnx`): ``export_onnx`` (``torch.onnx.export(...,
dynamo=True)`` with ``onnx_translation_table()``) exports ``deform_conv2d`` as the standard
ONNX ``DeformConv`` (opset 19); the TorchScript exporter gets a symbolic for it too
(registered by this import). The RoI pools are refused with a clear error (no standard
ONNX op).

``import cupydcn`` does not import torch; this module does.
"""

from ._deform_attn import dcnv3, dcnv4, multi_scale_deformable_attn
from ._deform_attn_modules import DCNv3, DCNv4, MultiScaleDeformableAttention
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
from .onnx import register_torchscript_symbolics as _register_torchscript_symbolics

_register_torchscript_symbolics()

__all__ = [
    "DCNv3",
    "DCNv4",
    "DeformConv2d",
    "DeformConv2dPack",
    "DeformPSRoIPool",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformConv2dPack",
    "ModulatedDeformRoIPoolPack",
    "MultiScaleDeformableAttention",
    "dcnv3",
    "dcnv4",
    "deform_conv2d",
    "deform_psroi_pool",
    "deform_roi_pool",
    "multi_scale_deformable_attn",
]
