"""cupydcn: deformable convolution networks for any array library.

Ops take any DLPack array (NumPy, CuPy, PyTorch, JAX), compute where the arrays live
(CUDA arrays on CuPy-compiled kernels, CPU arrays on a vectorised NumPy backend) and
return results in the caller's array type. Forward and backward are explicit functions.
"""

from cupydcn.core.errors import (
    CupydcnError,
    CupydcnRuntimeError,
    CupydcnTypeError,
    CupydcnValueError,
)
from cupydcn.cuda.deterministic import deterministic_mode, is_deterministic, set_deterministic
from cupydcn.cuda.precompile import precompile
from cupydcn.cuda.tf32 import allow_tf32, is_tf32_allowed, set_allow_tf32
from cupydcn.deform_attn import (
    Dcnv3Grads,
    Dcnv4Grads,
    MsdaGrads,
    dcnv3,
    dcnv3_backward,
    dcnv4,
    dcnv4_backward,
    multi_scale_deformable_attn,
    multi_scale_deformable_attn_backward,
)
from cupydcn.deform_conv import DEFAULT_WORKSPACE_BYTES, deform_conv2d, deform_conv2d_backward
from cupydcn.deform_conv.algorithm import conv_algorithm, set_conv_algorithm
from cupydcn.deform_conv.offset_penalty import offset_l2_penalty, offset_l2_penalty_backward
from cupydcn.deform_conv.padding import PADDING_MODES
from cupydcn.deform_conv.sampling import (
    StackedSampling,
    effective_dilation,
    sampling_locations,
    stacked_sampling_locations,
)
from cupydcn.deform_conv.spec import ConvGrads
from cupydcn.psroi_pool import PSRoiPoolGrads, deform_psroi_pool, deform_psroi_pool_backward
from cupydcn.roi_pool import RoiPoolGrads, deform_roi_pool, deform_roi_pool_backward

__version__ = "0.1.0"

__all__ = [
    "ConvGrads",
    "allow_tf32",
    "conv_algorithm",
    "set_conv_algorithm",
    "is_tf32_allowed",
    "set_allow_tf32",
    "Dcnv3Grads",
    "Dcnv4Grads",
    "MsdaGrads",
    "dcnv3",
    "dcnv3_backward",
    "dcnv4",
    "dcnv4_backward",
    "multi_scale_deformable_attn",
    "multi_scale_deformable_attn_backward",
    "CupydcnError",
    "CupydcnRuntimeError",
    "CupydcnTypeError",
    "CupydcnValueError",
    "DEFAULT_WORKSPACE_BYTES",
    "PADDING_MODES",
    "PSRoiPoolGrads",
    "RoiPoolGrads",
    "StackedSampling",
    "deform_conv2d",
    "deform_conv2d_backward",
    "deform_psroi_pool",
    "deform_psroi_pool_backward",
    "deform_roi_pool",
    "deform_roi_pool_backward",
    "deterministic_mode",
    "effective_dilation",
    "is_deterministic",
    "offset_l2_penalty",
    "offset_l2_penalty_backward",
    "precompile",
    "sampling_locations",
    "set_deterministic",
    "stacked_sampling_locations",
]
