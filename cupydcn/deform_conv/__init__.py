"""deform_conv2d (DCNv1, modulated DCNv2) and its tools: the public functions.

The package: ``spec`` (geometry, options, gradient names, checks), ``numpy_backend``,
``cuda_backend`` (orchestration of ``cupydcn/cuda/kernels/deform_conv.cu``), ``padding``
(out-of-map modes), ``offset_penalty`` and ``sampling`` (tools on the offsets). Every call
goes through :func:`cupydcn.core.dispatch.dispatch`.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from cupydcn.core.dispatch import Backends, dispatch
from cupydcn.cuda.deterministic import backends_with, resolve_deterministic
from cupydcn.deform_conv import cuda_backend, numpy_backend
from cupydcn.deform_conv.spec import (
    BACKWARD_OP,
    DEFAULT_WORKSPACE_BYTES,
    OP,
    ConvGrads,
    ConvOptions,
    prepare_backward,
    prepare_forward,
)

FORWARD = Backends.of_modules(numpy_backend, cuda_backend, "conv_forward")
BACKWARD = Backends.of_modules(numpy_backend, cuda_backend, "conv_backward")

__all__ = [
    "DEFAULT_WORKSPACE_BYTES",
    "ConvGrads",
    "ConvOptions",
    "deform_conv2d",
    "deform_conv2d_backward",
]


def deform_conv2d(
    input,
    offset,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    mask=None,
    *,
    padding_mode: str = "zeros",
    workspace_bytes: int | None = None,
    algorithm: str | None = None,
):
    """Deformable convolution (DCNv1; modulated DCNv2 when ``mask`` is given).

    Drop-in for ``torchvision.ops.deform_conv2d``; any DLPack array library, computed
    where the arrays live, returned in the caller's array type.

    Shapes:
        input  [N, C, H, W]
        offset [N, 2 * G * kh * kw, H_out, W_out] — (dy, dx) pairs per tap, G offset groups
        weight [C_out, C / groups, kh, kw]
        bias   [C_out] or None
        mask   [N, G * kh * kw, H_out, W_out] or None (multiplies each sample; no sigmoid)
        returns [N, C_out, H_out, W_out]
    with H_out = (H + 2 * pad_h - (dil_h * (kh - 1) + 1)) // stride_h + 1 (likewise W_out).

    ``stride``, ``padding``, ``dilation``: an int or an (h, w) pair. ``workspace_bytes``
    bounds the intermediate column buffers (the batch is processed in chunks that fit).
    ``algorithm`` (CUDA arrays only; the result is the same up to float32 summation
    order): "auto" (the fastest of the algorithms that apply, timed on the first call of
    each problem and remembered; ``CUPYDCN_AUTOTUNE_CACHE`` keeps the choices on disk),
    "heuristic" (a fixed choice, no timing), "im2col" (columns + GEMMs, any problem),
    "depthwise" (C / groups == 1, or at most 4 channels per group in and out), or None
    (default: :func:`cupydcn.set_conv_algorithm`'s setting, "auto").

    ``padding_mode`` says how a sample point outside the map is read: "zeros" (default,
    torchvision's: out-of-map pixels are 0), "border" (each coordinate clamped into
    [0, H-1] / [0, W-1]) or "reflection" (mirrored as grid_sample(align_corners=True):
    t = |p| mod 2(H-1), p' = t if t <= H-1 else 2(H-1) - t; p' = 0 when H = 1). Details,
    including the gradients at the kinks, in docs/semantics.md.
    """
    options = ConvOptions.of(locals())
    return dispatch(
        OP,
        {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask},
        required=("input", "offset", "weight"),
        prepare=partial(prepare_forward, options=options),
        backends=FORWARD,
    )


def deform_conv2d_backward(
    grad_output,
    input,
    offset,
    weight,
    mask=None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode: str = "zeros",
    wrt: Iterable[str] | None = None,
    workspace_bytes: int | None = None,
    deterministic: bool | None = None,
    algorithm: str | None = None,
) -> ConvGrads:
    """Gradients of :func:`deform_conv2d` given ``grad_output`` [N, C_out, H_out, W_out].

    Returns ``ConvGrads(grad_input, grad_offset, grad_weight, grad_mask, grad_bias)`` with
    the shapes of input, offset, weight, mask and [C_out]. ``wrt`` names the gradients to
    compute, a subset of ("input", "offset", "weight", "mask", "bias"); the others are None
    and cost nothing. Default: all of them (grad_mask only when ``mask`` is given).
    grad_bias is returned whether or not the forward had a bias (it does not depend on it).

    With ``padding_mode`` "border" / "reflection" the gradients follow the coordinate
    mapping: zero through a clamp, sign-flipped through a reflection. At the kinks: a
    sample exactly on the map's edge (p == 0 or p == H-1) gets the one-sided derivative
    from inside the map (like torchvision's convention at p == -1 in "zeros" mode), and
    at reflection points beyond the map the one-sided derivative of the formula's branch
    that is taken (docs/semantics.md).
    ``deterministic``: True computes grad_input on a GPU without floating-point atomics,
    bitwise identical from run to run (for one GPU architecture, CuPy and NVRTC); None
    (the default) follows :func:`cupydcn.set_deterministic` /
    :func:`cupydcn.deterministic_mode` (off unless set). Its cost, per chunk of images:
    3 kernel launches instead of 1, plus a prefix sum, a sort and two gathers and one
    synchronising device-to-host read; memory I + 8 bytes per column element and
    2 * (I + A) + 8 bytes per contribution at the peak (at most 4 per column element;
    I = 4 or 8 bytes the index type, A = 4 or 8 the accumulation type), within
    ``workspace_bytes`` (smaller chunks). The NumPy backend is deterministic in either
    mode (the argument is accepted and ignored there). ``algorithm`` as for
    :func:`deform_conv2d` (the deterministic backward always takes the column path).
    """
    options = ConvOptions.of(locals())
    return dispatch(
        BACKWARD_OP,
        {
            "grad_output": grad_output,
            "input": input,
            "offset": offset,
            "weight": weight,
            "mask": mask,
        },
        required=("grad_output", "input", "offset", "weight"),
        prepare=partial(prepare_backward, options=options, wrt=wrt),
        backends=backends_with(BACKWARD, resolve_deterministic(BACKWARD_OP, deterministic)),
    )
