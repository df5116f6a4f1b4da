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

An edge probe's pieces (`cipherface.wire.pieces`) gather the same way, one level
up: each piece's parts into the piece, then the pieces into the probe
(`wire.PieceGatherer`), whose ciphertexts are added up
(`cipherface.gallery.pieces.sum_pieces`) before the probe is ranked once. A set
of pieces that cannot form one probe (a dimension missing with every piece in,
scores that are no products) gets an error event at once; a piece that
contradicts the others is dead-lettered with the reason, and the probe then
gets its ``IncompleteScores`` event at the timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from agents.onprem.keys import KeySet
from cipherface import wire
from cipherface.config import Settings
from cipherface.crypto import Keyring
from cipherface.exceptions import CipherFaceError, KeyMismatchError, PartError, TransportError
from cipherface.gallery.pieces import edge_pieces, sum_pieces

__all__ = ["Gathered", "Gathering"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Gathered:
    """What a part's handler answers: the whole probe's scores, or an
    ``IncompleteScores`` rejection; then `Gathering.finish` releases ``key``'s parts."""

    scores: wire.ScoresReady | wire.ProbeRejected
    key: tuple[str, ...]


def _incomplete(
    part: wire.ScoresReady, reason: str, error: str = "IncompleteScores"
) -> wire.ProbeRejected:
    """The error event's cause for a probe whose parts cannot all be gathered."""
    return wire.ProbeRejected(
        probe_id=part.probe_id,
        subject=part.subject,
        error=error,
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
    #: A handler answers the probe (whole, or an error): the others only wait.
    claimed: bool = False


class Gathering:
    """Parts of probes in gathering, and the handlers waiting on them."""

    def __init__(
        self,
        window: int,
        timeout: float,
        keyring: Callable[[str], Keyring | None] = lambda fingerprint: None,
    ) -> None:
        self.window = window
        self.timeout = timeout
        #: The keyring of a fingerprint, to add an edge probe's pieces up under.
        self.keyring = keyring
        self._parts = wire.PartGatherer()
        self._pieces = wire.PieceGatherer()
        self._waiting: dict[tuple[str, ...], _Waiting] = {}
        self._stopping = False

    @classmethod
    def for_onprem(
        cls, settings: Settings, keys: Mapping[str, KeySet], current: KeySet
    ) -> Gathering:
        """On-prem's: a window of four deliveries per prefetch, plus room for every
        piece of an edge probe (`edge_pieces`: 5 at 128-d, 17 at 512-d under 4 MiB),
        whose handlers hold their deliveries unacked too; pieces are added up under
        the key set of their fingerprint."""

        def keyring(fingerprint: str) -> Keyring | None:
            held = keys.get(fingerprint)
            return None if held is None else held.keyring

        dimensions = current.book.dimensions
        pieces = edge_pieces(current.keyring, dimensions, settings.max_message_size)
        return cls(settings.prefetch * 4 + pieces, settings.gather_timeout, keyring)

    def __len__(self) -> int:
        """Probes in gathering."""
        return len(self._parts) + len(self._pieces)

    @staticmethod
    def wanted(result: wire.ScoresReady) -> bool:
        """Whether ``result`` is one of several parts or pieces: to gather, not answer."""
        return (result.parts, result.part, result.pieces) != (1, 0, 1)

    @staticmethod
    def key(part: wire.ScoresReady, signer: str, fingerprint: str) -> tuple[str, ...]:
        """What a part's handler waits on: its probe's parts, or all its pieces' parts."""
        if part.pieces > 1:
            return ("pieces", *wire.PieceGatherer.key(part))
        return wire.PartGatherer.key(part, signer, fingerprint)

    async def _summed(
        self, pieces: list[wire.ScoresReady], fingerprint: str, key: tuple[str, ...]
    ) -> Gathered:
        """Every piece of a probe in: its summed scores, or why there are none."""
        piece = pieces[0]
        try:
            wire.check_cover(pieces)
            keyring = self.keyring(fingerprint)
            if keyring is None:
                raise KeyMismatchError("(none held)", fingerprint)
            whole = await asyncio.to_thread(sum_pieces, keyring, pieces)
        except PartError as exc:
            return Gathered(scores=_incomplete(piece, str(exc)), key=key)
        except CipherFaceError as exc:
            return Gathered(scores=_incomplete(piece, str(exc), type(exc).__name__), key=key)
        return Gathered(scores=whole, key=key)

    async def add(self, part: wire.ScoresReady, signer: str, fingerprint: str) -> Gathered | None:
        """Hold ``part``; what to answer when this handler is the one to answer, else
        None once another handler has answered the probe. Raises `PartError` for a
        part that does not fit its probe (nothing held changes), and `TransportError`
        (requeue) when the answer failed or on-prem stops."""
        if self._stopping:
            raise TransportError("on-prem is stopping")
        key = self.key(part, signer, fingerprint)
        if part.parts * part.pieces >= self.window:
            reason = (
                f"{part.parts * part.pieces} parts, more than the {self.window - 1} "
                "on-prem can hold"
            )
            return Gathered(scores=_incomplete(part, reason), key=key)
        whole = self._parts.add(part, signer, fingerprint)
        waiting = self._waiting.setdefault(key, _Waiting(time.monotonic() + self.timeout))
        if whole is not None and part.pieces == 1:
            waiting.claimed = True
            return Gathered(scores=whole, key=key)
        if whole is not None and (pieces := self._pieces.add(whole, fingerprint)) is not None:
            waiting.claimed = True  # before the sum: a timeout meanwhile only waits
            return await self._summed(pieces, fingerprint, key)
        try:
            remaining = max(waiting.deadline - time.monotonic(), 0.0)
            await asyncio.wait_for(asyncio.shield(waiting.done), remaining)
        except TimeoutError:
            if waiting.claimed:  # answered meanwhile: wait for that answer to be out
                await waiting.done
                return None
            waiting.claimed = True
            # No piece whole yet (each still missing parts): this handler's part names it.
            first, held, what = self._drop(key) or (part, 0, "pieces")
            count = first.pieces if what == "pieces" else first.parts
            reason = f"{held} of {count} {what} within {self.timeout:.0f}s"
            return Gathered(scores=_incomplete(first, reason), key=key)
        return None

    def _drop(self, key: tuple[str, ...]) -> tuple[wire.ScoresReady, int, str] | None:
        """Forget a probe in gathering: its first part or piece, how many are held, of what."""
        if key[0] != "pieces":
            dropped = self._parts.drop(key)
            return None if dropped is None else (*dropped, "parts")
        _, probe_id, request = key
        pieces = self._pieces.drop((probe_id, request))
        self._parts.forget(probe_id, request)
        return None if pieces is None else (*pieces, "pieces")

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

    def finish(self, key: tuple[str, ...], error: BaseException | None = None) -> None:
        """The probe's event is out (or ``error``: it could not be published); release
        the handlers waiting on its parts (which then requeue on an error)."""
        waiting = self._waiting.pop(key, None)
        self._drop(key)
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
