"""RabbitMQ through aio-pika: robust connection, confirms, manual acks, dead letters.

- A robust connection (aio-pika's) reconnects after a broker restart and re-declares
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
import ssl
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
from yarl import URL

from cipherface.exceptions import ConfigError, TransportError
from cipherface.transport.base import (
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
from cipherface.transport.credentials import redact
from cipherface.wire.envelope import MAX_MESSAGE_BYTES

__all__ = ["RabbitMQTransport"]

log = logging.getLogger(__name__)

#: Seconds a publisher confirm may take. A robust channel waits for its connection
#: to come back before it publishes (aio-pika #556, #636), so without a bound a
#: handler whose broker never returns waits forever and holds its delivery; with
#: it the handler fails with `TransportError` and the delivery is requeued.
PUBLISH_TIMEOUT = 60.0
#: Seconds a consumer cancel or a connection close may take at shutdown: the same
#: wait on a connection that is gone must not keep a daemon from stopping.
CLOSE_TIMEOUT = 10.0
#: Seconds one broker may take to accept a connection and finish the AMQP handshake.
CONNECT_TIMEOUT = 10.0
#: Rounds over the broker URLs while handshakes time out. A refused connection
#: is final at once (nothing listens: the demo falls back to its in-process broker
#: without waiting), but a broker that took the socket and did not answer in time
#: is busy, not gone: a loaded 2-core host's broker stalled one handshake past 10 s
#: in CI, and one failed handshake must not stop a daemon from starting.
CONNECT_ROUNDS = 3

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
        outcome, reason = await settle(
            self._handler, delivery, limit=self._transport.max_message_size
        )
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
                await asyncio.wait_for(self._queue.cancel(self._tag), CLOSE_TIMEOUT)
            except _CONNECTION_ERRORS as exc:
                log.warning("cancelling consumer of %s: %s", self._queue.name, exc)
            self._tag = None
        await drain(self._inflight, timeout)


class _FailoverConnection(aio_pika.RobustConnection):
    """A robust connection over several brokers: a cluster's nodes.

    aio-pika reconnects to the one URL it was given, and a node that is gone stays
    gone. Here every lost connection and every failed attempt (aio-pika reports
    both to `_on_connection_close`) moves on to the next URL, so an agent follows
    the cluster; its channels, queues and consumers are restored on the node it
    reaches, as on any reconnect.
    """

    def __init__(self, urls: Sequence[str], first: int, **kwargs: Any) -> None:
        self._urls = [URL(url) for url in urls]
        self._turn = first
        super().__init__(self._urls[first], **kwargs)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        self._turn = (self._turn + 1) % len(self._urls)
        self.url = self._urls[self._turn]
        await super()._on_connection_close(closing)


class RabbitMQTransport(TransportBase):
    """`Transport` on RabbitMQ. Use as ``async with RabbitMQTransport(url) as t``.

    ``url`` may be several URLs (a cluster's nodes): it connects to the first that
    answers and, when that connection is lost, reconnects to the next.
    ``role`` limits what it declares to what that role's broker user may configure
    (see `Role`); ``ssl_context`` is used for ``amqps://`` URLs (CA, client cert).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        topology: Topology | None = None,
        *,
        role: Role | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_message_size: int = MAX_MESSAGE_BYTES,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.urls = (url,) if isinstance(url, str) else tuple(url)
        if not self.urls:
            raise ConfigError("no broker URL")
        #: The first URL (the one named in errors when none answers).
        self.url = self.urls[0]
        self.max_message_size = max_message_size
        self.connect_timeout = connect_timeout
        self.topology = topology or Topology()
        self.role = role
        self._ssl_context = ssl_context
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractChannel | None = None
        self._consumers: list[_RabbitConsumer] = []

    async def open(self) -> None:
        """Connect (robustly) and declare the topology, idempotently."""
        try:
            self._connection = await self._connect()
        except _CONNECTION_ERRORS as exc:
            hint = (
                " (TLS: a broker that resets the connection wants a client certificate its CA"
                " signed; check tls_cert, tls_key, and tls_ca for the broker's own certificate)"
                if isinstance(exc, ssl.SSLError) or self.url.startswith("amqps")
                else ""
            )
            reason = (
                f"no AMQP handshake within {self.connect_timeout:g} s"
                if isinstance(exc, asyncio.TimeoutError)
                else str(exc)
            )
            raise TransportError(
                f"cannot connect to RabbitMQ at {', '.join(map(redact, self.urls))}: {reason}{hint}"
            ) from exc
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        try:
            # A returned (unroutable) mandatory message raises instead of vanishing.
            self._publisher = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            await self._declare_topology()
        except TransportError:
            await self.close()
            raise
        except _CONNECTION_ERRORS as exc:
            await self.close()
            raise TransportError(f"cannot declare the topology: {exc}") from exc

    async def _connect(self) -> AbstractRobustConnection:
        """A robust connection to the first URL that answers.

        Each URL is tried once per round; another round follows only while some
        handshake timed out (see `CONNECT_ROUNDS`).
        """
        failure: BaseException | None = None
        for _ in range(CONNECT_ROUNDS):
            timed_out = False
            for turn, url in enumerate(self.urls):
                connection = _FailoverConnection(self.urls, turn, ssl_context=self._ssl_context)
                try:
                    await connection.connect(timeout=self.connect_timeout)
                except _CONNECTION_ERRORS as exc:
                    await connection.close()
                    log.warning("RabbitMQ at %s does not answer: %r", redact(url), exc)
                    failure = exc
                    timed_out = timed_out or isinstance(exc, asyncio.TimeoutError)
                else:
                    return connection
            if not timed_out:
                break
        assert failure is not None
        raise failure

    @property
    def connected(self) -> bool:
        """Whether the (robust) connection is up now, not reconnecting."""
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    async def queue_depth(self, queue: str) -> int | None:
        """Messages ready in ``queue`` (a passive declaration, on a channel of its own)."""
        if self._connection is None:
            return None
        try:
            channel = await self._connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
                return declared.declaration_result.message_count
            finally:
                if not channel.is_closed:
                    await channel.close()
        except (*_CONNECTION_ERRORS, aiormq.exceptions.ChannelNotFoundEntity):
            return None

    async def fetch(self, queue: str, limit: int) -> list[Fetched]:
        """``basic.get`` up to ``limit`` messages, unacked until each is settled.

        The channel stays open while they are unsettled (it is closed with the
        transport); a requeued message goes back to its place in the queue.
        """
        if self._connection is None:
            raise TransportError("transport is not connected")
        taken: list[Fetched] = []
        try:
            channel = await self._connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            while len(taken) < limit:
                message = await declared.get(no_ack=False, fail=False)
                if message is None:
                    break
                delivery = Delivery(
                    body=message.body,
                    headers=dict(message.headers or {}),
                    message_id=message.message_id,
                    routing_key=message.routing_key or "",
                    redelivered=bool(message.redelivered),
                )

                async def requeue(m: AbstractIncomingMessage = message) -> None:
                    await m.nack(requeue=True)

                taken.append(Fetched(delivery=delivery, ack=message.ack, requeue=requeue))
        except (*_CONNECTION_ERRORS, aiormq.exceptions.ChannelNotFoundEntity) as exc:
            raise TransportError(f"cannot read {queue}: {exc}") from exc
        return taken

    def _on_reconnect(self, *_: object) -> None:
        url = str(self._connection.url) if self._connection is not None else self.url
        log.warning("reconnected to RabbitMQ at %s", redact(url))

    async def _declare_topology(self) -> None:
        """Declare what this role owns; check passively what it uses and others own.

        Passive checks run on a channel of their own: a missing resource closes it.
        """
        t = self.topology
        channel = self._channel()
        for spec in t.exchanges:
            if declares(self.role, spec.owner):
                await channel.declare_exchange(
                    spec.name, aio_pika.ExchangeType(spec.kind), durable=True
                )
        for queue in t.queues:
            if declares(self.role, queue.owner):
                declared = await self._declare_queue(channel, queue.name)
                await declared.bind(queue.source, routing_key=queue.key)
        if self.role is None:
            return
        assert self._connection is not None
        checker = await self._connection.channel()
        try:
            for spec in t.exchanges:
                if self.role in spec.users:
                    try:
                        await checker.get_exchange(spec.name, ensure=True)
                    except aiormq.exceptions.ChannelNotFoundEntity as exc:
                        raise missing_resource(spec.name, spec.owner) from exc
        finally:
            if not checker.is_closed:
                await checker.close()

    async def _declare_queue(self, channel: AbstractChannel, name: str) -> AbstractQueue:
        """Declare a queue, or only check it (passively) when another role owns it."""
        spec = self.topology.queue_spec(name)
        if spec is not None and not declares(self.role, spec.owner):
            try:
                return await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                raise missing_resource(name, spec.owner) from exc
        return await channel.declare_queue(
            name, durable=True, arguments=self.topology.queue_arguments(name)
        )

    def _channel(self) -> AbstractChannel:
        if self._publisher is None:
            raise TransportError("transport is not connected")
        return self._publisher

    async def send(self, queue: str, body: bytes, *, message_id: str | None = None) -> None:
        """Persistent message to a work queue through its exchange, confirmed by the broker.

        ``mandatory``: a queue that does not exist yet is an error, not a lost probe.
        """
        exchange = self.topology.work_exchange(queue)
        check_size(body, self.max_message_size, queue)
        channel = self._channel()
        try:
            target = await channel.get_exchange(exchange, ensure=False)
            await asyncio.wait_for(
                target.publish(_message(body, message_id), routing_key=queue, mandatory=True),
                PUBLISH_TIMEOUT,
            )
        except _CONNECTION_ERRORS as exc:
            raise TransportError(f"cannot send to {queue}: {exc}") from exc

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, *, message_id: str | None = None
    ) -> None:
        """Persistent message to an exchange, confirmed by the broker.

        Not ``mandatory``: an event nobody subscribes to is not an error.
        """
        check_size(body, self.max_message_size, exchange)
        channel = self._channel()
        try:
            target = await channel.get_exchange(exchange, ensure=False)
            await asyncio.wait_for(
                target.publish(
                    _message(body, message_id), routing_key=routing_key, mandatory=False
                ),
                PUBLISH_TIMEOUT,
            )
        except _CONNECTION_ERRORS as exc:
            raise TransportError(f"cannot publish to {exchange}: {exc}") from exc

    async def dead_letter(self, message: AbstractIncomingMessage, queue: str, reason: str) -> None:
        """Republish a message to the dead-letter exchange with the reason attached."""
        headers = {**(message.headers or {}), REASON_HEADER: reason[:1000], SOURCE_HEADER: queue}
        target = await self._channel().get_exchange(
            self.topology.dead_letter_exchange, ensure=False
        )
        await asyncio.wait_for(
            target.publish(
                aio_pika.Message(
                    message.body,
                    headers=headers,
                    message_id=message.message_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=queue,
                mandatory=False,
            ),
            PUBLISH_TIMEOUT,
        )

    async def declare(self, queue: str, *, bindings: Sequence[tuple[str, str]] = ()) -> None:
        """Declare a durable queue and its bindings (on a channel of its own: a refused
        declaration closes its channel), so what is routed to it waits for a consumer."""
        if self._connection is None:
            raise TransportError("transport is not connected")
        try:
            channel = await self._connection.channel()
            try:
                declared = await self._declare_queue(channel, queue)
                for exchange, pattern in bindings:
                    await declared.bind(exchange, routing_key=pattern)
            finally:
                await channel.close()
        except _CONNECTION_ERRORS as exc:
            raise TransportError(f"cannot declare {queue}: {exc}") from exc

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
                    queue or self.topology.subscriber_queue(), exclusive=True, auto_delete=True
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
                await asyncio.wait_for(self._connection.close(), CLOSE_TIMEOUT)
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
