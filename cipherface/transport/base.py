"""What every transport offers, and the topology the agents share.

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

from cipherface.exceptions import CipherFaceError, TransportError

__all__ = [
    "REASON_HEADER",
    "SOURCE_HEADER",
    "Consumer",
    "Delivery",
    "Handler",
    "Outcome",
    "Topology",
    "Transport",
    "TransportBase",
    "drain",
    "settle",
]

log = logging.getLogger(__name__)

#: Header a dead-lettered message carries: why it could not be processed.
REASON_HEADER = "x-cipherface-reason"
#: Header a dead-lettered message carries: the queue it was taken from.
SOURCE_HEADER = "x-cipherface-queue"


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    """Names of the queues and exchanges, all under one prefix.

    ============================  ========  ======================================
    name                          kind      flow
    ============================  ========  ======================================
    ``<p>.probes``                queue     users -> cloud (competing consumers)
    ``<p>.results``               queue     cloud -> on-prem (encrypted scores)
    ``<p>.sync``                  queue     cloud -> on-prem (replica wants gallery)
    ``<p>.gallery``               fanout    on-prem -> every cloud replica
    ``<p>.gallery.<replica>``     queue     one per cloud replica, bound to gallery
    ``<p>.events``                topic     on-prem -> any subscriber
    ``<p>.dlx`` / ``<p>.dead``    fanout /  what could not be processed, with the
                                  queue     reason in the ``x-cipherface-reason``
    ============================  ========  ======================================
    """

    prefix: str = "cipherface"
    #: Delete queues unused for this long (RabbitMQ ``x-expires``); None keeps them
    #: forever, as a deployment wants. Test runs set it so they leave nothing behind.
    idle_queue_expiry_ms: int | None = None

    @property
    def probes(self) -> str:
        """Queue of probe requests."""
        return f"{self.prefix}.probes"

    @property
    def results(self) -> str:
        """Queue of encrypted scores and rejections for on-prem."""
        return f"{self.prefix}.results"

    @property
    def sync(self) -> str:
        """Queue of gallery sync requests for on-prem."""
        return f"{self.prefix}.sync"

    @property
    def gallery(self) -> str:
        """Fanout exchange of public contexts and gallery blocks."""
        return f"{self.prefix}.gallery"

    def gallery_queue(self, replica: str) -> str:
        """The durable queue through which one cloud replica receives the gallery."""
        return f"{self.prefix}.gallery.{replica}"

    @property
    def events(self) -> str:
        """Topic exchange of verification events."""
        return f"{self.prefix}.events"

    @property
    def dead_letter_exchange(self) -> str:
        """Exchange that collects what could not be processed."""
        return f"{self.prefix}.dlx"

    @property
    def dead_letters(self) -> str:
        """Queue bound to the dead-letter exchange."""
        return f"{self.prefix}.dead"

    @property
    def work_queues(self) -> tuple[str, ...]:
        """Queues declared up front, so nothing published before a consumer starts is lost."""
        return (self.probes, self.results, self.sync)


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


async def settle(handler: Handler, delivery: Delivery) -> tuple[Outcome, str]:
    """Run a handler and classify the result, the same way for every transport.

    - returns normally: the work is done -> ACK.
    - `TransportError` or cancellation: the broker hiccuped or we are shutting
      down, the message is fine -> REQUEUE (another try, maybe on another replica).
    - any other error: the message itself cannot be processed -> DEAD_LETTER
      with the reason, so it is kept for inspection and never retried forever.
    """
    try:
        await handler(delivery)
    except asyncio.CancelledError:
        return Outcome.REQUEUE, "cancelled"
    except TransportError as exc:
        log.warning("requeueing message %s: %s", delivery.message_id, exc)
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
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


T = TypeVar("T", bound="TransportBase")


class TransportBase:
    """What both transports share: ``async with`` opens the transport, leaving closes it."""

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

    async def __aenter__(self) -> Transport: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def send(self, queue: str, body: bytes, *, message_id: str | None = None) -> None:
        """Put a persistent message on a durable work queue (confirmed by the broker)."""

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, *, message_id: str | None = None
    ) -> None:
        """Publish a persistent message to an exchange of the topology."""

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
