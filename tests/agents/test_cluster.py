"""A 3-node RabbitMQ cluster loses the node leading the probe queue mid-burst; nothing is lost.

Three private nodes joined into one cluster (`tests.rabbitnode.RabbitCluster`);
on-prem, two replicas and a client connect through the list of the nodes' URLs
(each starting at the first node, where the quorum queues get their leaders).
The gallery is spread over two shards, a replica each: every 1:N probe is
embedded by one replica and searched by both shards through their queues.
A 1:N burst is published; once part of it is answered, the node leading the
probe queue is stopped. The agents reconnect to the next node, the quorum
queues elect new leaders on the two left, and every probe is answered, once
(distinct events), and right. Embeddings are synthetic (`SyntheticEmbedder`):
what is under test is the broker, not DeepFace.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agents.cloud.agent import CloudAgent
from agents.onprem.agent import OnPremAgent, generate_keys
from cipherface import wire
from cipherface.client import Client
from cipherface.config import Settings
from cipherface.signing import PinnedKey, TrustStore, VerifyKey
from cipherface.transport import Delivery, RabbitMQTransport, open_transport
from tests.agents.test_message_size import SyntheticEmbedder
from tests.environment import unique_prefix
from tests.rabbitnode import RabbitCluster

pytestmark = pytest.mark.rabbitmq

BURST = 150
SUBJECTS = ("alice", "bob", "carol")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    with RabbitCluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


def _leader(cluster: RabbitCluster, queue: str) -> str:
    """The Erlang node leading a quorum queue, as the cluster reports it."""
    node = next(n for n in cluster.nodes if n.ctl("status", check=False).returncode == 0)
    done = node.ctl("list_queues", "name", "leader", "--formatter", "json")
    return next(q["leader"] for q in json.loads(done.stdout) if q["name"] == queue)


async def test_losing_the_probe_queue_leader_mid_burst_loses_no_probe(
    cluster: RabbitCluster, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        prefix=unique_prefix(),
        amqp_url=",".join(cluster.urls),
        sync_interval=2.0,
        prefetch=4,
        shards=2,
        # A shard's answers wait out the failover (a new leader, reconnections) before
        # on-prem would call a probe partial.
        gather_timeout=300.0,
    )
    generate_keys(settings)
    rng = np.random.default_rng(7)
    vectors = {s: rng.normal(size=128) for s in SUBJECTS}
    probes = {s: v + rng.normal(scale=0.02, size=128) for s, v in vectors.items()}
    raw: collections.Counter[str] = collections.Counter()
    answers: dict[str, set[tuple[str | None, bool, bool]]] = collections.defaultdict(set)
    async with open_transport(settings) as onprem_link:
        onprem = OnPremAgent(settings, onprem_link)
        await onprem.start()  # two shards: the book spreads the subjects over both
        for subject, vector in vectors.items():
            onprem.book.add(subject, vector, template_id=f"t-{subject}")
        replicas = []
        # The watcher reads events on the last node, which stays up: a subscriber's
        # queue is classic and exclusive, and lives on the node it was declared on.
        watcher = RabbitMQTransport(list(reversed(cluster.urls)), onprem_link.topology)
        try:
            for shard, name in enumerate(("c1", "c2")):
                link = await open_transport(settings).__aenter__()
                replica = CloudAgent(settings.override(replica=name, shard=shard), link)
                TrustStore(settings.trust_store_path).add(name, replica.signer.verify_key)
                replica.embedder = SyntheticEmbedder(probes)  # type: ignore[assignment]
                await replica.start()
                replicas.append((replica, link))
            for replica, _ in replicas:
                await asyncio.wait_for(replica.ready.wait(), 120)
                await asyncio.wait_for(_serving(replica), 60)
            await watcher.__aenter__()
            pinned = PinnedKey(onprem.signer.verify_key)

            async def on_event(delivery: Delivery) -> None:
                event = wire.decode(delivery.body, verifier=pinned).message
                assert isinstance(event, wire.VerificationEvent)
                raw[event.probe_id] += 1
                answers[event.probe_id].add((event.subject, event.verified, event.partial))

            topology = onprem_link.topology
            await watcher.consume("", on_event, bindings=[(topology.events, "#")], exclusive=True)
            client = Client(onprem_link, VerifyKey.load(settings.onprem_verify_key_path))
            sent = {}
            for i in range(BURST):
                subject = SUBJECTS[i % len(SUBJECTS)]
                sent[await client.publish_probe(subject.encode())] = subject
            await _until(lambda: len(raw) >= BURST // 4, 300)
            leader = _leader(cluster, topology.probes)
            answered_before = len(raw)
            cluster.node_named(leader).stop()  # the whole node, not only its app
            await _until(lambda: len(raw) >= BURST, 600)
            new_leader = _leader(cluster, topology.probes)
            searches = [replica.shards.searches for replica, _ in replicas]
        finally:
            for replica, link in replicas:
                await replica.stop()
                await link.close()
            await watcher.close()
            await onprem.stop()
    wrong = {p: a for p, a in answers.items() if a != {(sent[p], True, False)}}
    duplicates = sum(n - 1 for n in raw.values())
    print(
        f"cluster: {BURST} probes, {answered_before} answered before {leader} stopped, "
        f"new leader {new_leader}; distinct events {len(raw)}, raw duplicates {duplicates}, "
        f"wrong {len(wrong)}; searches per shard {searches}"
    )
    assert set(raw) == set(sent) and not wrong, wrong
    assert answered_before < BURST and new_leader != leader
    assert min(searches) >= BURST  # every probe searched on both shards


async def _serving(replica: CloudAgent) -> None:
    while not replica.serving:
        await asyncio.sleep(0.1)


async def _until(condition: object, timeout: float) -> None:
    async def poll() -> None:
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.1)

    await asyncio.wait_for(poll(), timeout)
