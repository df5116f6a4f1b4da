"""What a user of CipherFace calls: publish probes, receive verification events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from cipherface import wire
from cipherface.crypto import Keyring, Metric
from cipherface.embedding import Embedder, largest_face
from cipherface.exceptions import (
    ConfigError,
    IntegrityError,
    ProbeTimeout,
    SecretKeyError,
    SignatureError,
    WireFormatError,
)
from cipherface.gallery import EncryptedProbe, encrypt_probe
from cipherface.gallery.expansion import encrypt_packed_probe
from cipherface.signing import PinnedKey, VerifyKey
from cipherface.transport.base import Delivery, Transport

__all__ = ["MAX_SEEN", "REPLAY_WINDOW", "Client", "EdgeEncryptor", "EventStream"]

log = logging.getLogger(__name__)

#: Seconds before a subscription opened that an event may have been issued: an
#: older (signed, genuine) event is a replay and is dropped, counted in `replayed`.
REPLAY_WINDOW = 60.0
#: Probe ids a stream remembers to drop duplicates (the oldest are forgotten first):
#: a redelivered event arrives seconds after the first, not a hundred thousand later.
MAX_SEEN = 100_000


class EdgeEncryptor:
    """Embeds and encrypts a probe at the edge, so the cloud sees neither image nor embedding.

    Holds only the public context; model and metric must be the deployment's.
    """

    def __init__(self, public: Keyring, embedder: Embedder, metric: Metric) -> None:
        if public.is_private:
            raise SecretKeyError("an edge client must hold the public context, not the secret key")
        self.public = public
        self.embedder = embedder
        self.metric = metric

    def encrypt(
        self, image: bytes | str | os.PathLike[str], *, packed: bool = True
    ) -> EncryptedProbe:
        """The largest face of the image, embedded and encrypted (a few seconds).

        ``packed``: one ciphertext (235 KB at n8192) that replicas expand with the
        Galois keys on-prem ships them (`cipherface.gallery.expansion`); False: one
        ciphertext per dimension (16.8 MB at 128-d), for deployments whose message
        cap leaves those keys out.
        """
        face = largest_face(self.embedder.embed(image))
        encrypt = encrypt_packed_probe if packed else encrypt_probe
        return encrypt(self.public, face.embedding, self.metric)


class EventStream:
    """Verification events from a private queue bound to the events exchange.

    Created by `Client.events`; iterate with ``async for``. Events are
    deduplicated by probe id and request digest (`wire.request_digest`), so a
    subscriber sees each probe's decision once, and also the ``DuplicateProbeId``
    answer to a new probe that reused an answered id.
    Anyone who may publish to the exchange could forge a decision, so only
    events signed by on-prem's pinned key pass; the others are dropped and
    counted in `forged` (the queue is private: nobody else would read a dead letter);
    a genuine event issued more than `REPLAY_WINDOW` before the stream opened is a
    replay, dropped and counted in `replayed`.
    ``published`` maps the probe ids its client sent to their request digests, so
    `wait_for` answers a probe with its own event only: probe ids are the sender's
    choice, and another user may send a probe under the same id first.
    """

    def __init__(
        self,
        onprem_key: VerifyKey,
        *,
        max_seen: int = MAX_SEEN,
        published: Mapping[str, str] | None = None,
    ) -> None:
        self._verifier = PinnedKey(onprem_key)
        self._published: Mapping[str, str] = {} if published is None else published
        self._queue: asyncio.Queue[wire.VerificationEvent] = asyncio.Queue()
        #: Insertion-ordered, bounded to `max_seen`: the dedupe set does not grow forever.
        self._seen: dict[tuple[str, str], None] = {}
        self._max_seen = max_seen
        self._opened_at = time.time()
        #: Events dropped because on-prem's key did not sign them.
        self.forged = 0
        #: Signed events dropped because they were issued long before the stream opened.
        self.replayed = 0

    async def deliver(self, delivery: Delivery) -> None:
        """Transport handler: verify, decode and enqueue (a malformed event is dead-lettered)."""
        try:
            envelope = wire.decode(
                delivery.body, expect=(wire.VerificationEvent,), verifier=self._verifier
            )
        except SignatureError as exc:
            self.forged += 1
            log.warning("dropped an event on-prem did not sign: %s", exc)
            return
        event = envelope.message
        if not isinstance(event, wire.VerificationEvent):  # narrowed by `expect`
            raise WireFormatError("not a verification event")
        if event.issued_at < self._opened_at - REPLAY_WINDOW:
            self.replayed += 1
            log.warning("dropped a replayed event of probe %s", event.probe_id)
            return
        key = (event.probe_id, event.request)
        if key not in self._seen:
            self._seen[key] = None
            if len(self._seen) > self._max_seen:
                del self._seen[next(iter(self._seen))]
            self._queue.put_nowait(event)

    def __aiter__(self) -> AsyncIterator[wire.VerificationEvent]:
        return self

    async def __anext__(self) -> wire.VerificationEvent:
        return await self._queue.get()

    async def wait_for(
        self, probe_id: str, timeout: float | None = None, *, request: str | None = None
    ) -> wire.VerificationEvent:
        """The event of one probe (of that request digest, if given; else of the probe
        this stream's client sent under that id, if it did); other events stay queued
        for iteration. `ProbeTimeout` when none comes in ``timeout``."""
        held: list[wire.VerificationEvent] = []
        if request is None:
            request = self._published.get(probe_id)

        async def scan() -> wire.VerificationEvent:
            while True:
                event = await self._queue.get()
                if event.probe_id == probe_id and request in (None, event.request):
                    return event
                held.append(event)

        try:
            return await asyncio.wait_for(scan(), timeout)
        except asyncio.TimeoutError:
            raise ProbeTimeout(f"probe {probe_id}: no event within {timeout:g}s") from None
        finally:
            for event in held:
                self._queue.put_nowait(event)


class Client:
    """Publish probe images and subscribe to verification events."""

    def __init__(self, transport: Transport, onprem_key: VerifyKey | None = None) -> None:
        self.transport = transport
        #: On-prem's verify key: needed to read events (`events`, `verify`), not to publish.
        self.onprem_key = onprem_key
        #: Probe id -> request digest of the last probe sent under it (bounded to
        #: `MAX_SEEN`, oldest first): how `EventStream.wait_for` tells its event
        #: from the event of someone else's probe that took the same id.
        self._published: dict[str, str] = {}

    async def publish_probe(
        self,
        image: bytes | str | os.PathLike[str],
        claimed_subject: str | None = None,
        *,
        probe_id: str | None = None,
    ) -> str:
        """Queue an image for 1:1 verification (with a subject) or 1:N search; return its id."""
        return (await self._publish_image(image, claimed_subject, probe_id))[0]

    async def _publish_image(
        self,
        image: bytes | str | os.PathLike[str],
        claimed_subject: str | None,
        probe_id: str | None,
    ) -> tuple[str, str]:
        """Publish; (probe id, request digest). A missing file is a `ConfigError` naming it."""
        try:
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{image}: cannot read the image: {exc.strerror}") from None
        request = wire.ProbeRequest(
            probe_id=probe_id or wire.new_id(), image=data, subject=claimed_subject
        )
        # Over the transport's size limit: `MessageTooLargeError` (send a smaller image).
        body = wire.encode(request, limit=self.transport.max_message_size)
        return request.probe_id, await self._send(request.probe_id, body)

    async def _send(self, probe_id: str, body: bytes) -> str:
        """Send a probe message; its request digest. An id over AMQP's message-id limit
        travels in the body only: the cloud answers it with an ``InvalidProbeId`` event."""
        request = wire.request_digest(body)
        await self.transport.send(
            self.transport.topology.probes, body, message_id=wire.message_id(probe_id, request)
        )
        self._remember(probe_id, request)
        return request

    def _remember(self, probe_id: str, request: str) -> None:
        """The digest of the last probe sent under ``probe_id`` (`EventStream.wait_for`)."""
        self._published.pop(probe_id, None)
        self._published[probe_id] = request
        if len(self._published) > MAX_SEEN:
            del self._published[next(iter(self._published))]

    async def publish_encrypted_probe(
        self,
        probe: EncryptedProbe,
        claimed_subject: str | None = None,
        *,
        probe_id: str | None = None,
    ) -> str:
        """Queue a probe encrypted at the edge (see `EdgeEncryptor`); return its id.

        A packed probe is one message. One in columns goes in pieces by dimension
        range, each under the transport's size limit (`cipherface.wire.pieces`: 5 at
        128-d under 4 MiB): each piece is a message of its own on the probe queue,
        named by the whole probe's request digest.
        """
        request = wire.EncryptedProbeRequest(
            probe_id=probe_id or wire.new_id(), probe=probe, subject=claimed_subject
        )
        messages: list[wire.EncryptedProbeRequest] | list[wire.EncryptedProbePart] = (
            [request]
            if probe.packed is not None
            else wire.split_probe(request, self.transport.max_message_size)
        )
        bodies = [
            wire.encode(
                message,
                fingerprint=probe.fingerprint,
                metric=probe.metric,
                limit=self.transport.max_message_size,
            )
            for message in messages
        ]
        # What names the probe: a piece carries the whole probe's; a message, its own.
        first = messages[0]
        digest = (
            first.request
            if isinstance(first, wire.EncryptedProbePart)
            else wire.request_digest(bodies[0])
        )
        for body in bodies:
            await self.transport.send(
                self.transport.topology.probes,
                body,
                message_id=wire.message_id(request.probe_id, digest),
            )
        self._remember(request.probe_id, digest)
        return request.probe_id

    @contextlib.asynccontextmanager
    async def events(self, pattern: str = "#") -> AsyncIterator[EventStream]:
        """Subscribe (before publishing, so nothing is missed) to events matching ``pattern``.

        Routing keys are ``event.<1to1|1toN>.<verified|rejected|error>``. Events
        not signed by `onprem_key` are dropped (`EventStream.forged` counts them).
        """
        if self.onprem_key is None:
            raise ConfigError("reading events needs on-prem's verify key (Client(..., onprem_key))")
        stream = EventStream(self.onprem_key, published=self._published)
        consumer = await self.transport.consume(
            "",
            stream.deliver,
            bindings=[(self.transport.topology.events, pattern)],
            exclusive=True,
            prefetch=64,
        )
        try:
            yield stream
        finally:
            await consumer.cancel(timeout=1)

    async def verify(
        self,
        image: bytes | str | os.PathLike[str],
        claimed_subject: str | None = None,
        *,
        timeout: float = 120.0,
    ) -> wire.VerificationEvent:
        """Publish one probe and wait for its event (`ProbeTimeout` after ``timeout``).

        Raises `IntegrityError` if the event answers another claim than the one sent:
        on-prem learns the claim from the replica that scored the probe, and a replica
        that turned "is this A?" into "who is this?" would get any enrolled face verified.
        """
        async with self.events() as stream:
            probe_id, request = await self._publish_image(image, claimed_subject, None)
            event = await stream.wait_for(probe_id, timeout, request=request)
        mode = "1:N" if claimed_subject is None else "1:1"
        if event.mode != mode or (mode == "1:1" and event.subject != claimed_subject):
            raise IntegrityError(
                f"the event of probe {probe_id} answers {event.mode} {event.subject!r}, "
                f"not the {mode} claim {claimed_subject!r} sent"
            )
        return event
