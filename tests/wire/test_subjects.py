"""A sharded map's subject list in parts: whole only as announced, never half-taken."""

from __future__ import annotations

import dataclasses

import pytest

from cipherface import wire
from cipherface.exceptions import SubjectsError
from cipherface.signing import SigningKey
from cipherface.wire.chunks import packed_size
from cipherface.wire.envelope import MAX_MESSAGE_BYTES
from cipherface.wire.payloads import ShardMap
from cipherface.wire.subjects import SubjectList, split_subjects

#: Small enough that 200,000 subjects need several parts, as millions do at 4 MiB.
LIMIT = 1024 * 1024


def _map(count: int = 200_000) -> ShardMap:
    subjects = tuple(f"subject-{i:07d}" for i in range(count))
    return ShardMap(
        version=3,
        shards=4,
        blocks=(0, 1, 2, 3),
        homes=(0, 1, 2, 3),
        subjects=subjects,
        subject_homes=tuple(i % 4 for i in range(count)),
    )


def test_a_list_too_large_for_one_message_travels_in_parts_under_the_limit() -> None:
    whole = _map()
    announced, parts = split_subjects(whole, LIMIT)
    assert len(parts) > 2 and announced.subject_parts == len(parts)
    assert announced.subjects == () and len(announced.subjects_digest) == 64
    # The context's map no longer grows with the subjects.
    assert packed_size(announced.to_dict()) < 1000
    signer = SigningKey.generate("onprem")
    assert all(len(wire.encode(part, signer=signer)) <= LIMIT for part in parts)
    assert ShardMap.from_dict(announced.to_dict()) == announced
    held = SubjectList()
    for part in reversed(parts):  # in any order
        assert held.join(announced) is None
        held.add(part)
    joined = held.join(announced)
    assert joined is not None and joined.subject_shards() == whole.subject_shards()
    assert held.join(announced) is None  # let go once joined


def test_a_map_without_subjects_is_sent_as_it_is() -> None:
    one = dataclasses.replace(_map(0), shards=1, homes=(0, 0, 0, 0))
    assert split_subjects(one, MAX_MESSAGE_BYTES) == (one, [])


def test_parts_that_do_not_make_the_announced_list_are_refused() -> None:
    announced, parts = split_subjects(_map(), LIMIT)
    moved = dataclasses.replace(parts[1], subject_homes=(0,) * len(parts[1].subjects))
    held = SubjectList()
    for part in (parts[0], moved, *parts[2:]):
        held.add(part)
    with pytest.raises(SubjectsError, match="do not hash to the digest"):
        held.join(announced)
    held = SubjectList()
    held.add(parts[0])
    with pytest.raises(SubjectsError, match="differs from the part held"):
        held.add(dataclasses.replace(parts[0], subjects=("mallory",) * len(parts[0].subjects)))
    _, resplit = split_subjects(_map(), LIMIT // 2)  # on-prem restarted with a smaller cap
    held.add(resplit[0])  # starts the list over
    for part in resplit[1:]:
        held.add(part)
    assert held.join(dataclasses.replace(announced, subject_parts=len(resplit))) is not None
    with pytest.raises(SubjectsError, match="out of range"):
        held.add(dataclasses.replace(parts[1], part=len(parts)))
    with pytest.raises(SubjectsError, match="not as many shards"):
        held.add(dataclasses.replace(parts[1], subject_homes=(0,)))
    held.add(parts[0])  # the very part again (a redelivery) is fine


def test_only_the_latest_lists_are_held() -> None:
    held = SubjectList(keep=2)
    lists = [split_subjects(_map(100 + i), LIMIT) for i in range(3)]
    for _, parts in lists:
        held.add(parts[0])
    assert held.join(lists[0][0]) is None  # dropped for the newer two
    assert held.join(lists[2][0]) is not None
