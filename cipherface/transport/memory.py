"""An in-process broker with RabbitMQ's semantics, for the demo and broker-free tests.

It models what the agents rely on: durable named queues (competing consumers),
direct, fanout and topic exchanges with bindings, mandatory sends, prefetch,
requeue of unfinished work, a dead-letter queue, and the passive checks of a
transport acting for a `Role` (it has no users, so nothing is refused).
Messages live in memory: "durable" means "outlives a consumer", not "outlives
the process".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cipherface.daemon import cancel_and_wait
from cipherface.exceptions import TransportError
from cipherface.transport.base import (
    DELIVERY_COUNT_HEADER,
    REASON_HEADER,
    SOURCE_HEADER,
    Delivery,
    Fetched,
    Handler,
    Outcome,
    Role,
    Topology,
    TransportBase,
    check_size,
    declares,
    drain,
    missing_resource,
    settle,
)
from cipherface.wire.envelope import MAX_MESSAGE_BYTES

__all__ = ["MemoryBroker", "MemoryTransport", "topic_matches"]

log = logging.getLogger(__name__)


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` is zero or more words."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and (p[0] in ("*", k[0])) and match(p[1:], k[1:])

    return match(pattern.split("."), routing_key.split("."))


@dataclass(slots=True)
class _Exchange:
    kind: str  # "direct", "fanout" or "topic"
    bindings: list[tuple[str, str]] = field(default_factory=list)  # (pattern, queue)


class MemoryBroker:
    """The shared state: queues and exchanges. One per process, many transports on it."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue[Delivery]] = {}
        self.exchanges: dict[str, _Exchange] = {}

    def declare_queue(self, name: str) -> asyncio.Queue[Delivery]:
        """Create a queue once; later declarations return the same one."""
        return self.queues.setdefault(name, asyncio.Queue())

    def declare_exchange(self, name: str, kind: str) -> None:
        """Create an exchange once."""
        self.exchanges.setdefault(name, _Exchange(kind))

    def bind(self, queue: str, exchange: str, pattern: str) -> None:
        """Route an exchange's messages to a queue."""
        if exchange not in self.exchanges:
            raise TransportError(f"no exchange {exchange!r} to bind {queue!r} to")
        bindings = self.exchanges[exchange].bindings
        if (pattern, queue) not in bindings:
            bindings.append((pattern, queue))

    def delete_queue(self, name: str) -> None:
        """Drop a queue and its bindings (exclusive queues, on cancel)."""
        self.queues.pop(name, None)
        for exchange in self.exchanges.values():
            exchange.bindings[:] = [(p, q) for p, q in exchange.bindings if q != name]

    def route(self, exchange: str, delivery: Delivery) -> int:
        """Deliver to every bound queue that matches; the number of queues reached."""
        try:
            target = self.exchanges[exchange]
        except KeyError:
            raise TransportError(f"no exchange {exchange!r} (declare the topology first)") from None
        reached = 0
        for pattern, queue in target.bindings:
            if _matches(target.kind, pattern, delivery.routing_key):
                self.queues[queue].put_nowait(delivery)
                reached += 1
        return reached


def _matches(kind: str, pattern: str, routing_key: str) -> bool:
    if kind == "fanout":
        return True
    if kind == "direct":
        return pattern == routing_key
    return topic_matches(pattern, routing_key)


def _redelivery(delivery: Delivery) -> Delivery:
    """``delivery`` back in its queue, counted as a quorum queue counts it."""
    count = delivery.headers.get(DELIVERY_COUNT_HEADER, 0)
    headers = {**delivery.headers, DELIVERY_COUNT_HEADER: int(count) + 1}  # type: ignore[call-overload]
    return replace(delivery, redelivered=True, headers=headers)


class _MemoryConsumer:
    def __init__(
        self,
        transport: MemoryTransport,
        queue: str,
        handler: Handler,
        prefetch: int,
        exclusive: bool,
    ) -> None:
        self._transport = transport
        self._queue_name = queue
        self._queue = transport.broker.queues[queue]
        self._handler = handler
        self._slots = asyncio.Semaphore(prefetch)
        self._exclusive = exclusive
        self._inflight: set[asyncio.Task[None]] = set()
        self._pump = asyncio.create_task(self._run(), name=f"consume {queue}")

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                delivery = await self._queue.get()
            except asyncio.CancelledError:
                self._slots.release()
                raise
            task = asyncio.create_task(self._handle(delivery))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _handle(self, delivery: Delivery) -> None:
        try:
            outcome, reason = await settle(
                self._handler, delivery, limit=self._transport.max_message_size
            )
            if outcome is Outcome.REQUEUE:
                self._queue.put_nowait(_redelivery(delivery))
            elif outcome is Outcome.DEAD_LETTER:
                self._transport.dead_letter(delivery, self._queue_name, reason)
        finally:
            self._slots.release()

    async def cancel(self, *, timeout: float = 30.0) -> None:
        await cancel_and_wait(self._pump)
        await drain(self._inflight, timeout)
        if self._exclusive:
            self._transport.broker.delete_queue(self._queue_name)


class MemoryTransport(TransportBase):
    """`Transport` on a `MemoryBroker`."""

    def __init__(
        self,
        broker: MemoryBroker,
        topology: Topology | None = None,
        *,
        role: Role | None = None,
        max_message_size: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.broker = broker
        self.topology = topology or Topology()
        self.role = role
        self.max_message_size = max_message_size
        self._consumers: list[_MemoryConsumer] = []
        self._declare()

    def _declare(self) -> None:
        """What `RabbitMQTransport.open` does: declare what the role owns, check what it uses."""
        t = self.topology
        for spec in t.exchanges:
            if declares(self.role, spec.owner):
                self.broker.declare_exchange(spec.name, spec.kind)
        for queue in t.queues:
            if declares(self.role, queue.owner):
                self.broker.declare_queue(queue.name)
                self.broker.bind(queue.name, queue.source, queue.key)
        for spec in t.exchanges:
            if self.role in spec.users and spec.name not in self.broker.exchanges:
                raise missing_resource(spec.name, spec.owner)

    def _declare_queue(self, name: str) -> None:
        spec = self.topology.queue_spec(name)
        if spec is not None and not declares(self.role, spec.owner):
            if name not in self.broker.queues:
                raise missing_resource(name, spec.owner)
            return
        self.broker.declare_queue(name)

    async def send(self, queue: str, body: bytes, *, message_id: str | None = None) -> None:
        """Route a message to a work queue through its exchange; an error if none takes it."""
        check_size(body, self.max_message_size, queue)
        delivery = Delivery(body=body, message_id=message_id, routing_key=queue)
        if not self.broker.route(self.topology.work_exchange(queue), delivery):
            raise TransportError(f"cannot send to {queue}: no such queue (unroutable)")

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, *, message_id: str | None = None
    ) -> None:
        """Route a message through an exchange."""
        check_size(body, self.max_message_size, exchange)
        self.broker.route(
            exchange, Delivery(body=body, message_id=message_id, routing_key=routing_key)
        )

    def dead_letter(self, delivery: Delivery, queue: str, reason: str) -> None:
        """Keep an unprocessable message, with why, in the dead-letter queue."""
        headers = {**delivery.headers, REASON_HEADER: reason, SOURCE_HEADER: queue}
        self.broker.route(self.topology.dead_letter_exchange, replace(delivery, headers=headers))

    async def declare(self, queue: str, *, bindings: Sequence[tuple[str, str]] = ()) -> None:
        """Declare and bind a queue (messages routed to it wait for a consumer)."""
        self._declare_queue(queue)
        for exchange, pattern in bindings:
            self.broker.bind(queue, exchange, pattern)

    async def consume(
        self,
        queue: str,
        handler: Handler,
        *,
        bindings: Sequence[tuple[str, str]] = (),
        exclusive: bool = False,
        prefetch: int = 4,
    ) -> _MemoryConsumer:
        """Declare, bind and consume a queue."""
        name = queue or self.topology.subscriber_queue()
        await self.declare(name, bindings=bindings)
        consumer = _MemoryConsumer(self, name, handler, prefetch, exclusive)
        self._consumers.append(consumer)
        return consumer

    async def queue_depth(self, queue: str) -> int | None:
        """Messages waiting in ``queue``."""
        found = self.broker.queues.get(queue)
        return None if found is None else found.qsize()

    async def fetch(self, queue: str, limit: int) -> list[Fetched]:
        """Take up to ``limit`` waiting messages; requeueing puts one back at the end."""
        found = self.broker.queues.get(queue)
        taken: list[Fetched] = []
        while found is not None and len(taken) < limit and not found.empty():
            delivery = found.get_nowait()

            async def ack() -> None:
                return None

            async def requeue(d: Delivery = delivery, q: asyncio.Queue[Delivery] = found) -> None:
                q.put_nowait(_redelivery(d))

            taken.append(Fetched(delivery=delivery, ack=ack, requeue=requeue))
        return taken

    async def close(self) -> None:
        """Cancel this transport's consumers (their unfinished work is requeued)."""
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            await consumer.cancel(timeout=0)
