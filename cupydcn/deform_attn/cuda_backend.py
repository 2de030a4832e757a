"""The deformable-attention ops on CUDA arrays: NOT BUILT YET (the next step of issue 13).

This module defines the backend functions the dispatch looks up by name
(:meth:`cupydcn.core.dispatch.Backends.of_modules`), with the signatures the kernels'
orchestration will have: ``(launcher, *arrays, geom, **options)``. Each one raises
:class:`~cupydcn.core.errors.CupydcnRuntimeError` for now, after every argument check
has passed (the checks run in ``spec`` before any backend). CPU arrays are computed by
``numpy_backend``.

The planned kernels (issue 13, "Kernels"): one family for the three ops, channels last;
each thread owns a vector of channels of one (query or pixel, head or group); a point's
coordinates, corner offsets and weights are computed once and reused across the
channels; the backward reduces the location and weight gradients across the channels
with warp shuffles and accumulates ``grad_value`` / ``grad_input`` in float32 with
atomics. They must compute docs/semantics.md §8 (the NumPy backend's arithmetic, in
order, so the emulated tests can compare bit for bit where the emulator is exact).
"""

from __future__ import annotations

from cupydcn.core.errors import CupydcnRuntimeError


def _not_built(op: str):
    raise CupydcnRuntimeError(
        f"{op}: the CUDA kernels are not built yet (cupydcn.deform_attn runs on CPU arrays "
        "only, through the NumPy backend; move the arrays to the CPU)"
    )


def msda_forward(
    launcher, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, geom
):
    _not_built("multi_scale_deformable_attn")


def msda_backward(
    launcher,
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    geom,
    *,
    wrt,
):
    _not_built("multi_scale_deformable_attn_backward")


def dcnv3_forward(launcher, input, offset, mask, geom):
    _not_built("dcnv3")


def dcnv3_backward(launcher, grad_output, input, offset, mask, geom, *, wrt):
    _not_built("dcnv3_backward")


def dcnv4_forward(launcher, input, offset_mask, geom):
    _not_built("dcnv4")


def dcnv4_backward(launcher, grad_output, input, offset_mask, geom, *, wrt):
    _not_built("dcnv4_backward")
