"""The gallery exchange delivers enrollments to every replica, a sync's answer to one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from agents.onprem.agent import OnPremAgent, generate_keys
from cipherface import wire
from cipherface.config import Settings
from cipherface.signing import PinnedKey, SigningKey, TrustStore
from cipherface.transport import Delivery, MemoryBroker, MemoryTransport, Role, Topology


async def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


async def test_sync_answer_reaches_the_asking_replica_only(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", prefix="routing")
    generate_keys(settings)
    broker = MemoryBroker()
    topology = Topology(prefix=settings.prefix)
    onprem = OnPremAgent(settings, MemoryTransport(broker, topology, role=Role.ONPREM))
    rng = np.random.default_rng(3)
    for i, subject in enumerate(["alice", "bob"]):
        onprem.book.add(subject, rng.normal(size=128), template_id=f"t{i}")
    await onprem.start()
    replicas = MemoryTransport(broker, topology, role=Role.CLOUD)
    kinds: dict[str, list[str]] = {"r1": [], "r2": []}

    def recorder(name: str) -> Callable[[Delivery], Awaitable[None]]:
        async def record(delivery: Delivery) -> None:
            verifier = PinnedKey(onprem.signer.verify_key)
            message = wire.decode(delivery.body, verifier=verifier).message
            if isinstance(message, wire.BlockChunk):  # one block: a run of chunks
                if message.head is None:
                    return
                kinds[name].append("block")
            else:
                kinds[name].append(message.kind)

        return record

    for name in kinds:
        await replicas.consume(
            topology.gallery_queue(name), recorder(name), bindings=topology.gallery_bindings(name)
        )
    r2 = SigningKey.generate("r2")
    TrustStore(settings.trust_store_path).add("r2", r2.verify_key)
    try:
        await replicas.send(topology.sync, wire.encode(wire.SyncRequest(replica="r2"), signer=r2))
        await until(lambda: kinds["r2"] == ["context", "block"])
        assert kinds["r1"] == []  # no fan-out of a sync's answer
        await onprem.publish_gallery()  # an enrollment-style publish: to everyone
        await until(lambda: len(kinds["r1"]) >= 2 and len(kinds["r2"]) >= 4)
        assert kinds == {"r1": ["context", "block"], "r2": ["context", "block"] * 2}
    finally:
        await replicas.close()
        await onprem.stop()
