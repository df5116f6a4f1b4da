"""Blocks travel as chunks under the size limit; the assembler installs only agreeing chunks."""

from __future__ import annotations

import dataclasses
import os

import pytest

from cipherface import wire
from cipherface.exceptions import ChunkError, MessageTooLargeError
from cipherface.signing import PinnedKey, SigningKey
from cipherface.wire.payloads import EncryptedBlock

FP = "f" * 64
SIGNER = SigningKey.generate("onprem")
LIMIT = 4 * 1024 * 1024
#: A seeded n8192 column at the lowest level is about 64 KB.
COLUMN = 65_600


def _block(dimensions: int, version: int = 1, metric: str = "cosine") -> EncryptedBlock:
    return EncryptedBlock(
        block_id=3,
        version=version,
        fingerprint=FP,
        metric=metric,
        dimensions=dimensions,
        template_ids=tuple(f"{i:032x}" for i in range(8192)),
        subjects=tuple(f"subject-{i % 500}" for i in range(8192)),
        columns=tuple(os.urandom(COLUMN) for _ in range(dimensions)),
        norms=os.urandom(COLUMN) if metric == "euclidean" else None,
    )


def _through_the_wire(chunk: wire.BlockChunk) -> wire.BlockChunk:
    data = wire.encode(chunk, fingerprint=FP, signer=SIGNER, limit=LIMIT)
    message = wire.decode(data, verifier=PinnedKey(SIGNER.verify_key), limit=LIMIT).message
    assert isinstance(message, wire.BlockChunk)
    return message


@pytest.mark.parametrize(("dimensions", "metric"), [(128, "euclidean"), (512, "cosine")])
def test_a_block_splits_under_the_limit_and_assembles_whole(dimensions: int, metric: str) -> None:
    block = _block(dimensions, metric=metric)
    chunks = wire.split_block(block, LIMIT)
    sizes = [len(wire.encode(c, fingerprint=FP, signer=SIGNER, limit=LIMIT)) for c in chunks]
    assert max(sizes) <= LIMIT
    assert len(chunks) == -(-sum(sizes) // LIMIT) or len(chunks) == -(-sum(sizes) // LIMIT) + 1
    assembler = wire.BlockAssembler()
    results = [assembler.add(_through_the_wire(c), FP) for c in chunks]
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1] == block
    assert len(assembler) == 0


def test_a_4096_column_block_is_65_chunks_and_the_whole_block_comes_back() -> None:
    block = _block(4096)
    chunks = wire.split_block(block, LIMIT)
    assert len(chunks) >= 64  # 269 MB in messages of at most 4 MiB
    assembler = wire.BlockAssembler()
    # Out of order is fine: only agreement and completeness matter.
    results = [assembler.add(c, FP) for c in [*chunks[1:], chunks[0]]]
    assert results[-1] == block and results.count(None) == len(chunks) - 1


def test_a_column_larger_than_the_limit_is_a_typed_error() -> None:
    with pytest.raises(MessageTooLargeError, match="layout of block 3"):
        wire.split_block(_block(4), 60_000)
    small = dataclasses.replace(_block(4), template_ids=("t",), subjects=("s",))
    with pytest.raises(MessageTooLargeError, match="a column of block 3"):
        wire.split_block(small, 60_000)


def _started(block: EncryptedBlock) -> tuple[wire.BlockAssembler, list[wire.BlockChunk]]:
    chunks = wire.split_block(block, LIMIT)
    assembler = wire.BlockAssembler()
    assert assembler.add(chunks[0], FP) is None
    return assembler, chunks


def test_a_redelivered_chunk_is_accepted_and_changes_nothing() -> None:
    """The broker redelivers a chunk whose ack was lost: the same bytes are no forgery."""
    block = _block(128)
    assembler, chunks = _started(block)
    assert assembler.add(chunks[0], FP) is None  # the same chunk again: idempotent
    assert [assembler.add(c, FP) for c in chunks[1:]][-1] == block
    assert assembler.add(chunks[-1], FP) is None  # redelivered after the block was whole
    assert assembler.add(chunks[-1], FP) is None


def test_a_chunk_over_held_columns_with_other_bytes_is_refused_and_changes_nothing() -> None:
    block = _block(128)
    assembler, chunks = _started(block)
    later = dataclasses.replace(chunks[1], start=chunks[1].start - 1)
    with pytest.raises(ChunkError, match="held already, other bytes"):
        assembler.add(later, FP)  # overlaps the first chunk's last column
    assert [assembler.add(c, FP) for c in chunks[1:]][-1] == block


def test_a_chunk_of_another_layout_or_version_never_mixes_in() -> None:
    block = _block(128)
    other = dataclasses.replace(block, subjects=("mallory",) * 8192)
    assembler, chunks = _started(block)
    foreign = wire.split_block(other, LIMIT)
    with pytest.raises(ChunkError, match="another layout"):
        assembler.add(foreign[1], FP)
    assert [assembler.add(c, FP) for c in chunks[1:]][-1] == block
    # A newer version is another block, and the older one's chunks are stale then.
    newer_block = dataclasses.replace(block, version=2)
    newer = wire.split_block(newer_block, LIMIT)
    assert assembler.add(newer[1], FP) is None
    assert [assembler.add(c, FP) for c in chunks] == [None] * len(chunks)
    assert [assembler.add(c, FP) for c in [newer[0], *newer[2:]]][-1] == newer_block


def test_a_forged_layout_or_a_bad_range_is_refused() -> None:
    block = _block(128)
    chunks = wire.split_block(block, LIMIT)
    head = chunks[0].head
    assert head is not None
    forged = dataclasses.replace(
        chunks[0], head=dataclasses.replace(head, subjects=("mallory",) * 8192)
    )
    with pytest.raises(ChunkError, match="layout digest"):
        wire.BlockAssembler().add(forged, FP)
    with pytest.raises(ChunkError, match="layout digest"):
        wire.BlockAssembler().add(chunks[0], "0" * 64)  # under another key
    beyond = dataclasses.replace(chunks[-1], start=128 - len(chunks[-1].columns) + 1)
    with pytest.raises(ChunkError, match="of 128"):
        wire.BlockAssembler().add(beyond, FP)
    empty = dataclasses.replace(chunks[1], columns=())
    with pytest.raises(ChunkError, match="neither columns nor the layout"):
        wire.BlockAssembler().add(empty, FP)


def test_half_assembled_blocks_are_bounded() -> None:
    assembler = wire.BlockAssembler(max_pending=2)
    for block_id in (1, 2, 3):
        block = dataclasses.replace(_block(128), block_id=block_id)
        assembler.add(wire.split_block(block, LIMIT)[0], FP)
    assert len(assembler) == 2


def _two_pending() -> tuple[wire.BlockAssembler, list[list[wire.BlockChunk]], EncryptedBlock]:
    """Block 3 v2 and block 4 v1 half-assembled; block 5 installed at v3 before."""
    installed = {(FP, 5): 3}
    assembler = wire.BlockAssembler(
        max_pending=2, installed=lambda fp, block_id: installed.get((fp, block_id), 0)
    )
    newer = _block(128, version=2)
    other = dataclasses.replace(_block(128), block_id=4)
    started = [wire.split_block(newer, LIMIT), wire.split_block(other, LIMIT)]
    for chunks in started:
        assert assembler.add(chunks[0], FP) is None
    return assembler, started, newer


def test_a_replayed_old_chunk_never_evicts_a_newer_block_being_assembled() -> None:
    assembler, (newer, other), whole = _two_pending()
    # Replays: block 3 v1 (older than the v2 being assembled), block 5 v2 (older
    # than the v3 installed), block 5 v3 (a resend of what is installed).
    replays = [
        wire.split_block(_block(128, version=1), LIMIT)[1],
        wire.split_block(dataclasses.replace(_block(128, version=2), block_id=5), LIMIT)[0],
        wire.split_block(dataclasses.replace(_block(128, version=3), block_id=5), LIMIT)[0],
    ]
    for chunk in replays:
        assert assembler.add(chunk, FP) is None
    assert len(assembler) == 2
    assert [assembler.add(c, FP) for c in newer[1:]][-1] == whole
    assert [assembler.add(c, FP) for c in other[1:]][-1] is not None
