"""Type checks for decoded msgpack data, shared by every message and block decoder.

msgpack hands back plain ints, strs, bytes, lists and maps; a peer from another
trust zone decides which. Each check raises `WireFormatError` naming the field,
which is what a consumer dead-letters the message with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cipherface.exceptions import WireFormatError

__all__ = ["blobs", "field", "of_type", "strings"]

Kind = type | tuple[type, ...]


def of_type(value: object, kind: Kind, name: str) -> Any:
    """``value`` if it is of ``kind``; a bool never passes for a number, NaN or an
    infinity never for a float (they would reach timings, JSON and decisions)."""
    numeric = kind in (int, float) or (isinstance(kind, tuple) and int in kind)
    if not isinstance(value, kind) or (numeric and isinstance(value, bool)):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise WireFormatError(f"field {name!r} must be {expected}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise WireFormatError(f"field {name!r} must be a finite number, got {value}")
    return value


def field(data: Mapping[str, object], name: str, kind: Kind) -> Any:
    """``data[name]``, present and of ``kind``."""
    if name not in data:
        raise WireFormatError(f"missing field {name!r}")
    return of_type(data[name], kind, name)


def strings(data: Mapping[str, object], name: str) -> tuple[str, ...]:
    """A list of strings."""
    items = field(data, name, (list, tuple))
    return tuple(of_type(item, str, f"{name}[]") for item in items)


def blobs(data: Mapping[str, object], name: str) -> tuple[bytes, ...]:
    """A list of byte strings."""
    items = field(data, name, (list, tuple))
    return tuple(of_type(item, bytes, f"{name}[]") for item in items)
