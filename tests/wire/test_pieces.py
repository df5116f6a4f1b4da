"""An edge probe split by dimension range under the size limit, and its pieces gathered
(`cipherface.wire.pieces`, `cipherface.wire.parts.PieceGatherer`): every way a set of
pieces can fail to form one probe is refused, naming the probe."""

from __future__ import annotations

import dataclasses

import pytest

from cipherface import wire
from cipherface.exceptions import PartError, WireFormatError
from cipherface.wire.payloads import BlockScores, EncryptedProbe, ProbeCheck

CAP = 4 * 1024 * 1024
#: A public-key ciphertext at the lowest level (n8192), as the edge makes one per dimension.
COLUMN = 131_177


def _request(dimensions: int, norm: bool = False) -> wire.EncryptedProbeRequest:
    probe = EncryptedProbe(
        fingerprint="f" * 64,
        metric="euclidean" if norm else "cosine",
        dimensions=dimensions,
        columns=tuple(bytes([j % 256]) * COLUMN for j in range(dimensions)),
        norm=b"n" * COLUMN if norm else None,
    )
    return wire.EncryptedProbeRequest(probe_id="edge-1", probe=probe, subject=None)


@pytest.mark.parametrize(("dimensions", "count"), [(128, 5), (512, 17)])
def test_split_probe_keeps_every_piece_under_the_cap(dimensions: int, count: int) -> None:
    request = _request(dimensions, norm=True)
    pieces = wire.split_probe(request, CAP)
    sizes = [len(wire.encode(p, fingerprint="f" * 64)) for p in pieces]
    assert len(pieces) == count == wire.probe_pieces(dimensions, COLUMN, CAP, COLUMN)
    assert max(sizes) <= CAP
    assert [p.piece for p in pieces] == list(range(count))
    assert {p.pieces for p in pieces} == {count}
    assert {p.request for p in pieces} == {wire.probe_digest(request)}
    assert [c for p in pieces for c in p.columns] == list(request.probe.columns)
    assert pieces[0].norm is not None and all(p.norm is None for p in pieces[1:])
    assert [p.start for p in pieces] == [
        0,
        *[sum(len(q.columns) for q in pieces[:i]) for i in range(1, count)],
    ]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"piece": 5}, "not within"),
        ({"start": 120}, r"dimensions 120\.\.1[0-9]{2} of 128"),
        ({"columns": ()}, "dimensions"),
        ({"norm": b"n", "start": 27}, "only the piece starting at dimension 0"),
    ],
)
def test_a_piece_no_edge_makes_is_refused_by_the_replica(
    change: dict[str, object], reason: str
) -> None:
    piece = wire.split_probe(_request(128), CAP)[1]
    with pytest.raises(WireFormatError, match=f"piece .* of probe edge-1: .*{reason}"):
        wire.piece_probe(dataclasses.replace(piece, **change))  # type: ignore[arg-type]


def _scored(count: int = 4, dimensions: int = 128) -> list[wire.ScoresReady]:
    """Each piece's scores as replicas send them (one block, one face, no box)."""
    step = dimensions // count
    return [
        wire.ScoresReady(
            probe_id="edge-1",
            subject=None,
            faces=(
                wire.FaceScores(
                    box=None,
                    confidence=1.0,
                    scores=(BlockScores(block_id=0, version=2, scores=bytes([i]) * 8),),
                ),
            ),
            request="0" * 32,
            submitted_at=1.0,
            timings={"search": 0.1},
            probe_check=ProbeCheck(squares=b"s", norms=b"n", norm=None),
            piece=i,
            pieces=count,
            dims_start=i * step,
            dims_stop=(i + 1) * step,
            dimensions=dimensions,
        )
        for i in range(count)
    ]


def test_honest_pieces_are_gathered_in_dimension_order_from_any_replica() -> None:
    gatherer = wire.PieceGatherer()
    pieces = _scored()
    results = [gatherer.add(p, "f") for p in reversed(pieces)]
    assert results[:-1] == [None] * 3 and results[-1] == pieces
    wire.check_cover(pieces)
    assert len(gatherer) == 0


def test_a_piece_delivered_again_or_scored_again_changes_nothing() -> None:
    gatherer = wire.PieceGatherer()
    first, *rest = _scored()
    assert gatherer.add(first, "f") is None
    again = dataclasses.replace(first, timings={"search": 9.0})  # another replica's timing
    assert gatherer.add(again, "f") is None
    assert [gatherer.add(p, "f") for p in rest][-1] is not None


def _other_version(piece: wire.ScoresReady) -> wire.ScoresReady:
    [face] = piece.faces
    block = dataclasses.replace(face.scores[0], version=3)
    return dataclasses.replace(piece, faces=(dataclasses.replace(face, scores=(block,)),))


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (lambda p: dataclasses.replace(p, dims_start=20), "overlap those of piece 0"),
        (_other_version, "other blocks or block versions"),
        (lambda p: dataclasses.replace(p, piece=0), "duplicate piece"),
        (lambda p: dataclasses.replace(p, pieces=5), "disagrees"),
        (lambda p: dataclasses.replace(p, dimensions=512, dims_stop=500), "disagrees"),
        (lambda p: dataclasses.replace(p, dims_stop=p.dims_start), "dimensions"),
        (lambda p: dataclasses.replace(p, probe_check=None), "no norm proof"),
        (
            lambda p: dataclasses.replace(
                p, probe_check=ProbeCheck(squares=b"", norms=b"", norm=b"n")
            ),
            "the norm outside the first piece",
        ),
        (
            lambda p: dataclasses.replace(
                p, faces=(dataclasses.replace(p.faces[0], box=(0, 0, 1, 1)),)
            ),
            "one face, without a box",
        ),
    ],
)
def test_a_forged_piece_is_refused_naming_the_probe_and_changes_nothing(
    forge: object, reason: str
) -> None:
    gatherer = wire.PieceGatherer()
    first, second, *rest = _scored()
    gatherer.add(first, "f")
    with pytest.raises(PartError, match=f"piece \\d of probe edge-1: .*{reason}"):
        gatherer.add(forge(second), "f")  # type: ignore[operator]
    # Nothing held changed: the genuine pieces still complete the probe.
    assert [gatherer.add(p, "f") for p in (second, *rest)][-1] is not None


def test_a_piece_under_another_key_is_refused_not_gathered_apart() -> None:
    gatherer = wire.PieceGatherer()
    first, second, *_ = _scored()
    gatherer.add(first, "f")
    with pytest.raises(PartError, match="piece 1 of probe edge-1: scored under key"):
        gatherer.add(second, "g")


def test_pieces_that_leave_a_dimension_out_are_no_probe() -> None:
    pieces = _scored()
    pieces[3] = dataclasses.replace(pieces[3], dims_stop=127)
    gatherer = wire.PieceGatherer()
    [whole] = [r for r in (gatherer.add(p, "f") for p in pieces) if r is not None]
    with pytest.raises(PartError, match="probe edge-1: its 4 pieces cover 127 of 128"):
        wire.check_cover(whole)
