"""Concurrent plaintext probes of one gallery share a pass: a short batching window.

Why: `EncryptedGallery.search_many` reads every block once for all the probes it
is given, while concurrent `search` calls each read the whole gallery. A daemon
that searches from worker threads (``asyncio.to_thread``) calls `SearchBatcher.search`
instead: the first caller waits `window` seconds, then scores every probe that
arrived meanwhile in one pass, and keeps serving those that arrive during that
pass; the others just wait for their answer. 1:1 claims join too: claims whose
subjects sit in the same blocks are scored together on those blocks only. A probe
the batch refuses (a wrong dimension) is retried alone, so one bad probe cannot
fail the others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cipherface.exceptions import CipherFaceError
from cipherface.wire.payloads import BlockScores

if TYPE_CHECKING:
    from cipherface.gallery.engine import EncryptedGallery

__all__ = ["SearchBatcher"]


@dataclass(slots=True)
class _Waiting:
    probe: np.ndarray | Sequence[float]
    subject: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    scores: list[BlockScores] | None = None
    error: Exception | None = None


class SearchBatcher:
    """Scores concurrent plaintext 1:N probes of ``gallery`` together (see the module).

    ``window`` (seconds) is what a lone probe waits for company; ``limit`` caps a
    pass, so a burst is served in several.
    """

    def __init__(self, gallery: EncryptedGallery, window: float = 0.005, limit: int = 64) -> None:
        self._gallery = gallery
        self._window = window
        self._limit = limit
        self._changed = threading.Condition()
        self._queue: list[_Waiting] = []
        self._serving = False

    def search(
        self, probe: np.ndarray | Sequence[float], *, subject: str | None = None
    ) -> list[BlockScores]:
        """`EncryptedGallery.search` of one plaintext probe, sharing a pass with others."""
        waiting = _Waiting(probe, subject)
        with self._changed:
            self._queue.append(waiting)
            while not waiting.done.is_set() and self._serving:
                self._changed.wait()
            lead = not waiting.done.is_set()
            if lead:
                self._serving = True
        if lead:
            self._lead(waiting)
        if waiting.error is not None:
            raise waiting.error
        assert waiting.scores is not None
        return waiting.scores

    def _lead(self, own: _Waiting) -> None:
        """Wait for company, score one batch (``own`` first), hand the lead on."""
        time.sleep(self._window)
        with self._changed:
            others = [w for w in self._queue if w is not own]
            batch = [own, *others[: self._limit - 1]]
            self._queue = others[self._limit - 1 :]
        groups: dict[tuple[int, ...] | None, list[_Waiting]] = {}
        try:
            for waiting in batch:
                subject = waiting.subject
                blocks = None if subject is None else tuple(self._gallery.blocks_of(subject))
                groups.setdefault(blocks, []).append(waiting)
            for blocks, members in groups.items():
                try:
                    results = self._gallery.search_many([w.probe for w in members], blocks=blocks)
                except CipherFaceError:
                    results = [self._alone(w) for w in members]
                for waiting, scores in zip(members, results, strict=True):
                    waiting.scores = scores
        except Exception as exc:  # handed to every caller of the batch
            for waiting in batch:
                waiting.error = exc
        finally:
            with self._changed:
                for waiting in batch:
                    waiting.done.set()
                self._serving = False
                self._changed.notify_all()

    def _alone(self, waiting: _Waiting) -> list[BlockScores] | None:
        try:
            return self._gallery.search(waiting.probe, subject=waiting.subject)
        except Exception as exc:  # re-raised in the caller's thread
            waiting.error = exc
            return None
