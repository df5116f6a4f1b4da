"""Every message under 4 MiB: a private RabbitMQ node that refuses more, and the agents on it.

The node runs with ``max_message_size = 4194304``, as the CI broker does
(`.ci/run`). The broker itself refuses a larger message; galleries of 128, 512
and 4096 dimensions (synthetic embeddings: the gallery does not care where they
come from, and only Dlib's weights exist here) go end to end through it, 1:1 and
1:N, their blocks in chunks; edge-encrypted probes of 128 and 512 dimensions
(16.8 and 67 MB) go through it in pieces, every message under the cap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agents.cloud.agent import CloudAgent
from agents.onprem.agent import generate_keys
from cipherface import wire
from cipherface.config import Settings
from cipherface.crypto import Keyring
from cipherface.embedding import Face
from cipherface.exceptions import MessageTooLargeError, TransportError
from cipherface.gallery import encrypt_probe
from cipherface.signing import SigningKey, TrustStore
from cipherface.transport import RabbitMQTransport, Topology
from cipherface.wire.payloads import EncryptedBlock
from tests.agents.conftest import Deployment
from tests.environment import unique_prefix
from tests.rabbitnode import RabbitNode

pytestmark = pytest.mark.rabbitmq

CAP = 4 * 1024 * 1024
#: A model of each dimension, for its threshold (the embeddings are synthetic).
MODELS = {128: "Dlib", 512: "Facenet512", 4096: "VGG-Face"}
SUBJECTS = ("alice", "bob", "carol")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A private broker refusing messages over 4 MiB."""
    root = tmp_path_factory.mktemp("rabbit-cap")
    with RabbitNode(root, config=[f"max_message_size = {CAP}"]) as started:
        yield started


async def test_the_broker_refuses_a_message_over_its_cap(node: RabbitNode) -> None:
    topology = Topology(prefix=unique_prefix(), idle_queue_expiry_ms=60_000)
    # This transport's own cap lifted: only the broker stands in the way.
    async with RabbitMQTransport(node.amqp_url(), topology, max_message_size=8 * CAP) as link:
        await link.send(topology.sync, b"x" * (CAP - 4096))
        with pytest.raises(TransportError, match="larger than configured max size"):
            await link.send(topology.sync, b"x" * (CAP + 1))
    # With its cap (the default), a transport refuses it before the broker sees it.
    async with RabbitMQTransport(node.amqp_url(), topology) as link:
        with pytest.raises(MessageTooLargeError, match=f"exceeds the {CAP}-byte"):
            await link.send(topology.sync, b"x" * (CAP + 1))
        assert await link.queue_depth(topology.sync) == 1  # only the message that fit


async def test_a_cap_set_live_applies_to_new_connections(node: RabbitNode) -> None:
    """What `.ci/run` does to the shared broker: ``rabbitmqctl eval``, no restart."""
    topology = Topology(prefix=unique_prefix(), idle_queue_expiry_ms=60_000)
    lower = CAP // 2
    node.ctl("eval", f"application:set_env(rabbit, max_message_size, {lower}).")
    try:
        async with RabbitMQTransport(node.amqp_url(), topology, max_message_size=CAP) as link:
            await link.send(topology.sync, b"x" * (lower - 4096))
            with pytest.raises(TransportError, match="larger than configured max size"):
                await link.send(topology.sync, b"x" * (lower + 1))
    finally:
        node.ctl("eval", f"application:set_env(rabbit, max_message_size, {CAP}).")


class SyntheticEmbedder:
    """Stands in for DeepFace: an "image" names a subject, its face is that subject's vector."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    def close(self) -> None:
        """Nothing to release (a replica closes its embedder when it stops)."""

    def embed(self, image: bytes, *, name: str | None = None) -> list[Face]:
        area = {"x": 0, "y": 0, "w": 100, "h": 100, "left_eye": None, "right_eye": None}
        return [Face(embedding=self.vectors[image.decode()], facial_area=area, confidence=1.0)]


async def _deployed(
    node: RabbitNode, tmp_path: Path, dimensions: int
) -> tuple[Deployment, dict[str, np.ndarray]]:
    """On-prem (three subjects enrolled) and a ready replica on the 4 MiB node; the
    replica "embeds" an image naming a subject as that subject's vector plus noise."""
    settings = Settings(
        data_dir=tmp_path / "data",
        prefix=unique_prefix(),
        amqp_url=node.amqp_url(),
        model=MODELS[dimensions],
        sync_interval=2.0,
    )
    assert settings.max_message_size == CAP
    generate_keys(settings)
    deployment = Deployment(settings, settings.amqp_url)
    rng = np.random.default_rng(dimensions)
    enrolled = {s: rng.normal(size=dimensions) for s in SUBJECTS}
    probes = {s: v + rng.normal(scale=0.02, size=dimensions) for s, v in enrolled.items()}
    try:
        onprem = await deployment.onprem()
        for subject, vector in enrolled.items():
            onprem.book.add(subject, vector, template_id=f"t-{subject}")
        cloud = CloudAgent(settings.override(replica="r1"), await deployment.link(CAP))
        TrustStore(settings.trust_store_path).add("r1", cloud.signer.verify_key)
        cloud.embedder = SyntheticEmbedder(probes)  # type: ignore[assignment]
        await cloud.start()
        deployment.agents.append(cloud)
        await asyncio.wait_for(cloud.ready.wait(), 600)
    except BaseException:
        await deployment.close()
        raise
    assert len(cloud.gallery or ()) == len(SUBJECTS)
    return deployment, probes


@pytest.mark.parametrize("dimensions", [128, 512, 4096])
async def test_a_gallery_goes_end_to_end_under_the_cap(
    node: RabbitNode, tmp_path: Path, dimensions: int
) -> None:
    deployment, _ = await _deployed(node, tmp_path, dimensions)
    try:
        client = await deployment.client()
        async with client.events() as stream:
            one_to_n = await client.publish_probe(b"bob")
            true_claim = await client.publish_probe(b"carol", "carol")
            false_claim = await client.publish_probe(b"alice", "bob")
            found = await stream.wait_for(one_to_n, 300)
            verified = await stream.wait_for(true_claim, 300)
            refused = await stream.wait_for(false_claim, 300)
    finally:
        await deployment.close()
    assert found.error is None and found.verified and found.subject == "bob", found
    assert verified.error is None and verified.verified, verified
    assert refused.error is None and not refused.verified, refused


@pytest.mark.parametrize(("dimensions", "pieces"), [(128, 5), (512, 17)])
async def test_edge_probes_go_end_to_end_under_the_cap_in_pieces(
    node: RabbitNode, tmp_path: Path, dimensions: int, pieces: int
) -> None:
    deployment, probes = await _deployed(node, tmp_path, dimensions)
    try:
        public = Keyring.load(deployment.settings.public_key_path, expect="public")
        metric = deployment.settings.metric
        encrypted = {s: encrypt_probe(public, v, metric) for s, v in probes.items()}
        client = await deployment.client()
        sizes: list[int] = []
        send = client.transport.send

        async def measured(queue: str, body: bytes, **kwargs: object) -> None:
            sizes.append(len(body))
            await send(queue, body, **kwargs)  # type: ignore[arg-type]

        client.transport.send = measured  # type: ignore[method-assign]
        async with client.events() as stream:
            one_to_n = await client.publish_encrypted_probe(encrypted["bob"])
            true_claim = await client.publish_encrypted_probe(encrypted["carol"], "carol")
            false_claim = await client.publish_encrypted_probe(encrypted["alice"], "bob")
            found = await stream.wait_for(one_to_n, 600)
            verified = await stream.wait_for(true_claim, 600)
            refused = await stream.wait_for(false_claim, 600)
    finally:
        await deployment.close()
    assert len(sizes) == 3 * pieces and max(sizes) <= CAP, sizes
    assert sum(sizes) > 3 * dimensions * 131_000  # the whole probes' worth went through
    assert found.error is None and found.verified and found.subject == "bob", found
    assert "embed" not in found.timings  # the cloud never saw an image
    assert verified.error is None and verified.verified, verified
    assert refused.error is None and not refused.verified, refused


def test_a_block_of_each_size_is_chunked_under_the_cap() -> None:
    """How many chunks a whole block takes (printed)."""
    signer = SigningKey.generate("onprem")
    for dimensions in MODELS:
        block = EncryptedBlock(
            block_id=0,
            version=1,
            fingerprint="f" * 64,
            metric="cosine",
            dimensions=dimensions,
            template_ids=tuple(f"{i:032x}" for i in range(8192)),
            subjects=tuple(f"subject-{i}" for i in range(8192)),
            columns=(b"\x01" * 65_600,) * dimensions,
            norms=None,
        )
        sizes = [
            len(wire.encode(c, fingerprint="f" * 64, signer=signer))
            for c in wire.split_block(block, CAP)
        ]
        assert max(sizes) <= CAP
        print(f"{dimensions}-d block: {sum(sizes):,} B in {len(sizes)} chunks <= {max(sizes):,} B")
