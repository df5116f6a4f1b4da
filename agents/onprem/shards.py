"""On-prem's shards: what goes to which shard, the check of each shard's answer, moves.

The book decides each block's shard (`cipherface.gallery.shards`); this module
publishes a context and blocks to each shard's replicas (routing key
``shard.<k>``; with one shard, key ``all`` as before sharding), every context
carrying the signed `wire.ShardMap`, and turns a probe's shard answers into one
probe's scores (`cipherface.sharding.ShardRouter.merge`).

Adding shards (``--shards`` raised, daemon restarted): the book plans block moves
(pending) and on-prem ships each moving block to its new shard, whose replicas
install it under the pending map; searches still count on the old shard. Once a
replica of each new shard reports serving its moved blocks at the version
shipped (`wire.ReplicaStatus`), on-prem commits the move (a new map version,
the old one accepted for `cipherface.sharding.SHIP_GRACE`) and sends the new map
to every shard; the old shard drops the blocks after that grace. Enrollments and
removals wait until the move is done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from cipherface import wire
from cipherface.daemon import finish_in_thread
from cipherface.exceptions import ConfigError
from cipherface.sharding import Merged, ShardRouter, ShardView

if TYPE_CHECKING:
    from agents.onprem.agent import OnPremAgent
    from agents.onprem.keys import KeySet
    from cipherface.gallery.shards import ShardIndex

__all__ = ["ShardKeeper"]

log = logging.getLogger(__name__)


class ShardKeeper:
    """On-prem's shard routing, publishing and moves."""

    def __init__(self, agent: OnPremAgent) -> None:
        self.agent = agent
        self.router = ShardRouter()
        #: (fingerprint, block, version) -> templates in that shipped layout.
        self._counts: dict[tuple[str, int, int], int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: (fingerprint, block) -> the version last seen shipped (`refresh`).
        self._versions: dict[tuple[str, int], int] = {}
        #: What the book looked like at the last `refresh` (`follow`).
        self._seen: tuple[int, ...] = ()
        self.refresh()

    def refresh(self) -> None:
        """Route by the book's maps now (after a change of the book or a move); a block
        shipped meanwhile by another process (``cipherface enroll``) counts as fresh."""
        book = self.agent.book
        for block in book.all_blocks():
            layout = book.shipped(block)
            key = (self.agent.current.fingerprint, block)
            if layout is not None and self._versions.setdefault(key, layout.version) != (
                layout.version
            ):
                self._versions[key] = layout.version
                self.router.shipped(*key, book.shards.home.get(block, 0))
        index = book.shards
        self._seen = self._stamp()
        subjects = dict(index.subject_home)
        active = ShardView.of(index.shard_map(), subjects)
        pending = None
        if index.target:
            pending_map = index.shard_map(pending=True)
            moved = {s: pending_map.subject_homes[i] for i, s in enumerate(pending_map.subjects)}
            pending = ShardView.of(pending_map, {**subjects, **moved})
        self.router.update(active, pending)

    def _stamp(self) -> tuple[int, ...]:
        book = self.agent.book
        index = book.shards
        return (id(book), book._seen_version, len(book), len(book._layout), index.version)

    def follow(self) -> None:
        """Refresh the routing if the book changed (here, in another process, or a key
        rotation switched books) since the last refresh."""
        self.agent.book.refresh()
        if self._stamp() != self._seen:
            self.refresh()

    def refuse_changes(self) -> None:
        """Enrollments and removals wait for a move to end (`ConfigError`)."""
        if self.agent.book.shards.target:
            raise ConfigError("blocks are moving to new shards: enroll or remove once done")

    async def start(self) -> None:
        """Spread the gallery over `Settings.shards` if raised: ship the moving blocks."""
        book = self.agent.book
        wanted = self.agent.settings.shards
        if wanted < book.shards.count:
            log.warning("the gallery has %d shards: --shards %d ignored", book.shards.count, wanted)
            return
        moves = book.shards.resize(wanted, book._layout, book._subject)
        if moves:
            log.warning(
                "adding shards: %d block(s) move (%s)",
                len(moves),
                ", ".join(f"{b}->{s}" for b, s in sorted(moves.items())),
            )
            self.refresh()
            for shard in sorted(set(moves.values())):
                await self.publish([b for b, s in moves.items() if s == shard], shard=shard)

    async def stop(self) -> None:
        """Let a commit being published finish."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- publishing ---------------------------------------------------------------------
    async def publish(
        self,
        block_ids: list[int] | None = None,
        *,
        replica: str | None = None,
        keys: KeySet | None = None,
        shard: int | None = None,
    ) -> int:
        """Publish the context, then the given blocks (all when None), to their shards.

        Every shard gets a context (it carries the map: a new subject's shard, a move)
        announcing its blocks that follow; to ``replica`` only when given (a sync:
        ``shard``'s blocks); to ``shard`` only when given. Cancelled, it stops between
        two chunks (`wire.split_block`: each block under the message size limit).
        """
        agent = self.agent
        topology = agent.transport.topology
        async with agent._publishing:
            keys = keys or agent.publishing
            keys.book.refresh()
            if keys is agent.current:
                self.refresh()
            index = keys.book.shards
            ids = sorted(keys.book.all_blocks() if block_ids is None else set(block_ids))
            groups: dict[int, list[int]] = {s: [] for s in range(index.count)}
            for block in ids:
                for home in {index.home.get(block, 0), index.target.get(block, -1)} - {-1}:
                    groups.setdefault(home, []).append(block)
            if shard is not None:
                groups = {shard: groups.get(shard, [])}
            public = keys.keyring.public_bytes(galois_keys=False, relin_keys=False)
            # The map (and its subject list, signed) as shards get it: the active map, or
            # the pending one for shards blocks move into. Each made once per publish,
            # in a thread: at a million subjects the list takes seconds to lay out.
            maps: dict[bool, tuple[wire.ShardMap, list[bytes]]] = {}
            for number, blocks in sorted(groups.items()):
                if replica is not None:
                    key = topology.gallery_key(replica)
                elif index.count == 1:
                    key = topology.gallery_broadcast_key
                else:
                    key = topology.shard_key(number)
                moving_in = number in index.target.values()
                if moving_in not in maps:
                    maps[moving_in] = await finish_in_thread(self._announce, index, moving_in, keys)
                shard_map, subjects = maps[moving_in]
                context = wire.ContextUpdate(
                    context=public,
                    conjugation_key=keys.edge_keys,
                    blocks=tuple(blocks),
                    issued_at=time.time(),
                    shard=number,
                    shard_map=shard_map,
                )
                # The context first: a replica takes its map's subject list only once
                # the context announcing it is accepted.
                for body in (agent._encode(context, keys), *subjects):
                    await agent.transport.publish(topology.gallery, key, body)
                await self._ship(blocks, key, keys, None if replica else number)
            log.info(
                "published context and %d block(s)",
                len(ids),
                extra={"fingerprint": keys.fingerprint, "replica": replica or "all"},
            )
            return len(ids)

    def _announce(
        self, index: ShardIndex, pending: bool, keys: KeySet
    ) -> tuple[wire.ShardMap, list[bytes]]:
        """The map a context carries, and its subject list's parts, signed."""
        shard_map, parts = wire.split_subjects(
            index.shard_map(pending=pending), self.agent.settings.max_message_size
        )
        return shard_map, [self.agent._encode(part, keys) for part in parts]

    async def _ship(self, ids: list[int], key: str, keys: KeySet, shard: int | None) -> None:
        """Blocks are encrypted (by `workers` processes) while earlier ones are sent;
        ``shard`` (not a sync) may answer without them for a while."""
        agent = self.agent
        topology = agent.transport.topology
        blocks = keys.book.encrypt_blocks(ids, workers=agent.settings.workers)
        try:
            while (block := await finish_in_thread(next, blocks, None)) is not None:
                if shard is not None:
                    self.router.shipped(keys.fingerprint, block.block_id, shard)
                for chunk in wire.split_block(block, agent.settings.max_message_size):
                    update = agent._encode(chunk, keys)
                    await agent.transport.publish(topology.gallery, key, update)
        finally:
            blocks.close()  # shuts the worker pool down if publishing failed

    # -- answers ------------------------------------------------------------------------
    def expected(self, result: wire.ScoresReady) -> frozenset[int]:
        """The shards whose answers make ``result``'s probe whole (`IntegrityError`: an
        unknown map version)."""
        return self.router.expected(result)

    def merge(self, answers: dict[int, wire.ScoresReady], keys: KeySet) -> Merged:
        """The shards' answers as one probe's scores, checked against what was shipped."""
        book = keys.book

        def shipped(block: int) -> tuple[int, int] | None:
            layout = book.shipped(block)
            if layout is None:
                return None
            cached = (keys.fingerprint, block, layout.version)
            if cached not in self._counts:
                self._counts[cached] = sum(1 for t in layout.template_ids if t)
            return layout.version, self._counts[cached]

        def subject_blocks(subject: str) -> frozenset[int]:
            blocks = {book.slot_of(t)[0] for t in book.template_ids(subject)}
            return frozenset(
                b for b in blocks if (s := book.shipped(b)) is not None and subject in s.subjects
            )

        return self.router.merge(
            answers,
            fingerprint=keys.fingerprint,
            shipped=shipped,
            subject_blocks=subject_blocks,
        )

    # -- moves --------------------------------------------------------------------------
    def on_status(self, status: wire.ReplicaStatus) -> None:
        """A replica reports what it serves: commit the move once its new shards serve it."""
        index = self.agent.book.shards
        if not index.target or status.fingerprint != self.agent.current.fingerprint:
            return
        served: dict[int, set[tuple[int, int]]] = {}
        for report in self.agent.replicas.values():
            if report.fingerprint == status.fingerprint:
                pairs = zip(report.blocks, report.versions, strict=True)
                served.setdefault(report.shard, set()).update(pairs)
        for block, shard in index.target.items():
            layout = self.agent.book.shipped(block)
            if layout is None or (block, layout.version) not in served.get(shard, set()):
                return
        moved = index.commit()
        book = self.agent.book
        book._load_index()
        self.refresh()
        log.warning(
            "shard move done: map version %d (%d block(s) moved)", index.version, len(moved)
        )
        task = asyncio.create_task(self.publish([]))  # every shard learns the new map
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
