"""A sharded map's subject list, sent in parts after the context that announces it.

With more than one shard a replica sends a 1:1 claim to its subject's shard alone,
so it needs every subject's shard. At about 16 B a subject that list outgrows one
message (4 MiB by default) near 250,000 subjects, long before a gallery needs its
shards. On-prem announces the list in the map instead (`ShardMap.subjects_digest`,
``subject_parts``) and sends it as `SubjectsPart` messages under the size limit,
each signed like the context; a replica routes by that map once every part is in
and the whole hashes to the digest announced (`SubjectList`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import msgpack

from cipherface.exceptions import SubjectsError
from cipherface.wire.chunks import ENVELOPE_ALLOWANCE, pack, packed_size
from cipherface.wire.messages import SubjectsPart
from cipherface.wire.payloads import ShardMap

__all__ = ["SubjectList", "split_subjects", "subjects_digest"]


def subjects_digest(subjects: Sequence[str], homes: Sequence[int]) -> str:
    """SHA-256 (hex) of a subject list with each subject's shard."""
    packed = msgpack.packb([list(subjects), list(homes)], use_bin_type=True)
    return hashlib.sha256(packed).hexdigest()


def split_subjects(shard_map: ShardMap, limit: int) -> tuple[ShardMap, list[SubjectsPart]]:
    """``shard_map`` announcing its subjects instead of carrying them, and the parts
    that carry them, each under ``limit`` bytes in its envelope. A map without
    subjects (one shard) comes back as it is, with no parts."""
    if not shard_map.subjects:
        return shard_map, []
    subjects, homes = shard_map.subjects, shard_map.subject_homes
    costs = [packed_size(s) + packed_size(h) for s, h in zip(subjects, homes, strict=True)]
    runs = pack(costs, limit - ENVELOPE_ALLOWANCE, "a subject")
    digest = subjects_digest(subjects, homes)
    parts = [
        SubjectsPart(
            digest=digest,
            part=index,
            parts=len(runs),
            subjects=subjects[run.start : run.stop],
            subject_homes=homes[run.start : run.stop],
        )
        for index, run in enumerate(runs)
    ]
    announced = dataclasses.replace(
        shard_map, subjects=(), subject_homes=(), subjects_digest=digest, subject_parts=len(runs)
    )
    return announced, parts


class SubjectList:
    """A replica's assembly of the subject lists its maps announce, held by digest
    for the ``keep`` most recent digests only (an older list's parts that never
    completed are dropped with it)."""

    def __init__(self, *, keep: int = 2) -> None:
        self._held: dict[str, dict[int, SubjectsPart]] = {}
        self._keep = keep

    def add(self, part: SubjectsPart) -> None:
        """Hold a part; `SubjectsError` for one that disagrees with its list's others
        (a part of another split of the list starts the list over)."""
        name = f"subjects part {part.part} of {part.parts}"
        if not 0 <= part.part < part.parts:
            raise SubjectsError(f"{name}: out of range")
        if len(part.subjects) != len(part.subject_homes):
            raise SubjectsError(f"{name}: {len(part.subjects)} subjects but not as many shards")
        held = self._held.get(part.digest, {})
        if next(iter(held.values()), part).parts != part.parts:
            # The same list split anew (on-prem restarted with another message cap):
            # the parts held are of the old split, which will not be sent again.
            held = {}
        if held.get(part.part, part) != part:
            raise SubjectsError(f"{name}: differs from the part held")
        held[part.part] = part
        self._held.pop(part.digest, None)
        self._held[part.digest] = held  # the most recent last
        while len(self._held) > self._keep:
            del self._held[next(iter(self._held))]

    def join(self, announced: ShardMap) -> ShardMap | None:
        """``announced`` with its subjects once every part is held (then let go), None
        while some are missing; `SubjectsError` if the parts do not make its list."""
        digest = announced.subjects_digest
        held = self._held.get(digest, {})
        if len(held) < announced.subject_parts:
            return None
        del self._held[digest]
        ordered = [held[index] for index in sorted(held)]
        if len(ordered) != announced.subject_parts:
            raise SubjectsError(
                f"{len(ordered)} parts of a list announced in {announced.subject_parts}"
            )
        subjects = tuple(s for part in ordered for s in part.subjects)
        homes = tuple(h for part in ordered for h in part.subject_homes)
        if subjects_digest(subjects, homes) != digest:
            raise SubjectsError(f"the subject parts do not hash to the digest {digest[:12]}")
        if not all(0 <= home < announced.shards for home in homes):
            raise SubjectsError("a subject part names a shard the map does not have")
        return dataclasses.replace(announced, subjects=subjects, subject_homes=homes)
