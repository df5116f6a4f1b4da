"""The shard map and a fanned-out face on the wire: what a forged one cannot say."""

from __future__ import annotations

import pytest

from cipherface.exceptions import WireFormatError
from cipherface.wire.payloads import FaceProbe, ShardMap

MAP = {
    "version": 1,
    "shards": 2,
    "blocks": [0, 1],
    "homes": [0, 1],
    "subjects": ["a"],
    "subject_homes": [1],
    "subjects_digest": "",
    "subject_parts": 0,
}


def test_a_shard_map_round_trips_and_answers_routes() -> None:
    shard_map = ShardMap.from_dict(MAP)
    assert ShardMap.from_dict(shard_map.to_dict()) == shard_map
    assert shard_map.blocks_of(1) == {1} and shard_map.subject_shards() == {"a": 1}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"shards": 0}, "1 to"),
        ({"shards": 5000}, "1 to"),
        ({"homes": [0]}, "one shard per block"),
        ({"subject_homes": []}, "one shard per block"),
        ({"homes": [0, 2]}, "does not have"),
        ({"subject_homes": [-1]}, "does not have"),
        ({"blocks": [0, "1"]}, "must be int"),
        ({"subject_parts": 2}, "need their digest"),
        ({"subjects_digest": "ab"}, "need their digest"),
    ],
)
def test_a_forged_shard_map_is_refused(change: dict[str, object], reason: str) -> None:
    with pytest.raises(WireFormatError, match=reason):
        ShardMap.from_dict({**MAP, **change})


@pytest.mark.parametrize("embedding", [b"", b"\0" * 7])
def test_a_face_without_whole_float64s_is_refused(embedding: bytes) -> None:
    with pytest.raises(WireFormatError, match="float64"):
        FaceProbe.from_dict({"box": None, "confidence": 1.0, "embedding": embedding})
