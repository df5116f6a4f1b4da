"""A probe's scores split under the size limit and gathered back (`cipherface.wire.parts`)."""

from __future__ import annotations

import dataclasses

import pytest

from cipherface import wire
from cipherface.exceptions import PartError
from cipherface.signing import SigningKey
from cipherface.wire.payloads import BlockScores

CAP = 1024 * 1024


def test_split_scores_keeps_every_part_under_the_limit() -> None:
    block = wire.FaceScores(box=(0, 0, 9, 9), confidence=1.0, scores=())
    scores = tuple(BlockScores(block_id=i, version=1, scores=b"\x01" * 131_000) for i in range(40))
    ready = wire.ScoresReady(
        probe_id="p",
        subject=None,
        faces=(dataclasses.replace(block, scores=scores),) * 2,
        request="0" * 32,
        submitted_at=0.0,
        timings={"search": 1.0},
    )
    parts = wire.split_scores(ready, CAP)
    signer = SigningKey.generate("r1")
    sizes = [len(wire.encode(p, fingerprint="f" * 64, signer=signer)) for p in parts]
    assert len(parts) > 1 and max(sizes) <= CAP
    gatherer = wire.PartGatherer()
    results = [gatherer.add(p, "r1", "f") for p in reversed(parts)]
    assert results[:-1] == [None] * (len(parts) - 1)
    assert results[-1] == dataclasses.replace(ready, part=0, parts=1)
    assert wire.split_scores(ready, 16 * CAP) == [ready]


def test_parts_of_another_replica_or_key_never_join_a_probe() -> None:
    scores = (BlockScores(block_id=0, version=1, scores=b"x"),)
    face = wire.FaceScores(box=None, confidence=1.0, scores=scores)
    part = wire.ScoresReady(
        probe_id="p",
        subject=None,
        faces=(face,),
        request="0" * 32,
        submitted_at=0.0,
        timings={},
        part=0,
        parts=2,
    )
    gatherer = wire.PartGatherer()
    assert gatherer.add(part, "r1", "f") is None
    assert gatherer.add(part, "r1", "f") is None  # redelivered: no error, nothing new
    other = dataclasses.replace(part, part=1, faces=(dataclasses.replace(face, scores=()),))
    assert gatherer.add(other, "r2", "f") is None  # another replica: another probe
    assert gatherer.add(other, "r1", "g") is None  # another key: another probe
    assert len(gatherer) == 3
    with pytest.raises(PartError, match="other faces"):
        gatherer.add(dataclasses.replace(other, faces=(face, face)), "r1", "f")
    whole = gatherer.add(other, "r1", "f")
    assert whole is not None and whole.faces[0].scores == scores and whole.parts == 1
