"""An edge probe's pieces at on-prem: honest ones make one decision; a forged or
incomplete set of pieces gets an error event naming the probe, never a decision.

The pieces are what a trusted replica (its signing key) sends: honest partial
scores of person B's edge probe, computed by the rig's replica, then forged one
way or another. On the in-process broker and on RabbitMQ.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from agents.cloud.probes import scores_of
from cipherface import wire
from cipherface.gallery.integrity import prove_probe
from cipherface.transport import REASON_HEADER
from tests.agents.conftest import Deployment
from tests.agents.trust import Watch, _edge_probe, _people, _public, _result, _signed_by_replica

CAP = 4 * 1024 * 1024


def _pieces(deployment: Deployment, probe_id: str) -> list[wire.ScoresReady]:
    """B's edge probe (cosine weights -b) in pieces under 4 MiB, each scored as a replica does."""
    cloud = deployment.agents[1]
    probe = _edge_probe(_public(deployment), [-float(x) for x in _people()["B"]])
    request = wire.EncryptedProbeRequest(
        probe_id=probe_id, probe=probe, subject=None, submitted_at=time.time()
    )
    out = []
    for part in wire.split_probe(request, CAP):
        piece = wire.piece_probe(part)
        scores = cloud.gallery.search(piece, start=part.start)  # type: ignore[union-attr]
        check = prove_probe(cloud.keyring, cloud._edge_keys, piece)  # type: ignore[union-attr]
        face = wire.FaceScores(box=None, confidence=1.0, scores=tuple(scores))
        out.append(scores_of(part, (face,), check, {"search": 0.01}, part.request))
    return out


async def _send(
    deployment: Deployment, pieces: list[wire.ScoresReady], fingerprint: str | None = None
) -> None:
    for piece in pieces:
        await _result(deployment, _signed_by_replica(deployment, piece, fingerprint))


async def test_honest_pieces_in_any_order_make_one_decision(rig: tuple[Deployment, Watch]) -> None:
    deployment, watch = rig
    pieces = _pieces(deployment, "pieces-ok")
    assert len(pieces) == 5
    # Out of order, one piece delivered twice (a redelivery): one event, B verified.
    await _send(deployment, [pieces[3], *reversed(pieces)])
    event = await watch.event("pieces-ok")
    assert event.error is None and event.subject == "B" and event.verified, event
    assert event.request == pieces[0].request


def _other_version(piece: wire.ScoresReady) -> wire.ScoresReady:
    [face] = piece.faces
    block = dataclasses.replace(face.scores[0], version=face.scores[0].version + 1)
    return dataclasses.replace(piece, faces=(dataclasses.replace(face, scores=(block,)),))


def _other_scores(piece: wire.ScoresReady, other: wire.ScoresReady) -> wire.ScoresReady:
    return dataclasses.replace(piece, faces=other.faces)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("overlap", "overlap those of piece 0"),
        ("version", "other blocks or block versions"),
        ("duplicate", "duplicate piece"),
        ("fingerprint", "scored under key"),
    ],
)
async def test_a_forged_piece_is_dead_lettered_and_the_probe_gets_an_error_event(
    rig: tuple[Deployment, Watch], case: str, reason: str
) -> None:
    deployment, watch = rig
    deployment.agents[0].gathering.timeout = 3.0  # type: ignore[union-attr]
    probe_id = f"forged-piece-{case}"
    first, second, *_ = _pieces(deployment, probe_id)
    await _send(deployment, [first])
    if case == "overlap":
        await _send(deployment, [dataclasses.replace(second, dims_start=second.dims_start - 1)])
    elif case == "version":
        await _send(deployment, [_other_version(second)])
    elif case == "duplicate":
        await _send(deployment, [_other_scores(dataclasses.replace(second, piece=0), second)])
    else:
        await _send(deployment, [second], fingerprint="f" * 64)
    dead = await watch.dead_letter(lambda d: reason in str(d.headers.get(REASON_HEADER)))
    assert f"of probe {probe_id}" in str(dead.headers[REASON_HEADER])
    assert str(dead.headers[REASON_HEADER]).startswith("PartError")
    event = await watch.event(probe_id)
    assert event.error and event.error.startswith("IncompleteScores"), event
    assert not event.verified and event.distance is None and not event.faces


async def test_a_missing_piece_gets_an_error_event_at_the_timeout(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, watch = rig
    deployment.agents[0].gathering.timeout = 3.0  # type: ignore[union-attr]
    pieces = _pieces(deployment, "piece-missing")
    await _send(deployment, pieces[:2] + pieces[3:])
    event = await watch.event("piece-missing")
    assert event.error == "IncompleteScores: 4 of 5 pieces within 3s", event
    assert not event.verified and event.distance is None


async def test_pieces_that_leave_dimensions_out_get_an_error_event_at_once(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, watch = rig
    pieces = _pieces(deployment, "piece-gap")
    # Every piece in, but the last one claims to stop short: 127 of 128 dimensions.
    pieces[-1] = dataclasses.replace(pieces[-1], dims_stop=pieces[-1].dims_stop - 1)
    await _send(deployment, pieces)
    event = await watch.event("piece-gap")
    assert event.error and "pieces cover 127 of 128 dimensions" in event.error, event
    assert event.error.startswith("IncompleteScores") and not event.verified


async def test_a_piece_missing_parts_gets_an_error_event_at_the_timeout(
    rig: tuple[Deployment, Watch],
) -> None:
    """No piece ever whole (one part of two in): the handler holding it still answers."""
    deployment, watch = rig
    deployment.agents[0].gathering.timeout = 3.0  # type: ignore[union-attr]
    first = _pieces(deployment, "piece-parts-missing")[0]
    await _send(deployment, [dataclasses.replace(first, part=0, parts=2)])
    event = await watch.event("piece-parts-missing")
    assert event.error == "IncompleteScores: 0 of 5 pieces within 3s", event
