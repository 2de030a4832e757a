"""The one family of errors cupydcn raises for bad input.

Every message says which operation was being prepared, which argument was wrong,
what was expected and what was got, e.g.::

    deform_conv2d: offset has shape (2, 17, 5, 5); expected (2, 18, 5, 5)
    (2 * offset_groups * kh * kw = 2 * 1 * 3 * 3 channels at the output size 5 x 5)

The classes subclass the built-in ``ValueError`` / ``TypeError`` so callers can catch
either the standard type or :class:`CupydcnError` for everything of ours.
"""

from __future__ import annotations


class CupydcnError(Exception):
    """Base class of every error cupydcn raises on purpose."""


class CupydcnValueError(CupydcnError, ValueError):
    """An argument has the right type but a wrong shape or value."""


class CupydcnTypeError(CupydcnError, TypeError):
    """An argument has the wrong type, dtype, array library or device."""


class CupydcnRuntimeError(CupydcnError, RuntimeError):
    """A kernel could not be compiled or launched (CUDA errors land here)."""


def value_error(op: str, message: str) -> CupydcnValueError:
    return CupydcnValueError(f"{op}: {message}")


def type_error(op: str, message: str) -> CupydcnTypeError:
    return CupydcnTypeError(f"{op}: {message}")
