"""deform_psroi_pool and its backward: the public functions.

Deformable position-sensitive RoI pooling (R-FCN; MSRA's DeformablePSROIPooling), with
the semantics of docs/semantics.md §3. Every argument is checked before any kernel
runs; errors name the argument, the expected and the actual value.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from cupydcn.core.dispatch import Backends, dispatch
from cupydcn.cuda.deterministic import backends_with, resolve_deterministic
from cupydcn.psroi_pool import cuda_backend, numpy_backend
from cupydcn.psroi_pool.spec import (
    BACKWARD_OP,
    OP,
    PSRoiPoolGrads,
    PSRoiPoolOptions,
    check_values,
    prepare_backward,
    prepare_forward,
)

FORWARD = Backends.of_modules(numpy_backend, cuda_backend, "psroi_pool_forward")
BACKWARD = Backends.of_modules(numpy_backend, cuda_backend, "psroi_pool_backward")

__all__ = ["PSRoiPoolGrads", "PSRoiPoolOptions", "deform_psroi_pool", "deform_psroi_pool_backward"]


def deform_psroi_pool(
    input,
    rois,
    offset=None,
    *,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int | None = None,
    sample_per_part: int = 4,
    spatial_scale: float = 1.0,
    trans_std: float = 0.1,
):
    """Deformable position-sensitive RoI pooling (R-FCN; MSRA DeformablePSROIPooling).

    Any DLPack arrays; computed where they live and returned in the caller's array type.

    Shapes:
        input  [N, output_dim * group_size**2, H, W]
        rois   [K, 5] rows (batch_index, x1, y1, x2, y2) in image coordinates, any
               floating dtype; batch_index an integer in [0, N)
        offset [K, 2 * num_classes, part_size, part_size] or None (no_trans). Output
               channel d uses class d // (output_dim // num_classes): channel 2 * class
               moves the bins in x, 2 * class + 1 in y, in units of trans_std * RoI size.
        returns (output [K, output_dim, P, P], count [K, output_dim, P, P]) with
        P = pooled_size; count (int32) = the samples of each bin inside the map, whose
        mean the output is (0 where none).

    ``part_size`` defaults to ``pooled_size``; bin (i, j) moves with offset cell
    (floor(i * part_size / P), floor(j * part_size / P)). Each bin averages
    ``sample_per_part``**2 bilinear samples of its position-sensitive input channel.

    Limits (checked before any kernel; CupydcnValueError naming the argument and the
    limit): ``sample_per_part`` is at most 1024, so a bin averages at most
    ``cupydcn.core.rois.MAX_SAMPLES_PER_BIN`` = 2**20 samples (a bound on the work of one
    kernel thread); ``group_size``, ``pooled_size`` and ``part_size`` are at most 46340
    (isqrt(2**31 - 1): the kernels multiply two of them in 32-bit ints) and
    ``output_dim`` at most 2**31 - 1. The NumPy backend keeps its temporaries within a
    fixed workspace (256 MiB), besides the arguments and the results.
    """
    options = PSRoiPoolOptions.of(locals())
    return dispatch(
        OP,
        {"input": input, "rois": rois, "offset": offset},
        required=("input", "rois"),
        prepare=partial(prepare_forward, options=options),
        check_values=partial(check_values, OP),
        backends=FORWARD,
    )


def deform_psroi_pool_backward(
    grad_output,
    input,
    rois,
    offset=None,
    *,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int | None = None,
    sample_per_part: int = 4,
    spatial_scale: float = 1.0,
    trans_std: float = 0.1,
    wrt: Iterable[str] | None = None,
    deterministic: bool | None = None,
) -> PSRoiPoolGrads:
    """Gradients of :func:`deform_psroi_pool` given ``grad_output`` [K, output_dim, P, P].

    Takes the forward's arguments (not its ``count``: the sample counts are recomputed,
    which costs only coordinate arithmetic). Returns ``PSRoiPoolGrads(grad_input,
    grad_offset)`` with the shapes of input and offset. ``wrt`` names the gradients to
    compute, a subset of ("input", "offset"); the others are None and cost nothing.
    Default: both (grad_offset only when ``offset`` is given).

    At the kinks it follows MSRA's backward: the count of a bin is a constant, and the
    derivative of a sample along x (y) is 0 where its clamped coordinate is an integer
    (MSRA's floor and ceil corners coincide), which includes every clamped sample.
    ``deterministic``: True computes grad_input on a GPU without floating-point atomics,
    bitwise identical from run to run (for one GPU architecture, CuPy and NVRTC); None
    (the default) follows :func:`cupydcn.set_deterministic` /
    :func:`cupydcn.deterministic_mode` (off unless set). Its cost: 3 kernel launches
    instead of 1, plus a prefix sum, a sort and two gathers and one synchronising
    device-to-host read; memory I + 8 bytes per output element and 2 * (I + A) + 8
    bytes per contribution at the peak (up to 4 per kept sample of a bin; I = 4 or 8 bytes
    the index type, A = 4 or 8 the accumulation type). The NumPy backend is
    deterministic in either mode (the argument is accepted and ignored there).
    """
    options = PSRoiPoolOptions.of(locals())
    return dispatch(
        BACKWARD_OP,
        {"grad_output": grad_output, "input": input, "rois": rois, "offset": offset},
        required=("grad_output", "input", "rois"),
        prepare=partial(prepare_backward, options=options, wrt=wrt),
        check_values=partial(check_values, BACKWARD_OP),
        backends=backends_with(BACKWARD, resolve_deterministic(BACKWARD_OP, deterministic)),
    )
