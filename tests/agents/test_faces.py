"""Per-face answers and no silent loss, end to end: every face named, every probe answered.

Multi-person photos are composed from labelled portraits (side by side, at
different sizes), probed over RabbitMQ (and the in-process broker), and each
enrolled person must be named and verified in the one event of the probe, with
no answer for a face that is not there. Bad probes each get the exact error.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import cv2
import pytest

from agents.onprem.agent import OnPremAgent, generate_keys
from cipherface import wire
from cipherface.config import Settings
from cipherface.embedding_pool import probe_embedder
from cipherface.exceptions import ConfigError
from cipherface.transport import MemoryBroker, MemoryTransport, Topology
from tests.agents.conftest import Deployment
from tests.agents.test_e2e import _collect
from tests.test_face_detection import side_by_side

pytestmark = pytest.mark.slow

#: Enrolled with their first two photos; G05 plays the stranger.
ENROLLED = ("G01", "G02", "G03")


def _compose(faces_dir: Path, tmp: Path, name: str, *photos: tuple[str, float]) -> Path:
    """``photos`` (file, scale) side by side, left to right, as one JPEG."""
    images = []
    for photo, scale in photos:
        image = cv2.imread(str(faces_dir / photo))
        images.append(cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
    canvas = images[0]
    for image in images[1:]:
        canvas = side_by_side(canvas, image)
    path = tmp / name
    cv2.imwrite(str(path), canvas)
    return path


@pytest.fixture
async def enrolled(
    deployment: Deployment, tmp_path: Path, faces_dir: Path, identity_groups: dict[str, list[str]]
) -> Deployment:
    """On-prem and one replica running; G01-G03 enrolled (two photos each)."""
    root = tmp_path / "enroll"
    for group in ENROLLED:
        (root / group).mkdir(parents=True)
        for name in identity_groups[group][:2]:
            (root / group / name).symlink_to(faces_dir / name)
    onprem = await deployment.onprem()
    report = await onprem.enroll(root, progress=False)
    assert report.enrolled == 6, report.skipped
    cloud = await deployment.cloud()
    await asyncio.wait_for(cloud.ready.wait(), 60)
    return deployment


def _by_x(event: wire.VerificationEvent) -> list[wire.FaceResult]:
    return sorted(event.faces, key=lambda face: face.box[0] if face.box else 0)


async def test_every_person_in_a_composed_photo_is_named_and_verified(
    enrolled: Deployment, faces_dir: Path, tmp_path: Path, identity_groups: dict[str, list[str]]
) -> None:
    g01, g02, g03, g05 = (identity_groups[g][2] for g in ("G01", "G02", "G03", "G05"))
    pair = _compose(faces_dir, tmp_path, "pair.jpg", (g01, 1.0), (g02, 0.6))
    trio = _compose(faces_dir, tmp_path, "trio.jpg", (g03, 0.5), (g05, 1.0), (g02, 0.8))
    client = await enrolled.client()
    async with client.events() as stream:
        p_pair = await client.publish_probe(pair)
        p_trio = await client.publish_probe(trio)
        p_claim = await client.publish_probe(pair, "G02")
        p_absent = await client.publish_probe(pair, "G03")
        events = {e.probe_id: e for e in await _collect(stream, 4)}
    assert len(events) == 4  # one event per probe, whatever the number of faces

    found = events[p_pair]
    assert [(f.subject, f.verified) for f in _by_x(found)] == [("G01", True), ("G02", True)]
    assert found.verified and found.face is not None
    assert found.subject == found.faces[found.face].subject

    trio_faces = _by_x(events[p_trio])
    assert len(trio_faces) == 3  # the stranger is a face too, but matches nobody
    assert [f.verified for f in trio_faces] == [True, False, True]
    assert (trio_faces[0].subject, trio_faces[2].subject) == ("G03", "G02")
    for face in trio_faces:
        assert face.distance is not None and round(face.distance, 4) == face.distance
        assert face.box is not None and face.confidence > 0

    claim = events[p_claim]  # 1:1 on a group photo: verified by the face that matches
    assert claim.mode == "1:1" and claim.verified and claim.subject == "G02"
    assert claim.face is not None and claim.faces[claim.face].verified
    assert claim.faces[claim.face].box == _by_x(found)[1].box  # the right-hand face
    absent = events[p_absent]  # nobody in the photo is G03
    assert absent.mode == "1:1" and not absent.verified and absent.error is None
    assert len(absent.faces) == 2 and not any(f.verified for f in absent.faces)


async def test_bad_probes_get_exact_errors_and_nothing_is_lost(
    enrolled: Deployment, faces_dir: Path
) -> None:
    client = await enrolled.client()
    photo = faces_dir / "img5.jpg"
    long_id = "L" * 300
    async with client.events() as stream:
        first = await client.publish_probe(photo, "G01", probe_id="reused-id")
        await stream.wait_for(first, 180)
        # A new probe (another image) reusing the id: answered, not swallowed.
        await client.publish_probe(faces_dir / "img53.jpg", probe_id="reused-id")
        await client.publish_probe(photo, probe_id=long_id)
        empty = await client.publish_probe(photo, "")
        events = await _collect(stream, 3)
    by_id = {e.probe_id: e for e in events}
    assert len(events) == 3, [e.probe_id[:20] for e in events]
    assert by_id["reused-id"].error == (
        "DuplicateProbeId: another probe already used this probe id"
    )
    assert by_id[long_id].error == (
        "InvalidProbeId: probe id of 300 bytes exceeds AMQP's 255-byte message-id limit"
    )
    assert by_id[empty].error == (
        "InvalidSubject: claimed subject '' is empty: send nil for 1:N identification"
    )
    for event in events:
        assert event.distance is None and not event.verified and event.faces == ()


async def test_a_redelivered_probe_gets_one_event(enrolled: Deployment, faces_dir: Path) -> None:
    """The same probe message twice (a broker's redelivery): one event, no DuplicateProbeId."""
    client = await enrolled.client()
    body = wire.encode(
        wire.ProbeRequest(
            probe_id="twice", image=(faces_dir / "img5.jpg").read_bytes(), submitted_at=time.time()
        )
    )
    async with client.events() as stream:
        stream._max_seen = 0  # type: ignore[attr-defined]  # see every raw event
        for _ in range(2):
            await client.transport.send(client.transport.topology.probes, body)
        events = await _collect(stream, 1, settle=15.0)
    assert [(e.probe_id, e.error) for e in events] == [("twice", None)]


async def test_enrollment_is_incremental_and_refuses_group_photos(
    enrolled: Deployment, tmp_path: Path, faces_dir: Path
) -> None:
    onprem = enrolled.agents[0]
    assert isinstance(onprem, OnPremAgent)
    root = tmp_path / "enroll"
    again = await onprem.enroll(root, progress=False)
    assert (again.enrolled, again.unchanged, again.skipped) == (0, 6, [])
    (root / "G01" / "img4.jpg").symlink_to(faces_dir / "img4.jpg")  # a new photo
    (root / "G01" / "copy.jpg").symlink_to(faces_dir / "img1.jpg")  # enrolled content
    (root / "G02" / "couple.jpg").symlink_to(faces_dir / "couple.jpg")
    (root / "G03" / "notes.png").write_bytes(b"not an image")
    grown = await onprem.enroll(root, progress=False)
    assert (grown.enrolled, grown.unchanged) == (1, 7)
    assert sorted(grown.skipped) == [
        (str(root / "G02" / "couple.jpg"), "2 faces: an enrollment photo must show one person"),
        (
            str(root / "G03" / "notes.png"),
            f"{root / 'G03' / 'notes.png'}: unsupported image format text; send JPEG, PNG, WebP",
        ),
    ]
    assert len(onprem.book.template_ids("G01")) == 3
    with pytest.raises(ConfigError, match=re.escape(f"{root / 'missing'}: no such folder")):
        await onprem.enroll(root / "missing", progress=False)


def test_both_daemons_detect_as_the_settings_say(tmp_path: Path) -> None:
    # On-prem's enrollment embedder once ignored CIPHERFACE_MAX_IMAGE_SIDE.
    settings = Settings(data_dir=tmp_path / "data", max_image_side=800, detect_upsample=0)
    generate_keys(settings)
    onprem = OnPremAgent(settings, MemoryTransport(MemoryBroker(), Topology(prefix="faces")))
    for embedder in (onprem.embedder, probe_embedder(settings)):
        assert (embedder.max_side, embedder.upsample) == (800, 0)
    onprem.current.close()
