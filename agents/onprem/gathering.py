"""On-prem's wait for every part of a probe's scores, holding the parts unacked.

A replica sends a large probe's scores in parts (`cipherface.wire.parts`). Each
part's handler keeps its delivery unacked while the probe gathers: the handler of
the part that completes it ranks the whole probe and publishes its one event, and
only then do the other handlers return (so every part is acked after the event is
out). If on-prem dies mid-gather, the broker redelivers every part.

Bounds, so the results consumer's prefetch window (``window`` unacked deliveries)
cannot deadlock: a probe of more parts than the window could never complete and
is answered at once with an ``IncompleteScores`` error event; a probe whose parts
do not all arrive within `Settings.gather_timeout` (another probe's parts filling
the window, a replica that died mid-send) gets that error event then. Never a
silent drop, never a decision from part of the gallery.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cipherface import wire
from cipherface.exceptions import TransportError

__all__ = ["Gathered", "Gathering"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Gathered:
    """What a part's handler answers: the whole probe's scores, or an
    ``IncompleteScores`` rejection; then `Gathering.finish` releases ``key``'s parts."""

    scores: wire.ScoresReady | wire.ProbeRejected
    key: tuple[str, str, str, str]


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


@dataclass(slots=True)
class _Waiting:
    deadline: float
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Gathering:
    """Parts of probes in gathering, and the handlers waiting on them."""

    def __init__(self, window: int, timeout: float) -> None:
        self.window = window
        self.timeout = timeout
        self._parts = wire.PartGatherer()
        self._waiting: dict[tuple[str, str, str, str], _Waiting] = {}
        self._stopping = False

    def __len__(self) -> int:
        """Probes in gathering."""
        return len(self._parts)

    async def add(self, part: wire.ScoresReady, signer: str, fingerprint: str) -> Gathered | None:
        """Hold ``part``; what to answer when this handler is the one to answer, else
        None once another handler has answered the probe. Raises `PartError` for a
        part that does not fit its probe (nothing held changes), and `TransportError`
        (requeue) when the answer failed or on-prem stops."""
        if self._stopping:
            raise TransportError("on-prem is stopping")
        key = wire.PartGatherer.key(part, signer, fingerprint)
        if part.parts >= self.window:
            reason = f"{part.parts} parts, more than the {self.window - 1} on-prem can hold"
            return Gathered(scores=_incomplete(part, reason), key=key)
        whole = self._parts.add(part, signer, fingerprint)
        waiting = self._waiting.setdefault(key, _Waiting(time.monotonic() + self.timeout))
        if whole is not None:
            return Gathered(scores=whole, key=key)
        try:
            remaining = max(waiting.deadline - time.monotonic(), 0.0)
            await asyncio.wait_for(asyncio.shield(waiting.done), remaining)
        except TimeoutError:
            dropped = self._parts.drop(key)
            if dropped is None:  # answered meanwhile: wait for that answer to be out
                await waiting.done
                return None
            first, held = dropped
            reason = f"{held} of {first.parts} parts within {self.timeout:.0f}s"
            return Gathered(scores=_incomplete(first, reason), key=key)
        return None

    async def gather(
        self,
        part: wire.ScoresReady,
        envelope: wire.Envelope,
        answer: Callable[[wire.Envelope, wire.ScoresReady | wire.ProbeRejected], Awaitable[None]],
    ) -> None:
        """Hold ``part`` until its probe is whole, then ``answer`` it once per probe, from
        the handler of the part that completed it (or timed out)."""
        gathered = await self.add(part, envelope.signer, envelope.fingerprint)
        if gathered is None:
            return
        try:
            await answer(envelope, gathered.scores)
        except BaseException as exc:
            self.finish(gathered.key, exc)
            raise
        self.finish(gathered.key)

    def finish(self, key: tuple[str, str, str, str], error: BaseException | None = None) -> None:
        """The probe's event is out (or ``error``: it could not be published); release
        the handlers waiting on its parts (which then requeue on an error)."""
        waiting = self._waiting.pop(key, None)
        self._parts.drop(key)
        if waiting is not None and not waiting.done.done():
            if error is None:
                waiting.done.set_result(None)
            else:
                waiting.done.set_exception(TransportError(f"answer not sent: {error}"))
                waiting.done.exception()  # retrieved here: waiters re-raise their own

    def stop(self) -> None:
        """On-prem stops: every held part goes back to the queue, to be gathered again."""
        self._stopping = True
        for key in list(self._waiting):
            self.finish(key, TransportError("on-prem is stopping"))
