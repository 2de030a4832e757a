"""BLAS threading policy of the NumPy backends.

Why. The NumPy backends issue many small GEMMs (per image and weight group). OpenBLAS (and
other BLAS libraries) start their thread pool on every product above a tiny size, and when
other processes share the cores the pool's threads wait for each other: measured on a
2-core machine under load (benchmarks/cpu/gemm_threads.py, the tables in
benchmarks/results/cpu/), a 5-6 MFLOP product took 0.06 ms with one thread and 90-140 ms
in three of four runs with the default two; a convolution forward+backward with 16-64
channels ran 2-7x faster with one thread; products of ~5 GFLOP took about the same time
either way under load (the run-to-run spread exceeded the difference), and two threads
help them on idle cores. So the cost of threads on a busy machine is a roughly fixed wait
per product, the gain at most the thread count.

Policy (``"auto"``, the default): every GEMM of the backends below ``SMALL_GEMM_FLOPS``
(2**30 floating-point operations) runs with one BLAS thread; larger ones run with whatever
the BLAS library is set to (its own default, or the user's ``OPENBLAS_NUM_THREADS`` /
``OMP_NUM_THREADS`` / threadpoolctl setting). The limit is applied only around the
backend's own products and undone after them, through ``threadpoolctl``, an optional
dependency (``pip install cupydcn[cpu]``); without it the policy does nothing and the BLAS
library's setting applies to every product.

What a user can set, by the environment variable ``CUPYDCN_BLAS_THREADS`` (read at the
first product) or :func:`set_blas_threads` (takes precedence):

* ``"auto"``: the policy above;
* ``"blas"``: never touch the BLAS threads (the BLAS library's setting applies);
* an integer ``n >= 1``: at most ``n`` BLAS threads for every product of the backends.

The BLAS thread count is a process-wide setting: while a backend product runs under a
limit, products of other Python threads run under it too.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

ENV_VAR = "CUPYDCN_BLAS_THREADS"
SMALL_GEMM_FLOPS = 2**30

Policy = str | int

_lock = threading.Lock()
_policy: Policy | None = None  # None: not chosen yet (read ENV_VAR)
_controller_cache: list = []  # [] not looked up; [None] threadpoolctl absent; [controller]


def parse_policy(value: object) -> Policy:
    """``"auto"``, ``"blas"`` or an int >= 1 from a setting (strings are stripped and
    lower-cased; ``"4"`` is 4). Raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{ENV_VAR}: expected 'auto', 'blas' or an int >= 1; got {value!r}")
    if isinstance(value, int):
        if value >= 1:
            return int(value)
        raise ValueError(f"{ENV_VAR}: a thread count must be >= 1; got {value!r}")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("auto", "blas"):
            return text
        if text.isdigit() and int(text) >= 1:
            return int(text)
    raise ValueError(f"{ENV_VAR}: expected 'auto', 'blas' or an int >= 1; got {value!r}")


def get_blas_threads() -> Policy:
    """The policy in force: set by :func:`set_blas_threads`, else ``CUPYDCN_BLAS_THREADS``,
    else ``"auto"`` (an unreadable variable warns once and means ``"auto"``)."""
    global _policy
    with _lock:
        if _policy is None:
            text = os.environ.get(ENV_VAR, "").strip()
            try:
                _policy = parse_policy(text) if text else "auto"
            except ValueError as error:
                warnings.warn(f"{error}; using 'auto'", RuntimeWarning, stacklevel=2)
                _policy = "auto"
        return _policy


def set_blas_threads(policy: object = None) -> Policy:
    """Set the policy (``"auto"``, ``"blas"`` or an int >= 1; None: back to
    ``CUPYDCN_BLAS_THREADS`` / ``"auto"``). Returns the previous policy."""
    global _policy
    new = None if policy is None else parse_policy(policy)
    previous = get_blas_threads()
    with _lock:
        _policy = new
    return previous


def threads_for(flops: int, policy: Policy) -> int | None:
    """The BLAS thread limit for one product of ``flops`` floating-point operations under
    ``policy``: an int, or None for "leave the BLAS setting alone"."""
    if policy == "blas":
        return None
    if policy == "auto":
        return 1 if flops < SMALL_GEMM_FLOPS else None
    return int(policy)


def _controller():
    """threadpoolctl's controller of the BLAS libraries loaded now (looked up once), or
    None when threadpoolctl is not installed or finds no BLAS library."""
    if not _controller_cache:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            controller = None
        else:
            try:
                controller = ThreadpoolController().select(user_api="blas")
                if not controller.lib_controllers:
                    controller = None
            except Exception:  # a broken BLAS introspection must not break the backend
                controller = None
        _controller_cache.append(controller)
    return _controller_cache[0]


def has_thread_control() -> bool:
    """Whether the policy can act (threadpoolctl installed and a BLAS library found)."""
    return _controller() is not None


def blas_threads_for(flops: int) -> contextlib.AbstractContextManager:
    """Context manager for one backend product of ``flops`` operations: limits the BLAS
    threads as the policy says while it runs (a no-op when the policy leaves them alone,
    when they are already within the limit, or without threadpoolctl)."""
    limit = threads_for(flops, get_blas_threads())
    if limit is None:
        return contextlib.nullcontext()
    controller = _controller()
    if controller is None:
        return contextlib.nullcontext()
    if all(lib.num_threads <= limit for lib in controller.lib_controllers):
        return contextlib.nullcontext()
    return controller.limit(limits=limit, user_api="blas")
