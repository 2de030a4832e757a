"""Batch-sharded deform_conv2d for JAX: each device computes only its shard of the batch.

Under ``jax.jit`` with inputs sharded over the batch axis, an opaque callback (how
cupydcn's ops run inside JAX) cannot be partitioned by XLA: it would be all-gathered and
run whole on every device. :func:`deform_conv2d_sharded` runs the op inside a
``jax.shard_map`` over the mesh axis (or axes) of the batch instead: input, offset and mask
are split along their batch dimension, weight and bias are replicated, the output comes
out split along the batch. In the backward, the input, offset and mask gradients stay
sharded and the weight and bias gradients are summed over the batch shards by
``shard_map``'s transpose (one all-reduce of weight-sized arrays, no all-gather).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, PartitionSpec

from cupydcn.core.errors import value_error

from ._ops import deform_conv2d


def deform_conv2d_sharded(
    input,
    offset,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    mask=None,
    *,
    mesh: Mesh,
    batch_axis: str | Sequence[str] = "batch",
    padding_mode: str = "zeros",
    workspace_bytes: int | None = None,
    algorithm: str | None = None,
):
    """:func:`cupydcn.jax.deform_conv2d` with the batch split over ``mesh``'s
    ``batch_axis`` (a mesh axis name, or a tuple of them): every device computes the
    images of its shard only. Differentiable (the weight and bias gradients are summed
    over the shards), usable under ``jax.jit``; the batch size must be a multiple of the
    number of devices along ``batch_axis``. Arguments otherwise as
    :func:`cupydcn.jax.deform_conv2d`; the arrays may come with any sharding (they are
    resharded to the batch split if needed)."""
    axes = (batch_axis,) if isinstance(batch_axis, str) else tuple(batch_axis)
    name = "cupydcn.jax.deform_conv2d_sharded"
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise value_error(name, f"batch_axis {missing} not in the mesh axes {tuple(mesh.shape)}")
    shards = 1
    for a in axes:
        shards *= mesh.shape[a]
    batch = input.shape[0]
    if batch % shards:
        raise value_error(
            name, f"the batch ({batch}) must be a multiple of the {shards} devices along {axes}"
        )
    split, whole = PartitionSpec(axes), PartitionSpec()
    arrays = {
        "input": (input, split),
        "offset": (offset, split),
        "weight": (weight, whole),
        "bias": (bias, whole),
        "mask": (mask, split),
    }
    present = {k: v for k, v in arrays.items() if v[0] is not None}
    names = tuple(present)
    options = dict(
        stride=stride,
        padding=padding,
        dilation=dilation,
        padding_mode=padding_mode,
        workspace_bytes=workspace_bytes,
    )

    def local(*values):
        by_name = dict(zip(names, values))
        return deform_conv2d(
            by_name["input"],
            by_name["offset"],
            by_name["weight"],
            by_name.get("bias"),
            mask=by_name.get("mask"),
            **options,
        )

    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=tuple(s for _, s in present.values()),
        out_specs=split,
        check_vma=False,
    )
    return mapped(*(a for a, _ in present.values()))
