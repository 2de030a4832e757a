"""Padding modes: where a sample coordinate outside the map is read (docs/semantics.md §4).

One function, :func:`map_coordinates`, maps a coordinate ``p`` along a dimension of
``size`` pixels to the point ``p'`` the bilinear blend reads, with its derivative
``dp'/dp``; it works on NumPy and CuPy arrays alike (``xp`` is the array module). The
CUDA kernels do the same in ``map_coordinate`` of ``cupydcn/cuda/kernels/padding_modes.cuh``, operation
for operation, so both give bit-identical ``p'`` (``fmod`` is exact).

    zeros       p' = p; points outside the map read 0 in the blend
    border      p' = clamp(p, 0, size - 1)
    reflection  t = |p| mod 2(size - 1);  p' = t if t <= size - 1 else 2(size - 1) - t
                (``grid_sample(..., padding_mode="reflection", align_corners=True)``)

and ``p' = 0`` when ``size == 1`` (border and reflection).

Derivative convention (the slope at the kinks). ``dp'/dp`` is the slope of the branch
of the formula that is taken: border 1 on the closed interval ``[0, size - 1]`` and 0
outside it; reflection ``sign(p)`` (+1 at ``p = 0``) times +1 on the branch
``t <= size - 1`` and -1 on the other; 0 when ``size == 1``. The bilinear blend, for
border and reflection, takes the cell ``[size - 2, size - 1]`` for ``p' == size - 1``
(see :func:`cell_floor`), so its derivative at the last row is the one from inside the
map. Together: a sample exactly on the map's edge (``p == 0`` or ``p == size - 1``) gets
the one-sided derivative from inside the map in both modes (never 0, so zero-initialised
offsets on the edge still learn), clamped points get 0, and at reflection kinks beyond
the map the derivative is one of the two one-sided ones (that of the branch taken).

Non-finite coordinates: NaN stays NaN in every mode; border clamps +-inf to the edges
(slope 0); reflection maps +-inf to NaN (the reflection has no limit there), so such a
sample is NaN like a NaN coordinate.
"""

from __future__ import annotations

from cupydcn.core.errors import value_error

PADDING_MODES = ("zeros", "border", "reflection")

# The runtime argument of the CUDA kernels (PADDING_* in cupydcn/cuda/kernels/padding_modes.cuh).
PADDING_MODE_CODES = {"zeros": 0, "border": 1, "reflection": 2}


def check_padding_mode(op: str, padding_mode) -> str:
    """``padding_mode`` if it is one of :data:`PADDING_MODES`; else a CupydcnValueError."""
    if not isinstance(padding_mode, str) or padding_mode not in PADDING_MODES:
        raise value_error(op, f"padding_mode must be one of {PADDING_MODES}; got {padding_mode!r}")
    return padding_mode


def map_coordinates(xp, p, size: int, mode: str):
    """``(p', dp'/dp)`` for coordinates ``p`` (a floating array of ``xp``, any shape) along
    a dimension of ``size`` pixels, in ``p``'s dtype; see the module docstring.

    ``mode`` is "zeros", "border" or "reflection". For "zeros" ``p'`` is ``p`` itself and
    the slope is 1. Neither input is modified.
    """
    if mode not in PADDING_MODE_CODES:
        raise ValueError(f"padding mode must be one of {PADDING_MODES}; got {mode!r}")
    p = xp.asarray(p)
    dtype = p.dtype
    one = xp.ones((), dtype=dtype)
    zero = xp.zeros((), dtype=dtype)
    if mode == "zeros":
        return p, xp.ones(p.shape, dtype=dtype)
    is_nan = xp.isnan(p)
    if size <= 1:
        return xp.where(is_nan, p, zero), xp.where(is_nan, one, zero)
    last = xp.asarray(size - 1, dtype=dtype)
    if mode == "border":
        outside = (p < 0) | (p > last)
        mapped = xp.where(p < 0, zero, xp.where(p > last, last, p))
        return mapped, xp.where(outside, zero, one)
    span = xp.asarray(2 * (size - 1), dtype=dtype)
    negative = p < 0
    with _quiet(xp):
        t = xp.fmod(xp.abs(p), span)  # exact; NaN for an infinite p
    folded = t > last
    mapped = xp.where(folded, span - t, t)
    slope = xp.where(negative != folded, -one, one)
    return mapped, slope


def cell_floor(xp, mapped, size: int, mode: str):
    """The top-left corner row (column) of the bilinear cell of mapped coordinates
    ``mapped`` (finite, as returned by :func:`map_coordinates`), as floats of their dtype:
    ``floor(p')``, except ``size - 2`` for ``p' == size - 1`` under border and reflection
    (the cell inside the map; same value, derivative from inside)."""
    floor = xp.floor(mapped)
    if mode == "zeros" or size <= 1:
        return floor
    return xp.minimum(floor, xp.asarray(size - 2, dtype=floor.dtype))


class _quiet:
    """``np.errstate(invalid="ignore")`` for NumPy (fmod of inf); nothing for CuPy."""

    def __init__(self, xp):
        import numpy as np

        self._state = np.errstate(invalid="ignore") if xp is np else None

    def __enter__(self):
        if self._state is not None:
            self._state.__enter__()
        return self

    def __exit__(self, *exc):
        if self._state is not None:
            return self._state.__exit__(*exc)
        return False
