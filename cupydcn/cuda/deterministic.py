"""The deterministic scatter of the backward kernels (``deterministic=True``).

By default the grad_input kernels (conv ``deform_conv_col2im_input``, RoI and PS-RoI
``backward_input``) add their contributions with floating-point atomics: fast, but the
order of the additions -- and so the rounding of the result -- depends on how the GPU
schedules the threads, and two runs may differ in the last bits.

In the deterministic mode each grad_input kernel has a ``*_slots`` twin built from the
same per-item code (``cupydcn/cuda/kernels/*_deterministic.cu``, the sinks of
``scatter_sinks.cuh``) and :func:`deterministic_scatter` runs::

    slots  = kernel(keys=None)              pass 1: contributions per work item   (launch 1)
    slots  = exclusive prefix sum of slots  (xp.cumsum; one device-to-host read of the total)
    keys, values = kernel(slots, keys, values)
                                            pass 2: each contribution in its own slot, in a
                                            fixed order: item by item, and within an item
                                            in the order its code produces them (launch 2)
    order  = stable argsort of keys         (launcher.stable_argsort / xp.argsort stable)
    sorted_keys, sorted_values = keys[order], values[order]
    out    = segment_sum(sorted_keys, sorted_values)
                                            one thread per target adds its run in slot
                                            order (launch 3)

No floating-point atomics: every sum is formed in one fixed order, independent of the
launch configuration and of the scheduling, so results are bitwise identical from run
to run (on the same GPU architecture, CuPy and NVRTC). The rest of the backward has no
atomics either: grad_offset / grad_mask (one thread per output), and the conv's GEMMs
(cuBLAS, through ``xp.matmul``) and sums (CuPy's reductions), which give the same bits
run to run for one architecture and library version on one stream (cuBLAS documents
that several streams sharing a handle need ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, as
PyTorch's deterministic mode asks).

Cost, per grad_input kernel call (each chunk of images for the conv), with ``I`` the
index type (4 or 8 bytes) and ``A`` the accumulation type (4 bytes; 8 for float64):
memory ``I + 8`` bytes per work item (the counts and their int64 prefix sum) and, at the
peak, at most ``2 * (I + A) + 8`` bytes per contribution (keys, values, the int64 sort
order and the sorted copies), plus the sort's workspace (CuPy: a copy of the keys and
thrust's temporaries); a work item has at most 4 contributions for the conv, 4 per
sample of its bin for the RoI pools. Launches: 3 kernels instead of 1, plus a prefix
sum, a sort and two gathers, and one synchronising read of the total.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from functools import partial

from cupydcn.core.dispatch import Backends
from cupydcn.core.errors import type_error
from cupydcn.cuda.launch import INT32_INDEX_LIMIT, KernelLauncher, launch_kernel

# ---------------------------------------------------------------- the setting

_GLOBAL = [False]  # set_deterministic
_SCOPED: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "cupydcn_deterministic", default=None
)


def set_deterministic(enabled: bool) -> None:
    """Make the backward functions deterministic by default (``enabled=True``) or not
    (False, the default at import), process-wide. A ``deterministic=`` argument of a
    backward call, and :func:`deterministic_mode` (per thread / async context), take
    precedence. ``cupydcn.torch`` is also deterministic while
    ``torch.are_deterministic_algorithms_enabled()``. Only the CUDA kernels change: the
    NumPy backend is deterministic in either mode.
    """
    if not isinstance(enabled, bool):
        raise type_error("cupydcn.set_deterministic", f"enabled must be a bool; got {enabled!r}")
    _GLOBAL[0] = enabled


def is_deterministic() -> bool:
    """Whether backward calls without a ``deterministic=`` argument are deterministic now
    (:func:`deterministic_mode` if one is active, else :func:`set_deterministic`)."""
    scoped = _SCOPED.get()
    return _GLOBAL[0] if scoped is None else scoped


@contextlib.contextmanager
def deterministic_mode(enabled: bool = True) -> Iterator[None]:
    """``with cupydcn.deterministic_mode():`` -- backward calls in the block (in this
    thread or async context) are deterministic (or not, with ``enabled=False``) unless
    they say otherwise; the previous setting is restored on exit."""
    if not isinstance(enabled, bool):
        raise type_error("cupydcn.deterministic_mode", f"enabled must be a bool; got {enabled!r}")
    token = _SCOPED.set(enabled)
    try:
        yield
    finally:
        _SCOPED.reset(token)


def resolve_deterministic(op: str, deterministic) -> bool:
    """A backward call's ``deterministic`` argument (True, False, or None for the current
    setting, :func:`is_deterministic`) as a bool; anything else is a CupydcnTypeError."""
    if deterministic is None:
        return is_deterministic()
    if not isinstance(deterministic, bool):
        raise type_error(
            op,
            f"deterministic must be a bool or None; got {type(deterministic).__name__} "
            f"{deterministic!r}",
        )
    return deterministic


def backends_with(backends, deterministic: bool):
    """``backends`` (a :class:`~cupydcn.core.dispatch.Backends`) with the CUDA one called
    with ``deterministic=``; the NumPy one unchanged (it is deterministic already: each
    gradient element is summed in one fixed order)."""
    return Backends(numpy=backends.numpy, cuda=partial(backends.cuda, deterministic=deterministic))


# ---------------------------------------------------------------- the scatter


# Bytes the deterministic mode needs per work item and (at most) per contribution, by
# index width and accumulation-dtype size: for workspace bounds and the docstrings.
def bytes_per_item(index_bits: int) -> int:
    return index_bits // 8 + 8


def bytes_per_contribution(index_bits: int, acc_itemsize: int) -> int:
    return 2 * (index_bits // 8 + acc_itemsize) + 8


def stable_argsort(launcher: KernelLauncher, keys):
    """The indices that sort ``keys`` (1-D) with a stable sort: the launcher's
    ``stable_argsort`` when it has one, else ``xp.argsort(kind="stable")`` (CuPy's argsort
    is always stable: a radix sort)."""
    sort = getattr(launcher, "stable_argsort", None)
    if sort is not None:
        return sort(keys)
    xp = launcher.xp
    if getattr(xp, "__name__", "") == "cupy":
        return xp.argsort(keys)
    return xp.argsort(keys, kind="stable")


def deterministic_scatter(
    launcher: KernelLauncher,
    kernel: str,
    dtype_name: str,
    index_bits: int,
    total: int,
    geometry: object,
    out,
    sizes: dict[str, int] | None = None,
    **arrays,
) -> None:
    """``out`` (C-contiguous, the accumulation dtype) = the sums, per element, of the
    contributions the slot kernel ``kernel`` (``*_slots``) produces over ``total`` work
    items, formed in a fixed order (module docstring); ``arrays`` are its inputs by
    name, ``sizes`` its size overrides (else from ``geometry``). Every element of
    ``out`` is written (0 where nothing lands)."""
    xp = launcher.xp
    if total == 0 or out.size == 0:
        out[...] = 0
        return
    slots = xp.empty((total,), dtype=xp.dtype(f"int{index_bits}"))
    launch_kernel(
        launcher,
        kernel,
        dtype_name,
        index_bits,
        total,
        geometry,
        sizes,
        slots=slots,
        keys=None,
        values=None,
        **arrays,
    )
    ends = xp.cumsum(slots, dtype=xp.int64)
    count = int(ends[-1])  # the one device-to-host read of this mode
    if count == 0:
        out[...] = 0
        return
    # Slot indices run to count: past the 32-bit limit the record pass and the reduction
    # use 64-bit indices (every size fits those).
    bits = index_bits if count <= INT32_INDEX_LIMIT else 64
    ends -= slots  # exclusive prefix sum: the first slot of each item
    del slots
    starts = ends.astype(xp.dtype(f"int{bits}"), copy=False)
    del ends
    keys = xp.empty((count,), dtype=starts.dtype)
    values = xp.empty((count,), dtype=out.dtype)
    launch_kernel(
        launcher,
        kernel,
        dtype_name,
        bits,
        total,
        geometry,
        sizes,
        slots=starts,
        keys=keys,
        values=values,
        **arrays,
    )
    del starts
    order = stable_argsort(launcher, keys)
    sorted_keys = xp.take(keys, order)
    del keys
    sorted_values = xp.take(values, order)
    del values, order
    launcher.launch(
        "segment_sum",
        dtype_name,
        bits,
        out.size,
        [sorted_keys, sorted_values, out.reshape(-1), count, out.size],
    )
