"""A probe's scores as parts under the message size limit, and their gathering.

One face's scores are about 64.5 KB per gallery block (n8192, compressed; an edge
probe's 131 KB), so a 1:N probe over more than about 64 blocks would not fit one
4 MiB message. The replica sends its
`ScoresReady` as ``parts`` messages, each carrying, for every face, the scores of
a consecutive range of blocks (and the whole probe's other fields), each signed on
its own. On-prem's `PartGatherer` puts them back together before anything is
decrypted, from parts that agree: same probe id, request digest, replica, key
fingerprint, parts count, subject and faces; no part and no block twice. A part
that disagrees raises `PartError` (dead-lettered with that reason) and changes
nothing held; the probe then completes from its genuine parts or times out.

An edge probe travels as pieces by dimension range (`cipherface.wire.pieces`),
each scored on its own, possibly by another replica; each piece's scores may
come in parts as above. `PieceGatherer` then puts the pieces of a probe
together, from pieces that agree: same probe id, request digest, key
fingerprint, pieces count, subject, dimensions and blocks scored (ids and
versions), no piece twice, no dimension twice; `check_cover` asks every
dimension to be in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cipherface.exceptions import PartError
from cipherface.wire.chunks import ENVELOPE_ALLOWANCE, pack, packed_size
from cipherface.wire.messages import ScoresReady
from cipherface.wire.payloads import FaceScores

__all__ = ["PartGatherer", "PieceGatherer", "check_cover", "split_scores"]

T = TypeVar("T")


def split_scores(ready: ScoresReady, limit: int) -> list[ScoresReady]:
    """``ready`` as parts whose messages each stay within ``limit`` bytes.

    Blocks are packed greedily in the order the faces list them (every face of a
    probe is scored on the same blocks); one part when everything fits.
    `MessageTooLargeError` if the probe's own fields and one block cannot fit.
    """
    whole = dataclasses.replace(ready, part=0, parts=1)
    fixed = packed_size([f.to_dict() | {"scores": []} for f in ready.faces]) + packed_size(
        None if ready.probe_check is None else ready.probe_check.to_dict()
    )
    budget = limit - ENVELOPE_ALLOWANCE - fixed - packed_size(dict(ready.timings))
    blocks = max((len(face.scores) for face in ready.faces), default=0)
    costs = [
        sum(packed_size(face.scores[i].to_dict()) for face in ready.faces if i < len(face.scores))
        for i in range(blocks)
    ]
    if sum(costs) <= budget:
        return [whole]
    ranges = pack(costs, budget, f"scores of a block of probe {ready.probe_id}")
    return [
        dataclasses.replace(
            ready,
            faces=tuple(
                dataclasses.replace(face, scores=face.scores[run.start : run.stop])
                for face in ready.faces
            ),
            part=number,
            parts=len(ranges),
        )
        for number, run in enumerate(ranges)
    ]


@dataclass(slots=True)
class _Gathering:
    first: ScoresReady
    parts: dict[int, ScoresReady] = field(default_factory=dict)
    #: Per face, the block ids held so far.
    blocks: list[set[int]] = field(default_factory=list)


class PartGatherer:
    """Collects the parts of each probe until one is whole; checks each against the others.

    Probes are keyed by (probe id, request digest, replica, key fingerprint): a part
    signed by another replica or under another key never joins a probe's parts.
    """

    def __init__(self) -> None:
        self._held: dict[tuple[str, ...], _Gathering] = {}

    def __len__(self) -> int:
        """Probes in gathering."""
        return len(self._held)

    @staticmethod
    def key(part: ScoresReady, signer: str, fingerprint: str) -> tuple[str, ...]:
        """What names one probe's parts (one piece's, for an edge probe in pieces)."""
        return (part.probe_id, part.request, signer, fingerprint, str(part.piece))

    def add(self, part: ScoresReady, signer: str, fingerprint: str) -> ScoresReady | None:
        """Keep a part; the whole probe's scores once every part is in.

        Raises `PartError` for a part that contradicts itself or the probe's other
        parts, leaving what was held unchanged.
        """
        name = f"part {part.part} of probe {part.probe_id}"
        if not 0 <= part.part < part.parts:
            raise PartError(f"{name}: not within its {part.parts} part(s)")
        key = self.key(part, signer, fingerprint)
        held = self._held.get(key) or _Gathering(first=part, blocks=[set() for _ in part.faces])
        first = held.first
        if _whole_fields(part) != _whole_fields(first):
            raise PartError(f"{name}: disagrees with the probe's other parts")
        if [(f.box, f.confidence) for f in part.faces] != [
            (f.box, f.confidence) for f in first.faces
        ]:
            raise PartError(f"{name}: other faces than the probe's other parts")
        if part.part in held.parts:
            if held.parts[part.part] == part:
                return None  # the broker's redelivery of a part held: nothing new
            raise PartError(f"{name}: held already, with other scores")
        ids = [[b.block_id for b in face.scores] for face in part.faces]
        for face_ids, seen in zip(ids, held.blocks, strict=True):
            if len(set(face_ids)) != len(face_ids) or seen.intersection(face_ids):
                raise PartError(f"{name}: scores a block twice")
        for face_ids, seen in zip(ids, held.blocks, strict=True):
            seen.update(face_ids)
        held.parts[part.part] = part
        if len(held.parts) < first.parts:
            self._held[key] = held
            return None
        self._held.pop(key, None)
        ordered = [held.parts[i] for i in range(first.parts)]
        faces = tuple(
            FaceScores(
                box=face.box,
                confidence=face.confidence,
                scores=tuple(b for p in ordered for b in p.faces[index].scores),
            )
            for index, face in enumerate(first.faces)
        )
        return dataclasses.replace(first, faces=faces, part=0, parts=1)

    def drop(self, key: tuple[str, ...]) -> tuple[ScoresReady, int] | None:
        """Forget a probe in gathering: its first part (to answer it) and parts held."""
        held = self._held.pop(key, None)
        return None if held is None else (held.first, len(held.parts))

    def forget(self, probe_id: str, request: str) -> int:
        """Forget the parts of a probe, every piece's and shard's (answered, or timed
        out): how many parts were held."""
        return sum(len(g.parts) for g in _forget(self._held, probe_id, request))


def _whole_fields(part: ScoresReady) -> tuple[object, ...]:
    """What every part of one probe's (piece's, shard's) scores repeats."""
    return (
        part.parts,
        part.subject,
        part.submitted_at,
        part.probe_check,
        part.pieces,
        part.dims_start,
        part.dims_stop,
        part.dimensions,
        part.shard,
        part.map_version,
    )


def _forget(held: dict[Any, T], probe_id: str, request: str) -> list[T]:
    """Remove and return what ``held`` keeps of one probe (keys start with its id, digest)."""
    return [held.pop(k) for k in [k for k in held if k[:2] == (probe_id, request)]]


def _blocks(scores: ScoresReady) -> list[list[tuple[int, int]]]:
    """Per face, the blocks scored and their versions, in block order."""
    return [sorted((b.block_id, b.version) for b in face.scores) for face in scores.faces]


@dataclass(slots=True)
class _Pieces:
    first: ScoresReady
    fingerprint: str
    pieces: dict[int, ScoresReady] = field(default_factory=dict)


class PieceGatherer:
    """Collects the pieces of each edge probe (each one whole: its parts gathered).

    Pieces are keyed by (probe id, request digest) only: any trusted replica may
    score any piece, and a piece under another key than the probe's other pieces
    is refused, not gathered apart.
    """

    def __init__(self) -> None:
        self._held: dict[tuple[str, str, int], _Pieces] = {}

    def __len__(self) -> int:
        """Probes in gathering."""
        return len(self._held)

    @staticmethod
    def key(piece: ScoresReady) -> tuple[str, str, int]:
        """What names one probe's pieces: from one shard (each shard answers every piece
        on its own blocks; the shards' sums are gathered apart, by on-prem)."""
        return (piece.probe_id, piece.request, piece.shard)

    def add(self, piece: ScoresReady, fingerprint: str) -> list[ScoresReady] | None:
        """Keep a piece; every piece of the probe, in dimension order, once all are in.

        Raises `PartError`, naming the probe, for a piece that contradicts itself or
        the probe's other pieces, leaving what was held unchanged. A piece held
        already with the same scores (a redelivery, or the same piece scored again
        by another replica) changes nothing.
        """
        name = f"piece {piece.piece} of probe {piece.probe_id}"
        start, stop = piece.dims_start, piece.dims_stop
        if not 0 <= piece.piece < piece.pieces:
            raise PartError(f"{name}: not within its {piece.pieces} piece(s)")
        if not 0 <= start < stop <= piece.dimensions:
            raise PartError(f"{name}: dimensions {start}..{stop - 1} of {piece.dimensions}")
        if piece.probe_check is None or (start and piece.probe_check.norm is not None):
            raise PartError(f"{name}: no norm proof, or the norm outside the first piece")
        if len(piece.faces) != 1 or piece.faces[0].box is not None:
            raise PartError(f"{name}: an edge probe is one face, without a box")
        key = self.key(piece)
        held = self._held.get(key) or _Pieces(first=piece, fingerprint=fingerprint)
        first = held.first
        if fingerprint != held.fingerprint:
            raise PartError(
                f"{name}: scored under key {fingerprint[:16]}, its other pieces under "
                f"{held.fingerprint[:16]}"
            )
        if (piece.pieces, piece.subject, piece.submitted_at, piece.dimensions) != (
            first.pieces,
            first.subject,
            first.submitted_at,
            first.dimensions,
        ):
            raise PartError(f"{name}: disagrees with the probe's other pieces")
        if _blocks(piece) != _blocks(first):
            raise PartError(f"{name}: other blocks or block versions than its other pieces")
        same = held.pieces.get(piece.piece)
        if same is not None:
            if dataclasses.replace(same, timings={}) == dataclasses.replace(piece, timings={}):
                return None  # redelivered, or scored twice: nothing new
            raise PartError(f"{name}: held already, with other scores (duplicate piece)")
        for other in held.pieces.values():
            if start < other.dims_stop and other.dims_start < stop:
                raise PartError(
                    f"{name}: dimensions {start}..{stop - 1} overlap those of piece {other.piece}"
                )
        held.pieces[piece.piece] = piece
        if len(held.pieces) < first.pieces:
            self._held[key] = held
            return None
        self._held.pop(key, None)
        return sorted(held.pieces.values(), key=lambda p: p.dims_start)

    def forget(self, probe_id: str, request: str) -> int:
        """Forget a probe's pieces, every shard's: how many were held."""
        return sum(len(p.pieces) for p in _forget(self._held, probe_id, request))


def check_cover(pieces: list[ScoresReady]) -> None:
    """`PartError` unless ``pieces`` (in dimension order, none overlapping) cover
    every dimension of the probe: every piece in, and still a dimension missing is
    a forged piece set, never summed into a decision."""
    covered = sum(p.dims_stop - p.dims_start for p in pieces)
    dimensions = pieces[0].dimensions
    if covered != dimensions:
        raise PartError(
            f"probe {pieces[0].probe_id}: its {len(pieces)} pieces cover {covered} of "
            f"{dimensions} dimensions"
        )
