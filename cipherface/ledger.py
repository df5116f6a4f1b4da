"""On-prem's record of which probes already have their verification event.

Brokers deliver at least once: a cloud replica killed after publishing scores
but before acking the probe computes them again, and on-prem may get the same
scores twice. The ledger makes emitting idempotent, and it is on disk, so a
restarted on-prem still knows what it emitted.

It is bounded: an entry is kept for ``window`` seconds (`Settings.ledger_window`,
default 7 days) and at most ``max_events`` entries (`Settings.ledger_max`, default
1,000,000; the oldest go first), pruned every `PRUNE_EVERY` records and at start.
On-prem drops, unanswered, results of probes older than the window (their event
may be forgotten), and probes older than their time-to-live (shorter than the
window) get an ``Expired`` event: so pruning never lets a duplicate through.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from cipherface.exceptions import StoreError
from cipherface.private import private_file

__all__ = ["PRUNE_EVERY", "ProbeLedger"]

#: Records between two prunings of the ledger.
PRUNE_EVERY = 256


class ProbeLedger:
    """A persistent, bounded set of probe ids whose event was published."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        window: float = 7 * 86400.0,
        max_events: int = 1_000_000,
    ) -> None:
        self.window = window
        self.max_events = max_events
        self._since_prune = 0
        target = ":memory:" if path is None else str(path)
        try:
            if path is not None:
                # On-prem's folder is private (0700, files 0600): see cipherface.private.
                private_file(path)
            self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS emitted (probe_id TEXT PRIMARY KEY, at REAL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS emitted_at ON emitted (at)")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the probe ledger at {target}: {exc}") from exc
        self._lock = threading.Lock()
        #: Probes whose event is being decided right now: the ledger row is only
        #: written once the event is out, and a second delivery of the same result
        #: may arrive meanwhile (scores redelivered after a broker restart).
        self._in_flight: set[str] = set()
        #: Duplicates suppressed since start (reported in logs and tests).
        self.duplicates = 0
        self.prune(time.time())

    def seen(self, probe_id: str) -> bool:
        """True when an event for this probe was already published."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM emitted WHERE probe_id = ?", (probe_id,)
            ).fetchone()
        return row is not None

    def claim(self, probe_id: str) -> bool:
        """Take the right to emit this probe's event; False (a duplicate) if it is taken.

        A claim ends with `record` once the event is published, or `release` if
        deciding failed, so that a redelivery can try again.
        """
        if probe_id in self._in_flight or self.seen(probe_id):
            self.duplicates += 1
            return False
        self._in_flight.add(probe_id)
        return True

    def record(self, probe_id: str, at: float) -> None:
        """Remember that the event for this probe is out."""
        try:
            with self._lock:
                self._db.execute("INSERT OR IGNORE INTO emitted VALUES (?, ?)", (probe_id, at))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot record probe {probe_id}: {exc}") from exc
        self._since_prune += 1
        if self._since_prune >= PRUNE_EVERY:
            self.prune(at)

    def prune(self, now: float) -> int:
        """Forget entries older than the window, then the oldest beyond `max_events`."""
        self._since_prune = 0
        try:
            with self._lock:
                old = self._db.execute(
                    "DELETE FROM emitted WHERE at < ?", (now - self.window,)
                ).rowcount
                over = self._db.execute(
                    "DELETE FROM emitted WHERE probe_id IN (SELECT probe_id FROM emitted "
                    "ORDER BY at DESC LIMIT -1 OFFSET ?)",
                    (self.max_events,),
                ).rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"cannot prune the probe ledger: {exc}") from exc
        return old + over

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM emitted").fetchone()[0])

    def release(self, probe_id: str) -> None:
        """End a claim (after `record`, or without an event when deciding failed)."""
        self._in_flight.discard(probe_id)

    def close(self) -> None:
        """Close the database."""
        self._db.close()
