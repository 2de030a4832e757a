"""How a cupydcn call runs inside JAX: eagerly, or staged out under a transformation.

:func:`run` takes ``compute``, a function of arrays that calls cupydcn's functional API
and returns a tuple of arrays, the shapes and dtypes of that tuple, and the arguments.

* All arguments concrete (no tracer: plain eager code, also eager ``jax.grad``):
  ``compute`` runs at once. On the CPU it gets zero-copy NumPy views and its results
  come back through DLPack (zero-copy where JAX allows it: 64-byte-aligned buffers, not
  bfloat16); on a CUDA device it gets the JAX arrays, which cupydcn's array boundary
  moves in and out through DLPack.
* Some argument is a tracer (``jax.jit``, ``jax.vmap``, ...): the call is staged out
  with :func:`jax.lax.platform_dependent`, which keeps only the branch of the platform
  the computation is compiled for:

  - ``cpu``: :func:`jax.pure_callback`; ``compute`` gets NumPy views of the operands
    and runs on the NumPy backend; XLA copies the results into its output buffers.
  - ``cuda``: ``jax.experimental.buffer_callback``; ``compute`` gets CuPy arrays over
    XLA's device buffers and runs the CUDA kernels on XLA's stream (no host round
    trip); the results are copied into XLA's output buffers on that stream (one
    device-to-device copy each, as cupydcn allocates its outputs itself). With a JAX
    that has no ``buffer_callback`` the ``cuda`` branch falls back to
    :func:`jax.pure_callback` (a round trip through host memory, NumPy backend).

  Both callbacks are batched by ``jax.vmap`` sequentially (one call per batch element).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cupydcn.core.arrays import external_stream

try:  # JAX >= 0.7
    from jax.experimental.buffer_callback import buffer_callback
except ImportError:  # pragma: no cover - older JAX: the GPU path round-trips via the host
    buffer_callback = None

Compute = Callable[..., tuple]


def is_traced(arrays: Sequence[object]) -> bool:
    """Whether any of ``arrays`` is a JAX tracer (an abstract value inside a transformation)."""
    return any(isinstance(a, jax.core.Tracer) for a in arrays)


def run(
    compute: Compute, out_types: tuple[jax.ShapeDtypeStruct, ...], arrays: Sequence[object]
) -> tuple:
    """``compute(*arrays)`` as a tuple of JAX arrays of ``out_types``, eagerly or staged."""
    if not is_traced(arrays):
        return _eager(compute, arrays)
    return tuple(
        jax.lax.platform_dependent(
            *arrays,
            cpu=lambda *xs: _on_host(compute, out_types, xs),
            cuda=lambda *xs: _on_cuda(compute, out_types, xs),
        )
    )


# ---------------------------------------------------------------------------- eager
def _eager(compute: Compute, arrays) -> tuple:
    # Cotangents may come as NumPy arrays (e.g. from jax.test_util.check_grads).
    arrays = [jnp.asarray(a) for a in arrays]
    if any(device.platform != "cpu" for a in arrays for device in a.devices()):
        return tuple(compute(*arrays))  # cupydcn's DLPack boundary, computed on the device
    # On the CPU: zero-copy NumPy views in (bfloat16 included, which NumPy cannot import
    # through DLPack), the NumPy backend's results back through DLPack.
    return tuple(_from_numpy(r) for r in compute(*(np.asarray(a) for a in arrays)))


def _from_numpy(result: np.ndarray) -> jax.Array:
    """A JAX array over a NumPy result: zero-copy where JAX allows (a 64-byte-aligned
    buffer); bfloat16 is copied, as NumPy cannot export it through DLPack."""
    if result.dtype.name == "bfloat16":
        return jnp.asarray(result)
    return jnp.from_dlpack(result)


# ---------------------------------------------------------------------------- CPU
def _on_host(compute: Compute, out_types, arrays):
    def host(*xs):
        return tuple(compute(*(np.asarray(x) for x in xs)))

    return jax.pure_callback(host, out_types, *arrays, vmap_method="sequential")


# ---------------------------------------------------------------------------- CUDA
def _on_cuda(compute: Compute, out_types, arrays):
    if buffer_callback is None:  # pragma: no cover - older JAX
        return _on_host(compute, out_types, arrays)

    def callback(ctx, outs, *ins):
        import cupy

        device = int((outs[0] if outs else ins[0]).__dlpack_device__()[1])
        with cupy.cuda.Device(device), _xla_stream(cupy, ctx.stream, device):
            results = compute(*(_cupy_view(cupy, b, device) for b in ins))
            for buffer, result in zip(outs, results):
                _copy_into(cupy, _cupy_view(cupy, buffer, device), result)

    return buffer_callback(callback, out_types, vmap_method="sequential")(*arrays)


def _xla_stream(cupy, pointer: int, device: int):
    """A CuPy stream over XLA's stream, to be made current with ``with``."""
    return external_stream(pointer, device)


def _cupy_view(cupy, buffer, device: int):
    """A CuPy array over an XLA device buffer (no copy; the buffer keeps it alive)."""
    interface = buffer.__cuda_array_interface__
    shape = tuple(int(s) for s in interface["shape"])
    dtype = np.dtype(buffer.dtype)
    if interface.get("strides") not in (None, _c_strides(shape, dtype.itemsize)):
        raise ValueError(f"cupydcn.jax: expected a row-major XLA buffer; got {interface}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0:
        return cupy.empty(shape, dtype=dtype)
    memory = cupy.cuda.UnownedMemory(int(interface["data"][0]), nbytes, buffer, device)
    return cupy.ndarray(shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(memory, 0))


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _copy_into(cupy, target, result) -> None:
    """Copy ``result`` into the XLA output buffer ``target`` on the current stream: a
    device-to-device memcpy (any dtype, bfloat16 included)."""
    if tuple(result.shape) != tuple(target.shape) or result.dtype != target.dtype:
        raise ValueError(
            f"cupydcn.jax: a result of shape {tuple(result.shape)} and dtype {result.dtype} "
            f"does not fit the XLA buffer of shape {tuple(target.shape)} and dtype "
            f"{target.dtype}"
        )
    if target.nbytes == 0:
        return
    if not result.flags.c_contiguous:
        result = cupy.ascontiguousarray(result)
    target.data.copy_from_device_async(result.data, target.nbytes, cupy.cuda.get_current_stream())
