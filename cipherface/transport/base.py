"""What every transport offers (the topology the agents share: `cipherface.transport.topology`).

Two implementations share this contract: `RabbitMQTransport` (aio-pika) for
deployments and `MemoryTransport` (an in-process broker) for the one-command
demo and for tests that need no broker. What happens to a delivery after its
handler returns or raises is decided here, once, for both.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, TypeVar, runtime_checkable

from cipherface.daemon import cancel_and_wait
from cipherface.exceptions import (
    CipherFaceError,
    MessageTooLargeError,
    MissingResourceError,
    TransportError,
)
from cipherface.transport.topology import DELIVERY_LIMIT, ExchangeSpec, QueueSpec, Role, Topology
from cipherface.wire.envelope import MAX_MESSAGE_BYTES

__all__ = [
    "DELIVERY_COUNT_HEADER",
    "DELIVERY_LIMIT",
    "REASON_HEADER",
    "SOURCE_HEADER",
    "Consumer",
    "Delivery",
    "ExchangeSpec",
    "Fetched",
    "Handler",
    "Outcome",
    "QueueSpec",
    "Role",
    "Topology",
    "Transport",
    "TransportBase",
    "check_size",
    "declares",
    "drain",
    "missing_resource",
    "requeue_delay",
    "settle",
]

log = logging.getLogger(__name__)

#: Header a dead-lettered message carries: why it could not be processed.
REASON_HEADER = "x-cipherface-reason"
#: Header a dead-lettered message carries: the queue it was taken from.
SOURCE_HEADER = "x-cipherface-queue"
#: Header a quorum queue puts on a redelivered message: how often it was delivered
#: before (the in-process broker keeps it the same way).
DELIVERY_COUNT_HEADER = "x-delivery-count"
#: Seconds a handler holds a message it must requeue before the first retry, doubled
#: at each redelivery up to `REQUEUE_MAX_DELAY`.
REQUEUE_DELAY = 0.2
REQUEUE_MAX_DELAY = 10.0


def requeue_delay(delivery: Delivery) -> float:
    """How long to hold ``delivery`` before requeueing it: requeues back off.

    A message requeued at once comes straight back (to this replica or the next)
    while the cause lasts, e.g. a replica whose gallery is being replaced: a busy
    loop through the broker. Doubling the hold at each redelivery keeps retries
    cheap, and the message (unacked meanwhile) still counts against the
    consumer's prefetch, so a failing consumer takes less work.
    """
    count = delivery.headers.get(DELIVERY_COUNT_HEADER)
    attempts = count if isinstance(count, int) and count >= 0 else int(delivery.redelivered)
    return min(REQUEUE_DELAY * 2 ** min(attempts, 16), REQUEUE_MAX_DELAY)


def declares(role: Role | None, owner: Role) -> bool:
    """Whether a connection acting for ``role`` declares a resource ``owner`` owns."""
    return role is None or role is owner


def missing_resource(name: str, owner: Role) -> MissingResourceError:
    """The error for a resource a role relies on but may not declare, and nobody did."""
    return MissingResourceError(
        f"{name} does not exist: {owner.value} declares it (start it first), "
        "or run 'cipherface broker-setup'"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """One message handed to a handler."""

    body: bytes
    headers: Mapping[str, object] = field(default_factory=dict)
    message_id: str | None = None
    routing_key: str = ""
    #: True when the broker delivers this message again (a consumer died or requeued it).
    redelivered: bool = False


Handler = Callable[[Delivery], Awaitable[None]]


class Outcome(enum.Enum):
    """What becomes of a delivery once its handler is done."""

    ACK = "ack"
    REQUEUE = "requeue"
    DEAD_LETTER = "dead-letter"


def check_size(body: bytes, limit: int, where: str) -> None:
    """Refuse a message body over the transport's cap (`MessageTooLargeError`).

    Checked before publishing, so an oversized message is a typed error naming
    what was sent rather than a channel the broker closes (``max_message_size``).
    """
    if len(body) > limit:
        raise MessageTooLargeError(f"message to {where}", len(body), limit)


async def settle(
    handler: Handler, delivery: Delivery, *, limit: int = MAX_MESSAGE_BYTES
) -> tuple[Outcome, str]:
    """Run a handler and classify the result, the same way for every transport.

    - larger than ``limit``: never handed to the handler -> DEAD_LETTER.
    - returns normally: the work is done -> ACK.
    - `TransportError` or cancellation: the broker hiccuped or we are shutting
      down, the message is fine -> REQUEUE (another try, maybe on another replica),
      after `requeue_delay` for a `TransportError` (requeues back off).
    - any other error: the message itself cannot be processed -> DEAD_LETTER
      with the reason, so it is kept for inspection and never retried forever.
    """
    try:
        check_size(delivery.body, limit, "this consumer")
        await handler(delivery)
    except asyncio.CancelledError:
        return Outcome.REQUEUE, "cancelled"
    except TransportError as exc:
        delay = requeue_delay(delivery)
        log.warning("requeueing message %s in %.1fs: %s", delivery.message_id, delay, exc)
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:  # stopping: requeue now, the next consumer waits
            pass
        return Outcome.REQUEUE, str(exc)
    except CipherFaceError as exc:
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("dead-lettering message %s: %s", delivery.message_id, reason)
        return Outcome.DEAD_LETTER, reason
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        log.error(
            "dead-lettering message %s after an unexpected error: %s", delivery.message_id, reason
        )
        log.debug("traceback", exc_info=True)
        return Outcome.DEAD_LETTER, reason
    return Outcome.ACK, ""


async def drain(tasks: set[asyncio.Task[None]], timeout: float) -> None:
    """Let in-flight handlers finish; cancel those still running after ``timeout``.

    A cancelled handler is awaited too: `settle` turns its cancellation into a
    requeue, and that must happen before the connection goes away.
    """
    if not tasks:
        return
    _, pending = await asyncio.wait(set(tasks), timeout=timeout)
    await cancel_and_wait(*pending)


T = TypeVar("T", bound="TransportBase")


@dataclass(frozen=True, slots=True, kw_only=True)
class Fetched:
    """A message taken from a queue by `TransportBase.fetch`: settle it with one call."""

    delivery: Delivery
    ack: Callable[[], Awaitable[None]]
    requeue: Callable[[], Awaitable[None]]


class TransportBase:
    """What both transports share: ``async with`` opens the transport, leaving closes it."""

    #: Largest body sent or handed to a handler (`Settings.max_message_size`).
    max_message_size: int = MAX_MESSAGE_BYTES

    @property
    def connected(self) -> bool:
        """Whether the broker is reachable now (readiness; `RabbitMQTransport` overrides)."""
        return True

    async def queue_depth(self, queue: str) -> int | None:
        """Messages ready in ``queue`` (None when it does not exist or cannot be read)."""
        raise NotImplementedError

    async def fetch(self, queue: str, limit: int) -> list[Fetched]:
        """Take up to ``limit`` messages from ``queue`` without consuming it (operator tools).

        Every message must then be acked or requeued; until then no one else gets it.
        """
        raise NotImplementedError

    async def open(self) -> None:
        """Connect and declare the topology (nothing to do for some transports)."""

    async def close(self) -> None:
        """Release the connection."""
        raise NotImplementedError

    async def __aenter__(self: T) -> T:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


@runtime_checkable
class Consumer(Protocol):
    """A running subscription."""

    async def cancel(self, *, timeout: float = 30.0) -> None:
        """Stop taking deliveries and wait for in-flight handlers; requeue what does not finish."""


@runtime_checkable
class Transport(Protocol):
    """Durable work queues, fanout/topic exchanges, dead letters, async context manager."""

    topology: Topology
    #: Largest body it sends or hands to a handler: larger ones are refused
    #: (`MessageTooLargeError`) or dead-lettered unread.
    max_message_size: int

    async def __aenter__(self) -> Transport: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def send(self, queue: str, body: bytes, *, message_id: str | None = None) -> None:
        """Put a persistent message on a work queue, through its exchange (confirmed).

        Raises `TransportError` when the queue does not exist (nothing would keep it).
        """

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, *, message_id: str | None = None
    ) -> None:
        """Publish a persistent message to an exchange of the topology."""

    async def declare(self, queue: str, *, bindings: Sequence[tuple[str, str]] = ()) -> None:
        """Declare a durable queue of the topology and its bindings without consuming it:
        what is routed to it waits there for a consumer instead of being dropped."""

    async def consume(
        self,
        queue: str,
        handler: Handler,
        *,
        bindings: Sequence[tuple[str, str]] = (),
        exclusive: bool = False,
        prefetch: int = 4,
    ) -> Consumer:
        """Consume a queue, declaring it (and its bindings) first.

        ``exclusive`` makes a private, auto-deleted queue (``queue`` may be ""),
        which is what a transient subscriber such as ``cipherface watch`` wants.
        """

    async def close(self) -> None:
        """Close the connection; unacknowledged deliveries return to their queues."""
