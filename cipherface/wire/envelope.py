"""The envelope every message travels in, and the size limits, encoded with msgpack.

One envelope for all messages::

    {"v": 1, "type": "<kind>", "id": "<message id>", "fp": "...", "model": "...",
     "metric": "...", "body": {...}}

Decoding checks the size first, then the envelope, then every field's type
(`cipherface.wire.messages`), and raises `WireFormatError` naming what is wrong.
Never pickle: a message is data from another trust zone.

Size: RabbitMQ refuses messages over 128 MiB by default; CipherFace refuses to
encode or decode anything over `MAX_MESSAGE_BYTES` (64 MiB), which leaves room for
headers and for a broker configured lower.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from cipherface.exceptions import WireFormatError
from cipherface.fields import of_type
from cipherface.wire.messages import _KINDS, Message, new_id

__all__ = ["MAX_MESSAGE_BYTES", "SCHEMA_VERSION", "Envelope", "decode", "encode"]

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """A decoded message with the metadata every message carries.

    The key fingerprint, model and metric ride in the envelope so a consumer can
    refuse a message made under another key before it parses any ciphertext.
    """

    id: str
    #: Fingerprint of the CKKS key the payload was made under ('' if none).
    fingerprint: str
    model: str
    metric: str
    message: Message


def encode(
    message: Message,
    *,
    fingerprint: str = "",
    model: str = "",
    metric: str = "",
    message_id: str | None = None,
) -> bytes:
    """Serialize a message into its envelope; refuses to build an oversized one."""
    envelope = {
        "v": SCHEMA_VERSION,
        "type": message.kind,
        "id": message_id or new_id(),
        "fp": fingerprint,
        "model": model,
        "metric": metric,
        "body": message.body(),
    }
    data = msgpack.packb(envelope, use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireFormatError(
            f"{message.kind} message of {len(data)} bytes exceeds the "
            f"{MAX_MESSAGE_BYTES}-byte limit"
        )
    return data


def decode(data: bytes, *, expect: tuple[type[Message], ...] | None = None) -> Envelope:
    """Parse and validate an envelope; ``expect`` restricts the accepted kinds."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireFormatError(
            f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit"
        )
    try:
        envelope = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_MESSAGE_BYTES,
            max_str_len=1024 * 1024,
            max_array_len=1_000_000,
            max_map_len=10_000,
        )
    # msgpack signals malformed input with several unrelated exception types
    # (ExtraData, FormatError, StackError, ValueError, TypeError on truncation).
    except Exception as exc:
        raise WireFormatError(f"not a msgpack message: {type(exc).__name__}: {exc}") from exc
    if not isinstance(envelope, dict):
        raise WireFormatError("message envelope must be a map")
    version = envelope.get("v")
    if version != SCHEMA_VERSION:
        raise WireFormatError(f"unsupported schema version {version!r} (this is {SCHEMA_VERSION})")
    kind = envelope.get("type")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireFormatError(f"unknown message type {kind!r}")
    if expect is not None and cls not in expect:
        allowed = ", ".join(c.kind for c in expect)
        raise WireFormatError(f"unexpected message type {kind!r} here (expected {allowed})")
    head = {
        name: of_type(envelope.get(name), str, name) for name in ("id", "fp", "model", "metric")
    }
    body = envelope.get("body")
    if not isinstance(body, dict):
        raise WireFormatError(f"{kind}: body must be a map")
    try:
        message = cls.from_body(body)
    except WireFormatError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise WireFormatError(f"{kind}: invalid body: {exc}") from exc
    return Envelope(
        id=head["id"],
        fingerprint=head["fp"],
        model=head["model"],
        metric=head["metric"],
        message=message,
    )
