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

An edge probe's pieces (`cipherface.wire.pieces`) gather one level further down:
each shard's answer to each piece is gathered from its parts, then each shard's
pieces (`wire.PieceGatherer`) are added up as ciphertexts
(`cipherface.gallery.pieces.sum_pieces`) into that shard's whole answer, before
the shards are gathered as above. A set of pieces that cannot form one probe (a
dimension missing with every piece in, scores that are no products) gets an
error event at once; a piece that contradicts the others is dead-lettered with
the reason, and the probe then gets its event at the deadline.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from agents.onprem.keys import KeySet
from cipherface import wire
from cipherface.config import Settings
from cipherface.crypto import Keyring
from cipherface.exceptions import CipherFaceError, KeyMismatchError, PartError, TransportError
from cipherface.gallery.pieces import edge_pieces, sum_pieces

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
    """What a piece's handler answers: every answering shard's whole scores (at the
    deadline, some shard may be silent: the merge says how much was searched;
    ``error`` when two answers of one shard differ), or an ``IncompleteScores``
    rejection; then `Gathering.finish` releases ``key``'s pieces."""

    answers: dict[int, wire.ScoresReady]
    rejected: wire.ProbeRejected | None = None
    error: str | None = None
    key: tuple[str, str, str]


def _incomplete(
    part: wire.ScoresReady, reason: str, error: str = "IncompleteScores"
) -> wire.ProbeRejected:
    """The error event's cause for a probe whose parts cannot all be gathered."""
    return wire.ProbeRejected.answering(part, error, reason, part.request)


def _coverage(answer: wire.ScoresReady) -> list[list[tuple[int, int]]]:
    return [[(b.block_id, b.version) for b in face.scores] for face in answer.faces]


@dataclass(slots=True)
class _Probe:
    deadline: float
    expected: frozenset[int]
    first: wire.ScoresReady
    shards: dict[int, wire.ScoresReady] = field(default_factory=dict)
    error: str | None = None
    answering: bool = False
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Gathering:
    """Pieces of probes in gathering, and the handlers waiting on them."""

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
        self._probes: dict[tuple[str, str, str], _Probe] = {}
        self._stopping = False

    @classmethod
    def for_onprem(
        cls, settings: Settings, keys: Mapping[str, KeySet], current: KeySet
    ) -> Gathering:
        """On-prem's: a window sized from the gallery (`window_for`) plus room for every
        piece of an edge probe from every shard (`edge_pieces`: 5 at 128-d, 17 at 512-d
        under 4 MiB), whose handlers hold their deliveries unacked too; pieces are
        added up under the key set of their fingerprint."""

        def keyring(fingerprint: str) -> Keyring | None:
            held = keys.get(fingerprint)
            return None if held is None else held.keyring

        book = current.book
        window = window_for(
            settings.prefetch,
            len(book.all_blocks()),
            settings.max_faces,
            settings.shards,
            settings.max_message_size,
        )
        pieces = edge_pieces(current.keyring, book.dimensions, settings.max_message_size)
        return cls(window + pieces * settings.shards, settings.gather_timeout, keyring)

    @staticmethod
    def wanted(result: wire.ScoresReady) -> bool:
        """Whether ``result`` is one of several parts or pieces: to gather, not answer."""
        return (result.parts, result.part, result.pieces) != (1, 0, 1)

    async def _summed(
        self, pieces: list[wire.ScoresReady], fingerprint: str
    ) -> wire.ScoresReady | wire.ProbeRejected:
        """Every piece of one shard's answer in: the summed scores, or why there are none."""
        piece = pieces[0]
        try:
            wire.check_cover(pieces)
            keyring = self.keyring(fingerprint)
            if keyring is None:
                raise KeyMismatchError("(none held)", fingerprint)
            return await asyncio.to_thread(sum_pieces, keyring, pieces)
        except PartError as exc:
            return _incomplete(piece, str(exc))
        except CipherFaceError as exc:
            return _incomplete(piece, str(exc), type(exc).__name__)

    def __len__(self) -> int:
        """Probes in gathering."""
        return len(self._probes)

    def _answer(self, probe: _Probe, key: tuple[str, str, str]) -> Gathered:
        probe.answering = True
        return Gathered(answers=dict(probe.shards), error=probe.error, key=key)

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
        if part.parts * part.pieces >= self.window:
            reason = (
                f"{part.parts * part.pieces} parts, more than the {self.window - 1} "
                "on-prem can hold"
            )
            return Gathered(answers={}, rejected=_incomplete(part, reason), key=key)
        whole = part if part.parts == 1 else self._parts.add(part, signer, fingerprint)
        pieces = None
        if whole is not None and whole.pieces > 1:
            pieces, whole = self._pieces.add(whole, fingerprint), None
        probe = self._probes.get(key)
        if probe is None:
            probe = self._probes[key] = _Probe(time.monotonic() + self.timeout, expected, part)
        if pieces is not None and not probe.answering:
            summed = await self._summed(pieces, fingerprint)
            if isinstance(summed, wire.ProbeRejected):
                probe.answering = True
                return Gathered(answers={}, rejected=summed, key=key)
            whole = summed
        if whole is not None and not probe.answering:
            held = probe.shards.setdefault(whole.shard, whole)
            if held is not whole and _coverage(held) != _coverage(whole):
                probe.error = f"shard {whole.shard} answered twice, on other blocks"
            if probe.error or probe.expected <= set(probe.shards):
                return self._answer(probe, key)
        try:
            remaining = max(probe.deadline - time.monotonic(), 0.0)
            await asyncio.wait_for(asyncio.shield(probe.done), remaining)
        except TimeoutError:
            if probe.answering:  # answered meanwhile: wait for that answer to be out
                await probe.done
                return None
            if probe.shards:
                return self._answer(probe, key)
            probe.answering = True
            parts, pieces = self._forget(key)
            first = probe.first
            held, count, what = (pieces, first.pieces, "pieces")
            if first.pieces == 1:
                held, count, what = parts, first.parts, "parts"
            reason = f"{held} of {count} {what} within {self.timeout:.0f}s"
            return Gathered(answers={}, rejected=_incomplete(first, reason), key=key)
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
        self._forget(key)
        if not probe.done.done():
            if error is None:
                probe.done.set_result(None)
            else:
                probe.done.set_exception(TransportError(f"answer not sent: {error}"))
                probe.done.exception()  # retrieved here: waiters re-raise their own

    def _forget(self, key: tuple[str, str, str]) -> tuple[int, int]:
        """Drop what is held of a probe: how many parts, and how many whole pieces."""
        probe_id, request, _ = key
        return self._parts.forget(probe_id, request), self._pieces.forget(probe_id, request)

    def stop(self) -> None:
        """On-prem stops: every held piece goes back to the queue, to be gathered again."""
        self._stopping = True
        for key in list(self._probes):
            self.finish(key, TransportError("on-prem is stopping"))
