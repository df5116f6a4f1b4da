"""The book's shards (which block and subject where, moves) and on-prem's check of shard answers."""

from __future__ import annotations

import numpy as np
import pytest

from cipherface import wire
from cipherface.crypto import Keyring
from cipherface.exceptions import ConfigError, IntegrityError
from cipherface.gallery import EnrollmentBook
from cipherface.sharding import ShardRouter, ShardView
from cipherface.wire.payloads import BlockScores


@pytest.fixture(scope="module")
def keyring() -> Keyring:
    return Keyring.generate()


def _vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=8)


def test_one_shard_allocates_as_before_lowest_free_position_first(keyring: Keyring) -> None:
    book = EnrollmentBook(keyring, "cosine", 8)
    ids = [book.add(f"s{i}", _vector(i)) for i in range(5)]
    assert [book.slot_of(t) for t in ids] == [(0, i) for i in range(5)]
    book.remove(ids[1])
    assert book.slot_of(book.add("new", _vector(9))) == (0, 1)
    assert book.slot_of(book.add("next", _vector(10))) == (0, 5)
    assert book.shards.shard_map().homes == (0,)


def test_subjects_spread_over_shards_and_keep_their_templates_together(
    keyring: Keyring,
) -> None:
    book = EnrollmentBook(keyring, "cosine", 8)
    book.shards.resize(2, book._layout, book._subject)
    for i in range(6):
        book.add(f"s{i}", _vector(i))
    book.add("s0", _vector(20))  # a second template of s0: its shard's block
    homes = book.shards.subject_home
    assert sorted(homes.values()) == [0, 0, 0, 1, 1, 1]
    shard_map = book.shards.shard_map()
    shard_of = dict(zip(shard_map.blocks, shard_map.homes, strict=True))
    for template_id in book.template_ids("s0"):
        assert shard_of[book.slot_of(template_id)[0]] == homes["s0"]
    assert set(shard_of.values()) == {0, 1}  # one block each: shards hold disjoint blocks
    with pytest.raises(ConfigError, match="fewer"):
        book.shards.resize(1, book._layout, book._subject)


def test_adding_a_shard_moves_whole_blocks_into_it_and_commits_a_new_version(
    keyring: Keyring,
) -> None:
    book = EnrollmentBook(keyring, "cosine", 8)
    capacity = book.capacity
    book.add_many((f"x{i}", _vector(i), None) for i in range(capacity + 4))
    assert book.all_blocks() == [0, 1]  # both in shard 0 (one shard)
    moves = book.shards.resize(2, book._layout, book._subject)
    assert moves == {0: 1}  # the full block goes; the small one stays
    assert book.shards.shard_map(pending=True).version == 1
    assert book.shards.commit() == {0: 1}
    book._load_index()
    assert book.shards.version == 1 and book.shards.home == {0: 1, 1: 0}
    assert book.shards.subject_home["x0"] == 1


def _answer(shard: int, blocks: dict[int, int], **changes: object) -> wire.ScoresReady:
    scores = tuple(BlockScores(block_id=b, version=v, scores=b"") for b, v in blocks.items())
    fields: dict[str, object] = {
        "probe_id": "p",
        "subject": None,
        "faces": (wire.FaceScores(box=None, confidence=1.0, scores=scores),),
        "request": "0" * 32,
        "submitted_at": 1.0,
        "timings": {},
        "shard": shard,
        "map_version": 0,
    }
    return wire.ScoresReady(**{**fields, **changes})  # type: ignore[arg-type]


def _router() -> ShardRouter:
    router = ShardRouter()
    homes = {0: 0, 1: 1, 2: 1}
    router.update(ShardView(0, 2, homes, {"a": 0, "b": 1}), None)
    return router


def _merge(router: ShardRouter, answers: dict[int, wire.ScoresReady]):  # type: ignore[no-untyped-def]
    return router.merge(
        answers,
        fingerprint="fp",
        shipped=lambda block: (1, 10),
        subject_blocks=lambda subject: frozenset({0} if subject == "a" else {1, 2}),
    )


def test_whole_answers_merge_and_a_silent_shard_makes_the_answer_partial() -> None:
    router = _router()
    both = {0: _answer(0, {0: 1}), 1: _answer(1, {1: 1, 2: 1})}
    merged = _merge(router, both)
    assert not merged.partial and merged.searched == 1.0
    assert [b.block_id for b in merged.scores.faces[0].scores] == [0, 1, 2]
    partial = _merge(router, {0: both[0]})
    assert partial.partial and partial.searched == pytest.approx(1 / 3)
    assert router.expected(both[0]) == {0, 1}
    assert router.expected(_answer(1, {}, subject="b")) == {1}


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        ({0: _answer(0, {0: 1}), 1: _answer(1, {0: 1, 1: 1, 2: 1})}, "shard 1 scored block 0"),
        ({0: _answer(0, {0: 1}), 1: _answer(1, {1: 1, 9: 1})}, "not in the gallery"),
        ({0: _answer(0, {0: 1}), 1: _answer(1, {1: 1})}, "misses block 2"),
        ({0: _answer(0, {0: 2}), 1: _answer(1, {1: 1, 2: 1})}, "version 2"),
        ({0: _answer(0, {0: 1}), 1: _answer(1, {1: 1, 2: 1}, subject="a")}, "disagrees"),
        ({0: _answer(0, {0: 1}, map_version=3)}, "map version 3"),
    ],
)
def test_a_forged_shard_answer_is_an_integrity_error(
    answers: dict[int, wire.ScoresReady], reason: str
) -> None:
    with pytest.raises(IntegrityError, match=reason):
        _merge(_router(), answers)


def test_a_block_just_shipped_to_a_shard_may_be_missing_there_only() -> None:
    router = _router()
    router.shipped("fp", 2, 1)
    merged = _merge(router, {0: _answer(0, {0: 1}), 1: _answer(1, {1: 1})})
    # Not a forgery, but not the whole gallery either: the answer says so.
    assert merged.partial and merged.searched == pytest.approx(2 / 3)
    router = _router()
    router.shipped("fp", 2, 0)  # shipped to another shard: no grace for shard 1
    with pytest.raises(IntegrityError, match="misses block 2"):
        _merge(router, {0: _answer(0, {0: 1}), 1: _answer(1, {1: 1})})


def test_a_block_scored_at_an_older_version_is_not_counted_as_searched() -> None:
    # Re-encrypted a moment ago: the replica's old version is no forgery, but ranking
    # skips it, so the answer says what it lacks.
    router = _router()
    router.shipped("fp", 0, 0)
    merged = _merge(router, {0: _answer(0, {0: 0}), 1: _answer(1, {1: 1, 2: 1})})
    assert merged.partial and merged.searched == pytest.approx(2 / 3)
