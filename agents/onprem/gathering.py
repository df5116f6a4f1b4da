"""On-prem's wait for every shard's answer to a probe, in parts, holding them unacked.

A replica sends a large probe's scores in parts (`cipherface.wire.parts`), and a
sharded gallery answers a 1:N probe once per shard (`cipherface.sharding`). Each
piece's handler keeps its delivery unacked while the probe gathers: the handler
of the piece that completes it (every expected shard whole) answers the probe
with its one event, and only then do the other handlers return (so every piece
is acked after the event is out). If on-prem dies mid-gather, the broker
redelivers every piece.

Bounds, so the results consumer's prefetch window (``window`` unacked
deliveries) cannot deadlock: the window is sized from the gallery (`window_for`:
room for two probes of the most parts a probe can have, every face on every
block), a probe of more parts than the window could never complete and is
answered at once with an ``IncompleteScores`` error event, and at
`Settings.gather_timeout` after its first piece a probe is answered with what it
has: the shards that answered, as a *partial* answer (the event says so, with
the fraction of the gallery searched), or, without one whole shard, an
``IncompleteScores`` error event. Never a decision from part of the gallery
that does not say so, never silence.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cipherface import wire
from cipherface.exceptions import TransportError

__all__ = ["FACE_BLOCK_BYTES", "MAX_WINDOW", "Gathered", "Gathering", "window_for"]

#: Bytes of one face's scores of one block in a part (131.6 KB at n8192, with room
#: for msgpack): 31 fit a 4 MiB part (`wire.split_scores`).
FACE_BLOCK_BYTES = 135_000
#: Most results deliveries on-prem holds (each up to `Settings.max_message_size`).
MAX_WINDOW = 256


def window_for(
    prefetch: int, blocks: int, max_faces: int, shards: int = 1, limit: int = 4 * 1024 * 1024
) -> int:
    """Results deliveries on-prem holds: 4 x ``prefetch``, and room for two probes of
    the most parts one can have (every face on every block, at least a part per
    shard), at most `MAX_WINDOW`.

    Sized from the gallery at start, so a multi-face probe on a large gallery is
    answered rather than refused or left waiting for parts that cannot be delivered.
    """
    per_part = max(1, limit // FACE_BLOCK_BYTES // max_faces)  # blocks of every face
    parts = max(math.ceil(blocks / per_part), shards)
    return min(max(4 * prefetch, 2 * parts + 1), max(MAX_WINDOW, 4 * prefetch))


@dataclass(frozen=True, slots=True, kw_only=True)
class Gathered:
    """What a piece's handler answers: every answering shard's whole scores
    (``complete`` False at the deadline, some shard silent; ``error`` when two
    answers of one shard differ), or an ``IncompleteScores`` rejection; then
    `Gathering.finish` releases ``key``'s pieces."""

    answers: dict[int, wire.ScoresReady]
    rejected: wire.ProbeRejected | None = None
    complete: bool = True
    error: str | None = None
    key: tuple[str, str, str]


def _incomplete(part: wire.ScoresReady, reason: str) -> wire.ProbeRejected:
    """The error event's cause for a probe whose parts cannot all be gathered."""
    return wire.ProbeRejected(
        probe_id=part.probe_id,
        subject=part.subject,
        error="IncompleteScores",
        reason=reason,
        request=part.request,
        submitted_at=part.submitted_at,
    )


def _coverage(answer: wire.ScoresReady) -> list[list[tuple[int, int]]]:
    return [[(b.block_id, b.version) for b in face.scores] for face in answer.faces]


@dataclass(slots=True)
class _Probe:
    deadline: float
    expected: frozenset[int]
    first: wire.ScoresReady
    shards: dict[int, wire.ScoresReady] = field(default_factory=dict)
    signers: set[str] = field(default_factory=set)
    error: str | None = None
    answering: bool = False
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Gathering:
    """Pieces of probes in gathering, and the handlers waiting on them."""

    def __init__(self, window: int, timeout: float) -> None:
        self.window = window
        self.timeout = timeout
        self._parts = wire.PartGatherer()
        self._probes: dict[tuple[str, str, str], _Probe] = {}
        self._stopping = False

    def __len__(self) -> int:
        """Probes in gathering."""
        return len(self._probes)

    def _answer(self, probe: _Probe, key: tuple[str, str, str], complete: bool) -> Gathered:
        probe.answering = True
        return Gathered(answers=dict(probe.shards), complete=complete, error=probe.error, key=key)

    async def add(
        self, part: wire.ScoresReady, signer: str, fingerprint: str, expected: frozenset[int]
    ) -> Gathered | None:
        """Hold ``part``; what to answer when this handler is the one to answer, else
        None once another handler has answered the probe. Raises `PartError` for a
        part that does not fit its shard's other parts (nothing held changes), and
        `TransportError` (requeue) when the answer failed or on-prem stops."""
        if self._stopping:
            raise TransportError("on-prem is stopping")
        key = (part.probe_id, part.request, fingerprint)
        if part.parts >= self.window:
            reason = f"{part.parts} parts, more than the {self.window - 1} on-prem can hold"
            return Gathered(answers={}, rejected=_incomplete(part, reason), key=key)
        whole = part if part.parts == 1 else self._parts.add(part, signer, fingerprint)
        probe = self._probes.get(key)
        if probe is None:
            probe = self._probes[key] = _Probe(time.monotonic() + self.timeout, expected, part)
        probe.signers.add(signer)
        if whole is not None and not probe.answering:
            held = probe.shards.setdefault(whole.shard, whole)
            if held is not whole and _coverage(held) != _coverage(whole):
                probe.error = f"shard {whole.shard} answered twice, on other blocks"
            if probe.error or probe.expected <= set(probe.shards):
                return self._answer(probe, key, complete=True)
        try:
            remaining = max(probe.deadline - time.monotonic(), 0.0)
            await asyncio.wait_for(asyncio.shield(probe.done), remaining)
        except TimeoutError:
            if probe.answering:  # answered meanwhile: wait for that answer to be out
                await probe.done
                return None
            if probe.shards:
                return self._answer(probe, key, complete=False)
            probe.answering = True
            dropped = [self._parts.drop((*key[:2], s, fingerprint)) for s in probe.signers]
            held = sum(d[1] for d in dropped if d is not None)
            reason = f"{held} of {probe.first.parts} parts within {self.timeout:.0f}s"
            return Gathered(answers={}, rejected=_incomplete(probe.first, reason), key=key)
        return None

    async def gather(
        self,
        part: wire.ScoresReady,
        envelope: wire.Envelope,
        expected: frozenset[int],
        answer: Callable[[wire.Envelope, Gathered], Awaitable[None]],
    ) -> None:
        """Hold ``part`` until its probe is whole (or its deadline), then ``answer`` it
        once per probe, from the handler of the piece that completed it (or timed out)."""
        gathered = await self.add(part, envelope.signer, envelope.fingerprint, expected)
        if gathered is None:
            return
        try:
            await answer(envelope, gathered)
        except BaseException as exc:
            self.finish(gathered.key, exc)
            raise
        self.finish(gathered.key)

    def finish(self, key: tuple[str, str, str], error: BaseException | None = None) -> None:
        """The probe's event is out (or ``error``: it could not be published); release
        the handlers waiting on its pieces (which then requeue on an error)."""
        probe = self._probes.pop(key, None)
        if probe is None:
            return
        for signer in probe.signers:
            self._parts.drop((*key[:2], signer, key[2]))
        if not probe.done.done():
            if error is None:
                probe.done.set_result(None)
            else:
                probe.done.set_exception(TransportError(f"answer not sent: {error}"))
                probe.done.exception()  # retrieved here: waiters re-raise their own

    def stop(self) -> None:
        """On-prem stops: every held piece goes back to the queue, to be gathered again."""
        self._stopping = True
        for key in list(self._probes):
            self.finish(key, TransportError("on-prem is stopping"))
