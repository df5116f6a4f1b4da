"""Which shard serves each block of the book, and where a new template goes.

On-prem's `EnrollmentBook` is the layout authority, so it also decides the shards:
every block belongs to one shard (shards hold disjoint blocks), and all of a
subject's templates sit in blocks of one shard, so a 1:1 claim is searched on
that shard alone. A new subject goes to the shard with the fewest templates; a
new template fills its shard's lowest free position first, then the shard's
open block, then a new block. With one shard this is exactly the book's former
allocator: lowest free position first, then the end of the last block.

Adding shards moves whole blocks, never templates (no re-encryption): blocks
linked by a subject move together. A move is *pending* (``target``) until the
new shard serves the block; then `commit` makes it the block's home under a new
map version (`cipherface.sharding` drives it).
"""

from __future__ import annotations

import heapq
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Mapping

from cipherface.exceptions import ConfigError
from cipherface.wire.payloads import MAX_SHARDS, ShardMap

__all__ = ["ShardIndex"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS block_shards (
    block_id INTEGER PRIMARY KEY,
    shard INTEGER NOT NULL,
    target INTEGER
);
CREATE TABLE IF NOT EXISTS shard_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class ShardIndex:
    """Block -> shard, subject -> shard, and each shard's free positions; kept in the book.

    A block without a row is shard 0's (books made before sharding).
    """

    def __init__(self, db: sqlite3.Connection, capacity: int) -> None:
        self._db = db
        self.capacity = capacity
        with db:
            db.executescript(_SCHEMA)

    def load(self, layout: Mapping[int, list[str]], subject_of: Mapping[str, str]) -> None:
        """Rebuild the index from the book's rows (at open, and when another process wrote)."""
        state = dict(self._db.execute("SELECT key, value FROM shard_state"))
        self.count = int(state.get("shards", 1))
        self.version = int(state.get("version", 0))
        self.home: dict[int, int] = {}
        self.target: dict[int, int] = {}
        for block, shard, target in self._db.execute("SELECT * FROM block_shards"):
            self.home[block] = shard
            if target is not None:
                self.target[block] = target
        for block in layout:
            self.home.setdefault(block, 0)
        self.subject_home: dict[str, int] = {}
        #: One block of each subject's (all of them are in one shard).
        self.subject_block: dict[str, int] = {}
        self.load_of: Counter[int] = Counter()
        self._free: dict[int, list[int]] = defaultdict(list)
        self._end: dict[int, int] = {}
        for block, row in layout.items():
            shard = self.home[block]
            for slot, template_id in enumerate(row):
                if template_id:
                    self.subject_home[subject_of[template_id]] = shard
                    self.subject_block[subject_of[template_id]] = block
                    self.load_of[shard] += 1
                else:
                    self._free[shard].append(block * self.capacity + slot)
            end = block * self.capacity + len(row)
            self._end[shard] = max(self._end.get(shard, 0), end)
        for heap in self._free.values():
            heapq.heapify(heap)
        self._top = max(layout, default=-1)
        self._unsaved: set[int] = set()

    # -- placement ----------------------------------------------------------------------
    def place(self, subject: str) -> int:
        """The position (block * capacity + slot) of ``subject``'s next template."""
        shard = self.subject_home.get(subject)
        if shard is None:
            shard = min(range(self.count), key=lambda s: (self.load_of[s], s))
            self.subject_home[subject] = shard
        self.load_of[shard] += 1
        if self._free[shard]:
            index = heapq.heappop(self._free[shard])
            self.subject_block[subject] = index // self.capacity
            return index
        index = self._end.get(shard)
        block = None if index is None else index // self.capacity
        if block is None or self.home.get(block, shard if block > self._top else -1) != shard:
            block = self._top + 1
            index = block * self.capacity
        if block not in self.home:
            self.home[block] = shard
            self._unsaved.add(block)
        self._top = max(self._top, block)
        assert index is not None
        self._end[shard] = index + 1
        self.subject_block[subject] = block
        return index

    def free(self, block: int, slot: int, subject: str, subject_left: bool) -> None:
        """A template's position is free again (its subject's last one: ``subject_left``)."""
        shard = self.home.get(block, 0)
        heapq.heappush(self._free[shard], block * self.capacity + slot)
        self.load_of[shard] -= 1
        if subject_left:
            self.subject_home.pop(subject, None)
            self.subject_block.pop(subject, None)

    def save(self) -> None:
        """Write new blocks' shards (inside the book's transaction)."""
        self._db.executemany(
            "INSERT OR IGNORE INTO block_shards (block_id, shard) VALUES (?, ?)",
            [(block, self.home[block]) for block in sorted(self._unsaved)],
        )
        self._unsaved.clear()

    # -- the map ------------------------------------------------------------------------
    def shard_map(self, *, pending: bool = False) -> ShardMap:
        """The map replicas get: homes, or (``pending``) with moving blocks at their target."""
        homes = {**self.home, **(self.target if pending else {})}
        blocks = sorted(homes)
        subjects = sorted(self.subject_home) if self.count > 1 else []
        return ShardMap(
            version=self.version + (1 if pending and self.target else 0),
            shards=self.count,
            blocks=tuple(blocks),
            homes=tuple(homes[b] for b in blocks),
            subjects=tuple(subjects),
            subject_homes=tuple(self._subject_target(s, pending) for s in subjects),
        )

    def _subject_target(self, subject: str, pending: bool) -> int:
        """A subject's shard; while blocks move, where its blocks go (all move together)."""
        block = self.subject_block[subject]
        return self.target.get(block, self.home[block]) if pending else self.home[block]

    def resize(
        self, shards: int, layout: Mapping[int, list[str]], subject_of: Mapping[str, str]
    ) -> dict[int, int]:
        """Spread the blocks over ``shards`` (more than now): pending moves to the new shards.

        Blocks linked by a subject form a group that moves whole; groups go, largest
        first, to the least loaded new shard while that lowers the larger load.
        Returns the blocks that move. Fewer shards is refused (merging is not a move).
        """
        if not 1 <= shards <= MAX_SHARDS:
            raise ConfigError(f"shards must be 1 to {MAX_SHARDS}")
        if shards < self.count:
            raise ConfigError(f"the gallery has {self.count} shards: fewer is not supported")
        if shards == self.count:
            return {}
        if self.target:
            raise ConfigError("blocks are still moving to new shards: try again once done")
        groups = _groups(layout, subject_of)
        load = Counter({s: self.load_of[s] for s in range(shards)})
        new = range(self.count, shards)
        moves: dict[int, int] = {}
        for size, blocks in sorted(groups, key=lambda g: (-g[0], min(g[1]))):
            # Only into the new shards, and only while it lowers the larger load: no
            # block moves between the shards that were there.
            source = self.home[min(blocks)]
            dest = min(new, key=lambda s: (load[s], s))
            if size and load[dest] + size < load[source]:
                for block in blocks:
                    moves[block] = dest
                load[source] -= size
                load[dest] += size
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO shard_state VALUES ('shards', ?)", (shards,))
            for block, dest in moves.items():
                self._db.execute(
                    "INSERT INTO block_shards VALUES (?, ?, ?) "
                    "ON CONFLICT(block_id) DO UPDATE SET target = excluded.target",
                    (block, self.home[block], dest),
                )
        self.count = shards
        self.target.update(moves)
        return moves

    def commit(self) -> dict[int, int]:
        """The pending moves are served by their new shards: make them the homes (new version)."""
        moved = dict(self.target)
        if not moved:
            return moved
        with self._db:
            self._db.execute(
                "UPDATE block_shards SET shard = target, target = NULL WHERE target IS NOT NULL"
            )
            self._db.execute(
                "INSERT OR REPLACE INTO shard_state VALUES ('version', ?)", (self.version + 1,)
            )
        self.version += 1
        for block, dest in moved.items():
            self.home[block] = dest
        self.target.clear()
        return moved


def _groups(
    layout: Mapping[int, list[str]], subject_of: Mapping[str, str]
) -> list[tuple[int, set[int]]]:
    """Blocks linked by a subject (union-find), with their template counts."""
    parent: dict[int, int] = {block: block for block in layout}

    def root(block: int) -> int:
        while parent[block] != block:
            parent[block] = parent[parent[block]]
            block = parent[block]
        return block

    first: dict[str, int] = {}
    for block, row in layout.items():
        for template_id in row:
            if template_id:
                subject = subject_of[template_id]
                other = first.setdefault(subject, block)
                parent[root(block)] = root(other)
    members: dict[int, set[int]] = defaultdict(set)
    for block in layout:
        members[root(block)].add(block)
    return [(sum(1 for b in blocks for t in layout[b] if t), blocks) for blocks in members.values()]
