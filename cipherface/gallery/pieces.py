"""On-prem: an edge probe's pieces, summed into the whole probe's scores before decryption.

A score is a sum over dimensions, so the pieces' scores (`cipherface.wire.pieces`)
add up to the whole probe's, and so do the norm proofs ``N1`` and ``N2``
(`cipherface.gallery.integrity`). On-prem adds the *ciphertexts* and decrypts the
total only, rather than decrypting each piece and adding the values: a partial
sum has no range to check (it is no distance), so decrypting it would hand a
replica a decryption of a ciphertext nothing vouches for; the total is what the
whole probe would have given, and passes the same checks (shape, scale, range,
consistency fit) before anything is decrypted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from cipherface.crypto import Keyring
from cipherface.exceptions import IntegrityError
from cipherface.gallery.packing import _VALUE_SCALE, _Seal
from cipherface.wire.messages import ScoresReady
from cipherface.wire.payloads import BlockScores, FaceScores, ProbeCheck
from cipherface.wire.pieces import probe_pieces

__all__ = ["edge_pieces", "sum_pieces"]

#: Components of what a piece sends: products of two ciphertexts, left unrelinearised.
_PRODUCT = 3


def edge_pieces(keyring: Keyring, dimensions: int, limit: int) -> int:
    """How many pieces an edge probe of ``dimensions`` travels in under ``limit`` bytes."""
    seal = _Seal(keyring)
    column = len(seal.encrypt_public(0.0, _VALUE_SCALE))
    return probe_pieces(dimensions, column, limit, norm_bytes=column)


def _total(seal: _Seal, ciphertexts: Sequence[bytes], what: str) -> bytes:
    """The sum of the pieces' ciphertexts, each checked to be a product first."""
    total: Any = None
    for data in ciphertexts:
        try:
            term = seal.load_checked(data, size=_PRODUCT)
        except IntegrityError as exc:
            raise IntegrityError(f"{what}: {exc}") from None
        if total is None:
            total = term
        else:
            seal.evaluator.add_inplace(total, term)
    return seal.dump(total)


def sum_pieces(keyring: Keyring, pieces: Sequence[ScoresReady]) -> ScoresReady:
    """One `ScoresReady` for the whole probe from its pieces' (gathered and checked
    by `cipherface.wire.PieceGatherer`: same blocks, one face, every dimension once).

    `IntegrityError` if a piece's scores or proofs are not ciphertext products.
    """
    seal = _Seal(keyring)
    first = pieces[0]
    name = f"probe {first.probe_id}"
    by_block = [{b.block_id: b.scores for b in p.faces[0].scores} for p in pieces]
    scores = tuple(
        BlockScores(
            block_id=block.block_id,
            version=block.version,
            scores=_total(
                seal, [held[block.block_id] for held in by_block], f"{name}, block {block.block_id}"
            ),
        )
        for block in first.faces[0].scores
    )
    checks = [p.probe_check for p in pieces if p.probe_check is not None]
    check = ProbeCheck(
        squares=_total(seal, [c.squares for c in checks], f"{name}, its norm proof"),
        norms=_total(seal, [c.norms for c in checks], f"{name}, its norm proof"),
        norm=next(
            (p.probe_check.norm for p in pieces if p.dims_start == 0 and p.probe_check), None
        ),
    )
    timings: dict[str, float] = {}
    for piece in pieces:
        for stage, seconds in piece.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
    face = FaceScores(box=None, confidence=first.faces[0].confidence, scores=scores)
    return dataclasses.replace(
        first,
        faces=(face,),
        probe_check=check,
        timings=timings,
        part=0,
        parts=1,
        piece=0,
        pieces=1,
        dims_start=0,
        dims_stop=first.dimensions,
    )
