"""Attacks by parties with a public key or broker access, each against the real agents.

Every test here reproduces an attack of issue 8 that worked before on-prem checked
what it decrypts and every party signed what it sends: forged edge probes, tampered
scores, forged gallery messages, forged events and sync floods. The gallery is
synthetic (unit vectors with chosen similarities), so no photo is needed and the
numbers are exact: person A is at cosine distance 0.075 from B, just rejected,
and A's embedding scaled by 1.02 would land at 0.0565, inside the 0.07 threshold.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import pytest

from cipherface import wire
from cipherface.crypto import Keyring, Metric
from cipherface.gallery import encrypt_probe
from cipherface.gallery.packing import _SCORE_SCALE, _VALUE_SCALE, _Seal
from cipherface.signing import SigningKey
from cipherface.transport import REASON_HEADER, Delivery
from cipherface.wire.payloads import BlockScores, EncryptedBlock, EncryptedProbe
from tests.agents.conftest import Deployment

#: Cosine similarity of A and B: honest distance 0.075 (rejected at 0.07).
SIMILARITY = 0.925
DIMENSIONS = 128


def _people() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(8)
    b = rng.normal(size=DIMENSIONS)
    b /= np.linalg.norm(b)
    other = rng.normal(size=DIMENSIONS)
    other -= (other @ b) * b
    other /= np.linalg.norm(other)
    a = SIMILARITY * b + np.sqrt(1 - SIMILARITY**2) * other
    people = {"A": a, "B": b}
    for i in range(4):
        v = rng.normal(size=DIMENSIONS)
        people[f"P{i}"] = v / np.linalg.norm(v)
    return people


class Watch:
    """Events (signed or not: the raw messages) and dead letters of one deployment."""

    def __init__(self) -> None:
        self.events: dict[str, wire.VerificationEvent] = {}
        self.dead: list[Delivery] = []

    async def start(self, deployment: Deployment) -> None:
        link = await deployment.link()
        onprem = deployment.agents[0]
        verifier = onprem.signer.verify_key  # type: ignore[union-attr]

        async def on_event(delivery: Delivery) -> None:
            from cipherface.signing import PinnedKey

            envelope = wire.decode(delivery.body, verifier=PinnedKey(verifier))
            assert isinstance(envelope.message, wire.VerificationEvent)
            self.events[envelope.message.probe_id] = envelope.message

        async def on_dead(delivery: Delivery) -> None:
            self.dead.append(delivery)

        await link.consume("", on_event, bindings=[(link.topology.events, "#")], exclusive=True)
        await link.consume(link.topology.dead_letters, on_dead)

    async def event(self, probe_id: str, timeout: float = 60) -> wire.VerificationEvent:
        for _ in range(int(timeout * 10)):
            if probe_id in self.events:
                return self.events[probe_id]
            await asyncio.sleep(0.1)
        raise AssertionError(f"no event for {probe_id}")

    async def dead_letter(self, predicate: object, timeout: float = 30) -> Delivery:
        for _ in range(int(timeout * 10)):
            for delivery in self.dead:
                if predicate(delivery):  # type: ignore[operator]
                    return delivery
            await asyncio.sleep(0.1)
        raise AssertionError("no such dead letter")


@pytest.fixture
async def rig(deployment: Deployment) -> tuple[Deployment, Watch]:
    """On-prem with the synthetic gallery, one trusted replica, events and dead letters watched."""
    onprem = await deployment.onprem()
    for name, vector in _people().items():
        onprem.book.add(name, vector, template_id=name)
    await onprem.publish_gallery(onprem.book.pending_blocks())
    cloud = await deployment.cloud()
    await asyncio.wait_for(cloud.ready.wait(), 60)
    watch = Watch()
    await watch.start(deployment)
    return deployment, watch


def _public(deployment: Deployment) -> Keyring:
    return Keyring.load(deployment.settings.public_key_path, expect="public")


def _edge_probe(keyring: Keyring, weights: Sequence[complex | float]) -> EncryptedProbe:
    """An edge probe: column j encrypts ``weights[j]`` in every slot, as an attacker makes it."""
    seal = _Seal(keyring)
    return EncryptedProbe(
        fingerprint=keyring.fingerprint,
        metric=Metric.COSINE.value,
        dimensions=len(weights),
        columns=tuple(seal.encrypt_public(w, _VALUE_SCALE) for w in weights),
        norm=None,
    )


async def _submit(deployment: Deployment, probe: EncryptedProbe, subject: str | None) -> str:
    client = await deployment.client()
    return await client.publish_encrypted_probe(probe, subject)


# -- forged edge probes -------------------------------------------------------------


async def test_honest_edge_probe_of_b_is_verified(rig: tuple[Deployment, Watch]) -> None:
    deployment, watch = rig
    probe = encrypt_probe(_public(deployment), _people()["B"], Metric.COSINE)
    event = await watch.event(await _submit(deployment, probe, "B"))
    assert event.verified and event.error is None and event.distance is not None
    assert event.distance < 0.01


@pytest.mark.parametrize("factor", [1.02, 1.5])
async def test_scaled_edge_probe_is_refused(rig: tuple[Deployment, Watch], factor: float) -> None:
    deployment, watch = rig
    a = _people()["A"]
    probe = _edge_probe(_public(deployment), [-factor * float(v) for v in a])
    event = await watch.event(await _submit(deployment, probe, "B"))
    assert not event.verified
    assert event.error and event.error.startswith("IntegrityError")
    assert event.distance is None


async def test_complex_edge_probe_keeping_the_square_at_one_is_refused(
    rig: tuple[Deployment, Watch],
) -> None:
    """``a + ib`` with ``|a|^2 - |b|^2 = 1`` passes a check of ``sum c_j^2`` alone."""
    deployment, watch = rig
    people = _people()
    a = people["A"]
    rng = np.random.default_rng(1)
    y = rng.normal(size=DIMENSIONS)
    y -= (y @ a) * a
    y /= np.linalg.norm(y)
    s = 1.06
    t = np.sqrt(s**2 - 1)
    probe = _edge_probe(
        _public(deployment), [complex(-s * u, -t * w) for u, w in zip(a, y, strict=True)]
    )
    event = await watch.event(await _submit(deployment, probe, "B"))
    assert not event.verified and event.distance is None
    assert event.error and event.error.startswith("IntegrityError")


async def test_edge_probe_under_an_attackers_key_relabelled_is_refused(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, watch = rig
    attacker = Keyring.generate(deployment.settings.preset, relin_keys=False)
    forged = encrypt_probe(attacker.public(), _people()["B"], Metric.COSINE)
    relabelled = EncryptedProbe(
        fingerprint=_public(deployment).fingerprint,
        metric=forged.metric,
        dimensions=forged.dimensions,
        columns=forged.columns,
        norm=forged.norm,
    )
    for subject in ("B", None):
        event = await watch.event(await _submit(deployment, relabelled, subject))
        assert not event.verified and event.distance is None
        assert event.error and event.error.startswith("IntegrityError")


# -- tampered scores ---------------------------------------------------------------


def _scores(deployment: Deployment, probe_id: str, blocks: list[BlockScores]) -> bytes:
    """A scores message signed by the trusted replica: a malicious cloud, or its stolen key."""
    cloud = deployment.agents[1]
    message = wire.ScoresReady(
        probe_id=probe_id,
        subject=None,
        scores=tuple(blocks),
        faces=1,
        submitted_at=0.0,
        timings={},
    )
    return wire.encode(
        message,
        fingerprint=cloud.keyring.fingerprint,  # type: ignore[union-attr]
        signer=cloud.signer,  # type: ignore[union-attr]
    )


def _signed_by_replica(deployment: Deployment, message: wire.Message) -> bytes:
    cloud = deployment.agents[1]
    return wire.encode(
        message,
        fingerprint=cloud.keyring.fingerprint,  # type: ignore[union-attr]
        signer=cloud.signer,  # type: ignore[union-attr]
    )


def _honest_block_scores(deployment: Deployment) -> BlockScores:
    cloud = deployment.agents[1]
    [block] = cloud.gallery.search(_people()["B"])  # type: ignore[union-attr]
    return block


async def _result(deployment: Deployment, body: bytes) -> None:
    link = await deployment.link()
    await link.send(link.topology.results, body)


async def test_scores_at_another_scale_are_refused(rig: tuple[Deployment, Watch]) -> None:
    deployment, watch = rig
    honest = _honest_block_scores(deployment)
    seal = _Seal(_public(deployment))
    ciphertext = seal.load(honest.scores)
    ciphertext.scale = 1.0
    tampered = BlockScores(
        block_id=honest.block_id, version=honest.version, scores=seal.dump(ciphertext)
    )
    await _result(deployment, _scores(deployment, "scale-1", [tampered]))
    event = await watch.event("scale-1")
    assert event.error and event.error.startswith("IntegrityError") and event.distance is None


@pytest.mark.parametrize(
    ("value", "scale"), [(0.0, 1.0), (-0.5, _SCORE_SCALE), (3.0 * (1 + 1j), _SCORE_SCALE)]
)
async def test_chosen_score_ciphertexts_are_not_decrypted_into_events(
    rig: tuple[Deployment, Watch], value: complex, scale: float
) -> None:
    """An encryption of 0 at scale 1, or of out-of-range distances: no number leaves."""
    deployment, watch = rig
    honest = _honest_block_scores(deployment)
    seal = _Seal(_public(deployment))
    chosen = BlockScores(
        block_id=honest.block_id, version=honest.version, scores=seal.encrypt_public(value, scale)
    )
    probe_id = f"chosen-{abs(value)}-{scale}"
    await _result(deployment, _scores(deployment, probe_id, [chosen]))
    event = await watch.event(probe_id)
    assert not event.verified and event.distance is None
    assert event.error and event.error.startswith("IntegrityError")


async def test_scores_from_an_untrusted_replica_are_dead_lettered(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, watch = rig
    honest = _honest_block_scores(deployment)
    message = wire.ScoresReady(
        probe_id="rogue", subject=None, scores=(honest,), faces=1, submitted_at=0.0, timings={}
    )
    rogue = SigningKey.generate("r1")  # claims the trusted replica's name
    await _result(deployment, wire.encode(message, signer=rogue))
    dead = await watch.dead_letter(lambda d: "SignatureError" in str(d.headers[REASON_HEADER]))
    assert dead.body
    await asyncio.sleep(0.5)
    assert "rogue" not in watch.events


# -- forged gallery messages ---------------------------------------------------------


async def _gallery(deployment: Deployment, body: bytes) -> None:
    link = await deployment.link()
    await link.publish(link.topology.gallery, link.topology.gallery_broadcast_key, body)


async def test_context_under_a_new_key_not_signed_by_onprem_changes_nothing(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, watch = rig
    cloud = deployment.agents[1]
    held = cloud.keyring.fingerprint  # type: ignore[union-attr]
    attacker = Keyring.generate(deployment.settings.preset, relin_keys=False)
    context = wire.ContextUpdate(
        context=attacker.public_bytes(galois_keys=False, relin_keys=False),
        conjugation_key=b"",
        blocks=(),
        issued_at=1e12,
    )
    await _gallery(
        deployment,
        wire.encode(
            context, fingerprint=attacker.fingerprint, signer=SigningKey.generate("onprem")
        ),
    )
    await watch.dead_letter(lambda d: "SignatureError" in str(d.headers[REASON_HEADER]))
    assert cloud.keyring.fingerprint == held  # type: ignore[union-attr]
    probe = encrypt_probe(_public(deployment), _people()["B"], Metric.COSINE)
    assert (await watch.event(await _submit(deployment, probe, "B"))).verified


async def test_replayed_block_with_a_higher_version_is_refused(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, watch = rig
    cloud = deployment.agents[1]
    [stored] = list(cloud.store.iter_blocks())  # type: ignore[union-attr]
    pinned = EncryptedBlock(**{**_fields(stored), "version": 99})
    forger = SigningKey.generate("onprem")
    await _gallery(deployment, wire.encode(wire.BlockUpdate(block=pinned), signer=forger))
    await watch.dead_letter(lambda d: "SignatureError" in str(d.headers[REASON_HEADER]))
    [held] = list(cloud.store.iter_blocks())  # type: ignore[union-attr]
    assert held.version == stored.version
    probe = encrypt_probe(_public(deployment), _people()["B"], Metric.COSINE)
    assert (await watch.event(await _submit(deployment, probe, "B"))).verified


async def test_block_from_another_publisher_is_not_scored(rig: tuple[Deployment, Watch]) -> None:
    """A writer who sends block v+1 first would have its own ciphertexts scored as B's."""
    deployment, watch = rig
    cloud = deployment.agents[1]
    [stored] = list(cloud.store.iter_blocks())  # type: ignore[union-attr]
    public = _public(deployment)
    seal = _Seal(public)
    # Every column encrypts -1 * (the probe's component) ... here: the attacker's template.
    forged_columns = tuple(seal.encrypt_public(float(v), _VALUE_SCALE) for v in _people()["A"])
    forged = EncryptedBlock(
        **{**_fields(stored), "version": stored.version + 1, "columns": forged_columns}
    )
    for signer in (None, SigningKey.generate("onprem")):
        body = (
            wire.encode(wire.BlockUpdate(block=forged), signer=signer)
            if signer
            else _unsigned(wire.BlockUpdate(block=forged))
        )
        await _gallery(deployment, body)
    await asyncio.sleep(1)
    reasons = [str(d.headers[REASON_HEADER]) for d in watch.dead]
    assert sum("SignatureError" in r for r in reasons) == 2, reasons
    [held] = list(cloud.store.iter_blocks())  # type: ignore[union-attr]
    assert held.version == stored.version


def _fields(block: EncryptedBlock) -> dict[str, object]:
    return {name: getattr(block, name) for name in block.__dataclass_fields__}


def _unsigned(message: wire.Message) -> bytes:
    """What a publisher without on-prem's key sends: the envelope with no signature."""
    import msgpack

    inner = msgpack.packb(
        {
            "type": message.kind,
            "id": "x",
            "fp": "",
            "model": "",
            "metric": "",
            "body": message.body(),
        },
        use_bin_type=True,
    )
    return msgpack.packb(
        {"v": wire.SCHEMA_VERSION, "signed": inner, "by": "", "sig": b""}, use_bin_type=True
    )


# -- forged events -----------------------------------------------------------------


async def test_forged_event_is_dropped_by_the_client(rig: tuple[Deployment, Watch]) -> None:
    deployment, _ = rig
    client = await deployment.client()
    forged = wire.VerificationEvent(
        probe_id="p-forged",
        mode="1:1",
        subject="B",
        verified=True,
        distance=0.01,
        threshold=0.07,
        model="Dlib",
        metric="cosine",
    )
    link = await deployment.link()
    async with client.events() as stream:
        for body in (
            wire.encode(forged, signer=SigningKey.generate("onprem")),
            _unsigned(forged),
        ):
            await link.publish(link.topology.events, forged.routing_key, body)
        probe = encrypt_probe(_public(deployment), _people()["B"], Metric.COSINE)
        real = await client.publish_encrypted_probe(probe, "B")
        event = await stream.wait_for(real, timeout=60)
        assert event.verified
        assert stream.forged == 2
        assert stream._queue.empty()


async def test_replayed_genuine_event_is_dropped_by_a_later_subscriber(
    rig: tuple[Deployment, Watch],
) -> None:
    """A captured ``verified: true`` event, signed by on-prem, republished long after."""
    deployment, _ = rig
    onprem = deployment.agents[0]
    old = wire.VerificationEvent(
        probe_id="p-old",
        mode="1:1",
        subject="B",
        verified=True,
        distance=0.01,
        threshold=0.07,
        model="Dlib",
        metric="cosine",
        issued_at=time.time() - 3600,
    )
    body = wire.encode(old, signer=onprem.signer)  # type: ignore[union-attr]
    client = await deployment.client()
    link = await deployment.link()
    async with client.events() as stream:
        await link.publish(link.topology.events, old.routing_key, body)
        probe = encrypt_probe(_public(deployment), _people()["B"], Metric.COSINE)
        real = await client.publish_encrypted_probe(probe, "B")
        assert (await stream.wait_for(real, timeout=60)).verified
        assert stream.replayed == 1 and stream._queue.empty()


async def test_in_range_scores_shifted_by_a_trusted_replica_are_refused(
    rig: tuple[Deployment, Watch],
) -> None:
    """A malicious replica lowers A's score below the threshold: it stays in [0, 2],
    but no longer agrees with the templates and decoys on-prem fits it against."""
    deployment, watch = rig
    cloud = deployment.agents[1]
    [honest] = cloud.gallery.search(_people()["B"], subject="A")  # type: ignore[union-attr]
    seal = _Seal(_public(deployment))
    ciphertext = seal.load(honest.scores)
    position = 0  # A is the first template of the block
    shift = [0j] * seal.slots
    shift[position] = -0.03 + 0j
    seal.evaluator.add_plain_inplace(ciphertext, seal.plain(shift, _SCORE_SCALE))
    shifted = BlockScores(
        block_id=honest.block_id, version=honest.version, scores=seal.dump(ciphertext)
    )
    message = wire.ScoresReady(
        probe_id="shifted", subject="A", scores=(shifted,), faces=1, submitted_at=0.0, timings={}
    )
    await _result(deployment, _signed_by_replica(deployment, message))
    event = await watch.event("shifted")
    assert not event.verified and event.distance is None
    assert event.error and "one probe" in event.error


# -- sync amplification --------------------------------------------------------------


async def test_twenty_syncs_cause_one_republish_to_the_asking_replica_only(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, watch = rig
    cloud = deployment.agents[1]
    second = await deployment.cloud("r2")
    await asyncio.wait_for(second.ready.wait(), 60)
    await asyncio.sleep(1)  # r2's own start-up sync is answered
    link = await deployment.link()
    topology = link.topology
    seen: dict[str, list[str]] = {"r1": [], "r2": [], "all": []}
    for name, key in (
        ("r1", topology.gallery_key("r1")),
        ("r2", topology.gallery_key("r2")),
        ("all", topology.gallery_broadcast_key),
    ):

        async def spy(delivery: Delivery, name: str = name) -> None:
            seen[name].append(wire.decode(delivery.body, verifier=cloud.onprem).message.kind)  # type: ignore[union-attr]

        await link.consume("", spy, bindings=[(topology.gallery, key)], exclusive=True)
    for _ in range(20):
        request = wire.SyncRequest(replica="r1", fingerprint="", requested_at=time.time())
        await link.send(topology.sync, wire.encode(request, signer=cloud.signer))  # type: ignore[union-attr]
    await asyncio.sleep(deployment.settings.sync_interval + 3)
    assert seen["r1"].count("context") == 1, seen
    assert seen["r2"] == [] and seen["all"] == []


async def test_sync_from_an_untrusted_replica_is_dead_lettered(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, watch = rig
    link = await deployment.link()
    request = wire.SyncRequest(replica="mallory", fingerprint="", requested_at=time.time())
    await link.send(link.topology.sync, wire.encode(request, signer=SigningKey.generate("mallory")))
    dead = await watch.dead_letter(lambda d: "not trusted" in str(d.headers[REASON_HEADER]))
    assert "mallory" in str(dead.headers[REASON_HEADER])
