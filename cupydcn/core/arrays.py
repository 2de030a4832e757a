"""The array boundary: where a call's arrays live, their zero-copy native views, and the
way back to the caller's array type.

Everything that knows about array libraries is here. A call resolves its placement once
(:func:`resolve_placement`), converts each argument to the native array of the backend
that will compute (NumPy on the CPU, CuPy on a CUDA device) through DLPack, computes
inside :func:`compute_scope` (right device, right stream), and converts results back
with :func:`to_caller`. Frameworks are never imported here; their arrays are recognised
by ``array_api_compat`` without importing them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from cupydcn.core.errors import type_error, value_error

# DLPack device types (dlpack.h, DLDeviceType).
_DL_CPU = 1
_DL_CUDA = 2


@dataclass(frozen=True)
class Placement:
    """Where a call's arrays live and what they are.

    library: "numpy", "cupy", "torch", "jax" or "dlpack" (any other DLPack producer).
    on_cuda: computed by the CUDA kernels (else by the NumPy backend).
    device_id: the CUDA device index (0 on the CPU).
    """

    library: str
    on_cuda: bool
    device_id: int
    namespace: ModuleType | None


def _library_of(array) -> str | None:
    import array_api_compat as compat

    if compat.is_numpy_array(array):
        return "numpy"
    if compat.is_cupy_array(array):
        return "cupy"
    if compat.is_torch_array(array):
        return "torch"
    if compat.is_jax_array(array):
        return "jax"
    if hasattr(array, "__dlpack__") and hasattr(array, "__dlpack_device__"):
        return "dlpack"
    return None


def _describe(array) -> str:
    cls = type(array)
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_placement(op: str, arrays: dict[str, object]) -> Placement:
    """The one placement shared by every non-None array of ``arrays``.

    Raises TypeError for non-arrays, mixed array libraries or unsupported devices and
    ValueError for arrays on different devices.
    """
    present = {name: a for name, a in arrays.items() if a is not None}
    libraries: dict[str, str] = {}
    for name, array in present.items():
        library = _library_of(array)
        if library is None:
            raise type_error(
                op,
                f"{name} must be an array supporting DLPack (NumPy, CuPy, PyTorch, JAX, ...); "
                f"got {_describe(array)}",
            )
        libraries[name] = library
    first = next(iter(present))
    for name, library in libraries.items():
        if library != libraries[first]:
            raise type_error(
                op,
                f"{first} is a {_describe(present[first])} but {name} is a "
                f"{_describe(present[name])}; pass arrays of one library",
            )
    library = libraries[first]

    devices = {}
    for name, array in present.items():
        try:
            device_type, device_id = array.__dlpack_device__()
        except Exception as exc:  # e.g. a JAX tracer inside jit
            raise type_error(
                op, f"{name} ({_describe(array)}) cannot report its device for DLPack: {exc}"
            ) from exc
        device_type = int(device_type)
        if device_type not in (_DL_CPU, _DL_CUDA):
            raise type_error(
                op,
                f"{name} lives on DLPack device type {device_type}; expected CPU ({_DL_CPU}) "
                f"or CUDA ({_DL_CUDA})",
            )
        devices[name] = (device_type, int(device_id))
    for name, device in devices.items():
        if device != devices[first]:
            raise value_error(
                op,
                f"{first} is on {_device_name(devices[first])} but {name} is on "
                f"{_device_name(device)}; pass arrays on one device",
            )
    device_type, device_id = devices[first]

    namespace = None
    if library != "numpy":
        import array_api_compat as compat

        try:
            namespace = compat.array_namespace(present[first])
        except TypeError:
            namespace = None
    return Placement(
        library, device_type == _DL_CUDA, device_id if device_type == _DL_CUDA else 0, namespace
    )


def _device_name(device: tuple[int, int]) -> str:
    device_type, device_id = device
    return "the CPU" if device_type == _DL_CPU else f"CUDA device {device_id}"


# ------------------------------------------------------------------ into the backend
# The ops with a differentiable counterpart in cupydcn.torch (a backward op's is its
# forward's).
_TORCH_DIFFERENTIABLE = (
    "deform_conv2d",
    "deform_roi_pool",
    "deform_psroi_pool",
    "multi_scale_deformable_attn",
    "dcnv3",
    "dcnv4",
)


def refuse_torch_autograd(op: str, arrays: dict[str, object]) -> None:
    """A CupydcnTypeError if grad mode is on and a PyTorch tensor among ``arrays``
    requires grad: the functional API is not differentiable, so its result would have no
    grad_fn and ``.backward()`` would fail far from here. Under ``torch.no_grad()``, or
    with detached tensors, the call is fine."""
    import torch

    if not torch.is_grad_enabled():
        return
    wanting = [
        name for name, a in arrays.items() if isinstance(a, torch.Tensor) and a.requires_grad
    ]
    if not wanting:
        return
    forward = op.removesuffix("_backward")
    alternative = (
        f"use cupydcn.torch.{forward}, which is differentiable, or "
        if forward in _TORCH_DIFFERENTIABLE
        else ""
    )
    raise type_error(
        op,
        f"{', '.join(wanting)} {'requires' if len(wanting) == 1 else 'require'} grad, "
        f"but cupydcn.{op} is not differentiable (its result would have no grad_fn): "
        f"{alternative}call it under torch.no_grad() or on detached tensors",
    )


def _torch_exportable(tensor):
    """A tensor DLPack can export: detached (natives refuses tensors that require grad
    while grad mode is on), lazily conjugated / negated views resolved."""
    return tensor.detach().resolve_conj().resolve_neg()


def _torch_cpu_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = _torch_exportable(tensor)
    if tensor.dtype == torch.bfloat16:  # NumPy's DLPack has no bfloat16: reinterpret bits
        from cupydcn.core.dtypes import bfloat16_dtype

        return np.from_dlpack(tensor.view(torch.int16)).view(bfloat16_dtype())
    return np.from_dlpack(tensor)


def to_native(placement: Placement, array):
    """A zero-copy NumPy (CPU) or CuPy (CUDA) view of ``array``; None stays None."""
    if array is None:
        return None
    if not placement.on_cuda:
        if placement.library == "numpy":
            return array
        if placement.library == "torch":
            return _torch_cpu_to_numpy(array)
        if placement.library == "jax" and str(array.dtype) == "bfloat16":
            return np.asarray(array)  # NumPy's DLPack has no bfloat16; this is a view
        return np.from_dlpack(array)
    import cupy

    if placement.library == "cupy":
        return array
    if placement.library == "torch":
        array = _torch_exportable(array)
    return cupy.from_dlpack(array)


def natives(op: str, arrays: dict[str, object]) -> tuple[Placement, dict[str, object]]:
    """The placement of a call and zero-copy native views of all its arrays (None kept).

    PyTorch tensors that require grad are refused while grad mode is on
    (:func:`refuse_torch_autograd`)."""
    placement = resolve_placement(op, arrays)
    if placement.library == "torch":
        refuse_torch_autograd(op, arrays)
    # Inside the scope, DLPack imports are ordered on the stream the kernels will use
    # (PyTorch's current stream), so no extra synchronisation is needed.
    with compute_scope(placement):
        return placement, {name: to_native(placement, a) for name, a in arrays.items()}


def array_module(placement: Placement) -> ModuleType:
    """NumPy or CuPy: the module of the native arrays of a placement."""
    if placement.on_cuda:
        import cupy

        return cupy
    return np


def kernel_launcher(placement: Placement):
    """The launcher of the CUDA kernels for a placement on a CUDA device."""
    from cupydcn.cuda.cupy_launcher import cupy_launcher

    return cupy_launcher()


# ------------------------------------------------------------------ computing
@contextlib.contextmanager
def compute_scope(placement: Placement) -> Iterator[None]:
    """Make the placement's device and stream current while the backend computes.

    For PyTorch CUDA tensors the kernels run on PyTorch's current stream of the tensors'
    device, so the call is ordered with the surrounding PyTorch work.
    """
    if not placement.on_cuda:
        yield
        return
    import cupy

    with cupy.cuda.Device(placement.device_id):
        if placement.library == "torch":
            import torch

            torch_stream = torch.cuda.current_stream(placement.device_id)
            with external_stream(torch_stream.cuda_stream, placement.device_id):
                yield
        else:
            yield


class _StreamHandle:
    """A raw ``cudaStream_t`` behind the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, pointer: int) -> None:
        self.pointer = pointer

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.pointer)


def external_stream(pointer: int, device_id: int):
    """A CuPy stream over a stream another library owns (PyTorch's, XLA's), to be made
    current with ``with``; CuPy >= 14 spells it ``Stream.from_external``."""
    import cupy

    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(_StreamHandle(int(pointer)))
    return cupy.cuda.ExternalStream(int(pointer), device_id)  # CuPy 13


# ------------------------------------------------------------------ back to the caller
def _numpy_to_torch(array: np.ndarray):
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_dlpack(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(array)


def to_caller(placement: Placement, result):
    """``result`` (a native array, or None) as the caller's array type, zero-copy.

    NumPy and CuPy callers get the native array itself; other DLPack producers without a
    known namespace get it too. The one copy: JAX on the CPU with bfloat16 (NumPy cannot
    export bfloat16 through DLPack).
    """
    if result is None or placement.library in ("numpy", "cupy", "dlpack"):
        return result
    if placement.library == "torch":
        if placement.on_cuda:
            import torch

            return torch.from_dlpack(result)
        return _numpy_to_torch(result)
    # JAX
    import jax.numpy as jnp

    if not placement.on_cuda and result.dtype.name == "bfloat16":
        return jnp.asarray(result)
    return jnp.from_dlpack(result)
