"""cupydcn for JAX: the ops as differentiable JAX functions.

``cupydcn.jax.deform_conv2d``, ``deform_roi_pool`` and ``deform_psroi_pool`` take the
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

Importing this module imports JAX; ``import cupydcn`` alone does not.
"""

from ._ops import deform_conv2d, deform_psroi_pool, deform_roi_pool

__all__ = ["deform_conv2d", "deform_psroi_pool", "deform_roi_pool"]
