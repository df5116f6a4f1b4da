"""Shared strategies and counters of the fuzz tests (`tests/test_fuzz_*.py`).

One `FUZZED` counter for every fuzz module, so `test_fuzz_total` can check that
over 10,000 generated inputs went through the decoder and the consumers.
"""

from __future__ import annotations

import collections
from typing import Any

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from cipherface import wire
from cipherface.exceptions import SignatureError, WireFormatError
from cipherface.gallery import BlockScores, EncryptedBlock, EncryptedProbe
from cipherface.signing import PinnedKey, SigningKey
from tests.samples import sample_event

#: Inputs tried per test, summed by `test_at_least_10000_inputs_were_fuzzed`.
FUZZED: collections.Counter[str] = collections.Counter()
FAST = settings(
    max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def _consumer_settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )


# -- msgpack value strategies -----------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=24)
    | st.binary(max_size=64)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

_FP = "0123456789abcdef"
#: Signs the decoder's samples, so that a mutated body re-signed with it is parsed
#: and its validation fuzzed, not just its signature.
SIGNER = SigningKey.generate("onprem")
VERIFIER = PinnedKey(SIGNER.verify_key)


def _sample_messages() -> list[wire.Message]:
    """One valid message of every kind (ciphertext fields are just bytes to the decoder)."""
    block = EncryptedBlock(
        block_id=0,
        version=1,
        fingerprint=_FP,
        metric="cosine",
        dimensions=2,
        template_ids=("t1", ""),
        subjects=("alice", ""),
        columns=(b"c0", b"c1"),
        norms=None,
    )
    probe = EncryptedProbe(
        fingerprint=_FP, metric="cosine", dimensions=2, columns=(b"a", b"b"), norm=None
    )
    return [
        wire.ContextUpdate(context=b"ctx", blocks=(0, 1)),
        *wire.split_block(block, wire.MAX_MESSAGE_BYTES),
        wire.SubjectsPart(
            digest="ab" * 32, part=0, parts=1, subjects=("alice",), subject_homes=(1,)
        ),
        wire.SyncRequest(replica="r1", fingerprint=_FP),
        wire.ProbeRequest(probe_id="p1", image=b"\xff\xd8", subject="alice"),
        wire.EncryptedProbeRequest(probe_id="p2", probe=probe, subject=None),
        wire.ScoresReady(
            probe_id="p3",
            subject=None,
            faces=(
                wire.FaceScores(
                    box=(1, 2, 60, 60),
                    confidence=0.9,
                    scores=(BlockScores(block_id=0, version=1, scores=b"s", pairs=(0, -1)),),
                ),
            ),
            request="3" * 32,
            submitted_at=1.0,
            timings={"embed": 0.5},
        ),
        wire.ProbeRejected(
            probe_id="p4", subject=None, error="E", reason="r", request="4" * 32, submitted_at=1.0
        ),
        wire.ReplicaStatus(
            replica="r1", fingerprint=_FP, blocks=(0,), versions=(1,), templates=1, awaiting=0
        ),
        sample_event(probe_id="p5", mode="1:N"),
    ]


SAMPLES = _sample_messages()


def _encode(message: wire.Message) -> bytes:
    return wire.encode(message, fingerprint=_FP, model="Dlib", metric="cosine", signer=SIGNER)


ENCODED = [_encode(m) for m in SAMPLES]


def _envelope(message: wire.Message) -> dict[str, Any]:
    """Both layers as one nested map: the inner message under ``signed``."""
    outer = msgpack.unpackb(_encode(message), raw=False)
    return {**outer, "signed": msgpack.unpackb(outer["signed"], raw=False)}


def _mutate(data: Any, path: list[Any], replacement: Any, delete: bool) -> Any:
    """A copy of nested ``data`` with the item at ``path`` replaced (or deleted)."""
    if not path:
        return replacement
    head, *rest = path
    if isinstance(data, dict):
        copy = dict(data)
        if delete and not rest:
            copy.pop(head, None)
        else:
            copy[head] = _mutate(copy.get(head), rest, replacement, delete)
        return copy
    if isinstance(data, list) and data:
        copy = list(data)
        index = head % len(copy)
        copy[index] = _mutate(copy[index], rest, replacement, delete)
        return copy
    return replacement


def _paths(data: Any, prefix: list[Any] | None = None) -> list[list[Any]]:
    """Every path into nested maps and lists."""
    prefix = prefix or []
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, [*prefix, key])
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += _paths(value, [*prefix, index])
    return found


@st.composite
def mutated_envelopes(draw: st.DrawFn) -> bytes:
    """A valid envelope of some kind with one field (deep or shallow) wrong or missing."""
    envelope = _envelope(draw(st.sampled_from(SAMPLES)))
    path = draw(st.sampled_from(_paths(envelope)[1:]))
    delete = draw(st.booleans())
    mutated = _mutate(envelope, path, draw(values), delete)
    use_bin_type = draw(st.booleans())
    inner = mutated.get("signed")
    if isinstance(inner, dict):
        packed = msgpack.packb(inner, use_bin_type=use_bin_type)
        mutated["signed"] = packed
        if draw(st.booleans()) and path[0] == "signed":
            mutated["sig"] = SIGNER.sign(packed)  # a signed, ill-formed body
    return msgpack.packb(mutated, use_bin_type=use_bin_type)


def _decode_or_reject(data: bytes) -> wire.Envelope | None:
    try:
        return wire.decode(data, verifier=VERIFIER)
    except (WireFormatError, SignatureError) as exc:
        assert str(exc)  # a reason a dead letter can carry
        return None
