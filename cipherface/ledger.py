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

Each entry is a probe id *and* the digest of the probe message it answered
(`wire.request_digest`): a redelivery of the same probe has the same digest and
is a duplicate, suppressed; a new probe reusing an answered id has another, and
gets an event of its own saying so (``DuplicateProbeId``), never silence.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
import time
from pathlib import Path

from cipherface.exceptions import StoreError
from cipherface.private import private_file
from cipherface.sqlite import open_shared

__all__ = ["PRUNE_EVERY", "Claim", "ProbeLedger"]

#: Records between two prunings of the ledger.
PRUNE_EVERY = 256


class Claim(enum.Enum):
    """What `ProbeLedger.claim` found for a (probe id, request digest)."""

    #: No event for this probe id yet: decide and emit it.
    NEW = "new"
    #: This very probe has (or is getting) its event: a redelivery, suppressed.
    DUPLICATE = "duplicate"
    #: Another probe had this id: emit a ``DuplicateProbeId`` error event.
    REUSED = "reused"


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
        try:
            if path is not None:
                # On-prem's folder is private (0700, files 0600): see cipherface.private.
                private_file(path)
            self._db = open_shared(path, self._prepare, autocommit=True)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the probe ledger at {path}: {exc}") from exc
        self._lock = threading.Lock()
        #: Probes whose event is being decided right now: the ledger row is only
        #: written once the event is out, and a second delivery of the same result
        #: may arrive meanwhile (scores redelivered after a broker restart).
        self._in_flight: set[tuple[str, str]] = set()
        #: Duplicates suppressed since start (reported in logs and tests).
        self.duplicates = 0
        self.prune(time.time())

    @staticmethod
    def _prepare(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS answered (probe_id TEXT, request TEXT, at REAL,"
            " PRIMARY KEY (probe_id, request))"
        )
        db.execute("CREATE INDEX IF NOT EXISTS answered_at ON answered (at)")
        old = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'emitted'"
        if db.execute(old).fetchone():
            # A ledger from before request digests: its probes count under digest ''.
            # One opener migrates; another, waiting on the lock, finds nothing left.
            db.execute("BEGIN IMMEDIATE")
            if db.execute(old).fetchone():
                db.execute("INSERT OR IGNORE INTO answered SELECT probe_id, '', at FROM emitted")
                db.execute("DROP TABLE emitted")
            db.execute("COMMIT")

    def seen(self, probe_id: str, request: str | None = None) -> bool:
        """True when an event for this probe id (and this request, if given) is out."""
        query, args = "SELECT 1 FROM answered WHERE probe_id = ?", (probe_id,)
        if request is not None:
            query, args = query + " AND request = ?", (probe_id, request)
        with self._lock:
            row = self._db.execute(query, args).fetchone()
        return row is not None

    def claim(self, probe_id: str, request: str = "") -> Claim:
        """Take the right to emit the event of this probe (``request``: its digest).

        A `Claim.NEW` or `Claim.REUSED` claim ends with `record` once the event is
        published, or `release` if deciding failed, so that a redelivery can try again.
        """
        key = (probe_id, request)
        if key in self._in_flight or self.seen(probe_id, request):
            self.duplicates += 1
            return Claim.DUPLICATE
        reused = self.seen(probe_id) or any(pid == probe_id for pid, _ in self._in_flight)
        self._in_flight.add(key)
        return Claim.REUSED if reused else Claim.NEW

    def record(self, probe_id: str, at: float, request: str = "") -> None:
        """Remember that the event for this probe (id and request digest) is out."""
        try:
            with self._lock:
                self._db.execute(
                    "INSERT OR IGNORE INTO answered VALUES (?, ?, ?)", (probe_id, request, at)
                )
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
                    "DELETE FROM answered WHERE at < ?", (now - self.window,)
                ).rowcount
                over = self._db.execute(
                    "DELETE FROM answered WHERE rowid IN (SELECT rowid FROM answered "
                    "ORDER BY at DESC LIMIT -1 OFFSET ?)",
                    (self.max_events,),
                ).rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"cannot prune the probe ledger: {exc}") from exc
        return old + over

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answered").fetchone()[0])

    def release(self, probe_id: str, request: str = "") -> None:
        """End a claim (after `record`, or without an event when deciding failed)."""
        self._in_flight.discard((probe_id, request))

    def close(self) -> None:
        """Close the database."""
        self._db.close()
