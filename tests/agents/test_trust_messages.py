"""Attacks with broker access: forged gallery messages, events and sync floods (issue 8).

Each reproduces an attack that worked before every party signed what it sends
and pinned whom it trusts (`tests/agents/trust.py` has the rig).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from cipherface import wire
from cipherface.crypto import Keyring, Metric
from cipherface.gallery import encrypt_probe
from cipherface.gallery.packing import _VALUE_SCALE, _Seal
from cipherface.signing import SigningKey
from cipherface.transport import REASON_HEADER, Delivery
from cipherface.wire.payloads import EncryptedBlock
from tests.agents.conftest import Deployment
from tests.agents.trust import (
    Watch,
    _fields,
    _people,
    _public,
    _submit,
    _unsigned,
)
from tests.samples import sample_event

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
    for chunk in wire.split_block(pinned, wire.MAX_MESSAGE_BYTES):
        await _gallery(deployment, wire.encode(chunk, signer=forger))
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
    chunks = wire.split_block(forged, wire.MAX_MESSAGE_BYTES)
    for signer in (None, SigningKey.generate("onprem")):
        for chunk in chunks:
            body = wire.encode(chunk, signer=signer) if signer else _unsigned(chunk)
            await _gallery(deployment, body)
    await asyncio.sleep(1)
    reasons = [str(d.headers[REASON_HEADER]) for d in watch.dead]
    assert sum("SignatureError" in r for r in reasons) == 2 * len(chunks), reasons
    [held] = list(cloud.store.iter_blocks())  # type: ignore[union-attr]
    assert held.version == stored.version


async def test_duplicated_and_mismatched_chunks_are_dead_lettered_with_their_reason(
    rig: tuple[Deployment, Watch],
) -> None:
    """Chunks replayed with on-prem's own signatures: checked one by one, never mixed; the
    same chunk again (a redelivery) is accepted and changes nothing."""
    deployment, watch = rig
    onprem, cloud = deployment.agents[0], deployment.agents[1]
    [stored] = list(cloud.store.iter_blocks())  # type: ignore[union-attr]
    chunks = wire.split_block(stored, wire.MAX_MESSAGE_BYTES)
    other = EncryptedBlock(**{**_fields(stored), "subjects": ("mallory",) * len(stored.subjects)})
    foreign = wire.split_block(other, wire.MAX_MESSAGE_BYTES)

    def signed(chunk: wire.BlockChunk) -> bytes:
        return wire.encode(chunk, fingerprint=stored.fingerprint, signer=onprem.signer)

    overlapping = dataclasses.replace(chunks[1], start=chunks[1].start - 1)  # other bytes
    # First, the same again, columns held with other bytes, another layout.
    for chunk in (chunks[0], chunks[0], overlapping, foreign[1]):
        await _gallery(deployment, signed(chunk))
    await watch.dead_letter(lambda d: "duplicate" in str(d.headers[REASON_HEADER]))
    await watch.dead_letter(lambda d: "another layout" in str(d.headers[REASON_HEADER]))
    assert all("ChunkError" in str(d.headers[REASON_HEADER]) for d in watch.dead)
    assert len(cloud._chunks) == 1  # type: ignore[union-attr]  # half a block: nothing installed
    for chunk in chunks[1:]:
        await _gallery(deployment, signed(chunk))
    await _until(lambda: len(cloud._chunks) == 0)  # type: ignore[union-attr]
    assert "mallory" not in cloud.gallery.subjects()  # type: ignore[union-attr]
    assert all("mallory" not in b.subjects for b in cloud.store.iter_blocks())  # type: ignore[union-attr]
    probe = encrypt_probe(_public(deployment), _people()["B"], Metric.COSINE)
    assert (await watch.event(await _submit(deployment, probe, "B"))).verified


async def _until(condition: object, timeout: float = 60) -> None:
    for _ in range(int(timeout * 10)):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached")


# -- forged events -----------------------------------------------------------------


async def test_forged_event_is_dropped_by_the_client(rig: tuple[Deployment, Watch]) -> None:
    deployment, _ = rig
    client = await deployment.client()
    forged = sample_event(probe_id="p-forged", subject="B")
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
    old = sample_event(probe_id="p-old", subject="B", issued_at=time.time() - 3600)
    body = wire.encode(old, signer=onprem.signer)  # type: ignore[union-attr]
    client = await deployment.client()
    link = await deployment.link()
    async with client.events() as stream:
        await link.publish(link.topology.events, old.routing_key, body)
        probe = encrypt_probe(_public(deployment), _people()["B"], Metric.COSINE)
        real = await client.publish_encrypted_probe(probe, "B")
        assert (await stream.wait_for(real, timeout=60)).verified
        assert stream.replayed == 1 and stream._queue.empty()


# -- sync amplification --------------------------------------------------------------


async def test_twenty_syncs_cause_one_republish_to_the_asking_replica_only(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, _ = rig
    cloud = deployment.agents[1]
    second = await deployment.cloud("r2")
    await asyncio.wait_for(second.ready.wait(), 60)
    # Past the interval since the replicas' own start-up syncs were answered.
    await asyncio.sleep(deployment.settings.sync_interval + 0.5)
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
    await asyncio.sleep(3)
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
