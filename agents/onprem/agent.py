"""The on-prem agent: holds the secret key, enrolls faces, turns encrypted scores into events.

What leaves on-prem: the public context (no secret key; the Galois keys for edge
probes: complex conjugation and, when they fit, the expansion's automorphisms), the
encrypted gallery blocks, and verification events carrying only the
decision and a noise-flooded distance rounded to a few decimals, all signed with
on-prem's Ed25519 key. Exact decryptions never leave: with CKKS they would help an
observer recover the secret key, and nothing is decrypted that fails the integrity
checks of `cipherface.gallery.integrity` (nor before a probe's score parts are all in:
`agents.onprem.gathering`).

Scores, rejections and sync requests are accepted only from replicas in the
trust store, and a sync is answered to the asking replica alone, at most once
per `Settings.sync_interval`, from the book's cached ciphertexts.

Keys: the CKKS keys and their book live in `Settings.key_dir`; during a key
rotation (`agents.onprem.rotation`) on-prem holds two key sets and decrypts
scores under whichever the replica used (the envelope's fingerprint).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from agents.onprem.answers import Answer, cloud_timings, decide, rank_faces
from agents.onprem.enrollment import EnrollReport, add_photos
from agents.onprem.gathering import Gathered, Gathering
from agents.onprem.keys import KeySet, generate_keys, write_keys
from agents.onprem.shards import ShardKeeper
from cipherface import wire
from cipherface.config import Settings
from cipherface.crypto import Keyring
from cipherface.daemon import cancel_and_wait
from cipherface.embedding import threshold
from cipherface.exceptions import (
    ConfigError,
    IntegrityError,
    KeyMismatchError,
    SignatureError,
)
from cipherface.gallery import EnrollmentBook, compact
from cipherface.ledger import Claim, ProbeLedger
from cipherface.metrics import (
    DEAD_LETTERS,
    GALLERY_TEMPLATES,
    INTEGRITY_FAILURES,
    LEDGER_SIZE,
    PROBE_AGE,
    SYNCS,
    instrumented,
)
from cipherface.private import check_private_tree, private_dir, write_private
from cipherface.sharding import Merged
from cipherface.signing import SigningKey, TrustStore
from cipherface.transport.base import Consumer, Delivery, Transport

__all__ = [
    "OPS_INTERVAL",
    "KeySet",
    "OnPremAgent",
    "generate_keys",
    "read_replica_status",
    "write_keys",
]

log = logging.getLogger(__name__)

#: Seconds between two rounds of on-prem's housekeeping (gauges, rotation requests).
OPS_INTERVAL = 2.0


def read_replica_status(path: Path) -> dict[str, wire.ReplicaStatus]:
    """What each replica last reported (`OnPremAgent.replicas`), from on-prem's folder."""
    try:
        raw = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {name: wire.ReplicaStatus.from_body(body) for name, body in raw.items()}


class OnPremAgent:
    """Enrolls faces and answers the cloud's encrypted scores with verification events."""

    role = "onprem"

    def __init__(self, settings: Settings, transport: Transport) -> None:
        self.settings = settings
        self.transport = transport
        if not settings.secret_key_path.exists():
            raise ConfigError(
                f"no secret key at {settings.secret_key_path}; run 'cipherface keygen' first"
            )
        # Keys, book, ledger and trust store: refused at start if any is readable by others.
        check_private_tree(private_dir(settings.onprem_dir))
        from agents.onprem.rotation import KeyRotation

        #: Key sets by fingerprint: the current one, and a rotation's new or old one.
        self.keys: dict[str, KeySet] = {}
        self.current = self._add_keys(KeySet.load(settings.key_dir, settings))
        #: What syncs and enrollments publish: the current keys, or a rotation's new ones.
        self.publishing = self.current
        self.rotation = KeyRotation(self)
        self.signer = SigningKey.load(settings.signing_key_path, "onprem")
        self.trusted = TrustStore(settings.trust_store_path)
        self.embedder = settings.embedder()
        self.threshold = threshold(settings.model, settings.metric.value)
        self.ledger = ProbeLedger(
            settings.ledger_path, window=settings.ledger_window, max_events=settings.ledger_max
        )
        self._consumers: list[Consumer] = []
        #: Probes whose scores come in parts, pieces or from shards, held unacked within
        #: the results prefetch (sized from the gallery: `Gathering.for_onprem`).
        self.gathering = Gathering.for_onprem(settings, self.keys, self.current)
        self._publishing = asyncio.Lock()
        #: Per replica: when its last sync answer started.
        self._synced: dict[str, float] = {}
        #: Per replica: its last `wire.ReplicaStatus` (also in `Settings.replica_status_path`).
        self.replicas = read_replica_status(settings.replica_status_path)
        self.status_changed = asyncio.Event()
        self.shards = ShardKeeper(self)
        self._ops_task: asyncio.Task[None] | None = None
        self.started = False

    def _add_keys(self, keys: KeySet) -> KeySet:
        self.keys[keys.fingerprint] = keys
        return keys

    @property
    def keyring(self) -> Keyring:
        """The CKKS keys in use."""
        return self.current.keyring

    @property
    def book(self) -> EnrollmentBook:
        """The enrollment book of the keys in use."""
        return self.current.book

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """For ``/readyz``: started and connected to the broker."""
        connected = bool(getattr(self.transport, "connected", True))
        details = {"broker": connected, "started": self.started, "templates": len(self.book)}
        return self.started and connected, details

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Serve sync requests and results."""
        # The reader of compressed scores compiles (or loads from numba's cache) here,
        # not on the first probe's result.
        await asyncio.to_thread(compact.warm)
        if self.current.decryptor is not None:
            pids = await asyncio.to_thread(self.current.decryptor.warm)
            log.info("decryption workers started: %s", sorted(pids))
        topology = self.transport.topology
        self._consumers.append(
            await self.transport.consume(
                topology.results,
                instrumented(self.role, "results", self._on_result),
                prefetch=self.gathering.window,
            )
        )
        self._consumers.append(
            await self.transport.consume(
                topology.sync, instrumented(self.role, "sync", self._on_sync), prefetch=1
            )
        )
        await self.rotation.resume()
        await self.shards.start()
        self._ops_task = asyncio.create_task(self._housekeeping())
        self.started = True
        log.info(
            "on-prem started (key=%s, templates=%d, model=%s, metric=%s)",
            self.keyring.fingerprint,
            len(self.book),
            self.settings.model,
            self.settings.metric.value,
        )

    async def stop(self) -> None:
        """Drain in-flight work, let a sync being published stop between two blocks,
        then close the stores (never under a worker thread still using them)."""
        self.started = False
        if self._ops_task is not None:
            await cancel_and_wait(self._ops_task)
        await self.rotation.stop()
        await self.shards.stop()
        self.gathering.stop()
        for consumer in self._consumers:
            await consumer.cancel(timeout=30)
        self._consumers.clear()
        async with self._publishing:  # an enrollment's publishing, if one runs
            self.ledger.close()
            for keys in self.keys.values():
                keys.close()

    async def _housekeeping(self) -> None:
        """Gauges, and a rotation requested by ``cipherface rotate-keys``, every few seconds."""
        while True:
            try:
                GALLERY_TEMPLATES.labels(self.role).set(len(self.book))
                LEDGER_SIZE.labels(self.role).set(len(self.ledger))
                depth = await self.transport.queue_depth(self.transport.topology.dead_letters)
                if depth is not None:
                    DEAD_LETTERS.labels(self.role).set(depth)
                self.rotation.poll_request()
            except Exception as exc:  # housekeeping must never stop the daemon
                log.warning("housekeeping: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(OPS_INTERVAL)

    # -- enrollment -------------------------------------------------------------------
    async def enroll(
        self,
        folder: Path,
        *,
        labels: Mapping[str, str] | None = None,
        progress: bool = True,
    ) -> EnrollReport:
        """Embed every new image under ``folder``, add it to the book, publish changed blocks.

        The subject is ``labels[file name]`` when given, else the sub-folder name, else
        the file stem. Incremental and idempotent: a photo whose content is enrolled
        already (template ids end with ``@`` and its content digest) is skipped, so a
        folder may be enrolled again after photos were added. Photos that are no image,
        show no face or more than one face (whose would it be?) are skipped, each with
        its reason.
        """
        if not folder.is_dir():
            raise ConfigError(f"{folder}: no such folder")
        self.rotation.refuse_changes()
        self.shards.refuse_changes()
        self.book.refresh()
        report = await add_photos(self.book, self.embedder, folder, labels, progress)
        report.blocks_published = await self.publish_gallery(self.book.pending_blocks())
        return report

    async def remove(
        self, subject: str | None = None, *, template_id: str | None = None
    ) -> EnrollReport:
        """Withdraw a subject (every template) or one template, and republish its blocks.

        The book overwrites the removed embedding on disk (`EnrollmentBook.remove`);
        each changed block is re-encrypted at a new version, which replicas keep in
        place of the old one.
        """
        self.rotation.refuse_changes()
        self.shards.refuse_changes()
        self.book.refresh()
        report = EnrollReport()
        if template_id is not None:
            self.book.remove(template_id)
            report.removed = 1
        elif subject is not None:
            report.removed = self.book.remove_subject(subject)
            if not report.removed:
                raise ConfigError(f"no enrolled subject {subject!r}")
        else:
            raise ConfigError("remove needs a subject or a template id")
        report.blocks_published = await self.publish_gallery(self.book.pending_blocks())
        return report

    async def publish_gallery(
        self,
        block_ids: Iterable[int] | None = None,
        *,
        replica: str | None = None,
        keys: KeySet | None = None,
        shard: int | None = None,
    ) -> int:
        """Publish the public context, then the given blocks (all when None), in chunks,
        each to its shard's replicas, or to ``replica`` only (its shard's blocks);
        under `publishing` (the current keys, or a rotation's new ones) unless ``keys``
        (`agents.onprem.shards.ShardKeeper.publish`)."""
        if replica is not None and shard is None:
            shard = self.replicas[replica].shard if replica in self.replicas else 0
        ids = None if block_ids is None else list(block_ids)
        return await self.shards.publish(ids, replica=replica, keys=keys, shard=shard)

    def _encode(self, message: wire.Message, keys: KeySet | None = None) -> bytes:
        return wire.encode(
            message,
            fingerprint=(keys or self.current).fingerprint,
            model=self.settings.model,
            metric=self.settings.metric.value,
            signer=self.signer,
            limit=self.settings.max_message_size,
        )

    # -- handlers ---------------------------------------------------------------------
    def _decode(self, delivery: Delivery, *kinds: type[wire.Message]) -> wire.Envelope:
        """A trusted replica's message, under this deployment's size limit (not the default)."""
        return wire.decode(
            delivery.body, expect=kinds, verifier=self.trusted, limit=self.settings.max_message_size
        )

    async def _on_sync(self, delivery: Delivery) -> None:
        envelope = self._decode(delivery, wire.SyncRequest)
        request = envelope.message
        assert isinstance(request, wire.SyncRequest)
        replica = request.replica
        if envelope.signer != replica:
            raise SignatureError(f"replica {envelope.signer!r} asked on behalf of {replica!r}")
        last = self._synced.get(replica)
        if last is not None and (
            request.requested_at <= last or time.time() < last + self.settings.sync_interval
        ):
            # The last answer to this replica started after it asked, or so recently
            # that it still sits in the replica's durable queue: it serves this one too.
            SYNCS.labels("coalesced").inc()
            log.info("sync from %s coalesced into the answer of %.0f", replica, last)
            return
        self._synced[replica] = time.time()
        SYNCS.labels("answered").inc()
        log.info("replica %s asks for the gallery", replica, extra={"replica": replica})
        # Only to that replica, from the book's cached ciphertexts: no re-encryption.
        await self.publish_gallery(replica=replica, shard=request.shard)

    def _on_status(self, signer: str, status: wire.ReplicaStatus) -> None:
        if signer != status.replica:
            raise SignatureError(f"replica {signer!r} reported on behalf of {status.replica!r}")
        self.replicas[status.replica] = status
        write_private(
            self.settings.replica_status_path,
            json.dumps({n: s.body() for n, s in sorted(self.replicas.items())}).encode(),
        )
        self.status_changed.set()
        self.shards.on_status(status)
        log.info(
            "replica %s serves %d template(s) in %d block(s), %d awaited",
            status.replica,
            status.templates,
            len(status.blocks),
            status.awaiting,
            extra={"replica": status.replica, "fingerprint": status.fingerprint},
        )

    async def _on_result(self, delivery: Delivery) -> None:
        envelope = self._decode(delivery, wire.ScoresReady, wire.ProbeRejected, wire.ReplicaStatus)
        result = envelope.message
        if isinstance(result, wire.ReplicaStatus):
            self._on_status(envelope.signer, result)
            return
        assert isinstance(result, (wire.ScoresReady, wire.ProbeRejected))
        if isinstance(result, wire.ScoresReady):
            if self.ledger.seen(result.probe_id, result.request):
                # A replayed piece of a probe answered already: nothing to hold it for.
                log.info("probe %s already has its event; piece dropped", result.probe_id)
                return
            reported = self.replicas.get(envelope.signer)
            if reported is not None and reported.shard != result.shard:
                # A replica answering for another shard could replace that shard's answer.
                error = f"replica {envelope.signer} serves shard {reported.shard}"
                return await self._answer(
                    envelope, result, error=f"{error}, not shard {result.shard}"
                )
            self.shards.follow()
            try:
                expected = self.shards.expected(result)
            except IntegrityError as exc:  # an unknown map version: an error, no decision
                return await self._answer(envelope, result, error=str(exc))
            if Gathering.wanted(result) or expected != {result.shard}:
                return await self.gathering.gather(result, envelope, expected, self._gathered)
        await self._answer(envelope, result)

    async def _gathered(self, envelope: wire.Envelope, gathered: Gathered) -> None:
        if gathered.rejected is not None:
            return await self._answer(envelope, gathered.rejected)
        first = next(iter(gathered.answers.values()))
        await self._answer(envelope, first, gathered=gathered)

    async def _answer(
        self,
        envelope: wire.Envelope,
        result: wire.ScoresReady | wire.ProbeRejected,
        *,
        gathered: Gathered | None = None,
        error: str | None = None,
    ) -> None:
        """Publish the one event of a probe (whole: its shards' score parts gathered)."""
        age = time.time() - result.submitted_at
        # Older than the ledger remembers, its event may be out and forgotten.
        forgotten = age > self.settings.ledger_window
        claim = self.ledger.claim(result.probe_id, result.request)
        if claim is Claim.DUPLICATE:
            log.info("probe %s already has its event; duplicate suppressed", result.probe_id)
            return
        try:
            ttl = self.settings.probe_ttl
            if claim is Claim.REUSED:
                # Another probe had this id: answered, never swallowed nor mixed up.
                event = self._event(
                    result, error="DuplicateProbeId: another probe already used this probe id"
                )
            elif isinstance(result, wire.ProbeRejected):
                if forgotten and result.error == "Expired":
                    log.warning("probe %s is %.0fs old: dropped", result.probe_id, age)
                    return
                event = self._event(result, error=f"{result.error}: {result.reason}")
            else:
                keys = self.keys.get(envelope.fingerprint)
                if keys is None:
                    raise KeyMismatchError(self.keyring.fingerprint, envelope.fingerprint)
                started = time.perf_counter()
                keys.book.refresh()  # `cipherface enroll` may have run beside this daemon
                answers = gathered.answers if gathered else {result.shard: result}
                try:
                    if error or (gathered and gathered.error):
                        raise IntegrityError(error or gathered.error)  # type: ignore[union-attr]
                    merged = self.shards.merge(answers, keys)
                    ranked = await self.rotation.using(
                        keys,
                        rank_faces,
                        keys.keyring,
                        keys.book,
                        merged.scores,
                        top_k=self.settings.top_k,
                        max_faces=self.settings.max_faces,
                        decryptor=keys.decryptor,
                    )
                except IntegrityError as exc:
                    # Nothing derived from a tampered decryption leaves on-prem: the
                    # event names the failure and carries no distance, for any face.
                    INTEGRITY_FAILURES.labels(self.role, envelope.signer).inc()
                    log.warning(
                        "probe %s from %s refused: %s", result.probe_id, envelope.signer, exc
                    )
                    event = self._event(result, error=f"IntegrityError: {exc}")
                else:
                    if forgotten:
                        log.warning("probe %s is %.0fs old: dropped", result.probe_id, age)
                        return
                    if ttl and age > ttl:
                        # Integrity first (above); then an answer too late is no decision.
                        expired = f"Expired: scored {age:.0f}s after submission, ttl {ttl:.0f}s"
                        event = self._event(result, error=expired)
                    else:
                        scores = merged.scores
                        answer = decide(scores, ranked, self.threshold, self.settings.metric)
                        timings = cloud_timings(result)
                        timings["decrypt"] = time.perf_counter() - started
                        event = self._event(result, answer=answer, timings=timings, merged=merged)
            await self.transport.publish(
                self.transport.topology.events,
                event.routing_key,
                wire.encode(
                    event,
                    model=self.settings.model,
                    metric=self.settings.metric.value,
                    signer=self.signer,
                ),
                message_id=wire.message_id(event.probe_id, event.request),
            )
            self.ledger.record(result.probe_id, time.time(), result.request)
            PROBE_AGE.labels(self.role).observe(max(age, 0.0))
            log.info(
                "probe %s: %s",
                event.probe_id,
                event.routing_key,
                extra={
                    **{k: getattr(event, k) for k in ("probe_id", "mode", "subject", "error")},
                    **{"verified": event.verified, "age": round(age, 3)},
                    **{"outcome": event.routing_key.rsplit(".", 1)[-1], "faces": len(event.faces)},
                    **{"replica": envelope.signer, "fingerprint": envelope.fingerprint},
                },
            )
        finally:
            self.ledger.release(result.probe_id, result.request)

    def _event(
        self,
        result: wire.ScoresReady | wire.ProbeRejected,
        *,
        answer: Answer | None = None,
        error: str | None = None,
        timings: Mapping[str, float] | None = None,
        merged: Merged | None = None,
    ) -> wire.VerificationEvent:
        answer = answer or Answer(error=error)
        return wire.VerificationEvent(
            probe_id=result.probe_id,
            mode="1:1" if result.subject is not None else "1:N",
            subject=answer.subject or result.subject,
            verified=answer.verified,
            distance=answer.distance,
            faces=answer.faces,
            face=answer.face,
            threshold=self.threshold,
            model=self.settings.model,
            metric=self.settings.metric.value,
            error=answer.error,
            timings={**(timings or {}), "total": time.time() - result.submitted_at},
            request=result.request,
            partial=merged.partial if merged else False,
            searched=merged.searched if merged else 1.0,
        )
