"""The gallery over its life, on real agents: remove and list, probe time-to-live,
dead-letter replay, gallery queue expiry, restarts that load off the loop, and a
shutdown in the middle of a sync."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agents.cli import main
from agents.cloud.agent import CloudAgent
from agents.onprem.agent import OnPremAgent
from cipherface import wire
from cipherface.config import Settings
from cipherface.deadletters import list_dead, replay_dead
from cipherface.exceptions import ConfigError
from cipherface.signing import PinnedKey, SigningKey, TrustStore
from cipherface.store import GalleryStore
from cipherface.transport import Delivery, RabbitMQTransport, open_transport
from tests.agents.conftest import Deployment
from tests.agents.trust import Watch
from tests.environment import amqp_url_or_skip, unique_prefix


async def until(condition: object, timeout: float = 60.0) -> None:
    """Poll ``condition()`` until true (a deadline, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


def _files_holding(folder: Path, needle: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def test_remove_republishes_erases_and_list_shows_versions(
    rig: tuple[Deployment, Watch], capsys: pytest.CaptureFixture[str]
) -> None:
    deployment, _ = rig
    onprem, cloud = deployment.agents[0], deployment.agents[1]
    assert isinstance(onprem, OnPremAgent) and isinstance(cloud, CloudAgent)
    block, slot = onprem.book.slot_of("A")
    [(_, embedding)] = onprem.book.embeddings({block: [slot]}).values()
    needle = embedding.tobytes()
    # Sanity: the scan finds the embedding while it is enrolled.
    assert _files_holding(deployment.settings.onprem_dir, needle)
    before = cloud.gallery._layouts[block].version  # type: ignore[union-attr]
    await until(lambda: "r1" in onprem.replicas)

    report = await onprem.remove("A")
    assert report.removed == 1 and report.blocks_published == 1
    await until(lambda: cloud.gallery._layouts[block].version > before)  # type: ignore[union-attr]
    assert "A" not in cloud.gallery.subjects() and "B" in cloud.gallery.subjects()  # type: ignore[union-attr]
    # The replica reports the new version once it is stored.
    await until(lambda: onprem.replicas["r1"].versions == (before + 1,))
    # Only the new version is stored: the replica would load it after a restart.
    with GalleryStore(cloud.settings.cloud_dir / "gallery.sqlite") as store:
        assert [(b.block_id, b.version) for b in store.iter_blocks()] == [(block, before + 1)]
    # The removed embedding is on no file of on-prem's folder (book, WAL, ledger, ...).
    assert _files_holding(deployment.settings.onprem_dir, needle) == []

    assert (
        await asyncio.to_thread(main, ["list", "--data-dir", str(deployment.settings.data_dir)])
        == 0
    )
    listing = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "A" not in listing["subjects"] and listing["subjects"]["B"] == 1
    assert listing["blocks"] == [
        {
            "block": block,
            "version": before + 1,
            "templates": len(onprem.book),
            "pending": False,
            "shard": 0,
            "replicas": {"r1": before + 1},
        }
    ]
    assert listing["replicas"]["r1"]["up_to_date"] is True
    assert listing["replicas"]["r1"]["shard"] == 0
    with pytest.raises(ConfigError, match="no enrolled subject"):
        await onprem.remove("nobody")


async def test_a_probe_past_its_time_to_live_gets_an_expired_event(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, watch = rig
    link = await deployment.link()
    stale = wire.ProbeRequest(
        probe_id="stale", image=b"not even looked at", submitted_at=time.time() - 3600
    )
    await link.send(link.topology.probes, wire.encode(stale), message_id="stale")
    event = await watch.event("stale")
    assert event.error and event.error.startswith("Expired:")
    assert event.distance is None and not event.verified


async def test_a_dead_sync_is_replayed_once_its_replica_is_trusted(
    deployment: Deployment,
) -> None:
    onprem = await deployment.onprem()
    rng = np.random.default_rng(5)
    onprem.book.add("alice", rng.normal(size=128), template_id="a")
    await onprem.publish_gallery(onprem.book.pending_blocks())
    # A replica the operator forgot to trust: its sync is dead-lettered.
    replica = CloudAgent(replace(deployment.settings, replica="late"), await deployment.link())
    deployment.agents.append(replica)
    await replica.start()
    admin = await deployment.link()
    dead: list = []

    async def sync_is_dead() -> bool:
        dead[:] = await list_dead(admin)
        return any(letter.kind == "sync" for letter in dead)

    deadline = time.monotonic() + 30
    while not await sync_is_dead():
        assert time.monotonic() < deadline, "no dead sync"
        await asyncio.sleep(0.1)
    [letter] = [d for d in dead if d.kind == "sync"]
    assert "SignatureError" in letter.reason and letter.source == admin.topology.sync
    assert not replica.ready.is_set()

    TrustStore(deployment.settings.trust_store_path).add("late", replica.signer.verify_key)
    replayed = await replay_dead(admin, [letter.message_id] if letter.message_id else ())
    assert [r.kind for r in replayed] == ["sync"]
    await asyncio.wait_for(replica.ready.wait(), 60)
    assert replica.gallery is not None and replica.gallery.subjects() == ["alice"]
    assert not any(d.kind == "sync" for d in await list_dead(admin))


@pytest.mark.rabbitmq
async def test_a_gallery_queue_nobody_consumes_expires(tmp_path: Path) -> None:
    url = amqp_url_or_skip()
    settings = Settings(
        amqp_url=url, prefix=unique_prefix(), data_dir=tmp_path, gallery_queue_expiry=1.0
    )

    async def noop(delivery: Delivery) -> None:
        return None

    async with open_transport(settings) as transport:
        assert isinstance(transport, RabbitMQTransport)
        topology = transport.topology
        queue = topology.gallery_queue("gone")
        consumer = await transport.consume(queue, noop, bindings=topology.gallery_bindings("gone"))
        await asyncio.sleep(1.5)  # consumed: it stays however long
        assert await transport.queue_depth(queue) == 0
        await consumer.cancel()
        deadline = time.monotonic() + 60
        # Looking (a passive declaration) counts as use: look less often than it expires.
        await asyncio.sleep(3)
        while await transport.queue_depth(queue) is not None:
            assert time.monotonic() < deadline, "the idle gallery queue did not expire"
            await asyncio.sleep(3)
        # The work queues are not affected.
        assert await transport.queue_depth(topology.probes) == 0
        for name in (*topology.work_queues, topology.dead_letters):
            with contextlib.suppress(Exception):
                channel = await transport._connection.channel()  # type: ignore[union-attr]
                await channel.queue_delete(name)


async def test_a_restarted_replica_loads_its_gallery_off_the_loop_and_keeps_its_identity(
    rig: tuple[Deployment, Watch], monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment, _ = rig
    cloud = deployment.agents[1]
    assert isinstance(cloud, CloudAgent)
    key = cloud.signer.verify_key.to_text()
    await deployment.stop(cloud)
    loaded_on: list[threading.Thread] = []
    original = GalleryStore.iter_blocks

    def spy(self: GalleryStore) -> Iterator[object]:
        loaded_on.append(threading.current_thread())
        return original(self)

    monkeypatch.setattr(GalleryStore, "iter_blocks", spy)
    again = CloudAgent(replace(deployment.settings, replica="r1"), await deployment.link())
    deployment.agents.append(again)
    await again.start()
    assert again.ready.is_set() and len(again.gallery or ()) == 6
    assert loaded_on and threading.main_thread() not in loaded_on
    assert again.signer.verify_key.to_text() == key and again.replica == "r1"


async def test_shutdown_in_the_middle_of_a_sync_never_closes_the_book_under_it(
    tmp_path: Path,
) -> None:
    from agents.onprem.keys import generate_keys
    from cipherface.transport import MemoryBroker, MemoryTransport, Topology

    settings = Settings(data_dir=tmp_path / "data", prefix="shutdown")
    generate_keys(settings)
    broker = MemoryBroker()
    topology = Topology(prefix=settings.prefix)
    onprem = OnPremAgent(settings, MemoryTransport(broker, topology))
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(onprem.book.capacity * 2 + 1, 128))
    onprem.book.add_many([(f"s{i}", v) for i, v in enumerate(vectors)])  # three blocks
    state = {"running": False, "closed_while_running": None, "blocks": 0}
    book = onprem.book
    encrypt_blocks, close = book.encrypt_blocks, book.close

    def spied_blocks(*args: object, **kwargs: object) -> Iterator[object]:
        inner = encrypt_blocks(*args, **kwargs)  # type: ignore[arg-type]

        def gen() -> Iterator[object]:
            while True:
                state["running"] = True
                try:
                    item = next(inner, None)
                finally:
                    state["running"] = False
                if item is None:
                    return
                yield item

        return gen()

    def spied_close() -> None:
        state["closed_while_running"] = state["running"]
        close()

    book.encrypt_blocks = spied_blocks  # type: ignore[method-assign]
    book.close = spied_close  # type: ignore[method-assign]
    replica_link = MemoryTransport(broker, topology)

    pinned = PinnedKey(onprem.signer.verify_key)

    async def count(delivery: Delivery) -> None:
        if wire.decode(delivery.body, verifier=pinned).message.kind == "chunk":
            state["blocks"] += 1

    await replica_link.consume(
        topology.gallery_queue("r"), count, bindings=topology.gallery_bindings("r")
    )
    await onprem.start()
    key = SigningKey.generate("r")
    TrustStore(settings.trust_store_path).add("r", key.verify_key)
    await replica_link.send(topology.sync, wire.encode(wire.SyncRequest(replica="r"), signer=key))
    await until(lambda: state["blocks"] >= 1, 120)
    for consumer in onprem._consumers:  # a short drain, so the sync is aborted, not finished
        consumer.cancel = _short(consumer.cancel)  # type: ignore[method-assign]
    await onprem.stop()
    assert state["closed_while_running"] is False
    await replica_link.close()


def _short(cancel: object) -> object:
    async def quick(*, timeout: float = 30.0) -> None:
        await cancel(timeout=0.01)  # type: ignore[operator]

    return quick


async def test_rotating_keys_of_an_empty_gallery_and_an_interrupted_preparation(
    deployment: Deployment,
) -> None:
    deployment.settings = replace(deployment.settings, rotation_grace=0.1)
    onprem = await deployment.onprem()
    cloud = await deployment.cloud("r1")
    await asyncio.wait_for(cloud.ready.wait(), 60)
    await until(lambda: "r1" in onprem.replicas)
    old = onprem.keyring.fingerprint
    await asyncio.wait_for(onprem.rotation.start(), 120)
    assert onprem.rotation.state["phase"] == "done"
    assert cloud.keyring is not None and cloud.keyring.fingerprint == onprem.keyring.fingerprint
    assert onprem.keyring.fingerprint != old
    # While a rotation runs the gallery does not change; one cut short before it
    # published anything is abandoned at the next start.
    onprem.rotation._update(phase="preparing", folder="keys/partial")
    (deployment.settings.onprem_dir / "keys" / "partial").mkdir(mode=0o700)  # as rotation makes it
    with pytest.raises(ConfigError, match="rotation is in progress"):
        await onprem.remove("anyone")
    await deployment.stop(onprem)
    again = await deployment.onprem()
    assert again.rotation.state["phase"] == "aborted"
    assert not (deployment.settings.onprem_dir / "keys" / "partial").exists()
    assert again.keyring.fingerprint == cloud.keyring.fingerprint
