"""A replica's part in a sharded gallery: its shard, on-prem's map, fan-out and shard searches.

Every replica serves one shard (`Settings.shard`) and holds that shard's blocks
only. Replicas of every shard compete for probes on the probe queue; the one
that takes a probe embeds it once (or checks an edge probe) and sends a
`wire.ShardSearch` to each shard that holds part of the answer, through the
shards' direct exchange (key ``shard.<k>``): every shard for 1:N, the subject's
shard for a 1:1 claim (on-prem's signed `wire.ShardMap` says which). The
replicas of a shard compete for its searches on its quorum queue and send their
scores, named with their shard and the map version, to on-prem, which gathers
the shards' answers (`cipherface.sharding`). With one shard there is no fan-out:
the replica searches what it took, as before sharding.

When blocks move to a new shard, the map a replica receives says so; it keeps
serving a block that moved away for `cipherface.sharding.SHIP_GRACE` seconds
(searches routed by the previous map still count on it), then drops it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import msgpack
import numpy as np

from agents.cloud.probes import (
    Face,
    Probe,
    embed_faces,
    piece_fields,
    prove_edge,
    scores_of,
    search_faces,
)
from cipherface import wire
from cipherface.crypto import Keyring
from cipherface.exceptions import (
    ConfigError,
    EmbeddingError,
    KeyMismatchError,
    MessageTooLargeError,
    TooManyFacesError,
    TransportError,
    WireFormatError,
)
from cipherface.gallery import EncryptedGallery
from cipherface.metrics import instrumented
from cipherface.sharding import SHIP_GRACE
from cipherface.transport.base import Delivery
from cipherface.wire.payloads import EncryptedProbe

if TYPE_CHECKING:
    from agents.cloud.agent import CloudAgent

__all__ = ["SHARD_MAP_FILE", "ShardRole"]

log = logging.getLogger(__name__)

#: In a replica's folder: the last shard map on-prem signed (msgpack), so a restarted
#: replica routes by it at once.
SHARD_MAP_FILE = "shard-map"


class ShardRole:
    """What a replica knows and does as one shard's server."""

    def __init__(self, agent: CloudAgent) -> None:
        self.agent = agent
        self.shard = agent.settings.shard
        self._path = agent.settings.cloud_dir / SHARD_MAP_FILE
        #: The map this replica routes by (announcing its subjects when they come in
        #: parts), and lookups built from it.
        self.map: wire.ShardMap | None = None
        self._homes: dict[str, int] = {}
        self._every: list[int] = []
        self._own: frozenset[int] = frozenset()
        #: The map whose subject list ``_homes`` holds (the latest one that came whole).
        self._routes: wire.ShardMap | None = None
        self._subjects = wire.SubjectList()
        #: When on-prem issued the context whose map this is (stored with it).
        self._issued_at = 0.0
        self._load()
        #: Searches this replica ran for its shard (probes fanned out to it).
        self.searches = 0
        self._drops: dict[int, asyncio.TimerHandle] = {}

    def _load(self) -> None:
        """Route by the stored map at once (with its subjects, if they had come whole)."""
        if not self._path.exists():
            return
        try:
            data = msgpack.unpackb(self._path.read_bytes())
            stored = wire.ShardMap.from_dict(data)
            self._issued_at = float(data.get("issued_at", 0.0))
        except (ValueError, TypeError, WireFormatError, msgpack.ExtraData) as exc:
            log.warning("ignoring the stored shard map: %s", exc)
            return
        if stored.subject_parts:
            self._route_by(dataclasses.replace(stored, subjects=(), subject_homes=()))
            if stored.subjects:
                self._routes, self._homes = stored, stored.subject_shards()
        else:
            self._route_by(stored)

    def _store(self) -> None:
        held = self._routes if self.routable else self.map
        assert held is not None
        self._path.write_bytes(msgpack.packb({**held.to_dict(), "issued_at": self._issued_at}))

    @property
    def version(self) -> int:
        """The version of the map this replica routes by (0: none yet)."""
        return self.map.version if self.map is not None else 0

    @property
    def sharded(self) -> bool:
        """Whether probes fan out (more than one shard)."""
        return self.map is not None and self.map.shards > 1

    # -- the map ------------------------------------------------------------------------
    def check_context(self, message: wire.ContextUpdate) -> None:
        """Refuse another shard's context (before anything in it is taken)."""
        if message.shard != self.shard:
            raise ConfigError(
                f"a context for shard {message.shard} reached replica {self.agent.replica}, "
                f"which serves shard {self.shard}"
            )

    def check_block(self, block: int, announced: set[int]) -> None:
        """Refuse a chunk of a block that is neither this shard's nor announced to it.

        Chunks are routed by shard, but a replica restarted with another ``--shard``
        keeps its queue's binding to the old one: installing that shard's blocks would
        make every answer it sends cover blocks that are not its own.
        """
        if self.sharded and block not in announced and block not in self._own:
            raise ConfigError(f"block {block} is not shard {self.shard}'s")

    def take_map(self, message: wire.ContextUpdate) -> None:
        """Route by the map of a context the replica accepted, unless it holds a newer one.

        Enrollments change the map without a new version (a subject's home), so a map
        is newer by (version, issue time): a redelivered older context rolls nothing back.
        """
        shard_map = message.shard_map
        if shard_map is None or shard_map == self.map:
            return
        if self.map is not None and (shard_map.version, message.issued_at) < (
            self.version,
            self._issued_at,
        ):
            return
        self._issued_at = message.issued_at
        self._route_by(shard_map)
        self._store()
        self.schedule_drops()

    def take_subjects(self, part: wire.SubjectsPart) -> None:
        """Hold a part of a map's subject list (`wire.SubjectList`); route 1:1 claims
        by the list once it is whole. Until then they route by the previous list:
        only subjects enrolled since go to this shard, and on-prem waits for theirs."""
        self._subjects.add(part)
        if self.map is not None and part.digest == self.map.subjects_digest:
            self._join()

    @property
    def routable(self) -> bool:
        """Whether 1:1 claims route by the whole subject list of the map (none in parts)."""
        if self.map is None:
            return True
        routes = self._routes
        return routes is not None and routes.subjects_digest == self.map.subjects_digest

    def _join(self) -> None:
        assert self.map is not None
        if self.routable:
            return
        joined = self._subjects.join(self.map)
        if joined is not None:
            self._routes, self._homes = joined, joined.subject_shards()
            self._store()

    def schedule_drops(self) -> None:
        """Blocks held whose home is now another shard: dropped after the grace."""
        gallery = self.agent.gallery
        if self.map is None or gallery is None:
            return
        moved = set(gallery.blocks_of(None)) - self._own
        loop = asyncio.get_running_loop()
        for block in moved - set(self._drops):
            self._drops[block] = loop.call_later(SHIP_GRACE, self._drop, block)

    def _drop(self, block: int) -> None:
        self._drops.pop(block, None)
        gallery = self.agent.gallery
        if gallery is not None and self.map is not None and block not in self._own:
            gallery.drop(block)
            log.info(
                "replica %s dropped block %d (moved to another shard)", self.agent.replica, block
            )

    def targets(self, subject: str | None) -> list[int]:
        """The shards a probe is searched on: every shard with blocks, or the subject's.

        From lookups built once per map (`_route_by`), not a scan of the map's
        subjects and blocks per probe.
        """
        if subject is not None:
            return [self._homes.get(subject, self.shard)]
        return self._every or [self.shard]

    def _route_by(self, shard_map: wire.ShardMap) -> None:
        self.map = shard_map
        self._every = sorted(set(shard_map.homes))
        self._own = shard_map.blocks_of(self.shard)
        if not shard_map.subject_parts:
            self._routes, self._homes = shard_map, shard_map.subject_shards()
        else:
            self._join()

    async def consume(self) -> None:
        """Compete with the shard's other replicas for its searches."""
        topology = self.agent.transport.topology
        self.agent._consumers.append(
            await self.agent.transport.consume(
                topology.shard_queue(self.shard),
                instrumented(self.agent.role, "shard", self._on_search),
                bindings=[(topology.shards, topology.shard_key(self.shard))],
                prefetch=self.agent.settings.prefetch,
            )
        )

    def stop(self) -> None:
        """Cancel the pending drops (a restart finds the map and schedules them again)."""
        for handle in self._drops.values():
            handle.cancel()
        self._drops.clear()

    # -- probes -------------------------------------------------------------------------
    async def search(
        self,
        request: Probe,
        gallery: EncryptedGallery,
        keyring: Keyring,
        digest: str,
    ) -> None:
        """Embed a probe taken from the probe queue; search it here, or fan it out."""
        agent = self.agent
        try:
            probes, timings = await asyncio.to_thread(
                embed_faces, request, agent.embedder, keyring, max_faces=agent.settings.max_faces
            )
            if self.sharded:  # each shard proves an edge probe itself (`_on_search`)
                await self._fan_out(request, probes, timings, digest)
                return
            check = await asyncio.to_thread(
                prove_edge, probes, keyring, agent._conjugation_key, timings
            )
            start = request.start if isinstance(request, wire.EncryptedProbePart) else 0
            faces, seconds = await asyncio.to_thread(
                search_faces, probes, gallery, request.subject, start
            )
        except (EmbeddingError, KeyMismatchError, MessageTooLargeError, WireFormatError) as exc:
            # Bad input from a user gets an answer (an error event), not silence.
            await agent._reject(request, type(exc).__name__, str(exc), keyring, digest)
            return
        await self._send(
            request, faces, check, {**timings, "search": seconds}, digest, keyring, self.version
        )

    async def _fan_out(
        self, request: Probe, probes: list[Face], timings: dict[str, float], digest: str
    ) -> None:
        """One `wire.ShardSearch` per shard that holds part of the answer."""
        edge = None
        if not isinstance(request, wire.ProbeRequest):
            [(_, _, probe)] = probes
            assert isinstance(probe, EncryptedProbe)
            # A piece's columns go as a probe of their own (valid on the wire); the
            # search's piece fields say where they sit in the whole probe.
            edge = dataclasses.replace(probe, dimensions=len(probe.columns))
        faces = (
            ()
            if edge is not None
            else tuple(
                wire.FaceProbe(
                    box=box,
                    confidence=confidence,
                    embedding=np.asarray(vector, dtype="<f8").tobytes(),
                )
                for box, confidence, vector in probes
            )
        )
        topology = self.agent.transport.topology
        for shard in self.targets(request.subject):
            search = wire.ShardSearch(
                probe_id=request.probe_id,
                subject=request.subject,
                faces=faces,
                edge=edge,
                request=digest,
                submitted_at=request.submitted_at,
                timings=timings,
                shard=shard,
                map_version=self.version,
                **piece_fields(request),
            )
            body = wire.encode(search, limit=self.agent.settings.max_message_size)
            await self.agent.transport.publish(
                topology.shards,
                topology.shard_key(shard),
                body,
                message_id=wire.message_id(request.probe_id, digest),
            )

    async def _on_search(self, delivery: Delivery) -> None:
        """Search a probe fanned out to this shard, checked as a probe from the queue is:
        a search is unsigned, so whoever may publish one could choose every field."""
        agent = self.agent
        envelope = wire.decode(
            delivery.body, expect=(wire.ShardSearch,), limit=agent.settings.max_message_size
        )
        search = envelope.message
        assert isinstance(search, wire.ShardSearch)
        if search.shard != self.shard:
            raise ConfigError(f"a search for shard {search.shard} reached shard {self.shard}")
        gallery, keyring = agent.gallery, agent.keyring
        if gallery is None or keyring is None:
            raise TransportError("the gallery is being replaced")
        if not await agent._admitted(search, keyring, search.request):
            return
        self.searches += 1
        timings = dict(search.timings)
        try:
            probes = self._probes_of(search, keyring)
            async with agent.searching(gallery):
                check = await asyncio.to_thread(
                    prove_edge, probes, keyring, agent._conjugation_key, timings
                )
                faces, timings["search"] = await asyncio.to_thread(
                    search_faces, probes, gallery, search.subject, search.dims_start
                )
        except (KeyMismatchError, ConfigError, TooManyFacesError) as exc:
            await agent._reject(search, type(exc).__name__, str(exc), keyring, search.request)
            return
        await self._send(search, faces, check, timings, search.request, keyring, search.map_version)

    def _probes_of(self, search: wire.ShardSearch, keyring: Keyring) -> list[Face]:
        """The faces a search asks for, within the bounds a probe from the queue keeps:
        1 to `Settings.max_faces` finite embeddings, or one edge probe (or piece) under
        this key whose dimensions are those it claims. A lone piece is a whole probe
        and starts at dimension 0: searched from an offset, its scores would lack the
        terms a whole probe's have, and on-prem would take them as whole."""
        name = f"search {search.probe_id}"
        if search.edge is None:
            limit = self.agent.settings.max_faces
            if not search.faces or len(search.faces) > limit:
                raise TooManyFacesError(f"{name}: {len(search.faces)} faces, 1 to {limit} allowed")
            vectors = [np.frombuffer(face.embedding, dtype="<f8") for face in search.faces]
            if not all(np.isfinite(vector).all() for vector in vectors):
                raise ConfigError(f"{name}: an embedding that is not finite")
            return [
                (face.box, face.confidence, vector)
                for face, vector in zip(search.faces, vectors, strict=True)
            ]
        edge = search.edge
        keyring.check(edge.fingerprint)
        if search.faces:
            raise ConfigError(f"{name}: an edge probe and faces")
        if not 0 <= search.piece < search.pieces:
            raise ConfigError(f"{name}: piece {search.piece} of {search.pieces}")
        stop = search.dims_start + len(edge.columns)
        if search.pieces == 1:
            # Dimensions as a lone piece of the client's states them, or none at all.
            if search.dims_start != 0 or {search.dims_stop, search.dimensions} - {0, stop}:
                raise ConfigError(f"{name}: a whole probe starts at dimension 0")
            return [(None, 1.0, edge)]
        if search.dims_start < 0 or search.dims_stop != stop or stop > search.dimensions:
            raise ConfigError(f"{name}: the piece's dimensions")
        return [(None, 1.0, dataclasses.replace(edge, dimensions=search.dimensions))]

    async def _send(
        self,
        request: Probe | wire.ShardSearch,
        faces: tuple[wire.FaceScores, ...],
        check: wire.ProbeCheck | None,
        timings: dict[str, float],
        digest: str,
        keyring: Keyring,
        map_version: int,
    ) -> None:
        """This shard's scores to on-prem, in parts under the message size limit."""
        agent = self.agent
        ready = scores_of(
            request, faces, check, timings, digest, shard=self.shard, map_version=map_version
        )
        try:
            # Parts are cut by blocks: one block's scores of many faces may not fit.
            parts = wire.split_scores(ready, agent.settings.max_message_size)
        except MessageTooLargeError as exc:
            await agent._reject(request, type(exc).__name__, str(exc), keyring, digest)
            return
        for part in parts:
            await agent._to_onprem(part, keyring)  # each part under the limit, signed
        blocks = sum(len(face.scores) for face in faces)
        log.info(
            "probe %s: %d face(s) scored on %d block(s) of shard %d",
            request.probe_id,
            len(faces),
            blocks,
            self.shard,
            extra={
                **{"probe_id": request.probe_id, "mode": "1:1" if request.subject else "1:N"},
                **{"outcome": "scored", "blocks": blocks, "fingerprint": keyring.fingerprint},
                **{"faces": len(faces), "seconds": round(sum(timings.values()), 4)},
                **{"shard": self.shard, "age": round(time.time() - request.submitted_at, 3)},
            },
        )
