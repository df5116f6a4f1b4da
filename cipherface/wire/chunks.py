"""A gallery block as chunks under the message size limit, and their assembly.

A block is ``dimensions`` seeded ciphertext columns of about 64 KB (n8192):
8.4 MB at 128-d, 33.7 MB at 512-d, 269 MB at 4096-d, more than a broker should
carry in one message (`cipherface.wire.envelope`). On-prem sends it as
`BlockChunk` messages, each holding a run of consecutive columns and the whole
block's *layout digest*; the first also holds the layout (template ids,
subjects, the euclidean norm column). Each chunk is signed by on-prem on its
own, so a replica checks every chunk before keeping it.

The replica's `BlockAssembler` installs a block only when its layout and every
column are in, from chunks that agree: same block id, version, key fingerprint,
dimensions and layout digest, no column twice, none out of range. A chunk that
disagrees raises `ChunkError` (the consumer dead-letters it with that reason) and
changes nothing held. Chunks live in memory only: a replica that restarts
mid-block has acked chunks it no longer holds, and gets the block again from the
sync it asks for at every start.

Redeliveries and replays are harmless: a chunk whose columns are all held with
the same bytes changes nothing (the broker redelivers what a consumer had not
acked), a chunk of a version older than the one installed or being assembled is
ignored, and an assembly of a version installed already (a resend) is the first
dropped beyond the pending bound: a replayed old chunk never pushes a newer
block's assembly out.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgpack

from cipherface.exceptions import ChunkError, MessageTooLargeError
from cipherface.wire.messages import BlockChunk
from cipherface.wire.payloads import BlockLayout, EncryptedBlock

__all__ = [
    "ENVELOPE_ALLOWANCE",
    "BlockAssembler",
    "layout_digest",
    "pack",
    "packed_size",
    "split_block",
]

log = logging.getLogger(__name__)

#: Bytes of a chunk's message that are not columns or layout: the envelope (ids,
#: fingerprint, model, metric, signature) and the chunk's own fields, generously.
ENVELOPE_ALLOWANCE = 16 * 1024
#: msgpack's header of one ``bin`` item (bin 32).
_BIN_HEADER = 5


def layout_digest(
    block_id: int, version: int, fingerprint: str, dimensions: int, head: BlockLayout
) -> bytes:
    """SHA-256 naming one block's layout: what every chunk of the block carries."""
    packed = msgpack.packb(
        [block_id, version, fingerprint, dimensions, head.to_dict()], use_bin_type=True
    )
    return hashlib.sha256(packed).digest()


def split_block(block: EncryptedBlock, limit: int) -> list[BlockChunk]:
    """The block as chunks whose messages each stay within ``limit`` bytes.

    Columns are packed greedily in order; the first chunk carries the layout too.
    `MessageTooLargeError` if the layout or a single column cannot fit at all.
    """
    head = BlockLayout(
        metric=block.metric,
        template_ids=block.template_ids,
        subjects=block.subjects,
        norms=block.norms,
    )
    digest = layout_digest(block.block_id, block.version, block.fingerprint, block.dimensions, head)
    budget = limit - ENVELOPE_ALLOWANCE
    head_size = packed_size(head.to_dict())
    if head_size >= budget:
        raise MessageTooLargeError(f"layout of block {block.block_id}", head_size, budget)
    costs = [len(column) + _BIN_HEADER for column in block.columns]
    runs = pack(costs, budget, f"a column of block {block.block_id}", used=head_size)
    return [
        BlockChunk(
            block_id=block.block_id,
            version=block.version,
            dimensions=block.dimensions,
            layout=digest,
            start=run.start,
            columns=block.columns[run.start : run.stop],
            head=head if index == 0 else None,
        )
        for index, run in enumerate(runs)
    ]


def packed_size(value: object) -> int:
    """Bytes ``value`` takes in msgpack, as messages encode it: what a split counts."""
    return len(msgpack.packb(value, use_bin_type=True))


def pack(costs: Sequence[int], budget: int, what: str, *, used: int = 0) -> list[range]:
    """Consecutive items in runs of at most ``budget`` bytes each, greedily, in order
    (the first run starts with ``used`` bytes taken). `MessageTooLargeError` names
    ``what`` when one item alone does not fit."""
    runs: list[range] = []
    start = 0
    for index, cost in enumerate(costs):
        if cost > budget:
            raise MessageTooLargeError(what, cost, budget)
        if used + cost > budget:
            runs.append(range(start, index))
            start, used = index, 0
        used += cost
    runs.append(range(start, len(costs)))
    return runs


@dataclass(slots=True)
class _Partial:
    """The chunks of one block received so far."""

    dimensions: int
    layout: bytes
    head: BlockLayout | None = None
    columns: dict[int, bytes] = field(default_factory=dict)


class BlockAssembler:
    """Collects chunks until a block is whole; checks each one against the others.

    At most ``max_pending`` blocks are kept half-assembled (the oldest is dropped
    beyond that, and asked for again by the replica's sync): on-prem sends a
    block's chunks back to back, so more than one pending block means the rest of
    another will never come (a publish interrupted by on-prem's shutdown).
    """

    def __init__(
        self, max_pending: int = 2, installed: Callable[[str, int], int] | None = None
    ) -> None:
        self.max_pending = max_pending
        #: The version of a block (key fingerprint, block id) installed (0: none): the
        #: replica's gallery, the served one or a key rotation's staged one.
        self.installed = installed or (lambda fingerprint, block_id: 0)
        self._pending: OrderedDict[tuple[str, int, int], _Partial] = OrderedDict()
        #: Chunks accepted so far: a replica waiting for blocks sees them coming.
        self.accepted = 0

    def _evict(self) -> None:
        """Drop half-assembled blocks beyond the bound: first those of a version held
        already (a replay or a resend: nothing is lost), then the oldest."""
        while len(self._pending) > self.max_pending:
            redundant = [k for k in self._pending if k[2] <= self.installed(k[0], k[1])]
            fp, block_id, version = (redundant or list(self._pending))[0]
            del self._pending[(fp, block_id, version)]
            log.warning("dropped half-assembled block %d v%d (%s)", block_id, version, fp)

    def __len__(self) -> int:
        """Blocks half-assembled."""
        return len(self._pending)

    def add(self, chunk: BlockChunk, fingerprint: str) -> EncryptedBlock | None:
        """Keep a chunk made under key ``fingerprint``; the block once it is whole.

        Raises `ChunkError` for a chunk that contradicts the block's other chunks or
        itself, leaving what was held unchanged.
        """
        name = f"chunk of block {chunk.block_id} v{chunk.version}"
        if chunk.block_id < 0 or chunk.version < 1 or chunk.dimensions < 1 or chunk.start < 0:
            raise ChunkError(f"{name}: block id, version, dimensions and start must be valid")
        end = chunk.start + len(chunk.columns)
        if end > chunk.dimensions:
            raise ChunkError(f"{name}: columns {chunk.start}..{end - 1} of {chunk.dimensions}")
        if not chunk.columns and chunk.head is None:
            raise ChunkError(f"{name}: carries neither columns nor the layout")
        if chunk.head is not None:
            expected = layout_digest(
                chunk.block_id, chunk.version, fingerprint, chunk.dimensions, chunk.head
            )
            if expected != chunk.layout:
                raise ChunkError(f"{name}: its layout does not match its layout digest")
        newest = max(
            [
                self.installed(fingerprint, chunk.block_id),
                *(v for fp, b, v in self._pending if (fp, b) == (fingerprint, chunk.block_id)),
            ]
        )
        if chunk.version < newest:
            # A replayed old chunk: on-prem sends only its newest version of a block.
            log.info("ignored block %d v%d: v%d is held", chunk.block_id, chunk.version, newest)
            return None
        key = (fingerprint, chunk.block_id, chunk.version)
        partial = self._pending.get(key)
        if partial is None:
            partial = _Partial(dimensions=chunk.dimensions, layout=chunk.layout)
        elif (partial.dimensions, partial.layout) != (chunk.dimensions, chunk.layout):
            raise ChunkError(f"{name}: another layout or dimension count than its other chunks")
        if chunk.head is not None and partial.head not in (None, chunk.head):
            raise ChunkError(f"{name}: the block's layout is held already (duplicate chunk)")
        held = [
            i
            for i, column in zip(range(chunk.start, end), chunk.columns, strict=True)
            if partial.columns.get(i, column) != column
        ]
        if held:
            raise ChunkError(
                f"{name}: columns {held[0]}..{held[-1]} held already, other bytes (duplicate)"
            )
        if chunk.head is not None:
            partial.head = chunk.head
        partial.columns.update(zip(range(chunk.start, end), chunk.columns, strict=True))
        self.accepted += 1
        if partial.head is None or len(partial.columns) < partial.dimensions:
            # A newer version makes an older one's assembly pointless: it would be refused.
            for older in [k for k in self._pending if k[:2] == key[:2] and k[2] < key[2]]:
                del self._pending[older]
            self._pending[key] = partial
            self._pending.move_to_end(key)
            self._evict()
            return None
        self._pending.pop(key, None)
        head = partial.head
        return EncryptedBlock.from_dict(
            {
                "block_id": chunk.block_id,
                "version": chunk.version,
                "fingerprint": fingerprint,
                "metric": head.metric,
                "dimensions": partial.dimensions,
                "template_ids": list(head.template_ids),
                "subjects": list(head.subjects),
                "columns": [partial.columns[i] for i in range(partial.dimensions)],
                "norms": head.norms,
            }
        )
