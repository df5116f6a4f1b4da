"""A message's wire schema, derived from its dataclass annotations: one typed definition.

Each field's annotation says what the body carries after msgpack decoding and how
it becomes the field's value; nothing repeats it by hand. The annotations used by
CipherFace's messages, and what each accepts:

======================  =====================  ==========================================
annotation              msgpack value          field value
======================  =====================  ==========================================
``str`` ``bytes``       that type              as is
``int`` ``float``       that type (never bool) as is
``bool``                bool                   as is
``X | None``            X's, or nil            as X, or None
``tuple[X, ...]``       array                  a tuple, each item checked as ``X[]``
``Mapping[str, float]`` map                    a dict; keys str, values int/float -> float
a payload class         map                    ``cls.from_dict`` (its own validation)
======================  =====================  ==========================================

A payload class is one with ``to_dict`` / ``from_dict`` (`cipherface.wire.payloads`).
Errors are `WireFormatError`s naming ``<kind>.<field>`` (``[]`` for an item, `` key``
for a map key), as a consumer dead-letters them. The same specs describe the
fields as JSON Schema for the AsyncAPI document (`cipherface.wire.asyncapi`).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cipherface.fields import Kind, of_type

__all__ = ["FieldSpec", "field_specs", "spec_of"]

_NONE = type(None)
_SCALARS: Mapping[type, Mapping[str, str]] = {
    str: {"type": "string"},
    bytes: {"type": "string", "format": "binary"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
}


@dataclass(frozen=True, slots=True, kw_only=True)
class FieldSpec:
    """How one annotated field travels: accepted msgpack types, and both conversions."""

    #: What `of_type` accepts for the decoded value.
    accepts: Kind
    #: (checked value, field label) -> the field's value; may check items further.
    decode: Callable[[Any, str], Any]
    #: The field's value -> its msgpack-native form.
    encode: Callable[[Any], Any]
    #: The field as JSON Schema (for the AsyncAPI document).
    schema: Mapping[str, Any]


def _same(value: Any, *_: object) -> Any:
    return value


def spec_of(annotation: Any) -> FieldSpec:
    """The `FieldSpec` of one (evaluated) annotation; `TypeError` for an unsupported one."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _SCALARS:
        return FieldSpec(
            accepts=annotation, decode=_same, encode=_same, schema=_SCALARS[annotation]
        )
    if origin in (typing.Union, types.UnionType) and _NONE in args and len(args) == 2:
        inner = spec_of(next(a for a in args if a is not _NONE))
        accepts = inner.accepts if isinstance(inner.accepts, tuple) else (inner.accepts,)
        return FieldSpec(
            accepts=(*accepts, _NONE),
            decode=lambda v, name: None if v is None else inner.decode(v, name),
            encode=lambda v: None if v is None else inner.encode(v),
            schema={"oneOf": [inner.schema, {"type": "null"}]},
        )
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = spec_of(args[0])
        return FieldSpec(
            accepts=list,
            decode=lambda v, name: tuple(
                item.decode(of_type(i, item.accepts, f"{name}[]"), f"{name}[]") for i in v
            ),
            encode=lambda v: [item.encode(i) for i in v],
            schema={"type": "array", "items": item.schema},
        )
    if origin in (Mapping, dict) and args == (str, float):
        # Whole seconds may arrive as msgpack ints; the field holds floats either way.
        return FieldSpec(
            accepts=dict,
            decode=lambda v, name: {
                of_type(k, str, f"{name} key"): float(of_type(x, (int, float), name))
                for k, x in v.items()
            },
            encode=dict,
            schema={"type": "object", "additionalProperties": {"type": "number"}},
        )
    if isinstance(annotation, type) and hasattr(annotation, "from_dict"):
        return FieldSpec(
            accepts=dict,
            decode=lambda v, _: annotation.from_dict(v),
            encode=lambda v: v.to_dict(),
            schema={"$ref": f"#/components/schemas/{annotation.__name__}"},
        )
    raise TypeError(f"no wire form for the annotation {annotation!r}")


@functools.cache
def field_specs(cls: type) -> Mapping[str, FieldSpec]:
    """Every dataclass field of ``cls``, in order, with its `FieldSpec`."""
    hints = typing.get_type_hints(cls)
    return {f.name: spec_of(hints[f.name]) for f in dataclasses.fields(cls)}
