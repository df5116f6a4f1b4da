"""Opening an SQLite database that another process may be opening at the same moment:
the on-prem daemon and ``cipherface enroll``, started together, both open the
enrollment book and the probe ledger; a replica and ``cipherface`` commands open
its gallery store."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["BUSY_TIMEOUT", "open_shared"]

#: Seconds a connection waits for another connection's write before it fails.
BUSY_TIMEOUT = 30.0
#: Times the opening steps are tried while SQLite answers "locked" at once.
_ATTEMPTS = 20


def open_shared(
    path: Path | None,
    prepare: Callable[[sqlite3.Connection], None],
    *,
    autocommit: bool = False,
) -> sqlite3.Connection:
    """A connection to ``path`` (None: in memory) on which ``prepare`` (pragmas, schema,
    first rows: idempotent steps) has run; ``autocommit``: every statement commits
    on its own (``isolation_level=None``) unless the caller opens a transaction.

    SQLite answers "database is locked" at once, without waiting out the busy timeout,
    where waiting could deadlock, as when connections open a new file together and
    turn it to WAL; the steps then start again, after a short pause.
    """
    db = sqlite3.connect(
        ":memory:" if path is None else str(path),
        check_same_thread=False,
        timeout=BUSY_TIMEOUT,
        isolation_level=None if autocommit else "",
    )
    attempt = 1
    while True:
        try:
            prepare(db)
            return db
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == _ATTEMPTS:
                db.close()
                raise
        db.rollback()
        time.sleep(0.05 * attempt)
        attempt += 1
