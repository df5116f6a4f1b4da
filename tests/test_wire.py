"""The wire contract: round trips, validation, limits."""

from __future__ import annotations

import re

import msgpack
import pytest

from cipherface import wire
from cipherface.exceptions import MessageTooLargeError, SignatureError, WireFormatError
from cipherface.signing import PinnedKey, SigningKey
from cipherface.wire.payloads import BlockScores
from tests.samples import sample_event

ONPREM = SigningKey.generate("onprem")
PINNED = PinnedKey(ONPREM.verify_key)


def _roundtrip(message: wire.Message) -> wire.Envelope:
    data = wire.encode(
        message,
        fingerprint="ab12",
        model="Dlib",
        metric="cosine",
        message_id="m1",
        signer=ONPREM if message.signed else None,
    )
    return wire.decode(data, verifier=PINNED)


def _inner(data: bytes) -> dict[str, object]:
    return msgpack.unpackb(msgpack.unpackb(data, raw=False)["signed"], raw=False)


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
    raw = _inner(wire.encode(request))
    assert isinstance(raw["body"]["image"], bytes)  # type: ignore[index]  # bin, not base64


@pytest.mark.parametrize(
    "message",
    [
        wire.ContextUpdate(context=b"ctx", conjugation_key=b"g", blocks=(0, 1, 2), issued_at=5.0),
        wire.SyncRequest(replica="r1", fingerprint="ab12", requested_at=3.0),
        wire.ProbeRejected(
            probe_id="p",
            subject=None,
            error="NoFaceError",
            reason="x",
            request="d" * 32,
            submitted_at=1.0,
        ),
        sample_event(mode="1:N", distance=0.0312, timings={"total": 1.5}),
        wire.ScoresReady(
            probe_id="p",
            subject=None,
            faces=(
                wire.FaceScores(
                    box=(10, 20, 90, 90),
                    confidence=0.9,
                    scores=(BlockScores(block_id=0, version=1, scores=b"s"),),
                ),
                wire.FaceScores(box=(200, 20, 60, 61), confidence=0.4, scores=()),
            ),
            request="d" * 32,
            submitted_at=1.0,
            timings={"embed": 1.0},
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


def _outer(inner: object, by: str = "", sig: bytes = b"") -> bytes:
    outer = {"v": wire.SCHEMA_VERSION, "signed": inner, "by": by, "sig": sig}
    return msgpack.packb(outer, use_bin_type=True)


def _raw_probe(body: dict[str, object]) -> bytes:
    """A probe envelope with a hand-made body, bypassing `wire.encode`'s checks."""
    head = {"type": "probe", "id": "i", "fp": "", "model": "", "metric": ""}
    return _outer(msgpack.packb({**head, "body": body}, use_bin_type=True))


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "not a msgpack message"),
        (b"\xc1", "not a msgpack message"),
        (msgpack.packb([1, 2]), "envelope must be a map"),
        (msgpack.packb({"v": 99, "type": "probe"}), "unsupported schema version"),
        (msgpack.packb({"v": 1, "type": "probe", "body": {}}), "unsupported schema version"),
        (_outer("not bytes"), "signed"),
        (_outer(msgpack.packb([1])), "envelope must be a map"),
        (_outer(msgpack.packb({"type": "pickle"})), "unknown message type"),
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
    data = wire.encode(wire.SyncRequest(replica="r"), signer=ONPREM)
    with pytest.raises(WireFormatError, match="unexpected message type"):
        wire.decode(data, expect=(wire.ProbeRequest,))


def test_oversized_messages_are_refused() -> None:
    with pytest.raises(MessageTooLargeError, match="exceeds the 1000-byte"):
        wire.encode(wire.ProbeRequest(probe_id="p", image=b"x" * 2000), limit=1000)
    with pytest.raises(MessageTooLargeError, match="exceeds"):
        wire.decode(b"\x00" * 2000, limit=1000)
    # The default cap is 4 MiB: a 5 MB image probe is refused, typed, before it is sent.
    with pytest.raises(MessageTooLargeError) as caught:
        wire.encode(wire.ProbeRequest(probe_id="p", image=b"x" * 5_000_000))
    assert caught.value.limit == 4 * 1024 * 1024 == wire.MAX_MESSAGE_BYTES


EVENT = sample_event()


def test_signed_kinds_need_a_signature_from_the_pinned_key() -> None:
    with pytest.raises(Exception, match="must be signed"):
        wire.encode(EVENT)
    good = wire.encode(EVENT, signer=ONPREM)
    assert wire.decode(good, verifier=PINNED).signer == "onprem"
    with pytest.raises(SignatureError, match="none is pinned"):
        wire.decode(good)
    forged = wire.encode(EVENT, signer=SigningKey.generate("onprem"))
    with pytest.raises(SignatureError, match="does not verify"):
        wire.decode(forged, verifier=PINNED)
    inner = msgpack.unpackb(good, raw=False)["signed"]
    with pytest.raises(SignatureError, match="not signed"):
        wire.decode(_outer(inner), verifier=PINNED)


def test_a_signature_covers_every_byte_of_the_message() -> None:
    good = msgpack.unpackb(wire.encode(EVENT, signer=ONPREM), raw=False)
    tampered = bytearray(good["signed"])
    tampered[tampered.index(b"bob")] = ord("B")
    with pytest.raises(SignatureError):
        wire.decode(_outer(bytes(tampered), good["by"], good["sig"]), verifier=PINNED)


def test_an_unsigned_probe_decodes_without_a_verifier_but_a_signed_one_is_checked() -> None:
    probe = wire.ProbeRequest(probe_id="p", image=b"x")
    assert wire.decode(wire.encode(probe)).signer == ""
    signed = wire.encode(probe, signer=SigningKey.generate("someone"))
    with pytest.raises(SignatureError):
        wire.decode(signed, verifier=PINNED)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused_at_decode(value: float) -> None:
    probe = wire.ProbeRequest(probe_id="p", image=b"x", submitted_at=value)
    with pytest.raises(WireFormatError, match="finite"):
        wire.decode(wire.encode(probe))


@pytest.mark.parametrize(
    ("face", "error"),
    [
        ({"box": [1, 2, 3], "confidence": 1.0}, "field 'box' must be [x, y, w, h]"),
        ({"box": [1, 2, 0, 5], "confidence": 1.0}, "field 'box' must be [x, y, w, h]"),
        ({"box": [1, 2, 3, 4.5], "confidence": 1.0}, "field 'box[]' must be int, got float"),
        ({"box": None, "confidence": float("nan")}, "field 'confidence' must be a finite number"),
        # What a malicious replica would put in events: garbage boxes and confidences.
        ({"box": [1, 2, 3, 2**63], "confidence": 1.0}, "field 'box' reaches past 40000000"),
        ({"box": [2**40, 0, 3, 4], "confidence": 1.0}, "field 'box' reaches past 40000000"),
        ({"box": None, "confidence": -0.5}, "field 'confidence' must lie in [0, 1], got -0.5"),
        ({"box": None, "confidence": 1e300}, "field 'confidence' must lie in [0, 1]"),
    ],
)
def test_a_malformed_face_is_refused_at_decode(face: dict[str, object], error: str) -> None:
    body = {"subject": "s", "verified": True, "distance": 0.1, **face}
    with pytest.raises(WireFormatError, match=re.escape(error)):
        wire.FaceResult.from_dict(body)
    with pytest.raises(WireFormatError, match=re.escape(error)):
        wire.FaceScores.from_dict({"scores": [], **face})


def test_no_face_box_reaches_past_the_largest_image() -> None:
    from cipherface.embedding import MAX_IMAGE_PIXELS
    from cipherface.wire.payloads import _MAX_BOX_EDGE

    assert _MAX_BOX_EDGE == MAX_IMAGE_PIXELS  # an image's side is at most its pixel count
    edge = {"box": [0, 0, 1, MAX_IMAGE_PIXELS], "confidence": 0.0, "scores": []}
    assert wire.FaceScores.from_dict(edge).box == (0, 0, 1, MAX_IMAGE_PIXELS)


def test_probe_refusals_name_the_problem() -> None:
    long_id = "x" * 256
    assert wire.refusal(wire.ProbeRequest(probe_id=long_id, image=b"x")) == (
        "InvalidProbeId",
        "probe id of 256 bytes exceeds AMQP's 255-byte message-id limit",
    )
    assert wire.refusal(wire.ProbeRequest(probe_id="p", image=b"x", subject="")) == (
        "InvalidSubject",
        "claimed subject '' is empty: send nil for 1:N identification",
    )
    assert wire.refusal(wire.ProbeRequest(probe_id="x" * 255, image=b"x", subject="a")) is None


def test_a_probe_submitted_at_nan_is_refused_naming_the_field() -> None:
    probe = wire.ProbeRequest(probe_id="p", image=b"x", submitted_at=float("nan"))
    with pytest.raises(
        WireFormatError, match=re.escape("field 'probe.submitted_at' must be a finite number")
    ):
        wire.decode(wire.encode(probe))
