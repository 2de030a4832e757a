"""cupydcn for JAX: the ops as differentiable JAX functions.

``cupydcn.jax.deform_conv2d``, ``deform_roi_pool``, ``deform_psroi_pool`` and the
deformable-attention family (``multi_scale_deformable_attn``, ``dcnv3``, ``dcnv4``; their
``spatial_shapes`` / ``level_start_index`` static) take the
arguments of cupydcn's functional API (arrays are JAX arrays or anything ``jnp.asarray``
accepts; every other argument is static) and return JAX arrays. Each is a
``jax.custom_vjp`` function whose forward and backward call cupydcn's explicit forward and
backward functions, so ``jax.grad``, ``jax.vjp``, ``jax.jit`` and ``jax.vmap`` work:

* eagerly, the functional API runs on the arrays where they live (CPU: NumPy backend,
  CUDA: the CUDA kernels) and its results come back through DLPack;
* under ``jax.jit`` / ``jax.vmap`` on the CPU, through ``jax.pure_callback`` and the NumPy
  backend; on a CUDA device, through ``jax.experimental.buffer_callback``: the CUDA
  kernels run on XLA's stream over XLA's device buffers, without a host round trip;
* ``jax.vmap`` maps the ops sequentially (one call per batch element).

Only the gradients JAX asks for are computed. ``rois`` get a zero gradient and the
``count`` output of ``deform_psroi_pool`` (int32) has no cotangent. Forward-mode
differentiation (``jax.jvp``, ``jax.jacfwd``) is not supported by ``custom_vjp``.

Sharding: under ``jax.jit`` an op's callback is opaque to XLA's partitioner (arrays
sharded over the batch would be all-gathered and the op run whole on every device);
:func:`deform_conv2d_sharded` (a ``jax.shard_map`` over the mesh axis of the batch) has
each device compute only its shard.

Double backward: ``deform_conv2d``'s backward is itself differentiable (reverse over
reverse: ``jax.grad`` of ``jax.grad``, ``jax.jacrev(jax.jacrev(f))``); ``jax.hessian``
(forward over reverse) is refused by JAX, as custom_vjp has no forward mode. The second
derivatives along the offsets are computed on the CPU (NumPy) with padding_mode "zeros"
only; on a GPU or with another padding_mode those terms raise.

Importing this module imports JAX; ``import cupydcn`` alone does not.
"""

from ._deform_attn import dcnv3, dcnv4, multi_scale_deformable_attn
from ._ops import deform_conv2d, deform_psroi_pool, deform_roi_pool
from ._sharding import deform_conv2d_sharded

__all__ = [
    "dcnv3",
    "dcnv4",
    "deform_conv2d",
    "deform_conv2d_sharded",
    "deform_psroi_pool",
    "deform_roi_pool",
    "multi_scale_deformable_attn",
]
