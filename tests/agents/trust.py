"""Shared rig of the trust tests: a synthetic gallery, a trusted replica, what an attacker sends.

The gallery is synthetic (unit vectors with chosen similarities), so no photo is
needed and the numbers are exact: person A is at cosine distance 0.075 from B,
just rejected, and A's embedding scaled by 1.02 would land at 0.0565, inside the
0.07 threshold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from cipherface import wire
from cipherface.crypto import Keyring, Metric
from cipherface.gallery.packing import _VALUE_SCALE, _Seal
from cipherface.transport import Delivery
from cipherface.wire.payloads import BlockScores, EncryptedBlock, EncryptedProbe
from tests.agents.conftest import Deployment

__all__ = ["DIMENSIONS", "SIMILARITY", "Watch", "gallery_rig"]

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


# -- tampered scores ---------------------------------------------------------------


def _scores(deployment: Deployment, probe_id: str, blocks: list[BlockScores]) -> bytes:
    """A scores message signed by the trusted replica: a malicious cloud, or its stolen key."""
    cloud = deployment.agents[1]
    message = wire.ScoresReady(
        probe_id=probe_id,
        subject=None,
        faces=(wire.FaceScores(box=None, confidence=1.0, scores=tuple(blocks)),),
        request=wire.request_digest(probe_id.encode()),
        submitted_at=0.0,
        timings={},
    )
    return wire.encode(
        message,
        fingerprint=cloud.keyring.fingerprint,  # type: ignore[union-attr]
        signer=cloud.signer,  # type: ignore[union-attr]
    )


def _signed_by_replica(
    deployment: Deployment, message: wire.Message, fingerprint: str | None = None
) -> bytes:
    """``message`` signed by the trusted replica, under its key (or ``fingerprint``)."""
    cloud = deployment.agents[1]
    return wire.encode(
        message,
        fingerprint=fingerprint or cloud.keyring.fingerprint,  # type: ignore[union-attr]
        signer=cloud.signer,  # type: ignore[union-attr]
    )


def _honest_block_scores(deployment: Deployment) -> BlockScores:
    cloud = deployment.agents[1]
    [block] = cloud.gallery.search(_people()["B"])  # type: ignore[union-attr]
    return block


async def _result(deployment: Deployment, body: bytes) -> None:
    link = await deployment.link()
    await link.send(link.topology.results, body)


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


async def gallery_rig(deployment: Deployment) -> tuple[Deployment, Watch]:
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
