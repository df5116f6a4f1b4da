"""The on-prem agent: holds the secret key, enrolls faces, turns encrypted scores into events.

What leaves on-prem: the public context (no secret key; one Galois key, for
complex conjugation), the encrypted gallery blocks, and verification events
carrying only the decision and a noise-flooded distance rounded to a few
decimals, all signed with on-prem's Ed25519 key. Exact decryptions never leave:
with CKKS they would help an observer recover the secret key, and nothing is
decrypted that fails the integrity checks of `cipherface.gallery.integrity`.

Scores, rejections and sync requests are accepted only from replicas in the
trust store, and a sync is answered to the asking replica alone, at most once
per `Settings.sync_interval`, from the book's cached ciphertexts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cipherface import wire
from cipherface.config import Settings
from cipherface.crypto import Keyring
from cipherface.embedding import Embedder, largest_face, model_spec, threshold
from cipherface.exceptions import ConfigError, EmbeddingError, IntegrityError, SignatureError
from cipherface.gallery import EnrollmentBook, Match, accept, rank
from cipherface.gallery.integrity import conjugation_key, flood
from cipherface.ledger import ProbeLedger
from cipherface.metrics import INTEGRITY_FAILURES, SYNCS, instrumented
from cipherface.private import check_private_tree, private_dir, write_private
from cipherface.signing import SigningKey, TrustStore
from cipherface.transport.base import Consumer, Delivery, Transport

__all__ = [
    "IMAGE_SUFFIXES",
    "EnrollReport",
    "OnPremAgent",
    "generate_keys",
    "subject_of",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


def generate_keys(settings: Settings, *, overwrite: bool = False) -> Keyring:
    """Create on-prem's keys in its private folder (0700; every file 0600).

    The CKKS secret key, the public context (public key only: the packed gallery
    needs neither rotation nor relinearisation keys), the conjugation key replicas
    use to check edge probes, and the Ed25519 signing key with its ``.pub`` half,
    which cloud replicas and event readers pin.
    """
    if settings.secret_key_path.exists() and not overwrite:
        raise ConfigError(
            f"{settings.secret_key_path} exists; refusing to replace keys that encrypt a gallery"
        )
    private_dir(settings.onprem_dir)
    keyring = Keyring.generate(settings.preset)
    keyring.save_secret(settings.secret_key_path)
    keyring.save_public(settings.public_key_path, galois_keys=False, relin_keys=False)
    settings.public_key_path.chmod(0o600)  # public, but the folder's rule has no exceptions
    write_private(settings.conjugation_key_path, conjugation_key(keyring))
    SigningKey.generate("onprem").save(settings.signing_key_path)
    return keyring


def subject_of(path: Path, root: Path) -> str:
    """``root/<subject>/photo.jpg`` -> subject; ``root/photo.jpg`` -> file stem."""
    relative = path.relative_to(root)
    return relative.parts[0] if len(relative.parts) > 1 else path.stem


@dataclass(slots=True)
class EnrollReport:
    """What an enrollment did."""

    enrolled: int = 0
    blocks_published: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


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
        self.keyring = Keyring.load(settings.secret_key_path, expect="secret")
        self.signer = SigningKey.load(settings.signing_key_path, "onprem")
        self.trusted = TrustStore(settings.trust_store_path)
        self._conjugation_key = settings.conjugation_key_path.read_bytes()
        self.embedder = Embedder(settings.model, settings.detector)
        self.threshold = threshold(settings.model, settings.metric.value)
        self.book = EnrollmentBook(
            self.keyring,
            settings.metric,
            model_spec(settings.model).dimensions,
            path=settings.onprem_dir / "book.sqlite",
        )
        self.ledger = ProbeLedger(settings.onprem_dir / "ledger.sqlite")
        self._consumers: list[Consumer] = []
        self._publishing = asyncio.Lock()
        #: Per replica: when its last sync answer started.
        self._synced: dict[str, float] = {}

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Serve sync requests and results."""
        topology = self.transport.topology
        self._consumers.append(
            await self.transport.consume(
                topology.results,
                instrumented(self.role, "results", self._on_result),
                prefetch=self.settings.prefetch * 4,
            )
        )
        self._consumers.append(
            await self.transport.consume(
                topology.sync, instrumented(self.role, "sync", self._on_sync), prefetch=1
            )
        )
        log.info(
            "on-prem started (key=%s, templates=%d, model=%s, metric=%s)",
            self.keyring.fingerprint,
            len(self.book),
            self.settings.model,
            self.settings.metric.value,
        )

    async def stop(self) -> None:
        """Drain in-flight work and close the stores."""
        for consumer in self._consumers:
            await consumer.cancel(timeout=30)
        self._consumers.clear()
        self.ledger.close()
        self.book.close()

    # -- enrollment -------------------------------------------------------------------
    async def enroll(
        self,
        folder: Path,
        *,
        labels: Mapping[str, str] | None = None,
        progress: bool = True,
    ) -> EnrollReport:
        """Embed every image under ``folder``, add it to the book, publish changed blocks.

        The subject is ``labels[file name]`` when given, else the sub-folder name, else
        the file stem. Images that fail (not an image, no face) are skipped and reported.
        """
        report = EnrollReport()
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in tqdm(files, desc="enrolling", unit="img", disable=not progress):
            subject = (labels or {}).get(path.name) or subject_of(path, folder)
            try:
                faces = await asyncio.to_thread(self.embedder.embed, path)
            except EmbeddingError as exc:
                report.skipped.append((str(path), str(exc)))
                log.warning("skipped %s: %s", path, exc)
                continue
            if len(faces) > 1:
                log.warning("%s has %d faces; enrolling the largest", path, len(faces))
            template_id = str(path.relative_to(folder))
            self.book.add(subject, largest_face(faces).embedding, template_id=template_id)
            report.enrolled += 1
        report.blocks_published = await self.publish_gallery(self.book.pending_blocks())
        return report

    async def publish_gallery(
        self, block_ids: Iterable[int] | None = None, *, replica: str | None = None
    ) -> int:
        """Publish the public context, then the given blocks (all when None).

        The context message announces the block ids that follow, so a replica knows
        when it holds the whole gallery. To every replica, or to ``replica`` only.
        """
        topology = self.transport.topology
        key = topology.gallery_broadcast_key if replica is None else topology.gallery_key(replica)
        async with self._publishing:
            self.book.refresh()
            ids = sorted(self.book.all_blocks() if block_ids is None else set(block_ids))
            context = wire.ContextUpdate(
                context=self.keyring.public_bytes(galois_keys=False, relin_keys=False),
                conjugation_key=self._conjugation_key,
                blocks=tuple(ids),
                issued_at=time.time(),
            )
            await self.transport.publish(topology.gallery, key, self._encode(context))
            # Blocks are encrypted (by `workers` processes) while earlier ones are sent.
            blocks = self.book.encrypt_blocks(ids, workers=self.settings.workers)
            try:
                while (block := await asyncio.to_thread(next, blocks, None)) is not None:
                    update = self._encode(wire.BlockUpdate(block=block))
                    await self.transport.publish(topology.gallery, key, update)
            finally:
                blocks.close()  # shuts the worker pool down if publishing failed
            log.info("published context and %d block(s)", len(ids))
            return len(ids)

    def _encode(self, message: wire.Message) -> bytes:
        return wire.encode(
            message,
            fingerprint=self.keyring.fingerprint,
            model=self.settings.model,
            metric=self.settings.metric.value,
            signer=self.signer,
        )

    # -- handlers ---------------------------------------------------------------------
    async def _on_sync(self, delivery: Delivery) -> None:
        envelope = wire.decode(delivery.body, expect=(wire.SyncRequest,), verifier=self.trusted)
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
        log.info("replica %s asks for the gallery", replica)
        # Only to that replica, from the book's cached ciphertexts: no re-encryption.
        await self.publish_gallery(replica=replica)

    async def _on_result(self, delivery: Delivery) -> None:
        envelope = wire.decode(
            delivery.body, expect=(wire.ScoresReady, wire.ProbeRejected), verifier=self.trusted
        )
        result = envelope.message
        assert isinstance(result, (wire.ScoresReady, wire.ProbeRejected))
        if not self.ledger.claim(result.probe_id):
            log.info("probe %s already has its event; duplicate suppressed", result.probe_id)
            return
        try:
            if isinstance(result, wire.ProbeRejected):
                event = self._event(result, error=f"{result.error}: {result.reason}")
            else:
                self.keyring.check(envelope.fingerprint)
                started = time.perf_counter()
                self.book.refresh()  # `cipherface enroll` may have run beside this daemon
                try:
                    matches = await asyncio.to_thread(
                        rank,
                        self.keyring,
                        self.book,
                        result.scores,
                        subject=result.subject,
                        top_k=self.settings.top_k,
                        probe_check=result.probe_check,
                    )
                except IntegrityError as exc:
                    # Nothing derived from a tampered decryption leaves on-prem: the
                    # event names the failure and carries no distance.
                    INTEGRITY_FAILURES.labels(self.role, envelope.signer).inc()
                    log.warning(
                        "probe %s from %s refused: %s", result.probe_id, envelope.signer, exc
                    )
                    event = self._event(result, error=f"IntegrityError: {exc}")
                else:
                    event = self._decide(result, matches, time.perf_counter() - started)
            await self.transport.publish(
                self.transport.topology.events,
                event.routing_key,
                wire.encode(
                    event,
                    model=self.settings.model,
                    metric=self.settings.metric.value,
                    signer=self.signer,
                ),
                message_id=event.probe_id,
            )
            self.ledger.record(result.probe_id, time.time())
        finally:
            self.ledger.release(result.probe_id)

    def _decide(
        self, result: wire.ScoresReady, matches: list[Match], decrypt: float
    ) -> wire.VerificationEvent:
        timings = {**result.timings, "decrypt": decrypt}
        if not matches:
            reason = (
                f"UnknownSubject: {result.subject!r} is not enrolled"
                if result.subject
                else "EmptyGallery: nothing is enrolled"
            )
            return self._event(result, error=reason, timings=timings)
        best = matches[0]
        verified = accept(best, self.threshold, self.settings.metric)
        released = flood(best.distance, self.threshold, verified)
        return self._event(
            result,
            subject=best.subject,
            verified=verified,
            distance=round(released, wire.VerificationEvent.DISTANCE_DECIMALS),
            timings=timings,
        )

    def _event(
        self,
        result: wire.ScoresReady | wire.ProbeRejected,
        *,
        subject: str | None = None,
        verified: bool = False,
        distance: float | None = None,
        error: str | None = None,
        timings: Mapping[str, float] | None = None,
    ) -> wire.VerificationEvent:
        return wire.VerificationEvent(
            probe_id=result.probe_id,
            mode="1:1" if result.subject else "1:N",
            subject=subject or result.subject,
            verified=verified,
            distance=distance,
            threshold=self.threshold,
            model=self.settings.model,
            metric=self.settings.metric.value,
            error=error,
            timings={**(timings or {}), "total": time.time() - result.submitted_at},
        )
