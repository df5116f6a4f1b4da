"""The cloud agent: holds the encrypted gallery, embeds probes, computes encrypted scores.

It never holds a secret key: the context it accepts is refused if it carries
one. It keeps the public context and the encrypted blocks in SQLite under its
data folder, so a restart serves probes at once from what it stored.

Trust: the replica is started with on-prem's Ed25519 verify key pinned
(`Settings.onprem_key`) and takes no context, block or key rotation that key
did not sign (dead letter with the reason); it signs what it sends on-prem with
its own key (``signing.key`` in its folder; its ``.pub`` goes into on-prem's
trust store with ``cipherface trust add``). For an edge-encrypted probe it also
sends on-prem the probe's encrypted norms, so on-prem can refuse a forged one.

Scale-out: every replica has its own durable gallery queue bound to the gallery
fanout exchange, so each holds the whole gallery; replicas compete for probes on
the shared probe queue. A replica that starts asks on-prem for a full sync; it
begins consuming probes only once it holds every block on-prem announced.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from cipherface import wire
from cipherface.config import Settings
from cipherface.crypto import Keyring
from cipherface.embedding import Embedder, EmbeddingCache, largest_face
from cipherface.exceptions import (
    ConfigError,
    EmbeddingError,
    KeyMismatchError,
    SignatureError,
    TransportError,
)
from cipherface.gallery import EncryptedGallery
from cipherface.gallery.integrity import prove_probe
from cipherface.metrics import instrumented
from cipherface.signing import PinnedKey, SigningKey, VerifyKey
from cipherface.store import GalleryStore
from cipherface.transport.base import Consumer, Delivery, Transport

__all__ = ["SYNC_RETRY", "CloudAgent"]

log = logging.getLogger(__name__)

#: Seconds between sync requests while the replica still waits for announced blocks
#: (on-prem coalesces and rate-limits them, so a lost answer is asked for again).
SYNC_RETRY = 15.0


class CloudAgent:
    """Consumes the gallery and probes; publishes encrypted scores for on-prem."""

    role = "cloud"

    def __init__(self, settings: Settings, transport: Transport) -> None:
        self.settings = settings
        self.transport = transport
        self.embedder = EmbeddingCache(Embedder(settings.model, settings.detector))
        settings.cloud_dir.mkdir(parents=True, exist_ok=True)
        try:
            onprem_key = VerifyKey.load(settings.onprem_verify_key_path)
        except ConfigError as exc:
            raise ConfigError(
                f"a cloud replica needs on-prem's verify key pinned: {exc} "
                "(copy on-prem's signing.pub there or set CIPHERFACE_ONPREM_KEY)"
            ) from None
        self.onprem = PinnedKey(onprem_key)
        self.signer = SigningKey.load_or_create(settings.replica_key_path, settings.replica)
        self._store_path = settings.cloud_dir / "gallery.sqlite"
        self.store = GalleryStore(self._store_path)
        self.keyring: Keyring | None = None
        #: The serialized public context behind `keyring`, as on-prem sent it.
        self._context = b""
        #: When on-prem issued the context this replica holds (a key change must be newer).
        self._issued_at = 0.0
        #: The Galois key for complex conjugation, with which edge probes are checked.
        self._conjugation_key = b""
        self.gallery: EncryptedGallery | None = None
        self._awaiting: set[int] = set()
        self.ready = asyncio.Event()
        self._consumers: list[Consumer] = []
        self._probe_task: asyncio.Task[None] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        #: Probes this replica answered (scores or rejection) since it started.
        self.probes_served = 0

    async def start(self) -> None:
        """Load what is stored, subscribe to the gallery, ask for a sync, then serve probes."""
        stored = self.store.load_context()
        if stored is not None:
            self._install_context(stored, self.store.conjugation_key())
            self._issued_at = self.store.issued_at()
            if len(self.gallery or ()) > 0:
                self.ready.set()
        topology = self.transport.topology
        self._consumers.append(
            await self.transport.consume(
                topology.gallery_queue(self.settings.replica),
                instrumented(self.role, "gallery", self._on_gallery),
                bindings=topology.gallery_bindings(self.settings.replica),
                prefetch=1,  # blocks are applied in order
            )
        )
        await self._ask_sync()
        self._sync_task = asyncio.create_task(self._sync_until_ready())
        self._probe_task = asyncio.create_task(self._serve_probes_when_ready())
        log.info(
            "cloud replica %s started (model=%s, metric=%s, templates=%d)",
            self.settings.replica,
            self.settings.model,
            self.settings.metric.value,
            len(self.gallery or ()),
        )

    async def _ask_sync(self) -> None:
        request = wire.SyncRequest(
            replica=self.settings.replica,
            fingerprint=self.keyring.fingerprint if self.keyring else "",
            requested_at=time.time(),
        )
        await self.transport.send(
            self.transport.topology.sync, wire.encode(request, signer=self.signer)
        )

    async def _sync_until_ready(self) -> None:
        while not self.ready.is_set():
            try:
                await asyncio.wait_for(self.ready.wait(), SYNC_RETRY)
            except asyncio.TimeoutError:
                log.info(
                    "replica %s still waits for %d block(s): asking again",
                    self.settings.replica,
                    len(self._awaiting),
                )
                await self._ask_sync()

    async def _serve_probes_when_ready(self) -> None:
        await self.ready.wait()
        self._consumers.append(
            await self.transport.consume(
                self.transport.topology.probes,
                instrumented(self.role, "probes", self._on_probe),
                prefetch=self.settings.prefetch,
            )
        )
        log.info("serving probes with %d templates", len(self.gallery or ()))

    async def stop(self) -> None:
        """Stop consuming, drain in-flight probes, close the store."""
        for task in (self._probe_task, self._sync_task):
            if task is not None:
                task.cancel()
        for consumer in self._consumers:
            await consumer.cancel(timeout=30)
        self._consumers.clear()
        self._close_gallery()
        self.store.close()

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
            self._context, self._conjugation_key = data, conjugation_key
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
        self.gallery = EncryptedGallery(keyring, self.store, workers=self.settings.workers)
        self._conjugation_key = conjugation_key
        self.keyring = keyring
        self._context = data

    def _close_gallery(self) -> None:
        if self.gallery is not None:
            self.gallery.close()
            self.gallery = None

    async def _on_gallery(self, delivery: Delivery) -> None:
        # Only what on-prem signed: a forged context (a "key rotation") or block,
        # even well-formed, is dead-lettered with the reason and changes nothing.
        envelope = wire.decode(
            delivery.body, expect=(wire.ContextUpdate, wire.BlockUpdate), verifier=self.onprem
        )
        message = envelope.message
        if isinstance(message, wire.ContextUpdate):
            if message.issued_at < self._issued_at and envelope.fingerprint != (
                self.keyring.fingerprint if self.keyring else ""
            ):
                # A replayed context of an older key would drop the current gallery.
                raise SignatureError(
                    f"context for key {envelope.fingerprint} was issued before the one held"
                )
            # Every enrollment and sync re-announces the context: parse and check it
            # only when its bytes differ from the context this replica holds.
            if message.context != self._context:
                await asyncio.to_thread(
                    self._install_context,
                    message.context,
                    message.conjugation_key,
                    envelope.fingerprint,
                )
            if message.issued_at > self._issued_at:
                self._issued_at = message.issued_at
                self.store.save_issued_at(message.issued_at)
            self._awaiting = set(message.blocks)
        elif isinstance(message, wire.BlockUpdate):
            if self.gallery is None or self.keyring is None:
                raise KeyMismatchError("(none)", envelope.fingerprint)
            self.keyring.check(envelope.fingerprint)
            await asyncio.to_thread(self.gallery.put, message.block)
            self._awaiting.discard(message.block.block_id)
        if self.gallery is not None and not self._awaiting and not self.ready.is_set():
            self.ready.set()

    # -- probes -----------------------------------------------------------------------
    async def _on_probe(self, delivery: Delivery) -> None:
        envelope = wire.decode(
            delivery.body, expect=(wire.ProbeRequest, wire.EncryptedProbeRequest)
        )
        request = envelope.message
        assert isinstance(request, (wire.ProbeRequest, wire.EncryptedProbeRequest))
        gallery, keyring = self.gallery, self.keyring
        if gallery is None or keyring is None:
            # Only while a key rotation swaps the gallery: try again shortly.
            raise TransportError("the gallery is being replaced")
        timings: dict[str, float] = {}
        faces = 1
        check = None
        try:
            if isinstance(request, wire.ProbeRequest):
                started = time.perf_counter()
                found = await asyncio.to_thread(
                    self.embedder.embed, request.image, name=f"probe {request.probe_id}"
                )
                faces = len(found)
                probe: object = np.asarray(largest_face(found).embedding)
                timings["embed"] = time.perf_counter() - started
            else:
                keyring.check(request.probe.fingerprint)
                probe = request.probe
                started = time.perf_counter()
                check = await asyncio.to_thread(
                    prove_probe, keyring, self._conjugation_key, request.probe
                )
                timings["check"] = time.perf_counter() - started
            started = time.perf_counter()
            scores = await asyncio.to_thread(gallery.search, probe, subject=request.subject)  # type: ignore[arg-type]
            timings["search"] = time.perf_counter() - started
        except (EmbeddingError, KeyMismatchError) as exc:
            # Bad input from a user gets an answer (an error event), not silence.
            rejected = wire.ProbeRejected(
                probe_id=request.probe_id,
                subject=request.subject,
                error=type(exc).__name__,
                reason=str(exc),
                submitted_at=request.submitted_at,
            )
            await self._to_onprem(rejected, keyring)
            return
        ready = wire.ScoresReady(
            probe_id=request.probe_id,
            subject=request.subject,
            scores=tuple(scores),
            faces=faces,
            submitted_at=request.submitted_at,
            timings=timings,
            probe_check=check,
        )
        await self._to_onprem(ready, keyring)

    async def _to_onprem(self, message: wire.Message, keyring: Keyring) -> None:
        body = wire.encode(
            message,
            fingerprint=keyring.fingerprint,
            model=self.settings.model,
            metric=self.settings.metric.value,
            signer=self.signer,
        )
        await self.transport.send(self.transport.topology.results, body)
        self.probes_served += 1
