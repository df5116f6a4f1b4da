"""Faults against the real RabbitMQ: bursts of probes, agents killed, the broker restarted.

The agents run as real processes (``cipherface onprem`` / ``cipherface cloud``), as
in a deployment. Every burst must end with every probe answered: redelivery after
a SIGKILL or a broker restart is expected, and on-prem suppresses the duplicates
it sees (its `ProbeLedger`). This test subscribes to the events exchange *without*
deduplication, so it counts every event on-prem really published, and it counts
the "duplicate suppressed" lines in on-prem's log.

`FaultCluster` and `run_burst` are shared with ``benchmarks/bench_faults.py``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cipherface import photos, wire
from cipherface.client import Client
from cipherface.exceptions import TransportError
from cipherface.signing import PinnedKey, VerifyKey
from cipherface.transport import Delivery, RabbitMQTransport, Topology
from tests.environment import amqp_url_or_skip, unique_prefix

__all__ = ["BurstResult", "FaultCluster", "broker_restart", "run_burst"]

CLI = Path(sys.executable).with_name("cipherface")
#: Enrolled groups (two photos each) and the photos probed, cycled through a burst.
ENROLLED = ("G01", "G02", "G03")
STRANGER = "G05"
PROBES_IN_TESTS = 1000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


class FaultCluster:
    """On-prem and one cloud replica as processes, with their logs, on one prefix."""

    def __init__(self, url: str, root: Path, deepface_home: Path, *, prefix: str | None = None):
        self.url = url
        self.root = root
        self.prefix = prefix or unique_prefix()
        self.data_dir = root / "data"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "CIPHERFACE_AMQP_URL": url,
            "CIPHERFACE_PREFIX": self.prefix,
            "CIPHERFACE_DATA_DIR": str(self.data_dir),
            "DEEPFACE_HOME": str(deepface_home),
            "CIPHERFACE_LOG_LEVEL": "INFO",
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.replica = "f1"
        #: Each daemon's operations port (/healthz, /readyz, /metrics), kept across restarts.
        self.ports = {role: _free_port() for role in ("onprem", "cloud")}

    # -- commands -----------------------------------------------------------------------
    def run(self, *args: str, timeout: float = 600) -> str:
        """A one-shot ``cipherface`` command; its stdout."""
        done = subprocess.run(
            [str(CLI), *args], env=self.env, capture_output=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"cipherface {' '.join(args)} failed: {done.stderr.decode()[-2000:]}"
            )
        return done.stdout.decode()

    def enroll(self, faces_dir: Path, groups: dict[str, list[str]]) -> None:
        """Keys (on-prem's, and the replica's, trusted on-prem), then two photos of each
        enrolled group (before on-prem starts)."""
        self.run("keygen")
        self.run("replica-key", "--replica", self.replica)
        replica_key = self.data_dir / f"cloud-{self.replica}" / "signing.pub"
        self.run("trust", "add", self.replica, str(replica_key))
        folder = self.root / "enroll"
        for group in ENROLLED:
            (folder / group).mkdir(parents=True, exist_ok=True)
            for name in groups[group][:2]:
                link = folder / group / name
                if not link.exists():
                    link.symlink_to(faces_dir / name)
        self.run("enroll", str(folder))

    # -- daemons ------------------------------------------------------------------------
    def log_path(self, role: str) -> Path:
        """Where a daemon's stderr goes (appended to across restarts)."""
        return self.logs / f"{role}.log"

    def log_text(self, role: str) -> str:
        """Everything a daemon logged so far."""
        path = self.log_path(role)
        return path.read_text(errors="replace") if path.exists() else ""

    def readiness(self, role: str) -> tuple[int, dict[str, object]]:
        """(HTTP status, JSON) of a daemon's ``/readyz``; (0, {}) while it does not answer."""
        url = f"http://127.0.0.1:{self.ports[role]}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read() or b"{}")
        except OSError:
            return 0, {}

    def start(self, role: str, *, timeout: float = 180) -> None:
        """Start ``onprem`` or ``cloud`` and wait until its ``/readyz`` answers 200."""
        args = [str(CLI), role, "--metrics-port", str(self.ports[role])]
        args += ["--replica", self.replica] if role == "cloud" else []
        with self.log_path(role).open("ab") as log:
            self.processes[role] = subprocess.Popen(
                args, env=self.env, stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + timeout
        while self.readiness(role)[0] != 200:
            if self.processes[role].poll() is not None:
                raise RuntimeError(f"{role} exited: {self.log_text(role)[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{role} not ready in {timeout}s: {self.log_text(role)[-3000:]}")
            time.sleep(0.2)

    def kill(self, role: str) -> None:
        """SIGKILL: no draining, no acks, nothing flushed."""
        process = self.processes.pop(role)
        process.send_signal(signal.SIGKILL)
        process.wait(30)

    def alive(self, role: str) -> bool:
        """True while the daemon runs."""
        process = self.processes.get(role)
        return process is not None and process.poll() is None

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every daemon (graceful), SIGKILL what does not stop; their exit codes."""
        codes: dict[str, int | None] = {}
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for role, process in list(self.processes.items()):
            try:
                codes[role] = process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[role] = process.wait(10)
        self.processes.clear()
        return codes

    def topology(self) -> Topology:
        """The daemons' topology (no queue expiry: queue arguments must match theirs)."""
        return Topology(prefix=self.prefix)

    async def delete_broker_objects(self, extra_queues: tuple[str, ...] = ()) -> None:
        """Remove this cluster's queues and exchanges from the broker."""
        import aio_pika

        t = self.topology()
        queues = (*t.work_queues, t.dead_letters, t.gallery_queue(self.replica), *extra_queues)
        connection = await aio_pika.connect(self.url, timeout=10)
        async with connection:
            channel = await connection.channel()
            for name in queues:
                with contextlib.suppress(Exception):
                    await channel.queue_delete(name)
            for name in (spec.name for spec in t.exchanges):
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(name)


@dataclass
class BurstResult:
    """What one burst produced."""

    scenario: str
    sent: int
    #: Events per probe id, as published by on-prem (no deduplication).
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    events: dict[str, wire.VerificationEvent] = field(default_factory=dict)
    #: "duplicate suppressed" lines on-prem logged for this burst's probes.
    suppressed: int = 0
    seconds: float = 0.0
    publish_retries: int = 0

    @property
    def received(self) -> int:
        """Events received, duplicates included."""
        return sum(self.counts.values())

    @property
    def duplicate_events(self) -> int:
        """Events beyond the first for a probe (should be 0)."""
        return sum(n - 1 for n in self.counts.values() if n > 1)

    def summary(self) -> str:
        """One line for logs and the benchmark."""
        return (
            f"{self.scenario:<16} sent={self.sent} events={self.received} "
            f"distinct={len(self.counts)} duplicate_events={self.duplicate_events} "
            f"duplicates_suppressed={self.suppressed} publish_retries={self.publish_retries} "
            f"time={self.seconds:.1f}s"
        )


async def _publish_with_retry(client: Client, image: bytes, subject: str | None, pid: str) -> int:
    """Publish one probe, retrying while the broker is away; the number of retries."""
    for attempt in range(600):
        try:
            await client.publish_probe(image, subject, probe_id=pid)
            return attempt
        except TransportError:
            await asyncio.sleep(0.5)
    raise TimeoutError(f"could not publish {pid}")


async def run_burst(
    cluster: FaultCluster,
    scenario: str,
    probes: list[tuple[bytes, str | None]],
    count: int,
    *,
    fault: Callable[[], Awaitable[None]] | None = None,
    fault_after: float = 0.3,
    timeout: float = 600,
) -> BurstResult:
    """Publish ``count`` probes (cycling through ``probes``), inject ``fault`` once
    ``fault_after`` of the events are in, and wait until every probe has an event.
    """
    result = BurstResult(scenario=scenario, sent=count)
    ids = [f"{scenario}-{i:06d}" for i in range(count)]
    progress = asyncio.Event()
    threshold = max(1, int(count * fault_after))
    queue = f"{cluster.prefix}.watch-{scenario}"
    onprem_key = VerifyKey.load(cluster.data_dir / "onprem" / "signing.pub")

    async def record(delivery: Delivery) -> None:
        event = wire.decode(
            delivery.body, expect=(wire.VerificationEvent,), verifier=PinnedKey(onprem_key)
        ).message
        assert isinstance(event, wire.VerificationEvent)
        result.counts[event.probe_id] += 1
        result.events[event.probe_id] = event
        if len(result.counts) >= threshold or len(result.counts) >= count:
            progress.set()

    transport = RabbitMQTransport(cluster.url, cluster.topology())
    started = time.perf_counter()
    async with transport:
        # A durable queue, not an exclusive one: it must outlive a broker restart.
        await transport.consume(queue, record, bindings=[(transport.topology.events, "#")])
        client = Client(transport, onprem_key)

        async def publish_all() -> None:
            for start in range(0, count, 50):
                batch = [
                    _publish_with_retry(client, *probes[i % len(probes)], ids[i])
                    for i in range(start, min(count, start + 50))
                ]
                result.publish_retries += sum(await asyncio.gather(*batch))

        publisher = asyncio.create_task(publish_all())
        if fault is not None:
            await asyncio.wait_for(progress.wait(), timeout)
            await fault()
        await asyncio.wait_for(publisher, timeout)
        deadline = time.monotonic() + timeout
        while not set(ids) <= set(result.counts):
            if time.monotonic() > deadline:
                missing = sorted(set(ids) - set(result.counts))
                raise TimeoutError(
                    f"{scenario}: {len(missing)} probes without event, e.g. {missing[:5]}"
                )
            await asyncio.sleep(0.2)
        result.seconds = time.perf_counter() - started
        await asyncio.sleep(3)  # late duplicates, if any, arrive now
    result.suppressed = sum(
        1
        for line in cluster.log_text("onprem").splitlines()
        if "duplicate suppressed" in line and f"{scenario}-" in line
    )
    return result


def kill_and_restart(cluster: FaultCluster, role: str) -> Callable[[], Awaitable[None]]:
    """A fault: SIGKILL ``role`` mid-burst, then start it again."""

    async def fault() -> None:
        cluster.kill(role)
        await asyncio.to_thread(cluster.start, role)

    return fault


def broker_restart(pause: float = 2.0) -> Callable[[], Awaitable[None]]:
    """A fault: ``rabbitmqctl stop_app``, a pause, ``start_app`` (always, even on error)."""

    async def fault() -> None:
        try:
            await asyncio.to_thread(_rabbitmqctl, "stop_app")
            await asyncio.sleep(pause)
        finally:
            await asyncio.to_thread(_rabbitmqctl, "start_app")

    return fault


@contextlib.contextmanager
def broker_always_running() -> Iterator[None]:
    """Whatever happens, leave the broker's app started."""
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            _rabbitmqctl("start_app")


def probe_set(faces_dir: Path, groups: dict[str, list[str]]) -> list[tuple[bytes, str | None]]:
    """A handful of photos, 1:1 claims (true and false) and 1:N searches."""
    held_out = {g: (faces_dir / groups[g][2]).read_bytes() for g in ENROLLED}
    stranger = (faces_dir / groups[STRANGER][0]).read_bytes()
    return [
        (held_out["G01"], "G01"),
        (held_out["G02"], None),
        (held_out["G03"], "G03"),
        (stranger, "G01"),
        (held_out["G01"], None),
        (held_out["G02"], "G03"),
    ]


# -- tests ----------------------------------------------------------------------------------

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    deepface_home: Path,
    faces_dir: Path,
) -> Iterator[FaultCluster]:
    """Keys, three groups enrolled, on-prem and a cloud replica running as processes."""
    url = amqp_url_or_skip()
    groups = photos.identity_groups(faces_dir)
    cluster = FaultCluster(url, tmp_path_factory.mktemp("faults"), deepface_home)
    try:
        cluster.enroll(faces_dir, groups)
        cluster.start("onprem")
        cluster.start("cloud")
        yield cluster
    finally:
        with broker_always_running():
            codes = cluster.stop()
            asyncio.run(
                cluster.delete_broker_objects(
                    tuple(f"{cluster.prefix}.watch-{s}" for s in SCENARIOS)
                )
            )
        # Graceful shutdown after all the faults: both daemons exit cleanly.
        assert all(code == 0 for code in codes.values()), (
            codes,
            cluster.log_text("onprem")[-2000:],
        )


SCENARIOS = ("baseline", "kill-cloud", "kill-onprem", "broker-restart")


#: Results on-prem works on at once (its prefetch: ``Settings.prefetch * 4``).
ONPREM_INFLIGHT = 8


def _check(result: BurstResult, cluster: FaultCluster, *, publisher_fault: bool = False) -> None:
    """Every probe answered; duplicates only where exactly-once is impossible.

    When on-prem dies (or the broker goes away) after the broker took an event but
    before on-prem recorded it in its ledger, the redelivered result is published
    again: no publisher can close that window without broker-side deduplication.
    So raw duplicates are bounded by what on-prem holds in flight, events carry the
    probe id as message id, and subscribers (`EventStream`) keep the first.
    """
    print(result.summary())
    assert len(result.counts) == result.sent, result.summary()
    allowed = ONPREM_INFLIGHT if publisher_fault else 0
    assert result.duplicate_events <= allowed, result.summary()
    for event in result.events.values():
        assert event.distance is None or round(event.distance, 4) == event.distance
    assert cluster.alive("onprem") and cluster.alive("cloud")


@pytest.fixture
def probes(faces_dir: Path) -> list[tuple[bytes, str | None]]:
    return probe_set(faces_dir, photos.identity_groups(faces_dir))


async def test_burst_one_event_per_probe(
    cluster: FaultCluster, probes: list[tuple[bytes, str | None]]
) -> None:
    result = await run_burst(cluster, "baseline", probes, PROBES_IN_TESTS)
    _check(result, cluster)
    assert result.suppressed == 0
    # The decisions are the right ones, not just present.
    by_kind = {
        (r.subject, r.verified)
        for r in (result.events[f"baseline-{i:06d}"] for i in range(len(probes)))
    }
    assert ("G01", True) in by_kind and ("G02", True) in by_kind


async def test_cloud_killed_mid_burst(
    cluster: FaultCluster, probes: list[tuple[bytes, str | None]]
) -> None:
    result = await run_burst(
        cluster, "kill-cloud", probes, PROBES_IN_TESTS, fault=kill_and_restart(cluster, "cloud")
    )
    _check(result, cluster)


async def test_onprem_killed_mid_burst(
    cluster: FaultCluster, probes: list[tuple[bytes, str | None]]
) -> None:
    result = await run_burst(
        cluster, "kill-onprem", probes, PROBES_IN_TESTS, fault=kill_and_restart(cluster, "onprem")
    )
    _check(result, cluster, publisher_fault=True)


async def test_broker_restarted_mid_burst(
    cluster: FaultCluster, probes: list[tuple[bytes, str | None]]
) -> None:
    with broker_always_running():
        result = await run_burst(
            cluster, "broker-restart", probes, PROBES_IN_TESTS, fault=broker_restart()
        )
    _check(result, cluster, publisher_fault=True)
