"""The wire contract: round trips, validation, limits."""

from __future__ import annotations

import msgpack
import pytest

from cipherface import wire
from cipherface.exceptions import WireFormatError
from cipherface.wire import envelope


def _roundtrip(message: wire.Message) -> wire.Envelope:
    data = wire.encode(message, fingerprint="ab12", model="Dlib", metric="cosine", message_id="m1")
    return wire.decode(data)


def test_probe_roundtrip_keeps_bytes_raw() -> None:
    request = wire.ProbeRequest(probe_id="p1", image=b"\xff\xd8jpeg", subject="alice")
    envelope = _roundtrip(request)
    assert envelope.message == request
    assert (envelope.id, envelope.fingerprint, envelope.model, envelope.metric) == (
        "m1",
        "ab12",
        "Dlib",
        "cosine",
    )
    raw = msgpack.unpackb(wire.encode(request), raw=False)
    assert isinstance(raw["body"]["image"], bytes)  # msgpack bin, not base64 text


@pytest.mark.parametrize(
    "message",
    [
        wire.ContextUpdate(context=b"ctx", blocks=(0, 1, 2)),
        wire.SyncRequest(replica="r1", fingerprint="ab12"),
        wire.ProbeRejected(
            probe_id="p", subject=None, error="NoFaceError", reason="x", submitted_at=1.0
        ),
        wire.VerificationEvent(
            probe_id="p",
            mode="1:N",
            subject="bob",
            verified=True,
            distance=0.0312,
            threshold=0.07,
            model="Dlib",
            metric="cosine",
            timings={"total": 1.5},
        ),
    ],
)
def test_roundtrip(message: wire.Message) -> None:
    assert _roundtrip(message).message == message


def test_event_routing_keys() -> None:
    base = dict(threshold=0.07, model="Dlib", metric="cosine", distance=0.1, subject="s")
    assert (
        wire.VerificationEvent(probe_id="a", mode="1:1", verified=True, **base).routing_key
        == "event.1to1.verified"
    )
    assert (
        wire.VerificationEvent(probe_id="a", mode="1:N", verified=False, **base).routing_key
        == "event.1toN.rejected"
    )
    errored = wire.VerificationEvent(probe_id="a", mode="1:N", verified=False, error="x", **base)
    assert errored.routing_key == "event.1toN.error"


def _raw_probe(body: dict[str, object]) -> bytes:
    """A probe envelope with a hand-made body, bypassing `wire.encode`'s checks."""
    head = {"v": 1, "type": "probe", "id": "i", "fp": "", "model": "", "metric": ""}
    return msgpack.packb({**head, "body": body}, use_bin_type=True)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "not a msgpack message"),
        (b"\xc1", "not a msgpack message"),
        (msgpack.packb([1, 2]), "envelope must be a map"),
        (msgpack.packb({"v": 99, "type": "probe"}), "unsupported schema version"),
        (msgpack.packb({"v": 1, "type": "pickle"}), "unknown message type"),
        (_raw_probe({}), "missing field"),
        (
            _raw_probe({"probe_id": 7, "image": b"", "subject": None, "submitted_at": 1.0}),
            "probe.probe_id",
        ),
    ],
)
def test_invalid_messages_raise_typed_errors(data: bytes, fragment: str) -> None:
    with pytest.raises(WireFormatError, match=fragment):
        wire.decode(data)


def test_truncated_message_is_refused() -> None:
    data = wire.encode(wire.ProbeRequest(probe_id="p", image=b"x" * 1000))
    for cut in (1, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(WireFormatError):
            wire.decode(data[:cut])


def test_unexpected_kind_is_refused() -> None:
    data = wire.encode(wire.SyncRequest(replica="r"))
    with pytest.raises(WireFormatError, match="unexpected message type"):
        wire.decode(data, expect=(wire.ProbeRequest,))


def test_oversized_messages_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envelope, "MAX_MESSAGE_BYTES", 1000)
    with pytest.raises(WireFormatError, match="exceeds"):
        wire.encode(wire.ProbeRequest(probe_id="p", image=b"x" * 2000))
    with pytest.raises(WireFormatError, match="exceeds"):
        wire.decode(b"\x00" * 2000)
