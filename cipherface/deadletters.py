"""The dead-letter queue, for an operator: list, replay, purge (``cipherface dead``).

What a consumer could not process is kept in ``<prefix>.dead`` with the reason
(`REASON_HEADER`) and the queue it came from (`SOURCE_HEADER`). Dead letters may
hold probe images, so no role's broker user may read them: these tools run with
the broker admin's URL (`cipherface broker-setup` gives that user the vhost).

Replaying sends a message back, unchanged, to its source work queue (probes,
results, sync) or, for a replica's gallery queue, to that replica through the
gallery exchange: for what failed because of the deployment (a replica not yet
trusted, an outage), after it is fixed. A replayed message is checked again
like any other: a forged one is dead-lettered again. Messages from private
queues (an event subscriber's) cannot be replayed and stay.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import msgpack

from cipherface.transport.base import REASON_HEADER, SOURCE_HEADER, Delivery, Transport

__all__ = ["DeadLetter", "list_dead", "purge_dead", "replay_dead"]

#: Most dead letters one command reads.
LIMIT = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """One dead letter, described without its content."""

    message_id: str
    source: str
    reason: str
    kind: str
    size: int

    @classmethod
    def of(cls, delivery: Delivery) -> DeadLetter:
        """Describe a delivery (its kind read from the envelope, if it is one)."""
        headers = delivery.headers
        # Dead-lettered by a consumer (its reason), else by the broker itself: a
        # quorum queue's delivery limit, after the message's consumers died with it.
        broker_reason = headers.get("x-first-death-reason")
        reason = headers.get(REASON_HEADER) or (
            f"broker: {broker_reason} (its consumer never settled it)" if broker_reason else ""
        )
        return cls(
            message_id=delivery.message_id or "",
            source=str(headers.get(SOURCE_HEADER) or headers.get("x-first-death-queue", "")),
            reason=str(reason),
            kind=_kind(delivery.body),
            size=len(delivery.body),
        )

    def to_json(self) -> dict[str, object]:
        """JSON-ready fields (what ``cipherface dead list`` prints)."""
        return {
            "message_id": self.message_id,
            "source": self.source,
            "reason": self.reason,
            "kind": self.kind,
            "size": self.size,
        }


def _kind(body: bytes) -> str:
    """The message type an envelope names, without verifying it ('?' if unreadable)."""
    try:
        outer = msgpack.unpackb(body, raw=False)
        inner = msgpack.unpackb(outer["signed"], raw=False) if "signed" in outer else outer
        return str(inner.get("type", "?"))
    except Exception:
        return "?"


async def list_dead(transport: Transport, limit: int = LIMIT) -> list[DeadLetter]:
    """The dead letters, oldest first (each is put back)."""
    taken = await transport.fetch(transport.topology.dead_letters, limit)  # type: ignore[attr-defined]
    found = [DeadLetter.of(item.delivery) for item in taken]
    for item in taken:
        await item.requeue()
    return found


def _chosen(letter: DeadLetter, ids: Collection[str]) -> bool:
    return not ids or letter.message_id in ids


async def replay_dead(
    transport: Transport, ids: Collection[str] = (), limit: int = LIMIT
) -> list[DeadLetter]:
    """Send the chosen dead letters (all when ``ids`` is empty) back; those replayed."""
    topology = transport.topology
    taken = await transport.fetch(topology.dead_letters, limit)  # type: ignore[attr-defined]
    replayed = []
    for item in taken:
        letter = DeadLetter.of(item.delivery)
        body, message_id = item.delivery.body, item.delivery.message_id
        if _chosen(letter, ids) and letter.source in topology.work_queues:
            await transport.send(letter.source, body, message_id=message_id)
        elif _chosen(letter, ids) and topology.is_gallery_queue(letter.source):
            replica = letter.source[len(topology.gallery) + 1 :]
            key = topology.gallery_key(replica)
            await transport.publish(topology.gallery, key, body, message_id=message_id)
        else:
            await item.requeue()
            continue
        await item.ack()
        replayed.append(letter)
    return replayed


async def purge_dead(
    transport: Transport, ids: Collection[str] = (), limit: int = LIMIT
) -> list[DeadLetter]:
    """Delete the chosen dead letters (all when ``ids`` is empty); those deleted."""
    taken = await transport.fetch(transport.topology.dead_letters, limit)  # type: ignore[attr-defined]
    purged = []
    for item in taken:
        letter = DeadLetter.of(item.delivery)
        if _chosen(letter, ids):
            await item.ack()
            purged.append(letter)
        else:
            await item.requeue()
    return purged
