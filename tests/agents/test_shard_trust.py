"""Hostile but well-formed input on the shard path: a forged `search` (unsigned, like a
probe) and a forged subject list (without on-prem's key) never reach a decision."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np

from cipherface import wire
from cipherface.transport import REASON_HEADER
from tests.agents.conftest import Deployment
from tests.agents.test_sharding import DIMENSIONS, SUBJECTS, _home, _sharded, _vectors


async def test_a_forged_search_is_checked_like_a_probe_never_decided_on(
    deployment: Deployment,
) -> None:
    """Whoever may publish an (unsigned) `search` chooses every field: the shard proves
    an edge probe itself and holds faces to a probe's bounds, so a non-unit edge probe
    (in pieces, as searches carry them), too many faces or a whole probe claiming an
    offset, or a packed probe posing as a piece each get an error event."""
    from cipherface.crypto import Keyring, Metric
    from cipherface.gallery import encrypt_probe
    from cipherface.gallery.expansion import encrypt_packed_probe

    onprem, clouds, watch = await _sharded(deployment, {"r0": 0, "r1": 1})
    public = Keyring.load(deployment.settings.public_key_path, expect="public")
    _, probes = _vectors()
    home = next(s for s in SUBJECTS if _home(onprem, s) == 0)
    unit = probes[home] / np.linalg.norm(probes[home])
    honest = encrypt_probe(public, unit, Metric.COSINE)
    # Twice a unit vector's length: no proof a shard computes passes it off as a unit one.
    doubled = encrypt_probe(public, 2 * unit, Metric.EUCLIDEAN)
    scaled = dataclasses.replace(honest, columns=doubled.columns)
    request = wire.EncryptedProbeRequest(probe_id="forged-non-unit", probe=scaled, subject=home)
    face = wire.FaceProbe(box=None, confidence=1.0, embedding=unit.astype("<f8").tobytes())
    small = dataclasses.replace(honest, columns=honest.columns[:8], dimensions=8)
    searches = [
        {
            "probe_id": "forged-non-unit",
            "request": piece.request,
            "edge": dataclasses.replace(wire.piece_probe(piece), dimensions=len(piece.columns)),
            **{"piece": piece.piece, "pieces": piece.pieces, "dimensions": piece.dimensions},
            **{"dims_start": piece.start, "dims_stop": piece.start + len(piece.columns)},
        }
        for piece in wire.split_probe(request, deployment.settings.max_message_size)
    ]
    searches.append(
        {"probe_id": "forged-faces", "faces": (face,) * (deployment.settings.max_faces + 1)}
    )
    searches.append({"probe_id": "forged-offset", "edge": small, "dims_start": 7})
    # No piece count: searched from dimension 7 and answered as a whole probe, before.
    stop = {"dims_start": 7, "dims_stop": 15, "dimensions": DIMENSIONS}
    searches.append({"probe_id": "forged-pieces", "edge": small, "pieces": 0, **stop})
    nan = dataclasses.replace(face, embedding=np.full(DIMENSIONS, np.nan).astype("<f8").tobytes())
    searches.append({"probe_id": "forged-nan", "faces": (nan,)})
    # A packed probe is always whole: one claiming to be a piece is refused unexpanded.
    packed = encrypt_packed_probe(public, unit, Metric.COSINE)
    searches.append({"probe_id": "forged-packed", "edge": packed, "pieces": 2, **stop})
    link = await deployment.link()
    topology = link.topology
    now = time.time()  # one probe's pieces agree on it
    for fields in searches:
        search = wire.ShardSearch(
            **{
                "subject": home,
                "faces": (),
                "edge": None,
                "request": wire.request_digest(str(fields["probe_id"]).encode()),
                "submitted_at": now,
                "timings": {},
                "shard": 0,
                "map_version": onprem.book.shards.version,
                **fields,  # type: ignore[arg-type]
            }
        )
        await link.publish(topology.shards, topology.shard_key(0), wire.encode(search))
    names = ("non-unit", "faces", "offset", "pieces", "nan", "packed")
    events = {name: await watch.event(f"forged-{name}") for name in names}
    assert (events["non-unit"].error or "").startswith("IntegrityError"), events["non-unit"]
    assert (events["faces"].error or "").startswith("TooManyFacesError"), events["faces"]
    assert "starts at dimension 0" in (events["offset"].error or ""), events["offset"]
    assert "piece 0 of 0" in (events["pieces"].error or ""), events["pieces"]
    assert "not finite" in (events["nan"].error or ""), events["nan"]
    assert "never a piece" in (events["packed"].error or ""), events["packed"]
    assert not any(e.verified or e.distance is not None for e in events.values())
    # An honest probe small enough for one piece (as with a larger message cap) states
    # its dimensions as one; searched whole (over 4 MiB here: asked of the shard).
    lone = wire.ShardSearch(
        probe_id="lone-piece",
        subject=home,
        faces=(),
        edge=honest,
        request=wire.request_digest(b"lone-piece"),
        submitted_at=now,
        timings={},
        shard=0,
        map_version=onprem.book.shards.version,
        **{"pieces": 1, "dims_start": 0, "dims_stop": DIMENSIONS, "dimensions": DIMENSIONS},
    )
    cloud = next(c for c in clouds.values() if c.shards.shard == 0)
    assert cloud.shards._probes_of(lone, cloud.keyring) == [(None, 1.0, honest)]  # type: ignore[arg-type]


async def test_a_forged_subject_list_moves_no_claim(deployment: Deployment) -> None:
    """Broker access without on-prem's key: a context announcing another subject list,
    and that list's parts (every subject on shard 0), are dead-lettered unread, and a
    claim still goes to its subject's shard alone."""
    from cipherface.signing import SigningKey

    onprem, clouds, watch = await _sharded(deployment, {"r0": 0, "r1": 1})
    subject = next(s for s in SUBJECTS if _home(onprem, s) == 1)
    real = onprem.book.shards.shard_map()
    moved = dataclasses.replace(real, subject_homes=(0,) * len(real.subjects))
    announced, parts = wire.split_subjects(moved, deployment.settings.max_message_size)
    context = wire.ContextUpdate(
        context=onprem.keyring.public_bytes(galois_keys=False, relin_keys=False),
        conjugation_key=onprem.current.edge_keys,
        issued_at=time.time() + 3600,
        shard=0,
        shard_map=dataclasses.replace(announced, version=real.version + 1),
    )
    mallory = SigningKey.generate("onprem")
    link = await deployment.link()
    topology = link.topology
    for message in (context, *parts):
        body = wire.encode(message, fingerprint=onprem.current.fingerprint, signer=mallory)
        await link.publish(topology.gallery, topology.shard_key(0), body)

    async def all_refused() -> None:
        refused = ("SignatureError" in str(d.headers[REASON_HEADER]) for d in watch.dead)
        while sum(refused) < 1 + len(parts):
            await asyncio.sleep(0.1)
            refused = ("SignatureError" in str(d.headers[REASON_HEADER]) for d in watch.dead)

    await asyncio.wait_for(all_refused(), 30)
    assert clouds["r0"].shards.targets(subject) == [1] and clouds["r0"].shards.routable
    client = await deployment.client()
    event = await watch.event(await client.publish_probe(subject.encode(), subject))
    assert event.error is None and event.verified, event
    assert (clouds["r0"].shards.searches, clouds["r1"].shards.searches) == (0, 1)
