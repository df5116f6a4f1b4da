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

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cv2
import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.cloud.agent import CloudAgent
from agents.onprem.agent import OnPremAgent, generate_keys
from cipherface import wire
from cipherface.config import Settings
from cipherface.crypto import Keyring, Metric
from cipherface.embedding import MAX_IMAGE_BYTES
from cipherface.exceptions import MessageTooLargeError
from cipherface.gallery import BlockScores, EncryptedBlock, EncryptedProbe, encrypt_probe
from cipherface.signing import PinnedKey, TrustStore
from cipherface.store import GalleryStore
from cipherface.transport import (
    REASON_HEADER,
    Delivery,
    MemoryBroker,
    MemoryTransport,
    Outcome,
    Topology,
    settle,
)
from tests.fuzzing import (
    _FP,
    FUZZED,
    _consumer_settings,
    mutated_envelopes,
)

T = TypeVar("T")


# -- the consumers --------------------------------------------------------------------------


@dataclass(repr=False)
class Rig:
    """On-prem and a cloud replica on the in-process broker, on a loop in a thread."""

    root: Path
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    broker: MemoryBroker = field(default_factory=MemoryBroker)
    events: dict[str, wire.VerificationEvent] = field(default_factory=dict)
    dead: list[Delivery] = field(default_factory=list)
    #: Probe ids that must get an (error) event.
    expect_events: set[str] = field(default_factory=set)
    onprem: OnPremAgent | None = None
    cloud: CloudAgent | None = None
    transports: list[MemoryTransport] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.settings = Settings(
            data_dir=self.root / "data",
            prefix="fuzz",
            replica="f1",
        )
        self.topology = Topology(prefix="fuzz")
        self.keyring = generate_keys(self.settings)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        """Run a coroutine on the rig's loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def link(self) -> MemoryTransport:
        """A transport on the rig's broker."""
        transport = MemoryTransport(self.broker, self.topology)
        self.transports.append(transport)
        return transport

    async def start(self) -> None:
        rng = np.random.default_rng(5)
        self.onprem = OnPremAgent(self.settings, self.link())
        for i, subject in enumerate(["alice", "alice", "bob", "carol"]):
            self.onprem.book.add(subject, rng.normal(size=128), template_id=f"t{i}")
        await self.onprem.start()
        self.cloud = CloudAgent(self.settings, self.link())
        TrustStore(self.settings.trust_store_path).add("f1", self.cloud.signer.verify_key)
        await self.cloud.start()
        await asyncio.wait_for(self.cloud.ready.wait(), 60)
        watcher = self.link()

        onprem_key = PinnedKey(self.onprem.signer.verify_key)

        async def on_event(delivery: Delivery) -> None:
            event = wire.decode(
                delivery.body, expect=(wire.VerificationEvent,), verifier=onprem_key
            ).message
            assert isinstance(event, wire.VerificationEvent)
            self.events[event.probe_id] = event

        async def on_dead(delivery: Delivery) -> None:
            self.dead.append(delivery)

        await watcher.consume("", on_event, bindings=[(self.topology.events, "#")], exclusive=True)
        await watcher.consume(self.topology.dead_letters, on_dead)

    async def stop(self) -> None:
        for agent in (self.cloud, self.onprem):
            if agent is not None:
                await agent.stop()
        for transport in self.transports:
            await transport.close()

    def feed(self, handler: Any, body: bytes) -> tuple[Outcome, str]:
        """One delivery through a handler, classified as the transports classify it."""
        delivery = Delivery(body=body, message_id="fuzz")
        outcome, reason = self.call(settle(handler, delivery))
        assert outcome is not Outcome.REQUEUE, f"bad input would be retried forever: {reason}"
        if outcome is Outcome.DEAD_LETTER:
            assert reason, "a dead letter must say why"
        return outcome, reason

    def wait_events(self, ids: set[str], timeout: float = 120) -> None:
        """Until every id has its event."""
        deadline = time.monotonic() + timeout
        while not ids <= set(self.events):
            assert time.monotonic() < deadline, f"no event for {sorted(ids - set(self.events))[:5]}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, deepface_home: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("fuzz"))
    try:
        rig.call(rig.start())
        yield rig
    finally:
        rig.call(rig.stop())
        rig.loop.call_soon_threadsafe(rig.loop.stop)
        rig.thread.join(10)
        rig.loop.close()


def _probe_body(probe_id: str, image: bytes, subject: str | None) -> bytes:
    request = wire.ProbeRequest(probe_id=probe_id, image=image, subject=subject)
    return wire.encode(request)  # under the 4 MiB message cap


_probe_counter = iter(range(10**9))


def _pid(tag: str) -> str:
    return f"{tag}-{next(_probe_counter)}"


@_consumer_settings(400)
@given(
    st.one_of(
        st.binary(max_size=4096),  # not an image
        st.binary(min_size=4, max_size=512).map(lambda b: b"\xff\xd8\xff\xe0" + b),  # JPEG-ish
        st.binary(min_size=8, max_size=512).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),  # PNG-ish
    ),
    st.none() | st.text(max_size=12),
)
def test_cloud_probe_handler_non_images(rig: Rig, image: bytes, subject: str | None) -> None:
    FUZZED["cloud probe: non-image bytes"] += 1
    assert rig.cloud is not None
    pid = _pid("img")
    outcome, _ = rig.feed(rig.cloud._on_probe, _probe_body(pid, image, subject))
    assert outcome is Outcome.ACK  # a bad image is the user's: it gets an error event
    rig.expect_events.add(pid)


@_consumer_settings(400)
@given(st.one_of(st.binary(max_size=2048), mutated_envelopes()))
def test_cloud_probe_handler_garbage_messages(rig: Rig, body: bytes) -> None:
    FUZZED["cloud probe: garbage messages"] += 1
    assert rig.cloud is not None
    rig.feed(rig.cloud._on_probe, body)


@_consumer_settings(150)
@given(
    st.just(128) | st.integers(min_value=1, max_value=140),  # 128: the gallery's
    st.lists(st.binary(max_size=300), min_size=1, max_size=3),
    st.sampled_from(["mine", "other", "garbage"]),
    st.sampled_from(["cosine", "euclidean", "euclidean_l2"]),
)
def test_cloud_encrypted_probe_with_garbage_ciphertexts(
    rig: Rig, dimensions: int, blobs: list[bytes], fp: str, metric: str
) -> None:
    FUZZED["cloud probe: garbage ciphertexts"] += 1
    assert rig.cloud is not None
    fingerprint = {"mine": rig.keyring.fingerprint, "other": _FP, "garbage": "zz"}[fp]
    columns = tuple(blobs[i % len(blobs)] for i in range(dimensions))
    probe = EncryptedProbe(
        fingerprint=fingerprint,
        metric=metric,
        dimensions=dimensions,
        columns=columns,
        norm=blobs[0] if metric == "euclidean" else None,
    )
    pid = _pid("enc")
    body = wire.encode(
        wire.EncryptedProbeRequest(probe_id=pid, probe=probe),
        fingerprint=fingerprint,
    )
    outcome, reason = rig.feed(rig.cloud._on_probe, body)
    if outcome is Outcome.ACK:
        rig.expect_events.add(pid)  # e.g. KeyMismatchError: an error event
    else:
        assert "Error" in reason


@_consumer_settings(300)
@given(
    st.one_of(
        st.binary(max_size=2048),
        mutated_envelopes(),
        st.tuples(st.binary(max_size=4096), st.lists(st.integers(0, 10), max_size=3)),
    )
)
def test_cloud_gallery_handler_garbage(rig: Rig, body: bytes | tuple[bytes, list[int]]) -> None:
    """Garbage, mutated messages, and garbage contexts that on-prem's own key signed."""
    FUZZED["cloud gallery: garbage"] += 1
    assert rig.cloud is not None and rig.onprem is not None
    if isinstance(body, tuple):
        context = wire.ContextUpdate(context=body[0], blocks=tuple(body[1]))
        body = wire.encode(context, signer=rig.onprem.signer)
    rig.feed(rig.cloud._on_gallery, body)
    assert (
        rig.cloud.keyring is not None and rig.cloud.keyring.fingerprint == rig.keyring.fingerprint
    )


@_consumer_settings(150)
@given(
    st.integers(min_value=0, max_value=3),
    st.integers(min_value=1000, max_value=10**6),
    st.lists(st.binary(max_size=200), min_size=1, max_size=2),
    st.sampled_from([128, 3]),
)
def test_cloud_gallery_block_with_garbage_ciphertexts(
    rig: Rig, block_id: int, version: int, blobs: list[bytes], dimensions: int
) -> None:
    """A block under the right key whose ciphertexts are garbage must not reach the store."""
    FUZZED["cloud gallery: garbage blocks"] += 1
    assert rig.cloud is not None
    fp = rig.keyring.fingerprint
    block = EncryptedBlock(
        block_id=block_id,
        version=version,
        fingerprint=fp,
        metric="cosine",
        dimensions=dimensions,
        template_ids=("x",),
        subjects=("mallory",),
        columns=tuple(blobs[i % len(blobs)] for i in range(dimensions)),
        norms=None,
    )
    assert rig.onprem is not None
    signer = rig.onprem.signer
    outcomes = [
        rig.feed(rig.cloud._on_gallery, wire.encode(chunk, fingerprint=fp, signer=signer))
        for chunk in wire.split_block(block, wire.MAX_MESSAGE_BYTES)
    ]
    assert outcomes[-1][0] is Outcome.DEAD_LETTER, outcomes
    assert "mallory" not in rig.cloud.gallery.subjects()  # type: ignore[union-attr]
    # Nor on disk, where it would stop the replica from starting again.
    assert all("mallory" not in b.subjects for b in _stored_blocks(rig))


def _stored_blocks(rig: Rig) -> list[EncryptedBlock]:
    store = GalleryStore(rig.settings.cloud_dir / "gallery.sqlite")
    try:
        return list(store.iter_blocks())
    finally:
        store.close()


def test_cloud_refuses_context_with_secret_key_and_other_keys(rig: Rig) -> None:
    assert rig.cloud is not None
    cases = {
        # The real secret context, as if on-prem shipped the wrong file.
        "secret": (rig.keyring.secret_bytes(), rig.keyring.fingerprint, "SecretKeyError"),
        # A public context under another key, claiming ours.
        "other key": (
            Keyring.generate().public_bytes(galois_keys=False),
            rig.keyring.fingerprint,
            "KeyMismatchError",
        ),
    }
    for name, (context, claimed, error) in cases.items():
        FUZZED["cloud gallery: bad contexts"] += 1
        body = wire.encode(
            wire.ContextUpdate(context=context, blocks=()),
            fingerprint=claimed,
            signer=rig.onprem.signer,  # type: ignore[union-attr]
        )
        outcome, reason = rig.feed(rig.cloud._on_gallery, body)
        assert outcome is Outcome.DEAD_LETTER and error in reason, name
    assert rig.cloud.keyring is not None and not rig.cloud.keyring.is_private


@_consumer_settings(300)
@given(
    st.one_of(
        st.binary(max_size=2048),
        mutated_envelopes(),
        st.builds(
            lambda blobs, subject, fp: (blobs, subject, fp),
            st.lists(st.tuples(st.integers(0, 3), st.binary(max_size=400)), min_size=1, max_size=2),
            st.none() | st.sampled_from(["alice", "nobody"]),
            st.booleans(),
        ),
    )
)
def test_onprem_result_handler_garbage(rig: Rig, case: Any) -> None:
    FUZZED["onprem results: garbage"] += 1
    assert rig.onprem is not None
    if isinstance(case, bytes):
        rig.feed(rig.onprem._on_result, case)
        return
    blobs, subject, right_key = case
    pid = _pid("scores")
    scores = tuple(BlockScores(block_id=b, version=1, scores=s) for b, s in blobs)
    message = wire.ScoresReady(
        probe_id=pid,
        subject=subject,
        faces=(wire.FaceScores(box=None, confidence=1.0, scores=scores),),
        request=wire.request_digest(pid.encode()),
        submitted_at=time.time(),
        timings={},
    )
    fp = rig.keyring.fingerprint if right_key else _FP
    # Signed by the trusted replica: garbage from a malicious cloud reaches the checks.
    body = wire.encode(message, fingerprint=fp, signer=rig.cloud.signer)  # type: ignore[union-attr]
    outcome, _ = rig.feed(rig.onprem._on_result, body)
    if outcome is Outcome.DEAD_LETTER:
        assert pid not in rig.events  # nothing decided from garbage
    else:
        assert pid in rig.events or rig.onprem.ledger.seen(pid)


@_consumer_settings(100)
@given(st.one_of(st.binary(max_size=1024), mutated_envelopes()))
def test_onprem_sync_handler_garbage(rig: Rig, body: bytes) -> None:
    FUZZED["onprem sync: garbage"] += 1
    assert rig.onprem is not None
    rig.feed(rig.onprem._on_sync, body)


def _blank_png(width: int, height: int) -> bytes:
    ok, data = cv2.imencode(".png", np.full((height, width, 3), 127, np.uint8))
    assert ok
    return data.tobytes()


def test_special_images_get_error_events_or_answers(rig: Rig, faces_dir: Path) -> None:
    """No face, many faces, oversized (pixels and bytes): each answered or refused, none fatal."""
    assert rig.cloud is not None
    # An image at the 16 MiB image cap is over the 4 MiB message cap: the client refuses it.
    with pytest.raises(MessageTooLargeError):
        _probe_body("too-many-bytes", b"\xff\xd8\xff\xe0" + b"\x00" * MAX_IMAGE_BYTES, None)
    cases = {
        "no face": (_blank_png(240, 240), "NoFaceError"),
        "many faces": ((faces_dir / "img8.jpg").read_bytes(), None),
        "too many pixels": (_blank_png(8000, 6000), "ImageDecodeError"),
    }
    ids = {}
    for name, (image, _) in cases.items():
        FUZZED["cloud probe: special images"] += 1
        pid = _pid(name.replace(" ", "-"))
        outcome, reason = rig.feed(rig.cloud._on_probe, _probe_body(pid, image, None))
        assert outcome is Outcome.ACK, (name, reason)
        ids[name] = pid
    rig.wait_events(set(ids.values()))
    for name, (_, error) in cases.items():
        event = rig.events[ids[name]]
        if error is None:
            assert event.error is None and event.distance is not None, name  # largest face used
        else:
            assert event.error and event.error.startswith(error), (name, event.error)


def test_agents_keep_serving_after_the_fuzz(rig: Rig, faces_dir: Path) -> None:
    """Through the queues: fuzzed bodies are dead-lettered with a reason, and valid
    probes published after them (plain and edge-encrypted) are answered in turn."""
    assert rig.onprem is not None and rig.cloud is not None
    rig.wait_events(set(rig.expect_events))
    client = rig.link()
    junk = [
        b"",
        b"\xc1",
        msgpack.packb({"v": 1, "type": "probe", "body": {}}),
        b"\xc6\xff\xff\xff\xff",
    ]
    for i, body in enumerate(junk):
        rig.call(client.send(client.topology.probes, body, message_id=f"junk-{i}"))
        rig.call(client.send(client.topology.results, body, message_id=f"junk-r{i}"))
    FUZZED["through the queues"] += 2 * len(junk)
    public = Keyring.load(rig.settings.public_key_path, expect="public")
    edge = encrypt_probe(public, np.random.default_rng(1).normal(size=128), Metric.COSINE)
    other = encrypt_probe(Keyring.generate(), np.ones(128), Metric.COSINE)  # another key
    plain_id, edge_id, other_id = _pid("plain"), _pid("edge"), _pid("other-key")
    rig.call(
        client.send(
            client.topology.probes,
            _probe_body(plain_id, (faces_dir / "img1.jpg").read_bytes(), None),
        )
    )
    for pid, probe in ((edge_id, edge), (other_id, other)):
        request = wire.EncryptedProbeRequest(probe_id=pid, probe=probe)
        for piece in wire.split_probe(request, client.max_message_size):  # 5 under 4 MiB
            body = wire.encode(piece, fingerprint=probe.fingerprint)
            rig.call(client.send(client.topology.probes, body))
    rig.wait_events({plain_id, edge_id, other_id})
    assert rig.events[plain_id].error is None and rig.events[plain_id].distance is not None
    assert rig.events[edge_id].error is None and "embed" not in rig.events[edge_id].timings
    assert (rig.events[other_id].error or "").startswith("KeyMismatchError")
    dead_ids = {d.message_id for d in rig.dead}
    assert {f"junk-{i}" for i in range(len(junk))} <= dead_ids
    assert {f"junk-r{i}" for i in range(len(junk))} <= dead_ids
    assert all(d.headers.get(REASON_HEADER) for d in rig.dead)
    # The stored gallery still loads: nothing fuzzed reached the store.
    stored = _stored_blocks(rig)
    assert stored and all(b.fingerprint == rig.keyring.fingerprint for b in stored)
    assert all("mallory" not in b.subjects for b in stored)
