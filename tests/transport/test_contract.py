"""One contract, two transports: the same test bodies run in memory and on RabbitMQ."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cipherface.exceptions import TransportError, WireFormatError
from cipherface.transport import REASON_HEADER, SOURCE_HEADER, Delivery, Role, Transport
from cipherface.transport.base import DELIVERY_COUNT_HEADER, REQUEUE_DELAY, requeue_delay
from cipherface.transport.memory import topic_matches
from tests.transport.conftest import Links

Pair = tuple[Transport, Transport]


class Collector:
    """A handler that records deliveries and can be told to fail."""

    def __init__(self, fail_with: BaseException | None = None, times: int = 1) -> None:
        self.deliveries: list[Delivery] = []
        self.fail_with = fail_with
        self.failures_left = times
        self.arrived = asyncio.Event()

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self.arrived.set()
        if self.fail_with is not None and self.failures_left > 0:
            self.failures_left -= 1
            raise self.fail_with

    async def wait(self, count: int, timeout: float = 10.0) -> None:
        async def enough() -> None:
            while len(self.deliveries) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), timeout)


async def test_work_queue_keeps_messages_sent_before_any_consumer(transport_pair: Pair) -> None:
    producer, consumer_side = transport_pair
    queue = producer.topology.probes
    for i in range(5):
        await producer.send(queue, f"m{i}".encode(), message_id=str(i))
    seen = Collector()
    await consumer_side.consume(queue, seen)
    await seen.wait(5)
    assert sorted(d.body for d in seen.deliveries) == [f"m{i}".encode() for i in range(5)]
    assert {d.message_id for d in seen.deliveries} == {str(i) for i in range(5)}


async def test_competing_consumers_each_message_once(transport_pair: Pair) -> None:
    producer, consumer_side = transport_pair
    queue = producer.topology.probes
    first, second = Collector(), Collector()
    await consumer_side.consume(queue, first, prefetch=1)
    await producer.consume(queue, second, prefetch=1)
    for i in range(20):
        await producer.send(queue, str(i).encode())
    deadline = asyncio.get_running_loop().time() + 10
    while len(first.deliveries) + len(second.deliveries) < 20:
        assert asyncio.get_running_loop().time() < deadline, "messages missing"
        await asyncio.sleep(0.05)
    bodies = [d.body for d in first.deliveries + second.deliveries]
    assert sorted(bodies) == sorted(str(i).encode() for i in range(20))


async def test_gallery_broadcast_reaches_every_replica_a_replica_key_only_one(
    transport_pair: Pair,
) -> None:
    producer, consumer_side = transport_pair
    t = producer.topology
    a, b = Collector(), Collector()
    await consumer_side.consume(t.gallery_queue("a"), a, bindings=t.gallery_bindings("a"))
    await consumer_side.consume(t.gallery_queue("b"), b, bindings=t.gallery_bindings("b"))
    await producer.publish(t.gallery, t.gallery_key("b"), b"for-b")
    await producer.publish(t.gallery, t.gallery_broadcast_key, b"block")
    await a.wait(1)
    await b.wait(2)
    await asyncio.sleep(0.2)
    assert [d.body for d in a.deliveries] == [b"block"]
    assert [d.body for d in b.deliveries] == [b"for-b", b"block"]


async def test_a_replica_named_all_gets_a_broadcast_once(transport_pair: Pair) -> None:
    producer, consumer_side = transport_pair
    t = producer.topology
    seen = Collector()
    await consumer_side.consume(t.gallery_queue("all"), seen, bindings=t.gallery_bindings("all"))
    await producer.publish(t.gallery, t.gallery_broadcast_key, b"block")
    await seen.wait(1)
    await asyncio.sleep(0.2)
    assert [d.body for d in seen.deliveries] == [b"block"]


async def test_a_declared_queue_keeps_what_is_routed_to_it_for_a_later_consumer(
    transport_pair: Pair,
) -> None:
    producer, consumer_side = transport_pair
    topology = producer.topology
    queue, key = topology.shard_queue(1), topology.shard_key(1)
    await producer.publish(topology.shards, key, b"dropped")  # no queue yet: nothing keeps it
    await producer.declare(queue, bindings=[(topology.shards, key)])
    await producer.publish(topology.shards, key, b"kept")
    seen = Collector()
    await consumer_side.consume(queue, seen, bindings=[(topology.shards, key)])
    await seen.wait(1)
    await asyncio.sleep(0.3)
    assert [d.body for d in seen.deliveries] == [b"kept"]


async def test_send_goes_through_the_work_queues_own_exchange(transport_pair: Pair) -> None:
    producer, consumer_side = transport_pair
    t = producer.topology
    seen = Collector()
    await consumer_side.consume(t.results, seen)
    await producer.publish(t.work_exchange(t.results), t.results, b"via-exchange")
    await producer.send(t.results, b"via-send")
    await seen.wait(2)
    assert sorted(d.body for d in seen.deliveries) == [b"via-exchange", b"via-send"]
    # The probes' exchange routes nothing to the results queue, whatever the key.
    await producer.publish(t.work_exchange(t.probes), t.results, b"misrouted")
    await asyncio.sleep(0.2)
    assert len(seen.deliveries) == 2
    with pytest.raises(TransportError, match="not a work queue"):
        await producer.send(t.events, b"x")


async def test_each_role_declares_what_it_owns_and_checks_the_rest(links: Links) -> None:
    t = links.topology
    # Nothing is declared yet: a client relies on the cloud's and on-prem's exchanges.
    with pytest.raises(TransportError, match="broker-setup"):
        await links.open(Role.CLIENT)
    with pytest.raises(TransportError, match="onprem declares it"):
        await links.open(Role.CLOUD)
    onprem = await links.open(Role.ONPREM)
    cloud = await links.open(Role.CLOUD)
    client = await links.open(Role.CLIENT)
    probes, results = Collector(), Collector()
    await cloud.consume(t.probes, probes)
    await onprem.consume(t.results, results)
    await client.send(t.probes, b"probe")
    await cloud.send(t.results, b"scores")
    await probes.wait(1)
    await results.wait(1)
    assert [d.body for d in probes.deliveries] == [b"probe"]
    assert [d.body for d in results.deliveries] == [b"scores"]


async def test_send_to_a_queue_nobody_declared_is_an_error(links: Links) -> None:
    t = links.topology
    onprem = await links.open(Role.ONPREM)  # declares results, not the probes' way in
    with pytest.raises(TransportError):
        await onprem.send(t.probes, b"lost?")


async def test_topic_bindings_filter_events(transport_pair: Pair) -> None:
    producer, consumer_side = transport_pair
    t = producer.topology
    verified = Collector()
    await consumer_side.consume(
        "", verified, bindings=[(t.events, "event.*.verified")], exclusive=True
    )
    await producer.publish(t.events, "event.1to1.rejected", b"no")
    await producer.publish(t.events, "event.1toN.verified", b"yes")
    await verified.wait(1)
    await asyncio.sleep(0.2)
    assert [d.body for d in verified.deliveries] == [b"yes"]


async def test_unprocessable_message_is_dead_lettered_with_reason(transport_pair: Pair) -> None:
    producer, consumer_side = transport_pair
    t = producer.topology
    failing = Collector(fail_with=WireFormatError("not a msgpack message"))
    dead = Collector()
    await consumer_side.consume(t.sync, failing)
    await producer.consume(t.dead_letters, dead)
    await producer.send(t.sync, b"\xc1garbage", message_id="bad-1")
    await dead.wait(1)
    letter = dead.deliveries[0]
    assert letter.body == b"\xc1garbage"
    assert letter.message_id == "bad-1"
    assert "WireFormatError: not a msgpack message" in str(letter.headers[REASON_HEADER])
    assert letter.headers[SOURCE_HEADER] == t.sync
    assert len(failing.deliveries) == 1  # never retried


async def test_transport_failure_requeues_and_redelivers(transport_pair: Pair) -> None:
    producer, consumer_side = transport_pair
    queue = producer.topology.results
    flaky = Collector(fail_with=TransportError("broker hiccup"), times=1)
    await consumer_side.consume(queue, flaky)
    await producer.send(queue, b"retry-me")
    await flaky.wait(2)
    assert [d.body for d in flaky.deliveries] == [b"retry-me", b"retry-me"]
    assert flaky.deliveries[1].redelivered


async def test_requeues_back_off_and_count_the_deliveries(transport_pair: Pair) -> None:
    """A message that keeps failing comes back later each time, not in a busy loop."""
    producer, consumer_side = transport_pair
    queue = producer.topology.results
    flaky = Collector(fail_with=TransportError("gallery being replaced"), times=3)
    arrivals: list[float] = []

    async def timed(delivery: Delivery) -> None:
        arrivals.append(time.monotonic())
        await flaky(delivery)

    await consumer_side.consume(queue, timed)
    await producer.send(queue, b"retry-me")
    await flaky.wait(4, timeout=30)
    counts = [d.headers.get(DELIVERY_COUNT_HEADER, 0) for d in flaky.deliveries]
    assert counts == [0, 1, 2, 3]
    assert [requeue_delay(d) for d in flaky.deliveries[:3]] == [
        REQUEUE_DELAY,
        2 * REQUEUE_DELAY,
        4 * REQUEUE_DELAY,
    ]
    for gap, held in zip(
        np.diff(arrivals), (REQUEUE_DELAY, 2 * REQUEUE_DELAY, 4 * REQUEUE_DELAY), strict=True
    ):
        assert gap >= held  # held that long before going back to the queue


async def test_cancel_waits_for_in_flight_work(transport_pair: Pair) -> None:
    producer, consumer_side = transport_pair
    queue = producer.topology.probes
    finished: list[bytes] = []
    started = asyncio.Event()

    async def slow(delivery: Delivery) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(delivery.body)

    consumer = await consumer_side.consume(queue, slow)
    await producer.send(queue, b"slow")
    await asyncio.wait_for(started.wait(), 10)
    await consumer.cancel(timeout=5)
    assert finished == [b"slow"]


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("#", "event.1to1.verified", True),
        ("event.*.verified", "event.1toN.verified", True),
        ("event.*.verified", "event.1toN.rejected", False),
        ("event.#", "event", True),
        ("*.x", "a.b.x", False),
    ],
)
def test_topic_matching(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected
