"""Opening a database another process opens at the same moment (`open_shared`)."""

from __future__ import annotations

import multiprocessing
import sqlite3
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from cipherface.ledger import ProbeLedger
from cipherface.sqlite import open_shared
from cipherface.store import GalleryStore

#: Processes opening each new file together, and files: the walkthrough's on-prem
#: daemon and ``cipherface enroll`` failed to open a new ledger about once in 40.
PROCESSES, ROUNDS = 4, 50


def _open_new_files(
    opener: Callable[[Path], object], folder: Path, start: Barrier, errors: multiprocessing.Queue
) -> None:
    failed = []
    for round_ in range(ROUNDS):
        start.wait()
        try:
            opener(folder / f"{round_}.sqlite").close()  # type: ignore[attr-defined]
        except Exception as exc:  # sent back: the assertion names it
            failed.append(repr(exc))
    errors.put(failed)


@pytest.mark.parametrize("opener", [ProbeLedger, GalleryStore], ids=["ledger", "store"])
def test_processes_opening_a_new_file_together_all_open_it(
    opener: Callable[[Path], object], tmp_path: Path
) -> None:
    forked = multiprocessing.get_context("fork")
    start, errors = forked.Barrier(PROCESSES), forked.Queue()
    workers = [
        forked.Process(target=_open_new_files, args=(opener, tmp_path, start, errors))
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    failed = [error for _ in workers for error in errors.get(timeout=120)]
    for worker in workers:
        worker.join()
    assert failed == []


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
