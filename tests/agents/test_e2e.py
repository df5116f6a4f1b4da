"""End to end with real photos (Dlib): enroll, probe, exactly one event per probe.

Every test runs twice: on the in-process broker and on RabbitMQ.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from agents.cloud.agent import CloudAgent
from cipherface import wire
from cipherface.exceptions import ProbeTimeout
from cipherface.transport import REASON_HEADER, Delivery
from tests.agents.conftest import Deployment

pytestmark = pytest.mark.slow

#: Groups enrolled in these tests (two photos each); G05 plays the stranger.
ENROLLED = ("G01", "G02", "G03")
STRANGER = "G05"


def _enroll_folder(tmp: Path, faces_dir: Path, groups: dict[str, list[str]]) -> Path:
    """``tmp/<group>/<photo>`` for the first two photos of each enrolled group."""
    root = tmp / "enroll"
    for group in ENROLLED:
        (root / group).mkdir(parents=True)
        for name in groups[group][:2]:
            (root / group / name).symlink_to(faces_dir / name)
    return root


async def _collect(
    stream: object, count: int, *, settle: float = 1.0
) -> list[wire.VerificationEvent]:
    """Wait for ``count`` events, then a little longer to catch any duplicate."""
    events: list[wire.VerificationEvent] = []
    queue = stream._queue  # type: ignore[attr-defined]

    async def take(n: int) -> None:
        for _ in range(n):
            events.append(await queue.get())

    await asyncio.wait_for(take(count), timeout=180)
    await asyncio.sleep(settle)
    while not queue.empty():
        events.append(queue.get_nowait())
    return events


@pytest.fixture
async def enrolled(
    deployment: Deployment, tmp_path: Path, faces_dir: Path, identity_groups: dict[str, list[str]]
) -> Deployment:
    """On-prem and one cloud replica running, three groups enrolled."""
    onprem = await deployment.onprem()
    report = await onprem.enroll(
        _enroll_folder(tmp_path, faces_dir, identity_groups), progress=False
    )
    assert report.enrolled == 2 * len(ENROLLED), report.skipped
    cloud = await deployment.cloud()
    await asyncio.wait_for(cloud.ready.wait(), 60)
    return deployment


async def test_known_stranger_and_identification(
    enrolled: Deployment, faces_dir: Path, identity_groups: dict[str, list[str]]
) -> None:
    client = await enrolled.client()
    known = faces_dir / identity_groups["G01"][2]
    stranger = faces_dir / identity_groups[STRANGER][0]
    unknown_g02 = faces_dir / identity_groups["G02"][2]
    async with client.events() as stream:
        p_known = await client.publish_probe(known, "G01")
        p_stranger = await client.publish_probe(stranger, "G01")
        p_search = await client.publish_probe(unknown_g02)
        events = await _collect(stream, 3)
    by_id = {e.probe_id: e for e in events}
    assert len(events) == 3 and set(by_id) == {p_known, p_stranger, p_search}
    assert by_id[p_known].verified and by_id[p_known].mode == "1:1"
    assert not by_id[p_stranger].verified and by_id[p_stranger].error is None
    assert by_id[p_search].mode == "1:N"
    assert by_id[p_search].subject == "G02" and by_id[p_search].verified
    for event in events:
        assert event.distance is not None
        assert round(event.distance, 4) == event.distance  # rounded before leaving on-prem
        assert event.threshold == pytest.approx(0.07)


# The embedding pool is inside the replica: the broker plays no part.
@pytest.mark.parametrize("deployment", ["memory"], indirect=True)
async def test_a_replica_embedding_in_worker_processes_answers_the_same(
    enrolled: Deployment, faces_dir: Path, identity_groups: dict[str, list[str]]
) -> None:
    await enrolled.stop(next(a for a in enrolled.agents if isinstance(a, CloudAgent)))
    enrolled.settings = replace(enrolled.settings, embed_workers=2)
    cloud = await enrolled.cloud("r2")
    await asyncio.wait_for(cloud.ready.wait(), 60)
    client = await enrolled.client()
    async with client.events() as stream:
        p_known = await client.publish_probe(faces_dir / identity_groups["G01"][2], "G01")
        p_search = await client.publish_probe(faces_dir / identity_groups["G02"][2])
        p_garbage = await client.publish_probe(b"GIF89a" + bytes(32))
        events = await _collect(stream, 3)
    by_id = {e.probe_id: e for e in events}
    assert by_id[p_known].verified and by_id[p_search].subject == "G02"
    assert (by_id[p_garbage].error or "").startswith("UnsupportedImageError: ")


async def test_a_probe_nobody_answers_times_out_with_a_typed_error(
    deployment: Deployment, faces_dir: Path
) -> None:
    client = await deployment.client()  # no daemons: nothing will answer
    with pytest.raises(ProbeTimeout, match=r"probe .+: no event within 0.5s") as raised:
        await client.verify(faces_dir / "img1.jpg", "G01", timeout=0.5)
    assert isinstance(raised.value, TimeoutError)  # callers catching the bare timeout still do


async def test_bad_probes_get_error_events(
    enrolled: Deployment, faces_dir: Path, tmp_path: Path
) -> None:
    client = await enrolled.client()
    blank = tmp_path / "blank.png"
    import cv2
    import numpy as np

    cv2.imwrite(str(blank), np.full((240, 240, 3), 127, np.uint8))
    async with client.events() as stream:
        p_garbage = await client.publish_probe(b"not an image at all")
        p_noface = await client.publish_probe(blank, "G01")
        p_unknown = await client.publish_probe(faces_dir / "img1.jpg", "nobody")
        events = await _collect(stream, 3)
    by_id = {e.probe_id: e for e in events}
    assert len(events) == 3
    assert by_id[p_garbage].error and by_id[p_garbage].error.startswith("UnsupportedImageError: ")
    assert by_id[p_garbage].error.endswith("unsupported image format text; send JPEG, PNG, WebP")
    assert by_id[p_noface].error and by_id[p_noface].error.startswith("NoFaceError")
    assert by_id[p_unknown].error and "not enrolled" in by_id[p_unknown].error
    assert not any(e.verified for e in events)


async def test_malformed_message_is_dead_lettered_and_daemon_keeps_serving(
    enrolled: Deployment, faces_dir: Path, identity_groups: dict[str, list[str]]
) -> None:
    link = await enrolled.link()
    dead: list[Delivery] = []

    async def keep(delivery: Delivery) -> None:
        dead.append(delivery)

    await link.consume(link.topology.dead_letters, keep)
    await link.send(link.topology.probes, b"\x93\x01garbage", message_id="junk")
    client = await enrolled.client()
    event = await client.verify(faces_dir / identity_groups["G03"][2], "G03", timeout=120)
    assert event.verified
    for _ in range(100):
        if dead:
            break
        await asyncio.sleep(0.1)
    assert [d.message_id for d in dead] == ["junk"]
    assert "WireFormatError" in str(dead[0].headers[REASON_HEADER])


async def test_cloud_restart_answers_from_its_stored_gallery(
    enrolled: Deployment, faces_dir: Path, identity_groups: dict[str, list[str]]
) -> None:
    [onprem, cloud] = enrolled.agents
    templates = len(cloud.gallery or ())
    await enrolled.stop(cloud)
    await enrolled.stop(onprem)
    # On-prem is down, so nothing can resync the gallery: it must come from disk.
    restarted = await enrolled.cloud()
    assert restarted.ready.is_set()
    assert len(restarted.gallery or ()) == templates == 2 * len(ENROLLED)
    await enrolled.onprem()
    client = await enrolled.client()
    event = await client.verify(faces_dir / identity_groups["G01"][3], None, timeout=120)
    assert event.subject == "G01" and event.verified


async def test_two_cloud_replicas_share_the_probe_queue(
    enrolled: Deployment, faces_dir: Path, identity_groups: dict[str, list[str]]
) -> None:
    second = await enrolled.cloud("r2")
    await asyncio.wait_for(second.ready.wait(), 60)
    assert len(second.gallery or ()) == 2 * len(ENROLLED)
    client = await enrolled.client()
    photos = [faces_dir / identity_groups[g][2] for g in ENROLLED] * 2
    async with client.events() as stream:
        ids = [await client.publish_probe(p) for p in photos]
        events = await _collect(stream, len(ids))
    assert sorted(e.probe_id for e in events) == sorted(ids)
    assert [e.subject for e in sorted(events, key=lambda e: ids.index(e.probe_id))] == list(
        ENROLLED
    ) * 2
    first = enrolled.agents[1]
    assert first is not second
    assert first.probes_served > 0 and second.probes_served > 0  # type: ignore[union-attr]
    assert first.probes_served + second.probes_served == len(ids)  # type: ignore[union-attr]


async def test_edge_encrypted_probes_1to1_and_1toN(
    enrolled: Deployment, faces_dir: Path, identity_groups: dict[str, list[str]]
) -> None:
    from cipherface.client import EdgeEncryptor
    from cipherface.crypto import Keyring
    from cipherface.embedding import Embedder

    settings = enrolled.settings
    public = Keyring.load(settings.public_key_path, expect="public")
    edge = EdgeEncryptor(public, Embedder(settings.model), settings.metric)
    probe = await asyncio.to_thread(edge.encrypt, faces_dir / identity_groups["G02"][2])
    client = await enrolled.client()
    async with client.events() as stream:
        claimed = await client.publish_encrypted_probe(probe, "G02")
        searched = await client.publish_encrypted_probe(probe)
        events = await _collect(stream, 2)
    by_id = {e.probe_id: e for e in events}
    assert len(events) == 2
    assert by_id[claimed].mode == "1:1" and by_id[claimed].verified
    assert by_id[searched].subject == "G02" and by_id[searched].verified
    cloud = enrolled.agents[1]
    assert "embed" not in by_id[searched].timings  # the cloud never saw an image
    assert cloud.probes_served >= 2  # type: ignore[union-attr]
