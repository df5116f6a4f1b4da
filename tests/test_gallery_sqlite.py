"""Opening a database another process opens at the same moment (`open_shared`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cipherface.gallery.sqlite import open_shared


def test_steps_answered_locked_at_once_start_again(tmp_path: Path) -> None:
    calls: list[int] = []

    def prepare(db: sqlite3.Connection) -> None:
        calls.append(1)
        if len(calls) < 3:  # as SQLite answers where waiting could deadlock
            raise sqlite3.OperationalError("database is locked")
        db.execute("CREATE TABLE IF NOT EXISTS t (x)")

    db = open_shared(tmp_path / "book.sqlite", prepare)
    assert len(calls) == 3 and db.execute("SELECT COUNT(*) FROM t").fetchone() == (0,)
    db.close()


def test_any_other_error_is_raised_at_once(tmp_path: Path) -> None:
    calls: list[int] = []

    def prepare(db: sqlite3.Connection) -> None:
        calls.append(1)
        db.execute("SELECT * FROM nowhere")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        open_shared(tmp_path / "book.sqlite", prepare)
    assert len(calls) == 1
