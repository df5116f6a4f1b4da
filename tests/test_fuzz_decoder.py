"""Bad input, fuzzed: the wire decoder and every consumer handler of both agents.

Over 10,000 generated inputs (most against `wire.decode`, which is fast; fewer but
still hundreds against the handlers, which may touch TenSEAL or OpenCV). The
contract: the decoder raises only `WireFormatError` (or `SignatureError` for a
signed kind whose signature does not verify); a handler, run through
`settle` exactly as both transports run it, either acks (a bad probe gets an error
event) or dead-letters with a reason, never requeues bad input forever and never
takes the process down. Afterwards the agents still answer valid probes, plain
and edge-encrypted.

The agents run in-process on the in-process broker, on an event loop of their own
in a thread, so the (synchronous) hypothesis tests can drive them.
"""

from __future__ import annotations

import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cipherface import wire
from cipherface.exceptions import WireFormatError
from tests.fuzzing import (
    ENCODED,
    FAST,
    FUZZED,
    _decode_or_reject,
    mutated_envelopes,
)

# -- the wire decoder ---------------------------------------------------------------------


@FAST
@given(st.binary(max_size=2048))
def test_decode_random_bytes(data: bytes) -> None:
    FUZZED["decode random bytes"] += 1
    _decode_or_reject(data)


@FAST
@given(mutated_envelopes())
def test_decode_wrong_types_and_missing_fields(data: bytes) -> None:
    FUZZED["decode wrong types"] += 1
    _decode_or_reject(data)


@settings(max_examples=2000, deadline=None, database=None)
@given(st.sampled_from(range(len(ENCODED))), st.floats(0, 1, exclude_max=True))
def test_decode_truncated(index: int, fraction: float) -> None:
    FUZZED["decode truncated"] += 1
    data = ENCODED[index]
    with pytest.raises(WireFormatError):
        wire.decode(data[: int(len(data) * fraction)])


# msgpack headers that declare a length: bin32, str32, array32, map32, ext32.
_LENGTH_HEADERS = [b"\xc6", b"\xdb", b"\xdd", b"\xdf", b"\xc9"]


@settings(max_examples=1500, deadline=None, database=None)
@given(
    st.sampled_from(_LENGTH_HEADERS),
    st.integers(min_value=2**16, max_value=2**32 - 1),
    st.binary(max_size=32),
    st.sampled_from(["top", "signed", "body", "image"]),
)
def test_decode_huge_declared_lengths(header: bytes, length: int, tail: bytes, where: str) -> None:
    FUZZED["decode huge lengths"] += 1
    bomb = header + length.to_bytes(4, "big") + (b"\x01" if header == b"\xc9" else b"") + tail
    if where == "top":
        data = bomb
    elif where == "signed":
        # A valid start of the outer map, then the bomb where the inner message goes.
        data = b"\x84" + msgpack.packb({"v": wire.SCHEMA_VERSION})[1:] + msgpack.packb("signed")
        data += bomb
    else:
        # A valid prefix of a probe's inner map, then the bomb where a field's value goes.
        prefix = msgpack.packb({"type": "probe", "id": "x", "fp": "", "model": "", "metric": ""})
        if where == "body":
            inner = b"\x86" + prefix[1:] + msgpack.packb("body") + bomb
        else:
            inner = (
                b"\x86"
                + prefix[1:]
                + msgpack.packb("body")
                + b"\x81"
                + msgpack.packb("image")
                + bomb
            )
        outer = {"v": wire.SCHEMA_VERSION, "signed": inner, "by": "", "sig": b""}
        data = msgpack.packb(outer, use_bin_type=True)
    started = time.perf_counter()
    with pytest.raises(WireFormatError):
        wire.decode(data)
    # Refused from the header, not after allocating gigabytes (which takes far longer).
    assert time.perf_counter() - started < 5.0


def test_decode_refuses_oversized_message() -> None:
    FUZZED["decode oversized"] += 1
    with pytest.raises(WireFormatError, match="exceeds"):
        wire.decode(b"\x00" * (wire.MAX_MESSAGE_BYTES + 1))
