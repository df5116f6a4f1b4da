"""A probe's scores over the message size limit travel in parts, gathered by on-prem.

End to end (in-process broker and RabbitMQ) with the smallest cap `Settings`
allows, 1 MiB: a gallery of three blocks and a probe image of four faces make
about 1.5 MiB of scores, sent as several parts and answered by one event. Then
what a malicious replica (a trusted replica's key) can do with parts: duplicate
or contradict them, or never send them all; each is dead-lettered or answered
with an error event, never a decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from agents.cloud.agent import CloudAgent
from cipherface import wire
from cipherface.embedding import Face
from cipherface.signing import TrustStore
from cipherface.transport import REASON_HEADER
from tests.agents.conftest import Deployment
from tests.agents.trust import (
    Watch,
    _honest_block_scores,
    _result,
    _signed_by_replica,
)
from tests.rabbitnode import RabbitNode

CAP = 1024 * 1024
#: Six faces' compressed scores of three blocks (6 x 3 x 64.5 KB) pass 1 MiB.
FACES = 6


class FourFaces:
    """Stands in for DeepFace: an "image" names a subject; its faces are that subject's
    vector and strangers', so one probe's scores are `FACES` faces' worth."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors
        self.strangers = np.random.default_rng(3).normal(size=(FACES - 1, 128))

    def close(self) -> None:
        """Nothing to release (a replica closes its embedder when it stops)."""

    def embed(self, image: bytes, *, name: str | None = None) -> list[Face]:
        faces = [self.vectors[image.decode()], *self.strangers]
        return [
            Face(
                embedding=vector,
                facial_area={"x": 10 * i, "y": 0, "w": 9, "h": 9},
                confidence=1.0,
            )
            for i, vector in enumerate(faces)
        ]


async def test_scores_over_the_cap_arrive_in_parts_and_decide_once(
    deployment: Deployment,
) -> None:
    deployment.settings = dataclasses.replace(deployment.settings, max_message_size=CAP)
    rng = np.random.default_rng(5)
    onprem = await deployment.onprem()
    capacity = onprem.book.capacity
    # Two full blocks and a third holding the subject probed.
    onprem.book.add_many((f"s{i}", rng.normal(size=128), f"t{i}") for i in range(2 * capacity))
    bob = rng.normal(size=128)
    onprem.book.add("bob", bob, template_id="t-bob")
    settings = deployment.settings.override(replica="r1")
    cloud = CloudAgent(settings, await deployment.link(CAP))
    TrustStore(settings.trust_store_path).add("r1", cloud.signer.verify_key)
    cloud.embedder = FourFaces({"bob": bob + rng.normal(scale=0.01, size=128)})  # type: ignore[assignment]
    sent: list[int] = []
    send = cloud.transport.send

    async def counting(queue: str, body: bytes, **kwargs: object) -> None:
        sent.append(len(body))
        await send(queue, body, **kwargs)  # type: ignore[arg-type]

    cloud.transport.send = counting  # type: ignore[method-assign]
    await cloud.start()
    deployment.agents.append(cloud)
    await asyncio.wait_for(cloud.ready.wait(), 300)
    assert len(cloud.gallery or ()) == 2 * capacity + 1
    client = await deployment.client()
    async with client.events() as stream:
        event = await stream.wait_for(await client.publish_probe(b"bob"), 300)
    assert event.error is None and event.verified and event.subject == "bob", event
    assert len(event.faces) == FACES and event.face == 0
    parts = [size for size in sent if size > 64 * 1024]
    assert len(parts) >= 2 and max(parts) <= CAP, sent
    assert sum(parts) > CAP  # would not have fit one message


def _parts(deployment: Deployment, probe_id: str, count: int) -> list[wire.ScoresReady]:
    """A probe's honest scores (one block) as ``count`` parts; the first holds the block."""
    honest = _honest_block_scores(deployment)
    now = time.time()
    return [
        wire.ScoresReady(
            probe_id=probe_id,
            subject=None,
            faces=(wire.FaceScores(box=None, confidence=1.0, scores=(honest,) if i == 0 else ()),),
            request=wire.request_digest(probe_id.encode()),
            submitted_at=now,
            timings={},
            part=i,
            parts=count,
        )
        for i in range(count)
    ]


async def test_honest_parts_of_a_probe_are_gathered_into_one_decision(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, watch = rig
    for part in reversed(_parts(deployment, "parts-ok", 3)):
        await _result(deployment, _signed_by_replica(deployment, part))
    event = await watch.event("parts-ok")
    assert event.error is None and event.subject == "B" and event.verified, event


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"part": 0}, "held already"),  # the same part again, other content
        ({"parts": 3}, "disagrees"),
        ({"part": 2}, "not within"),
        ("block", "a block twice"),
    ],
)
async def test_a_forged_part_is_dead_lettered_and_the_probe_times_out_with_an_error(
    rig: tuple[Deployment, Watch], change: object, reason: str
) -> None:
    deployment, watch = rig
    onprem = deployment.agents[0]
    onprem.gathering.timeout = 3.0  # type: ignore[union-attr]
    probe_id = f"forged-{reason.split()[0]}"
    first, second = _parts(deployment, probe_id, 2)
    if change == "block":
        forged = dataclasses.replace(second, faces=first.faces)
    else:
        forged = dataclasses.replace(second, **change)  # type: ignore[arg-type]
    await _result(deployment, _signed_by_replica(deployment, first))
    await _result(deployment, _signed_by_replica(deployment, forged))
    dead = await watch.dead_letter(lambda d: reason in str(d.headers.get(REASON_HEADER)))
    assert str(dead.headers[REASON_HEADER]).startswith("PartError")
    event = await watch.event(probe_id)
    assert event.error and event.error.startswith("IncompleteScores"), event
    assert not event.verified and event.distance is None and not event.faces


async def test_more_parts_than_onprem_can_hold_get_an_error_event_at_once(
    rig: tuple[Deployment, Watch],
) -> None:
    deployment, watch = rig
    window = deployment.agents[0].gathering.window  # type: ignore[union-attr]
    first = _parts(deployment, "too-many", window)[0]
    await _result(deployment, _signed_by_replica(deployment, first))
    event = await watch.event("too-many")
    assert event.error and event.error.startswith("IncompleteScores"), event
    assert not event.verified and event.distance is None


async def test_parts_held_when_onprem_stops_are_answered_by_the_next_onprem(
    rig: tuple[Deployment, Watch],
) -> None:
    """Held parts are unacked: a stop (or a crash) mid-gather sends them back to the queue."""
    deployment, watch = rig
    first, second = (_signed_by_replica(deployment, p) for p in _parts(deployment, "restart", 2))
    await _result(deployment, first)
    onprem = deployment.agents[0]
    while not len(onprem.gathering):  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
    await deployment.stop(onprem)
    await deployment.onprem()
    await _result(deployment, second)
    event = await watch.event("restart")
    assert event.error is None and event.subject == "B" and event.verified, event


class ManyFaces(FourFaces):
    """`FourFaces` with ``count`` faces: the subject's and ``count - 1`` strangers'."""

    def __init__(self, vectors: dict[str, np.ndarray], count: int) -> None:
        super().__init__(vectors)
        self.strangers = np.random.default_rng(4).normal(size=(count - 1, 128))


async def _many_faces_probe(
    deployment: Deployment, *, cap: int, faces: int, blocks: int = 1, prefetch: int = 2
) -> wire.VerificationEvent:
    """``blocks`` blocks; a probe of ``faces`` faces (the first, "bob"), every party at ``cap``."""
    deployment.settings = dataclasses.replace(
        deployment.settings, max_message_size=cap, max_faces=faces, prefetch=prefetch
    )
    rng = np.random.default_rng(6)
    onprem = await deployment.onprem()
    bob = rng.normal(size=128)
    filler = (blocks - 1) * onprem.book.capacity + 16
    onprem.book.add_many((f"s{i}", rng.normal(size=128), f"t{i}") for i in range(filler))
    onprem.book.add("bob", bob, template_id="t-bob")
    if blocks > 1:  # on-prem sizes its results window at start, from the book
        await deployment.stop(onprem)
        await deployment.onprem()
    settings = deployment.settings.override(replica="r1")
    cloud = CloudAgent(settings, await deployment.link(cap))
    TrustStore(settings.trust_store_path).add("r1", cloud.signer.verify_key)
    cloud.embedder = ManyFaces({"bob": bob + rng.normal(scale=0.01, size=128)}, faces)  # type: ignore[assignment]
    await cloud.start()
    deployment.agents.append(cloud)
    await asyncio.wait_for(cloud.ready.wait(), 300)
    client = await deployment.client()
    async with client.events() as stream:
        return await stream.wait_for(await client.publish_probe(b"bob"), 300)


async def test_one_blocks_scores_of_too_many_faces_for_the_cap_get_an_error_event(
    deployment: Deployment,
) -> None:
    # 17 faces x 64.5 KB of one block's compressed scores > 1 MiB: no part can hold them.
    event = await _many_faces_probe(deployment, cap=CAP, faces=17)
    assert event.error is not None and event.error.startswith("MessageTooLargeError"), event
    assert event.distance is None and not event.faces


@pytest.mark.parametrize("compress", [True, False])
async def test_a_replica_compresses_scores_unless_told_not_to(
    deployment: Deployment, compress: bool
) -> None:
    """9 faces of one block: 9 x 64.5 KB compressed fit a 1 MiB part; 9 x 131 KB as SEAL
    writes them (``CIPHERFACE_COMPRESS_SCORES=false``) do not."""
    deployment.settings = dataclasses.replace(deployment.settings, compress_scores=compress)
    event = await _many_faces_probe(deployment, cap=CAP, faces=9)
    if compress:
        assert event.error is None and event.verified and event.subject == "bob", event
    else:
        assert event.error is not None and event.error.startswith("MessageTooLargeError"), event


async def test_onprem_reads_scores_up_to_its_configured_cap_not_the_default(
    deployment: Deployment, tmp_path: Path
) -> None:
    # 80 faces x 64.5 KB: one part of ~5.2 MB, over the 4 MiB default, under an 8 MiB cap.
    with contextlib.ExitStack() as stack:
        if deployment.url:
            # The shared broker refuses messages over 4 MiB in CI (.ci/run): a private
            # node that takes 16 MiB stands in for a deployment configured for more.
            node = stack.enter_context(
                RabbitNode(tmp_path / "rabbit", config=[f"max_message_size = {16 * CAP}"])
            )
            deployment.url = node.amqp_url()
        try:
            event = await _many_faces_probe(deployment, cap=8 * CAP, faces=80)
        finally:
            await deployment.close()  # before its node stops
    assert event.error is None and event.verified and event.subject == "bob", event
    assert len(event.faces) == 80 and event.face == 0
