"""A probe that crashes every replica taking it ends in the dead letters, not in a crash loop.

Two real replica processes (`tests.agents.crashing_replica`: ``cipherface cloud``
with an embedder that aborts on one input, as a native fault would) compete for
probes on the shared RabbitMQ; a supervisor restarts whichever dies, as systemd
or Kubernetes would. The probe queue is a quorum queue with ``x-delivery-limit``:
after ``limit + 1`` deliveries, each of which killed a replica, the broker
dead-letters the poison probe, and every other probe is answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agents.onprem.agent import OnPremAgent, generate_keys
from cipherface.client import Client
from cipherface.config import Settings
from cipherface.deadletters import list_dead
from cipherface.private import private_dir
from cipherface.signing import SigningKey, TrustStore, VerifyKey
from cipherface.transport import open_transport
from tests.agents.crashing_replica import POISON
from tests.environment import amqp_url_or_skip, unique_prefix
from tests.rabbitnode import free_port

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 2
REPLICAS = ("p1", "p2")


class Replicas:
    """Replica processes, restarted when they die (counted by signal)."""

    def __init__(self, settings: Settings, env: dict[str, str], logs: Path) -> None:
        self.settings = settings
        self.env = env
        self.logs = logs
        self.ports = {name: free_port() for name in REPLICAS}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.deaths: list[int] = []

    def start(self, name: str) -> None:
        args = ["--replica", name, "--metrics-port", str(self.ports[name])]
        with (self.logs / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "tests.agents.crashing_replica", *args],
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def supervise(self) -> None:
        """Restart every replica that exited, remembering how it ended."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                self.deaths.append(process.returncode)
                self.start(name)

    def ready(self, name: str) -> bool:
        try:
            url = f"http://127.0.0.1:{self.ports[name]}/readyz"
            with urllib.request.urlopen(url, timeout=2) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    yield Settings(
        data_dir=tmp_path / "data",
        prefix=unique_prefix(),
        amqp_url=amqp_url_or_skip(),
        delivery_limit=LIMIT,
        sync_interval=2.0,
        gallery_queue_expiry=300.0,
    )


async def _until(condition: object, timeout: float, replicas: Replicas) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        replicas.supervise()
        if time.monotonic() > deadline:
            logs = {p.name: p.read_text()[-1500:] for p in replicas.logs.glob("*.log")}
            raise TimeoutError(f"not reached in {timeout}s; deaths {replicas.deaths}; {logs}")
        await asyncio.sleep(0.3)


async def test_a_probe_that_kills_its_replica_is_dead_lettered_after_the_limit(
    settings: Settings, tmp_path: Path
) -> None:
    generate_keys(settings)
    rng = np.random.default_rng(11)
    vectors = {s: rng.normal(size=128) for s in ("alice", "bob")}
    vector_file = tmp_path / "vectors.json"
    vector_file.write_text(json.dumps({s: v.tolist() for s, v in vectors.items()}))
    trust = TrustStore(settings.trust_store_path)
    for name in REPLICAS:
        private_dir(settings.override(replica=name).cloud_dir)
        key = SigningKey.load_or_create(settings.override(replica=name).replica_key_path, name)
        trust.add(name, key.verify_key)
    env = {
        **os.environ,
        **{f"CIPHERFACE_{k}": str(v) for k, v in _env(settings).items()},
        "CIPHERFACE_TEST_VECTORS": str(vector_file),
    }
    replicas = Replicas(settings, env, tmp_path)
    async with open_transport(settings) as link:
        onprem = OnPremAgent(settings, link)
        for subject, vector in vectors.items():
            onprem.book.add(subject, vector, template_id=f"t-{subject}")
        await onprem.start()
        try:
            for name in REPLICAS:
                replicas.start(name)
            await _until(lambda: all(replicas.ready(n) for n in REPLICAS), 300, replicas)
            client = Client(link, VerifyKey.load(settings.onprem_verify_key_path))
            async with client.events() as stream:
                poison = await client.publish_probe(POISON)
                good = [await client.publish_probe(f"subject:{s}".encode()) for s in vectors]
                answered = {}
                deadline = time.monotonic() + 300
                for pid in good:
                    while pid not in answered:
                        replicas.supervise()
                        assert time.monotonic() < deadline, f"no event; deaths {replicas.deaths}"
                        try:
                            answered[pid] = await stream.wait_for(pid, 1)
                        except asyncio.TimeoutError:
                            pass
            dead: list[object] = []

            async def poison_dead() -> bool:
                dead[:] = [d for d in await list_dead(link) if d.message_id == poison]
                return bool(dead)

            deadline = time.monotonic() + 300
            while not await poison_dead():
                replicas.supervise()
                assert time.monotonic() < deadline, f"not dead-lettered; deaths {replicas.deaths}"
                await asyncio.sleep(0.5)
            await _until(lambda: all(replicas.ready(n) for n in REPLICAS), 300, replicas)
        finally:
            replicas.stop()
            await onprem.stop()
            await _delete_queues(link, settings)
    [letter] = dead
    assert "delivery_limit" in letter.reason and letter.kind == "probe", letter  # type: ignore[attr-defined]
    assert letter.source == link.topology.probes  # type: ignore[attr-defined]
    # Each delivery killed the replica that took it; then the broker stopped it.
    assert replicas.deaths == [-signal.SIGABRT] * (LIMIT + 1), replicas.deaths
    for pid, subject in zip(good, vectors, strict=True):
        assert answered[pid].verified and answered[pid].subject == subject, answered[pid]


def _env(settings: Settings) -> dict[str, object]:
    """What the replica processes need to share this test's deployment."""
    return {
        "AMQP_URL": settings.amqp_url,
        "PREFIX": settings.prefix,
        "DATA_DIR": settings.data_dir,
        "DELIVERY_LIMIT": settings.delivery_limit,
        "SYNC_INTERVAL": settings.sync_interval,
        "GALLERY_QUEUE_EXPIRY": settings.gallery_queue_expiry,
        # One probe in flight per replica: a crash also returns (and counts a delivery
        # of) every other probe the replica held, which the limit would dead-letter too.
        "PREFETCH": 1,
    }


async def _delete_queues(link: object, settings: Settings) -> None:
    """This test's quorum queues have no idle expiry (the daemons' arguments): remove them."""
    import aio_pika

    topology = link.topology  # type: ignore[attr-defined]
    assert settings.amqp_url is not None
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        for queue in (*topology.work_queues, topology.dead_letters):
            await channel.queue_delete(queue)
    finally:
        await connection.close()
