"""On-prem's view of the shards: the maps it accepts answers under, and each answer's check.

The gallery's blocks are spread over shards (`cipherface.gallery.shards`); a 1:N
probe is searched by every shard, a 1:1 claim by its subject's shard. On-prem
gathers one answer per shard and, before decrypting anything, checks what each
covers against what it shipped to that shard (`ShardRouter.merge`):

- every answer names the shard map version the probe was routed by: one on-prem
  knows (the active map, a pending one while blocks move, the previous one for
  `SHIP_GRACE` seconds after a move); an older one is an `IntegrityError`;
- a shard scores only its blocks (under a known map), each face the same blocks,
  each block at the version on-prem shipped; a block shipped to it within
  `SHIP_GRACE` may be missing or older (a replica installing it);
- every block of a shard that answered is covered: a missing one is an
  `IntegrityError` (today's review finding: never a silent answer from part of
  the gallery);
- a shard that did not answer by the deadline makes the answer *partial*: the
  event says so, with the fraction of templates searched.

A block two shards scored (a move in progress) is taken from its home under the
active map. The rest of the checks (each block's scores, the probe's norms) are
`cipherface.gallery.ranking`'s.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cipherface.exceptions import IntegrityError
from cipherface.wire.messages import ScoresReady
from cipherface.wire.payloads import FaceScores, ShardMap

__all__ = ["SHIP_GRACE", "Merged", "ShardRouter", "ShardView"]

#: Seconds after on-prem ships a block during which a shard's answer may lack it (or
#: hold its previous version), and after a move during which the previous map's
#: answers are still accepted.
SHIP_GRACE = 120.0


@dataclass(frozen=True, slots=True)
class ShardView:
    """One version of the shard map, as on-prem routes and checks by it."""

    version: int
    shards: int
    #: block -> shard
    homes: Mapping[int, int]
    #: subject -> shard (every subject, whatever the shard count)
    subjects: Mapping[str, int]

    @classmethod
    def of(cls, shard_map: ShardMap, subjects: Mapping[str, int]) -> ShardView:
        """A view of ``shard_map``; ``subjects`` from the book (the wire omits them at 1)."""
        homes = dict(zip(shard_map.blocks, shard_map.homes, strict=True))
        return cls(shard_map.version, shard_map.shards, homes, dict(subjects))

    def blocks_of(self, shard: int) -> frozenset[int]:
        """The blocks ``shard`` serves under this map."""
        return frozenset(b for b, s in self.homes.items() if s == shard)

    def expected(self, subject: str | None) -> frozenset[int]:
        """The shards a probe is searched on: its subject's, or every shard with blocks."""
        if subject is not None:
            home = self.subjects.get(subject)
            return frozenset() if home is None else frozenset({home})
        return frozenset(self.homes.values())


@dataclass(frozen=True, slots=True, kw_only=True)
class Merged:
    """The shards' answers as one probe's scores, and how much of the gallery they cover."""

    scores: ScoresReady
    #: False when a shard did not answer: ``searched`` of the templates were searched.
    partial: bool = False
    searched: float = 1.0


@dataclass(slots=True)
class ShardRouter:
    """The maps on-prem accepts answers under, and when it shipped each block to its shard."""

    grace: float = SHIP_GRACE
    active: ShardView | None = None
    pending: ShardView | None = None
    #: The map before the last move, and until when its answers are accepted.
    previous: tuple[ShardView, float] | None = None
    #: (key fingerprint, block, shard) -> when on-prem last shipped it to that shard.
    shipped_at: dict[tuple[str, int, int], float] = field(default_factory=dict)

    def update(self, active: ShardView, pending: ShardView | None) -> None:
        """The book's maps now; a new active version keeps the old one for `grace`."""
        if self.active is not None and self.active.version < active.version:
            self.previous = (self.active, time.time() + self.grace)
        self.active, self.pending = active, pending

    def shipped(self, fingerprint: str, block: int, shard: int) -> None:
        """On-prem publishes ``block`` to ``shard``: that shard (only) may lack it a while."""
        self.shipped_at[(fingerprint, block, shard)] = time.time()

    def views(self) -> list[ShardView]:
        """Every map on-prem accepts answers under now."""
        views = [v for v in (self.active, self.pending) if v is not None]
        if self.previous is not None and time.time() < self.previous[1]:
            views.append(self.previous[0])
        return views

    def view(self, version: int) -> ShardView:
        """The map of ``version``; `IntegrityError` for one on-prem no longer accepts."""
        for view in self.views():
            if view.version == version:
                return view
        known = sorted(v.version for v in self.views())
        raise IntegrityError(
            f"scores routed by shard map version {version}; on-prem accepts {known}"
        )

    def expected(self, result: ScoresReady) -> frozenset[int]:
        """The shards whose answers make ``result``'s probe whole (at least its own)."""
        return self.view(result.map_version).expected(result.subject) or frozenset({result.shard})

    def _fresh(self, fingerprint: str, block: int, shard: int, now: float) -> bool:
        return now < self.shipped_at.get((fingerprint, block, shard), 0.0) + self.grace

    def merge(
        self,
        answers: Mapping[int, ScoresReady],
        *,
        fingerprint: str,
        shipped: Callable[[int], tuple[int, int] | None],
        subject_blocks: Callable[[str], frozenset[int]],
    ) -> Merged:
        """One probe's scores from its shards' ``answers`` (shard -> whole answer).

        ``shipped(block)`` is (version, templates) of the block as on-prem last
        encrypted it (None: never); ``subject_blocks`` the blocks holding a subject.
        Raises `IntegrityError` for an answer that covers what its shard does not
        hold, or misses what it does.
        """
        first = next(iter(answers.values()))
        now = time.time()
        view = self.view(first.map_version)
        views = self.views()
        for shard, answer in answers.items():
            _agrees(first, answer)
            allowed = frozenset().union(*(v.blocks_of(shard) for v in views))
            for face in answer.faces:
                ids = [b.block_id for b in face.scores]
                if len(set(ids)) != len(ids):
                    twice = len(ids) - len(set(ids))
                    raise IntegrityError(f"shard {shard}: {twice} block(s) scored twice for a face")
                if set(ids) != {b.block_id for b in answer.faces[0].scores}:
                    raise IntegrityError(f"shard {shard} scored its faces on different blocks")
            for block in answer.faces[0].scores if answer.faces else ():
                # A block outside the shard's blocks under every known map is forged or
                # misrouted, however fresh: a move is known as the pending map.
                if block.block_id not in allowed:
                    home = view.homes.get(block.block_id)
                    raise IntegrityError(
                        f"shard {shard} scored block {block.block_id}, which is "
                        + (f"shard {home}'s" if home is not None else "not in the gallery")
                    )
                held = shipped(block.block_id)
                fresh = self._fresh(fingerprint, block.block_id, shard, now)
                if held is not None and held[0] != block.version and not fresh:
                    raise IntegrityError(
                        f"shard {shard} scored block {block.block_id} version {block.version}, "
                        f"on-prem shipped version {held[0]}"
                    )
        wanted = (
            subject_blocks(first.subject) if first.subject is not None else frozenset(view.homes)
        )
        wanted = frozenset(b for b in wanted if shipped(b) is not None)
        chosen = _choose(answers, self.active or view)
        covered = frozenset(chosen)
        for block in wanted - covered:
            home = view.homes.get(block, 0)
            if home in answers and not self._fresh(fingerprint, block, home, now):
                raise IntegrityError(f"shard {home}'s answer misses block {block}")
        # Each answer's faces by block, once (not a scan per block).
        by_block = {
            shard: [{b.block_id: b for b in face.scores} for face in answer.faces]
            for shard, answer in answers.items()
        }
        # What ranking will use: a block missing (a silent shard, or one just shipped)
        # or scored at another version than shipped (ranking skips it) is not searched.
        current = [
            b
            for b in wanted & covered
            if by_block[chosen[b]][0][b].version == shipped(b)[0]  # type: ignore[index]
        ]
        total = sum(shipped(b)[1] for b in wanted)  # type: ignore[index]
        searched = sum(shipped(b)[1] for b in current)  # type: ignore[index]
        faces = tuple(
            FaceScores(
                box=face.box,
                confidence=face.confidence,
                scores=tuple(by_block[chosen[b]][index][b] for b in sorted(chosen)),
            )
            for index, face in enumerate(first.faces)
        )
        scores = dataclasses.replace(first, faces=faces, part=0, parts=1)
        return Merged(
            scores=scores, partial=searched < total, searched=searched / total if total else 1.0
        )


def _agrees(first: ScoresReady, other: ScoresReady) -> None:
    """The shards answer one probe: the same faces, claim, norms and routing."""
    same = (
        other.subject == first.subject
        and other.submitted_at == first.submitted_at
        and other.probe_check == first.probe_check
        and other.map_version == first.map_version
        and [(f.box, f.confidence) for f in other.faces]
        == [(f.box, f.confidence) for f in first.faces]
    )
    if not same:
        raise IntegrityError(
            f"shard {other.shard}'s answer to probe {first.probe_id} disagrees with shard "
            f"{first.shard}'s (faces, claim or map version)"
        )


def _choose(answers: Mapping[int, ScoresReady], active: ShardView) -> dict[int, int]:
    """block -> the shard whose scores of it count: its home under the active map if
    that shard scored it (a block moving is scored by both), else the first."""
    chosen: dict[int, int] = {}
    for shard, answer in sorted(answers.items()):
        for block in answer.faces[0].scores if answer.faces else ():
            if block.block_id not in chosen or active.homes.get(block.block_id) == shard:
                chosen[block.block_id] = shard
    return chosen
