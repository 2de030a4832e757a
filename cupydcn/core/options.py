"""An op's options (its non-array arguments), declared once as a frozen dataclass.

Each op family declares its options in its ``spec``: :class:`~cupydcn.deform_conv.spec.
ConvOptions`, :class:`~cupydcn.roi_pool.spec.RoiPoolOptions`,
:class:`~cupydcn.psroi_pool.spec.PSRoiPoolOptions`; the field names, types, defaults and
meanings live there. Everything else derives from that declaration:

* the functional API collects a call's options with ``Options.of(locals())`` and its
  ``prepare`` reads them;
* ``cupydcn.torch`` builds each custom op's schema from the fields (one argument per
  field, typed from its annotation), and its fakes and autograd formulas rebuild the
  options from the op's arguments;
* ``cupydcn.jax`` collects them the same way; they are static (closed over by the
  ``custom_vjp`` functions).

Adding an option thus touches its declaration and the public signatures that take it
(which list every option with its declared default; the tests check they agree).

The values are kept as the caller gave them: every check is the op's ``prepare``'s.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

# An int (both dimensions) or an (h, w) pair of ints.
IntPair = Union[int, tuple[int, int]]  # noqa: UP007 (a runtime value: schemas read it)

# Field metadata of an option that changes how the work is done (memory, chunking), never
# the result. cupydcn.torch leaves tuning options out of its custom ops' schemas.
TUNING: Mapping[str, Any] = {"tuning": True}

_O = TypeVar("_O", bound="Options")


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every op's options dataclass."""

    @classmethod
    def field_types(cls, *, tuning: bool = True) -> dict[str, Any]:
        """The fields in declaration order, each with its resolved type annotation; without
        the tuning options when ``tuning`` is False."""
        return dict(_field_types(cls, tuning))

    @classmethod
    def of(cls: type[_O], arguments: Mapping[str, Any]) -> _O:
        """The options among a call's ``arguments`` (e.g. the function's ``locals()``), by
        field name; a field that is not among them takes its default, other names are
        ignored."""
        return cls(
            **{f.name: arguments[f.name] for f in dataclasses.fields(cls) if f.name in arguments}
        )

    def as_kwargs(self, *, tuning: bool = True) -> dict[str, Any]:
        """The options as keyword arguments of the functional API (without the tuning
        options when ``tuning`` is False)."""
        return {name: getattr(self, name) for name in self.field_types(tuning=tuning)}

    def as_tuple(self, *, tuning: bool = True) -> tuple:
        """The option values in declaration order (without the tuning options when
        ``tuning`` is False): the positional arguments of a custom op."""
        return tuple(self.as_kwargs(tuning=tuning).values())


@functools.cache
def _field_types(cls: type, tuning: bool) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple(
        (f.name, hints[f.name])
        for f in dataclasses.fields(cls)
        if tuning or not f.metadata.get("tuning", False)
    )
