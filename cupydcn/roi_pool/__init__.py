"""deform_roi_pool and its backward: the public functions.

Deformable RoI pooling as mmcv's ``DeformRoIPool`` (docs/semantics.md §2), plus a
native modulation mask: each bin of each RoI is the RoIAlign average of a grid of
bilinear samples, the bin shifted by ``gamma * roi_size * offset`` and its average
multiplied by ``mask``. With ``offset=None`` and ``mask=None`` it equals
``torchvision.ops.roi_align(..., aligned=True)``.

Every check runs before any kernel: shapes, dtypes and options in ``spec``; the values of
``rois`` inside the dispatch, on the arrays' device and stream (one small device-to-host
transfer on a GPU).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from cupydcn.core.dispatch import Backends, dispatch
from cupydcn.cuda.deterministic import backends_with, resolve_deterministic
from cupydcn.roi_pool import cuda_backend, numpy_backend
from cupydcn.roi_pool.spec import (
    BACKWARD_OP,
    OP,
    RoiPoolGrads,
    RoiPoolOptions,
    check_values,
    prepare_backward,
    prepare_forward,
)

FORWARD = Backends.of_modules(numpy_backend, cuda_backend, "roi_pool_forward")
BACKWARD = Backends.of_modules(numpy_backend, cuda_backend, "roi_pool_backward")

__all__ = ["RoiPoolGrads", "RoiPoolOptions", "deform_roi_pool", "deform_roi_pool_backward"]


def deform_roi_pool(
    input,
    rois,
    offset=None,
    mask=None,
    *,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
):
    """Deformable RoI pooling (mmcv DeformRoIPool; modulated when ``mask`` is given).

    Any DLPack array library; computed where the arrays live (CUDA kernels or the NumPy
    backend) and returned in the caller's array type.

    Shapes:
        input  [N, C, H, W]
        rois   [K, 5] rows (batch_index, x1, y1, x2, y2) in input-image coordinates, any
               floating dtype; batch_index an integer value in [0, N)
        offset [K, 2, ph, pw] or None — channel 0 shifts x, channel 1 shifts y, in units
               of gamma * RoI width / height
        mask   [K, 1, ph, pw] or None — multiplies each bin's average
        returns [K, C, ph, pw] in the dtype of input

    ``output_size``: int or (ph, pw). ``spatial_scale`` maps RoI coordinates onto the
    input map. ``sampling_ratio``: samples per bin along each axis; 0 means
    ceil(RoI size / output size) per RoI. Half types compute in float32 and round once.

    Limits (checked before any kernel; CupydcnValueError naming the argument and the
    limit): a bin averages at most ``cupydcn.core.rois.MAX_SAMPLES_PER_BIN`` = 2**20
    samples (a 1024 x 1024 grid), which bounds the work of one kernel thread. So
    ``sampling_ratio`` is at most 1024; with ``sampling_ratio=0`` each RoI's grid,
    ceil(h * spatial_scale / ph) x ceil(w * spatial_scale / pw) in the accumulation
    dtype, must stay within the limit, and the error names the first RoI that does not
    (pass a sampling_ratio, a larger output_size or a smaller RoI). ``output_size`` is at
    most 2**31 - 1 per axis. The NumPy backend keeps its temporaries within a fixed
    workspace (256 MiB) whatever the grid, besides the arguments, the results and a
    channels-last copy of the input; a 2**20-sample bin still costs it a fraction of a
    second per RoI, channel and bin.
    """
    options = RoiPoolOptions.of(locals())
    return dispatch(
        OP,
        {"input": input, "rois": rois, "offset": offset, "mask": mask},
        required=("input", "rois"),
        prepare=partial(prepare_forward, options=options),
        check_values=partial(check_values, OP),
        backends=FORWARD,
    )


def deform_roi_pool_backward(
    grad_output,
    input,
    rois,
    offset=None,
    mask=None,
    *,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    wrt: Iterable[str] | str | None = None,
    deterministic: bool | None = None,
) -> RoiPoolGrads:
    """Gradients of :func:`deform_roi_pool` given ``grad_output`` [K, C, ph, pw].

    Returns ``RoiPoolGrads(grad_input [N, C, H, W], grad_offset [K, 2, ph, pw],
    grad_mask [K, 1, ph, pw])``. ``wrt`` names the gradients to compute, a subset of
    ("input", "offset", "mask"); the others are None and cost nothing. Default: input,
    plus offset and mask when they are given. There is no gradient for ``rois``.

    Where a sample is not differentiable the derivative is taken as: 0 along a
    coordinate that is clamped (in [-1, 0), or at / beyond the last row or column) and
    for samples outside [-1, H] x [-1, W]; one-sided from the right at integer
    coordinates (docs/semantics.md §2).
    ``deterministic``: True computes grad_input on a GPU without floating-point atomics,
    bitwise identical from run to run (for one GPU architecture, CuPy and NVRTC); None
    (the default) follows :func:`cupydcn.set_deterministic` /
    :func:`cupydcn.deterministic_mode` (off unless set). Its cost: 3 kernel launches
    instead of 1, plus a prefix sum, a sort and two gathers and one synchronising
    device-to-host read; memory I + 8 bytes per grad_output element and 2 * (I + A) + 8
    bytes per contribution at the peak (up to 4 per sample of a bin; I = 4 or 8 bytes
    the index type, A = 4 or 8 the accumulation type). The NumPy backend is
    deterministic in either mode (the argument is accepted and ignored there).
    """
    options = RoiPoolOptions.of(locals())
    return dispatch(
        BACKWARD_OP,
        {"grad_output": grad_output, "input": input, "rois": rois, "offset": offset, "mask": mask},
        required=("grad_output", "input", "rois"),
        prepare=partial(prepare_backward, options=options, wrt=wrt),
        check_values=partial(check_values, BACKWARD_OP),
        backends=backends_with(BACKWARD, resolve_deterministic(BACKWARD_OP, deterministic)),
    )
