"""The envelope every message travels in, its signature, and the size limits (msgpack).

Two layers, so that the signature covers exact bytes rather than a re-encoding::

    {"v": 2, "signed": <bin: msgpack of the inner map>, "by": "<signer>", "sig": <bin>}
    inner = {"type": "<kind>", "id": "<message id>", "fp": "...", "model": "...",
             "metric": "...", "body": {...}}

``sig`` is the Ed25519 signature of ``by``'s key over ``signed`` (`cipherface.signing`).
Kinds that carry gallery material, scores or decisions (``Message.signed``) are
refused unless a `Verifier` accepts their signature *before* their body is
parsed; probes from users travel unsigned (``by`` and ``sig`` empty), since
whoever may publish a probe is settled by broker permissions, and what a probe
may do by on-prem's checks (`cipherface.gallery.integrity`).

Decoding checks the size first, then both layers, then every field's type
(`cipherface.wire.messages`), and raises `WireFormatError` (or `SignatureError`)
naming what is wrong. Never pickle: a message is data from another trust zone.

Size: every message is small by design. `encode` and `decode` refuse anything
over ``limit`` (`MAX_MESSAGE_BYTES`, 4 MiB, unless `Settings.max_message_size`
says otherwise) with `MessageTooLargeError`, before packing a larger one is sent
or parsing a larger one received. 4 MiB because RabbitMQ 4.x refuses more than
16 MiB by default and large messages stall a queue (a quorum queue replicates
each one whole); the gallery's blocks travel in column chunks under the limit
(`cipherface.wire.chunks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from cipherface.exceptions import (
    ConfigError,
    MessageTooLargeError,
    SignatureError,
    WireFormatError,
)
from cipherface.fields import of_type
from cipherface.signing import SigningKey, Verifier
from cipherface.wire.messages import _KINDS, Message, new_id

__all__ = ["MAX_MESSAGE_BYTES", "SCHEMA_VERSION", "Envelope", "decode", "encode"]

SCHEMA_VERSION = 2
#: The default cap on a message, envelope included (`Settings.max_message_size`).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


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
    #: Who signed it ('' for an unsigned user probe); verified when decoded.
    signer: str
    message: Message


def encode(
    message: Message,
    *,
    fingerprint: str = "",
    model: str = "",
    metric: str = "",
    message_id: str | None = None,
    signer: SigningKey | None = None,
    limit: int = MAX_MESSAGE_BYTES,
) -> bytes:
    """Serialize (and sign) a message into its envelope; refuses one over ``limit`` bytes."""
    if message.signed and signer is None:
        raise ConfigError(f"a {message.kind} message must be signed")
    inner = _pack(
        {
            "type": message.kind,
            "id": message_id or new_id(),
            "fp": fingerprint,
            "model": model,
            "metric": metric,
            "body": message.body(),
        }
    )
    outer = {
        "v": SCHEMA_VERSION,
        "signed": inner,
        "by": "" if signer is None else signer.name,
        "sig": b"" if signer is None else signer.sign(inner),
    }
    data = _pack(outer)
    if len(data) > limit:
        raise MessageTooLargeError(f"{message.kind} message", len(data), limit)
    return data


def decode(
    data: bytes,
    *,
    expect: tuple[type[Message], ...] | None = None,
    verifier: Verifier | None = None,
    limit: int = MAX_MESSAGE_BYTES,
) -> Envelope:
    """Parse and validate an envelope; ``expect`` restricts the accepted kinds.

    A kind that must be signed is parsed only after ``verifier`` accepted its
    signature (`SignatureError` otherwise); a signature on any other kind is
    checked too when a verifier is given. A message over ``limit`` bytes is refused
    (`MessageTooLargeError`) before it is parsed.
    """
    if len(data) > limit:
        raise MessageTooLargeError("message", len(data), limit)
    outer = _unpack(data)
    version = outer.get("v")
    if version != SCHEMA_VERSION:
        raise WireFormatError(f"unsupported schema version {version!r} (this is {SCHEMA_VERSION})")
    inner_bytes = of_type(outer.get("signed"), bytes, "signed")
    signer = of_type(outer.get("by"), str, "by")
    signature = of_type(outer.get("sig"), bytes, "sig")
    envelope = _unpack(inner_bytes)
    kind = envelope.get("type")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireFormatError(f"unknown message type {kind!r}")
    if expect is not None and cls not in expect:
        allowed = ", ".join(c.kind for c in expect)
        raise WireFormatError(f"unexpected message type {kind!r} here (expected {allowed})")
    if cls.signed or signature:
        if verifier is None:
            raise SignatureError(f"a {kind} message needs a trusted signer, and none is pinned")
        if not signature:
            raise SignatureError(f"{kind} message is not signed")
        verifier.verify(signer, signature, inner_bytes)
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
        signer=signer,
        message=message,
    )


def _pack(value: dict[str, Any]) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(data: bytes) -> dict[str, Any]:
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            # No bin can be longer than the (already size-checked) data holding it.
            max_bin_len=len(data),
            max_str_len=1024 * 1024,
            max_array_len=1_000_000,
            max_map_len=10_000,
        )
    # msgpack signals malformed input with several unrelated exception types
    # (ExtraData, FormatError, StackError, ValueError, TypeError on truncation).
    except Exception as exc:
        raise WireFormatError(f"not a msgpack message: {type(exc).__name__}: {exc}") from exc
    if not isinstance(value, dict):
        raise WireFormatError("message envelope must be a map")
    return value
