"""RabbitMQ through aio-pika: robust connection, confirms, manual acks, dead letters.

- `aio_pika.connect_robust` reconnects after a broker restart and re-declares
  queues and consumers; reconnects are logged.
- Publishing goes through a channel with publisher confirms: `send`/`publish`
  return once the broker has the (persistent) message, or raise `TransportError`.
- Deliveries are acknowledged only after the handler is done. A message that
  cannot be processed is republished to the dead-letter exchange with the
  reason in a header, then acked: kept, explained, and never retried forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from cipherface.exceptions import TransportError
from cipherface.transport.base import (
    REASON_HEADER,
    SOURCE_HEADER,
    Delivery,
    Handler,
    Outcome,
    Topology,
    TransportBase,
    drain,
    settle,
)

__all__ = ["RabbitMQTransport"]

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    # Raised (a RuntimeError, not an AMQPError) by a robust channel used while the
    # broker restarts: without it a handler's publish dead-letters good work, and
    # the delivery is left unsettled, starving the consumer of its prefetch slots.
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


class _RabbitConsumer:
    def __init__(self, transport: RabbitMQTransport, queue: AbstractQueue, handler: Handler):
        self._transport = transport
        self._queue = queue
        self._handler = handler
        self._tag: str | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._tag = await self._queue.consume(self._on_message, no_ack=False)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            await self._process(message)
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        delivery = Delivery(
            body=message.body,
            headers=dict(message.headers or {}),
            message_id=message.message_id,
            routing_key=message.routing_key or "",
            redelivered=bool(message.redelivered),
        )
        outcome, reason = await settle(self._handler, delivery)
        try:
            if outcome is Outcome.ACK:
                await message.ack()
            elif outcome is Outcome.REQUEUE:
                await message.nack(requeue=True)
            else:
                try:
                    await self._transport.dead_letter(message, self._queue.name, reason)
                except _CONNECTION_ERRORS:
                    # The publishing channel is down (mid-reconnect) while this delivery's
                    # channel may live: hand the message back rather than hold it unsettled.
                    await message.nack(requeue=True)
                    raise
                await message.ack()
        except _CONNECTION_ERRORS as exc:
            # The channel is gone: the broker requeues the unacked message itself.
            log.warning("could not settle message %s: %s", message.message_id, exc)

    async def cancel(self, *, timeout: float = 30.0) -> None:
        if self._tag is not None:
            try:
                await self._queue.cancel(self._tag)
            except _CONNECTION_ERRORS as exc:
                log.warning("cancelling consumer of %s: %s", self._queue.name, exc)
            self._tag = None
        await drain(self._inflight, timeout)


class RabbitMQTransport(TransportBase):
    """`Transport` on RabbitMQ. Use as ``async with RabbitMQTransport(url) as t``."""

    def __init__(self, url: str, topology: Topology | None = None) -> None:
        self.url = url
        self.topology = topology or Topology()
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractChannel | None = None
        self._consumers: list[_RabbitConsumer] = []
        self._declared: set[str] = set()

    def _queue_arguments(self, name: str) -> dict[str, Any]:
        arguments: dict[str, Any] = {}
        if name != self.topology.dead_letters:
            # Whatever the broker itself rejects (e.g. a nack without requeue) still
            # lands in the dead-letter queue rather than vanishing.
            arguments["x-dead-letter-exchange"] = self.topology.dead_letter_exchange
        if self.topology.idle_queue_expiry_ms is not None:
            arguments["x-expires"] = self.topology.idle_queue_expiry_ms
        return arguments

    async def open(self) -> None:
        """Connect (robustly) and declare the topology, idempotently."""
        try:
            self._connection = await aio_pika.connect_robust(self.url, timeout=10)
        except _CONNECTION_ERRORS as exc:
            raise TransportError(
                f"cannot connect to RabbitMQ at {_redact(self.url)}: {exc}"
            ) from exc
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        try:
            self._publisher = await self._connection.channel(publisher_confirms=True)
            await self._declare_topology(self._publisher)
        except _CONNECTION_ERRORS as exc:
            raise TransportError(f"cannot declare the topology: {exc}") from exc

    def _on_reconnect(self, *_: object) -> None:
        log.warning("reconnected to RabbitMQ at %s", _redact(self.url))

    async def _declare_topology(self, channel: AbstractChannel) -> None:
        t = self.topology
        await channel.declare_exchange(t.gallery, aio_pika.ExchangeType.FANOUT, durable=True)
        await channel.declare_exchange(t.events, aio_pika.ExchangeType.TOPIC, durable=True)
        dlx = await channel.declare_exchange(
            t.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead = await self._declare_queue(channel, t.dead_letters)
        await dead.bind(dlx)
        for name in t.work_queues:
            await self._declare_queue(channel, name)

    async def _declare_queue(self, channel: AbstractChannel, name: str) -> AbstractQueue:
        queue = await channel.declare_queue(
            name, durable=True, arguments=self._queue_arguments(name)
        )
        self._declared.add(name)
        return queue

    def _channel(self) -> AbstractChannel:
        if self._publisher is None:
            raise TransportError("transport is not connected")
        return self._publisher

    async def send(self, queue: str, body: bytes, *, message_id: str | None = None) -> None:
        """Persistent message to a durable queue, confirmed by the broker."""
        channel = self._channel()
        try:
            if queue not in self._declared:
                await self._declare_queue(channel, queue)
            await channel.default_exchange.publish(_message(body, message_id), routing_key=queue)
        except _CONNECTION_ERRORS as exc:
            raise TransportError(f"cannot send to {queue}: {exc}") from exc

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, *, message_id: str | None = None
    ) -> None:
        """Persistent message to an exchange, confirmed by the broker.

        Not ``mandatory``: an event nobody subscribes to is not an error.
        """
        channel = self._channel()
        try:
            target = await channel.get_exchange(exchange, ensure=False)
            await target.publish(
                _message(body, message_id), routing_key=routing_key, mandatory=False
            )
        except _CONNECTION_ERRORS as exc:
            raise TransportError(f"cannot publish to {exchange}: {exc}") from exc

    async def dead_letter(self, message: AbstractIncomingMessage, queue: str, reason: str) -> None:
        """Republish a message to the dead-letter exchange with the reason attached."""
        headers = {**(message.headers or {}), REASON_HEADER: reason[:1000], SOURCE_HEADER: queue}
        target = await self._channel().get_exchange(
            self.topology.dead_letter_exchange, ensure=False
        )
        await target.publish(
            aio_pika.Message(
                message.body,
                headers=headers,
                message_id=message.message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=queue,
            mandatory=False,
        )

    async def consume(
        self,
        queue: str,
        handler: Handler,
        *,
        bindings: Sequence[tuple[str, str]] = (),
        exclusive: bool = False,
        prefetch: int = 4,
    ) -> _RabbitConsumer:
        """Declare a queue and its bindings on a channel of its own, then consume it."""
        if self._connection is None:
            raise TransportError("transport is not connected")
        try:
            channel = await self._connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            if exclusive:
                declared = await channel.declare_queue(
                    queue or None, exclusive=True, auto_delete=True
                )
            else:
                declared = await self._declare_queue(channel, queue)
            for exchange, pattern in bindings:
                await declared.bind(exchange, routing_key=pattern)
            consumer = _RabbitConsumer(self, declared, handler)
            await consumer.start()
        except _CONNECTION_ERRORS as exc:
            raise TransportError(f"cannot consume {queue or 'a private queue'}: {exc}") from exc
        self._consumers.append(consumer)
        return consumer

    async def close(self) -> None:
        """Cancel consumers and close; unacked deliveries go back to their queues."""
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            await consumer.cancel(timeout=0)
        if self._connection is not None:
            try:
                await self._connection.close()
            except _CONNECTION_ERRORS as exc:
                log.debug("closing connection: %s", exc)
            self._connection = None
            self._publisher = None


def _message(body: bytes, message_id: str | None) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        message_id=message_id,
        content_type="application/msgpack",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def _redact(url: str) -> str:
    """The URL without its password, for logs and errors."""
    from yarl import URL

    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url
