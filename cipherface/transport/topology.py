"""The topology the agents share: every exchange and queue, who declares, writes and reads it.

`cipherface broker-setup` derives each role's permissions from it, both transports
declare it, and the AsyncAPI document lists it.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from cipherface.exceptions import TransportError

__all__ = ["DELIVERY_LIMIT", "ExchangeSpec", "QueueSpec", "Role", "Topology"]

#: Default `Topology.delivery_limit`: retries for a consumer killed by accident, few
#: for a message that kills it.
DELIVERY_LIMIT = 4


class Role(enum.Enum):
    """Whom a broker connection acts for: it decides what the connection declares.

    Under least privilege (`cipherface broker-setup`) each role may configure only
    the resources it owns (see `Topology.exchanges` and `Topology.queues`); it
    checks the others passively, and a missing one is a `TransportError` naming
    who declares it. A transport without a role (guest, tests, the in-process
    demo) declares everything.
    """

    ONPREM = "onprem"
    CLOUD = "cloud"
    CLIENT = "client"


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    """One exchange: its kind, the role that declares it, who publishes, who binds from it.

    `cipherface broker-setup` derives each role's permissions from these fields.
    """

    name: str
    kind: str  # "direct", "topic" or "fanout"
    owner: Role
    writers: frozenset[Role]
    readers: frozenset[Role]

    @property
    def users(self) -> frozenset[Role]:
        """Roles that rely on it without declaring it: they check it passively."""
        return (self.writers | self.readers) - {self.owner}


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One shared durable queue, declared (and bound) by its owner."""

    name: str
    owner: Role
    #: Who consumes it; None for the dead letters, which an operator reads.
    consumer: Role | None
    #: The exchange feeding it, and the binding key (ignored by the dead letters' fanout).
    source: str
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    """Names of the queues and exchanges, all under one prefix.

    ============================  ========  ======================================
    name                          kind      flow
    ============================  ========  ======================================
    ``<p>.probes.in``             direct    users -> ``<p>.probes``
    ``<p>.probes``                queue     -> cloud replicas (competing consumers)
    ``<p>.results.in``            direct    cloud -> ``<p>.results``
    ``<p>.results``               queue     -> on-prem (encrypted scores)
    ``<p>.sync.in``               direct    cloud -> ``<p>.sync``
    ``<p>.sync``                  queue     -> on-prem (replica wants gallery)
    ``<p>.gallery``               direct    on-prem -> every replica (key ``all``)
                                            or one (key ``replica.<name>``)
    ``<p>.gallery.<replica>``     queue     one per cloud replica, bound with both
                                            and its shard's key ``shard.<k>``
    ``<p>.shards``                direct    a replica -> each shard (``shard.<k>``)
    ``<p>.shard.<k>``             queue     -> shard k's replicas (competing)
    ``<p>.events``                topic     on-prem -> any subscriber
    ``<p>.dlx`` / ``<p>.dead``    fanout /  what could not be processed, with the
                                  queue     reason in the ``x-cipherface-reason``
    ============================  ========  ======================================

    Every durable queue (gallery ones included) is a **quorum** queue, replicated
    over a cluster, with ``x-delivery-limit``: a message whose consumers die with it
    (a native crash: no handler can dead-letter it) is dead-lettered by the broker
    after ``delivery_limit`` redeliveries, not retried on every replica forever.
    A subscriber's event queue stays **classic**: exclusive and auto-deleted
    (quorum queues are neither), one connection's, nothing kept once it leaves.

    Every work queue has an exchange of its own, not the default exchange:
    RabbitMQ checks write permission on the exchange a message is published to,
    and everyone may write to the default one, so a user allowed to send probes
    could also have sent results. The exchange names differ from the queue names
    because a permission regex matches a name whatever the resource: write on a
    queue (needed to bind it) must not imply write on an exchange, nor the reverse.
    """

    #: Routing key of gallery messages for every replica (`gallery_key` is never "all").
    gallery_broadcast_key: ClassVar[str] = "all"

    prefix: str = "cipherface"
    #: Delete queues unused for this long (RabbitMQ ``x-expires``); None keeps them
    #: forever, as a deployment wants. Test runs set it so they leave nothing behind.
    idle_queue_expiry_ms: int | None = None
    #: Delete a replica's gallery queue nobody consumed for this long (``x-expires``):
    #: a replica gone for good leaves no queue filling with every block of every
    #: sync, and one that comes back syncs anyway (`Settings.gallery_queue_expiry`).
    gallery_queue_expiry_ms: int | None = None
    #: Redeliveries of a message before the broker dead-letters it (quorum queues'
    #: ``x-delivery-limit``; `Settings.delivery_limit`). None: no limit.
    delivery_limit: int | None = DELIVERY_LIMIT

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
        """Direct exchange of public contexts and gallery blocks."""
        return f"{self.prefix}.gallery"

    def gallery_queue(self, replica: str) -> str:
        """The durable queue through which one cloud replica receives the gallery."""
        return f"{self.prefix}.gallery.{replica}"

    def is_gallery_queue(self, name: str) -> bool:
        """Whether ``name`` is a replica's gallery queue (see `gallery_queue`)."""
        return name.startswith(f"{self.gallery}.")

    def gallery_key(self, replica: str) -> str:
        """Routing key of gallery messages for one replica only (e.g. a sync's answer)."""
        return f"replica.{replica}"

    def gallery_bindings(self, replica: str, shard: int = 0) -> list[tuple[str, str]]:
        """What a replica binds its gallery queue with: broadcasts, its own messages and
        its shard's (`shard_key`: a sharded gallery's blocks go to their shard only)."""
        return [
            (self.gallery, self.gallery_broadcast_key),
            (self.gallery, self.gallery_key(replica)),
            (self.gallery, self.shard_key(shard)),
        ]

    @property
    def shards(self) -> str:
        """Direct exchange of a probe's searches, one per shard (`shard_key`)."""
        return f"{self.prefix}.shards"

    def shard_key(self, shard: int) -> str:
        """Routing key of one shard's messages, on `shards` and on `gallery`."""
        return f"shard.{shard}"

    def shard_queue(self, shard: int) -> str:
        """The quorum queue the replicas of one shard compete on for searches."""
        return f"{self.prefix}.shard.{shard}"

    @property
    def events(self) -> str:
        """Topic exchange of verification events."""
        return f"{self.prefix}.events"

    def subscriber_queue(self, token: str = "") -> str:
        """A private (exclusive) queue of one event subscriber; a fresh name by default.

        Named by the client under the prefix, not by the server (``amq.gen-*``), so
        a broker user can be granted exactly these queues.
        """
        return f"{self.prefix}.subscriber.{token or uuid.uuid4().hex}"

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

    def work_exchange(self, queue: str) -> str:
        """The direct exchange in front of a work queue (what `Transport.send` publishes to)."""
        if queue not in self.work_queues:
            raise TransportError(f"{queue!r} is not a work queue of prefix {self.prefix!r}")
        return f"{queue}.in"

    @property
    def exchanges(self) -> tuple[ExchangeSpec, ...]:
        """Every exchange. On-prem declares what carries its authority or feeds it; the
        cloud declares the probes' way in, with the probe queue bound to it."""
        onprem, cloud, client = Role.ONPREM, Role.CLOUD, Role.CLIENT
        one = frozenset
        return (
            ExchangeSpec(
                self.work_exchange(self.probes), "direct", cloud, one({client}), one({cloud})
            ),
            ExchangeSpec(
                self.work_exchange(self.results), "direct", onprem, one({cloud}), one({onprem})
            ),
            ExchangeSpec(
                self.work_exchange(self.sync), "direct", onprem, one({cloud}), one({onprem})
            ),
            ExchangeSpec(self.gallery, "direct", onprem, one({onprem}), one({cloud})),
            ExchangeSpec(self.shards, "direct", cloud, one({cloud}), one({cloud})),
            ExchangeSpec(self.events, "topic", onprem, one({onprem}), one({client})),
            ExchangeSpec(
                self.dead_letter_exchange,
                "fanout",
                onprem,
                one({onprem, cloud, client}),
                one({onprem}),
            ),
        )

    @property
    def queues(self) -> tuple[QueueSpec, ...]:
        """The shared queues, each declared by its consumer (the dead letters by on-prem).

        By its consumer, because RabbitMQ asks for read permission on a queue declared
        with a dead-letter exchange: on-prem declaring the probe queue would need to
        be allowed to read the probe images.
        """
        onprem, cloud = Role.ONPREM, Role.CLOUD
        return (
            QueueSpec(self.probes, cloud, cloud, self.work_exchange(self.probes), self.probes),
            QueueSpec(self.results, onprem, onprem, self.work_exchange(self.results), self.results),
            QueueSpec(self.sync, onprem, onprem, self.work_exchange(self.sync), self.sync),
            QueueSpec(self.dead_letters, onprem, None, self.dead_letter_exchange, ""),
        )

    def queue_spec(self, name: str) -> QueueSpec | None:
        """The shared queue of that name; None for a private one (a replica's, a watcher's)."""
        return next((q for q in self.queues if q.name == name), None)

    def queue_arguments(self, name: str) -> dict[str, Any]:
        """RabbitMQ arguments of a durable queue (every declarer must pass the same; a
        queue declared with others, e.g. classic, is ``PRECONDITION_FAILED``: README)."""
        arguments: dict[str, Any] = {"x-queue-type": "quorum"}
        if name != self.dead_letters:
            # Whatever the broker itself rejects (a nack without requeue, a message
            # over the delivery limit) still lands in the dead-letter queue.
            arguments["x-dead-letter-exchange"] = self.dead_letter_exchange
            if self.delivery_limit is not None:
                arguments["x-delivery-limit"] = self.delivery_limit
        expiries = [self.idle_queue_expiry_ms]
        if self.is_gallery_queue(name):
            expiries.append(self.gallery_queue_expiry_ms)
        chosen = [ms for ms in expiries if ms]
        if chosen:
            arguments["x-expires"] = min(chosen)
        return arguments
