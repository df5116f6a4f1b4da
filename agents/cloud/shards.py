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
    CiphertextError,
    ConfigError,
    EmbeddingError,
    KeyMismatchError,
    MessageTooLargeError,
    SubjectsError,
    TooManyFacesError,
    TransportError,
    WireFormatError,
)
from cipherface.gallery import EncryptedGallery
from cipherface.metrics import instrumented
from cipherface.sharding import SHIP_GRACE
from cipherface.transport.base import Delivery
from cipherface.wire.payloads import EncryptedProbe
from cipherface.wire.pieces import check_piece

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
        #: The map this replica routes by, whole (its subject list in), and lookups
        #: built from it: searches name its version, so routes and version agree.
        self.map: wire.ShardMap | None = None
        self._homes: dict[str, int] = {}
        self._every: list[int] = []
        self._own: frozenset[int] = frozenset()
        #: When on-prem issued the context whose map this is (stored with it).
        self._issued_at = 0.0
        #: A newer accepted map whose subject list is still coming in parts, and when
        #: its context was issued: it replaces ``map`` once the list is whole.
        self._pending: tuple[wire.ShardMap, float] | None = None
        self._subjects = wire.SubjectList()
        #: Searches this replica ran for its shard (probes fanned out to it).
        self.searches = 0
        #: Shards whose search queue this replica declared (`_declare`).
        self._declared: set[int] = set()
        self._drops: dict[int, asyncio.TimerHandle] = {}
        self._load()

    def _load(self) -> None:
        """Route by the stored map at once (stored whole, with its subject list)."""
        if not self._path.exists():
            return
        try:
            data = msgpack.unpackb(self._path.read_bytes())
            stored = wire.ShardMap.from_dict(data)
            issued_at = float(data.get("issued_at", 0.0))
        except (ValueError, TypeError, WireFormatError, msgpack.ExtraData) as exc:
            log.warning("ignoring the stored shard map: %s", exc)
            return
        self._switch(stored, issued_at, store=False)

    def _switch(self, shard_map: wire.ShardMap, issued_at: float, *, store: bool = True) -> None:
        """Route by ``shard_map`` (whole) from now on, and keep it for a restart."""
        self.map, self._issued_at = shard_map, issued_at
        self._homes = shard_map.subject_shards()
        self._every = sorted(set(shard_map.homes))
        self._own = shard_map.blocks_of(self.shard)
        if store:
            self._path.write_bytes(msgpack.packb({**shard_map.to_dict(), "issued_at": issued_at}))
            self.schedule_drops()

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
        """Route by the map of a context the replica accepted, unless it holds a newer one,
        once its subject list is whole (`take_subjects`).

        Enrollments change the map without a new version (a subject's home), so a map
        is newer by (version, issue time): a redelivered older context rolls nothing back.
        """
        shard_map = message.shard_map
        if shard_map is None:
            return
        newest, issued_at = self._pending or (self.map, self._issued_at)
        if newest is not None:
            if shard_map == _announced(newest):
                return
            if (shard_map.version, message.issued_at) < (newest.version, issued_at):
                return
        held = self.map
        self._pending = None
        if not shard_map.subject_parts:
            self._switch(shard_map, message.issued_at)
        elif held is not None and held.subjects_digest == shard_map.subjects_digest:
            # The list held (a block moved, a version bumped): no parts to wait for.
            whole = dataclasses.replace(
                shard_map, subjects=held.subjects, subject_homes=held.subject_homes
            )
            self._switch(whole, message.issued_at)
        else:
            self._pending = (shard_map, message.issued_at)
            self._join()

    def take_subjects(self, part: wire.SubjectsPart) -> None:
        """Hold a part of the awaited map's subject list (`wire.SubjectList`), and route
        by that map once the list is whole. A part of any other list is stale (or came
        before its context, and a sync sends it again): held, replays of old signed
        parts could crowd out the list awaited."""
        pending = self._pending
        if pending is None or part.digest != pending[0].subjects_digest:
            log.info(
                "replica %s: a subjects part of a list not awaited, ignored", self.agent.replica
            )
            return
        self._subjects.add(part)
        self._join()

    @property
    def routable(self) -> bool:
        """Whether this replica routes by the newest map it accepted (none awaits its
        subject list): else a sync is asked for, and a new replica is not ready yet."""
        return self._pending is None

    def _join(self) -> None:
        assert self._pending is not None
        announced, issued_at = self._pending
        try:
            joined = self._subjects.join(announced)
        except SubjectsError as exc:
            log.warning("replica %s: %s; a sync sends the list again", self.agent.replica, exc)
            return
        if joined is not None:
            self._pending = None
            self._switch(joined, issued_at)

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

        From lookups built once per map (`_switch`), not a scan of the map's
        subjects and blocks per probe.
        """
        if subject is not None:
            return [self._homes.get(subject, self.shard)]
        return self._every or [self.shard]

    async def consume(self) -> None:
        """Compete with the shard's other replicas for its searches."""
        topology = self.agent.transport.topology
        self.agent._consumers.append(
            await self.agent.transport.consume(
                topology.shard_queue(self.shard),
                instrumented(self.agent.role, "shard", self._on_search),
                bindings=self._bindings(self.shard),
                prefetch=self.agent.settings.prefetch,
            )
        )
        self._declared.add(self.shard)

    def _bindings(self, shard: int) -> list[tuple[str, str]]:
        topology = self.agent.transport.topology
        return [(topology.shards, topology.shard_key(shard))]

    async def _declare(self, shards: list[int]) -> None:
        """Declare the queues of ``shards`` before searches are routed to them: a shard
        none of whose replicas has consumed yet (one starting, one added) would have no
        queue, and the broker would drop its searches; declared, they wait for it."""
        topology = self.agent.transport.topology
        for shard in shards:
            if shard not in self._declared:
                await self.agent.transport.declare(
                    topology.shard_queue(shard), bindings=self._bindings(shard)
                )
                self._declared.add(shard)

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
            probes, check = await asyncio.to_thread(
                prove_edge, probes, keyring, agent._edge_keys, timings
            )
            start = request.start if isinstance(request, wire.EncryptedProbePart) else 0
            faces, seconds = await asyncio.to_thread(
                search_faces, probes, gallery, request.subject, start
            )
        except (
            CiphertextError,
            ConfigError,
            EmbeddingError,
            KeyMismatchError,
            MessageTooLargeError,
            WireFormatError,
        ) as exc:
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
            # search's piece fields say where they sit in the whole probe. A packed
            # probe is whole: each shard expands it (`prove_edge`).
            edge = (
                probe
                if probe.packed is not None
                else dataclasses.replace(probe, dimensions=len(probe.columns))
            )
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
        targets = self.targets(request.subject)
        await self._declare(targets)
        for shard in targets:
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
                probes, check = await asyncio.to_thread(
                    prove_edge, probes, keyring, agent._edge_keys, timings
                )
                faces, timings["search"] = await asyncio.to_thread(
                    search_faces, probes, gallery, search.subject, search.dims_start
                )
        except (
            CiphertextError,
            ConfigError,
            KeyMismatchError,
            TooManyFacesError,
            WireFormatError,
        ) as exc:
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
        # A whole probe from the queue is fanned out without dimensions (all zero).
        whole = search.pieces == 1 and (search.dims_stop, search.dimensions) == (0, 0)
        if edge.packed is not None:
            if not whole:
                raise ConfigError(f"{name}: a packed probe is never a piece")
            return [(None, 1.0, edge)]
        columns = len(edge.columns)
        dimensions = columns if whole else search.dimensions
        if not whole and search.dims_stop != search.dims_start + columns:
            raise ConfigError(f"{name}: the piece's dimensions")
        check_piece(
            name,
            piece=search.piece,
            pieces=search.pieces,
            start=search.dims_start,
            columns=columns,
            dimensions=dimensions,
            norm=edge.norm is not None,
        )
        return [(None, 1.0, dataclasses.replace(edge, dimensions=dimensions))]

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


def _announced(shard_map: wire.ShardMap) -> wire.ShardMap:
    """``shard_map`` as its context announced it (a list sent in parts left out)."""
    if not shard_map.subject_parts:
        return shard_map
    return dataclasses.replace(shard_map, subjects=(), subject_homes=())
