"""A replica's shard map: which map it routes by, and when (`agents.cloud.shards.ShardRole`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

from agents.cloud.shards import ShardRole
from cipherface import wire


def _agent(folder: Path) -> SimpleNamespace:
    """What a `ShardRole` reads of its replica."""
    return SimpleNamespace(
        settings=SimpleNamespace(shard=0, cloud_dir=folder), gallery=None, replica="r0"
    )


def test_a_replayed_older_context_rolls_no_map_back(tmp_path: Path) -> None:
    """Enrollments change a map's subjects without a new version: a redelivered
    context issued earlier, at the same version, must not undo the newer map (nor
    the copy a restarted replica reads)."""
    agent = _agent(tmp_path)
    older = wire.ShardMap(
        version=1, shards=2, blocks=(0, 1), homes=(0, 1), subjects=("a",), subject_homes=(0,)
    )
    newer = dataclasses.replace(older, subjects=("a", "b"), subject_homes=(0, 1))

    def context(shard_map: wire.ShardMap, issued_at: float) -> wire.ContextUpdate:
        return wire.ContextUpdate(context=b"", issued_at=issued_at, shard_map=shard_map)

    role = ShardRole(agent)  # type: ignore[arg-type]
    role.take_map(context(newer, issued_at=200.0))
    role.take_map(context(older, issued_at=100.0))
    assert role.map == newer and role.targets("b") == [1]
    restarted = ShardRole(agent)  # type: ignore[arg-type]
    restarted.take_map(context(older, issued_at=100.0))
    assert restarted.map == newer
    role.take_map(context(dataclasses.replace(older, version=2), issued_at=100.0))
    assert role.map is not None and role.map.version == 2  # a newer version wins


def test_a_replica_routes_claims_by_a_subject_list_once_every_part_is_in(
    tmp_path: Path,
) -> None:
    """The context announces the list; the replica routes by the map before it (its
    version and its routes, which agree) until every part is in, in any order, and a
    restarted replica routes by the newest whole map at once."""
    agent = _agent(tmp_path)
    subjects = tuple(f"s{i:06d}" for i in range(200_000))
    homes = tuple(i % 2 for i in range(200_000))
    before = wire.ShardMap(
        version=1, shards=2, blocks=(0, 1), homes=(0, 1), subjects=("s000001",), subject_homes=(0,)
    )
    after = dataclasses.replace(before, version=2, subjects=subjects, subject_homes=homes)
    role = ShardRole(agent)  # type: ignore[arg-type]
    old, old_parts = wire.split_subjects(before, 1024 * 1024)
    role.take_map(wire.ContextUpdate(context=b"", issued_at=100.0, shard_map=old))
    assert not role.routable and role.map is None
    role.take_subjects(*old_parts)
    announced, parts = wire.split_subjects(after, 1024 * 1024)
    assert len(parts) > 1
    role.take_map(wire.ContextUpdate(context=b"", issued_at=200.0, shard_map=announced))
    assert not role.routable and (role.version, role.targets("s000001")) == (1, [0])
    midway = ShardRole(agent)  # type: ignore[arg-type]
    assert midway.routable and (midway.version, midway.targets("s000001")) == (1, [0])
    role.take_subjects(old_parts[0])  # a replayed part of another list: not held
    for part in reversed(parts):
        role.take_subjects(part)
    assert role.routable and role.version == 2
    assert role.targets("s000001") == [1] and role.targets("s000002") == [0]
    # A block added for a subject already listed: the same list, no parts to wait for.
    spilled = dataclasses.replace(announced, blocks=(0, 1, 2), homes=(0, 1, 0))
    role.take_map(wire.ContextUpdate(context=b"", issued_at=300.0, shard_map=spilled))
    assert role.routable and role.targets("s000001") == [1]
    restarted = ShardRole(agent)  # type: ignore[arg-type]
    assert restarted.routable and restarted.version == 2 and restarted.targets("s000001") == [1]
    assert restarted._own == {0, 2}
