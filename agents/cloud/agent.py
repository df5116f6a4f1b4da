"""The cloud agent: holds the encrypted gallery, embeds probes, computes encrypted scores.

It never holds a secret key: the context it accepts is refused if it carries
one. It keeps the public context and the encrypted blocks in SQLite under its
data folder, so a restart serves probes at once from what it stored.

Trust: the replica is started with on-prem's Ed25519 verify key pinned
(`Settings.onprem_key`) and takes no context, block or key rotation that key
did not sign (dead letter with the reason); it signs what it sends on-prem with
its own key (``signing.key`` in its folder; its ``.pub`` goes into on-prem's
trust store with ``cipherface trust add``). An edge-encrypted probe that comes
packed it first expands into columns; for every edge probe it also sends on-prem
the probe's encrypted norms, so on-prem can refuse a forged one.

Scale-out: every replica has its own durable gallery queue bound to the gallery
exchange (broadcasts and its own key), so each holds the whole gallery; replicas
compete for probes on the shared probe queue. A replica that starts asks on-prem for a full sync; it
begins consuming probes only once it holds every block on-prem announced. Its
name, key and store come from an identity it holds in the data folder
(`cipherface.replica`), created on first start. Key rotation: a context under a
new key (issued after the one held) starts a gallery *beside* the one served
(`agents.cloud.staged`, its own SQLite file); probes are searched on the old gallery until every
announced block of the new one is in, then the replica switches in one step, waits
for the probes still searching the old one, and drops it. After each change it
reports what it serves (`wire.ReplicaStatus`, on the results queue).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agents.cloud.probes import Probe, digest_of
from agents.cloud.shards import ShardRole
from agents.cloud.staged import Staged, stage
from agents.cloud.syncing import held_version, keep_synced
from cipherface import wire
from cipherface.config import Settings
from cipherface.crypto import Keyring
from cipherface.daemon import cancel_and_wait, finish_in_thread
from cipherface.embedding_cache import EmbeddingCache
from cipherface.embedding_pool import probe_embedder
from cipherface.exceptions import ConfigError, KeyMismatchError, SignatureError, TransportError
from cipherface.gallery import EncryptedGallery
from cipherface.metrics import BLOCKS_AWAITED, GALLERY_TEMPLATES, PROBE_AGE, instrumented
from cipherface.replica import claim
from cipherface.signing import PinnedKey, SigningKey, VerifyKey
from cipherface.store import GalleryStore
from cipherface.transport.base import Consumer, Delivery, Transport

__all__ = ["CURRENT_STORE", "SYNC_RETRY", "CloudAgent"]

#: In a replica's folder: the name of the store file it serves from (``gallery.sqlite``
#: unless a key rotation switched to another).
CURRENT_STORE = "current-store"

log = logging.getLogger(__name__)

#: Seconds without a chunk after which a replica missing announced blocks asks for a
#: sync again (`agents.cloud.syncing`; on-prem coalesces and rate-limits them).
SYNC_RETRY = 15.0


class CloudAgent:
    """Consumes the gallery and probes; publishes encrypted scores for on-prem."""

    role = "cloud"

    def __init__(self, settings: Settings, transport: Transport) -> None:
        try:
            onprem_key = VerifyKey.load(settings.onprem_verify_key_path)
        except ConfigError as exc:
            raise ConfigError(
                f"a cloud replica needs on-prem's verify key pinned: {exc} "
                "(copy on-prem's signing.pub there or set CIPHERFACE_ONPREM_KEY)"
            ) from None
        #: This replica's identity, held (flock) until `stop`.
        self.identity = claim(settings.data_dir, settings.replica)
        self.replica = self.identity.name
        self.settings = settings = settings.override(replica=self.replica)
        self.transport = transport
        self.embedder = EmbeddingCache(probe_embedder(settings))
        self.onprem = PinnedKey(onprem_key)
        self.signer = SigningKey.load_or_create(settings.replica_key_path, self.replica)
        self._store_path = self._current_store()
        self.store = GalleryStore(self._store_path)
        self.keyring: Keyring | None = None
        #: The serialized public context behind `keyring`, as on-prem sent it.
        self._context = b""
        #: When on-prem issued the context this replica holds (a key change must be newer).
        self._issued_at = 0.0
        #: The Galois keys on-prem ships with the context (``conjugation_key`` on the
        #: wire): complex conjugation, to prove edge probes' norms, and, when they fit
        #: on-prem's message cap, the automorphisms that expand packed edge probes.
        self._edge_keys = b""
        self.gallery: EncryptedGallery | None = None
        self._awaiting: set[int] = set()
        #: Blocks arriving in chunks (`wire.BlockAssembler`), until each is whole.
        self._chunks = wire.BlockAssembler(installed=self._held_version)
        #: A new key's gallery being received beside the served one (key rotation).
        self._staged: Staged | None = None
        self.ready = asyncio.Event()
        self._consumers: list[Consumer] = []
        self._probe_task: asyncio.Task[None] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        #: Probes searching each gallery now: the old one is closed after its last.
        self._searching: collections.Counter[int] = collections.Counter()
        self._searched = asyncio.Condition()
        #: Probes this replica answered (scores or rejection) since it started.
        self.probes_served = 0
        self.serving = False  # consuming probes (once it holds a whole gallery)
        #: Its shard, on-prem's shard map, the fan-out of probes (`agents.cloud.shards`).
        self.shards = ShardRole(self)

    def _current_store(self) -> Path:
        """The store file served from; stale ones (an interrupted rotation) are deleted."""
        folder = self.settings.cloud_dir
        pointer = folder / CURRENT_STORE
        name = pointer.read_text().strip() if pointer.exists() else "gallery.sqlite"
        for path in folder.glob("gallery*.sqlite*"):
            if not path.name.startswith(name):
                path.unlink()
        return folder / name

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """For ``/readyz``: connected, and every block on-prem announced is held (and
        the subject list its shard map announced)."""
        connected = bool(getattr(self.transport, "connected", True))
        held = self.gallery is not None and not self._awaiting and self.shards.routable
        details = {
            "broker": connected,
            "replica": self.replica,
            "awaiting": len(self._awaiting),
            "templates": len(self.gallery or ()),
            "serving": self.serving,
        }
        return connected and held and self.serving, details

    async def start(self) -> None:
        """Load what is stored, subscribe to the gallery, ask for a sync, then serve probes.

        The stored gallery is loaded in a thread (a large one takes a while), so the
        connection's heartbeats go on meanwhile.
        """
        stored = self.store.load_context()
        if stored is not None:
            await finish_in_thread(self._install_context, stored, self.store.conjugation_key())
            self._issued_at = self.store.issued_at()
            if len(self.gallery or ()) > 0:
                self.ready.set()
                await self._report()
        topology = self.transport.topology
        self._consumers.append(
            await self.transport.consume(
                topology.gallery_queue(self.replica),
                instrumented(self.role, "gallery", self._on_gallery),
                bindings=topology.gallery_bindings(self.replica, self.shards.shard),
                prefetch=1,  # blocks are applied in order
            )
        )
        await self._ask_sync()
        self._sync_task = asyncio.create_task(
            keep_synced(self._missing, self._chunks, self._ask_sync, SYNC_RETRY)
        )
        self._probe_task = asyncio.create_task(self._serve_probes_when_ready())
        log.info(
            "cloud replica %s started (model=%s, metric=%s, templates=%d)",
            self.replica,
            self.settings.model,
            self.settings.metric.value,
            len(self.gallery or ()),
        )

    async def _ask_sync(self) -> None:
        request = wire.SyncRequest(
            replica=self.replica,
            fingerprint=self.keyring.fingerprint if self.keyring else "",
            requested_at=time.time(),
            shard=self.shards.shard,
        )
        await self.transport.send(
            self.transport.topology.sync, wire.encode(request, signer=self.signer)
        )

    def _missing(self) -> int:
        """Announced blocks not held, plus one for a subject list still in parts
        (-1 before the first whole gallery): a sync sends both again."""
        staged = len(self._staged.awaiting) if self._staged is not None else 0
        parts = 0 if self.shards.routable else 1
        return len(self._awaiting) + staged + parts if self.ready.is_set() else -1

    def _held_version(self, fingerprint: str, block_id: int) -> int:
        staged = self._staged
        galleries = [(self.gallery, self.keyring.fingerprint if self.keyring else "")]
        if staged is not None:
            galleries.append((staged.gallery, staged.keyring.fingerprint))
        return held_version(galleries, fingerprint, block_id)

    async def _serve_probes_when_ready(self) -> None:
        await self.ready.wait()
        self._consumers.append(
            await self.transport.consume(
                self.transport.topology.probes,
                instrumented(self.role, "probes", self._on_probe),
                prefetch=self.settings.prefetch,
            )
        )
        await self.shards.consume()
        self.serving = True
        self.shards.schedule_drops()
        log.info("serving probes with %d templates", len(self.gallery or ()))

    async def stop(self) -> None:
        """Stop consuming, drain in-flight work, close the stores, give the identity back.

        A block being stored when the drain times out is finished first (its
        thread is never left using a closed store); the delivery is requeued.
        """
        # Awaited: a consumer still being declared must be in `_consumers` or gone
        # before they are cancelled, and a sync request not half-sent.
        await cancel_and_wait(*(t for t in (self._probe_task, self._sync_task) if t is not None))
        self.shards.stop()
        for consumer in self._consumers:
            await consumer.cancel(timeout=30)
        self._consumers.clear()
        self._drop_staged()
        self._close_gallery()
        self.store.close()
        await asyncio.to_thread(self.embedder.close)
        self.identity.release()

    async def _report(self) -> None:
        """Tell on-prem what this replica serves (`wire.ReplicaStatus`)."""
        layouts = self.gallery._layouts if self.gallery is not None else {}
        GALLERY_TEMPLATES.labels(self.role).set(len(self.gallery or ()))
        BLOCKS_AWAITED.labels(self.role).set(len(self._awaiting))
        status = wire.ReplicaStatus(
            replica=self.replica,
            fingerprint=self.keyring.fingerprint if self.keyring else "",
            blocks=tuple(sorted(layouts)),
            versions=tuple(layouts[b].version for b in sorted(layouts)),
            templates=len(self.gallery or ()),
            awaiting=len(self._awaiting),
            staged=self._staged.keyring.fingerprint if self._staged else "",
            shard=self.shards.shard,
            map_version=self.shards.version,
        )
        try:
            body = wire.encode(status, signer=self.signer)
            await self.transport.send(self.transport.topology.results, body)
        except TransportError as exc:  # a report is not worth failing the gallery message
            log.warning("could not report to on-prem: %s", exc)

    # -- gallery ----------------------------------------------------------------------
    def _install_context(
        self, data: bytes, conjugation_key: bytes, claimed: str | None = None
    ) -> None:
        keyring = Keyring.from_bytes(data, expect="public")
        if claimed is not None:
            keyring.check(claimed)
        if self.keyring is not None and self.keyring.fingerprint == keyring.fingerprint:
            # The same key, serialized anew: keep the gallery.
            self.store.save_context(data, keyring.fingerprint, conjugation_key)
            self._context, self._edge_keys = data, conjugation_key
            return
        stored = self.store.context_fingerprint()
        if stored is not None and stored != keyring.fingerprint:
            # Blocks under the old key are useless under the new one: start afresh.
            log.warning(
                "key changed from %s to %s: dropping the old gallery", stored, keyring.fingerprint
            )
            self._close_gallery()
            self.store.close()
            self._store_path.unlink()
            self.store = GalleryStore(self._store_path)
        self.store.save_context(data, keyring.fingerprint, conjugation_key)
        self.gallery = EncryptedGallery(
            keyring,
            self.store,
            workers=self.settings.workers,
            compress=self.settings.compress_scores,
        )
        self._edge_keys = conjugation_key
        self.keyring = keyring
        self._context = data

    def _close_gallery(self) -> None:
        if self.gallery is not None:
            self.gallery.close()
            self.gallery = None

    def _drop_staged(self) -> None:
        staged, self._staged = self._staged, None
        if staged is not None:
            staged.gallery.close()
            staged.store.close()
            staged.store.path.unlink(missing_ok=True)

    async def _switch(self) -> None:
        """Serve the staged gallery, now whole; close the old one after its last probe."""
        staged, self._staged = self._staged, None
        assert staged is not None
        old_gallery, old_store = self.gallery, self.store
        self.keyring, self.gallery, self.store = staged.keyring, staged.gallery, staged.store
        self._context, self._edge_keys = staged.context, staged.conjugation_key
        self._store_path = staged.store.path
        self.store.save_issued_at(self._issued_at)
        (self.settings.cloud_dir / CURRENT_STORE).write_text(self._store_path.name + "\n")
        log.warning("replica %s switched to key %s", self.replica, self.keyring.fingerprint)
        if old_gallery is not None:
            async with self._searched:
                await self._searched.wait_for(lambda: not self._searching[id(old_gallery)])
            old_gallery.close()
        old_store.close()
        old_store.path.unlink(missing_ok=True)

    async def _on_context(self, message: wire.ContextUpdate, fingerprint: str) -> None:
        self.shards.check_context(message)  # another shard's context changes nothing
        held = self.keyring.fingerprint if self.keyring else ""
        staged = self._staged.keyring.fingerprint if self._staged else ""
        if message.issued_at < self._issued_at and fingerprint not in (held, staged):
            # A replayed context of an older key would drop the current gallery.
            raise SignatureError(f"context for key {fingerprint} was issued before the one held")
        if fingerprint == staged and self._staged is not None:
            self._staged.awaiting = set(message.blocks)
        elif fingerprint != held and self.ready.is_set() and self.gallery is not None:
            # A key rotation while serving: fill the new gallery beside this one.
            self._drop_staged()
            self._staged = await finish_in_thread(
                stage,
                self.settings,
                message.context,
                message.conjugation_key,
                fingerprint,
            )
            self._staged.awaiting = set(message.blocks)
            if not message.blocks:  # an empty gallery is whole at once
                await self._switch()
                await self._report()
        else:
            # Every enrollment and sync re-announces the context: parse and check it
            # only when its bytes differ from the context this replica holds.
            if message.context != self._context:
                await finish_in_thread(
                    self._install_context, message.context, message.conjugation_key, fingerprint
                )
            self._awaiting = set(message.blocks)
        if message.issued_at > self._issued_at:
            self._issued_at = message.issued_at
            self.store.save_issued_at(message.issued_at)
        self.shards.take_map(message)  # only from a context accepted above

    async def _on_gallery(self, delivery: Delivery) -> None:
        # Only what on-prem signed: a forged context (a "key rotation") or block,
        # even well-formed, is dead-lettered with the reason and changes nothing.
        envelope = wire.decode(
            delivery.body,
            expect=(wire.ContextUpdate, wire.SubjectsPart, wire.BlockChunk),
            verifier=self.onprem,
            limit=self.settings.max_message_size,
        )
        message, fingerprint = envelope.message, envelope.fingerprint
        was_awaiting = bool(self._awaiting)
        if isinstance(message, wire.ContextUpdate):
            await self._on_context(message, fingerprint)
        elif isinstance(message, wire.SubjectsPart):
            self.shards.take_subjects(message)
        elif isinstance(message, wire.BlockChunk):
            staged = self._staged
            if staged is None or fingerprint != staged.keyring.fingerprint:
                if self.gallery is None or self.keyring is None:
                    raise KeyMismatchError("(none)", fingerprint)
                self.keyring.check(fingerprint)
            self.shards.check_block(
                message.block_id, self._awaiting | (staged.awaiting if staged else set())
            )
            # Checked against the block's other chunks; installed once whole.
            if (block := self._chunks.add(message, fingerprint)) is None:
                return
            if staged is not None and fingerprint == staged.keyring.fingerprint:
                await finish_in_thread(staged.gallery.put, block)
                staged.awaiting.discard(block.block_id)
                if not staged.awaiting:
                    await self._switch()
                    await self._report()
                return
            assert self.gallery is not None
            await finish_in_thread(self.gallery.put, block)
            self._awaiting.discard(block.block_id)
        BLOCKS_AWAITED.labels(self.role).set(len(self._awaiting))
        # Whole: every block announced, and the map's subject list to route claims by.
        if self.gallery is not None and not self._awaiting and self.shards.routable:
            first = not self.ready.is_set()
            self.ready.set()
            if first or was_awaiting:
                await self._report()

    # -- probes -----------------------------------------------------------------------
    async def _on_probe(self, delivery: Delivery) -> None:
        envelope = wire.decode(
            delivery.body,
            expect=(wire.ProbeRequest, wire.EncryptedProbeRequest, wire.EncryptedProbePart),
            limit=self.settings.max_message_size,
        )
        request = envelope.message
        assert isinstance(request, Probe)
        gallery, keyring = self.gallery, self.keyring
        if gallery is None or keyring is None:
            # Only while a key rotation swaps the gallery: try again shortly.
            raise TransportError("the gallery is being replaced")
        digest = digest_of(request, delivery.body)
        # Once per probe, here: not again for each shard's search of it.
        PROBE_AGE.labels(self.role).observe(max(time.time() - request.submitted_at, 0.0))
        if await self._admitted(request, keyring, digest):
            async with self.searching(gallery):
                await self.shards.search(request, gallery, keyring, digest)

    async def _admitted(
        self, request: Probe | wire.ShardSearch, keyring: Keyring, digest: str
    ) -> bool:
        """Whether a probe (or a shard's search of one) may be searched; else its error
        event is sent: a refused probe id or subject, or one older than its TTL."""
        age = time.time() - request.submitted_at
        ttl = self.settings.probe_ttl
        refused = wire.refusal(request)
        if refused is None and ttl and age > ttl:
            # Queued through an outage: an answer now would come too late to mean much.
            reason = f"waited {age:.0f}s in the queue, longer than its {ttl:.0f}s time-to-live"
            refused = ("Expired", reason)
        if refused is not None:
            await self._reject(request, *refused, keyring, digest)
        return refused is None

    @contextlib.asynccontextmanager
    async def searching(self, gallery: EncryptedGallery) -> AsyncIterator[None]:
        """Hold ``gallery`` while it is searched: a key rotation closes it only after."""
        self._searching[id(gallery)] += 1
        try:
            yield
        finally:
            self._searching[id(gallery)] -= 1
            async with self._searched:
                self._searched.notify_all()

    async def _reject(
        self,
        request: Probe | wire.ShardSearch,
        error: str,
        reason: str,
        keyring: Keyring,
        digest: str,
    ) -> None:
        rejected = wire.ProbeRejected.answering(request, error, reason, digest)
        await self._to_onprem(rejected, keyring)
        log.info(
            "probe %s rejected: %s",
            request.probe_id,
            error,
            extra={"probe_id": request.probe_id, "outcome": "rejected", "error": error},
        )

    async def _to_onprem(
        self, message: wire.ScoresReady | wire.ProbeRejected, keyring: Keyring
    ) -> None:
        body = wire.encode(
            message,
            fingerprint=keyring.fingerprint,
            model=self.settings.model,
            metric=self.settings.metric.value,
            signer=self.signer,
            limit=self.settings.max_message_size,
        )
        # Labelled with the probe, so a dead letter of it names the probe.
        await self.transport.send(
            self.transport.topology.results,
            body,
            message_id=wire.message_id(message.probe_id, message.request),
        )
        if not isinstance(message, wire.ScoresReady) or message.part == message.piece == 0:
            self.probes_served += 1  # probes, not parts
