"""Key rotation with probes in flight, on RabbitMQ with real photos and two replicas.

Every probe published before, during and after `cipherface rotate-keys` gets one
event, with the decision it got before the rotation; each was ranked under one
key on a whole gallery (both blocks), and both keys were in use while probes
flowed. Then the old key is gone from on-prem's folder, the replicas serve the
new key from one store, and a replayed context of the old key is refused.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import agents.onprem.answers as answers_module
from agents.cloud.agent import CloudAgent
from agents.onprem.agent import OnPremAgent, generate_keys
from cipherface import photos, wire
from cipherface.config import Settings
from cipherface.exceptions import SignatureError
from cipherface.signing import PinnedKey
from cipherface.transport import Delivery
from tests.agents.conftest import Deployment
from tests.environment import amqp_url_or_skip, unique_prefix

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

ENROLLED = ("G01", "G02", "G03")


@pytest.fixture
async def deployment(tmp_path: Path) -> Deployment:  # type: ignore[misc]
    url = amqp_url_or_skip()
    settings = Settings(
        data_dir=tmp_path / "data",
        prefix=unique_prefix(),
        amqp_url=url,
        sync_interval=2.0,
        rotation_grace=2.0,
    )
    generate_keys(settings)
    deployment = Deployment(settings, url)
    try:
        yield deployment
    finally:
        await deployment.close()


async def test_rotate_keys_with_probes_in_flight(
    deployment: Deployment,
    tmp_path: Path,
    faces_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    groups = photos.identity_groups(faces_dir)
    onprem = await deployment.onprem()
    assert isinstance(onprem, OnPremAgent)
    # Fillers first, so the gallery is two blocks: a half-rotated one would show.
    rng = np.random.default_rng(11)
    fillers = rng.normal(size=(onprem.book.capacity + 10, 128))
    onprem.book.add_many([(f"filler-{i}", v) for i, v in enumerate(fillers)])
    folder = tmp_path / "enroll"
    for group in ENROLLED:
        (folder / group).mkdir(parents=True)
        for name in groups[group][:2]:
            (folder / group / name).symlink_to(faces_dir / name)
    report = await onprem.enroll(folder, progress=False)
    assert report.enrolled == 6 and onprem.book.all_blocks() == [0, 1]
    clouds = [await deployment.cloud(name) for name in ("r1", "r2")]
    for cloud in clouds:
        await asyncio.wait_for(cloud.ready.wait(), 120)

    ranked: list[tuple[str, str | None, tuple[int, ...]]] = []
    real_rank = answers_module.rank

    def spy(keyring, book, scores, **kwargs):  # type: ignore[no-untyped-def]
        ranked.append(
            (keyring.fingerprint, kwargs.get("subject"), tuple(s.block_id for s in scores))
        )
        return real_rank(keyring, book, scores, **kwargs)

    monkeypatch.setattr(answers_module, "rank", spy)

    counts: collections.Counter[str] = collections.Counter()
    events: dict[str, wire.VerificationEvent] = {}
    pinned = PinnedKey(onprem.signer.verify_key)

    async def record(delivery: Delivery) -> None:
        event = wire.decode(delivery.body, verifier=pinned).message
        assert isinstance(event, wire.VerificationEvent)
        counts[event.probe_id] += 1
        events[event.probe_id] = event

    link = await deployment.link()
    await link.consume("", record, bindings=[(link.topology.events, "#")], exclusive=True)
    client = await deployment.client()
    probes = [
        ((faces_dir / groups["G01"][2]).read_bytes(), None),
        ((faces_dir / groups["G02"][2]).read_bytes(), "G02"),
        ((faces_dir / groups["G05"][0]).read_bytes(), "G01"),
        ((faces_dir / groups["G03"][2]).read_bytes(), None),
    ]
    kind_of: dict[str, int] = {}

    async def publish(index: int) -> str:
        image, subject = probes[index % len(probes)]
        probe_id = await client.publish_probe(image, subject)
        kind_of[probe_id] = index % len(probes)
        return probe_id

    # The decisions under the old key, one probe of each kind (embeddings get cached).
    baseline_ids = [await publish(i) for i in range(len(probes))]
    await _until(lambda: all(p in events for p in baseline_ids), 300)
    baseline = {kind_of[p]: (events[p].subject, events[p].verified) for p in baseline_ids}
    assert all(events[p].error is None for p in baseline_ids)
    old = onprem.current
    old_seed = old.book._decoy_seed
    old_folder = old.folder

    stop = asyncio.Event()

    async def pump() -> None:
        index = 0
        while not stop.is_set():
            await publish(index)
            index += 1
            await asyncio.sleep(0.2)

    pumping = asyncio.create_task(pump())
    await asyncio.wait_for(onprem.rotation.start(), 600)
    await asyncio.sleep(2)  # probes after the switch, too
    stop.set()
    await pumping
    await _until(lambda: set(kind_of) <= set(events), 300)
    await asyncio.sleep(2)  # a duplicate would arrive now

    assert onprem.rotation.state["phase"] == "done"
    new = onprem.current
    assert new.fingerprint != old.fingerprint and set(onprem.keys) == {new.fingerprint}
    # Each probe answered once, with the decision it had before the rotation.
    assert len(kind_of) > 20
    assert set(counts) == set(kind_of) and set(counts.values()) == {1}
    for probe_id, kind in kind_of.items():
        event = events[probe_id]
        assert event.error is None, event
        assert (event.subject, event.verified) == baseline[kind], (probe_id, kind)
    # Ranked once each, under one key, a 1:N probe on the whole gallery.
    assert len(ranked) == len(kind_of)
    assert {fp for fp, _, _ in ranked} == {old.fingerprint, new.fingerprint}
    assert all(blocks == (0, 1) for _, subject, blocks in ranked if subject is None)
    # The old key is gone, the new one in use, with a decoy seed of its own.
    assert not (old_folder / "private.key").exists()
    assert not (old_folder / "book.sqlite").exists()
    assert deployment.settings.key_dir == new.folder
    assert new.book._decoy_seed != old_seed
    for cloud in clouds:
        assert cloud.keyring is not None and cloud.keyring.fingerprint == new.fingerprint
        stores = sorted(p.name for p in cloud.settings.cloud_dir.glob("gallery*.sqlite"))
        assert len(stores) == 1 and len(cloud.gallery or ()) == len(new.book)
        assert onprem.replicas[cloud.replica].fingerprint == new.fingerprint
    # A replica still refuses a context of a key older than the one it holds.
    stale = wire.ContextUpdate(
        context=old.keyring.public_bytes(galois_keys=False, relin_keys=False),
        conjugation_key=old.edge_keys,
        blocks=(0, 1),
        issued_at=time.time() - 3600,
    )
    body = onprem._encode(stale, old)
    with pytest.raises(SignatureError, match="issued before"):
        await clouds[0]._on_gallery(Delivery(body=body))
    assert clouds[0].keyring.fingerprint == new.fingerprint  # type: ignore[union-attr]
    # A restarted on-prem uses the new key (Settings.key_dir follows current-key).
    assert replace(deployment.settings).secret_key_path == new.folder / "private.key"
    assert isinstance(clouds[0], CloudAgent)


async def _until(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.1)
