"""Attacks through per-face answers: forged faces from a trusted replica, crowds, stolen ids.

A malicious replica (its signing key is trusted) sends well-formed scores with
too many faces, a block scored twice, one honest face beside a tampered one, or
a claim turned into a search; a user probes with more faces than allowed or takes
another user's probe id first. Each gets an error event or an exception, never a
decision from the forged part (`tests/agents/trust.py` has the rig).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest

from agents.cloud.agent import CloudAgent
from cipherface import wire
from cipherface.crypto import Metric
from cipherface.exceptions import IntegrityError
from cipherface.gallery import encrypt_probe
from cipherface.gallery.packing import _SCORE_SCALE, _Seal
from cipherface.transport import REASON_HEADER, Delivery
from cipherface.wire.payloads import BlockScores
from tests.agents.conftest import Deployment
from tests.agents.trust import (
    Watch,
    _honest_block_scores,
    _people,
    _public,
    _result,
    _signed_by_replica,
    gallery_rig,
)
from tests.forging import ciphertext_of, resent


@pytest.fixture
async def one_face(deployment: Deployment) -> tuple[Deployment, Watch]:
    """The trust rig with every agent allowing one face per probe."""
    deployment.settings = replace(deployment.settings, max_faces=1)
    return await gallery_rig(deployment)


def _faces(
    deployment: Deployment,
    probe_id: str,
    faces: list[tuple[BlockScores, ...]],
    *,
    subject: str | None = None,
    request: str | None = None,
    replica: CloudAgent | None = None,
    timings: dict[str, float] | None = None,
) -> bytes:
    """Scores of several faces, signed by the trusted replica, fresh (not expired)."""
    message = wire.ScoresReady(
        probe_id=probe_id,
        subject=subject,
        faces=tuple(
            wire.FaceScores(box=(10 + 100 * i, 10, 80, 80), confidence=0.9, scores=blocks)
            for i, blocks in enumerate(faces)
        ),
        request=request or wire.request_digest(probe_id.encode()),
        submitted_at=time.time(),
        timings=timings or {},
    )
    if replica is None:
        return _signed_by_replica(deployment, message)
    return wire.encode(message, fingerprint=replica.keyring.fingerprint, signer=replica.signer)


def _refused(event: wire.VerificationEvent, why: str) -> None:
    assert event.error is not None and event.error.startswith("IntegrityError"), event.error
    assert why in event.error
    assert not event.verified and event.distance is None and event.faces == ()


async def test_scores_of_more_faces_than_allowed_are_refused_undecrypted(
    one_face: tuple[Deployment, Watch],
) -> None:
    """Hundreds of faces would cost on-prem a decryption and a fit each: refused whole."""
    deployment, watch = one_face
    honest = _honest_block_scores(deployment)
    await _result(deployment, _faces(deployment, "crowd", [(honest,), (honest,)]))
    _refused(await watch.event("crowd"), "2 faces scored, at most 1 per probe")


async def test_a_probe_with_more_faces_than_allowed_gets_an_error_event(
    one_face: tuple[Deployment, Watch], faces_dir: Path, tmp_path: Path
) -> None:
    """The cloud refuses the probe before searching it; the user hears why."""
    from tests.agents.test_faces import _compose

    deployment, watch = one_face
    pair = _compose(faces_dir, tmp_path, "pair.jpg", ("img5.jpg", 1.0), ("img53.jpg", 0.8))
    client = await deployment.client()
    event = await watch.event(await client.publish_probe(pair), timeout=300)
    assert event.error == (
        f"TooManyFacesError: probe {event.probe_id}: 2 faces, at most 1 per probe"
    )
    assert event.faces == () and event.distance is None


async def test_a_block_scored_twice_for_one_face_is_refused(rig: tuple[Deployment, Watch]) -> None:
    deployment, watch = rig
    honest = _honest_block_scores(deployment)
    await _result(deployment, _faces(deployment, "twice", [(honest, honest)]))
    _refused(await watch.event("twice"), "1 block(s) scored twice")


async def test_one_tampered_face_beside_an_honest_one_refuses_the_probe(
    rig: tuple[Deployment, Watch],
) -> None:
    """Face 0 honest (B verified), face 1 shifted towards a match: no face is answered."""
    deployment, watch = rig
    honest = _honest_block_scores(deployment)
    seal = _Seal(_public(deployment))
    ciphertext = ciphertext_of(seal, honest)
    shift = [0j] * seal.slots
    shift[0] = -0.03 + 0j  # A's position
    seal.evaluator.add_plain_inplace(ciphertext, seal.plain(shift, _SCORE_SCALE))
    shifted = resent(seal, honest, ciphertext)
    await _result(deployment, _faces(deployment, "mixed", [(honest,), (shifted,)]))
    _refused(await watch.event("mixed"), "one probe")


async def test_a_replicas_timings_reach_events_only_as_its_known_stages(
    rig: tuple[Deployment, Watch],
) -> None:
    """Thousands of made-up timing keys, or negative seconds, are not signed into events."""
    deployment, watch = rig
    honest = _honest_block_scores(deployment)
    junk = {f"stage-{i}": 1.0 for i in range(2000)} | {"embed": -5.0, "search": 0.25}
    await _result(deployment, _faces(deployment, "timed", [(honest,)], timings=junk))
    event = await watch.event("timed")
    assert event.verified and event.subject == "B"
    assert set(event.timings) == {"search", "decrypt", "total"}
    assert event.timings["search"] == 0.25


async def test_a_made_up_request_digest_is_dead_lettered_with_the_reason(
    rig: tuple[Deployment, Watch],
) -> None:
    """A replica's ``request`` becomes an AMQP message id (255 bytes at most) for a long
    probe id: 400 characters once made on-prem's publish fail with a ``TypeError``."""
    deployment, watch = rig
    rejected = wire.ProbeRejected(
        probe_id="L" * 300,
        subject=None,
        error="NoFaceError",
        reason="none",
        request="r" * 400,
        submitted_at=time.time(),
    )
    await _result(deployment, _signed_by_replica(deployment, rejected))
    dead = await watch.dead_letter(lambda d: "request digest" in str(d.headers[REASON_HEADER]))
    assert "WireFormatError: field 'rejected.request'" in str(dead.headers[REASON_HEADER])
    assert "L" * 300 not in watch.events


async def test_a_claim_turned_into_a_search_by_the_replica_is_not_a_verification(
    rig: tuple[Deployment, Watch],
) -> None:
    """The replica answers "is this A?" with B's honest 1:N scores: on-prem verifies B,
    and the client must not take that for A verified."""
    deployment, watch = rig
    honest = _honest_block_scores(deployment)  # B's face, against everyone
    replica = deployment.agents[1]
    assert isinstance(replica, CloudAgent)
    await deployment.stop(replica)  # the test plays it, with its signing key
    link = await deployment.link()
    probes: asyncio.Queue[Delivery] = asyncio.Queue()
    await link.consume(link.topology.probes, probes.put)
    client = await deployment.client()
    verify = asyncio.create_task(client.verify(b"any image", "A", timeout=60))
    probe = await asyncio.wait_for(probes.get(), 60)
    request = wire.decode(probe.body).message
    assert isinstance(request, wire.ProbeRequest) and request.subject == "A"
    forged = _faces(
        deployment,
        request.probe_id,
        [(honest,)],
        subject=None,
        request=wire.request_digest(probe.body),
        replica=replica,
    )
    await _result(deployment, forged)
    event = await watch.event(request.probe_id)
    assert event.verified and event.subject == "B" and event.mode == "1:N"  # on-prem's view
    with pytest.raises(IntegrityError, match="answers 1:N 'B', not the 1:1 claim 'A'"):
        await verify


async def test_a_stolen_probe_id_never_delivers_the_thiefs_decision(
    rig: tuple[Deployment, Watch],
) -> None:
    """A user takes the victim's (predictable) probe id first: the thief's probe is
    answered with a decision, the victim's with ``DuplicateProbeId``; the victim's
    `wait_for(probe_id)` returns its own event, not the thief's decision queued before."""
    deployment, watch = rig
    probe = encrypt_probe(_public(deployment), _people()["B"], Metric.COSINE)
    thief, victim = await deployment.client(), await deployment.client()
    async with victim.events() as stream:
        await thief.publish_encrypted_probe(probe, "B", probe_id="door-1-0001")
        assert (await watch.event("door-1-0001", 120)).verified  # the thief's decision
        await victim.publish_encrypted_probe(probe, "B", probe_id="door-1-0001")
        event = await stream.wait_for("door-1-0001", 120)
    assert event.error == "DuplicateProbeId: another probe already used this probe id"
    assert not event.verified and event.distance is None
