"""A gallery spread over two shards, end to end (in-process broker and RabbitMQ).

Six synthetic subjects (`SyntheticEmbedder`: what is under test is the routing,
not DeepFace) are spread by on-prem's book over two shards, one block each.
A 1:N probe is embedded once and searched by both shards; a 1:1 claim by its
subject's shard only; a shard that is down gives a partial answer at the
deadline, saying how much of the gallery was searched; and what a trusted
replica's key could forge in a shard's answer is an error, never a decision.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from agents.cloud.agent import CloudAgent
from agents.onprem.agent import OnPremAgent
from cipherface import wire
from cipherface.transport import REASON_HEADER
from cipherface.wire.chunks import packed_size
from cipherface.wire.payloads import BlockScores
from tests.agents.conftest import Deployment
from tests.agents.test_message_size import SyntheticEmbedder
from tests.agents.trust import Watch, _result

SUBJECTS = ("ann", "ben", "cat", "dan", "eve", "fay")
DIMENSIONS = 128


def _vectors() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Enrolled vectors and probes near them (cosine distance well under Dlib's 0.07)."""
    rng = np.random.default_rng(10)
    enrolled = {s: rng.normal(size=DIMENSIONS) for s in SUBJECTS}
    probes = {s: v + rng.normal(scale=0.02, size=DIMENSIONS) for s, v in enrolled.items()}
    return enrolled, probes


async def _sharded(
    deployment: Deployment,
    replicas: dict[str, int],
    *,
    gather_timeout: float = 60.0,
    visitors: int = 0,
    max_message_size: int = 4 << 20,
) -> tuple[OnPremAgent, dict[str, CloudAgent], Watch]:
    """On-prem with two shards and the six subjects (beside ``visitors`` more, with
    long names); replicas by name -> shard."""
    deployment.settings = dataclasses.replace(
        deployment.settings,
        shards=2,
        gather_timeout=gather_timeout,
        max_message_size=max_message_size,
    )
    enrolled, probes = _vectors()
    onprem = await deployment.onprem()
    others = np.random.default_rng(11).normal(size=(visitors, DIMENSIONS))
    onprem.book.add_many((f"visitor-{i:07d}-of-a-crowded-gallery", v) for i, v in enumerate(others))
    for subject, vector in enrolled.items():
        onprem.book.add(subject, vector, template_id=f"t-{subject}")
    await onprem.publish_gallery(onprem.book.pending_blocks())
    clouds = {
        name: await deployment.cloud(name, shard=shard, embedder=SyntheticEmbedder(probes))
        for name, shard in replicas.items()
    }
    for cloud in clouds.values():
        await asyncio.wait_for(cloud.ready.wait(), 120)
        while not cloud.serving:
            await asyncio.sleep(0.05)
    watch = Watch()
    await watch.start(deployment)
    return onprem, clouds, watch


def _home(onprem: OnPremAgent, subject: str) -> int:
    return onprem.book.shards.subject_home[subject]


async def test_a_probe_is_searched_once_per_shard_and_answered_as_unsharded(
    deployment: Deployment,
) -> None:
    onprem, clouds, watch = await _sharded(deployment, {"r0a": 0, "r0b": 0, "r1a": 1})
    homes = {s: _home(onprem, s) for s in SUBJECTS}
    assert set(homes.values()) == {0, 1}  # the book spread the subjects
    assert {c.gallery and len(c.gallery) for c in clouds.values()} == {3}
    client = await deployment.client()
    sent = {await client.publish_probe(s.encode()): s for s in SUBJECTS}
    for probe_id, subject in sent.items():
        event = await watch.event(probe_id)
        assert event.error is None and event.subject == subject and event.verified, event
        assert not event.partial and event.searched == 1.0
    # Each probe embedded once, searched once on each shard.
    assert sum(c.shards.searches for c in clouds.values()) == 2 * len(SUBJECTS)
    assert clouds["r1a"].shards.searches == len(SUBJECTS)


async def test_a_claim_goes_to_its_subjects_shard_only(deployment: Deployment) -> None:
    onprem, clouds, watch = await _sharded(deployment, {"r0": 0, "r1": 1})
    subject = next(s for s in SUBJECTS if _home(onprem, s) == 1)
    client = await deployment.client()
    true_claim = await client.publish_probe(subject.encode(), subject)
    false_claim = await client.publish_probe(b"ann" if subject != "ann" else b"ben", subject)
    verified, refused = await watch.event(true_claim), await watch.event(false_claim)
    assert verified.error is None and verified.verified and not verified.partial, verified
    assert refused.error is None and not refused.verified, refused
    assert clouds["r0"].shards.searches == 0  # the other shard got no work
    assert clouds["r1"].shards.searches == 2


async def test_a_subject_list_over_the_message_cap_still_routes_each_claim_to_one_shard(
    deployment: Deployment,
) -> None:
    """More subjects than one message can list (60,000 long names under a 1 MiB cap):
    the list follows the context in parts, and every claim reaches its subject's shard."""
    onprem, clouds, watch = await _sharded(
        deployment, {"r0": 0, "r1": 1}, visitors=60_000, max_message_size=1 << 20
    )
    shard_map = onprem.book.shards.shard_map()
    assert packed_size(shard_map.to_dict()) > 1 << 20  # too large for any one message
    assert len(wire.split_subjects(shard_map, 1 << 20)[1]) > 1  # so it did travel in parts
    assert all(c.shards.routable for c in clouds.values())
    client = await deployment.client()
    sent = {await client.publish_probe(s.encode(), s): s for s in SUBJECTS}
    for probe_id, subject in sent.items():
        event = await watch.event(probe_id)
        assert event.error is None and event.verified and not event.partial, event
        assert event.subject == subject
    assert sum(c.shards.searches for c in clouds.values()) == len(SUBJECTS)


@pytest.mark.parametrize("packed", [False, True], ids=["columns", "packed"])
async def test_edge_probes_are_answered_across_shards(deployment: Deployment, packed: bool) -> None:
    """In columns, each shard answers every piece of an edge probe on its own blocks
    and on-prem adds a shard's pieces up, then gathers the shards; packed, the probe
    is one message, fanned out whole, and each shard expands it. One whole answer,
    1:N and 1:1, either way."""
    from cipherface.crypto import Keyring
    from cipherface.gallery import encrypt_probe
    from cipherface.gallery.expansion import encrypt_packed_probe

    onprem, clouds, watch = await _sharded(deployment, {"r0": 0, "r1": 1})
    public = Keyring.load(deployment.settings.public_key_path, expect="public")
    _, probes = _vectors()
    far = next(s for s in SUBJECTS if _home(onprem, s) == 1)
    near = next(s for s in SUBJECTS if _home(onprem, s) == 0)
    encrypt = encrypt_packed_probe if packed else encrypt_probe
    edge = {s: encrypt(public, probes[s], deployment.settings.metric) for s in (far, near)}
    client = await deployment.client()
    one_to_n = await client.publish_encrypted_probe(edge[far])
    claim = await client.publish_encrypted_probe(edge[near], near)
    found, verified = await watch.event(one_to_n), await watch.event(claim)
    assert found.error is None and found.subject == far and found.verified, found
    assert not found.partial and found.searched == 1.0
    assert verified.error is None and verified.verified and verified.subject == near, verified
    assert ("expand" in found.timings) == packed
    request = wire.EncryptedProbeRequest(probe_id="p", probe=edge[far])
    searches = 1 if packed else len(wire.split_probe(request, 4 << 20))
    assert packed or searches > 1  # columns did travel in pieces
    # 1:N: every piece (or the packed probe) searched on both shards; the claim: on its
    # shard only.
    assert clouds["r1"].shards.searches == searches
    assert clouds["r0"].shards.searches == 2 * searches


async def test_a_search_waits_for_a_shard_none_of_whose_replicas_started_yet(
    deployment: Deployment,
) -> None:
    """The replica fanning a probe out declares every target shard's queue: a search for
    a shard with no replica yet waits for one (before, the broker dropped it, and the
    probe was answered `partial` at the deadline)."""
    onprem, clouds, watch = await _sharded(deployment, {"r0": 0}, gather_timeout=30.0)
    subject = next(s for s in SUBJECTS if _home(onprem, s) == 1)
    client = await deployment.client()
    probe_id = await client.publish_probe(subject.encode())
    while clouds["r0"].shards.searches == 0:
        await asyncio.sleep(0.05)
    _, probes = _vectors()
    late = await deployment.cloud("r1", shard=1, embedder=SyntheticEmbedder(probes))
    event = await watch.event(probe_id)
    assert event.error is None and event.subject == subject and event.verified, event
    assert not event.partial and late.shards.searches == 1


async def test_a_shard_down_gives_a_partial_answer_at_the_deadline(
    deployment: Deployment,
) -> None:
    onprem, clouds, watch = await _sharded(deployment, {"r0": 0, "r1": 1}, gather_timeout=3.0)
    await deployment.stop(clouds["r1"])
    subject = next(s for s in SUBJECTS if _home(onprem, s) == 0)
    client = await deployment.client()
    event = await watch.event(await client.publish_probe(subject.encode()))
    assert event.error is None and event.partial, event
    assert event.subject == subject and event.verified
    assert event.searched == 0.5  # three of the six templates
    # A claim whose only shard is down waits in that shard's queue (no decision).
    missing = next(s for s in SUBJECTS if _home(onprem, s) == 1)
    claim = await client.publish_probe(missing.encode(), missing)
    await asyncio.sleep(4)
    assert claim not in watch.events


def _answer(
    onprem: OnPremAgent,
    cloud: CloudAgent,
    probe_id: str,
    blocks: tuple[BlockScores, ...],
    **changes: object,
) -> bytes:
    """A shard's answer signed by ``cloud``'s key: what a malicious replica can send."""
    message = wire.ScoresReady(
        probe_id=probe_id,
        subject=None,
        faces=(wire.FaceScores(box=None, confidence=1.0, scores=blocks),),
        request=wire.request_digest(probe_id.encode()),
        submitted_at=time.time(),
        timings={},
        shard=cloud.shards.shard,
        map_version=onprem.book.shards.version,
    )
    return wire.encode(
        dataclasses.replace(message, **changes),  # type: ignore[arg-type]
        fingerprint=onprem.keyring.fingerprint,
        signer=cloud.signer,
    )


async def test_a_forged_shard_answer_is_an_error_never_a_decision(
    deployment: Deployment,
) -> None:
    onprem, clouds, watch = await _sharded(deployment, {"r0": 0, "r1": 1})
    r0, r1 = clouds["r0"], clouds["r1"]
    vector = _vectors()[1]["ann"]
    [own0] = r0.gallery.search(vector)  # type: ignore[union-attr]
    [own1] = r1.gallery.search(vector)  # type: ignore[union-attr]
    # Both shards' answers to a probe carry the same submission time, or on-prem
    # refuses them as disagreeing before the check under test: fixed once, here.
    submitted_at = float(round(time.time()))

    def answer(
        cloud: CloudAgent, probe_id: str, blocks: tuple[BlockScores, ...], **changes: object
    ) -> bytes:
        return _answer(onprem, cloud, probe_id, blocks, submitted_at=submitted_at, **changes)

    forged = {
        # shard 1 scores shard 0's block
        "other": [answer(r0, "other", (own0,)), answer(r1, "other", (own0,))],
        # a block that is nobody's
        "wrong": [
            answer(r0, "wrong", (own0,)),
            answer(r1, "wrong", (dataclasses.replace(own1, block_id=42),)),
        ],
        # shard 0 answers twice, on other blocks
        "twice": [answer(r0, "twice", (own0,)), answer(r0, "twice", ())],
        # a map version on-prem never issued
        "old": [
            answer(r0, "old", (own0,), map_version=7),
            answer(r1, "old", (own1,), map_version=7),
        ],
        # shard 0's replica answers for shard 1, with shard 1's own scores
        "posing": [
            answer(r0, "posing", (own1,), shard=1),
            answer(r0, "posing", (own0,)),
        ],
    }
    reasons = {
        "other": "shard 1 scored block",
        "wrong": "not in the gallery",
        "twice": "answered twice",
        "old": "map version 7",
        "posing": "replica r0 serves shard 0, not shard 1",
    }
    for bodies in forged.values():
        for body in bodies:
            await _result(deployment, body)
    for probe_id, reason in reasons.items():
        event = await watch.event(probe_id)
        assert event.error and event.error.startswith("IntegrityError"), event
        assert reason in event.error, event
        assert not event.verified and event.distance is None and not event.faces
    # Past the grace for blocks just shipped, an answer missing one of its blocks.
    onprem.shards.router.grace = 0.0
    await _result(deployment, answer(r0, "short", (own0,)))
    await _result(deployment, answer(r1, "short", ()))
    event = await watch.event("short")
    assert event.error and "misses block" in event.error, event


async def test_adding_a_shard_moves_blocks_while_probes_keep_being_answered(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two shards of two blocks each (one full); a third shard takes the full block of
    shard 0 while a stream of probes is answered, right and whole, throughout."""
    monkeypatch.setattr("agents.cloud.shards.SHIP_GRACE", 3.0)  # the old shard's drop
    deployment.settings = dataclasses.replace(deployment.settings, shards=2)
    enrolled, probes = _vectors()
    onprem = await deployment.onprem()
    for subject, vector in enrolled.items():
        onprem.book.add(subject, vector, template_id=f"t-{subject}")
    rng = np.random.default_rng(11)
    filler = 2 * onprem.book.capacity
    onprem.book.add_many((f"x{i}", rng.normal(size=DIMENSIONS), f"x{i}") for i in range(filler))
    await onprem.publish_gallery(onprem.book.pending_blocks())
    clouds = [
        await deployment.cloud(name, shard=shard, embedder=SyntheticEmbedder(probes))
        for name, shard in (("r0", 0), ("r1", 1))
    ]
    for cloud in clouds:
        await asyncio.wait_for(cloud.ready.wait(), 120)
    watch = Watch()
    await watch.start(deployment)
    client = await deployment.client()
    sent: dict[str, str] = {}
    streaming = True

    async def stream() -> None:
        index = 0
        while streaming:
            subject = SUBJECTS[index % len(SUBJECTS)]
            sent[await client.publish_probe(subject.encode())] = subject
            index += 1
            await asyncio.sleep(1.0)  # within what two shared cores answer

    task = asyncio.create_task(stream())
    try:
        await asyncio.sleep(2)
        # Add a shard: on-prem restarts with --shards 3; the replicas keep serving.
        await deployment.stop(onprem)
        deployment.settings = dataclasses.replace(deployment.settings, shards=3)
        onprem = await deployment.onprem()
        moved = dict(onprem.book.shards.target)
        assert moved and set(moved.values()) == {2}, moved
        clouds.append(await deployment.cloud("r2", shard=2, embedder=SyntheticEmbedder(probes)))
        for _ in range(1200):  # the move commits once the new shard serves its blocks
            gallery = clouds[0].gallery
            if not onprem.book.shards.target and gallery and not set(moved) & set(gallery._layouts):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the move did not complete")
        await asyncio.sleep(2)
    finally:
        streaming = False
        await task
    events = {probe_id: await watch.event(probe_id) for probe_id in sent}
    wrong = {
        p: (e.error, e.subject, sent[p], e.partial, e.searched, e.verified)
        for p, e in events.items()
        if e.error or e.partial or e.subject != sent[p] or not e.verified
    }
    assert not wrong, wrong
    assert onprem.book.shards.version == 1
    assert set(moved) <= set(clouds[2].gallery._layouts)  # type: ignore[union-attr]
    assert clouds[2].shards.searches > 0 and len(events) > 5


async def test_a_search_or_context_for_another_shard_is_dead_lettered(
    deployment: Deployment,
) -> None:
    onprem, clouds, watch = await _sharded(deployment, {"r0": 0, "r1": 1})
    link = await deployment.link()
    topology = link.topology
    search = wire.ShardSearch(
        probe_id="misrouted",
        subject=None,
        faces=(wire.FaceProbe(box=None, confidence=1.0, embedding=b"\0" * 8 * DIMENSIONS),),
        edge=None,
        request=wire.request_digest(b"misrouted"),
        submitted_at=time.time(),
        timings={},
        shard=0,
        map_version=onprem.book.shards.version,
    )
    await link.publish(topology.shards, topology.shard_key(1), wire.encode(search))
    dead = await watch.dead_letter(lambda d: "reached shard 1" in str(d.headers[REASON_HEADER]))
    assert str(dead.headers[REASON_HEADER]).startswith("ConfigError")
    context = wire.ContextUpdate(
        context=onprem.keyring.public_bytes(galois_keys=False, relin_keys=False),
        conjugation_key=onprem.current.edge_keys,
        blocks=(),
        shard=0,
        shard_map=onprem.book.shards.shard_map(),
    )
    body = onprem._encode(context)
    await link.publish(topology.gallery, topology.shard_key(1), body)
    await watch.dead_letter(lambda d: "which serves shard 1" in str(d.headers[REASON_HEADER]))
    # A chunk of shard 0's block on shard 1's key (a stale binding): not installed.
    block_id = next(iter(clouds["r0"].gallery.blocks_of(None)))  # type: ignore[union-attr]
    [block] = onprem.book.encrypt_blocks([block_id])
    for chunk in wire.split_block(block, deployment.settings.max_message_size):
        await link.publish(topology.gallery, topology.shard_key(1), onprem._encode(chunk))
    await watch.dead_letter(lambda d: "is not shard 1's" in str(d.headers[REASON_HEADER]))
    assert clouds["r1"].shards.searches == 0 and len(clouds["r1"].gallery or ()) == 3
    assert block_id not in clouds["r1"].gallery.blocks_of(None)  # type: ignore[union-attr]
